"""Plain PyTorch references: the obvious composition, computed in fp32 (fp64 for fp64 inputs) and
rounded once to the input dtype. They define what the fused kernels compute, and are the fallback for
CPU tensors when Triton's interpreter is off. ``x``: ``(..., K)``; weights in ``nn.Linear`` layout
``(N, K)``; ``bias``: ``(N,)``; ``residual``: ``(..., N)``.
"""

import torch
import torch.nn.functional as F

from kernl.matmul.activations import TORCH_ACTIVATIONS


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None else None


def linear_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias)) [+ residual]``, output ``(..., N)`` in ``x.dtype``."""
    compute = _compute_dtype(x)
    h = TORCH_ACTIVATIONS[activation](F.linear(x.to(compute), weight.to(compute), _up(bias, compute)))
    if residual is not None:
        h = h + residual.to(compute)
    return h.to(x.dtype)


def gated_linear_act_reference(
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    activation: str = "gelu_tanh",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ w0.T) * (x @ w1.T) [+ residual]`` (T5 v1.1 gated FFN), output in ``x.dtype``."""
    compute = _compute_dtype(x)
    xc = x.to(compute)
    h = TORCH_ACTIVATIONS[activation](F.linear(xc, w0.to(compute))) * F.linear(xc, w1.to(compute))
    if residual is not None:
        h = h + residual.to(compute)
    return h.to(x.dtype)
