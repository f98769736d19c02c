"""The one tiled GEMM core of kernl: ``C = epilogue(A @ B)``, batched, any strides, optional split-K.

Each program computes a ``BLOCK_M x BLOCK_N`` tile of one batch entry, accumulating in fp32 over its
share of K (``SPLIT_K`` programs share one tile's K range). The epilogue runs on the fp32 accumulator:
``act(acc + bias) [* (A @ B2)] [+ residual]``, then one rounding to the output dtype. With
``SPLIT_K > 1`` every program writes its partial tile to an fp32 workspace and bumps a per-tile counter;
the last one to arrive sums the partials in a fixed order (deterministic) and runs the epilogue, so a
split-K GEMM is still a single launch. The counter is reset by that program, so the counter buffer
can be reused (and captured in a CUDA graph) without clearing.

On Hopper, ``tl.dot`` on pipelined shared-memory tiles (``num_stages``) compiles to wgmma. With
programmatic launch (``USE_PDL``) a program may start before the previous kernel ends: it waits for
that kernel's writes before its first load, and with ``PREFETCH_B`` first asks L2 for its share of B
(:mod:`kernl.matmul.prefetch`).
"""

import triton
import triton.language as tl

from kernl.matmul.activations import apply_activation
from kernl.matmul.prefetch import prefetch_rows


@triton.jit
def _store_tile(acc, acc2, C, BIAS, R, rm, rn, M, N, stride_cm, stride_cn, stride_bias, stride_rm, stride_rn,
                ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    if HAS_GATE:
        acc = acc * acc2
    if HAS_RESIDUAL:
        acc += tl.load(R + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "N", "SPLIT_K"])
def gemm_kernel(
    A, B, B2, C, BIAS, R, WS, LOCKS,
    M, N, K, SPLIT_K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_b2k, stride_b2n,
    stride_cb, stride_cm, stride_cn,
    stride_bias, stride_rm, stride_rn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, USE_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH_B: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_M x BLOCK_N`` output tile (its ``pid_k``-th share of K with split-K); see the module."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles share the B column-tiles they read while those are in L2.
    width = GROUP_M * grid_n
    group_id = pid // width
    group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
    pid_m = group_id * GROUP_M + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the edge wrap around (their results are masked at the store), so the loads
    # in the main loop need no M/N masks. No alignment hints here: a row of a sliced or padded operand
    # need not start on a 16-byte boundary (a wrong hint faults with a misaligned address).
    ram = rm % M
    rbn = rn % N
    # This program's share of K: whole BLOCK_K steps, the launcher guarantees it is not empty.
    k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_start = pid_k * k_steps * BLOCK_K
    k_end = min(K, k_start + k_steps * BLOCK_K)
    if USE_PDL:  # programmatic dependent launch: the previous kernel's writes are visible past this wait
        if PREFETCH_B:  # B (and B2) contiguous along K, weights: this program's rows into L2 meanwhile
            prefetch_rows(B + batch * stride_bb, rbn, stride_bn, k_start, k_end, pid_m, grid_m, GROUP_M)
            if HAS_GATE:
                prefetch_rows(B2, rbn, stride_b2n, k_start, k_end, pid_m, grid_m, GROUP_M)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled while this one runs
    rk = k_start + tl.arange(0, BLOCK_K)
    a_ptrs = A + batch * stride_ab + ram[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + batch * stride_bb + rk[:, None] * stride_bk + rbn[None, :] * stride_bn
    b2_ptrs = B2 + rk[:, None] * stride_b2k + rbn[None, :] * stride_b2n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            in_k = (k + tl.arange(0, BLOCK_K)) < K
            a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=in_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_GATE:
            if EVEN_K:
                b2 = tl.load(b2_ptrs)
            else:
                b2 = tl.load(b2_ptrs, mask=in_k[:, None], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
            b2_ptrs += BLOCK_K * stride_b2k
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    C += batch * stride_cb
    if not USE_SPLIT:
        _store_tile(acc, acc2, C, BIAS, R, rm, rn, M, N, stride_cm, stride_cn, stride_bias, stride_rm, stride_rn,
                    ACTIVATION, HAS_BIAS, HAS_GATE, HAS_RESIDUAL)  # fmt: skip
    else:
        tile = batch * grid_m * grid_n + pid_m * grid_n + pid_n
        parts = 2 if HAS_GATE else 1
        tile_elems = BLOCK_M * BLOCK_N
        in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        n_tiles = tl.num_programs(2) * grid_m * grid_n
        ws = WS + (tile * parts) * tile_elems + in_tile
        split_stride = n_tiles * parts * tile_elems
        tl.store(ws + pid_k * split_stride, acc)
        if HAS_GATE:
            tl.store(ws + pid_k * split_stride + tile_elems, acc2)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(LOCKS + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last program for this tile: reduce in split order, then finish
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(ws + s * split_stride, cache_modifier=".cg")
                if HAS_GATE:
                    acc2 += tl.load(ws + s * split_stride + tile_elems, cache_modifier=".cg")
            tl.atomic_xchg(LOCKS + tile, 0)
            _store_tile(acc, acc2, C, BIAS, R, rm, rn, M, N, stride_cm, stride_cn, stride_bias, stride_rm,
                        stride_rn, ACTIVATION, HAS_BIAS, HAS_GATE, HAS_RESIDUAL)  # fmt: skip
