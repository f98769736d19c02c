"""Shared benchmark plumbing: CUDA-event timing, result files under benchmarks/results/<gpu>/, charts.

Every benchmark compares kernl with what a user would otherwise call, in the same run, on random
data, and records times (median of ``triton.testing.do_bench``) and the ratio peer_time / kernl_time.
"""

import json
import os
import platform
import re
import shutil
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def gpu_slug() -> str:
    """Short folder name for the current GPU, e.g. ``nvidia-h100-80gb-hbm3``."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds, from CUDA events, after warm-up, with L2 flushed."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


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


def _export(path: Path) -> None:
    out = os.environ.get("OUT")
    if out:
        target = Path(out) / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
