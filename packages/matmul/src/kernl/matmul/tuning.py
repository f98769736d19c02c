"""Choosing a launch config: a short candidate list per regime, timed once, remembered on disk.

Regimes: small M (``M <= 64``: decode and batch-1 encoders, weight-read bound; narrow tiles plus
split-K spread the weight read over every SM), and large M (compute-bound tiles, the persistent TMA
kernel first where it can run; split-K only when the tiles alone leave SMs idle). Ragged N/K use
the same tiles with masked (pointer kernel) or zero-filled (TMA) edges.

Each candidate is timed once (CUDA-graph replay, L2 flushed before each). The winner is kept in
memory and on disk (:mod:`kernl.matmul.config_cache`), keyed by dtype, layout, gating, activation and
the shape bucket (batch and M rounded up to a power of two, N and K exact), so a restarted process
skips the timing. Under Triton's interpreter :func:`heuristic` picks without timing; while a CUDA
graph is being captured, a remembered config (memory or disk) is used, else the heuristic (so: tune
with one eager call before capturing).
``KERNL_AUTOTUNE=0`` (or ``false``/``off``/``no``) always uses the heuristic; ``KERNL_TUNING_LOG=1``
prints every tuning's timings.
"""

import os
import re
import sys
from dataclasses import dataclass, replace

import torch
import triton

from kernl.common.launch import sm_count, switched_off
from kernl.matmul.config_cache import Config, cache_path, cached_choice, lookup

CACHE_VERSION = 7
MAX_CANDIDATES = 10
SHARED_MEMORY_BUDGET = 220 * 1024  # H100/H200 allow 227 KB a block; Triton needs a little scratch
SM_SHARED_MEMORY = 228 * 1024  # what the programs on one SM share (each also reserves 1 KB)
# (BLOCK_M, BLOCK_N) also tried, with split-K, when 128x128 tiles would be few
NARROW_TILES = ((64, 64), (64, 128), (32, 128))
# (BLOCK_M, BLOCK_N, num_stages) of the TMA kernel, BLOCK_K 128, tried when 128x128 tiles would not fill
# the SMs once: the whole K range of a 768-wide weight slab in flight at once (H100, M=128: 768->768
# 9.0 -> 7.4 us, 3072->768 14.2 -> 11.7; M=512 768->3072 + gelu 15.1 -> 14.3; M=1024 3072->768
# 21.2 -> 18.7 with 128x64)
NARROW_TMA_TILES = ((64, 16, 6), (64, 32, 6), (64, 64, 5), (128, 32, 5), (128, 64, 4))
MAX_TMA_CANDIDATES = 7
# Small M, K at most this: one more candidate without split-K (H100, M=1 768->768: 7.8 -> 6.8 us, cuBLAS
# 6.9; gated 768->2048: 10.1 -> 9.7 us; at K=2048 split-K stays ahead, 9.0 against 9.4 us)
SHORT_K = 1024


@dataclass(frozen=True)
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

    def key(self, gpu: str) -> str:
        """The config-cache key: everything above, with batch and M rounded up to a power of two."""
        bucket = triton.next_power_of_2
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"v{CACHE_VERSION}|{gpu}|{dtype}|{self.precision}|a{'k' if self.a_k_contiguous else 'm'}"
            f"|b{'k' if self.b_k_contiguous else 'n'}|gate{int(self.gated)}|tma{int(self.tma)}|{self.activation}"
            f"|res{int(self.residual)}"
            f"|B{bucket(self.batch)}|M{bucket(self.m)}|N{self.n}|K{self.k}"
        )


def gpu_name(device: torch.device) -> str:
    """The device's name as a file-name-safe slug (``nvidia-h100-80gb-hbm3``), ``"cpu"`` off CUDA."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _split_for(p: Problem, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """Enough K splits that the tiles fill every SM about once, never more splits than K steps."""
    tiles = p.batch * triton.cdiv(p.m, block_m) * triton.cdiv(p.n, block_n)
    if tiles >= sms:
        return 1
    return max(1, min(sms // tiles, triton.cdiv(p.k, block_k), 32))


def _smem_bytes(p: Problem, c: Config) -> int:
    """Shared memory of one program: the main loop's pipeline, plus what the epilogue stages (the TMA
    kernel's store and residual: 1.5 output blocks, measured 245,784 bytes for a 128x256 tile with a
    residual and 3 stages on an H100, over its block of ``block_n // epilogue_parts`` columns; the
    pointer kernel's residual tile)."""
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


