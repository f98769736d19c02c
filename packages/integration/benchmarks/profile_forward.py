"""Where one kernl Bert-base forward spends its time: host work, graph replay, and each kernel.

For each shape prints: the wall time of a full ``model(...)`` call (what ``kernl bench`` reports), the
wall time of replaying its captured CUDA graph alone, the GPU time of that replay (CUDA events), and
the kernels of one forward (rewritten graph without CUDA graph, profiler): count and mean time each.
The gap between call and replay is host work (bucketing, capture lookup, weight-address check, input
and output copies; the Python functions that take it are listed, from cProfile); the gap between
replay GPU time and the kernels' sum is launch spacing inside the graph.
Run: python packages/integration/benchmarks/profile_forward.py [BxS ...]   (default 1x16 1x128 32x512)
"""

import copy
import cProfile
import gc
import pstats
import sys

import torch
from transformers import BertConfig, BertModel

from kernl.integration import optimize_model
from kernl.integration.bench.gpu import gpu_ms, inputs, kernels_of_one_forward, wall_clock_ms


def host_breakdown(call, calls: int = 200, top: int = 8) -> None:
    """Print the Python functions that take the most host time per call (own time, cProfile).

    Each call is followed by a device sync, so waiting on the GPU shows up as ``synchronize``, not
    inside whichever launch found the queue full."""

    def synchronised():
        call()
        torch.cuda.synchronize()

    profiler = cProfile.Profile()
    profiler.runcall(lambda: [synchronised() for _ in range(calls)])
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (file, line, name), (_, _, own, cumulative, _) in rows:
        print(
            f"   host {own / calls * 1e6:6.1f} us own {cumulative / calls * 1e6:6.1f} us total  "
            f"{name} ({file.rsplit('/', 1)[-1]}:{line})"
        )


def profile(base, batch: int, seq: int) -> None:
    """Print the call / replay / kernel split of one kernl forward at ``(batch, seq)``."""
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    optimize_model(model)
    ids, mask = inputs(batch, seq, base.config.vocab_size)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        call = wall_clock_ms(lambda: model(input_ids=ids, attention_mask=mask))
    graph = next(iter(model.kernl_cuda_graphs.captures.values())).graph
    replay_wall, replay_gpu = wall_clock_ms(graph.replay), gpu_ms(graph.replay)
    rows = kernels_of_one_forward(base, (batch, seq))
    kernels = sum(us for _, _, us in rows) / 1e3
    print(f"== {batch}x{seq}: call {call:.3f} ms | replay wall {replay_wall:.3f} ms | replay GPU "
          f"{replay_gpu:.3f} ms | kernels {kernels:.3f} ms in {sum(n for _, n, _ in rows)} launches")  # fmt: skip
    with torch.inference_mode():
        host_breakdown(lambda: model(input_ids=ids, attention_mask=mask))
    for name, count, us in rows[:12]:
        print(f"   {count:4d} x {us / max(count, 1):8.1f} us  {name[:60]}")


def main() -> None:
    shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1:]] or [(1, 16), (1, 128), (32, 512)]
    torch.manual_seed(0)
    base = BertModel(BertConfig()).to("cuda", torch.float16).eval()
    for batch, seq in shapes:
        profile(base, batch, seq)
        gc.collect()


if __name__ == "__main__":
    main()
