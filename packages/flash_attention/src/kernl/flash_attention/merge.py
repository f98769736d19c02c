"""Merge the partial softmaxes of a split-KV launch (see :mod:`.kernel`) into the final output.

Split ``s`` of a query row holds ``m_s`` (its maximum score, base 2), ``l_s = sum(exp2(score - m_s))``
and ``acc_s = sum(exp2(score - m_s) * v)``. With ``m = max_s m_s`` and ``w_s = exp2(m_s - m)``:
``out = sum_s w_s * acc_s / sum_s w_s * l_s``. Splits that saw no visible key have ``m_s = -inf``,
so ``w_s = 0``; a row with no visible key anywhere returns zeros.
"""

import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    PART_O, PART_ML, OUT,
    n_q, n_heads, n_splits,
    sob, soh, som, sod,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # programmatic dependent launch: the previous kernel's writes are visible past this wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled while this one runs
    row = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    d_ok = offs_d < HEAD_DIM
    part = off_bh * n_splits + offs_s
    m = tl.load(PART_ML + part * 2 * n_q + row, mask=s_ok, other=float("-inf"))
    l_s = tl.load(PART_ML + part * 2 * n_q + n_q + row, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    acc_ptrs = PART_O + part[:, None] * n_q * HEAD_DIM + row * HEAD_DIM + offs_d[None, :]
    acc = tl.load(acc_ptrs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l_s * w, axis=0)
    out = num / tl.where(den == 0.0, 1.0, den)
    b = off_bh // n_heads
    h = off_bh % n_heads
    tl.store(OUT + b * sob + h * soh + row * som + offs_d * sod, out.to(OUT.dtype.element_ty), mask=d_ok)
