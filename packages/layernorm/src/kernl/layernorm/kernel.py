"""Triton kernel for LayerNorm and RMSNorm over the last dimension, with an optional fused residual add,
and for RMSNorm an optional fused T5 fp16 overflow guard on its input.

Each program normalises ``BLOCK_M`` rows held whole in registers (``BLOCK_N >= N``), so the input is
read once and the output written once: the kernel runs at memory speed. Statistics are taken in fp32
with a two-pass (mean, then centred variance) reduction over registers, which stays accurate for
inputs with large offsets. Supported row lengths: 1 to ``MAX_N``.

The overflow guard (``clamp(h, -L, L)``, ``L = limit_if_inf`` when ``h`` holds an infinity anywhere, else
``limit``) depends on the whole tensor, not on a row. For a small tensor (a decoder step's few rows, up
to ``SCAN_LIMIT`` elements) every program first scans all of it for infinities, from L2: one launch
instead of the guard's two passes plus the norm. A larger tensor gets its infinity flag from one pass
of :func:`kernl.layernorm.overflow_clamp.find_inf_flag` first, which the norm kernel then reads.
"""

import torch
import triton
import triton.language as tl

from kernl.common.launch import float_errors_ignored, programmatic_launch, sm_count
from kernl.layernorm.overflow_clamp import find_inf_flag

MAX_N = 65536
SCAN_LIMIT = 65536  # elements: every program of the fused guard scans the whole tensor up to this size
SCAN_BLOCK = 8192  # elements a program scans per step of that loop
CLAMP_NONE, CLAMP_FLAG, CLAMP_SCAN = 0, 1, 2  # no guard; guard bound from a flag; from a scan of x


