"""The kernels of one T5 decoder step under kernl: how many, of which kind, and their GPU time.

flan-T5-base shapes (``bench_t5.flan_t5_base``), fp16, batch 1, 128 prompt tokens. The model is
optimized without CUDA graphs and runs transformers' loop, so the profiler sees every kernel; two
``generate()`` calls of 8 and 24 new tokens are profiled and their difference divided by 16: the
prompt's encoder and prefill cancel out, what is left is per step. Programmatic dependent launch is
off (a kernel launched early would count its wait as its own time), and so is the speed check.
Run: python packages/integration/benchmarks/profile_t5_step.py [batch]
"""

import collections
import os
import sys

import torch
from bench_t5 import flan_t5_base

from kernl.integration import optimize_model
from kernl.integration.bench.gpu import inputs

SHORT, LONG = 8, 24


def kernels(model, ids, mask, new_tokens: int) -> collections.Counter:
    """``(launches, us)``, each a Counter by kernel name, of one greedy ``generate()`` call."""
    arguments = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with (
        torch.inference_mode(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
    ):
        model.generate(ids, attention_mask=mask, **arguments)
        torch.cuda.synchronize()
    launches, time_us = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0))
        if total > 0 and not event.key.startswith("ProfilerStep"):
            launches[event.key] += event.count
            time_us[event.key] += total
    return launches, time_us


def main() -> None:
    os.environ["KERNL_PDL"] = "0"
    os.environ["KERNL_CHECK_SPEED"] = "0"  # kernl's path for every signature: its kernels are counted
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    model = flan_t5_base()
    optimize_model(model, cuda_graphs=False)
    model.kernl_decode_loop.enabled = False  # transformers' loop: each step's kernels launched one by one
    ids, mask = inputs(batch, 128, model.config.vocab_size)
    for new_tokens in (SHORT, LONG, SHORT):  # compile every graph first
        kernels(model, ids, mask, new_tokens)
    (short, short_us), (long, long_us) = (kernels(model, ids, mask, n) for n in (SHORT, LONG))
    steps = LONG - SHORT
    rows = sorted(
        (
            (name, (long[name] - short[name]) / steps, (long_us[name] - short_us[name]) / steps)
            for name in long
        ),
        key=lambda row: -row[1],
    )
    rows = [row for row in rows if row[1] > 0.5]
    print(
        f"batch {batch}: {sum(r[1] for r in rows):.0f} kernels a decoder step, {sum(r[2] for r in rows):.0f} us"
    )
    for name, count, us in rows:
        print(f"{count:7.1f} x {us / max(count, 1e-9):6.2f} us  {name[:110]}")


if __name__ == "__main__":
    main()
