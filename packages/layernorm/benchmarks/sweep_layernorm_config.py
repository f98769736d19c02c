"""Tuning aid: time (BLOCK_M, num_warps) candidates at M=16384 and compare with the heuristic.

Each candidate is a fresh compilation (~2 s): keep the grid small.

Run on the GPU: python packages/layernorm/benchmarks/sweep_layernorm_config.py
"""

import itertools

import torch
import triton

from kernl.layernorm.kernel import launch_config, norm_forward
from kernl_testing.benchmarking import median_ms


def main() -> None:
    for m, n, fused in itertools.product((16384,), (768, 4096), (False, True)):
        x = torch.randn(m, n, device="cuda", dtype=torch.float16)
        r = torch.randn_like(x) if fused else None
        w, b = (
            torch.ones(n, device="cuda", dtype=torch.float16),
            torch.zeros(n, device="cuda", dtype=torch.float16),
        )
        block_n = triton.next_power_of_2(n)
        timings = {}
        for block_m, warps in itertools.product((1, 2, 4, 8), (4, 8, 16)):
            if block_m * block_n > 65536 or block_m * block_n < 32 * warps:
                continue
            cfg = (block_m, block_n, warps)
            timings[cfg] = median_ms(
                lambda x=x, w=w, b=b, r=r, cfg=cfg: norm_forward(x, w, b, r, 1e-5, False, x.dtype, cfg)
            )
        best = min(timings, key=timings.get)
        chosen = launch_config(m, n, x.device)
        print(
            f"M={m:<6} N={n:<6} fused={fused!s:<5} best {best} {timings[best] * 1e3:7.1f} us   "
            f"heuristic {chosen} {timings.get(chosen, float('nan')) * 1e3:7.1f} us"
        )


if __name__ == "__main__":
    main()
