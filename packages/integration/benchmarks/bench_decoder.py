"""Decoder-only models on kernl: prefill latency and generate() decode speed, against Hugging Face in one run.

Models (random weights, fp16, built on the GPU): a Llama-3.2-1B-shaped model (hidden 2048, 16 layers,
32 heads, 8 key/value heads, FFN 8192, vocabulary 128256, tied embeddings) and GPT-2 124M.
Prefill: wall-clock latency of ``model(input_ids)`` (a key/value cache returned, as by default) at
1x512 and 8x512, HF sdpa against kernl (``--compile-prefill`` adds ``torch.compile`` of the same call,
slow to compile). Decode: ``generate()`` greedy, 128 prompt tokens, 64 new, at batch 1 and 8, HF with
its default dynamic cache, HF with ``cache_implementation="static"`` (transformers compiles the decoder
step with ``torch.compile``), kernl (a static cache by default, kernl's own decode loop: chunks of steps
per CUDA graph launch, no host read per token) and kernl with transformers' loop (the same model with
``kernl_decode_loop.enabled = False``: each decoder step replayed from its CUDA graph, transformers'
Python and a host read between steps); decode tokens/s from the difference between 64 new tokens and 1
(the prefill and the first token), and the fraction of the HBM floor that is: the parameter bytes one
step reads, over the device-to-device copy bandwidth measured here. Same greedy tokens: kernl's against
HF's static cache and against kernl's with transformers' loop; each row says which loop kernl's calls ran
(the report's ``generate_loops``).
Writes benchmarks/results/<gpu>/decoder_<model>.{json,png}.
Run: python packages/integration/benchmarks/bench_decoder.py [--model llama|gpt2] [--part prefill|decode]
[--compile-prefill] [--engines kernl "kernl, transformers' loop" ...]; with one part, the files are
decoder_<model>_<part>.{json,png}; with some engines, decoder_<model>_<part>_some.{json,png}.
"""

import argparse
import copy
import functools
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kernl.integration import optimize_model
from kernl.integration.bench.gpu import inputs, wall_clock_ms
from kernl_testing.benchmarking import save_figure, write_results

PREFILL_SHAPES = [(1, 512), (8, 512)]
DECODE_BATCHES = [1, 8]
PROMPT_TOKENS, NEW_TOKENS = 128, 64
# generate() calls before timing a size: kernl compiles the decoder step in the first (the prefill
# allocates the static cache) and runs its loop's chunk of steps as the capture's warm-up, compiles the
# prefill in the second (the cache is reused) and captures the chunk, captures the prefill in the third;
# HF's static cache compiles its step in the first
WARM_UP_CALLS = 3
GENERATE_ENGINES = {
    "HF dynamic cache": {},
    "HF static cache + torch.compile": {"cache_implementation": "static"},
    "kernl, transformers' loop": {},
    "kernl": {},
}
KERNL_ENGINES = ("kernl", "kernl, transformers' loop")


def llama_1b() -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return _built(LlamaForCausalLM, config)


def gpt2_124m() -> torch.nn.Module:
    return _built(GPT2LMHeadModel, GPT2Config(pad_token_id=0))


def _built(model_class, config) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float16).eval()
    return model


MODELS = {"llama": ("Llama-3.2-1B shape", llama_1b), "gpt2": ("GPT-2 124M", gpt2_124m)}


