"""Benchmark kernl.linear_act (tuned) against F.linear + the same epilogue in PyTorch (cuBLAS), side by
side in one run, on the GPU (fp16).

Cases: every projection of Bert-base, Bert-large and T5-base with its epilogue, at M in {16, 1024, 4096,
16384}: stacked Q/K/V + bias, attention output + bias + residual, FFN up + bias + GELU (erf), FFN down
+ bias + residual; T5 gated FFN ``gelu_tanh(x @ wi_0.T) * (x @ wi_1.T)`` and ``wo`` + residual (no
biases). Each record names the config the tuner chose (``"torch"`` where PyTorch's own candidate won).
Targets: 1.0x where torch fuses the epilogue too (the bias, in cuBLASLt), 1.3x where kernl's epilogue
saves torch a kernel (residual, GELU, gate). ``--warmup`` also measures the first-call cost of one Bert
layer in fresh processes (cold and warm caches). Writes benchmarks/results/<gpu>/linear_act.json and .png.
Run: python packages/linear_act/benchmarks/bench_linear_act.py [--models bert-base] [--m 16,1024] [--warmup]
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from kernl.linear_act import gated_linear_act, linear_act
from kernl.matmul import tuning
from kernl_testing.benchmarking import (
    median_ms,
    parse_projection_arguments,
    save_figure,
    target_chart,
    write_results,
)

# (projection, K, N, epilogue) per model; epilogues are the keys of EPILOGUES
PROJECTIONS = {
    "bert-base": [("qkv", 768, 2304, "bias"), ("attn out", 768, 768, "bias+residual"),
                  ("ffn up", 768, 3072, "bias+gelu"), ("ffn down", 3072, 768, "bias+residual")],
    "bert-large": [("qkv", 1024, 3072, "bias"), ("attn out", 1024, 1024, "bias+residual"),
                   ("ffn up", 1024, 4096, "bias+gelu"), ("ffn down", 4096, 1024, "bias+residual")],
    "t5-base": [("ffn wi_0/wi_1", 768, 2048, "gated gelu_tanh"), ("ffn wo", 2048, 768, "residual")],
}  # fmt: skip
M_VALUES = (16, 1024, 4096, 16384)
# epilogue: (torch composition, kernl call, weight matrices read, target speedup); t = the case's tensors
EPILOGUES = {
    "bias": (lambda t: F.linear(t["x"], t["w"], t["b"]), lambda t: linear_act(t["x"], t["w"], t["b"]), 1, 1.0),
    "bias+residual": (lambda t: F.linear(t["x"], t["w"], t["b"]) + t["r"],
                      lambda t: linear_act(t["x"], t["w"], t["b"], residual=t["r"]), 1, 1.3),
    "bias+gelu": (lambda t: F.gelu(F.linear(t["x"], t["w"], t["b"])),
                  lambda t: linear_act(t["x"], t["w"], t["b"], "gelu"), 1, 1.3),
    "gated gelu_tanh": (lambda t: F.gelu(F.linear(t["x"], t["w"]), approximate="tanh") * F.linear(t["x"], t["w1"]),
                        lambda t: gated_linear_act(t["x"], t["w"], t["w1"], "gelu_tanh"), 2, 1.3),
    "residual": (lambda t: F.linear(t["x"], t["w"]) + t["r"], lambda t: linear_act(t["x"], t["w"], residual=t["r"]),
                 1, 1.3),
}  # fmt: skip


def _tensors(m, k, n):
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.float16) * scale

    return {"x": randn(m, k), "w": randn(n, k, scale=k**-0.5), "w1": randn(n, k, scale=k**-0.5),
            "b": randn(n), "r": randn(m, n)}  # fmt: skip


def _measure(model: str, m: int, name: str, k: int, n: int, epilogue: str) -> dict:
    """Time one projection both ways (same tensors), print and return its record."""
    torch_call, kernl_call, n_weights, target = EPILOGUES[epilogue]
    t = _tensors(m, k, n)
    torch_fn, kernl_fn = functools.partial(torch_call, t), functools.partial(kernl_call, t)
    with tuning.recorded_choices() as configs:
        out = kernl_fn()
    chosen = [tuning.describe(c) for c in configs]
    torch.testing.assert_close(out, torch_fn(), atol=3e-2, rtol=2e-2)
    torch_ms, kernl_ms = median_ms(torch_fn), median_ms(kernl_fn)
    flops = 2 * m * n * k * n_weights
    record = {
        "group": f"{model} M={m}",
        "case": f"{name} {k}->{n} {epilogue}",
        "model": model,
        "projection": name,
        "epilogue": epilogue,
        "M": m,
        "K": k,
        "N": n,
        "kernl_ms": kernl_ms,
        "torch_ms": torch_ms,
        "speedup_vs_torch": torch_ms / kernl_ms,
        "kernl_TFLOPs": flops / kernl_ms / 1e9,
        "torch_TFLOPs": flops / torch_ms / 1e9,
        "kernl_weight_TBps": 2 * n * k * n_weights / kernl_ms / 1e9,
        "kernl_config": chosen,
        "target_speedup": target,
        "met": torch_ms / kernl_ms >= target,
    }
    print(
        f"{record['group']:<18} {record['case']:<38} kernl {kernl_ms * 1e3:8.1f} us "
        f"({record['kernl_TFLOPs']:6.1f} TFLOP/s, {record['kernl_weight_TBps']:.2f} TB/s W)  "
        f"torch {torch_ms * 1e3:8.1f} us  x{torch_ms / kernl_ms:.2f}  [{', '.join(chosen)}]  "
        f"target x{target} {'met' if record['met'] else 'MISSED'}"
    )
    return record


WARMUP_SCRIPT = """
import json, time, torch
from kernl.linear_act import linear_act
m = 1024
x = torch.randn(m, 768, device="cuda", dtype=torch.float16)
h = torch.randn(m, 3072, device="cuda", dtype=torch.float16)
layer = [(x, 2304, 768, None), (x, 768, 768, None), (x, 3072, 768, "gelu"), (h, 768, 3072, None)]
args = [(a, torch.randn(n, k, device="cuda", dtype=torch.float16), torch.randn(n, device="cuda",
         dtype=torch.float16), act) for a, n, k, act in layer]
