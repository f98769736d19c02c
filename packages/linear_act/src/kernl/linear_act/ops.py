"""``torch.library`` registrations ``kernl::linear_act`` and ``kernl::gated_linear_act``.

Opaque custom ops with fake implementations; inputs are trusted here (validation lives in
:mod:`kernl.linear_act.functional`, which calls the ``*_impl`` functions directly in eager mode, where
the custom-op dispatcher would cost tens of microseconds a call, and the ops when tracing). Both run the GEMM core of :mod:`kernl.matmul` with its fused
epilogue. CPU tensors run the Triton kernel only under Triton's interpreter, else the reference.
"""

import math

import torch

from kernl.common.launch import runs_triton_kernel
from kernl.linear_act.reference import gated_linear_act_reference, linear_act_reference
from kernl.matmul import gemm
from kernl.matmul.functional import tf32_allowed


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """``(..., K)`` -> ``(rows, K)`` (K may be 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t is not None else None


def linear_act_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``kernl::linear_act``: ``act(x @ weight.T + bias) [+ residual]``, x ``(..., K)``, weight ``(N, K)`` -> ``(..., N)``."""
    if not runs_triton_kernel(x):
        return linear_act_reference(x, weight, bias, activation, residual)
    out = gemm(_flat(x)[None], weight.t()[None], bias=bias, residual=_flat(residual), activation=activation,
               allow_tf32=tf32_allowed())  # fmt: skip
    return out.view(*x.shape[:-1], weight.shape[0])


def gated_linear_act_impl(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, activation: str, residual: torch.Tensor | None
) -> torch.Tensor:
    """``kernl::gated_linear_act``: ``act(x @ w0.T) * (x @ w1.T) [+ residual]``, x ``(..., K)`` -> ``(..., N)``."""
    if not runs_triton_kernel(x):
        return gated_linear_act_reference(x, w0, w1, activation, residual)
    out = gemm(_flat(x)[None], w0.t()[None], b2=w1.t(), residual=_flat(residual), activation=activation,
               allow_tf32=tf32_allowed())  # fmt: skip
    return out.view(*x.shape[:-1], w0.shape[0])


linear_act_op = torch.library.custom_op("kernl::linear_act", linear_act_impl, mutates_args=())
gated_linear_act_op = torch.library.custom_op(
    "kernl::gated_linear_act", gated_linear_act_impl, mutates_args=()
)


@linear_act_op.register_fake
def _(x, weight, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@gated_linear_act_op.register_fake
def _(x, w0, w1, activation, residual):
    return x.new_empty((*x.shape[:-1], w0.shape[0]))
