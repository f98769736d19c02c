"""Benchmark kernl.layernorm against PyTorch on the GPU (fp16), side by side in one run.

Peers: ``F.layer_norm``; ``s = x + r; F.layer_norm(s), s`` (the sum is the block's next residual);
HF ``T5LayerNorm``; each also through ``torch.compile`` at M=16384. Writes benchmarks/results/<gpu>/layernorm.json and layernorm.png.
Run: python packages/layernorm/benchmarks/bench_layernorm.py
"""

import torch
import torch.nn.functional as F
from transformers.models.t5.modeling_t5 import T5LayerNorm

from kernl.layernorm import layer_norm, rms_norm
from kernl_testing.benchmarking import host_us_per_call, median_ms, save_figure, write_results

ROWS = (16, 1024, 16384)
HIDDEN = (512, 768, 1024, 4096)


def _gbps(m: int, n: int, tensors_moved: int, ms: float) -> float:
    return tensors_moved * m * n * 2 / (ms * 1e-3) / 1e9


def bench_shape(m: int, n: int) -> list[dict]:
    x = torch.randn(m, n, device="cuda", dtype=torch.float16)
    r = torch.randn_like(x)
    w = torch.rand(n, device="cuda", dtype=torch.float16) + 0.5
    b = torch.randn(n, device="cuda", dtype=torch.float16)
    t5 = T5LayerNorm(n).to("cuda", torch.float16)

    def torch_add_layer_norm():
        summed = x + r  # the block needs the sum too (it is the next residual): return it, as kernl does
        return F.layer_norm(summed, (n,), w, b, 1e-12), summed

    cases = {
        "layer_norm": (2, lambda: F.layer_norm(x, (n,), w, b, 1e-12), lambda: layer_norm(x, w, b, 1e-12)),
        "add_layer_norm": (
            4,
            torch_add_layer_norm,
            lambda: layer_norm(x, w, b, 1e-12, residual=r),
        ),
        "rms_norm": (2, lambda: t5(x), lambda: rms_norm(x, t5.weight, 1e-6)),
    }
    records = []
    with torch.inference_mode():
        for op, (tensors_moved, torch_fn, kernl_fn) in cases.items():
            torch.testing.assert_close(kernl_fn(), torch_fn(), atol=2e-2, rtol=1e-2)
            peers = {"torch": median_ms(torch_fn)}
            if m == 16384:
                compiled = torch.compile(torch_fn, dynamic=False)
                compiled()
                peers["torch.compile"] = median_ms(compiled)
            kernl_ms = median_ms(kernl_fn)
            record = {
                "op": op,
                "M": m,
                "N": n,
                "kernl_ms": kernl_ms,
                "kernl_GBps": _gbps(m, n, tensors_moved, kernl_ms),
            }
            for peer, ms in peers.items():
                record[f"{peer}_ms"] = ms
                record[f"speedup_vs_{peer}"] = ms / kernl_ms
            if m == ROWS[0]:  # tiny launches: the host-side cost per call matters too
                record["kernl_host_us"] = host_us_per_call(kernl_fn)
                record["torch_host_us"] = host_us_per_call(torch_fn)
            records.append(record)
            print(
                f"{op:<15} M={m:<6} N={n:<5} kernl {kernl_ms * 1e3:8.1f} us ({record['kernl_GBps']:6.0f} GB/s)  "
                + "  ".join(f"{p} {ms * 1e3:8.1f} us (x{ms / kernl_ms:.2f})" for p, ms in peers.items())
            )
    return records


def chart(records: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = ["layer_norm", "add_layer_norm", "rms_norm"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    for ax, op in zip(axes, ops, strict=True):
        rows = [r for r in records if r["op"] == op]
        labels = [f"{r['M']}x{r['N']}" for r in rows]
        for offset, peer, color in ((-0.2, "torch", "tab:green"), (0.2, "torch.compile", "tab:blue")):
            ratios = [r.get(f"speedup_vs_{peer}", float("nan")) for r in rows]
            ax.bar([i + offset for i in range(len(rows))], ratios, width=0.4, color=color, label=f"vs {peer}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.legend(fontsize=8)
        ax.set_xticks(range(len(rows)), labels, rotation=70, fontsize=8)
        ax.set_title(f"{op}: kernl speedup (fp16, H100)")
    axes[0].set_ylabel("peer time / kernl time (log)")
    axes[0].set_yscale("log")
    return fig


def main() -> None:
    records = [rec for m in ROWS for n in HIDDEN for rec in bench_shape(m, n)]
    write_results(
        "layernorm",
        {
            "dtype": "float16",
            "timing": "kernl_testing.benchmarking.median_ms: median GPU time, L2 flushed, host overhead hidden",
            "results": records,
        },
    )
    save_figure(chart(records), "layernorm")


if __name__ == "__main__":
    main()
