"""The GPU benchmark: Bert-base (from its config, fp16) over batch x sequence, every engine in one run.

Latency is wall clock of one forward, synchronised, median over repetitions (what a caller waits,
launch overhead included). Warm-up is the time of the first three calls of each shape (compilation,
autotuning, graph capture). Memory: peak allocated over the grid above the weights, and what stays
allocated after the grid (captured graphs, caches).
"""

import copy
import gc
import os
import statistics
import time
from unittest import mock

import torch

from kernl.integration.bench import engines

BATCHES, SEQS = (1, 8, 32), (16, 128, 512)
PEERS = [name for name in engines.ENGINES if name != "kernl"]


def inputs(batch: int, seq: int, vocab: int, device="cuda"):
    """Random ``input_ids`` ``(batch, seq)`` and an all-ones ``attention_mask``, seeded by the shape."""
    generator = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, vocab, (batch, seq), generator=generator).to(device)
    return ids, torch.ones_like(ids)


def wall_clock_ms(fn, budget_s: float = 0.6, min_reps: int = 10, max_reps: int = 200) -> float:
    """Median wall-clock ms of ``fn()`` with a device sync around each call (host work included): at
    least ``min_reps`` calls, then more while under ``budget_s`` seconds, at most ``max_reps``."""
    times = []
    while len(times) < min_reps or sum(times) < budget_s * 1e3 and len(times) < max_reps:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gpu_ms(fn, reps: int = 50) -> float:
    """Median GPU ms of ``fn()`` between CUDA events, queued behind a GPU sleep (host work hidden)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000)  # the host runs ahead: only GPU time between the events
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def latency_ms(forward, ids, mask) -> float:
    """Median wall-clock ms of ``forward(ids, mask)``: what a caller waits, launch overhead included."""
    return wall_clock_ms(lambda: forward(ids, mask))


def run_engine(name, model, shapes, progress, reference=None) -> dict:
    """Warm up and time engine ``name`` at every shape; memory figures in MiB."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    forward = engines.prepare(name, model)
    base = torch.cuda.memory_allocated()
    task = progress.add_task(f"{name}: warm-up + timing", total=len(shapes))
    result = {"shapes": {}}
    for batch, seq in shapes:
        ids, mask = inputs(batch, seq, model.config.vocab_size)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(3):
                out = forward(ids, mask)
            torch.cuda.synchronize()
            warmup = time.perf_counter() - start
            entry = {"warmup_s": round(warmup, 3), "latency_ms": round(latency_ms(forward, ids, mask), 4)}
            if reference is not None:
                expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
                entry["max_abs_diff_vs_hf_sdpa"] = float((hidden.float() - expected.float()).abs().max())
        result["shapes"][f"{batch}x{seq}"] = entry
        progress.advance(task)
    result["warmup_s"] = round(sum(e["warmup_s"] for e in result["shapes"].values()), 2)
    result["peak_mib_above_weights"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    result["kept_mib_after_grid"] = round((torch.cuda.memory_allocated() - base) / 2**20, 1)
    if getattr(forward, "report", None) is not None:
        result["report"] = forward.report.to_dict()
        result["report_text"] = str(forward.report)
    del forward
    return result


def kernels_of_one_forward(model, shape, reps: int = 5) -> list[tuple[str, int, float]]:
    """``(kernel name, launches, us)`` per forward at ``shape``: rewritten graph, no CUDA graph, profiler.

    Programmatic dependent launch is off here: a kernel launched early waits for its predecessor inside
    its own time span, which the profiler would count as that kernel's time."""
    from kernl.integration import optimize_model

    torch._dynamo.reset()
    work = copy.deepcopy(model)
    optimize_model(work, cuda_graphs=False)
    ids, mask = inputs(*shape, model.config.vocab_size)
    with mock.patch.dict(os.environ, KERNL_PDL="0"), torch.inference_mode():
        for _ in range(3):
            work(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                work(input_ids=ids, attention_mask=mask)
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0))
        if total > 0 and not event.key.startswith("ProfilerStep"):
            rows.append((event.key, event.count // reps, total / reps))
    del work
    return sorted(rows, key=lambda row: -row[2])


def kernel_breakdown(model, shape) -> dict[str, float]:
    """Per-kernel-family GPU time (us) of one kernl forward at ``shape`` (rewritten graph, no CUDA graph)."""
    families: dict[str, float] = {}
    for key, _, us in kernels_of_one_forward(model, shape):
        name = key.lower()
        family = next(
            (f for f, keys in _FAMILIES.items() if any(k in name for k in keys)), f"other: {key[:40]}"
        )
        families[family] = families.get(family, 0.0) + us
    return {k: round(v, 1) for k, v in sorted(families.items(), key=lambda kv: -kv[1])}


_FAMILIES = {
    "attention": ("attention", "attn", "flash", "merge"),
    "layer_norm": ("norm",),
    "linear_act (matmul)": ("gemm", "matmul", "linear", "mm_"),
    "embedding / gather": ("embedding", "index", "gather"),
    "copy / elementwise": ("copy", "elementwise", "fill", "cat"),
}


def time_generate(generate, row: dict, name: str, warm_up_calls: int):
    """Time ``generate()`` (a ``model.generate`` call) into ``row``: ``"<name> warm-up calls s"`` (each of the
    first ``warm_up_calls`` calls on its own), then ``"<name> ms"`` (the median wall-clock ms after them);
    ``"<name> error"`` instead when it raises (a peer that fails is reported, not fatal). Returns the
    last warm-up call's output (None when it failed)."""
    output = None
    try:
        row[f"{name} warm-up calls s"] = []
        for _ in range(warm_up_calls):
            start = time.perf_counter()
            output = generate()
            torch.cuda.synchronize()
            row[f"{name} warm-up calls s"].append(round(time.perf_counter() - start, 2))
        row[f"{name} ms"] = wall_clock_ms(generate, budget_s=2.0, min_reps=5)
    except Exception as failure:  # noqa: BLE001 - a peer that fails is reported, not fatal
        row[f"{name} error"] = f"{type(failure).__name__}: {str(failure)[:200]}"
        return None
    return output