def candidates(p: Problem, sms: int) -> list[Config]:
    """At most :data:`MAX_CANDIDATES` configs worth timing for ``p``, best guesses first."""
    half = p.dtype != torch.float32
    bk = 64 if half else 32
    if p.m <= 64:
        # Weight-read bound: narrow tiles, deep pipelines (bytes in flight), split-K where tiles are few.
        bm = max(16, triton.next_power_of_2(p.m))
        shapes = [(32, 128, 4), (32, 128, 6), (64, 128, 4), (16, 256, 4), (32, 256, 4), (64, 256, 4),
                  (128, 64, 4), (64, 64, 4)]  # fmt: skip
        configs = [
            Config(bm, bn, k if half else k // 2, _split_for(p, bm, bn, k, sms), 8, 4, st)
            for bn, k, st in shapes
        ]
        if p.k <= SHORT_K and configs[0].split_k > 1:
            # the first tile reading a short K whole: no split-K pass, though fewer programs than SMs
            configs.insert(1, replace(configs[0], split_k=1))
        if p.tma and p.batch * triton.cdiv(p.m, bm) * triton.cdiv(p.n, 32) >= sms // 2:
            # the TMA kernel's bulk loads, on the best pointer-kernel tile of the first sweep (no split-K)
            configs.insert(1, Config(bm, 32, 128, 1, 8, 4, 4, "tma"))
    else:
        tiles = [(128, 128, 4, 3), (128, 128, 8, 4), (64, 64, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                 (128, 64, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3)]  # fmt: skip
        configs = [Config(bm, bn, bk, _split_for(p, bm, bn, bk, sms), 8, w, s) for bm, bn, w, s in tiles]
        tiles_128 = p.batch * triton.cdiv(p.m, 128) * triton.cdiv(p.n, 128)
        if p.tma:  # persistent TMA tiles first (two a SM: one's epilogue overlaps the other's MMAs)
            # (BLOCK_M, BLOCK_N, warps, stages, programs a SM, epilogue parts): the epilogue in halves or
            # quarters stages less in shared memory, which makes room for more stages or a second program
            # (H100, M=16384 768->3072 + gelu: 128x128 two a SM in quarters 189 us, against 204-219 us)
            if tiles_128 >= 2 * sms:
                tma = [(128, 256, 8, 3, 1, 2), (128, 128, 8, 3, 2, 4), (256, 128, 8, 3, 1, 1), (128, 128, 8, 4, 1, 1),
                       (128, 128, 4, 4, 1, 1), (128, 256, 8, 4, 1, 4), (128, 64, 4, 3, 2, 1)]  # fmt: skip
            elif tiles_128 >= sms:  # a few waves of big tiles would leave SMs idle: smaller tiles, two a SM
                tma = [(128, 128, 8, 4, 1, 1), (128, 128, 8, 3, 2, 4), (128, 256, 8, 3, 1, 2), (128, 64, 4, 3, 2, 1),
                       (64, 128, 4, 4, 2, 1), (64, 64, 4, 4, 2, 1)]  # fmt: skip
            else:  # a few hundred rows: the narrow deep tiles below first, then small tiles two a SM
                tma = [(64, 128, 4, 4, 2, 1), (64, 64, 4, 4, 2, 1)]
            tma = [Config(bm, bn, bk, 1, 8, w, s, "tma", o, e) for bm, bn, w, s, o, e in tma]
            if tiles_128 < sms:  # narrow tiles, K steps of 128, deep pipelines
                tma = [Config(bm, bn, 128, 1, 8, 4, s, "tma") for bm, bn, s in NARROW_TMA_TILES] + tma
            configs = tma + configs
        if tiles_128 < sms // 2:
            # 128x128 tiles would leave over half the SMs idle (a few hundred rows): narrower tiles and
            # split-K spread the work, after the first guesses of the regular list
            narrow = [Config(bm, bn, bk, _split_for(p, bm, bn, bk, sms), 8, 4, 4) for bm, bn in NARROW_TILES]
            configs = configs[:4] + narrow + configs[4:]
    limit_m = max(16, triton.next_power_of_2(p.m))
    limit_n = max(16, triton.next_power_of_2(p.n))
    kept = []
    for c in configs:
        if c.kernel == "tma" and len([k for k in kept if k.kernel == "tma"]) >= MAX_TMA_CANDIDATES:
            continue
        if c.block_m > limit_m or c.block_n > limit_n or not _fits(p, c):
            continue
        if (p.gated or not half) and c.block_m * c.block_n > 128 * 128:
            continue  # two accumulators, or fp32 operands: the big tiles run out of registers/shared memory
        if c not in kept:
            kept.append(c)
    return kept[:MAX_CANDIDATES] or [heuristic(p, sms)]


def heuristic(p: Problem, sms: int = 132) -> Config:
    """A reasonable config without timing (interpreter, CUDA graph capture, ``KERNL_AUTOTUNE=0``)."""
    bk = 64 if p.dtype != torch.float32 else 32
    if p.m <= 64:
        bm, bn = max(16, triton.next_power_of_2(p.m)), 64
    elif p.tma and p.batch == 1:
        return Config(128, 128, 64, 1, 8, 8, 4, "tma")
    elif p.batch * triton.cdiv(p.m, 128) * triton.cdiv(p.n, 128) >= sms:
        bm, bn = 128, 128
    else:
        bm, bn = 64, 64
    return Config(bm, bn, bk, _split_for(p, bm, bn, bk, sms), 8, 4, 3)


def _short(c: Config) -> str:
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


_chosen: dict[tuple[Problem, torch.device], Config] = {}


def choose(p: Problem, device: torch.device, launch) -> Config:
    """The config to run ``p`` with; times the candidates (calling ``launch(config)``) on a cache miss.

    ``KERNL_AUTOTUNE=0`` turns timing off (the heuristic choice is used, kept in memory, not on disk).
    """
    found = _chosen.get((p, device))
    if found is None:
        found = _choose(p, device, launch)
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            _chosen[(p, device)] = found
    return found


def _choose(p: Problem, device: torch.device, launch) -> Config:
    if device.type != "cuda":
        return heuristic(p)
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if switched_off("KERNL_AUTOTUNE"):
        return heuristic(p, sms)
    gpu = gpu_name(device)
    if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: a remembered config or a guess
        return lookup(p.key(gpu), cache_path(gpu)) or heuristic(p, sms)

    def tune() -> Config:
        flush = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)  # 256 MB, > L2
        timings = {c: _time_ms(launch, c, flush) for c in candidates(p, sms)}
        best = min(timings, key=timings.get)
        if os.environ.get("KERNL_TUNING_LOG") == "1":
            ranked = ", ".join(
                f"{_short(c)} {timings[c] * 1e3:.1f}us" for c in sorted(timings, key=timings.get)
            )
            print(f"[kernl.matmul tuning] {p.key(gpu)}: {ranked}", file=sys.stderr)
        return best

    return cached_choice(p.key(gpu), cache_path(gpu), tune)
