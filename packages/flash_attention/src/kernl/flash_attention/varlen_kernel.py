"""Packed (varlen) attention forward: sequences laid end to end in one ``(T, H, D)`` tensor.

Sequence ``s`` is tokens ``[cu[s], cu[s + 1])``; each query sees only the keys of its own sequence
(block-diagonal attention), causal within it if asked. Tokens at or after ``cu[S]`` are padding.

Work is cut into tiles of ``BLOCK_M`` query rows that never straddle two sequences: sequence ``s``
owns ``cdiv(len_s, BLOCK_M)`` tiles, numbered one after another in sequence order, then the padding
tail owns ``cdiv(T - cu[S], BLOCK_M)`` tiles, written as zeros. Summed, that is at most
``cdiv(T, BLOCK_M) + S`` tiles whatever the split of ``T`` into sequences, and at most ``T`` (each tile
holds a token), so the grid is ``(min(T, cdiv(T, BLOCK_M) + S), H)`` from shapes alone (CUDA graphs
replay it for any ``cu`` values); programs past the last tile skip all work after the scan. Callers
that pad ``cu`` to a fixed length keep ``S`` to the rows they can have, not the tokens: every spare
program still scans the ``S + 1`` offsets. Each program finds its tile by scanning ``cu`` on the
device (a running sum of tile counts, ``SCAN_BLOCK`` sequences at a time), then runs the online
softmax of :mod:`.kernel` over its own sequence's keys only: interior key blocks without any check,
the last (and, when causal, the diagonal) blocks with the key-range and causal checks.

With ``TMA`` q, k and v are read through 3-D ``(T, H, D)`` tensor descriptors (see :mod:`.kernel`):
tokens past ``T`` and columns past the head dimension arrive as zeros; the values of keys past the
sequence's end (the next sequence's, or padding that may hold NaN) are zeroed before ``p @ v``.

With ``HAS_REL`` the score of query ``i`` and key ``j`` of one sequence is ``scale * q.k +
REL[h, clamp(j - i, -R, R) + R]`` (a relative-position bias, MPNet's and T5's once their buckets are
looked up per distance): the bias of each block is read from that ``(H, 2R + 1)`` table inside the loop,
never materialised as ``T x T``. ``j - i`` of packed indices is the distance within the sequence.

``cu`` values are not validated anywhere; they are clamped to ``[0, T]`` here and negative lengths
count as empty, so bad offsets give wrong rows (possibly left unwritten) but never an access out of
bounds.
"""

import triton
import triton.language as tl

