"""Benchmark kernl.flash_attention against ``F.scaled_dot_product_attention`` (fp16), side by side in one run.

Cases: encoder self-attention with no mask and with a key padding mask (SDPA gets the same mask, in
its fastest form: bool ``[B, 1, Q, K]`` as HF builds it, or additive ``[B, 1, 1, K]``); T5 position
bias plus padding (SDPA gets the bias folded into a float mask, as HF does); one-token decoding
against a preallocated KV cache (SDPA on the cache slice). Launch-bound cases are also timed as CUDA
graph replays. TFLOP/s are nominal: ``4 * B * H * Q * K * D`` whatever the padding.
Writes benchmarks/results/<gpu>/flash_attention.json and flash_attention.png.
Run: python packages/flash_attention/benchmarks/bench_flash_attention.py; with ``gqa``, only the
grouped-query cases (Llama-3.2-1B's attention: causal prefill, one-token decoding), written to
flash_attention_gqa.json.
"""

import sys

import torch
import torch.nn.functional as F
import triton.testing

from kernl.flash_attention import attention, attention_decode
from kernl_testing.benchmarking import median_ms, save_figure, write_results

SWEEP_SEQS = (256, 512, 1024, 2048, 4096)
TOKENS = 16384  # batch = TOKENS // seq in the sweep


def graph_ms(fn) -> float:
    """Median time of ``fn()`` replayed from a CUDA graph (launch overhead removed)."""
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def padding_lengths(batch: int, seq: int) -> torch.Tensor:
    """Per-sequence lengths: the first full, the others uniform in [seq/2, seq]; 3/4 for a batch of one."""
    if batch == 1:
        return torch.tensor([seq * 3 // 4], device="cuda")
    g = torch.Generator().manual_seed(batch * 7919 + seq)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    return lengths.cuda()


def qkv(batch, heads, n_q, n_k, d=64):
    q = torch.randn(batch, heads, n_q, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(batch, heads, n_k, d, device="cuda", dtype=torch.float16) for _ in range(2))
    return q, k, v


def record(case, shape, kernl_fn, peers: dict, flops: float, graphs: bool = False, check=None) -> dict:
    """Time kernl and each peer; ``check`` = (kernl output, peer output) compared first."""
    if check is not None:
        torch.testing.assert_close(check[0](), check[1](), atol=2e-2, rtol=1e-2)
    rec = {"case": case, "shape": shape, "kernl_ms": median_ms(kernl_fn)}
    rec["kernl_TFLOPs"] = flops / (rec["kernl_ms"] * 1e-3) / 1e12
    for name, fn in peers.items():
        rec[f"{name}_ms"] = median_ms(fn)
        rec[f"speedup_vs_{name}"] = rec[f"{name}_ms"] / rec["kernl_ms"]
    if graphs:
        rec["kernl_graph_ms"] = graph_ms(kernl_fn)
        for name, fn in peers.items():
            rec[f"{name}_graph_ms"] = graph_ms(fn)
            rec[f"graph_speedup_vs_{name}"] = rec[f"{name}_graph_ms"] / rec["kernl_graph_ms"]
    best = min(rec[f"{p}_ms"] for p in peers)
    print(f"{case:<26} {str(shape):<22} kernl {rec['kernl_ms'] * 1e3:8.1f} us ({rec['kernl_TFLOPs']:5.0f} TFLOP/s)  "
          + "  ".join(f"{p} {rec[f'{p}_ms'] * 1e3:8.1f} us" for p in peers) + f"  x{best / rec['kernl_ms']:.2f}"
          + (f"  graphs: kernl {rec['kernl_graph_ms'] * 1e3:.1f} us x{min(rec[f'{p}_graph_ms'] for p in peers) / rec['kernl_graph_ms']:.2f}"
             if graphs else ""))  # fmt: skip
    return rec


def encoder(batch: int, heads: int, seq: int, graphs: bool = False) -> list[dict]:
    q, k, v = qkv(batch, heads, seq, seq)
    flops = 4.0 * batch * heads * seq * seq * 64
    lengths = padding_lengths(batch, seq)
    kpm = torch.arange(seq, device="cuda")[None, :] < lengths[:, None]
    bool_mask = kpm[:, None, None, :].expand(batch, 1, seq, seq)  # HF's sdpa mask: True = attend
    additive = torch.zeros(batch, 1, 1, seq, device="cuda", dtype=torch.float16).masked_fill(
        ~kpm[:, None, None, :], torch.finfo(torch.float16).min
    )
    shape = (batch, heads, seq)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)
    sdpa_bool = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
    sdpa_add = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    kernl_bool = lambda: attention(q, k, v, key_padding_mask=kpm)
    lengths32 = lengths.to(torch.int32)
    return [
        record("no_mask", shape, lambda: attention(q, k, v), {"sdpa": sdpa}, flops, graphs, (lambda: attention(q, k, v), sdpa)),
        record("padding_bool", shape, kernl_bool, {"sdpa_bool_mask": sdpa_bool, "sdpa_additive_mask": sdpa_add},
               flops, graphs, (kernl_bool, sdpa_bool)),
        record("padding_lengths", shape, lambda: attention(q, k, v, key_padding_mask=lengths32),
               {"sdpa_bool_mask": sdpa_bool, "sdpa_additive_mask": sdpa_add}, flops, graphs),
    ]  # fmt: skip


def t5_bias(batch=8, heads=8, seq=512) -> list[dict]:
    q, k, v = qkv(batch, heads, seq, seq)
    bias = torch.randn(1, heads, seq, seq, device="cuda", dtype=torch.float16)
    kpm = torch.arange(seq, device="cuda")[None, :] < padding_lengths(batch, seq)[:, None]
    fold = lambda: torch.where(kpm[:, None, None, :], bias, torch.finfo(torch.float16).min)
    folded = fold()
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=folded, scale=1.0)
    sdpa_with_fold = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=fold(), scale=1.0)
    kernl_fn = lambda: attention(q, k, v, scale=1.0, bias=bias, key_padding_mask=kpm)
    flops = 4.0 * batch * heads * seq * seq * 64
    return [record("t5_bias_padding", (batch, heads, seq), kernl_fn, {"sdpa_folded_mask": sdpa,
                   "sdpa_fold_each_call": sdpa_with_fold}, flops, False, (kernl_fn, sdpa))]  # fmt: skip


