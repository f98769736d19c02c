"""Tuning aid: where the time of a small GEMM goes (GPU time, Python launch cost, the timing floor).

For a few small-M cases prints: do_bench's median (L2 flushed, as the benchmarks report), the same
call replayed from a CUDA graph (GPU time only), the CPU time of one eager call, and the floor that
do_bench measures for an empty Triton kernel. Run: python packages/matmul/benchmarks/probe_overhead.py
"""

import time

import torch
import torch.nn.functional as F
import triton

from kernl.linear_act import TORCH_ACTIVATIONS, linear_act
from kernl_testing.benchmarking import median_ms


@triton.jit
def _empty(X):
    pass


def graph_ms(fn, reps: int = 20) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph, L2 flushed before each replay."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def cpu_us(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    x = torch.empty(16, device="cuda")
    empty = lambda: _empty[(1,)](x)
    print(f"empty triton kernel: do_bench {median_ms(empty) * 1e3:.1f} us, graph {graph_ms(empty) * 1e3:.1f} us, "
          f"cpu {cpu_us(empty):.1f} us")  # fmt: skip
    for m, k, n, act in [
        (16, 768, 2304, None),
        (16, 768, 3072, "gelu"),
        (16, 3072, 768, None),
        (1, 512, 2048, "relu"),
    ]:
        a = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        ours = lambda a=a, w=w, b=b, act=act: linear_act(a, w, b, act)
        torch_fn = lambda a=a, w=w, b=b, act=act: TORCH_ACTIVATIONS[act or "none"](F.linear(a, w, b))
        ours()
        cells = []
        for name, fn in (("kernl", ours), ("torch", torch_fn)):
            cells.append(
                f"{name}: do_bench {median_ms(fn) * 1e3:6.1f} us, graph {graph_ms(fn) * 1e3:6.1f} us, "
                f"cpu {cpu_us(fn):6.1f} us"
            )
        weight_us = 2 * n * k / 2.9e12 * 1e6
        print(
            f"M={m} {k}->{n} {act}: " + " | ".join(cells) + f" | weight read at 2.9 TB/s {weight_us:.1f} us"
        )


if __name__ == "__main__":
    main()
