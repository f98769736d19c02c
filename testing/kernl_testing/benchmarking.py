"""Shared benchmark plumbing: CUDA-event timing, result files under benchmarks/results/<gpu>/, charts.

Every benchmark compares kernl with what a user would otherwise call, in the same run, on random
data, and records GPU times (median over CUDA events, see :func:`median_ms`), the ratio
peer_time / kernl_time, and where it matters the host-side cost per call (:func:`host_us_per_call`).
"""

import argparse
import json
import os
import platform
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_projection_arguments(
    parser: argparse.ArgumentParser, models: Sequence[str], m_values: Sequence[int]
) -> argparse.Namespace:
    """Add ``--models`` (comma-separated, of ``models``) and ``--m`` (comma-separated row counts, by
    default ``m_values``) to ``parser`` and parse the command line: ``models`` as a list of names,
    ``m`` as a list of ints. An unknown model name exits with a message naming ``--models``."""
    known = ", ".join(models)
    parser.add_argument("--models", default=",".join(models), help="comma-separated, of " + known)
    parser.add_argument("--m", default=",".join(map(str, m_values)), help="comma-separated row counts")
    args = parser.parse_args()
    args.models = args.models.split(",")
    if unknown := set(args.models) - set(models):
        raise SystemExit(f"--models: unknown {sorted(unknown)}; known: {known}")
    args.m = [int(m) for m in args.m.split(",")]
    return args


def gpu_slug() -> str:
    """Short folder name for the current GPU, e.g. ``nvidia-h100-80gb-hbm3``."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 100, max_reps: int = 300) -> float:
    """Median GPU time of ``fn()`` in milliseconds.

    As ``triton.testing.do_bench``: CUDA events around each call, after warm-up, with the L2 cache
    flushed before each call. In addition a ~0.2 ms GPU sleep is queued before each timed call, so the
    host's Python and launch overhead runs ahead instead of showing up as idle GPU time: the figure is
    what the GPU spends, as under CUDA graphs. Measure the host side with :func:`host_us_per_call`.
    """
    import triton.testing

    estimate_ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=10, return_mode="median")
    reps = max(10, min(max_reps, int(rep_ms / max(estimate_ms, 1e-3))))
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        torch.cuda._sleep(400_000)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return float(torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]).median())


def host_us_per_call(fn, calls: int = 200) -> float:
    """Wall-clock microseconds per call of ``fn()`` issued back to back (the host-side cost)."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def environment() -> dict:
    """The software and hardware a result was measured on."""
    import transformers
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def results_dir() -> Path:
    """``benchmarks/results/<gpu>/``, created on demand."""
    path = REPO_ROOT / "benchmarks" / "results" / gpu_slug()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, payload: dict) -> Path:
    """Write ``<name>.json`` (with the environment added); copy it to ``$OUT`` when that is set."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    _export(path)
    return path


def save_figure(figure, name: str) -> Path:
    """Save a matplotlib figure as ``<name>.png`` beside the JSON results."""
    path = results_dir() / f"{name}.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    _export(path)
    return path


def target_chart(records: list[dict], title: str):
    """Bar chart of ``speedup_vs_torch`` per record (``group: case`` labels), red where ``met`` is False,
    with each record's ``target_speedup`` drawn as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(records) * 0.45), 4.5))
    colors = ["tab:green" if r.get("met", True) else "tab:red" for r in records]
    ax.bar(range(len(records)), [r["speedup_vs_torch"] for r in records], color=colors)
    for i, r in enumerate(records):
        if "target_speedup" in r:
            ax.plot([i - 0.4, i + 0.4], [r["target_speedup"]] * 2, color="black", linewidth=1.5)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(
        range(len(records)), [f"{r['group']}: {r['case']}" for r in records], rotation=80, fontsize=7
    )
    ax.set_ylabel("torch time / kernl time (black: target)")
    ax.set_title(title)
    return fig


def _export(path: Path) -> None:
    out = os.environ.get("OUT")
    if out:
        target = Path(out) / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