@triton.jit
def _norm_kernel(
    X, R, W, B, Y, S, FLAG,
    M, N,
    stride_xm, stride_xn, stride_rm, stride_rn,
    eps, limit_if_inf, limit,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_TO_WEIGHT_DTYPE: tl.constexpr, CLAMP: tl.constexpr, SCAN_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # programmatic dependent launch: the previous kernel's writes are visible past this wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled while this one runs
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    row_ok = rows < M
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    if not IS_RMS:  # each row's first element, to shift the data before summing (see below)
        first = tl.load(X + rows * stride_xm, mask=row_ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        # Round the sum to the storage dtype first, exactly as an unfused `x + residual` would.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        if not IS_RMS:
            first_r = tl.load(R + rows * stride_rm, mask=row_ok, other=0.0)
            first = (first.to(tl.float32) + first_r.to(tl.float32)).to(S.dtype.element_ty)
    if CLAMP != 0:  # T5's overflow guard on the (summed) input, rounded to its dtype as the guard stores it
        if CLAMP == 2:
            found = _any_infinite(X, R, M, N, stride_xm, stride_xn, stride_rm, stride_rn, HAS_RESIDUAL,
                                  SCAN_M, BLOCK_N, S.dtype.element_ty)  # fmt: skip
        else:
            found = tl.load(FLAG)
        bound = tl.where(found > 0, limit_if_inf, limit)
        x = x.to(tl.float32)
        x = tl.minimum(
            tl.maximum(x, -bound, propagate_nan=tl.PropagateNan.ALL), bound, propagate_nan=tl.PropagateNan.ALL
        ).to(S.dtype.element_ty)
    if HAS_RESIDUAL or CLAMP != 0:
        tl.store(S + rows[:, None] * N + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    if IS_RMS:
        centred = x
    else:
        # Shifted two-pass mean: subtracting a sample of the row first keeps the sum free of the
        # cancellation that a large common offset (e.g. -20 + 0.5 * randn) would cause.
        shifted = tl.where(mask, x - first.to(tl.float32)[:, None], 0.0)
        shifted_mean = tl.sum(shifted, axis=1) / N
        centred = tl.where(mask, shifted - shifted_mean[:, None], 0.0)
    variance = tl.sum(centred * centred, axis=1) / N
    h = centred * tl.rsqrt(variance + eps)[:, None]
    if ROUND_TO_WEIGHT_DTYPE:  # T5LayerNorm casts to the half-precision weight dtype before scaling
        h = h.to(W.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        h = h * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        h = h + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], h.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _any_infinite(
    X, R, M, N, stride_xm, stride_xn, stride_rm, stride_rn,
    HAS_RESIDUAL: tl.constexpr, SCAN_M: tl.constexpr, BLOCK_N: tl.constexpr, SUM_DTYPE: tl.constexpr,
):  # fmt: skip
    """1 when any element of ``x`` (of ``x + residual``, rounded to ``SUM_DTYPE``) is infinite, else 0."""
    cols = tl.arange(0, BLOCK_N)
    seen = tl.zeros((SCAN_M, BLOCK_N), dtype=tl.int32)
    for start in range(0, M, SCAN_M):
        rows = (start + tl.arange(0, SCAN_M)).to(tl.int64)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(SUM_DTYPE)
        seen = seen | (tl.abs(x.to(tl.float32)) == float("inf")).to(tl.int32)
    return tl.max(tl.max(seen, axis=1), axis=0)


def launch_config(m: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: about 8K elements a program (several 16-byte loads in flight
    per thread, 1K elements per warp), but at least two programs per SM (measured on H100)."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, 8192 // block_n)
    if device.type == "cuda":
        min_programs = 2 * sm_count(device.index or 0)
        while block_m > 1 and triton.cdiv(m, block_m) < min_programs:
            block_m //= 2
    num_warps = min(max(block_m * block_n // 1024, 1), 16)
    return block_m, block_n, num_warps


def norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    out_dtype: torch.dtype,
    config: tuple[int, int, int] | None = None,
    clamp: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel on validated inputs; ``x``/``residual`` are ``(M, N)`` views (any strides),
    ``weight``/``bias`` ``(N,)`` (made contiguous). Outputs are contiguous.

    ``config`` overrides :func:`launch_config` (used by the tuning sweep). ``clamp``: ``(limit_if_inf,
    limit)`` of T5's overflow guard, applied to ``x`` (``x + residual``) before an RMS norm.

    Returns ``(y, summed)`` with ``y`` of ``out_dtype`` and ``summed = x + residual`` (or ``None``), or with
    ``clamp``, ``summed`` = the guarded input (``x`` or ``x + residual``, clamped).
    """
    if clamp is not None and not is_rms:
        raise ValueError("the overflow guard is fused into the RMS norm only")
    m, n = x.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    keeps_input = residual is not None or clamp is not None
    summed = torch.empty((m, n), dtype=x.dtype, device=x.device) if keeps_input else None
    if m == 0:
        return y, summed
    block_m, block_n, num_warps = config or launch_config(m, n, x.device)
    # The kernel offsets columns in 32 bits (`cols * stride_n`): a row spanning 2**31 elements of memory
    # or more (a transposed view of a huge tensor) is copied to a contiguous one first.
    x, residual = (t if t is None or (n - 1) * t.stride(1) < 2**31 else t.contiguous() for t in (x, residual))
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    pdl = programmatic_launch(x.device)
    mode, flag, limits = CLAMP_NONE, None, (0.0, 0.0)
    if clamp is not None:
        mode, limits = (CLAMP_SCAN if m * n <= SCAN_LIMIT else CLAMP_FLAG), clamp
    if mode == CLAMP_FLAG:
        x, residual = (t if t is None else t.contiguous() for t in (x, residual))
    r = residual if residual is not None else x
    # rows a guard scans per step; 1 (one compiled variant) where there is no scan
    scan_m = min(triton.next_power_of_2(m), max(1, SCAN_BLOCK // block_n)) if mode == CLAMP_SCAN else 1
    if config is None:  # warps enough to hold the scanned rows too: 1K elements a warp, as the norm's
        num_warps = max(num_warps, min(scan_m * block_n // 1024, 16))
    # A row holding an inf normalises to NaN, as F.layer_norm's does (inf - inf in the centring); a sum
    # past the fp16 range is stored as inf, as `x + residual` gives it.
    with float_errors_ignored(x.device):
        if mode == CLAMP_FLAG:
            flag = find_inf_flag(x, residual)
        _norm_kernel[(triton.cdiv(m, block_m),)](
            x, r, w, b, y, summed, flag,
            m, n,
            *x.stride(), *r.stride(),
            eps, *limits,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            ROUND_TO_WEIGHT_DTYPE=is_rms and weight.dtype in (torch.float16, torch.bfloat16),
            CLAMP=mode, SCAN_M=scan_m,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, USE_PDL=pdl, launch_pdl=pdl,
        )  # fmt: skip
    return y, summed
