"""The on-disk cache of chosen configs: one JSON file per GPU, shared by every process.

``$KERNL_CACHE_DIR/matmul-<gpu>.json`` (default ``~/.cache/kernl``) maps a problem key (see
:meth:`kernl.matmul.tuning.Problem.key`) to a :class:`~kernl.matmul.tuning.Config`'s fields. Writes
merge with what is on disk and replace the file atomically; an unreadable file counts as empty.
"""

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    """One launch configuration of :func:`kernl.matmul.kernel.gemm_kernel`."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "ptr"  # "ptr": kernel.gemm_kernel; "tma": kernel_tma.gemm_tma_kernel (persistent)
    occupancy: int = 1  # tma: programs per SM


def cache_path(gpu: str) -> Path:
    """Where the chosen configs of GPU ``gpu`` (see :func:`kernl.matmul.tuning.gpu_name`) are kept."""
    root = os.environ.get("KERNL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kernl")
    return Path(root) / f"matmul-{gpu}.json"


def read_cache(path: Path) -> dict[str, Config]:
    """The configs stored at ``path`` (an unreadable or foreign file counts as empty)."""
    try:
        raw = json.loads(path.read_text())
        return {key: Config(**fields) for key, fields in raw.items()}
    except (OSError, ValueError, TypeError):
        return {}


def write_cache(path: Path, key: str, config: Config) -> None:
    """Add ``key -> config`` to the file at ``path`` (merging with what another process wrote)."""
    entries = {k: asdict(v) for k, v in read_cache(path).items()}
    entries[key] = asdict(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


_memory: dict[str, Config] = {}
_loaded: set[Path] = set()


def lookup(key: str, path: Path) -> Config | None:
    """The config remembered for ``key``, from memory or (once per process) from ``path``."""
    if path not in _loaded:
        _loaded.add(path)
        for k, v in read_cache(path).items():
            _memory.setdefault(k, v)
    return _memory.get(key)


def cached_choice(key: str, path: Path, tune) -> Config:
    """The remembered config for ``key``; on a miss, ``tune()`` picks one, which is then remembered."""
    found = lookup(key, path)
    if found is None:
        found = _memory[key] = tune()
        write_cache(path, key, found)
    return found
