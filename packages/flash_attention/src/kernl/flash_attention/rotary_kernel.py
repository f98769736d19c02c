"""Rotary position embedding (RoPE) of queries and keys in one launch.

Llama's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``: for the
first half of a head, ``x1 * cos1 - x2 * sin1``; for the second, ``x2 * cos2 + x1 * sin2``. One program
per token ``(b, s)`` loads that token's ``cos``/``sin`` rows once and rotates every head of q, then of
k, ``BLOCK_H`` heads at a time, computing in fp32 and rounding once (PyTorch rounds each product and
the sum in the input's dtype).
"""

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X, OUT, b, s, heads, sxb, sxh, sxs, sxd, sob, soh, sos, sod, cos1, cos2, sin1, sin2, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < half
    for h0 in range(0, heads, BLOCK_H):
        rows = (h0 + offs_h).to(tl.int64)
        ok = (rows < heads)[:, None] & d_ok[None, :]
        first = X + b * sxb + s * sxs + rows[:, None] * sxh + offs_d[None, :] * sxd
        x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(first + half * sxd, mask=ok, other=0.0).to(tl.float32)
        out = OUT + b * sob + s * sos + rows[:, None] * soh + offs_d[None, :] * sod
        tl.store(out, (x1 * cos1 - x2 * sin1).to(OUT.dtype.element_ty), mask=ok)
        tl.store(out + half * sod, (x2 * cos2 + x1 * sin2).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO, n_seq, heads_q, heads_k, half,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, sqob, sqoh, sqos, sqod, skob, skoh, skos, skod,
    scb, scs, scd, ssb, sss, ssd,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    b = (token // n_seq).to(tl.int64)
    s = (token % n_seq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < half
    cos_row = COS + b * scb + s * scs + offs_d * scd
    sin_row = SIN + b * ssb + s * sss + offs_d * ssd
    cos1 = tl.load(cos_row, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + half * scd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + half * ssd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        Q, QO, b, s, heads_q, sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod, cos1, cos2, sin1, sin2, half,
        BLOCK_H, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        K, KO, b, s, heads_k, skb, skh, sks, skd, skob, skoh, skos, skod, cos1, cos2, sin1, sin2, half,
        BLOCK_H, BLOCK_HALF,
    )  # fmt: skip
