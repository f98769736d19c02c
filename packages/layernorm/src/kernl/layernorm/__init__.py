"""kernl.layernorm: Triton LayerNorm and T5 RMSNorm, with an optional fused residual add, and T5's fp16
overflow guard, alone or fused into the RMS norm after it.

>>> from kernl.layernorm import layer_norm, rms_norm
"""

from kernl.layernorm.functional import (
    SUPPORTED_DTYPES,
    clamped_rms_norm,
    layer_norm,
    overflow_clamp,
    rms_norm,
)
from kernl.layernorm.kernel import MAX_N
from kernl.layernorm.reference import (
    clamped_rms_norm_reference,
    layer_norm_reference,
    overflow_clamp_reference,
    rms_norm_reference,
)

__all__ = [
    "MAX_N",
    "SUPPORTED_DTYPES",
    "clamped_rms_norm",
    "clamped_rms_norm_reference",
    "layer_norm",
    "layer_norm_reference",
    "overflow_clamp",
    "overflow_clamp_reference",
    "rms_norm",
    "rms_norm_reference",
]
