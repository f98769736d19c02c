"""T5's fp16 overflow guard then its RMS norm: kernl's two ops (guard: flag, scan, clamp; then the norm)
against the fused ``clamped_rms_norm``, each replayed 100 times back to back in one CUDA graph, as a
captured decoder step runs them: the time per call counts the gaps between kernels too.

Run on the GPU: python packages/layernorm/benchmarks/bench_clamped_rms_norm.py
"""

import torch

from kernl.layernorm import clamped_rms_norm, overflow_clamp, rms_norm

CALLS = 100
LIMITS = (torch.finfo(torch.float16).max - 1000, torch.finfo(torch.float16).max)


def per_call_us(step) -> float:
    """GPU time of one ``step()`` in microseconds: ``CALLS`` of them captured in one CUDA graph."""
    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            step()
    graph.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    print(f"{'rows':>6} {'width':>6}  {'guard + norm us':>16}  {'fused us':>9}  ratio")
    for rows in (1, 8, 32, 128, 2048):
        x = torch.randn(rows, 768, device="cuda", dtype=torch.float16)
        weight = torch.rand(768, device="cuda", dtype=torch.float16) + 0.5

        def unfused(x=x, weight=weight):
            guarded = overflow_clamp(x, *LIMITS)
            return rms_norm(guarded, weight, 1e-6), guarded

        def fused(x=x, weight=weight):
            return clamped_rms_norm(x, weight, 1e-6, *LIMITS)

        base, ours = per_call_us(unfused), per_call_us(fused)
        print(f"{rows:>6} {768:>6}  {base:>16.2f}  {ours:>9.2f}  {base / ours:5.2f}x")


if __name__ == "__main__":
    main()
