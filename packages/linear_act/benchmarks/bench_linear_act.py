"""Benchmark kernl.linear_act against the torch composition on the GPU (fp16), side by side in one run.

Bert-base: linear+bias and linear+bias+gelu (768->3072) at M in {16, 1024, 16384}, the pooler's
linear+tanh. T5 (d_model/d_ff 512/2048 and 768/3072) at M in {1, 8, 64, 16384}: relu FFN up-projection
and the gated-gelu (v1.1 / flan) up-projection against HF's own composition. Then the warm-up cost of
one Bert layer's four GEMMs (first call in a fresh process: cold caches, warm config + compile
caches, warm config cache only). Writes benchmarks/results/<gpu>/linear_act.json and linear_act.png.
Run: python packages/linear_act/benchmarks/bench_linear_act.py
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from kernl.linear_act import gated_linear_act, linear_act
from kernl_testing.benchmarking import median_ms, save_figure, target_chart, write_results

BERT = [(768, 2304), (768, 3072), (3072, 768)]  # (K, N)
T5 = [(512, 2048), (768, 3072)]
BERT_TARGETS = {16: 1.5, 1024: 1.0, 16384: 0.95}
GELU_TARGETS = {16: 1.5, 1024: 2.0, 16384: 1.4}


def _weights(n, k, count=1):
    return [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(count)]


def _cases():
    """(group, label, m, k, n, torch_fn, kernl_fn, weight matrices read, target)."""
    for m in (16, 1024, 16384):
        for k, n in BERT:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            (w,) = _weights(n, k)
            b = torch.randn(n, device="cuda", dtype=torch.float16)
            yield ("bert linear+bias", f"M={m} {k}->{n}", m, k, n, lambda x=x, w=w, b=b: F.linear(x, w, b),
                   lambda x=x, w=w, b=b: linear_act(x, w, b), 1, BERT_TARGETS[m])  # fmt: skip
            if n == 3072:
                yield ("bert linear+bias+gelu", f"M={m} {k}->{n}", m, k, n,
                       lambda x=x, w=w, b=b: F.gelu(F.linear(x, w, b)),
                       lambda x=x, w=w, b=b: linear_act(x, w, b, "gelu"), 1, GELU_TARGETS[m])  # fmt: skip
    x = torch.randn(32, 768, device="cuda", dtype=torch.float16)
    (w,) = _weights(768, 768)
    b = torch.randn(768, device="cuda", dtype=torch.float16)
    yield ("bert pooler tanh", "M=32 768->768", 32, 768, 768, lambda: torch.tanh(F.linear(x, w, b)),
           lambda: linear_act(x, w, b, "tanh"), 1, None)  # fmt: skip
    gelu_new = NewGELUActivation()
    for m in (1, 8, 64, 16384):
        for k, n in T5:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w0, w1 = _weights(n, k, 2)
            yield ("t5 relu up", f"M={m} {k}->{n}", m, k, n, lambda x=x, w=w0: F.relu(F.linear(x, w)),
                   lambda x=x, w=w0: linear_act(x, w, None, "relu"), 1, 1.2)  # fmt: skip
            yield ("t5 gated gelu up", f"M={m} {k}->{n}", m, k, n,
                   lambda x=x, w0=w0, w1=w1: gelu_new(F.linear(x, w0)) * F.linear(x, w1),
                   lambda x=x, w0=w0, w1=w1: gated_linear_act(x, w0, w1, "gelu_tanh"), 2, 1.3)  # fmt: skip


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


def main() -> None:
    records = []
    with torch.inference_mode():
        for group, label, m, k, n, torch_fn, kernl_fn, n_weights, target in _cases():
            torch.testing.assert_close(kernl_fn(), torch_fn(), atol=3e-2, rtol=2e-2)
            torch_ms, kernl_ms = median_ms(torch_fn), median_ms(kernl_fn)
            flops = 2 * m * n * k * n_weights
            record = {
                "group": group,
                "case": label,
                "M": m,
                "K": k,
                "N": n,
                "kernl_ms": kernl_ms,
                "torch_ms": torch_ms,
                "speedup_vs_torch": torch_ms / kernl_ms,
                "kernl_TFLOPs": flops / kernl_ms / 1e9,
                "kernl_weight_TBps": 2 * n * k * n_weights / kernl_ms / 1e9,
            }
            if target is not None:
                record["target_speedup"] = target
                record["met"] = torch_ms / kernl_ms >= target
            records.append(record)
            print(
                f"{group:<22} {label:<18} kernl {kernl_ms * 1e3:8.1f} us ({record['kernl_TFLOPs']:6.1f} TFLOP/s, "
                f"{record['kernl_weight_TBps']:.2f} TB/s W)  torch {torch_ms * 1e3:8.1f} us  x{torch_ms / kernl_ms:.2f}"
                + (f"  target x{target} {'met' if record['met'] else 'MISSED'}" if target else "")
            )
    payload = {
        "dtype": "float16",
        "timing": "kernl_testing.benchmarking.median_ms: median GPU time, L2 flushed, host overhead hidden",
        "results": records,
    }
    write_results("linear_act", payload)
    save_figure(
        target_chart(records, "linear_act: speedup over the torch composition (fp16, H100)"), "linear_act"
    )
    payload["warmup_bert_layer_M1024"] = warmup_costs()
    write_results("linear_act", payload)


if __name__ == "__main__":
    main()
