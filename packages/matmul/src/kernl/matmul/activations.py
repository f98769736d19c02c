"""Activations applied by the GEMM epilogue, on the fp32 accumulator.

Names (``ACTIVATIONS``): ``"none"``, ``"relu"``, ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (Hugging
Face ``gelu_new`` / ``gelu_pytorch_tanh``), ``"tanh"``, ``"silu"``. All follow the PyTorch formulas:

- ``tanh`` is written with ``exp`` (``1 - 2 / (exp(2|x|) + 1)``, sign restored), within a few fp32 ulps
  of ``torch.tanh``, exactly +-1 where it saturates.
- ``gelu`` is ``x * Phi(x)`` with ``Phi(x) = 1 - erfc(x / sqrt 2) / 2`` (mirrored for ``x < 0``, which
  avoids the cancellation in ``1 + erf(x)``), ``erfc`` from Abramowitz & Stegun 7.1.26: absolute error
  below 1.5e-7 (about two fp32 ulps of 1, as libdevice's ``erff``) at half its instruction count.
  This is still the exact (erf) GELU to fp32 accuracy, not the tanh approximation; it matters because
  the epilogue runs once per output element and, on Hopper, costs as much as a third of the GEMM.
"""

import triton
import triton.language as tl

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "tanh", "silu")


@triton.jit
def _tanh(x):
    t = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def _phi(x):
    """Standard normal CDF, ``(1 + erf(x / sqrt 2)) / 2``, through A&S 7.1.26 for ``erfc``."""
    z = tl.abs(x) * 0.7071067811865476
    t = tl.math.fdiv(1.0, 1.0 + 0.3275911 * z, ieee_rounding=False)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    half_erfc = 0.5 * poly * tl.exp(-z * z)
    return tl.where(x < 0, half_erfc, 1.0 - half_erfc)


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == "gelu":
        x = x * _phi(x)
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == "tanh":
        x = _tanh(x)
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    return x
