"""Activations applied by the GEMM epilogue, on the fp32 accumulator.

Names (``ACTIVATIONS``): ``"none"``, ``"relu"``, ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (Hugging
Face ``gelu_new`` / ``gelu_pytorch_tanh``), ``"tanh"``, ``"silu"``. All follow the PyTorch formulas:

- ``tanh`` is written with ``exp`` (``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``, sign restored), exactly
  +-1 where it saturates; below ``|x| = 0.625``, where that difference cancels (small arguments would
  lose their relative precision, down to 0), the ``tanh`` activation takes Cephes' odd polynomial
  instead (within 1.5 fp32 ulps over the whole range, in numpy). ``gelu_tanh`` keeps the plain form:
  there ``1 + tanh`` does not cancel.
- ``silu`` is ``x * sigmoid(x)`` with the sigmoid from ``e = exp(-|x|)`` as well. Neither exponent is
  ever positive, so no intermediate overflows on the way to a finite result.
- ``gelu`` is ``0.5 * x * (1 + erf(x / sqrt 2))`` with libdevice's ``erff`` (within 2 fp32 ulps); a
  cheaper erfc approximation was slower in the epilogue-bound Bert shape (two MUFU operations an
  element: see the matmul README).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "tanh", "silu")
# The PyTorch function of each name: the references, and PyTorch's GEMM candidate
TORCH_ACTIVATIONS = {
    "none": lambda h: h,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "tanh": torch.tanh,
    "silu": F.silu,
}


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _silu(x):
    e = tl.exp(-tl.abs(x))
    return x * tl.where(x < 0, e, 1.0) / (1.0 + e)


@triton.jit
def _tanh_accurate(x):
    z = x * x
    p = -5.70498872745e-3 * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    return tl.where(tl.abs(x) < 0.625, p * z * x + x, _tanh(x))


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """``ACTIVATION`` (one of :data:`ACTIVATIONS`) applied to an fp32 tile, element by element."""
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == "tanh":
        x = _tanh_accurate(x)
    elif ACTIVATION == "silu":
        x = _silu(x)
    return x
