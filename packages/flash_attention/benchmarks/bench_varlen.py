"""Benchmark kernl's packed (varlen) attention against SDPA, side by side in one run (fp16, 12 heads, d 64).

Cases (Bert-base attention): rows of random lengths (32 rows of 8..512 tokens, 128 rows of 8..128),
equal lengths (32 x 512, the dense (32, 12, 512, 64) call), one long sequence (4096). Peers:
- ``flash_varlen``: PyTorch's FlashAttention-2 varlen kernel on the same packed tokens and offsets
  (``aten._flash_attention_forward`` with ``cu_seqlens``; what SDPA's flash backend runs), when present;
- ``sdpa_flash_same_tokens``: SDPA without a mask on an equal-length batch of the same total tokens
  (``(rows, 12, T // rows, 64)``: fewer FLOPs than the packed rows whenever lengths differ);
- ``sdpa_padded_bool_mask`` / ``sdpa_padded_additive_mask`` (not causal): SDPA on the padded
  ``(rows, 12, longest, 64)`` layout with HF's bool mask ``[B, 1, Q, K]`` / additive ``[B, 1, 1, K]``
  mask, what HF runs without packing;
- ``sdpa_padded_no_mask``: SDPA's flash kernel on the padded layout, padding computed.
TFLOP/s count the packed work, ``4 * H * D * sum(L_i^2)``. Cases of at most 2048 tokens are also timed as
CUDA graph replays. ``sweep`` (argument) also times launch configs.
Writes benchmarks/results/<gpu>/flash_attention_varlen.json.

``buckets`` (argument, alone): the packed encoders' layout at the stream's token buckets. Rows of 8..512
random tokens (1 to 32 rows) in a call padded to its token bucket ``T``; kernl's varlen attention on
``(T, 12, 64)`` with the offsets padded to the packing's row capacity (``row_capacity(T) + 1``, today's
layout) against the layout packing used before, one empty row per bucket token (``T + 1`` offsets,
built here only), the exact offsets on the real tokens alone (no bucket), and FlashAttention-2 varlen on
the real tokens; ``row_capacity_tma`` is the row-capacity layout with the tensor-descriptor load
candidate. Writes flash_attention_varlen_buckets.json.
Run: python packages/flash_attention/benchmarks/bench_varlen.py [sweep | buckets]
"""

import sys

import torch
import torch.nn.functional as F
from bench_flash_attention import record

from kernl.flash_attention import attention_varlen
from kernl.flash_attention.launch import LaunchConfig
from kernl.flash_attention.launch_varlen import attention_varlen_forward, varlen_launch_config
from kernl_testing.benchmarking import median_ms, write_results

HEADS, HEAD_DIM = 12, 64
SWEEP_CONFIGS = [LaunchConfig(*c) for c in (
    (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3),
    (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (128, 32, 4, 3),
    (64, 64, 4, 3, 1, True), (128, 64, 8, 3, 1, True), (128, 128, 8, 3, 1, True), (64, 128, 4, 3, 1, True),
    (128, 64, 4, 3, 1, True),
)]  # fmt: skip


def random_lengths(rows: int, low: int, high: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (rows,), generator=g).tolist()


def flash_varlen(q, k, v, cu_seqlens, longest: int, causal: bool):
    """PyTorch's FlashAttention-2 varlen forward (the kernel behind SDPA's flash backend)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, longest, longest, 0.0, causal, False, scale=HEAD_DIM**-0.5
    )[0]


def packed_case(label: str, lengths: list[int], causal: bool = False) -> dict:
    rows, total, longest = len(lengths), sum(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3))
    kernl_fn = lambda: attention_varlen(q, k, v, cu, causal=causal)
    peers, check = {}, None
    try:
        flash_varlen(q, k, v, cu, longest, causal)
        peers["flash_varlen"] = lambda: flash_varlen(q, k, v, cu, longest, causal)
        check = (kernl_fn, peers["flash_varlen"])
    except (RuntimeError, TypeError) as error:  # no flash varlen kernel in this build
        print(f"flash_varlen unavailable: {type(error).__name__}: {str(error)[:120]}")
    same = torch.randn(rows, HEADS, total // rows, HEAD_DIM, device="cuda", dtype=torch.float16)
    peers["sdpa_flash_same_tokens"] = lambda: F.scaled_dot_product_attention(
        same, same, same, is_causal=causal
    )
    padded = [
        torch.randn(rows, HEADS, longest, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3)
    ]
    kpm = torch.arange(longest, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    if not causal:
        bool_mask = kpm[:, None, None, :].expand(rows, 1, longest, longest)
        additive = torch.zeros(rows, 1, 1, longest, device="cuda", dtype=torch.float16).masked_fill(
            ~kpm[:, None, None, :], torch.finfo(torch.float16).min
        )
        peers["sdpa_padded_bool_mask"] = lambda: F.scaled_dot_product_attention(*padded, attn_mask=bool_mask)
        peers["sdpa_padded_additive_mask"] = lambda: F.scaled_dot_product_attention(
            *padded, attn_mask=additive
        )
    peers["sdpa_padded_no_mask"] = lambda: F.scaled_dot_product_attention(*padded, is_causal=causal)
    pairs = sum(length * length for length in lengths)
    flops = 4.0 * HEADS * HEAD_DIM * pairs / (2 if causal else 1)
    # launch-bound sizes: also timed as CUDA graph replays, as the integration runs them
    graphs = total <= 2048
    rec = record(label, (rows, HEADS, total, longest), kernl_fn, peers, flops, graphs, check)
    return dict(rec, lengths=lengths, causal=causal, tokens=total)


def sweep(label: str, lengths: list[int]) -> dict:
    """Median time of each launch config on one packing; prints the best beside the heuristic's."""
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3))
    heuristic = varlen_launch_config(HEAD_DIM, q.dtype, q.device)
    timings = {}
    for cfg in {heuristic, *SWEEP_CONFIGS}:
        try:
            timings[cfg] = median_ms(lambda cfg=cfg: attention_varlen_forward(q, k, v, cu, 0.125, False, cfg))
        except Exception as error:  # out of resources: shared memory or registers
            print(f"    {tuple(cfg)} failed: {type(error).__name__}")
    best = min(timings, key=timings.get)
    print(f"sweep {label:<24} best {tuple(best)} {timings[best] * 1e3:8.1f} us   heuristic {tuple(heuristic)} "
          f"{timings[heuristic] * 1e3:8.1f} us", flush=True)  # fmt: skip
    return {
        "case": label,
        "heuristic": list(heuristic),
        "timings_ms": {str(tuple(c)): t for c, t in timings.items()},
    }


