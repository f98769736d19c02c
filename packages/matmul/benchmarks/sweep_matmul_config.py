"""Tuning aid: time the tuner's candidates and a wider grid on the shapes that matter, on the GPU.

Prints, per shape, every config's GPU time (CUDA-graph replay, L2 flushed; fastest first), whether it is among the tuner's
candidates, and what torch (cuBLAS plus the activation as separate ops) takes for the same product, so the candidate lists in
kernl/matmul/tuning.py can be checked against the best found.
Run: python packages/matmul/benchmarks/sweep_matmul_config.py [--quick] [label substring ...]
(``--quick``: the tuner's candidates only; substrings pick shapes.)
"""

import dataclasses
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

from kernl.matmul import Config, gemm
from kernl.matmul.launch import input_precision
from kernl.matmul.tuning import Problem, _split_for, _time_ms, candidates, sm_count

# (label, M, K, N, activation, gated[, residual])
SHAPES = [
    ("bert M=16 768->2304 bias", 16, 768, 2304, "none", False),
    ("bert M=16 3072->768", 16, 3072, 768, "none", False),
    ("t5 M=1 512->2048 gated", 1, 512, 2048, "gelu_tanh", True),
    # flan-T5-base's decoder step at batch 1: Q / output projections, fused QKV, gated FFN, FFN out
    ("t5 decode M=1 768->768", 1, 768, 768, "none", False),
    ("t5 decode M=1 768->2304", 1, 768, 2304, "none", False),
    ("t5 decode M=1 768->2048 gated", 1, 768, 2048, "gelu_tanh", True),
    ("t5 decode M=1 2048->768", 1, 2048, 768, "none", False),
    ("bert M=128 768->768", 128, 768, 768, "none", False),
    ("bert M=128 768->2304", 128, 768, 2304, "none", False),
    ("bert M=128 3072->768", 128, 3072, 768, "none", False),
    ("bert M=128 768->3072 gelu", 128, 768, 3072, "gelu", False),
    ("bert M=512 768->2304", 512, 768, 2304, "none", False),
    ("bert M=512 3072->768", 512, 3072, 768, "none", False),
    ("bert M=512 768->768", 512, 768, 768, "none", False),
    ("bert M=512 768->3072 gelu", 512, 768, 3072, "gelu", False),
    ("bert M=1024 768->768", 1024, 768, 768, "none", False),
    ("bert M=1024 768->2304", 1024, 768, 2304, "none", False),
    ("bert M=1024 768->3072 gelu", 1024, 768, 3072, "gelu", False),
    ("bert M=1024 3072->768", 1024, 3072, 768, "none", False),
    ("bert M=4096 768->768", 4096, 768, 768, "none", False),
    ("bert M=4096 768->2304", 4096, 768, 2304, "none", False),
    ("bert M=4096 768->3072 gelu", 4096, 768, 3072, "gelu", False),
    ("bert M=4096 3072->768", 4096, 3072, 768, "none", False),
    ("bert M=16384 768->2304", 16384, 768, 2304, "none", False),
    ("bert M=16384 768->3072", 16384, 768, 3072, "none", False),
    ("bert M=16384 768->3072 gelu", 16384, 768, 3072, "gelu", False),
    ("bert M=16384 3072->768", 16384, 3072, 768, "none", False),
    # Bert's output projections add the residual in the epilogue (its staging needs shared memory)
    ("bert M=1024 3072->768 res", 1024, 3072, 768, "none", False, True),
    ("bert M=4096 768->768 res", 4096, 768, 768, "none", False, True),
    ("bert M=4096 3072->768 res", 4096, 3072, 768, "none", False, True),
    ("bert M=16384 768->768 res", 16384, 768, 768, "none", False, True),
    ("bert M=16384 3072->768 res", 16384, 3072, 768, "none", False, True),
    ("t5 M=16384 768->3072 gated", 16384, 768, 3072, "gelu_tanh", True),
]


