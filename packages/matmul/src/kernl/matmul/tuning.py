"""Choosing a launch config: a short candidate list per regime, timed once, remembered on disk.

Regimes: small M (``M <= 64``: decode and batch-1 encoders, weight-read bound; narrow tiles plus
split-K spread the weight read over every SM, once or twice over), and large M (compute-bound tiles,
the persistent TMA kernel first where it can run; split-K only when the tiles alone leave SMs idle).
Ragged N/K use the same tiles with masked (pointer kernel) or zero-filled (TMA) edges. In every
regime, float16/bfloat16 problems also time PyTorch's own ops (:data:`TORCH`, cuBLAS on CUDA:
:mod:`kernl.matmul.torch_path`), and the faster wins.

Each candidate is timed once (CUDA-graph replay, L2 flushed before each). The winner is kept in
memory and on disk (:mod:`kernl.matmul.config_cache`), keyed by dtype, layout and epilogue (gate,
activation, bias, residual) and the shape bucket (batch and M rounded up to a power of two, N and K exact), so a restarted process
skips the timing. A cold tuning whose neighbouring M class (its power of two of M twice or half, else
four times or a quarter; same regime, same everything else) was tuned earlier in the process times only
that class's :data:`NEIGHBOUR_BEST` fastest Triton tiles, fitted to its own M, plus PyTorch's candidate
(``KERNL_TUNING_NEIGHBOURS=0``: the full list every time). Under Triton's interpreter :func:`heuristic`
picks without timing; while a CUDA graph is being captured, a remembered config (memory or disk) is used, else the heuristic (so: tune
with one eager call before capturing). The heuristic always picks a Triton tile. Inside
:func:`deferred_tuning` (a CUDA graph's first warm-up run), a cold float16/bfloat16 problem runs
PyTorch's candidate and is tuned when the block ends, the candidates of every problem met in the block
compiled together.
``KERNL_AUTOTUNE=0`` (or ``false``/``off``/``no``) always uses the heuristic; ``KERNL_TORCH_CANDIDATE=0``
leaves PyTorch's candidate out (its choices are cached under their own keys); ``KERNL_TUNING_LOG=1``
prints every tuning's timings.
"""

import contextlib
import contextvars
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import triton

from kernl.common.launch import sm_count, switched_off
from kernl.matmul.config_cache import TORCH, Config, cache_path, cached_choice, lookup
from kernl.matmul.precompile import precompiled
from kernl.matmul.torch_path import HALF_DTYPES

CACHE_VERSION = 8
MAX_CANDIDATES = 10  # Triton configs a problem (large M); compiling them is most of a tuning's cost
MAX_SMALL_M_CANDIDATES = 12  # small M: the same tiles with split-K over one or two waves of programs
SHARED_MEMORY_BUDGET = 220 * 1024  # H100/H200 allow 227 KB a block; Triton needs a little scratch
SM_SHARED_MEMORY = 228 * 1024  # what the programs on one SM share (each also reserves 1 KB)
# TMA tiles with 128-wide K steps and deep pipelines, tried when 128x128 tiles would not fill the SMs
# once: the whole K range of a 768-wide weight slab is then in flight at once (README, item 4)
NARROW_TMA_TILES = (
    dict(block_m=64, block_n=16, num_stages=6),
    dict(block_m=64, block_n=32, num_stages=6),
    dict(block_m=64, block_n=64, num_stages=5),
    dict(block_m=128, block_n=32, num_stages=5),
    dict(block_m=128, block_n=64, num_stages=4),
)
MAX_TMA_CANDIDATES = 7
# Small M, K at most this: one more candidate reads K whole, without split-K's pass over partials
# (fewer programs than SMs, but for a short K the second pass costs more; README, item 9)
SHORT_K = 1024
SMALL_M = 64  # the small-M regime: M up to this
# A cold tuning whose neighbouring M class (same N, K, dtype, layout, epilogue, regime; see
# neighbour_keys) was tuned in this process times only that class's fastest few Triton tiles, fitted to its own
# M, plus PyTorch's candidate: compiling candidates is most of a cold tuning's cost (README, item 13)
NEIGHBOUR_BEST = 3
NEIGHBOUR_REACH = 2  # how many powers of two of M away a neighbouring class may be


