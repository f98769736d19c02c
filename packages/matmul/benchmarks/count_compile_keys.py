"""How many Triton kernels a cold process compiles to tune Bert-base's GEMMs over a token-bucket ladder.

CPU only: no kernel is compiled or timed. For each token bucket (the packed path's, from
``kernl.integration.token_buckets``, or ``--buckets``) and each Bert-base projection (fp16, stacked
Q/K/V + bias, out-projection + bias + residual, FFN up + bias + GELU, FFN down + bias + residual), the
tuner's candidates (:func:`kernl.matmul.tuning.candidates`, neighbour reuse included) are mapped to
their compile keys (:mod:`kernl.matmul.compile_keys`, on an H100: ``--sms 132``, programmatic launch).
Prints the tunings, the candidates timed and the distinct compile keys, with the neighbours' rankings
stood in for by the guess order (the GPU's timing decides the real ones; at most ``NEIGHBOUR_BEST``
new keys a reused tuning either way).

Run: python packages/matmul/benchmarks/count_compile_keys.py [--order ascending|stream] [--sms 132]
     [--buckets 16,32,...] [--largest 2496]
"""

import argparse
from dataclasses import dataclass

import torch

from kernl.matmul.compile_keys import tuned_compile_keys
from kernl.matmul.tuning import Problem

# The token buckets of the first pass of ``kernl bench --stream`` (120 requests, seed 0), in the order
# they were first seen on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3/stream.json)
STREAM_ORDER = (1792, 1280, 656, 336, 464, 128, 176, 912, 96, 2496, 64, 48, 240, 32, 16)


@dataclass(frozen=True)
class Projection:
    """One Bert-base GEMM: its output and input widths and its epilogue."""

    name: str
    n: int
    k: int
    activation: str = "none"
    residual: bool = False


BERT_BASE = (
    Projection("qkv", 2304, 768),
    Projection("out", 768, 768, residual=True),
    Projection("ffn up", 3072, 768, activation="gelu"),
    Projection("ffn down", 768, 3072, residual=True),
)


def bert_problems(m: int) -> list[Problem]:
    """Bert-base's four projections at ``m`` packed tokens, fp16, as ``kernl.linear_act`` poses them on
    an H100 (a K-contiguous activation, an ``nn.Linear`` weight, a bias; the TMA kernel can run)."""
    return [
        Problem(
            batch=1,
            m=m,
            n=proj.n,
            k=proj.k,
            dtype=torch.float16,
            precision="tf32",
            a_k_contiguous=True,
            b_k_contiguous=True,
            gated=False,
            tma=True,
            activation=proj.activation,
            residual=proj.residual,
            bias=True,
        )
        for proj in BERT_BASE
    ]


def count(buckets, sms: int = 132) -> dict:
    """Tunings, candidates timed and distinct compile keys for ``buckets`` (token counts, in call order)."""
    problems = [p for m in buckets for p in bert_problems(m)]
    per_problem = tuned_compile_keys(problems, sms)
    tunings = [keys for keys in per_problem if keys]
    return {
        "buckets": len(buckets),
        "tunings": len(tunings),
        "triton_candidates": sum(len(keys) for keys in tunings),
        "distinct_compile_keys": len(set().union(*per_problem)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", choices=("ascending", "stream"), default="stream")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--buckets", help="comma-separated token counts (default: the packed path's)")
    parser.add_argument("--largest", type=int, default=2496, help="the largest bucket counted")
    args = parser.parse_args()
    if args.buckets:
        buckets = [int(b) for b in args.buckets.split(",")]
    elif args.order == "stream":
        buckets = list(STREAM_ORDER)
    else:
        from kernl.integration.token_buckets import DEFAULT_TOKEN_BUCKETS

        buckets = [b for b in DEFAULT_TOKEN_BUCKETS if b <= args.largest]
    print(f"buckets {buckets}")
    print(count(buckets, args.sms))


if __name__ == "__main__":
    main()
