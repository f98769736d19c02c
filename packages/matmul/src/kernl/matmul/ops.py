"""``torch.library`` registration of ``kernl::matmul`` (opaque custom op with a fake implementation).

Inputs are trusted here; validation lives in :mod:`kernl.matmul.functional`, which calls
:func:`matmul_impl` directly in eager mode (the custom-op dispatcher costs tens of microseconds of
CPU time a call) and the op when tracing. CPU tensors run the
Triton kernel only under Triton's interpreter (``TRITON_INTERPRET=1``), else the PyTorch reference.
"""

import torch

from kernl.common.launch import runs_triton_kernel
from kernl.matmul.launch import gemm
from kernl.matmul.reference import matmul_reference


def output_shape(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """``(M, N)`` for two matrices, else ``(batch, M, N)`` with the batch broadcast."""
    m, n = a.shape[-2], b.shape[-1]
    if a.dim() == 2 and b.dim() == 2:
        return (m, n)
    batches = (a.shape[0] if a.dim() == 3 else 1, b.shape[0] if b.dim() == 3 else 1)
    return (0 if 0 in batches else max(batches), m, n)  # an empty batch broadcasts to empty, as in torch


def matmul_impl(a: torch.Tensor, b: torch.Tensor, allow_tf32: bool) -> torch.Tensor:
    """``kernl::matmul``: ``a @ b`` for 2-D or 3-D (broadcast batch) operands, in a's dtype."""
    if not runs_triton_kernel(a):
        return matmul_reference(a, b, allow_tf32).reshape(output_shape(a, b))
    shape = output_shape(a, b)
    if a.dim() == 3 and b.dim() == 2:
        try:  # fold the batch into M when the strides allow: one bigger GEMM, better tiles
            folded = a.view(-1, a.shape[-1])
        except RuntimeError:
            folded = None
        if folded is not None:
            return gemm(folded[None], b[None], allow_tf32=allow_tf32).view(shape)
    a3 = a if a.dim() == 3 else a[None]
    b3 = b if b.dim() == 3 else b[None]
    return gemm(a3, b3, allow_tf32=allow_tf32).view(shape)


matmul_op = torch.library.custom_op("kernl::matmul", matmul_impl, mutates_args=())


@matmul_op.register_fake
def _(a, b, allow_tf32):
    return a.new_empty(output_shape(a, b))