times = []
for _ in range(2):
    torch.cuda.synchronize(); t = time.perf_counter()
    for a, w, b, act in args:
        linear_act(a, w, b, act)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
print(json.dumps({"first_call_s": times[0], "second_call_s": times[1]}))
"""


def warmup_costs() -> dict:
    """Seconds for the first and second call of a Bert layer's 4 GEMMs in a fresh process."""
    results = {}
    with tempfile.TemporaryDirectory() as configs, tempfile.TemporaryDirectory() as compiled:
        runs = [("cold config cache, cold Triton cache", configs, compiled),
                ("warm config cache, warm Triton cache (process restart)", configs, compiled),
                ("warm config cache, cold Triton cache", configs, os.path.join(compiled, "fresh"))]  # fmt: skip
        for label, config_dir, triton_dir in runs:
            env = {**os.environ, "KERNL_CACHE_DIR": config_dir, "TRITON_CACHE_DIR": triton_dir}
            out = subprocess.run(
                [sys.executable, "-c", WARMUP_SCRIPT], env=env, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"warm-up: {label}: {results[label]}")
    return results


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--warmup", action="store_true", help="also time one Bert layer's first call (~1 minute)"
    )
    return parse_projection_arguments(parser, list(PROJECTIONS), M_VALUES)


def main() -> None:
    args = _parse()
    models, m_values = args.models, args.m
    if tuning.switched_off("KERNL_AUTOTUNE"):
        raise SystemExit("KERNL_AUTOTUNE is off: this benchmark compares the tuned kernels")
    started = time.perf_counter()
    with torch.inference_mode():
        records = [_measure(model, m, *projection) for model in models for m in m_values
                   for projection in PROJECTIONS[model]]  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"{len(records)} cases in {elapsed:.0f} s (tuning and compiling included)")
    everything = models == list(PROJECTIONS) and tuple(m_values) == M_VALUES
    name = "linear_act" if everything else f"linear_act-{'-'.join(models)}-M{'-'.join(map(str, m_values))}"
    payload = {
        "dtype": "float16",
        "timing": "kernl_testing.benchmarking.median_ms: median GPU time, L2 flushed, host overhead hidden",
        "peer": "F.linear (cuBLAS through torch) + the same epilogue in PyTorch ops",
        "kernl_config": "the tuner's choice for the case (tuning.describe); 'torch' = PyTorch's candidate",
        "elapsed_s": elapsed,
        "results": records,
    }
    write_results(name, payload)
    save_figure(
        target_chart(records, "linear_act: speedup over F.linear + the epilogue in torch (fp16)"), name
    )
    if args.warmup:
        payload["warmup_bert_layer_M1024"] = warmup_costs()
        write_results(name, payload)


if __name__ == "__main__":
    main()
