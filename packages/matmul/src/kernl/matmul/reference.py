"""Plain PyTorch reference for :func:`kernl.matmul.matmul`, and the fallback for CPU tensors.

Half-precision inputs are multiplied with fp32 accumulation (fp64 inputs stay fp64), then the result
is rounded once to the input dtype, which is what the kernel computes.
"""

import torch


def matmul_reference(a: torch.Tensor, b: torch.Tensor, allow_tf32: bool = False) -> torch.Tensor:
    """``torch.matmul(a, b)`` for ``(..., M, K) @ (..., K, N)`` (broadcast batch), in ``a.dtype``.

    ``allow_tf32`` is accepted for signature parity; the reference always computes in full fp32.
    """
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    return torch.matmul(a.to(compute), b.to(compute)).to(a.dtype)