@dataclass(frozen=True, kw_only=True)
class Problem:
    """What the choice of config depends on."""

    batch: int
    m: int
    n: int
    k: int
    dtype: torch.dtype
    precision: str
    a_k_contiguous: bool
    b_k_contiguous: bool
    gated: bool
    tma: bool = False  # the persistent TMA kernel can run it
    activation: str = "none"  # the epilogue's cost and register use change the best tile
    residual: bool = False  # the residual tile loaded in the epilogue needs shared memory too
    bias: bool = False  # PyTorch's candidate fuses a bias (cuBLASLt epilogue) but not every other epilogue

    def key(self, gpu: str) -> str:
        """The config-cache key: everything above, with batch and M rounded up to a power of two."""
        bucket = triton.next_power_of_2
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"v{CACHE_VERSION}|{gpu}|{dtype}|{self.precision}|a{'k' if self.a_k_contiguous else 'm'}"
            f"|b{'k' if self.b_k_contiguous else 'n'}|gate{int(self.gated)}|tma{int(self.tma)}|{self.activation}"
            f"|res{int(self.residual)}|bias{int(self.bias)}"
            f"|B{bucket(self.batch)}|M{bucket(self.m)}|N{self.n}|K{self.k}"
        )


def gpu_name(device: torch.device) -> str:
    """The device's name as a file-name-safe slug (``nvidia-h100-80gb-hbm3``), ``"cpu"`` off CUDA."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _split_for(p: Problem, block_m: int, block_n: int, block_k: int, sms: int, waves: int = 1) -> int:
    """Enough K splits that the tiles fill every SM about ``waves`` times, never more splits than K steps."""
    tiles = p.batch * triton.cdiv(p.m, block_m) * triton.cdiv(p.n, block_n)
    if tiles >= sms:
        return 1
    return max(1, min(waves * sms // tiles, triton.cdiv(p.k, block_k), 32))


def _smem_bytes(p: Problem, c: Config) -> int:
    """Shared memory of one program: the main loop's pipeline, plus what the epilogue stages (the TMA
    kernel's store and residual: 1.5 output blocks, as Triton allocates them (matmul README), over its
    block of ``block_n // epilogue_parts`` columns; the pointer kernel's residual tile)."""
    if c.kernel == "torch":
        return 0
    b_tiles = 2 if p.gated else 1
    pipeline = c.num_stages * (c.block_m + b_tiles * c.block_n) * c.block_k * p.dtype.itemsize
    tile = c.block_m * c.block_n * p.dtype.itemsize
    if c.kernel == "tma":
        return pipeline + (2 + p.residual) * tile // (2 * c.epilogue_parts)
    return pipeline + p.residual * tile


def _fits(p: Problem, c: Config) -> bool:
    """Whether ``c``'s programs fit in shared memory, ``occupancy`` of them on one SM."""
    need = _smem_bytes(p, c)
    return need <= SHARED_MEMORY_BUDGET and c.occupancy * (need + 1024) <= SM_SHARED_MEMORY


def candidates(p: Problem, sms: int, neighbour: list[Config] | None = None) -> list[Config]:
    """The configs worth timing for ``p``, best guesses first: at most :data:`MAX_CANDIDATES` Triton
    tiles (:data:`MAX_SMALL_M_CANDIDATES` for small M), then :data:`TORCH` for float16/bfloat16.

    ``neighbour``: the Triton configs of a tuned neighbouring M class of the same problem, fastest first
    (:func:`neighbour_ranking`); the Triton tiles are then its :data:`NEIGHBOUR_BEST` first, fitted to
    ``p`` (:func:`fitted`), or the full list when none of them fits ``p``."""
    half = p.dtype != torch.float32
    if neighbour:
        configs, limit = [fitted(p, c, sms) for c in neighbour[:NEIGHBOUR_BEST]], NEIGHBOUR_BEST
    elif p.m <= SMALL_M:
        configs, limit = _small_m_candidates(p, sms, half), MAX_SMALL_M_CANDIDATES
    else:
        configs, limit = _large_m_candidates(p, sms, 64 if half else 32), MAX_CANDIDATES
    kept = []
    for c in configs:
        if c.kernel == "tma" and len([k for k in kept if k.kernel == "tma"]) >= MAX_TMA_CANDIDATES:
            continue
        if _worth_timing(p, c, half) and c not in kept:
            kept.append(c)
    if neighbour and not kept:
        return candidates(p, sms)
    triton_configs = kept[:limit] or [heuristic(p, sms)]
    # last, so that a tie keeps the Triton tile (programmatic launch and the weight prefetch, which this
    # isolated timing cannot see, favour it inside a model)
    return triton_configs + ([TORCH] if half and torch_candidate_on() else [])


