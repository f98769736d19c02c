# %% [markdown]
# # 03. Flash attention: the online softmax, tiles, masks, padding
#
# `out = softmax(scale * q @ k^T) @ v`. Written as three PyTorch ops it materialises the `(Q, K)`
# score matrix in memory, twice (scores, then probabilities): at 4K tokens and 12 heads that is 400 MB
# per batch element in fp16. Flash attention never writes it: a program keeps a block of queries in
# registers and streams the keys past them, block by block. What makes that possible is the **online
# softmax**, derived below; then a ~40-line Triton kernel, then kernl's, then the packed (varlen)
# layout. Each kernel is checked against the reference; on a GPU they are timed against PyTorch's
# `scaled_dot_product_attention` and plotted (`tutorial_03_flash_attention.png`).

# %%
import math
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
DEVICE = "cuda" if ON_GPU else "cpu"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernl.flash_attention as fa  # noqa: E402
from kernl_testing import assert_matches_reference  # noqa: E402

F = torch.nn.functional
torch.manual_seed(0)

# %% [markdown]
# ## 1. The online softmax, step by step
#
# For one query row with scores `s_1 .. s_n` and values `v_j`:
# `out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m)`, for any constant `m`; the row maximum is chosen
# so that no `exp` overflows. The keys arrive in blocks. After the blocks seen so far keep
#
# - `m`: the largest score seen,
# - `l = sum exp(s_j - m)`: the denominator so far,
# - `acc = sum exp(s_j - m) v_j`: the numerator so far.
#
# A new block with maximum `m_b` gives `m' = max(m, m_b)`. Everything in `l` and `acc` was scaled by
# `exp(-m)` and must now be scaled by `exp(-m')`: multiply both by `alpha = exp(m - m')` (<= 1), then
# add the block's own terms `exp(s_j - m')`. After the last block, `out = acc / l`: exact, not an
# approximation, and each score was computed once and never stored.

# %%
scores = 3 * torch.randn(10, dtype=torch.float64)
scores[5], scores[9] = 6.0, 9.0  # the maximum rises in the second and the third block
values = torch.randn(10, 4, dtype=torch.float64)
m, denominator, acc = torch.tensor(-math.inf, dtype=torch.float64), 0.0, torch.zeros(4, dtype=torch.float64)
for block in range(0, 10, 4):  # blocks of 4 keys (the last one of 2)
    s, v = scores[block : block + 4], values[block : block + 4]
    m_new = torch.maximum(m, s.max())
    alpha = torch.exp(m - m_new)  # rescale what was gathered under the old maximum
    p = torch.exp(s - m_new)
    denominator, acc, m = denominator * alpha + p.sum(), acc * alpha + p @ v, m_new
    print(f"keys {block}..{block + len(s) - 1}: running max {float(m):+.3f}, alpha {float(alpha):.3f}")
torch.testing.assert_close(acc / denominator, torch.softmax(scores, 0) @ values)
print("online softmax == softmax(scores) @ values")

# %% [markdown]
# ## 2. As a tiled Triton kernel, with masks and padding skipped
#
# A program takes `BLOCK_M` query rows of one (batch, head) and runs the loop above for all of them at
# once: `s = q @ k_block` is a `BLOCK_M x BLOCK_N` tile (`tl.dot`), `m`, `l` are vectors, `acc` a
# `BLOCK_M x D` tile. Masks are `where(keep, s, -inf)` on the tile: `exp(-inf) = 0` drops the key.
#
# Two masks cost nothing beyond that, because they are ranges: **padding** (each sequence's keys end
# at its length; the loop simply stops there, so padded keys are never even loaded: a batch padded to
# twice its real length costs half) and **causal** (query `i` sees keys `j <= i`; the loop stops at
# the block holding the diagonal). A general mask (a bool or additive tensor) is loaded tile by tile.


