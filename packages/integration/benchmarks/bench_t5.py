"""T5 on kernl: the encoder forward and greedy ``generate()``, against Hugging Face in the same run.

flan-T5-base shapes (d_model 768, 12 heads, d_ff 2048, gated gelu_new, 12 + 12 layers), random
weights, fp16. Encoder: wall-clock latency of ``model.encoder(...)`` (host work included, as a user
sees it) for HF (sdpa), HF with ``torch.compile(mode="reduce-overhead")`` and kernl, at batch x tokens
{1x128, 8x128, 8x512, 32x512}. Generation: ``generate()``, 128 input tokens, 32 new tokens, greedy at
batch 1 and 8 and beam search (4 beams) at batch 1: HF with its default dynamic cache, HF with
``cache_implementation="static"`` (transformers compiles the decoder step with
``torch.compile(mode="reduce-overhead")``), kernl (encoder and decoder on kernl, static cache by
default; greedy runs kernl's own decode loop, chunks of steps per CUDA graph launch) and kernl with
transformers' loop (the same model with ``kernl_decode_loop.enabled = False``: each decoder step
replayed from its CUDA graph, transformers' Python and a host read between steps). Each warm-up call is timed on its own (``... warm-up calls s``).
Writes benchmarks/results/<gpu>/t5.json and t5.png. Run: python packages/integration/benchmarks/bench_t5.py
(``--generate-only``: the generate() rows alone, printed, nothing written).
"""

import copy
import functools
import sys
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

from kernl.integration import optimize_model
from kernl.integration.bench.gpu import inputs, time_generate, wall_clock_ms
from kernl_testing.benchmarking import save_figure, write_results

ENCODER_SHAPES = [(1, 128), (8, 128), (8, 512), (32, 512)]
GENERATE_SHAPES = [(1, 128, 1), (8, 128, 1), (1, 128, 4)]  # batch, prompt tokens, beams
NEW_TOKENS = 32
# generate() calls before timing: kernl compiles the encoder and the decoder step in the model's first,
# the prefill (the first call that reuses a static cache) in its second, which also recaptures the step
# whose weights the prefill's stacked projections moved (a later size's cache is allocated up front: one
# call); HF's static cache compiles in the first.
WARM_UP_CALLS = 3
# generate() engines: name -> extra generate() arguments (kernl: its defaults, a static cache)
GENERATE_ENGINES = {
    "HF dynamic cache": {},
    "HF static cache + torch.compile": {"cache_implementation": "static"},
    "kernl, transformers' loop": {},
    "kernl": {},
}
KERNL_ENGINES = ("kernl", "kernl, transformers' loop")


def flan_t5_base() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval().to("cuda", torch.float16)
    with torch.no_grad():  # greedy decoding that never stops early: no pad or end-of-sequence token
        model.lm_head.weight[:2] = -1
    return model


def encoder_engines(model):
    """name -> (model, warm-up seconds): HF, HF + torch.compile reduce-overhead, kernl."""
    compiled = copy.deepcopy(model)
    compiled.encoder.forward = torch.compile(compiled.encoder.forward, mode="reduce-overhead")
    kernl = copy.deepcopy(model)
    optimize_model(kernl)
    return {"HF sdpa": model, "torch.compile reduce-overhead": compiled, "kernl": kernl}