def _worth_timing(p: Problem, c: Config, half: bool) -> bool:
    """Whether ``c`` can run ``p`` and is not wasted on it: no tile wider than the next power of two of M
    or N, shared memory that fits, no big tile with two accumulators or fp32 operands."""
    limit_m = max(16, triton.next_power_of_2(p.m))
    limit_n = max(16, triton.next_power_of_2(p.n))
    if c.block_m > limit_m or c.block_n > limit_n or not _fits(p, c):
        return False
    if c.kernel == "tma" and not p.tma:
        return False
    # two accumulators, or fp32 operands: the big tiles run out of registers/shared memory
    return not ((p.gated or not half) and c.block_m * c.block_n > 128 * 128)


def fitted(p: Problem, c: Config, sms: int) -> Config:
    """``c`` (a Triton config chosen for another M of ``p``'s regime) for ``p``: small M takes its row
    tile from M (the next power of two, one row of tiles); a pointer-kernel tile at large M recomputes
    its split-K, as the large-M candidates do. The split-K of a small-M tile carries over: with one row
    of tiles, its programs per SM do not depend on M."""
    if p.m <= SMALL_M:
        return replace(c, block_m=max(16, triton.next_power_of_2(p.m)))
    if c.kernel == "ptr":
        return replace(c, split_k=_split_for(p, c.block_m, c.block_n, c.block_k, sms))
    return c


def neighbour_keys(p: Problem, gpu: str) -> list[str]:
    """The cache keys (:func:`cache_key`) of the M classes near ``p``'s in the same regime (small M,
    :data:`SMALL_M`, or large M), nearest first: twice and half its power of two of M, then four times
    and a quarter (:data:`NEIGHBOUR_REACH`). Where a ranking is reused from."""
    bucket = triton.next_power_of_2(p.m)
    small = p.m <= SMALL_M
    near = [m for step in range(1, NEIGHBOUR_REACH + 1) for m in (bucket << step, bucket >> step)]
    return [cache_key(replace(p, m=m), gpu) for m in near if m >= 1 and (m <= SMALL_M) == small]


def neighbour_ranking(
    p: Problem, gpu: str, rankings: dict[str, list[Config]] | None = None
) -> list[Config] | None:
    """The Triton configs timed for a neighbouring M class of ``p`` (:func:`neighbour_keys`), fastest
    first, from ``rankings`` (cache key -> configs; default: this process's tunings), or None: no
    neighbour tuned yet, or ``KERNL_TUNING_NEIGHBOURS=0``."""
    rankings = _rankings if rankings is None else rankings
    if switched_off("KERNL_TUNING_NEIGHBOURS"):
        return None
    return next((rankings[key] for key in neighbour_keys(p, gpu) if rankings.get(key)), None)


def torch_candidate_on() -> bool:
    """Whether PyTorch's candidate is timed (``KERNL_TORCH_CANDIDATE=0``, ``false``, ``off`` or ``no``
    leaves it out: an A/B of the Triton tiles alone inside a model)."""
    return not switched_off("KERNL_TORCH_CANDIDATE")


def cache_key(p: Problem, gpu: str) -> str:
    """``p``'s config-cache key; choices made without PyTorch's candidate are kept apart."""
    return p.key(gpu) + ("" if torch_candidate_on() else "|torch0")


# Small M (block_k for half precision, halved for fp32): narrow tiles, deep pipelines (bytes in flight)
SMALL_M_TILES = (
    dict(block_n=32, block_k=128, num_stages=4),
    dict(block_n=32, block_k=128, num_stages=6),
    dict(block_n=64, block_k=128, num_stages=4),
    dict(block_n=16, block_k=256, num_stages=4),
    dict(block_n=32, block_k=256, num_stages=4),
    dict(block_n=64, block_k=256, num_stages=4),
    dict(block_n=128, block_k=64, num_stages=4),
    dict(block_n=64, block_k=64, num_stages=4),
)
# The first tiles of that list again with split-K over two waves of programs: twice the weight bytes in
# flight per SM, each program's share of K half as long
SMALL_M_TWO_WAVE_TILES = 2


