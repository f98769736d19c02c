"""Fused attention forward (inference): ``softmax(scale * q @ k^T + bias, masked) @ v`` in one pass.

Online softmax, in a few lines. A program owns ``BLOCK_M`` query rows and walks the keys ``BLOCK_N``
at a time, never holding the whole score row. It keeps, per row, the running maximum ``m``, the
running denominator ``l = sum(exp(s - m))`` and the running numerator ``acc = sum(exp(s - m) * v)``.
When a new block raises the maximum to ``m'``, everything gathered so far was scaled by ``exp(-m)``
and must be scaled by ``exp(-m')``: multiply ``l`` and ``acc`` by ``alpha = exp(m - m')``, then add
the new block's terms. At the end ``out = acc / l``, the exact softmax, with scores read once and
never written to memory. We work in base 2 (``exp2``, scores pre-multiplied by ``log2(e)``), and a row
that has seen no visible key yet keeps ``m = -inf``: we subtract 0 instead, so ``exp2(-inf) = 0``
and a row whose keys are all masked ends with ``l = 0`` and returns zeros, never NaN.
Accumulation is fp32 for fp16/bf16 inputs; fp32 inputs are computed in fp64 (``ACC_DTYPE``).

Work is split in two stages over the key range: the full blocks no boundary or causal diagonal can
touch (no ``where`` on the scores), then the few edge blocks with every check. With ``SPLIT`` a
third grid axis cuts the valid key range into equal chunks of whole blocks (split-KV, for decoding
one token against a long cache; the valid length may be known only here, from a cache-length
tensor): each program writes its unnormalised ``acc``, ``m`` and ``l``, merged by :mod:`.merge`.

Grouped-query attention: ``group`` query heads share each key/value head (``group = 1``: one each);
query head ``h`` reads key/value head ``h // group`` in place, so no ``repeat_kv`` copy is made.

Loads (candidates the launch config picks, timed by the benchmarks' sweep): ``TMA`` reads q, k and v
through 4-D tensor descriptors (Hopper's bulk copies into shared memory; rows past the key length and
columns past the head dimension arrive as zeros, so no load is masked; values of keys past a valid
length that is below it are zeroed before ``p @ v``, as they may hold NaN), else pointer loads.
``WARP_SPECIALIZE`` asks Triton to split the interior loop into producer and consumer warps.

New cache row (``WRITE_ROW``, a decoding step): the step's key and value ``(B, H_kv, 1, D)`` go into the
cache at ``position`` (per batch element) in the same launch. Every program that reads that position's
block takes the new row from registers instead of the cache, so no program waits on another's store,
and one program per batch element and key/value head stores it. A position outside ``[0, K)`` writes nothing.

Key padding: ``KPM_KIND`` 1 = per-batch lengths (the loop stops there); 2 = a bool ``[B, K]`` mask,
scanned first for its last valid key (the loop stops there too) and applied block by block only
when it is not a prefix. ``MASK_KIND`` 1 = bool mask (True = attend), 2 = additive float mask.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, BIAS, MASK, KPM, CACHE_LEN, PART_ML, NEW_K, NEW_V, POSITION,
    scale, qk_scale, n_q, n_k, n_heads, group,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, skpb, skpn, scl,
    snkb, snkh, snkd, snvb, snvh, snvd, spos,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr, HAS_CACHE_LEN: tl.constexpr,
    CAUSAL: tl.constexpr, SCAN_BLOCK: tl.constexpr, SPLIT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    USE_PDL: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, WRITE_ROW: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # programmatic dependent launch: the previous kernel's writes are visible past this wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled while this one runs
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    split = tl.program_id(2)
    b32 = off_bh // n_heads  # descriptor coordinates are int32
    h32 = off_bh % n_heads
    hkv32 = h32 // group  # grouped-query attention: query heads hkv * group onwards share one key/value head
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    h_kv = hkv32.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM

    # Where the keys of this batch element end: cache length, lengths, or the bool mask's last True.
    kv_end = n_k
    if HAS_CACHE_LEN:
        kv_end = tl.minimum(kv_end, tl.load(CACHE_LEN + b * scl))
    if KPM_KIND == 1:
        kv_end = tl.minimum(kv_end, tl.load(KPM + b * skpb))
    if KPM_KIND == 2:
        extent = tl.full([], 0, tl.int32)
        count = tl.full([], 0, tl.int32)
        for start in range(0, n_k, SCAN_BLOCK):  # wide chunks: one or a few steps for usual lengths
            cols = start + tl.arange(0, SCAN_BLOCK)
            valid = tl.load(KPM + b * skpb + cols * skpn, mask=cols < n_k, other=0) != 0
            extent = tl.maximum(extent, tl.max(tl.where(valid, cols + 1, 0), axis=0))
            count += tl.sum(valid.to(tl.int32), axis=0)
        kv_end = tl.minimum(kv_end, extent)
        kpm_partial = count != extent  # not a prefix mask: apply it block by block
    lo = 0
    hi = kv_end
    if SPLIT:  # an equal share of the valid keys, in whole blocks
        split_len = tl.cdiv(tl.cdiv(kv_end, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        lo = split * split_len
        hi = tl.minimum(kv_end, lo + split_len)
    if CAUSAL:  # top-left aligned, as F.scaled_dot_product_attention(is_causal=True): key j <= query i
        hi = tl.minimum(hi, (start_m + 1) * BLOCK_M)
        full_end = tl.maximum(lo, lo + (tl.minimum(hi, start_m * BLOCK_M) - lo) // BLOCK_N * BLOCK_N)
    else:
        full_end = tl.maximum(lo, lo + (hi - lo) // BLOCK_N * BLOCK_N)

    if WRITE_ROW:  # K and V are pointers here: the launch turns TMA off to store the row
        position = tl.load(POSITION + b * spos).to(tl.int64)
        k_row = tl.load(NEW_K + b * snkb + h_kv * snkh + offs_d * snkd, mask=d_ok, other=0.0)
        v_row = tl.load(NEW_V + b * snvb + h_kv * snvh + offs_d * snvd, mask=d_ok, other=0.0)
        # The storing program is the last of its batch element and key/value head in grid order (last query
        # block, last query head of the group, last split): Triton's interpreter runs programs in that
        # order, so there every reader runs before the store, and one taking the row from the cache sees
        # the stale one. On a GPU the programs run concurrently: none may depend on the store.
        last_block = start_m == tl.num_programs(0) - 1
        if last_block & (split == tl.num_programs(2) - 1) & (h32 % group == group - 1):
            row_in = tl.where((position >= 0) & (position < n_k), d_ok, False)  # a where: the interpreter
            # rejects a block mask and-ed with a scalar one
            tl.store(K + b * skb + h_kv * skh + position * skn + offs_d * skd, k_row, mask=row_in)
            tl.store(V + b * svb + h_kv * svh + position * svn + offs_d * svd, v_row, mask=row_in)

    rows = offs_m.to(tl.int64)  # row and key offsets in int64: Q * K or K * stride can pass 2**31
    if TMA:
        q = Q.load([b32, h32, start_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * skb + h_kv * skh + offs_d[:, None] * skd
        v_base = V + b * svb + h_kv * svh + offs_d[None, :] * svd
    if ACC_DTYPE == tl.float64:  # fp32 inputs: dots and softmax in fp64 (the scale arrives as fp32)
        q = q.to(tl.float64)
    bias_base = BIAS + b * sbb + h * sbh + rows[:, None] * sbm
    mask_base = MASK + b * smb + h * smh + rows[:, None] * smm

    if HAS_BIAS or MASK_KIND == 2:  # s * factor: the scores in base 2
        factor = tl.full([], LOG2E, ACC_DTYPE)
        scale = tl.full([], scale, ACC_DTYPE)
    else:
        factor = tl.full([], qk_scale, ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for stage in tl.static_range(2):  # 0: interior blocks, no checks; 1: edge blocks, every check
        if stage == 0:
            start_lo, start_hi = lo, full_end
        else:
            start_lo, start_hi = full_end, hi
        for start_n in tl.range(start_lo, start_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE and stage == 0):
            cols = start_n + offs_n
            col_ok = cols < hi
            n0 = tl.cast(start_n, tl.int64)  # the block's first key, in int64; offs_n * stride stays int32
            if TMA:
                k = tl.trans(K.load([b32, hkv32, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
                v = V.load([b32, hkv32, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
                if stage == 1:  # keys in [hi, K) are read: NaN there must not reach p @ v (p is 0)
                    v = tl.where(col_ok[:, None], v, 0.0)
            elif stage == 0 and HEAD_DIM == BLOCK_D:
                k = tl.load(k_base + n0 * skn + offs_n[None, :] * skn)
                v = tl.load(v_base + n0 * svn + offs_n[:, None] * svn)
            else:
                k_ptrs = k_base + n0 * skn + offs_n[None, :] * skn
                v_ptrs = v_base + n0 * svn + offs_n[:, None] * svn
                k = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if WRITE_ROW:  # the new row from registers, where the cache may not hold it yet
                is_new = (cols == position) & col_ok
                k = tl.where(is_new[None, :], k_row[:, None], k)
                v = tl.where(is_new[:, None], v_row[None, :], v)
            if ACC_DTYPE == tl.float64:
                k = k.to(tl.float64)
                v = v.to(tl.float64)
            s = tl.dot(q, k, out_dtype=ACC_DTYPE)  # raw q.k, or scaled scores plus the bias
            tile_ok = row_ok[:, None] if stage == 0 else row_ok[:, None] & col_ok[None, :]
            if HAS_BIAS or MASK_KIND == 2:
                add = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
                if HAS_BIAS:
                    bias_ptrs = bias_base + n0 * sbn + offs_n[None, :] * sbn
                    add += tl.load(bias_ptrs, mask=tile_ok, other=0.0).to(ACC_DTYPE)
                if MASK_KIND == 2:
                    mask_ptrs = mask_base + n0 * smn + offs_n[None, :] * smn
                    add += tl.load(mask_ptrs, mask=tile_ok, other=0.0).to(ACC_DTYPE)
                s = tl.math.fma(s, scale, add)
            if MASK_KIND == 1:
                visible = tl.load(mask_base + n0 * smn + offs_n[None, :] * smn, mask=tile_ok, other=0) != 0
                s = tl.where(visible, s, float("-inf"))
            if KPM_KIND == 2:
                if kpm_partial:
                    kpm = tl.load(KPM + b * skpb + cols * skpn, mask=col_ok, other=0)
                    s = tl.where(kpm[None, :] != 0, s, float("-inf"))
            if stage == 1:
                keep = col_ok[None, :]
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None])
                s = tl.where(keep, s, float("-inf"))
            # Running maximum in base-2 units; exp2(fma(s, factor, -m)) rounds the small result only.
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * factor)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key so far
            exponent = tl.math.fma(s, factor, -m_use[:, None])
            if HAS_BIAS or MASK_KIND == 2:  # huge finite additions (-1e10, finfo.min): the exact product
                exponent = tl.where(exponent > 0.0, 0.0, exponent)  # may exceed the rounded maximum by
                # far; exp2 <= 1. A where, not a minimum: NaN (a NaN or +inf addition) must stay NaN.
            p = tl.math.exp2(exponent)
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(
                p.to(v.dtype), v, acc * alpha[:, None], out_dtype=ACC_DTYPE
            )  # accumulates in the MMA
            m_i = m_new

    o_mask = row_ok[:, None] & d_ok[None, :]
    # Split-KV: unnormalised partials, OUT is [B*H, splits, n_q, HEAD_DIM] and PART_ML [B*H, splits, 2, n_q]
    # in ACC_DTYPE; otherwise the normalised output in q's dtype.
    if SPLIT:
        part = off_bh.to(tl.int64) * tl.num_programs(2) + split
        o_ptrs = OUT + part * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, acc, mask=o_mask)
        tl.store(PART_ML + part * 2 * n_q + offs_m, m_i, mask=row_ok)
        tl.store(PART_ML + part * 2 * n_q + n_q + offs_m, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # fully masked rows: acc = 0, out = 0
        o_ptrs = OUT + b * sob + h * soh + rows[:, None] * som + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)
