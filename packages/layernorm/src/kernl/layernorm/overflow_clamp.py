"""Triton kernels for T5's fp16 overflow guard: ``clamp(x, -L, L)``, ``L = limit_if_inf`` when ``x``
holds an infinity anywhere, else ``limit``.

Transformers writes it as five ops (``isinf``, ``any``, ``where``, ``neg``, ``clamp``), twice a T5 layer.
Here it is a zeroed flag and two passes over ``x``: the first raises the flag (an atomic max) where a
block holds an infinity, the second clamps with the limit the flag selects. The clamp propagates NaN,
as ``torch.clamp`` does.
"""

import torch
import triton
import triton.language as tl

from kernl.common.launch import programmatic_launch

BLOCK = 4096


@triton.jit
def _find_inf_kernel(X, R, FLAG, n, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    if HAS_RESIDUAL:  # the sum as an unfused `x + residual` stores it (an overflow to inf included)
        r = tl.load(R + offs, mask=offs < n, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    x = x.to(tl.float32)
    found = tl.max((tl.abs(x) == float("inf")).to(tl.int32), axis=0)
    tl.atomic_max(FLAG, found, mask=found > 0)


@triton.jit
def _clamp_kernel(X, FLAG, Y, n, limit_if_inf, limit, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bound = tl.where(tl.load(FLAG) > 0, limit_if_inf, limit)
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    y = tl.minimum(
        tl.maximum(x, -bound, propagate_nan=tl.PropagateNan.ALL), bound, propagate_nan=tl.PropagateNan.ALL
    )
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=offs < n)


def find_inf_flag(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``(1,)``: 1 when ``x`` (``x + residual``, rounded to x's dtype) holds an infinity, else 0.
    ``x``, ``residual``: contiguous, one shape and dtype."""
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = x.numel()
    if n == 0:
        return flag
    pdl = programmatic_launch(x.device)
    r = residual if residual is not None else x
    _find_inf_kernel[(triton.cdiv(n, BLOCK),)](
        x, r, flag, n, HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, USE_PDL=pdl, launch_pdl=pdl
    )
    return flag


def overflow_clamp_forward(x: torch.Tensor, limit_if_inf: float, limit: float) -> torch.Tensor:
    """Launch on a validated contiguous ``x`` (any shape, float dtype); returns a new tensor like ``x``."""
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    flag = find_inf_flag(x)
    grid = (triton.cdiv(n, BLOCK),)
    pdl = programmatic_launch(x.device)
    _clamp_kernel[grid](x, flag, y, n, limit_if_inf, limit, BLOCK=BLOCK, USE_PDL=pdl, launch_pdl=pdl)
    return y