def _small_m_candidates(p: Problem, sms: int, half: bool) -> list[Config]:
    """Weight-read bound: narrow tiles, split-K where tiles are few so that every SM reads a share."""
    bm = max(16, triton.next_power_of_2(p.m))

    def tile(spec: dict, waves: int = 1) -> Config:
        bk = spec["block_k"] if half else spec["block_k"] // 2
        # splits capped by the K steps of the half-precision block_k: each fp32 split keeps at least two
        # of its own (half-width) K steps
        split = _split_for(p, bm, spec["block_n"], spec["block_k"], sms, waves)
        return Config(
            block_m=bm, block_n=spec["block_n"], block_k=bk, split_k=split, num_stages=spec["num_stages"]
        )

    one_wave = [tile(spec) for spec in SMALL_M_TILES]
    two_waves = [tile(spec, waves=2) for spec in SMALL_M_TILES[:SMALL_M_TWO_WAVE_TILES]]
    configs = one_wave[:3] + two_waves + one_wave[3:]
    if p.k <= SHORT_K and configs[0].split_k > 1:
        # the first tile reading a short K whole: no split-K pass, though fewer programs than SMs
        configs.insert(1, replace(configs[0], split_k=1))
    if p.tma and p.batch * triton.cdiv(p.m, bm) * triton.cdiv(p.n, 32) >= sms // 2:
        # the TMA kernel's bulk loads, on the best pointer-kernel tile of the first sweep (no split-K)
        configs.insert(1, Config(kernel="tma", block_m=bm, block_n=32, block_k=128, num_stages=4))
    return configs


# Large M, pointer kernel
LARGE_M_TILES = (
    dict(block_m=128, block_n=128, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=4),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=256, num_warps=8, num_stages=3),
    dict(block_m=256, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=64, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=128, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=256, num_warps=4, num_stages=3),
)
# Persistent TMA tiles by how many 128x128 tiles the output has. Two programs a SM (occupancy): one's
# epilogue overlaps the other's MMAs; the epilogue in halves or quarters (epilogue_parts) stages less in
# shared memory, which makes room for more stages or a second program (README, item 11).
TMA_MANY_TILES = (  # at least two waves of 128x128 tiles
    dict(block_m=128, block_n=256, num_warps=8, num_stages=3, epilogue_parts=2),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3, occupancy=2, epilogue_parts=4),
    dict(block_m=256, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=4),
    dict(block_m=128, block_n=128, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=256, num_warps=8, num_stages=4, epilogue_parts=4),
    dict(block_m=128, block_n=64, num_warps=4, num_stages=3, occupancy=2),
)
TMA_FEW_WAVES = (  # one or two waves of big tiles would leave SMs idle: smaller tiles, two a SM
    dict(block_m=128, block_n=128, num_warps=8, num_stages=4),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3, occupancy=2, epilogue_parts=4),
    dict(block_m=128, block_n=256, num_warps=8, num_stages=3, epilogue_parts=2),
    dict(block_m=128, block_n=64, num_warps=4, num_stages=3, occupancy=2),
    dict(block_m=64, block_n=128, num_warps=4, num_stages=4, occupancy=2),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=4, occupancy=2),
)
TMA_UNDER_A_WAVE = (  # a few hundred rows: after the narrow deep tiles, small tiles two a SM
    dict(block_m=64, block_n=128, num_warps=4, num_stages=4, occupancy=2),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=4, occupancy=2),
)
# (BLOCK_M, BLOCK_N) also tried, with split-K, when 128x128 tiles would leave over half the SMs idle
NARROW_TILES = (dict(block_m=64, block_n=64), dict(block_m=64, block_n=128), dict(block_m=32, block_n=128))


