"""A/B of the GEMMs' L2 weight prefetch (``KERNL_PREFETCH=1`` vs ``0``), side by side in one run.

With programmatic launch each kernl GEMM may start while the kernel before it still runs; with the
prefetch on, its programs first ask L2 for their rows of the weight, then wait (``kernl.matmul.prefetch``).
Measured side by side in one run (``chains`` and ``bert``: median GPU time of a CUDA graph replay,
best of two rounds per setting, the settings alternated; ``t5``: wall clock, one round):
- ``chains``: 12 layers' GEMMs in a row on linear_act alone (Bert: QKV, output + residual, GELU up,
  down + residual; T5: q, output + residual, gated GELU, down + residual) at decode and encoder sizes;
  the outputs of both settings must be equal bit for bit.
- ``bert``: Bert-base under ``optimize_model`` (the whole forward's graph) at four shapes.
- ``t5``: flan-T5-base ``generate()`` wall clock (128 tokens in, 32 out, greedy) at batch 1 and 8;
  both settings must produce the same tokens.
Writes benchmarks/results/<gpu>/weight_prefetch_<part>.json, one file per part (each written as soon as
its part ends, so that parts can run in separate processes).
Run: python packages/integration/benchmarks/ab_weight_prefetch.py [chains] [bert] [t5]
"""

import copy
import functools
import gc
import os
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from kernl.integration import optimize_model
from kernl.integration.bench.gpu import gpu_ms, inputs, wall_clock_ms
from kernl.integration.cuda_graphs import captured
from kernl.linear_act import gated_linear_act, linear_act
from kernl_testing.benchmarking import write_results

SETTINGS = (True, False, True, False)  # prefetch on / off, alternated, two rounds each


def _set_prefetch(on: bool) -> None:
    os.environ["KERNL_PREFETCH"] = "1" if on else "0"


def _weights(shapes: dict[str, tuple[int, int]], layers: int) -> list[dict[str, torch.Tensor]]:
    """Random fp16 ``nn.Linear`` weights (N, K) for every layer, scaled so activations stay O(1)."""
    return [
        {name: (torch.randn(n, k) / k).half().cuda() for name, (n, k) in shapes.items()}
        for _ in range(layers)
    ]


def bert_layers(m: int, layers: int = 12):
    """A function running ``layers`` Bert-base layers' GEMMs on an ``(m, 768)`` fp16 input."""
    d, f = 768, 3072
    weights = _weights({"qkv": (3 * d, d), "o": (d, d), "up": (f, d), "down": (d, f)}, layers)
    x0 = torch.randn(m, d, device="cuda", dtype=torch.half)

    def run():
        x = x0
        for w in weights:
            h = linear_act(x, w["qkv"])
            y = linear_act(h[:, :d], w["o"], residual=x)
            x = linear_act(linear_act(y, w["up"], activation="gelu"), w["down"], residual=y)
        return x

    return run


def t5_layers(m: int, layers: int = 12):
    """A function running ``layers`` flan-T5-base layers' GEMMs (gated FFN) on an ``(m, 768)`` fp16 input."""
    d, f = 768, 2048
    weights = _weights({"q": (d, d), "o": (d, d), "w0": (f, d), "w1": (f, d), "down": (d, f)}, layers)
    x0 = torch.randn(m, d, device="cuda", dtype=torch.half)

    def run():
        x = x0
        for w in weights:
            y = linear_act(linear_act(x, w["q"]), w["o"], residual=x)
            x = linear_act(gated_linear_act(y, w["w0"], w["w1"], "gelu_tanh"), w["down"], residual=y)
        return x

    return run


def _row(times: dict[bool, list[float]], **fields) -> dict:
    on, off = min(times[True]), min(times[False])
    row = {
        **fields,
        "prefetch ms": round(on, 4),
        "no prefetch ms": round(off, 4),
        "speedup": round(off / on, 3),
    }
    print(row, flush=True)
    return row


def chains() -> list[dict]:
    """Rows for the GEMM chains: T5 layers at M = 1, 8; Bert layers at M = 16, 128, 1024, 4096."""
    rows = []
    for name, make, sizes in (
        ("T5 layers", t5_layers, (1, 8)),
        ("Bert layers", bert_layers, (16, 128, 1024, 4096)),
    ):
        for m in sizes:
            run, times, outputs = make(m), {True: [], False: []}, {}
            for on in SETTINGS:
                _set_prefetch(on)
                run()  # tunes the GEMM configs
                graph, out = captured(run, run, None)
                times[on].append(gpu_ms(graph.replay, reps=100))
                outputs[on] = out.clone()
                del graph
            same = torch.equal(outputs[True], outputs[False])
            rows.append(_row(times, case=f"{name}, 12 x GEMMs, M={m}", same_bits=same))
    return rows


def bert() -> list[dict]:
    """Rows for Bert-base under ``optimize_model`` at (1, 16), (8, 128), (32, 128), (8, 512)."""
    torch.manual_seed(0)
    base = BertModel(BertConfig()).to("cuda", torch.float16).eval()
    rows = []
    for batch, seq in ((1, 16), (8, 128), (32, 128), (8, 512)):
        ids, mask = inputs(batch, seq, base.config.vocab_size)
        times = {True: [], False: []}
        for on in SETTINGS:
            _set_prefetch(on)
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            optimize_model(model)
            with torch.inference_mode():
                for _ in range(3):
                    model(input_ids=ids, attention_mask=mask)
            times[on].append(
                gpu_ms(next(iter(model.kernl_cuda_graphs.captures.values())).graph.replay, reps=100)
            )
            del model
            gc.collect()
        rows.append(_row(times, case=f"Bert-base forward {batch}x{seq} (graph replay)"))
    return rows


def t5() -> list[dict]:
    """Rows for flan-T5-base ``generate()`` at batch 1 and 8 (a fresh compile and capture per setting)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_t5 import NEW_TOKENS, WARM_UP_CALLS, flan_t5_base

    base = flan_t5_base()
    rows = []
    for batch in (1, 8):
        ids, mask = inputs(batch, 128, base.config.vocab_size)
        times, tokens = {True: [], False: []}, {}
        for on in SETTINGS[:2]:  # one round: each setting compiles and captures the model again
            _set_prefetch(on)
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            optimize_model(model)
            generate = functools.partial(
                model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, do_sample=False,
            )  # fmt: skip
            with torch.inference_mode():
                for _ in range(WARM_UP_CALLS):
                    tokens[on] = generate()
                times[on].append(wall_clock_ms(generate, budget_s=1.5, min_reps=5))
            del model, generate
            gc.collect()
        same = torch.equal(tokens[True], tokens[False])
        rows.append(_row(times, case=f"flan-T5-base generate() batch {batch} (wall clock)", same_tokens=same))
    return rows


def main() -> None:
    """Run the parts named on the command line (default: all) and write their rows."""
    parts = sys.argv[1:] or ["chains", "bert", "t5"]
    before = os.environ.get("KERNL_PREFETCH")
    try:
        for part in parts:
            write_results(
                f"weight_prefetch_{part}", {part: {"chains": chains, "bert": bert, "t5": t5}[part]()}
            )
    finally:
        os.environ.pop("KERNL_PREFETCH", None)
        if before is not None:
            os.environ["KERNL_PREFETCH"] = before


if __name__ == "__main__":
    main()
