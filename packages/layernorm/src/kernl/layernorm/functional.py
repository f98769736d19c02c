"""Public entry points: validate the arguments, then call the registered ``torch.library`` ops."""

import torch

from kernl.common.checks import SUPPORTED_DTYPES, check_float_tensor, check_real
from kernl.layernorm import ops
from kernl.layernorm.kernel import MAX_N


def _check_inputs(x, residual, weight, bias, eps) -> None:
    check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"x's last dimension must be between 1 and {MAX_N}, got {n}")
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x in shape and dtype: got {tuple(residual.shape)} {residual.dtype}, "
                f"x is {tuple(x.shape)} {x.dtype}"
            )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_float_tensor(name, t)
        if t.shape != (n,):
            raise ValueError(
                f"{name} must have shape ({n},) to match x's last dimension, got {tuple(t.shape)}"
            )
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    check_real("eps", eps, minimum=0.0)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension, as ``F.layer_norm(x, (N,), weight, bias, eps)``.

    x: ``(..., N)`` float16/bfloat16/float32, any strides, 1 <= N <= 65536. weight, bias: ``(N,)`` or
    None. Statistics in fp32; output ``(..., N)`` contiguous, in ``x.dtype``.
    With ``residual`` (same shape and dtype as ``x``) the kernel normalises ``x + residual`` in the same
    pass and returns ``(normalised, x + residual)``, the sum rounded to ``x.dtype``.
    """
    _check_inputs(x, residual, weight, bias, eps)
    tracing = torch.compiler.is_compiling()
    if residual is None:
        return (torch.ops.kernl.layer_norm if tracing else ops.layer_norm_impl)(x, weight, bias, float(eps))
    return (torch.ops.kernl.add_layer_norm if tracing else ops.add_layer_norm_impl)(
        x, residual, weight, bias, float(eps)
    )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with Hugging Face ``T5LayerNorm`` semantics.

    ``h = x * rsqrt(mean(x**2 in fp32) + eps)``; ``h`` is cast to ``weight.dtype`` when that is
    float16/bfloat16; the result is ``weight * h`` (dtype: ``weight.dtype``, float32 for a float32
    weight). x: ``(..., N)`` any strides; weight: ``(N,)``. With ``residual`` returns
    ``(rms_norm(x + residual), x + residual)``.
    """
    if weight is None:
        raise ValueError("weight is required for rms_norm (T5LayerNorm always has one)")
    _check_inputs(x, residual, weight, None, eps)
    tracing = torch.compiler.is_compiling()
    if residual is None:
        return (torch.ops.kernl.rms_norm if tracing else ops.rms_norm_impl)(x, weight, float(eps))
    return (torch.ops.kernl.add_rms_norm if tracing else ops.add_rms_norm_impl)(
        x, residual, weight, float(eps)
    )


def overflow_clamp(x: torch.Tensor, limit_if_inf: float, limit: float) -> torch.Tensor:
    """T5's fp16 overflow guard in two light passes: ``clamp(x, -L, L)`` with ``L = limit_if_inf`` when
    any element of ``x`` is infinite, else ``limit`` (transformers: ``finfo.max - 1000`` and
    ``finfo.max``). x: any shape and strides, float16/bfloat16/float32; output contiguous, x's dtype."""
    check_float_tensor("x", x)
    for name, value in (("limit_if_inf", limit_if_inf), ("limit", limit)):
        check_real(name, value, positive=True)
    op = torch.ops.kernl.overflow_clamp if torch.compiler.is_compiling() else ops.overflow_clamp_impl
    return op(x, float(limit_if_inf), float(limit))


def clamped_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    limit_if_inf: float,
    limit: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's fp16 overflow guard and the RMS norm after it, in one launch for a decoder step's few rows.

    ``guarded = clamp(h, -L, L)`` with ``h = x`` (``x + residual``, rounded to x's dtype) and
    ``L = limit_if_inf`` when ``h`` holds an infinity anywhere, else ``limit``; returns
    ``(rms_norm(guarded, weight, eps), guarded)``: the first as :func:`rms_norm`'s output (dtype from the
    weight), the second in x's dtype, both shaped like x ``(..., N)`` and contiguous. x: any strides;
    weight: ``(N,)``; residual: x's shape and dtype.
    """
    if weight is None:
        raise ValueError("weight is required for clamped_rms_norm (T5LayerNorm always has one)")
    _check_inputs(x, residual, weight, None, eps)
    for name, value in (("limit_if_inf", limit_if_inf), ("limit", limit)):
        check_real(name, value, positive=True)
    op = torch.ops.kernl.clamped_rms_norm if torch.compiler.is_compiling() else ops.clamped_rms_norm_impl
    return op(x, residual, weight, float(eps), float(limit_if_inf), float(limit))


__all__ = ["SUPPORTED_DTYPES", "clamped_rms_norm", "layer_norm", "ops", "overflow_clamp", "rms_norm"]
