"""The on-disk cache of chosen configs: one JSON file per GPU, shared by every process.

``$KERNL_CACHE_DIR/matmul-<gpu>.json`` (default ``~/.cache/kernl``) maps a problem key (see
:meth:`kernl.matmul.tuning.Problem.key`) to a :class:`Config`'s fields (``{"kernel": "torch", ...}``
with null tile fields for the PyTorch candidate). Writes
take a lock, merge with what is on disk and replace the file atomically; an unreadable file counts as
empty and an entry that is not a launchable config is skipped (and kept in the file); a cache that
cannot be written only costs the re-tuning in the next process.
"""

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: writers merge without a lock
    fcntl = None


@dataclass(frozen=True, kw_only=True)
class Config:
    """One launch configuration: a tile of :func:`kernl.matmul.kernel.gemm_kernel` (``kernel="ptr"``) or
    :func:`kernl.matmul.kernel_tma.gemm_tma_kernel` (``kernel="tma"``), or PyTorch's own ops
    (``kernel="torch"``, :mod:`kernl.matmul.torch_path`: cuBLAS/cuBLASLt on CUDA), which take no tile
    fields (:data:`TORCH`). Built with keywords only."""

    kernel: str = "ptr"  # "ptr": kernel.gemm_kernel; "tma": kernel_tma.gemm_tma_kernel (persistent); "torch"
    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    occupancy: int = 1  # tma: programs per SM
    epilogue_parts: int = 1  # tma: the epilogue finishes block_n // epilogue_parts columns at a time


TORCH = Config(kernel="torch")
KERNELS = ("ptr", "tma", "torch")


def cache_path(gpu: str) -> Path:
    """Where the chosen configs of GPU ``gpu`` (see :func:`kernl.matmul.tuning.gpu_name`) are kept."""
    root = os.environ.get("KERNL_CACHE_DIR") or os.path.join("~", ".cache", "kernl")
    return Path(os.path.expanduser(root)) / f"matmul-{gpu}.json"


_BLOCKS = ("block_m", "block_n", "block_k")
_COUNTS = ("split_k", "group_m", "num_warps", "num_stages", "occupancy", "epilogue_parts")


def launchable(config: Config) -> bool:
    """Whether ``config`` can launch: :data:`TORCH` exactly (no tile fields), or a Triton tile: tiles
    powers of two from 16 to 512, counts positive ints, num_warps a power of two up to 16, at most 8
    stages; TMA: no split-K; epilogue in 1, 2 or 4 column blocks (TMA only), each at least 16 wide."""
    if config.kernel not in KERNELS:
        return False
    if config.kernel == "torch":
        return config == TORCH
    values = [getattr(config, name) for name in _BLOCKS + _COUNTS]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return False
    blocks = values[: len(_BLOCKS)]
    if any(v & (v - 1) or not 16 <= v <= 512 for v in blocks):
        return False  # tile sizes: powers of two a tl.dot takes
    if config.num_warps & (config.num_warps - 1) or config.num_warps > 16 or config.num_stages > 8:
        return False
    if config.kernel == "tma" and config.split_k != 1:
        return False  # the persistent TMA kernel has no split-K
    parts = config.epilogue_parts
    # column blocks of the TMA kernel's epilogue: halves or quarters, 16 wide at least
    return parts in (1, 2, 4) and config.block_n // parts >= 16 and (parts == 1 or config.kernel == "tma")


def _config(fields: object) -> Config | None:
    """``fields`` as a :class:`Config`, or ``None`` when they do not describe a launchable one."""
    if not isinstance(fields, dict):
        return None
    try:
        config = Config(**fields)
    except TypeError:  # unknown or missing fields (another version's entry)
        return None
    return config if launchable(config) else None


def _read_raw(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def read_cache(path: Path) -> dict[str, Config]:
    """The valid configs stored at ``path``; an unreadable file counts as empty, a bad entry is skipped."""
    configs = {key: _config(fields) for key, fields in _read_raw(path).items()}
    return {key: config for key, config in configs.items() if config is not None}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s lock file (POSIX), so that concurrent writers merge in turn."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_cache(path: Path, key: str, config: Config) -> None:
    """Add ``key -> config`` to the file at ``path``, merging with what is there (entries of other
    versions included) under a lock. Failing to write (read-only or missing directory, full disk)
    warns once: the config is still remembered for this process."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = _read_raw(path)
            entries[key] = asdict(config)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)  # shared by every process of the user (mkstemp makes it private)
            os.replace(tmp, path)
            tmp = None
    except OSError as error:
        if path not in _unwritable:
            _unwritable.add(path)
            warnings.warn(f"kernl: cannot write the GEMM config cache {path} ({error}); "
                          "chosen configs are kept for this process only", stacklevel=3)  # fmt: skip
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_unwritable: set[Path] = set()
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
