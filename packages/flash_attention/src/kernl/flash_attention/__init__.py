"""kernl.flash_attention: fused attention (padding masks, T5 position bias, split-KV decoding, a decoding
step's cache write fused in, packed sequences, grouped-query heads) and the rotary position embedding of
queries and keys.

>>> from kernl.flash_attention import attention, attention_decode, attention_decode_write, attention_varlen
>>> from kernl.flash_attention import rotary
"""

from kernl.flash_attention.functional import (
    SUPPORTED_DTYPES,
    attention,
    attention_decode,
    attention_decode_write,
    attention_varlen,
    rotary,
)
from kernl.flash_attention.launch import MAX_HEAD_DIM
from kernl.flash_attention.reference import (
    attention_decode_write_reference,
    attention_reference,
    attention_varlen_reference,
    expand_relative_bias,
    rotary_reference,
)

__all__ = [
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "attention",
    "attention_decode",
    "attention_decode_write",
    "attention_decode_write_reference",
    "attention_reference",
    "attention_varlen",
    "attention_varlen_reference",
    "expand_relative_bias",
    "rotary",
    "rotary_reference",
]
