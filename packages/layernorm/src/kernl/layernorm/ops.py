"""``torch.library`` registrations, so the kernels can sit inside ``torch.compile``d and FX graphs.

The ops are opaque custom ops with fake (meta) implementations: this works under Triton's interpreter
too, where ``triton_op``/``wrap_triton`` cannot be traced. Inputs are trusted here; validation lives
in :mod:`kernl.layernorm.functional`, which calls the ``*_impl`` functions directly in eager mode
(the custom-op dispatcher costs tens of microseconds of CPU time a call) and the ops when tracing.

CPU tensors run the Triton kernel only when Triton's interpreter is on (``TRITON_INTERPRET=1``);
otherwise they fall back to the PyTorch reference, so the ops always return the right answer.
"""

import torch

from kernl.common.launch import runs_triton_kernel
from kernl.layernorm.kernel import norm_forward
from kernl.layernorm.overflow_clamp import overflow_clamp_forward
from kernl.layernorm.reference import (
    clamped_rms_norm_reference,
    layer_norm_reference,
    overflow_clamp_reference,
    rms_norm_reference,
)


def rms_norm_output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """T5LayerNorm's output dtype: ``weight * h`` with ``h`` in the weight dtype when it is half."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        return weight.dtype
    return torch.promote_types(weight.dtype, torch.float32)


def _normalize(x, residual, weight, bias, eps, is_rms):
    if not runs_triton_kernel(x):  # contiguous, as the kernel's outputs and the fake implementations
        if is_rms:
            result = rms_norm_reference(x, weight, eps, residual)
        else:
            result = layer_norm_reference(x, weight, bias, eps, residual)
        return tuple(t.contiguous() for t in result) if residual is not None else (result.contiguous(), None)
    n = x.shape[-1]
    out_dtype = rms_norm_output_dtype(x, weight) if is_rms else x.dtype
    flat_residual = residual.reshape(-1, n) if residual is not None else None
    with torch.cuda.device(x.device.index if x.is_cuda else -1):  # Triton launches on the current device
        y, summed = norm_forward(x.reshape(-1, n), weight, bias, flat_residual, eps, is_rms, out_dtype)
    return y.view(x.shape), summed.view(x.shape) if summed is not None else None


def layer_norm_impl(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``kernl::layer_norm``: x ``(..., N)`` normalised over N, in x's dtype."""
    return _normalize(x, None, weight, bias, eps, is_rms=False)[0]


def add_layer_norm_impl(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernl::add_layer_norm``: ``(layer_norm(x + residual), x + residual)``, both shaped like x ``(..., N)``."""
    return _normalize(x, residual, weight, bias, eps, is_rms=False)


def rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``kernl::rms_norm``: x ``(..., N)`` scaled by its root mean square over N (T5's layer norm)."""
    return _normalize(x, None, weight, None, eps, is_rms=True)[0]


def add_rms_norm_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernl::add_rms_norm``: ``(rms_norm(x + residual), x + residual)``, both shaped like x ``(..., N)``."""
    return _normalize(x, residual, weight, None, eps, is_rms=True)


def overflow_clamp_impl(x: torch.Tensor, limit_if_inf: float, limit: float) -> torch.Tensor:
    """``kernl::overflow_clamp``: x (any shape) clamped to ``+-limit_if_inf`` if it holds an infinity,
    else to ``+-limit``; contiguous, in x's dtype."""
    if not runs_triton_kernel(x):
        return overflow_clamp_reference(x, limit_if_inf, limit).contiguous()
    with torch.cuda.device(x.device.index if x.is_cuda else -1):  # Triton launches on the current device
        return overflow_clamp_forward(x.contiguous(), limit_if_inf, limit)


def clamped_rms_norm_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    limit_if_inf: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernl::clamped_rms_norm``: ``guarded`` = T5's overflow guard on x ``(..., N)`` (on ``x + residual``);
    returns ``(rms_norm(guarded), guarded)``, both shaped like x and contiguous, ``guarded`` in x's dtype."""
    if not runs_triton_kernel(x):
        normed, guarded = clamped_rms_norm_reference(x, weight, eps, limit_if_inf, limit, residual)
        return normed.contiguous(), guarded.contiguous()
    n = x.shape[-1]
    flat_residual = residual.reshape(-1, n) if residual is not None else None
    with torch.cuda.device(x.device.index if x.is_cuda else -1):  # Triton launches on the current device
        y, guarded = norm_forward(
            x.reshape(-1, n), weight, None, flat_residual, eps, True, rms_norm_output_dtype(x, weight),
            clamp=(limit_if_inf, limit),
        )  # fmt: skip
    return y.view(x.shape), guarded.view(x.shape)


layer_norm_op = torch.library.custom_op("kernl::layer_norm", layer_norm_impl, mutates_args=())
add_layer_norm_op = torch.library.custom_op("kernl::add_layer_norm", add_layer_norm_impl, mutates_args=())
rms_norm_op = torch.library.custom_op("kernl::rms_norm", rms_norm_impl, mutates_args=())
add_rms_norm_op = torch.library.custom_op("kernl::add_rms_norm", add_rms_norm_impl, mutates_args=())
overflow_clamp_op = torch.library.custom_op("kernl::overflow_clamp", overflow_clamp_impl, mutates_args=())
clamped_rms_norm_op = torch.library.custom_op(
    "kernl::clamped_rms_norm", clamped_rms_norm_impl, mutates_args=()
)


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2))


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=rms_norm_output_dtype(x, weight))


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=rms_norm_output_dtype(x, weight)), x.new_empty(x.shape)


@overflow_clamp_op.register_fake
def _(x, limit_if_inf, limit):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@clamped_rms_norm_op.register_fake
def _(x, residual, weight, eps, limit_if_inf, limit):
    return x.new_empty(x.shape, dtype=rms_norm_output_dtype(x, weight)), x.new_empty(x.shape)
