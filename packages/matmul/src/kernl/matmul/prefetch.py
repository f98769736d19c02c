"""Pull a program's share of the weight into L2 while the previous kernel still runs.

With programmatic dependent launch a GEMM's programs can start before the kernel ahead of them has
finished, and wait (``gdc_wait``) only before reading what that kernel wrote. The weight (``B`` of
``x @ W.T``) is not among it, so each program first asks L2 for the rows of ``W`` it will read
(``prefetch.global.L2``, one address per 128-byte line): the main loop then finds them in L2 instead
of waiting on HBM. A prefetch moves data into L2 only, the GPU's point of coherence, so it cannot make
a later read stale, whatever the operand; it just costs a few instructions a line.
"""

import triton
import triton.language as tl


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def prefetch_rows(base, rows, stride_row, k_start, k_end, pid_m, grid_m, GROUP_M: tl.constexpr):
    """Prefetch ``base[rows[i] * stride_row + k]`` for ``k`` in this program's part of ``[k_start, k_end)``.

    ``rows``: a 1-D tile of row indices (in bounds); each row is contiguous along ``k``. The programs
    of one group (up to ``GROUP_M`` row tiles in a row, as the GEMMs order them) read the same rows of
    B: program ``pid_m`` fetches only its equal part of the range, so the group asks for each line once.
    Four 128-byte lines of every row are requested per step. Offsets are 64-bit: a TMA kernel's weight
    may have more than 2**31 elements.
    """
    LINE: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth  # elements in 128 bytes
    CHUNK: tl.constexpr = 4
    sharers = min(GROUP_M, grid_m - pid_m // GROUP_M * GROUP_M)  # the last group may be smaller
    share = tl.cdiv(k_end - k_start, sharers)
    k_start += (pid_m % GROUP_M) * share
    k_end = min(k_end, k_start + share)
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    for k in range(k_start, k_end, LINE * CHUNK):
        cols = tl.minimum(k + tl.arange(0, CHUNK) * LINE, k_end - 1)
        _prefetch_l2(base + row_offsets + cols[None, :])
