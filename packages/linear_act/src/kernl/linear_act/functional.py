"""Public entry points: validate the arguments, then call the registered ``torch.library`` ops."""

import torch

from kernl.common.checks import check_float_tensor, check_same
from kernl.linear_act import ops
from kernl.matmul import ACTIVATIONS

# Hugging Face spellings of the same functions.
ALIASES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu", "identity": "none"}


def _activation(activation: str | None) -> str:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be a str or None, got {type(activation).__name__}")
    name = "none" if activation is None else ALIASES.get(activation, activation)
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (or None), got {activation!r}")
    return name


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., K), got shape {tuple(x.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the weight's in_features ({k})")


def _check_weight(name: str, w: torch.Tensor, x: torch.Tensor) -> None:
    check_float_tensor(name, w)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    check_same(name, w, "x", x)


def _check_residual(residual: torch.Tensor | None, x: torch.Tensor, n: int) -> None:
    if residual is None:
        return
    check_float_tensor("residual", residual)
    check_same("residual", residual, "x", x)
    if residual.shape != (*x.shape[:-1], n):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], n)}, got {tuple(residual.shape)}")


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias) [+ residual]`` in one kernel, the epilogue on the fp32 accumulator.

    x: ``(..., K)`` (rank >= 2; leading dims flattened), weight: ``(N, K)`` (``nn.Linear`` layout),
    bias: ``(N,)``, residual: ``(..., N)``; all float16/bfloat16/float32 of one dtype, any strides.
    activation: None/"none", "relu", "gelu" (exact erf), "gelu_tanh" (HF "gelu_new"), "tanh", "silu".
    Output: contiguous ``(..., N)`` in ``x.dtype``. fp32 uses TF32 only if torch allows it.
    """
    act = _activation(activation)
    check_float_tensor("x", x)
    _check_weight("weight", weight, x)
    _check_x(x, weight.shape[1])
    if bias is not None:
        check_float_tensor("bias", bias)
        check_same("bias", bias, "x", x)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_residual(residual, x, weight.shape[0])
    op = torch.ops.kernl.linear_act if torch.compiler.is_compiling() else ops.linear_act_impl
    return op(x, weight, bias, act, residual)


def gated_linear_act(
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    activation: str | None = "gelu_tanh",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ w0.T) * (x @ w1.T) [+ residual]``, reading ``x`` once (T5 v1.1 / flan-T5 gated FFN).

    x: ``(..., K)``; w0, w1: ``(N, K)`` each; residual: ``(..., N)``; one float dtype, any strides.
    Output: contiguous ``(..., N)`` in ``x.dtype``.
    """
    act = _activation(activation)
    check_float_tensor("x", x)
    _check_weight("w0", w0, x)
    _check_weight("w1", w1, x)
    if w1.shape != w0.shape:
        raise ValueError(f"w1 must have w0's shape {tuple(w0.shape)}, got {tuple(w1.shape)}")
    _check_x(x, w0.shape[1])
    _check_residual(residual, x, w0.shape[0])
    op = torch.ops.kernl.gated_linear_act if torch.compiler.is_compiling() else ops.gated_linear_act_impl
    return op(x, w0, w1, act, residual)


__all__ = ["ALIASES", "gated_linear_act", "linear_act", "ops"]
