"""Benchmark kernl.matmul (tuned) against torch (cuBLAS) on the GPU, side by side in one run.

Cases (fp16 unless noted): every projection shape of Bert-base, Bert-large and T5-base (``x @ W.T``, W
in nn.Linear layout, no epilogue: the epilogues are in bench_linear_act.py) at M in {16, 1024, 4096,
16384}, against ``F.linear``; ragged sizes; attention-score and attention-context batched matmuls
(12 heads x 32 batch, seq 384, head dim 64) against ``torch.bmm``; one bf16 and one square shape.
Each record names the config the tuner chose (``"torch"`` where PyTorch's own candidate won).
Writes benchmarks/results/<gpu>/matmul.json and matmul.png.
Run: python packages/matmul/benchmarks/bench_matmul.py [--models bert-base,t5-base] [--m 16,1024]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from kernl.matmul import matmul, tuning
from kernl_testing.benchmarking import (
    median_ms,
    parse_projection_arguments,
    save_figure,
    target_chart,
    write_results,
)

# (K, N) of every distinct projection: Q/K/V stacked, attention output, FFN up, FFN down
PROJECTIONS = {
    "bert-base": {"qkv": (768, 2304), "attn out": (768, 768), "ffn up": (768, 3072), "ffn down": (3072, 768)},
    "bert-large": {"qkv": (1024, 3072), "attn out": (1024, 1024), "ffn up": (1024, 4096), "ffn down": (4096, 1024)},
    "t5-base": {"ffn wi_0/wi_1": (768, 2048), "ffn wo": (2048, 768)},
}  # fmt: skip
M_VALUES = (16, 1024, 4096, 16384)


def _projection_cases(models, m_values):
    """(group, label, (a, b) builder, flops, bytes of b, target speedup)."""
    for model in models:
        for m in m_values:
            for name, (k, n) in PROJECTIONS[model].items():
                yield (f"{model} M={m}", f"{name} {k}->{n}", lambda m=m, k=k, n=n: _linear(m, k, n),
                       2 * m * n * k, 2 * n * k, 1.0)  # fmt: skip


def _other_cases():
    for m, n, k in [(1000, 1000, 999), (777, 1531, 1000), (16384, 3000, 777), (5, 1000, 1001)]:
        yield "ragged", f"{m}x{n}x{k}", lambda m=m, n=n, k=k: _linear(m, k, n), 2 * m * n * k, 2 * n * k, None
    bh, s, d = 12 * 32, 384, 64
    yield "bmm", "scores 384x64x384 x384", lambda: _bmm(bh, s, d, s, True), 2 * bh * s * s * d, 0, 0.9
    yield "bmm", "context 384x384x64 x384", lambda: _bmm(bh, s, s, d, False), 2 * bh * s * s * d, 0, 0.9
    yield "other", "square 4096 fp16", lambda: _linear(4096, 4096, 4096), 2 * 4096**3, 0, None
    yield ("other", "bf16 M=16384 768->3072", lambda: _linear(16384, 768, 3072, torch.bfloat16),
           2 * 16384 * 3072 * 768, 0, None)  # fmt: skip


def _linear(m, k, n, dtype=torch.float16):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    return x, w.t()


def _bmm(bh, m, k, n, transposed_b):
    a = torch.randn(bh, m, k, device="cuda", dtype=torch.float16)
    if transposed_b:
        return a, torch.randn(bh, n, k, device="cuda", dtype=torch.float16).transpose(1, 2)
    return a, torch.randn(bh, k, n, device="cuda", dtype=torch.float16)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-others", action="store_true", help="projections only (no ragged, bmm, bf16)")
    return parse_projection_arguments(parser, list(PROJECTIONS), M_VALUES)


def main() -> None:
    args = _parse()
    models, m_values = args.models, args.m
    if tuning.switched_off("KERNL_AUTOTUNE"):
        raise SystemExit("KERNL_AUTOTUNE is off: this benchmark compares the tuned kernels")
    cases = list(_projection_cases(models, m_values)) + ([] if args.no_others else list(_other_cases()))
    records = []
    started = time.perf_counter()
    with torch.inference_mode():
        for group, label, build, flops, weight_bytes, target in cases:
            a, b = build()
            torch_fn = (
                (lambda a=a, b=b: torch.bmm(a, b)) if a.dim() == 3 else (lambda a=a, b=b: F.linear(a, b.t()))
            )
            kernl_fn = lambda a=a, b=b: matmul(a, b)
            with tuning.recorded_choices() as configs:
                out = kernl_fn()
            chosen = [tuning.describe(c) for c in configs]
            torch.testing.assert_close(out, torch_fn(), atol=2e-2, rtol=2e-2)
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
                "kernl_config": chosen,
            }
            if weight_bytes and a.shape[-2] <= 64:
                record["kernl_weight_TBps"] = weight_bytes / kernl_ms / 1e9
            if target is not None:
                record["target_speedup"] = target
                record["met"] = torch_ms / kernl_ms >= target
            records.append(record)
            print(
                f"{group:<18} {label:<24} kernl {kernl_ms * 1e3:8.1f} us ({record['kernl_TFLOPs']:6.1f} TFLOP/s)  "
                f"torch {torch_ms * 1e3:8.1f} us ({record['torch_TFLOPs']:6.1f})  x{torch_ms / kernl_ms:.2f}  "
                f"[{', '.join(chosen)}]"
                + (f"  target x{target} {'met' if record['met'] else 'MISSED'}" if target else "")
            )
    elapsed = time.perf_counter() - started
    print(f"{len(records)} cases in {elapsed:.0f} s (tuning and compiling included)")
    everything = models == list(PROJECTIONS) and tuple(m_values) == M_VALUES and not args.no_others
    name = "matmul" if everything else f"matmul-{'-'.join(models)}-M{'-'.join(map(str, m_values))}"
    write_results(
        name,
        {
            "timing": "kernl_testing.benchmarking.median_ms: median GPU time, L2 flushed, host overhead hidden",
            "peer": "F.linear (cuBLAS through torch) for x @ W.T, torch.bmm for batched",
            "kernl_config": "the tuner's choice for the case (tuning.describe); 'torch' = PyTorch's candidate",
            "elapsed_s": elapsed,
            "results": records,
        },
    )
    save_figure(target_chart(records, "matmul: speedup over torch (fp16 unless noted)"), name)


if __name__ == "__main__":
    main()
