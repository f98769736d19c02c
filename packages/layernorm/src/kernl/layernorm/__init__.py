"""kernl.layernorm: Triton LayerNorm and T5 RMSNorm, with an optional fused residual add.

>>> from kernl.layernorm import layer_norm, rms_norm
"""

from kernl.layernorm.functional import SUPPORTED_DTYPES, layer_norm, rms_norm
from kernl.layernorm.kernel import MAX_N
from kernl.layernorm.reference import layer_norm_reference, rms_norm_reference

__all__ = [
    "MAX_N",
    "SUPPORTED_DTYPES",
    "layer_norm",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
]
