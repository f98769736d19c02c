"""Benchmark kernl.matmul against torch on the GPU (fp16 unless noted), side by side in one run.

Cases: Bert-base projections (x @ W.T, W in nn.Linear layout) at M = 16 (small-M regime), 1024 and
16384 (large-M regime); ragged sizes; attention-score and attention-context batched matmuls
(12 heads x 32 batch, seq 384, head dim 64) against torch.bmm; one bf16 and one square shape.
Writes benchmarks/results/<gpu>/matmul.json and matmul.png.
Run: python packages/matmul/benchmarks/bench_matmul.py
"""

import torch

from kernl.matmul import matmul
from kernl_testing.benchmarking import median_ms, save_figure, target_chart, write_results

BERT = [(768, 2304), (768, 3072), (3072, 768)]  # (K, N)


def _cases():
    """(group, label, (a, b) builder, flops, bytes of b, target speedup or None)."""
    for m in (16, 1024, 16384):
        regime = "small_m" if m <= 64 else "large_m"
        for k, n in BERT:
            target = 1.5 if m == 16 else (1.0 if m == 1024 else 0.95)
            yield (
                regime,
                f"M={m} {k}->{n}",
                lambda m=m, k=k, n=n: _linear(m, k, n),
                2 * m * n * k,
                2 * n * k,
                target,
            )
    for m, n, k in [(1000, 1000, 999), (777, 1531, 1000), (16384, 3000, 777), (5, 1000, 1001)]:
        yield "ragged", f"{m}x{n}x{k}", lambda m=m, n=n, k=k: _linear(m, k, n), 2 * m * n * k, 2 * n * k, None
    bh, s, d = 12 * 32, 384, 64
    yield "bmm", "scores 384x64x384 x384", lambda: _bmm(bh, s, d, s, True), 2 * bh * s * s * d, 0, 0.9
    yield "bmm", "context 384x384x64 x384", lambda: _bmm(bh, s, s, d, False), 2 * bh * s * s * d, 0, 0.9
    yield "other", "square 4096 fp16", lambda: _linear(4096, 4096, 4096), 2 * 4096**3, 0, None
    yield (
        "other",
        "bf16 M=16384 768->3072",
        lambda: _linear(16384, 768, 3072, torch.bfloat16),
        2 * 16384 * 3072 * 768,
        0,
        None,
    )


def _linear(m, k, n, dtype=torch.float16):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    return x, w.t()


def _bmm(bh, m, k, n, transposed_b):
    a = torch.randn(bh, m, k, device="cuda", dtype=torch.float16)
    b = torch.randn(bh, n, k, device="cuda", dtype=torch.float16).transpose(1, 2) if transposed_b else None
    if b is None:
        b = torch.randn(bh, k, n, device="cuda", dtype=torch.float16)
    return a, b


def main() -> None:
    records = []
    with torch.inference_mode():
        for group, label, build, flops, weight_bytes, target in _cases():
            a, b = build()
            torch_fn = (
                (lambda a=a, b=b: torch.bmm(a, b)) if a.dim() == 3 else (lambda a=a, b=b: torch.matmul(a, b))
            )
            kernl_fn = lambda a=a, b=b: matmul(a, b)
            torch.testing.assert_close(kernl_fn(), torch_fn(), atol=2e-2, rtol=2e-2)
            torch_ms, kernl_ms = median_ms(torch_fn), median_ms(kernl_fn)
            record = {
                "group": group,
                "case": label,
                "shape": [*a.shape, b.shape[-1]],
                "dtype": str(a.dtype).removeprefix("torch."),
                "kernl_ms": kernl_ms,
                "torch_ms": torch_ms,
                "speedup_vs_torch": torch_ms / kernl_ms,
                "kernl_TFLOPs": flops / kernl_ms / 1e9,
                "torch_TFLOPs": flops / torch_ms / 1e9,
            }
            if weight_bytes and a.shape[0] <= 64:
                record["kernl_weight_TBps"] = weight_bytes / kernl_ms / 1e9
            if target is not None:
                record["target_speedup"] = target
                record["met"] = torch_ms / kernl_ms >= target
            records.append(record)
            print(
                f"{group:<8} {label:<26} kernl {kernl_ms * 1e3:8.1f} us ({record['kernl_TFLOPs']:6.1f} TFLOP/s)  "
                f"torch {torch_ms * 1e3:8.1f} us ({record['torch_TFLOPs']:6.1f})  x{torch_ms / kernl_ms:.2f}"
                + (f"  target x{target} {'met' if record['met'] else 'MISSED'}" if target else "")
            )
    write_results(
        "matmul",
        {
            "timing": "kernl_testing.benchmarking.median_ms: median GPU time, L2 flushed, host overhead hidden",
            "results": records,
        },
    )
    save_figure(target_chart(records, "matmul: speedup over torch (fp16 unless noted)"), "matmul")


if __name__ == "__main__":
    main()