def _large_m_candidates(p: Problem, sms: int, bk: int) -> list[Config]:
    """Compute-bound tiles; the persistent TMA kernel first where it can run."""

    def split(spec: dict) -> int:
        return _split_for(p, spec["block_m"], spec["block_n"], bk, sms)

    configs = [Config(**spec, block_k=bk, split_k=split(spec)) for spec in LARGE_M_TILES]
    tiles_128 = p.batch * triton.cdiv(p.m, 128) * triton.cdiv(p.n, 128)
    if p.tma:
        if tiles_128 >= 2 * sms:
            tma_tiles = TMA_MANY_TILES
        elif tiles_128 >= sms:
            tma_tiles = TMA_FEW_WAVES
        else:
            tma_tiles = TMA_UNDER_A_WAVE
        tma = [Config(kernel="tma", **spec, block_k=bk) for spec in tma_tiles]
        if tiles_128 < sms:  # narrow tiles, K steps of 128, deep pipelines
            tma = [Config(kernel="tma", **spec, block_k=128) for spec in NARROW_TMA_TILES] + tma
        configs = tma + configs
    if tiles_128 < sms // 2:
        # a few hundred rows: narrower tiles and split-K spread the work, after the first guesses
        narrow = [Config(**spec, block_k=bk, split_k=split(spec), num_stages=4) for spec in NARROW_TILES]
        configs = configs[:4] + narrow + configs[4:]
    return configs


