"""Activations applied by the GEMM epilogue, on the fp32 accumulator.

Names (``ACTIVATIONS``): ``"none"``, ``"relu"``, ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (Hugging
Face ``gelu_new`` / ``gelu_pytorch_tanh``), ``"tanh"``, ``"silu"``. All follow the PyTorch formulas;
``tanh`` is written with ``exp`` (``1 - 2 / (exp(2|x|) + 1)``, sign restored), which stays within a
few fp32 ulps of ``torch.tanh`` and overflows to exactly +-1.
"""

import triton
import triton.language as tl

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "tanh", "silu")


@triton.jit
def _tanh(x):
    t = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == "tanh":
        x = _tanh(x)
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    return x