def decode(batch: int, heads: int, cache: int, capacity: int = 4096) -> list[dict]:
    q, k, v = qkv(batch, heads, 1, capacity)
    length = torch.tensor(cache, device="cuda", dtype=torch.int32)
    sdpa = lambda: F.scaled_dot_product_attention(q, k[:, :, :cache], v[:, :, :cache])
    flops = 4.0 * batch * heads * cache * 64
    shape = (batch, heads, cache)
    return [
        record("decode_slice", shape, lambda: attention_decode(q, k, v, cache), {"sdpa": sdpa}, flops, True,
               (lambda: attention_decode(q, k, v, cache), sdpa)),
        record("decode_tensor_len", shape, lambda: attention_decode(q, k, v, length), {"sdpa": sdpa}, flops, True,
               (lambda: attention_decode(q, k, v, length), sdpa)),
    ]  # fmt: skip


def grouped(batch: int, seq: int, heads: int = 32, kv_heads: int = 8, cache: int = 1024) -> list[dict]:
    """Llama-3.2-1B's attention (32 query heads over 8 key/value heads, d 64): a causal prefill on the
    kernel's grouped heads against SDPA with ``enable_gqa`` and SDPA on ``repeat_kv``'s copies (what
    transformers runs with a mask); one-token decoding, the group's query heads viewed as queries of
    one head (kernl.integration's choice) against the kernel's grouped heads and SDPA."""
    q, k, v = qkv(batch, heads, seq, seq)
    k, v = k[:, :kv_heads].contiguous(), v[:, :kv_heads].contiguous()
    groups = heads // kv_heads
    repeat = lambda t: t[:, :, None].expand(batch, kv_heads, groups, seq, 64).reshape(batch, heads, seq, 64)
    kernl_fn = lambda: attention(q, k, v, causal=True)
    peers = {
        "sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa_repeat_kv": lambda: F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True),
    }
    flops = 2.0 * batch * heads * seq * seq * 64  # causal: half the scores
    records = [record("gqa_prefill_causal", (batch, heads, seq), kernl_fn, peers, flops, False,
                      (kernl_fn, peers["sdpa_enable_gqa"]))]  # fmt: skip
    step, k_cache, v_cache = qkv(batch, heads, 1, cache)
    k_cache, v_cache = k_cache[:, :kv_heads].contiguous(), v_cache[:, :kv_heads].contiguous()
    viewed = lambda: attention(step.reshape(batch, kv_heads, groups, 64), k_cache, v_cache)
    indexed = lambda: attention_decode(step, k_cache, v_cache)
    sdpa = lambda: F.scaled_dot_product_attention(step, k_cache, v_cache, enable_gqa=True)
    flops = 4.0 * batch * heads * cache * 64
    records.append(record("gqa_decode_grouped_view", (batch, heads, cache), viewed,
                          {"kernl_grouped_heads": indexed, "sdpa_enable_gqa": sdpa}, flops, True,
                          (lambda: viewed().reshape(batch, heads, 1, 64), sdpa)))  # fmt: skip
    return records


