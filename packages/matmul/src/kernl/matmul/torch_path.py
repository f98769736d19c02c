"""The PyTorch candidate (``Config(kernel="torch")``): the GEMM and its epilogue in PyTorch's own ops.

On CUDA those are cuBLAS / cuBLASLt, whose Hopper kernels (2-CTA clusters with multicast loads, tile
widths that are not powers of two) Triton does not produce; the tuner times this candidate beside the
Triton tiles and keeps the faster. It computes the function the Triton kernels compute,
``act(a @ b + bias) [* (a @ b2)] [+ residual]``, with fp32 accumulation: fp16/bf16 reduced-precision
reductions (cuBLAS's split-K summed in the output type) are turned off for the call. Where cuBLAS
fuses the epilogue it is applied to the fp32 accumulator as in kernl: ``addmm`` adds the bias, or the
residual through its ``beta * C`` term; ``torch._addmm_activation`` applies the GELU that PyTorch's
backend gives it (tanh-approximated on CUDA, exact erf on the CPU: used only for the activation of the
same name; its ReLU is not used: a max in cuBLASLt's epilogue may turn NaN into 0). Otherwise the
remaining epilogue runs in PyTorch on the rounded GEMM output, as ``F.linear`` followed by the
activation would (within the shared tolerance rule: at most one more rounding). Only ops that are
safe to capture in a CUDA graph and need no host sync.
"""

import contextlib

import torch

from kernl.matmul.activations import TORCH_ACTIVATIONS

# The activation torch._addmm_activation(..., use_gelu=True) applies, per device type: cuBLASLt's GELU
# epilogue and the CUDA fallback use the tanh form, the CPU kernel the exact erf.
ADDMM_GELU = {"cuda": "gelu_tanh", "cpu": "gelu"}
HALF_DTYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def fp32_reductions():
    """Inside this block cuBLAS accumulates and reduces split-K partials in fp32, whatever the process
    allows (``torch.backends.cuda.matmul``'s reduced-precision switches, process-wide: restored after)."""
    matmul = torch.backends.cuda.matmul
    saved = {}
    for kind in ("fp16", "bf16"):
        name = f"allow_{kind}_reduced_precision_reduction"
        split_k = getattr(matmul, f"{name}_split_k", None)  # a second switch on newer torch
        saved[name] = getattr(matmul, name) if split_k is None else (getattr(matmul, name), split_k)
        setattr(matmul, name, False)
    accumulation = getattr(matmul, "allow_fp16_accumulation", None)
    if accumulation is not None:
        saved["allow_fp16_accumulation"] = accumulation
        matmul.allow_fp16_accumulation = False
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)


def _no_autocast(device_type: str):
    """Autocast off inside (an autocast region around the caller would recast the operands: the output
    must keep ``a``'s dtype, as the Triton kernels' does)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _linear_with_activation(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str):
    """``act(a @ b + bias)`` for 2-D ``a`` ``(M, K)`` and ``b`` ``(K, N)``, fused by cuBLASLt where it can."""
    if bias is not None and activation == ADDMM_GELU.get(a.device.type):
        return torch._addmm_activation(bias, a, b, use_gelu=True)
    h = torch.addmm(bias, a, b) if bias is not None else torch.mm(a, b)
    return TORCH_ACTIVATIONS[activation](h)


def gemm_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    b2: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """``act(a @ b + bias) [* (a @ b2)] [+ residual]`` in PyTorch ops, shapes as :func:`kernl.matmul.gemm`.

    a: ``(Ba, M, K)``, b: ``(Bb, K, N)`` (broadcast batch); b2 ``(K, N)``, bias ``(N,)`` and residual
    ``(M, N)``, shared by every batch entry as in the Triton kernels. float16/bfloat16. Returns a
    contiguous ``(B, M, N)`` tensor.
    """
    if a.dtype not in HALF_DTYPES:
        raise ValueError(
            f"config kernel='torch' takes float16/bfloat16 operands, got {a.dtype} (PyTorch would "
            "follow its own TF32 setting, not the call's allow_tf32)"
        )
    with fp32_reductions(), _no_autocast(a.device.type):
        if a.shape[0] != 1 or b.shape[0] != 1:  # batched: one bmm, the epilogue broadcast over the batch
            out = torch.matmul(a, b)
            if bias is not None:
                out = out.add_(bias)
            out = TORCH_ACTIVATIONS[activation](out)
            if b2 is not None:
                out = out.mul_(torch.matmul(a, b2))
        else:
            a2, w = a[0], b[0]
            if b2 is None and residual is not None and bias is None and activation == "none":
                return torch.addmm(residual, a2, w)[None]  # beta * residual in the fp32 epilogue
            out = _linear_with_activation(a2, w, bias, activation)
            if b2 is not None:
                out = out.mul_(torch.mm(a2, b2))
            out = out[None]
        if residual is not None:
            out = out.add_(residual)
        return out.contiguous()
