"""Tuning aid for the dense attention kernel's launch configs. Two modes:

``tiles`` (default): time (BLOCK_M, BLOCK_N, num_warps, num_stages, splits) on the benchmark shapes
(fp16, d 64, encoder and decode); prints the best config per shape beside the heuristic's.

``candidates``: every load candidate and tile of :data:`CANDIDATES` (pointer loads, tensor descriptors,
descriptors plus warp specialisation) against SDPA's flash backend (and SDPA's own backend choice) with
no mask, at Bert shapes and a long-sequence d-128 shape, causal and not, fp16 and bf16, on HF's
``(B, S, H, D)`` projections viewed as ``(B, H, S, D)``. Kernels are first compiled in parallel worker
processes (Triton's disk cache), then timed one after another in this process; each candidate's output
is compared with SDPA's. Prints one line per case (best candidate, heuristic, SDPA) and a summary per
candidate (geometric mean and minimum of SDPA-flash time / candidate time over the cases); writes
benchmarks/results/<gpu>/flash_attention_candidates.json.

Run on the GPU: python packages/flash_attention/benchmarks/sweep_flash_attention_config.py [tiles | candidates]
(``candidates --jobs N --dtypes float16,bfloat16 --shapes 32x12x512x64,...`` narrow the run).
"""

import argparse
import itertools
import math
import multiprocessing
import os
import sys
import time

import torch
import torch.nn.functional as F

from kernl.flash_attention.launch import LaunchConfig, attention_forward, launch_config
from kernl_testing.benchmarking import median_ms, write_results

ENCODER = [(32, 12, 512, "none"), (16, 12, 1024, "none"), (8, 12, 2048, "none"), (4, 12, 4096, "none"),
           (1, 12, 4096, "none"), (8, 8, 512, "t5")]  # fmt: skip
ENCODER_CONFIGS = [LaunchConfig(*c) for c in (
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 2),
    (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3),
)]  # fmt: skip
DECODE = [(1, 12, 4096), (8, 8, 1024)]


def _time(q, k, v, scale, bias, kpm, cfg):
    try:
        return median_ms(lambda: attention_forward(q, k, v, scale, bias, None, kpm, None, False, cfg))
    except Exception as error:  # out of resources: shared memory or registers
        print(f"    {cfg} failed: {type(error).__name__}")
        return float("inf")


def _report(label, timings, heuristic):
    best = min(timings, key=timings.get)
    print(f"{label:<28} best {tuple(best)} {timings[best] * 1e3:8.1f} us   heuristic {tuple(heuristic)} "
          f"{timings.get(heuristic, float('nan')) * 1e3:8.1f} us", flush=True)  # fmt: skip