def chart(records: list[dict]):
    """TFLOP/s against sequence length (SDPA with padding: its faster mask form); decode speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    sweep = [r for r in records if r.get("sweep")]
    for case, color in (
        ("no_mask", "tab:blue"),
        ("padding_bool", "tab:orange"),
        ("padding_lengths", "tab:red"),
    ):
        rows = [r for r in sweep if r["case"] == case]
        seqs = [r["shape"][2] for r in rows]
        axes[0].plot(seqs, [r["kernl_TFLOPs"] for r in rows], "o-", color=color, label=f"kernl {case}")
        if case == "padding_lengths":
            continue
        peer_ms = [
            min(v for key, v in r.items() if key.startswith("sdpa") and key.endswith("_ms")) for r in rows
        ]
        sdpa = [r["kernl_TFLOPs"] * r["kernl_ms"] / ms for r, ms in zip(rows, peer_ms, strict=True)]
        axes[0].plot(
            seqs, sdpa, "s--", color=color, label=f"SDPA {case.replace('_bool', '')} (best mask form)"
        )
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel(
        f"sequence length (batch = {TOKENS} / seq, 12 heads, d 64, fp16; padding: lengths in [S/2, S])"
    )
    axes[0].set_ylabel("TFLOP/s (nominal)")
    axes[0].legend(fontsize=8)
    for offset, (case, color) in enumerate(
        (("decode_slice", "tab:green"), ("decode_tensor_len", "tab:olive"))
    ):
        rows = [r for r in records if r["case"] == case]
        positions = [i * 3 + offset for i in range(len(rows))]
        axes[1].bar(positions, [r["graph_speedup_vs_sdpa"] for r in rows], color=color, label=case)
    labels = [
        f"b{r['shape'][0]} h{r['shape'][1]} L{r['shape'][2]}" for r in records if r["case"] == "decode_slice"
    ]
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_xticks([i * 3 + 0.5 for i in range(len(labels))], labels, rotation=70, fontsize=8)
    axes[1].set_title("decode (1 query token), CUDA graphs: SDPA time / kernl time")
    axes[1].legend(fontsize=8)
    return fig


def main() -> None:
    torch.manual_seed(0)
    records = []
    if sys.argv[1:] == ["gqa"]:  # grouped-query cases only
        with torch.inference_mode():
            for batch in (1, 8):
                records += grouped(batch, 512)
        write_results("flash_attention_gqa", {"dtype": "float16", "head_dim": 64, "results": records})
        return
    with torch.inference_mode():
        for seq in SWEEP_SEQS:
            for rec in encoder(max(1, TOKENS // seq), 12, seq):
                records.append(dict(rec, sweep=True))
        for batch, heads, seq in ((1, 12, 4096), (1, 12, 16), (8, 12, 128)):
            records += encoder(batch, heads, seq, graphs=seq <= 128)
        records += t5_bias()
        for batch in (1, 8):
            for heads in (8, 12):
                for cache in (128, 1024, 4096):
                    records += decode(batch, heads, cache)
    write_results(
        "flash_attention",
        {"dtype": "float16", "head_dim": 64, "timing": "triton.testing.do_bench median (graph: do_bench_cudagraph)",
         "results": records},
    )  # fmt: skip
    save_figure(chart(records), "flash_attention")


if __name__ == "__main__":
    main()