def heuristic(p: Problem, sms: int = 132) -> Config:
    """A reasonable Triton config without timing (interpreter, CUDA graph capture, ``KERNL_AUTOTUNE=0``)."""
    bk = 64 if p.dtype != torch.float32 else 32
    if p.m <= SMALL_M:
        bm, bn = max(16, triton.next_power_of_2(p.m)), 64
    elif p.tma and p.batch == 1:
        return Config(kernel="tma", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
    elif p.batch * triton.cdiv(p.m, 128) * triton.cdiv(p.n, 128) >= sms:
        bm, bn = 128, 128
    else:
        bm, bn = 64, 64
    return Config(block_m=bm, block_n=bn, block_k=bk, split_k=_split_for(p, bm, bn, bk, sms))


def describe(c: Config) -> str:
    """A short label of ``c`` for logs and benchmark records, e.g. ``64x128x64/s1/w4/st4/tma/o2/e1``."""
    if c.kernel == "torch":
        return "torch"
    kind = f"/tma/o{c.occupancy}/e{c.epilogue_parts}" if c.kernel == "tma" else ""
    return f"{c.block_m}x{c.block_n}x{c.block_k}/s{c.split_k}/w{c.num_warps}/st{c.num_stages}{kind}"


def _time_ms(launch, config: Config, flush: torch.Tensor) -> float:
    """GPU time of one launch: replayed from a CUDA graph (no Python in the timing), L2 flushed before each."""
    try:
        launch(config)  # compiles, and allocates what the launch keeps (split-K counters)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch(config)
    except Exception as error:  # a config this GPU or Triton version cannot build is skipped
        if os.environ.get("KERNL_TUNING_LOG") == "1":
            print(f"[kernl.matmul tuning] {config} skipped: {type(error).__name__}: {error}", file=sys.stderr)
        return float("inf")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
    graph.replay()
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))[len(starts) // 2]


@dataclass(frozen=True, kw_only=True)
class _Untuned:
    """A problem met on a GPU that neither memory nor the disk cache has a config for."""

    problem: Problem
    device: torch.device
    gpu: str  # gpu_name(device)
    key: str  # cache_key(problem, gpu)
    sms: int
    launch: Callable[[Config], object]  # runs the problem with a config: the call that met it

    def run(self, config: Config) -> object:
        """``launch(config)`` with the problem's GPU current (Triton launches and CUDA graphs act on it)."""
        with torch.cuda.device(self.device):
            return self.launch(config)


_chosen: dict[tuple[Problem, torch.device], Config] = {}
_tuning_seconds = 0.0
_tunings_running = 0
# cache key -> the Triton configs timed in this process, fastest first (neighbour_ranking)
_rankings: dict[str, list[Config]] = {}
_recorders: list[list[Config]] = []
# the problems met in the open deferred_tuning block, by cache key (None: no block open)
_deferred: contextvars.ContextVar[dict[str, _Untuned] | None] = contextvars.ContextVar(
    "kernl_matmul_deferred_tuning", default=None
)


@contextlib.contextmanager
def recorded_choices():
    """Yields a list that receives the config of every GEMM launched in the block, in order (benchmarks
    report which candidate ran)."""
    configs: list[Config] = []
    _recorders.append(configs)
    try:
        yield configs
    finally:
        _recorders.remove(configs)


@contextlib.contextmanager
def deferred_tuning():
    """A block whose GEMM tunings wait for its end, where their candidates compile together.

    Inside, a problem not tuned yet (on a GPU, autotuning on, no capture running, no config in memory
    or on disk) runs PyTorch's candidate (:data:`TORCH`, cuBLAS: nothing to compile), which is not
    remembered, where that candidate can run it (float16/bfloat16, ``KERNL_TORCH_CANDIDATE`` on); other
    problems tune at once, as outside. When the block ends, the problems met in it (one per cache key,
    with the launch of its first call) are tuned: the Triton candidates of all of them compile in one
    thread pool (:func:`precompiled`), rather than one pool per problem, each waiting for its slowest
    compilation; then each problem is timed and its choice kept as a tuning at its launch would have
    (neighbour rankings, memory and disk caches, :func:`tuning_seconds`, ``KERNL_TUNING_LOG``). A
    problem whose neighbouring M class (:func:`neighbour_keys`) was met before it in the block is tuned
    in a later round, after that class, so that it times that class's best as it would have.

    The timing re-runs each problem's first launch: it reads that launch's operands (the record keeps
    them alive) and writes outputs of its own. The block's own results come from cuBLAS, not from the
    configs that later calls use: wrap only runs whose outputs are discarded (the first warm-up run of a
    CUDA graph), so that every result a caller sees comes from the chosen configs. A block inside
    another tunes what it met when it ends, as any block (a CUDA graph warmed up inside another's first
    run is captured before the outer block ends: its second run and capture need the configs); the outer
    block then tunes only what is still untuned. A block that raises tunes nothing: the problems it met
    tune at their next launch.
    """
    met: dict[str, _Untuned] = {}
    token = _deferred.set(met)
    try:
        yield
    finally:
        _deferred.reset(token)
    pending = [u for u in met.values() if lookup(u.key, cache_path(u.gpu)) is None]  # not by an inner block
    for tuning_round in _rounds(pending):
        for untuned, config in zip(tuning_round, _tune(tuning_round), strict=True):
            _remember(untuned, config)


def _rounds(met: list[_Untuned]) -> list[list[_Untuned]]:
    """``met`` (in the order first met) in tuning rounds: a problem goes one round after the latest of
    its neighbouring M classes (:func:`neighbour_keys`) met before it, in the first round without one.
    Neighbours are mutual, so a neighbour met after it comes in a later round: each tuning sees the
    rankings of exactly the classes that a tuning at its launch would have seen."""
    round_of: dict[str, int] = {}
    for untuned in met:
        earlier = [round_of[k] for k in neighbour_keys(untuned.problem, untuned.gpu) if k in round_of]
        round_of[untuned.key] = max(earlier, default=-1) + 1
    rounds: list[list[_Untuned]] = [[] for _ in range(max(round_of.values(), default=-1) + 1)]
    for untuned in met:
        rounds[round_of[untuned.key]].append(untuned)
    return rounds


def _remember(untuned: _Untuned, config: Config) -> None:
    """Keep ``config`` for ``untuned``, in memory and on disk, as a tuning at its launch would have."""
    _chosen[(untuned.problem, untuned.device)] = cached_choice(
        untuned.key, cache_path(untuned.gpu), lambda: config
    )


def _deferrable(untuned: _Untuned) -> bool:
    """Whether ``untuned`` waits for the end of the open :func:`deferred_tuning` block (and is recorded
    there, once per cache key): only where PyTorch's candidate can run it meanwhile."""
    met = _deferred.get()
    if met is None or untuned.problem.dtype not in HALF_DTYPES or not torch_candidate_on():
        return False
    met.setdefault(untuned.key, untuned)
    return True


def choose(p: Problem, device: torch.device, launch) -> Config:
    """The config to run ``p`` with; times the candidates (calling ``launch(config)``) on a cache miss,
    or, inside :func:`deferred_tuning`, runs PyTorch's candidate and times them when the block ends.

    ``KERNL_AUTOTUNE=0`` turns timing off (the heuristic choice is used, kept in memory, not on disk).
    """
    found = _chosen.get((p, device))
    if found is None:
        found = _choose(p, device, launch)
    for configs in _recorders:
        configs.append(found)
    return found


def _choose(p: Problem, device: torch.device, launch) -> Config:
    """``p``'s config on a miss of :data:`_chosen`, kept there unless it stands in for a later choice
    (the CPU's heuristic, a guess inside a capture, PyTorch's candidate inside :func:`deferred_tuning`)."""
    if device.type != "cuda":
        return heuristic(p)
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if switched_off("KERNL_AUTOTUNE"):
        found = heuristic(p, sms)
    else:
        gpu = gpu_name(device)
        key, path = cache_key(p, gpu), cache_path(gpu)
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: remembered, or a guess
            return lookup(key, path) or heuristic(p, sms)
        untuned = _Untuned(problem=p, device=device, gpu=gpu, key=key, sms=sms, launch=launch)
        if lookup(key, path) is None and _deferrable(untuned):
            return TORCH
        found = cached_choice(key, path, lambda: _tune([untuned])[0])
    _chosen[(p, device)] = found
    return found


def _l2_flush(device: torch.device) -> torch.Tensor:
    """A buffer larger than L2 (256 MB), zeroed before each timed launch."""
    return torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)