def main_tiles() -> None:
    torch.manual_seed(0)
    for b, h, s, kind in ENCODER:
        q, k, v = (torch.randn(b, h, s, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        kpm = torch.arange(s, device="cuda")[None, :] < torch.randint(s // 2, s + 1, (b, 1), device="cuda")
        kpm = kpm if kind in ("bool", "t5") else None
        bias = torch.randn(1, h, s, s, device="cuda", dtype=torch.float16) if kind == "t5" else None
        heuristic = launch_config(b * h, s, s, 64, q.dtype, bias is not None, q.device)
        configs = {heuristic} | set(ENCODER_CONFIGS)
        timings = {cfg: _time(q, k, v, 0.125, bias, kpm, cfg) for cfg in configs}
        _report(f"({b}, {h}, {s}) {kind}", timings, heuristic)
    for b, h, cache in DECODE:
        q = torch.randn(b, h, 1, 64, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(b, h, cache, 64, device="cuda", dtype=torch.float16) for _ in range(2))
        heuristic = launch_config(b * h, 1, cache, 64, q.dtype, False, q.device)
        configs = {heuristic} | {
            LaunchConfig(16, bn, 4, st, splits)
            for bn, st, splits in itertools.product((64, 128), (3,), (4, 8, 16, 32, 64))
            if cache // bn >= splits
        }
        timings = {cfg: _time(q, k, v, 0.125, None, None, cfg) for cfg in configs}
        _report(f"decode ({b}, {h}, {cache})", timings, heuristic)


CASE_SHAPES = [(32, 12, 512, 64), (8, 12, 512, 64), (1, 12, 128, 64), (8, 32, 2048, 128)]
CANDIDATES = {
    f"{'tma_ws' if c.warp_specialize else 'tma' if c.tma else 'ptr'}_{c.block_m}x{c.block_n}_w{c.num_warps}_s{c.num_stages}": c
    for c in (
        LaunchConfig(64, 64, 4, 3), LaunchConfig(128, 64, 8, 3), LaunchConfig(128, 128, 8, 3), LaunchConfig(64, 128, 4, 3),
        LaunchConfig(64, 64, 4, 3, tma=True), LaunchConfig(128, 64, 4, 3, tma=True), LaunchConfig(128, 64, 8, 3, tma=True),
        LaunchConfig(128, 128, 8, 3, tma=True), LaunchConfig(64, 128, 4, 3, tma=True), LaunchConfig(128, 64, 8, 4, tma=True),
        LaunchConfig(128, 128, 8, 2, tma=True),
        LaunchConfig(128, 64, 4, 3, tma=True, warp_specialize=True), LaunchConfig(128, 64, 8, 3, tma=True, warp_specialize=True),
        LaunchConfig(128, 128, 8, 2, tma=True, warp_specialize=True),
    )
}  # fmt: skip
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _case_inputs(shape, dtype):
    """q, k, v as HF passes them: ``(B, S, H, D)`` projections viewed as ``(B, H, S, D)``."""
    batch, heads, seq, head_dim = shape
    g = torch.Generator(device="cuda").manual_seed(seq * 7 + batch)
    return [torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
            for _ in range(3)]  # fmt: skip


def _configs(shape, dtype) -> dict:
    """The candidates of one case: the heuristic's config (``heuristic``) and every CANDIDATES entry."""
    batch, heads, seq, head_dim = shape
    heuristic = launch_config(batch * heads, seq, seq, head_dim, dtype, False, torch.device("cuda"))
    return {"heuristic": heuristic, **CANDIDATES}


def _run(q, k, v, causal, cfg):
    return attention_forward(q, k, v, q.shape[-1] ** -0.5, None, None, None, None, causal, cfg)


def _compile_share(tasks) -> list:
    """Worker process: compile (run once) each (shape, dtype name, causal, candidate name); the failures."""
    failures, inputs = [], {}
    for shape, dtype_name, causal, name in tasks:
        key = (shape, dtype_name)
        if key not in inputs:
            inputs = {key: _case_inputs(shape, DTYPES[dtype_name])}  # one case's tensors at a time
        try:
            _run(*inputs[key], causal, _configs(shape, DTYPES[dtype_name])[name])
            torch.cuda.synchronize()
        except Exception as error:  # out of resources, a lowering Triton cannot do
            failures.append((shape, dtype_name, causal, name, f"{type(error).__name__}: {str(error)[:200]}"))
    return failures


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _time_case(shape, dtype_name, causal, failed, peers) -> dict:
    """One case: each peer's and each candidate's median time, and each candidate's largest difference
    from SDPA's flash output (compile failures recorded, not timed)."""
    q, k, v = _case_inputs(shape, DTYPES[dtype_name])
    batch, heads, seq, head_dim = shape
    flops = 4.0 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    reference = peers["sdpa_flash"](q, k, v, causal).float()
    rec = {"shape": list(shape), "dtype": dtype_name, "causal": causal, "candidates": {}}
    for peer, fn in peers.items():
        rec[f"{peer}_us"] = median_ms(lambda fn=fn: fn(q, k, v, causal), max_reps=100) * 1e3
    for name, cfg in _configs(shape, DTYPES[dtype_name]).items():
        entry = rec["candidates"][name] = {"config": cfg._asdict()}
        if (shape, dtype_name, causal, name) in failed:
            entry["error"] = failed[(shape, dtype_name, causal, name)]
            continue
        error = (_run(q, k, v, causal, cfg).float() - reference).abs().max().item()
        us = median_ms(lambda cfg=cfg: _run(q, k, v, causal, cfg), max_reps=100) * 1e3
        entry.update(us=us, TFLOPs=flops / us / 1e6, max_abs_diff_vs_sdpa=error, matches_sdpa=error <= 2e-2)
    return rec


def main_candidates(argv) -> None:
    parser = argparse.ArgumentParser(prog="sweep_flash_attention_config.py candidates")
    parser.add_argument("--jobs", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in CASE_SHAPES))
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    dtype_names = args.dtypes.split(",")
    cases = [(shape, d, causal) for shape in shapes for d in dtype_names for causal in (False, True)]
    tasks = [(*case, name) for case in cases for name in _configs(case[0], DTYPES[case[1]])]
    started = time.time()
    shares = [tasks[i :: args.jobs] for i in range(args.jobs)]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        failed = {tuple(f[:4]): f[4] for share in pool.map(_compile_share, shares) for f in share}
    print(f"compiled {len(tasks)} kernels in {time.time() - started:.0f} s with {args.jobs} processes; "
          f"{len(failed)} failed", flush=True)  # fmt: skip
    for (shape, dtype_name, causal, name), why in failed.items():
        print(f"  failed: {name} {shape} {dtype_name} causal={causal}: {why}")
    records = []
    peers = {"sdpa_flash": _sdpa("flash"), "sdpa_default": _sdpa(None)}
    print(f"{'case':<34} {'best candidate':<24} {'us':>8} {'heuristic us':>13} {'sdpa_flash us':>14} "
          f"{'sdpa_default us':>16} {'flash/best':>10} {'flash/heur':>10}")  # fmt: skip
    with torch.inference_mode():
        for case in cases:
            rec = _time_case(*case, failed, peers)
            timed = {n: c for n, c in rec["candidates"].items() if "us" in c and c["matches_sdpa"]}
            best = min(timed, key=lambda n: timed[n]["us"])
            heuristic_us = rec["candidates"]["heuristic"].get("us", float("nan"))
            rec["best"] = best
            shape, dtype_name, causal = case
            label = f"{shape} {dtype_name[:4]} {'causal' if causal else 'full'}"
            print(f"{label:<34} {best:<24} {timed[best]['us']:8.1f} {heuristic_us:13.1f} {rec['sdpa_flash_us']:14.1f} "
                  f"{rec['sdpa_default_us']:16.1f} {rec['sdpa_flash_us'] / timed[best]['us']:9.2f}x "
                  f"{rec['sdpa_flash_us'] / heuristic_us:9.2f}x", flush=True)  # fmt: skip
            mismatched = [n for n, c in rec["candidates"].items() if "us" in c and not c["matches_sdpa"]]
            if mismatched:
                print(f"  outputs differ from SDPA's (> 2e-2): {mismatched}")
            records.append(rec)
    summary = {}
    print(f"\n{'candidate':<24} {'geomean flash/candidate':>24} {'min':>6} {'cases':>6}")
    for name in ["heuristic", *CANDIDATES]:
        ratios = [r["sdpa_flash_us"] / r["candidates"][name]["us"] for r in records
                  if "us" in r["candidates"][name] and r["candidates"][name]["matches_sdpa"]]  # fmt: skip
        if ratios:
            geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            summary[name] = {
                "geomean_sdpa_flash_over_candidate": geomean,
                "min": min(ratios),
                "cases": len(ratios),
            }
            print(f"{name:<24} {geomean:23.3f}x {min(ratios):5.2f}x {len(ratios):6d}")
    path = write_results(
        "flash_attention_candidates",
        {"timing": "kernl_testing.benchmarking.median_ms (CUDA events, L2 flushed, after warm-up)",
         "layout": "HF projections (B, S, H, D) viewed as (B, H, S, D), no mask",
         "results": records, "summary": summary, "compile_failures": [list(k) + [v] for k, v in failed.items()],
         "seconds": time.time() - started},
    )  # fmt: skip
    print(f"wrote {path} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["candidates"]:
        main_candidates(sys.argv[2:])
    else:
        main_tiles()