def copy_bandwidth_gb_s() -> float:
    """Device-to-device copy bandwidth (bytes read plus bytes written per second) of a 1 GiB copy."""
    source = torch.empty(2**29, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters (tied ones once): what one decoder step reads at least."""
    unique = {p.data_ptr(): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values())


def timed_calls(fn, calls: int) -> list[float]:
    """Seconds of each of ``calls`` calls of ``fn()``, synchronised."""
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - start, 2))
    return seconds


def prefill_rows(engines: dict, vocab: int) -> list[dict]:
    rows = []
    for batch, seq in PREFILL_SHAPES:
        ids, _ = inputs(batch, seq, vocab)
        row = {"batch": batch, "seq": seq}
        for name, forward in engines.items():
            call = functools.partial(forward, input_ids=ids)
            row[f"{name} warm-up calls s"] = timed_calls(call, 2)
            row[f"{name} ms"] = wall_clock_ms(call, budget_s=0.5, min_reps=5)
        peer = min(row[f"{n} ms"] for n in engines if n != "kernl")
        row["kernl / best peer"] = round(peer / row["kernl ms"], 3)
        print(row, flush=True)
        rows.append(row)
    return rows


def decode_rows(models: dict, vocab: int, floor_step_ms: float) -> list[dict]:
    """One row per batch size: each engine of ``models`` (name -> model) timed, and whether the tokens
    agree."""
    rows = []
    for batch in DECODE_BATCHES:
        ids, mask = inputs(batch, PROMPT_TOKENS, vocab)
        row = {"batch": batch, "prompt": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
        tokens = {}
        for name, model in models.items():
            if name in KERNL_ENGINES:
                model.kernl_decode_loop.enabled = name == "kernl"
            generate = functools.partial(
                model.generate, input_ids=ids, attention_mask=mask, do_sample=False, **GENERATE_ENGINES[name]
            )
            full = functools.partial(generate, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            first = functools.partial(generate, max_new_tokens=1, min_new_tokens=1)
            try:
                row[f"{name} warm-up calls s"] = timed_calls(full, WARM_UP_CALLS) + timed_calls(first, 2)
                tokens[name] = full()
                full_ms = wall_clock_ms(full, budget_s=1.0, min_reps=3)
                first_ms = wall_clock_ms(first, budget_s=0.3, min_reps=3)
            except Exception as failure:  # noqa: BLE001 - a peer that fails is reported, not fatal
                row[f"{name} error"] = f"{type(failure).__name__}: {str(failure)[:200]}"
                continue
            step_ms = (full_ms - first_ms) / (NEW_TOKENS - 1)
            row[f"{name} generate ms"] = round(full_ms, 2)
            row[f"{name} decode tokens/s"] = round(batch * 1e3 / step_ms, 1)
            row[f"{name} fraction of HBM floor"] = round(floor_step_ms / step_ms, 3)
        peer = "HF static cache + torch.compile"
        if peer in tokens and "kernl" in tokens:
            row["same tokens as HF static cache"] = bool(torch.equal(tokens[peer], tokens["kernl"]))
            row["kernl / HF static + compile (decode)"] = round(
                row["kernl decode tokens/s"] / row[f"{peer} decode tokens/s"], 3
            )
        if all(name in tokens for name in KERNL_ENGINES):
            row["kernl's loop: same tokens as transformers' loop"] = bool(
                torch.equal(tokens["kernl"], tokens["kernl, transformers' loop"])
            )
        kernl = next((models[name] for name in KERNL_ENGINES if name in models), None)
        if kernl is not None:  # which loop each of kernl's engines ran, and why (every call so far)
            row["kernl loops"] = kernl.kernl_report.generate_loops.get("greedy", [])
        print(row, flush=True)
        rows.append(row)
    return rows


def chart(results: dict, title: str):
    """Two panels: prefill speedup over HF sdpa; decode tokens/s per engine and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (prefill, decode) = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = results["prefill"]
    engines = [n.removesuffix(" ms") for n in (rows or [{}])[0] if n.endswith(" ms") and n != "HF sdpa ms"]
    for index, engine in enumerate(engines):
        ratios = [row["HF sdpa ms"] / row[f"{engine} ms"] for row in rows]
        width = 0.8 / len(engines)
        bars = prefill.bar([i + index * width for i in range(len(rows))], ratios, width, label=engine)
        prefill.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios], fontsize=7)
    prefill.set_xticks(range(len(rows)), [f"{row['batch']} x {row['seq']}" for row in rows])
    prefill.set_ylabel("prefill speedup over HF sdpa")
    prefill.legend(fontsize=8)
    runs = results["decode"]
    engines = [engine for engine in GENERATE_ENGINES if any(f"{engine} generate ms" in row for row in runs)]
    width = 0.8 / max(1, len(engines))
    for index, engine in enumerate(engines):
        rates = [row.get(f"{engine} decode tokens/s", 0.0) for row in runs]
        bars = decode.bar(
            [i + (index - (len(engines) - 1) / 2) * width for i in range(len(runs))],
            rates,
            width,
            label=engine,
        )
        decode.bar_label(bars, labels=[f"{r:.0f}" if r else "failed" for r in rates], fontsize=7)
    decode.set_xticks(range(len(runs)), [f"batch {row['batch']}" for row in runs])
    decode.set_ylabel(f"decode tokens/s ({PROMPT_TOKENS} in, {NEW_TOKENS} out, greedy)")
    decode.legend(fontsize=8)
    figure.suptitle(f"{title} (random weights, fp16): kernl against Hugging Face")
    figure.tight_layout()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="llama")
    parser.add_argument("--compile-prefill", action="store_true", help="also torch.compile the prefill")
    parser.add_argument("--part", choices=["prefill", "decode", "both"], default="both")
    parser.add_argument(
        "--engines", nargs="+", choices=list(GENERATE_ENGINES), default=list(GENERATE_ENGINES),
        help="the generate() engines to time (default: all)",
    )  # fmt: skip
    options = parser.parse_args()
    chosen = options.engines
    parts = ["prefill", "decode"] if options.part == "both" else [options.part]
    title, build = MODELS[options.model]
    model = build()
    bandwidth = copy_bandwidth_gb_s()
    floor_step_ms = weight_bytes(model) / (bandwidth * 1e9) * 1e3
    print(f"{title}: {weight_bytes(model) / 1e9:.2f} GB of weights, copy {bandwidth:.0f} GB/s, "
          f"HBM floor {floor_step_ms:.3f} ms a decoder step", flush=True)  # fmt: skip
    kernl = copy.deepcopy(model)
    report = optimize_model(kernl)
    prefill_engines = {"HF sdpa": model, "kernl": kernl}
    if options.compile_prefill:
        prefill_engines["torch.compile"] = torch.compile(copy.deepcopy(model).forward, dynamic=False)
    generate_models = {name: kernl if name in KERNL_ENGINES else model for name in chosen}
    results = {"prefill": [], "decode": []}
    with torch.inference_mode():
        if "prefill" in parts:
            results["prefill"] = prefill_rows(prefill_engines, model.config.vocab_size)
        if "decode" in parts:
            results["decode"] = decode_rows(generate_models, model.config.vocab_size, floor_step_ms)
    print(report)
    payload = {
        "model": f"{title}, random weights, fp16",
        "weight GB": round(weight_bytes(model) / 1e9, 3),
        "copy bandwidth GB/s": round(bandwidth, 1),
        "HBM floor ms a step": round(floor_step_ms, 4),
        **results,
        "kernl report": report.to_dict(),
    }
    name = f"decoder_{options.model}" + ("" if options.part == "both" else f"_{options.part}")
    name += "" if set(chosen) == set(GENERATE_ENGINES) else "_some"
    write_results(name, payload)
    save_figure(chart(results, title), name)


if __name__ == "__main__":
    main()
