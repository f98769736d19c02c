"""Where the cold first pass of ``kernl bench --stream`` goes (kernl packed, Bert-base fp16, one process).

Fresh Triton and kernl cache folders, then the stream's requests one by one, each synchronised. Prints
the first pass's wall time, the slowest requests (with their shape and how many graphs TorchDynamo had
handed kernl's backend by then), and the time inside: TorchDynamo traces plus kernl's rewrites (the
backend's calls), Triton compilations, GEMM tunings, CUDA-graph warm-ups and captures, speed checks.
Then the CUDA graphs captured and the memory they keep (reserved once the allocator's cache is emptied).
Run: python packages/integration/benchmarks/probe_stream_cold.py --tokenizer DIR [--requests 120]
"""

import argparse
import collections
import time

import torch
from transformers import BertConfig, BertModel

from kernl.integration import backend, cuda_graphs, optimize_model, speed_check
from kernl.integration.bench.stream import corpus, fresh_caches, load_tokenizer, request_stream

spent = collections.Counter()
calls = collections.Counter()


def timed(owner, name: str, label: str) -> None:
    """Add the time of every call of ``owner.name`` to ``spent[label]``."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a folder with Bert's WordPiece tokenizer")
    parser.add_argument("--requests", type=int, default=120)
    args = parser.parse_args()
    fresh_caches()
    import triton.runtime.jit as jit

    import kernl.matmul.tuning as tuning

    timed(backend, "rewrite_graph", "kernl rewrite")
    timed(backend.KernlBackend, "__call__", "backend (rewrite, step graphs)")
    timed(jit.JITFunction, "_do_compile", "triton compile (summed over compile threads)")
    timed(tuning, "_choose", "gemm config choices (new problems; tunings and their compiles inside)")
    timed(cuda_graphs, "captured", "warm-up + capture (all of the above inside)")
    timed(speed_check, "time_both", "speed check timing")
    tokenizer = load_tokenizer(args.tokenizer)
    batches = request_stream(corpus(tokenizer), args.requests, 0, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval().to("cuda", torch.float16)
    batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    report = optimize_model(model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    walls = []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            begin = time.perf_counter()
            model(**batch)
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - begin, tuple(batch["input_ids"].shape), len(report.graphs)))
    first = time.perf_counter() - start
    print(f"first pass {first:.2f} s over {len(batches)} requests")
    for wall, shape, graphs in sorted(walls, reverse=True)[:10]:
        print(f"  {wall:7.3f} s  request {shape[0]}x{shape[1]}  (backend calls so far: {graphs})")
    for label, seconds in spent.most_common():
        print(f"  {label}: {seconds:.2f} s in {calls[label]} calls")
    captures = [getattr(model, n, None) for n in ("kernl_cuda_graphs", "kernl_packed_graphs")]
    graphs = sum(len(g.captures) for g in captures if g is not None)
    torch.cuda.empty_cache()
    kept = (torch.cuda.memory_reserved() - before) / 2**20
    print(f"backend calls (traces) {len(report.graphs)}, CUDA graphs {graphs}, {kept:.0f} MiB kept")
    print(report)


if __name__ == "__main__":
    main()
