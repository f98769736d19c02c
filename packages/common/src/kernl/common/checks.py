"""Argument checks shared by the kernel packages' public functions: a wrong type raises TypeError, a
wrong value ValueError, each naming the argument."""

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...], what: str) -> None:
    """TypeError unless ``t`` is a tensor of one of ``dtypes`` (``what`` names them in the message);
    ValueError when it requires grad while autograd records (the kernels have no backward)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {t.dtype}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad; kernl's kernels have no backward: call under torch.no_grad()"
        )


def check_float_tensor(name: str, t: object) -> None:
    """:func:`check_tensor` for a float16/bfloat16/float32 tensor, which must also sit on a CUDA device
    or the CPU (ValueError)."""
    check_tensor(name, t, SUPPORTED_DTYPES, "float16, bfloat16 or float32")
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} must be on a CUDA device (or CPU), got {t.device}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """ValueError unless ``t`` has ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_real(name: str, value: object, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a Python float. TypeError unless it is a real number (Python or NumPy; a bool is not
    one); ValueError unless it is finite, at least ``minimum`` when given, above 0 when ``positive``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return float(value)