from kernl.flash_attention.kernel import LOG2E


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, OUT, CU, REL,
    qk_scale, scale, n_tokens, n_seqs, kv_group, rel_radius,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sot, soh, sod, scu, srh, srd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr, USE_PDL: tl.constexpr,
    TMA: tl.constexpr, HAS_REL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # programmatic dependent launch: wait for the previous kernel's writes (cu_seqlens too)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled while this one runs
    tile = tl.program_id(0)
    h32 = tl.program_id(1)  # descriptor coordinates are int32
    h = h32.to(tl.int64)
    h_kv = h // kv_group  # grouped-query attention: q heads [g * group, (g + 1) * group) share kv head g

    # Which tile is this: the sequence whose running tile count passes ``tile``, or the padding tail.
    tiles_before = tl.full([], 0, tl.int32)  # tiles of the sequences scanned so far
    found = tl.full([], 0, tl.int32)
    seq_start = tl.full([], 0, tl.int32)
    seq_end = tl.full([], 0, tl.int32)
    first_tile = tl.full([], 0, tl.int32)
    for chunk in range(0, n_seqs, SCAN_BLOCK):
        idx = chunk + tl.arange(0, SCAN_BLOCK)
        in_range = idx < n_seqs
        starts = tl.load(CU + idx * scu, mask=in_range, other=0)
        ends = tl.load(CU + (idx + 1) * scu, mask=in_range, other=0)
        starts = tl.minimum(tl.maximum(starts, 0), n_tokens)
        ends = tl.minimum(tl.maximum(ends, starts), n_tokens)
        counts = tl.where(in_range, tl.cdiv(ends - starts, BLOCK_M), 0)
        through = tiles_before + tl.cumsum(counts, axis=0)  # tiles up to and including each sequence
        hit = (through > tile) & (through - counts <= tile)  # at most one sequence in all chunks
        found += tl.sum(hit.to(tl.int32), axis=0)
        seq_start += tl.sum(tl.where(hit, starts, 0), axis=0)
        seq_end += tl.sum(tl.where(hit, ends, 0), axis=0)
        first_tile += tl.sum(tl.where(hit, through - counts, 0), axis=0)
        tiles_before += tl.sum(counts, axis=0)
    # Not found: a tile of the padding tail [cu[S], T), written as zeros with no key read.
    in_seq = found > 0
    packed_end = tl.minimum(tl.maximum(tl.load(CU + n_seqs * scu), 0), n_tokens)
    row_start = tl.where(
        in_seq, seq_start + (tile - first_tile) * BLOCK_M, packed_end + (tile - tiles_before) * BLOCK_M
    )
    row_end = tl.where(in_seq, seq_end, n_tokens)
    lo = tl.where(in_seq, seq_start, 0)
    hi = tl.where(in_seq, seq_end, 0)
    if row_start < row_end:  # spare programs (fewer tiles than the grid's bound) stop here
        offs_m = row_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < row_end
        d_ok = offs_d < HEAD_DIM
        if CAUSAL:  # key j visible to query i when j <= i, both counted within the sequence
            hi = tl.minimum(hi, row_start + BLOCK_M)
            full_end = lo + (tl.maximum(tl.minimum(hi, row_start + 1) - lo, 0)) // BLOCK_N * BLOCK_N
        else:
            full_end = lo + (hi - lo) // BLOCK_N * BLOCK_N

        rows = offs_m.to(tl.int64)  # token offsets in int64: T * stride can pass 2**31
        if TMA:  # rows of the next sequence may hold anything: never stored, and rows do not mix
            q = Q.load([row_start, h32, 0]).reshape(BLOCK_M, BLOCK_D)
            h_kv32 = h32 // kv_group
        else:
            q = tl.load(Q + rows[:, None] * sqt + h * sqh + offs_d[None, :] * sqd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            k_base = K + h_kv * skh + offs_d[:, None] * skd
            v_base = V + h_kv * svh + offs_d[None, :] * svd
        if ACC_DTYPE == tl.float64:  # fp32 inputs: dots and softmax in fp64 (the scale arrives as fp32)
            q = q.to(tl.float64)
        if HAS_REL:  # s = scale * q.k + bias first, then s * log2(e): scores in base 2
            factor = tl.full([], LOG2E, ACC_DTYPE)
            scale_acc = tl.full([], scale, ACC_DTYPE)
            rel_base = REL + h * srh
        else:
            factor = tl.full([], qk_scale, ACC_DTYPE)  # scale * log2(e)
        m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
        l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
        for stage in tl.static_range(2):  # 0: interior blocks, no checks; 1: edge blocks, every check
            if stage == 0:
                start_lo, start_hi = lo, full_end
            else:
                start_lo, start_hi = full_end, hi
            for start_n in range(start_lo, start_hi, BLOCK_N):
                cols = start_n + offs_n
                col_ok = cols < hi
                n0 = tl.cast(start_n, tl.int64)
                if TMA:
                    k = tl.trans(K.load([start_n, h_kv32, 0]).reshape(BLOCK_N, BLOCK_D))
                    v = V.load([start_n, h_kv32, 0]).reshape(BLOCK_N, BLOCK_D)
                    if stage == 1:  # keys past the sequence: p is 0 there, NaN must not reach p @ v
                        v = tl.where(col_ok[:, None], v, 0.0)
                elif stage == 0 and HEAD_DIM == BLOCK_D:
                    k = tl.load(k_base + n0 * skt + offs_n[None, :] * skt)
                    v = tl.load(v_base + n0 * svt + offs_n[:, None] * svt)
                else:
                    k_ptrs = k_base + n0 * skt + offs_n[None, :] * skt
                    v_ptrs = v_base + n0 * svt + offs_n[:, None] * svt
                    k = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if ACC_DTYPE == tl.float64:
                    k = k.to(tl.float64)
                    v = v.to(tl.float64)
                s = tl.dot(q, k, out_dtype=ACC_DTYPE)
                if HAS_REL:  # clamped distances index the table: in bounds for every row and column
                    dist = tl.minimum(tl.maximum(cols[None, :] - offs_m[:, None], -rel_radius), rel_radius)
                    s = tl.math.fma(s, scale_acc, tl.load(rel_base + (dist + rel_radius) * srd).to(ACC_DTYPE))
                if stage == 1:
                    keep = col_ok[None, :]
                    if CAUSAL:
                        keep = keep & (cols[None, :] <= offs_m[:, None])
                    s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1) * factor)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key so far
                exponent = tl.math.fma(s, factor, -m_use[:, None])
                if HAS_REL:  # a huge bias: the exact product may pass the rounded maximum; exp2 <= 1
                    exponent = tl.where(exponent > 0.0, 0.0, exponent)  # (a where keeps NaN NaN)
                p = tl.math.exp2(exponent)
                alpha = tl.math.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], out_dtype=ACC_DTYPE)
                m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows: no key, acc = 0, out = 0
        o_ptrs = OUT + rows[:, None] * sot + h * soh + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