def padded_offsets(lengths: list[int], rows: int) -> torch.Tensor:
    """int32 cu_seqlens of ``lengths`` padded with empty rows to ``rows + 1`` offsets, on the GPU."""
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return torch.tensor(cu + cu[-1:] * (rows + 1 - len(cu)), dtype=torch.int32, device="cuda")


def bucket_case(rows: int, seed: int) -> dict:
    """One packed call of ``rows`` rows of 8..512 tokens at its token bucket: the row-capacity layout
    against the one-row-per-token layout, the exact offsets and FlashAttention-2 varlen (see the module)."""
    from kernl.integration.packing import row_capacity
    from kernl.integration.token_buckets import DEFAULT_TOKEN_BUCKETS, token_bucket

    lengths = random_lengths(rows, 8, 512, seed)
    tokens = sum(lengths)
    bucket = token_bucket(tokens, DEFAULT_TOKEN_BUCKETS)
    q, k, v = (torch.randn(bucket, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3))
    layouts = {
        "row_capacity": padded_offsets(lengths, row_capacity(bucket)),
        "row_per_token": padded_offsets(lengths, bucket),
    }
    exact = padded_offsets(lengths, rows)
    reference = attention_varlen(q[:tokens], k[:tokens], v[:tokens], exact)
    fns = {name: (lambda cu=cu: attention_varlen(q, k, v, cu)) for name, cu in layouts.items()}
    for name, fn in fns.items():  # same rows, and zeros in the bucket's tail
        out = fn()
        torch.testing.assert_close(out[:tokens], reference, atol=0, rtol=0, msg=name)
        assert not out[tokens:].any(), name
    tma = varlen_launch_config(HEAD_DIM, q.dtype, q.device)._replace(tma=True)
    cu = layouts["row_capacity"]
    torch.testing.assert_close(
        attention_varlen_forward(q, k, v, cu, HEAD_DIM**-0.5, False, tma)[:tokens], reference
    )
    fns["row_capacity_tma"] = lambda: attention_varlen_forward(q, k, v, cu, HEAD_DIM**-0.5, False, tma)
    fns["exact_tokens"] = lambda: attention_varlen(q[:tokens], k[:tokens], v[:tokens], exact)
    fns["flash_varlen_exact"] = lambda: flash_varlen(
        q[:tokens], k[:tokens], v[:tokens], exact, max(lengths), False
    )
    rec = {"rows": rows, "tokens": tokens, "bucket": bucket, "lengths": lengths}
    for name, fn in fns.items():
        try:
            rec[f"{name}_us"] = median_ms(fn) * 1e3
        except (RuntimeError, TypeError) as error:  # no flash varlen kernel in this build
            print(f"{name} unavailable: {type(error).__name__}: {str(error)[:120]}")
    rec["row_per_token_over_row_capacity"] = rec["row_per_token_us"] / rec["row_capacity_us"]
    print(f"rows {rows:>3} tokens {tokens:>6} bucket {bucket:>6}  "
          + "  ".join(f"{n} {rec[f'{n}_us']:9.1f} us" for n in fns if f"{n}_us" in rec)
          + f"  old/new x{rec['row_per_token_over_row_capacity']:.2f}", flush=True)  # fmt: skip
    return rec


def main_buckets() -> None:
    """The ``buckets`` comparison (see the module docstring), written to flash_attention_varlen_buckets.json."""
    records = []
    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16, 32):
            for seed in range(3):
                records.append(bucket_case(rows, 100 * rows + seed))
    write_results(
        "flash_attention_varlen_buckets",
        {"dtype": "float16", "heads": HEADS, "head_dim": HEAD_DIM,
         "timing": "kernl_testing.benchmarking.median_ms (CUDA events, L2 flushed, after warm-up)",
         "results": records},
    )  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    cases = {
        "random_32x8..512": random_lengths(32, 8, 512, seed=1),
        "random_128x8..128": random_lengths(128, 8, 128, seed=2),
        "equal_32x512": [512] * 32,
        "single_4096": [4096],
        "equal_8x128": [128] * 8,
    }
    records, sweeps = [], []
    with torch.inference_mode():
        for label, lengths in cases.items():
            records.append(packed_case(label, lengths))
        records.append(packed_case("random_32x8..512_causal", cases["random_32x8..512"], causal=True))
        if "sweep" in sys.argv[1:]:
            for label in ("random_32x8..512", "equal_32x512", "single_4096"):
                sweeps.append(sweep(label, cases[label]))
    write_results(
        "flash_attention_varlen",
        {"dtype": "float16", "heads": HEADS, "head_dim": HEAD_DIM,
         "timing": "kernl_testing.benchmarking.median_ms (CUDA events, L2 flushed, after warm-up)",
         "results": records, "sweep": sweeps},
    )  # fmt: skip


if __name__ == "__main__":
    main_buckets() if "buckets" in sys.argv[1:] else main()