def _tune(problems: list[_Untuned]) -> list[Config]:
    """Time each problem's candidates (a neighbouring class's best where one was tuned) and return each
    one's fastest, its ranking kept under its key for the neighbours tuned later. The Triton candidates
    of all of them compile first, side by side in one thread pool."""
    global _tuning_seconds, _tunings_running
    start = time.perf_counter()
    _tunings_running += 1
    try:
        neighbours = [neighbour_ranking(u.problem, u.gpu) for u in problems]
        lists = [candidates(u.problem, u.sms, n) for u, n in zip(problems, neighbours, strict=True)]
        pairs = zip(problems, lists, strict=True)
        precompiled([partial(u.run, c) for u, configs in pairs for c in configs if c.kernel != TORCH.kernel])
        flushes: dict[torch.device, torch.Tensor] = {}
        timings = []
        for untuned, configs in zip(problems, lists, strict=True):
            # the capture, events and flush of _time_ms act on the current GPU: make it the problem's (a
            # deferred block may end with another GPU current)
            with torch.cuda.device(untuned.device):
                if untuned.device not in flushes:
                    flushes[untuned.device] = _l2_flush(untuned.device)
                timings.append({c: _time_ms(untuned.run, c, flushes[untuned.device]) for c in configs})
    finally:
        _tunings_running -= 1
        _tuning_seconds += time.perf_counter() - start
    return [_ranked_first(*args) for args in zip(problems, timings, neighbours, strict=True)]


def _ranked_first(untuned: _Untuned, timings: dict[Config, float], neighbour: list[Config] | None) -> Config:
    """The fastest of ``timings``; the Triton configs that ran, fastest first, are kept under
    ``untuned.key`` (:func:`neighbour_ranking`) and logged with ``KERNL_TUNING_LOG=1``."""
    ranked = sorted(timings, key=timings.get)  # stable: a tie keeps the earlier candidate
    _rankings[untuned.key] = [c for c in ranked if c.kernel != TORCH.kernel and timings[c] < float("inf")]
    if os.environ.get("KERNL_TUNING_LOG") == "1":
        listed = ", ".join(f"{describe(c)} {timings[c] * 1e3:.1f}us" for c in ranked)
        source = " (a neighbouring M class's best)" if neighbour else ""
        print(f"[kernl.matmul tuning] {untuned.key}{source}: {listed}", file=sys.stderr)
    return ranked[0]


def tuning_running() -> bool:
    """Whether a GEMM tuning is running now (its compilations are part of :func:`tuning_seconds`)."""
    return _tunings_running > 0


def tuning_seconds() -> float:
    """Wall-clock seconds this process has spent tuning GEMM configs so far (compiling and timing
    candidates), for warm-up breakdowns: the difference between two calls is the tuning in between."""
    return _tuning_seconds
