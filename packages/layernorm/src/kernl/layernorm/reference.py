"""Plain PyTorch references with the same signatures as the kernels.

They define what the kernels must compute and serve as the fallback for CPU tensors when Triton's
interpreter is off. Shapes: ``x`` and ``residual`` are ``(..., N)``; ``weight``/``bias`` are ``(N,)``.
"""

import torch
import torch.nn.functional as F


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.layer_norm`` over the last dim, computed in fp32, output in ``x.dtype``.

    With ``residual``: returns ``(layer_norm(x + residual), x + residual)``, the sum rounded to
    ``x.dtype`` first as an unfused ``x + residual`` would be.
    """
    summed = x + residual if residual is not None else x
    compute = torch.float64 if summed.dtype == torch.float64 else torch.float32
    out = F.layer_norm(
        summed.to(compute),
        summed.shape[-1:],
        weight.to(compute) if weight is not None else None,
        bias.to(compute) if bias is not None else None,
        eps,
    ).to(x.dtype)
    return (out, summed) if residual is not None else out


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face ``T5LayerNorm``: fp32 variance, ``x * rsqrt(var + eps)``, cast to the weight's
    dtype when it is fp16/bf16, then ``weight * h``. Output dtype follows ``weight * h``.

    With ``residual``: returns ``(rms_norm(x + residual), x + residual)``.
    """
    summed = x + residual if residual is not None else x
    compute = torch.float64 if summed.dtype == torch.float64 else torch.float32
    variance = summed.to(compute).pow(2).mean(-1, keepdim=True)
    hidden = summed.to(compute) * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.to(weight.dtype)
    out = weight * hidden
    return (out, summed) if residual is not None else out


def overflow_clamp_reference(x: torch.Tensor, limit_if_inf: float, limit: float) -> torch.Tensor:
    """T5's fp16 overflow guard as transformers writes it: ``clamp(x, -L, L)``, ``L = limit_if_inf`` when
    any element of ``x`` is infinite, else ``limit``."""
    bound = torch.where(torch.isinf(x).any(), limit_if_inf, limit)
    return torch.clamp(x, min=-bound, max=bound)


def clamped_rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    limit_if_inf: float,
    limit: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's overflow guard, then its norm: ``guarded = overflow_clamp(x [+ residual], limit_if_inf, limit)``;
    returns ``(rms_norm(guarded, weight, eps), guarded)``."""
    guarded = overflow_clamp_reference(x + residual if residual is not None else x, limit_if_inf, limit)
    return rms_norm_reference(guarded, weight, eps), guarded
