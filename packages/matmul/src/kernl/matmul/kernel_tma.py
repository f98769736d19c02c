"""The compute-bound variant of the GEMM core for Hopper: persistent, tiles moved by TMA.

One program per SM walks the output tiles (grouped order); operand tiles arrive through tensor
descriptors (the bulk tensor copy engine, zero-filled past the edges) and ``tl.dot`` runs on wgmma.
``tl.range(..., flatten=True)`` merges the tile loop with the K loop, so the software pipeline keeps
loading the next tile's operands while the current tile's epilogue runs: what pays for small K
(Bert's 768). Epilogue as in :mod:`kernl.matmul.kernel` (bias, activation, residual, one rounding),
then a TMA store (clipped at the edges). With ``EPILOGUE_PARTS`` 2 or 4 a tile is finished in column
blocks of ``BLOCK_N // EPILOGUE_PARTS``: that fraction of the shared memory its stores (and residual
loads) stage through, which leaves room for deeper pipelines or a second program on the SM. ``BATCHED`` problems use 3-D descriptors (one batch entry per
tile). Used for ungated half-precision problems whose operands have a unit inner stride and 16-byte
aligned rows (and no broadcast batch); everything else takes the pointer kernel. ``NUM_PROGRAMS`` may
be a multiple of the SM count, so that two programs share an SM and one's epilogue hides behind the
other's main loop. With ``PREFETCH_B`` (programmatic launch) a program asks L2 for the rows of B of
its first tile before it waits for the previous kernel (:mod:`kernl.matmul.prefetch`).
"""

import triton
import triton.language as tl

from kernl.matmul.activations import apply_activation
from kernl.matmul.prefetch import prefetch_rows


@triton.jit
def _tile_coords(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    width = GROUP_M * grid_n
    group_id = tile // width
    group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
    return group_id * GROUP_M + (tile % width) % group_size, (tile % width) // group_size


@triton.jit
def _finish(acc, c_desc, C, BIAS, R, z, off_m, off_n, M, N, stride_bias, stride_rm, stride_rn,
            ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BATCHED: tl.constexpr,
            ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
    """The epilogue of the ``ROWS x COLS`` output block at ``(off_m, off_n)`` (a tile, or a column block
    of one), then its store."""
    rm = off_m + tl.arange(0, ROWS)
    rn = off_n + tl.arange(0, COLS)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        acc += tl.load(R + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask, other=0.0).to(
            tl.float32
        )
    out = acc.to(C.dtype.element_ty)
    if BATCHED:
        c_desc.store([z, off_m, off_n], out.reshape(1, ROWS, COLS))
    else:
        c_desc.store([off_m, off_n], out)


@triton.jit(do_not_specialize=["M", "N"])
def gemm_tma_kernel(
    a_desc, b_desc, c_desc, B, C, BIAS, R,
    BATCH, M, N, K,
    stride_bz, stride_bn, stride_bias, stride_rm, stride_rn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, B_K_MAJOR: tl.constexpr,
    BATCHED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH_B: tl.constexpr, EPILOGUE_PARTS: tl.constexpr,
):  # fmt: skip
    """Persistent program ``start``: the output tiles ``start, start + NUM_PROGRAMS, ...``; see the module."""
    start = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_batch = grid_m * grid_n
    if USE_PDL:  # programmatic dependent launch: the previous kernel's writes are visible past this wait
        if PREFETCH_B:  # B (N, K) holds weights: the rows of this program's first tile into L2
            if start < BATCH * per_batch:
                first_m, first_n = _tile_coords(start % per_batch, grid_m, grid_n, GROUP_M)
                rows = tl.minimum(first_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
                b_first = B + (start // per_batch).to(tl.int64) * stride_bz
                prefetch_rows(b_first, rows, stride_bn, 0, K, first_m, grid_m, GROUP_M)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled while this one runs
    # The epilogue keeps its own tile counter: the pipeliner must not see one value used in both the
    # loads of the next tile and the stores of this one.
    tile_out = start - NUM_PROGRAMS
    for tile in tl.range(start, BATCH * per_batch, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile % per_batch, grid_m, grid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            if BATCHED:
                z = tile // per_batch
                a = a_desc.load([z, pid_m * BLOCK_M, ki * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
                if B_K_MAJOR:
                    b = b_desc.load([z, pid_n * BLOCK_N, ki * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
                else:
                    b = b_desc.load([z, ki * BLOCK_K, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            else:
                a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
                if B_K_MAJOR:
                    b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K]).T
                else:
                    b = b_desc.load([ki * BLOCK_K, pid_n * BLOCK_N])
            acc = tl.dot(a, b, acc)

        tile_out += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_out % per_batch, grid_m, grid_n, GROUP_M)
        z_out = tile_out // per_batch
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        if EPILOGUE_PARTS == 1:
            _finish(acc, c_desc, C, BIAS, R, z_out, off_m, off_n, M, N, stride_bias, stride_rm, stride_rn,
                    ACTIVATION, HAS_BIAS, HAS_RESIDUAL, BATCHED, BLOCK_M, BLOCK_N)  # fmt: skip
        else:  # column blocks of BLOCK_N // EPILOGUE_PARTS: that fraction of the shared memory for the stores
            W: tl.constexpr = BLOCK_N // EPILOGUE_PARTS
            left, right = acc.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()
            if EPILOGUE_PARTS == 2:
                _finish(left, c_desc, C, BIAS, R, z_out, off_m, off_n, M, N, stride_bias, stride_rm, stride_rn,
                        ACTIVATION, HAS_BIAS, HAS_RESIDUAL, BATCHED, BLOCK_M, W)  # fmt: skip
                _finish(right, c_desc, C, BIAS, R, z_out, off_m, off_n + W, M, N, stride_bias, stride_rm, stride_rn,
                        ACTIVATION, HAS_BIAS, HAS_RESIDUAL, BATCHED, BLOCK_M, W)  # fmt: skip
            else:
                l0, l1 = left.reshape(BLOCK_M, 2, W).permute(0, 2, 1).split()
                r0, r1 = right.reshape(BLOCK_M, 2, W).permute(0, 2, 1).split()
                _finish(l0, c_desc, C, BIAS, R, z_out, off_m, off_n, M, N, stride_bias, stride_rm, stride_rn,
                        ACTIVATION, HAS_BIAS, HAS_RESIDUAL, BATCHED, BLOCK_M, W)  # fmt: skip
                _finish(l1, c_desc, C, BIAS, R, z_out, off_m, off_n + W, M, N, stride_bias, stride_rm, stride_rn,
                        ACTIVATION, HAS_BIAS, HAS_RESIDUAL, BATCHED, BLOCK_M, W)  # fmt: skip
                _finish(r0, c_desc, C, BIAS, R, z_out, off_m, off_n + 2 * W, M, N, stride_bias, stride_rm,
                        stride_rn, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, BATCHED, BLOCK_M, W)  # fmt: skip
                _finish(r1, c_desc, C, BIAS, R, z_out, off_m, off_n + 3 * W, M, N, stride_bias, stride_rm,
                        stride_rn, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, BATCHED, BLOCK_M, W)  # fmt: skip