def wider_grid(p: Problem, sms: int) -> list[Config]:
    if p.m <= 64:
        bm = max(16, triton.next_power_of_2(p.m))
        grid = []
        for bn, bk in itertools.product((16, 32, 64, 128), (64, 128, 256)):
            split = _split_for(p, bm, bn, bk, sms)
            grid += [Config(block_m=bm, block_n=bn, block_k=bk, split_k=s) for s in {split, split * 2}]
        # no split-K (no second pass over partials), fewer warps a program, deeper pipelines
        for bn, bk, warps, stages in itertools.product((16, 32, 64), (128, 256), (2, 4), (3, 4)):
            grid.append(Config(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages))
        if p.tma:  # the TMA kernel (no split-K): narrow tiles, the whole K range of a slab in flight
            grid += [
                Config(kernel="tma", block_m=bm, block_n=bn, block_k=128, num_stages=6) for bn in (16, 32, 64)
            ]
        return grid
    tiles = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
             (128, 128, 64, 4, 3), (128, 128, 64, 4, 4), (128, 128, 64, 4, 5), (128, 128, 64, 8, 3),
             (128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 256, 32, 8, 4), (64, 256, 64, 4, 3),
             (128, 64, 64, 4, 4), (256, 64, 64, 4, 4), (128, 256, 64, 4, 3)]  # fmt: skip
    grid = [
        Config(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles
    ]
    if p.tma:
        tma = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
               (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 5), (128, 128, 128, 8, 3),
               (128, 256, 128, 8, 2), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 4, 3)]  # fmt: skip
        grid += [
            Config(kernel="tma", block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tma
        ]
        # several small tiles a SM, so that the tile count fills whole waves of programs
        grid += [Config(kernel="tma", block_m=bm, block_n=bn, block_k=64, num_stages=s, occupancy=o) for bm, bn, s, o in (
            (64, 128, 2, 3), (64, 128, 3, 2), (128, 64, 2, 3), (64, 64, 3, 3), (64, 64, 2, 5), (64, 256, 2, 2),
            (128, 128, 2, 2), (128, 64, 3, 2))]  # fmt: skip
        if p.batch * triton.cdiv(p.m, 128) * triton.cdiv(p.n, 128) < sms:  # few big tiles: narrow ones
            for bm, bn, bk in itertools.product((64, 128), (16, 32, 64), (64, 128)):
                grid += [
                    Config(kernel="tma", block_m=bm, block_n=bn, block_k=bk, num_stages=stages)
                    for stages in ((4, 6) if bk == 64 else (3, 4))
                ]
    return grid


def _torch_op(x, w, w2, activation, residual):
    """What a user would write: cuBLAS through ``F.linear``, then the activation (and gate, residual) as
    torch ops."""
    y = F.linear(x, w)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    y = y * F.linear(x, w2) if w2 is not None else y
    return y + residual if residual is not None else y


def main(quick: bool, picks: list[str]) -> None:
    sms = sm_count(0)
    flush = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")
    report = {}
    for label, m, k, n, activation, gated, *residual in SHAPES:
        if picks and not any(pick in label for pick in picks):
            continue
        x = torch.randn(1, m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
        w2 = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 if gated else None
        r = torch.randn(m, n, device="cuda", dtype=torch.float16) if residual and residual[0] else None
        p = Problem(batch=1, m=m, n=n, k=k, dtype=torch.float16, precision=input_precision(torch.float16, False),
                    a_k_contiguous=True, b_k_contiguous=True, gated=gated, tma=not gated, activation=activation,
                    residual=r is not None)  # fmt: skip
        tuned = candidates(p, sms)
        grid = list(dict.fromkeys(tuned + ([] if quick else wider_grid(p, sms))))
        b2 = w2.t() if gated else None
        launch = lambda cfg, x=x, w=w, b2=b2, act=activation, r=r: gemm(
            x, w.t()[None], b2=b2, residual=r, activation=act, config=cfg
        )
        timings = {cfg: _time_ms(launch, cfg, flush) for cfg in grid}
        timings = {cfg: ms for cfg, ms in timings.items() if ms != float("inf")}
        ranked = sorted(timings, key=timings.get)
        torch_ms = _time_ms(
            lambda cfg, x=x[0], w=w, w2=w2, act=activation, r=r: _torch_op(x, w, w2, act, r), None, flush
        )
        print(
            f"== {label}: best {ranked[0]} {timings[ranked[0]] * 1e3:.1f} us; torch {torch_ms * 1e3:.1f} us"
        )
        for cfg in ranked[:12]:
            print(f"   {timings[cfg] * 1e3:8.1f} us  {'cand' if cfg in tuned else '    '}  {cfg}")
        best_candidate = min((c for c in tuned if c in timings), key=timings.get)
        print(f"   best candidate {best_candidate} {timings[best_candidate] * 1e3:.1f} us")
        report[label] = [[torch_ms * 1e3, "torch composition", {}]] + [
            [timings[c] * 1e3, c in tuned, dataclasses.asdict(c)] for c in ranked
        ]
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "matmul_sweep.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main("--quick" in sys.argv, [a for a in sys.argv[1:] if a != "--quick"])