def chart(results: dict):
    """Two panels: encoder speedup over HF per engine and shape; generate() speedup per cache kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (encoder, generate) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    rows = results["encoder"]
    engines = [name.removesuffix(" ms") for name in rows[0] if name.endswith(" ms") and name != "HF sdpa ms"]
    for index, engine in enumerate(engines):
        ratios = [row["HF sdpa ms"] / row[f"{engine} ms"] for row in rows]
        bars = encoder.bar([i + (index - 0.5) * 0.4 for i in range(len(rows))], ratios, 0.4, label=engine)
        encoder.bar_label(bars, labels=[f"{r:.1f}x" for r in ratios], fontsize=7)
    encoder.set_xticks(range(len(rows)), [f"{row['batch']} x {row['seq']}" for row in rows])
    encoder.set_ylabel("encoder speedup over Hugging Face (sdpa)")
    encoder.legend(fontsize=8, loc="upper left")
    encoder.set_ylim(top=encoder.get_ylim()[1] * 1.25)  # room for the legend above the bars
    runs = results["generate"]
    width = 0.8 / (len(GENERATE_ENGINES) - 1)
    for index, engine in enumerate(list(GENERATE_ENGINES)[1:]):
        ratios = [row["HF dynamic cache ms"] / row.get(f"{engine} ms", float("inf")) for row in runs]
        offset = (index - (len(GENERATE_ENGINES) - 2) / 2) * width
        bars = generate.bar([i + offset for i in range(len(runs))], ratios, width, label=engine)
        generate.bar_label(bars, labels=[f"{r:.1f}x" if r else "failed" for r in ratios], fontsize=7)
    labels = [
        f"batch {row['batch']}" + (f", {row['beams']} beams" if row["beams"] > 1 else "") for row in runs
    ]
    generate.set_xticks(range(len(runs)), labels, fontsize=8)
    generate.set_ylabel(f"generate() speedup over HF, {runs[0]['new_tokens']} new tokens")
    generate.legend(fontsize=8, loc="upper left")
    generate.set_ylim(top=generate.get_ylim()[1] * 1.25)
    figure.suptitle("T5 (flan-T5-base shapes, fp16): kernl against Hugging Face")
    figure.tight_layout()
    return figure


def main(generate_only: bool = False) -> None:
    """Run every case, write the JSON and the chart; ``generate_only``: only the generate() rows, printed
    (nothing written)."""
    model = flan_t5_base()
    engines = encoder_engines(model)
    results = {"encoder": [], "generate": []}
    with torch.inference_mode():
        for batch, seq in [] if generate_only else ENCODER_SHAPES:
            ids, mask = inputs(batch, seq, model.config.vocab_size)
            row = {"batch": batch, "seq": seq}
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.encoder(input_ids=ids, attention_mask=mask)
                torch.cuda.synchronize()
                row[f"{name} warm-up s"] = round(time.perf_counter() - start, 2)
                row[f"{name} ms"] = wall_clock_ms(
                    functools.partial(engine.encoder, input_ids=ids, attention_mask=mask)
                )
            peer = min(row[f"{n} ms"] for n in engines if n != "kernl")
            row["kernl / best peer"] = round(peer / row["kernl ms"], 3)
            print(row, flush=True)
            results["encoder"].append(row)
        for batch, seq, beams in GENERATE_SHAPES:
            ids, mask = inputs(batch, seq, model.config.vocab_size)
            row = {"batch": batch, "seq": seq, "beams": beams, "new_tokens": NEW_TOKENS}
            outputs = {}
            for name in GENERATE_ENGINES:
                engine = engines["kernl" if name in KERNL_ENGINES else "HF sdpa"]
                if name in KERNL_ENGINES:
                    engine.kernl_decode_loop.enabled = name == "kernl"
                generate = functools.partial(
                    engine.generate, input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=beams, **GENERATE_ENGINES[name],
                )  # fmt: skip
                outputs[name] = time_generate(generate, row, name, WARM_UP_CALLS)
            peers = [row[f"{n} ms"] for n in GENERATE_ENGINES if n not in KERNL_ENGINES and f"{n} ms" in row]
            row["kernl / HF dynamic"] = round(row["HF dynamic cache ms"] / row["kernl ms"], 3)
            row["kernl / best peer"] = round(min(peers) / row["kernl ms"], 3)
            reference = (
                "HF static cache + torch.compile"
                if "HF static cache + torch.compile ms" in row
                else "HF dynamic cache"
            )
            row[f"same tokens as {reference}"] = bool(torch.equal(outputs[reference], outputs["kernl"]))
            row["kernl's loop: same tokens as transformers' loop"] = bool(
                torch.equal(outputs["kernl, transformers' loop"], outputs["kernl"])
            )
            print(row, flush=True)
            results["generate"].append(row)
    print(engines["kernl"].kernl_report)
    if generate_only:
        return
    write_results("t5", {"model": "flan-T5-base shapes, random weights, fp16", **results})
    save_figure(chart(results), "t5")


if __name__ == "__main__":
    main(generate_only="--generate-only" in sys.argv[1:])
