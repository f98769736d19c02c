"""Public entry point: validate the arguments, then call the registered ``torch.library`` op."""

import torch

from kernl.common.checks import SUPPORTED_DTYPES, check_float_tensor, check_same
from kernl.matmul import ops


@torch.compiler.assume_constant_result  # read while tracing, a constant in the graph (as torch's own flag)
def tf32_allowed() -> bool:
    """PyTorch's own switch for TF32 in fp32 matmuls: ``torch.backends.cuda.matmul.fp32_precision``
    (``"tf32"`` or ``"ieee"``) when set, else the legacy ``allow_tf32`` (which raises once the new
    setting says ``"tf32"``)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    return precision == "tf32" if precision != "none" else bool(matmul.allow_tf32)


def matmul(a: torch.Tensor, b: torch.Tensor, allow_tf32: bool | None = None) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation, as ``torch.matmul`` for 2-D and 3-D operands.

    a: ``(M, K)`` or ``(Ba, M, K)``; b: ``(K, N)`` or ``(Bb, K, N)``; batch sizes equal, or one of
    them 1 or absent (broadcast). float16/bfloat16/float32, both the same dtype and device, any
    strides. Output: contiguous ``(M, N)`` (both 2-D) or ``(B, M, N)``, in the input dtype.
    ``allow_tf32`` (fp32 only): None follows PyTorch's setting (:func:`tf32_allowed`).
    """
    check_float_tensor("a", a)
    check_float_tensor("b", b)
    check_same("b", b, "a", a)
    for name, t in (("a", a), ("b", b)):
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be 2-D or 3-D, got {t.dim()}-D shape {tuple(t.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"a's last dimension ({a.shape[-1]}) must equal b's second-to-last ({b.shape[-2]}): "
            f"a is {tuple(a.shape)}, b is {tuple(b.shape)}"
        )
    if a.dim() == 3 and b.dim() == 3 and 1 not in (a.shape[0], b.shape[0]) and a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes of a ({a.shape[0]}) and b ({b.shape[0]}) cannot be broadcast")
    if allow_tf32 is not None and not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool or None, got {type(allow_tf32).__name__}")
    op = torch.ops.kernl.matmul if torch.compiler.is_compiling() else ops.matmul_impl
    return op(a, b, tf32_allowed() if allow_tf32 is None else allow_tf32)


__all__ = ["SUPPORTED_DTYPES", "matmul", "ops"]