# %%
@triton.jit
def attention_teaching(Q, K, V, OUT, LENGTHS, n_heads, seq, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):  # fmt: skip
    """q, k, v, out: contiguous (B, H, S, D); LENGTHS: (B,) int32, each >= 1 (keys past it are padding)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * seq * HEAD_DIM
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < seq, other=0.0)

    end = tl.load(LENGTHS + bh // n_heads)  # padding: stop at the sequence's last key
    if CAUSAL:
        end = tl.minimum(end, (start_m + 1) * BLOCK_M)  # and at the diagonal
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + base + cols[None, :] * HEAD_DIM + dims[:, None], mask=cols[None, :] < end, other=0.0)
        v = tl.load(V + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < end, other=0.0)
        s = tl.dot(q, k) * scale  # (BLOCK_M, BLOCK_N) scores
        keep = cols[None, :] < end
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + base + rows[:, None] * HEAD_DIM + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] < seq)  # fmt: skip


def teaching(q, k, v, lengths, causal=False, block=(64, 64) if ON_GPU else (16, 16)):
    batch, heads, seq, dim = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(seq, block[0]), batch * heads)
    attention_teaching[grid](q, k, v, out, lengths, heads, seq, 1 / math.sqrt(dim),
                             HEAD_DIM=dim, BLOCK_M=block[0], BLOCK_N=block[1], CAUSAL=causal)  # fmt: skip
    return out


def qkv(batch, heads, seq, dim, dtype=torch.float16):
    return [torch.randn(batch, heads, seq, dim, device=DEVICE, dtype=dtype) for _ in range(3)]


def check(name, got, q, k, v, lengths, causal):
    exact = fa.attention_reference(
        q.double(), k.double(), v.double(), key_padding_mask=lengths, causal=causal
    )
    peer = fa.attention_reference(q, k, v, key_padding_mask=lengths, causal=causal)
    assert_matches_reference(got, exact, peer, name=name)
    print(f"{name}: matches the reference")


q, k, v = qkv(2, 2, 40, 32)
lengths = torch.tensor([40, 23], device=DEVICE, dtype=torch.int32)  # the second sequence is padded
for causal in (False, True):
    check(f"teaching kernel, causal={causal}", teaching(q, k, v, lengths, causal), q, k, v, lengths, causal)

# %% [markdown]
# ## 3. kernl's kernel
#
# `kernl.flash_attention.attention` (`packages/flash_attention/src/kernl/flash_attention/kernel.py`)
# is the same loop, with what a production kernel needs: any strides, a bool/additive mask and T5's
# position bias, padding given as lengths or as a bool `(B, K)` mask (scanned once for its last real
# key), base-2 exponentials (`exp2` with the scores pre-multiplied by `log2 e`: one instruction),
# interior blocks that skip every mask check, rows whose keys are all masked returning zeros instead
# of NaN, and split-KV for decoding (`attention_decode`).

# %%
check("kernl attention, lengths", fa.attention(q, k, v, key_padding_mask=lengths), q, k, v, lengths, False)
check("kernl attention, causal", fa.attention(q, k, v, causal=True), q, k, v, None, True)
bool_padding = torch.arange(40, device=DEVICE)[None, :] < lengths[:, None]  # Hugging Face's form
check(
    "kernl attention, bool mask",
    fa.attention(q, k, v, key_padding_mask=bool_padding),
    q,
    k,
    v,
    lengths,
    False,
)

# %% [markdown]
# ## 4. The varlen layout: no padding at all
#
# Padding a batch to its longest sequence and skipping the padded keys still pays for the padded
# *queries* (and for every other layer on the padded tokens). The packed ("varlen") layout drops
# padding altogether: the batch's real tokens lie end to end in a `(T, H, D)` tensor and
# `cu_seqlens` (int32, `S + 1` offsets) says where each sequence starts: sequence `s` is tokens
# `cu_seqlens[s] : cu_seqlens[s + 1]`, and a query only sees keys of its own sequence. This is
# `kernl.flash_attention.attention_varlen(q, k, v, cu_seqlens, *, scale=None, causal=False)`, where
# this kernl has it.

# %%
if not hasattr(fa, "attention_varlen"):
    print("kernl.flash_attention.attention_varlen is not in this kernl yet: the varlen section is skipped.")
else:
    seq_lengths = [7, 19, 1, 12]
    cu_seqlens = torch.tensor(
        [0, *torch.tensor(seq_lengths).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32
    )
    total, heads, dim = sum(seq_lengths), 2, 32
    pq, pk, pv = (torch.randn(total, heads, dim, device=DEVICE, dtype=torch.float16) for _ in range(3))
    for causal in (False, True):
        packed = fa.attention_varlen(pq, pk, pv, cu_seqlens, causal=causal)
        for s, (start, stop) in enumerate(
            zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)
        ):
            one = [t[start:stop].transpose(0, 1)[None] for t in (pq, pk, pv)]  # (1, H, L, D)
            exact = fa.attention_reference(*(t.double() for t in one), causal=causal)
            peer = fa.attention_reference(*one, causal=causal)
            assert_matches_reference(
                packed[start:stop].transpose(0, 1)[None], exact, peer, name=f"sequence {s}"
            )
        print(f"attention_varlen, causal={causal}: every packed sequence matches its own attention")

# %% [markdown]
# ## 5. Timings (GPU only)
#
# Bert-like heads (12 x 64, fp16), batch 4. Left: full sequences, TFLOP/s of the teaching kernel,
# kernl and `scaled_dot_product_attention`. Right: the same batch where half the sequences are padded
# to twice their length: kernl with lengths skips the padded keys; SDPA takes the padding as a mask.
# Each call is replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`), as `optimize_model`
# runs it, so the figures are the kernels' own. Called eagerly, one at a time, kernl's op also pays
# more host work per call than SDPA (argument checks in Python, then Triton's launcher); on small
# shapes that host time, not the kernel, sets the pace (`triton.testing.do_bench` shows it).

# %%
if not ON_GPU:
    print(
        "No GPU (or TRITON_INTERPRET=1): timing and plot skipped; the kernels above were checked on the CPU."
    )
else:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def engines(q, k, v, whole, half, mask):
        """The calls timed on full sequences, and on the half-padded batch."""
        full = {
            "teaching kernel": lambda: teaching(q, k, v, whole),
            "kernl attention": lambda: fa.attention(q, k, v),
            "SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
        }
        padded = {
            "kernl, lengths": lambda: fa.attention(q, k, v, key_padding_mask=half),
            "SDPA, bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        }
        return full, padded

    batch, heads, dim = 4, 12, 64
    seqs = [256, 512, 1024, 2048, 4096]
    full = {"teaching kernel": [], "kernl attention": [], "SDPA": []}
    padded = {"kernl, lengths": [], "SDPA, bool mask": []}
    for seq in seqs:
        q, k, v = qkv(batch, heads, seq, dim)
        whole = torch.full((batch,), seq, device=DEVICE, dtype=torch.int32)
        half = torch.tensor([seq, seq // 2, seq, seq // 2], device=DEVICE, dtype=torch.int32)
        mask = (torch.arange(seq, device=DEVICE)[None, :] < half[:, None])[:, None, None, :]
        flops = 4 * batch * heads * seq * seq * dim
        timed_full, timed_padded = engines(q, k, v, whole, half, mask)
        for name, fn in timed_full.items():
            full[name].append(flops / triton.testing.do_bench_cudagraph(fn) * 1e-9)
        for name, fn in timed_padded.items():
            padded[name].append(triton.testing.do_bench_cudagraph(fn))
        print(f"seq {seq}: " + ", ".join(f"{n} {t[-1]:.0f} TFLOP/s" for n, t in full.items())
              + "; padded batch: " + ", ".join(f"{n} {t[-1]:.3f} ms" for n, t in padded.items()))  # fmt: skip
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in full.items():
        left.plot(seqs, values, marker="o", label=name)
    left.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s", title="full sequences")
    for name, values in padded.items():
        right.plot(seqs, values, marker="o", label=name)
    right.set(
        xscale="log", yscale="log", xlabel="padded length", ylabel="ms", title="half the batch padded 2x"
    )
    for axis in (left, right):
        axis.legend()
    figure.suptitle(f"attention, {heads} heads x {dim}, batch {batch}, fp16, {torch.cuda.get_device_name()}")
    figure.savefig("tutorial_03_flash_attention.png", dpi=120, bbox_inches="tight")
    print("plot saved to tutorial_03_flash_attention.png")
