"""Tuning aid: time (BLOCK_M, BLOCK_N, num_warps, num_stages, splits) on the benchmark shapes (fp16, d 64).

Prints the best config per shape beside the heuristic's. Run on the GPU:
python packages/flash_attention/benchmarks/sweep_flash_attention_config.py
"""

import itertools

import torch

from kernl.flash_attention.launch import LaunchConfig, attention_forward, launch_config
from kernl_testing.benchmarking import median_ms

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


def main() -> None:
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


if __name__ == "__main__":
    main()
