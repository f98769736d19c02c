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
The generate() rows run for flan-T5-base and, at the same settings, T5-small (relu FFN, 6 + 6 layers) and
BART-base shapes (learned positions, 6 + 6 layers); the encoder rows for flan-T5-base.
Writes benchmarks/results/<gpu>/t5.json and t5.png. Run: python packages/integration/benchmarks/bench_t5.py
(``--generate-only``: the generate() rows alone, printed, nothing written; ``--models a,b``: a subset of
:data:`MODELS`).
"""

import argparse
import copy
import functools
import sys
import time

import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

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


def _on_gpu(model):
    """``model`` in fp16 on the GPU, its lm_head unable to pick the pad or end-of-sequence token (ids 0-2),
    so that greedy decoding never stops early."""
    model = model.eval().to("cuda", torch.float16)
    with torch.no_grad():
        model.lm_head.weight[:3] = -1
    return model


def flan_t5_base() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return _on_gpu(T5ForConditionalGeneration(config))


def t5_small() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
        feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return _on_gpu(T5ForConditionalGeneration(config))


def bart_base() -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return _on_gpu(BartForConditionalGeneration(config))


MODELS = {"flan-T5-base": flan_t5_base, "T5-small": t5_small, "BART-base": bart_base}


def encoder_engines(model):
    """name -> model: HF, HF + torch.compile reduce-overhead, kernl."""
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

    figure, (encoder, generate) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 2]})
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
        f"{row['model']}\nbatch {row['batch']}" + (f", {row['beams']} beams" if row["beams"] > 1 else "")
        for row in runs
    ]
    generate.set_xticks(range(len(runs)), labels, fontsize=7, rotation=45, ha="right")
    generate.set_ylabel(f"generate() speedup over HF, {runs[0]['new_tokens']} new tokens")
    generate.legend(fontsize=8, loc="upper left")
    generate.set_ylim(top=generate.get_ylim()[1] * 1.25)
    figure.suptitle("T5 and BART (random weights at real shapes, fp16): kernl against Hugging Face")
    figure.tight_layout()
    return figure


def generate_rows(model_name: str, engines: dict) -> list[dict]:
    """The generate() rows of one model: every engine at every :data:`GENERATE_SHAPES` case."""
    rows = []
    for batch, seq, beams in GENERATE_SHAPES:
        ids, mask = inputs(batch, seq, engines["HF sdpa"].config.vocab_size)
        row = {"model": model_name, "batch": batch, "seq": seq, "beams": beams, "new_tokens": NEW_TOKENS}
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
        rows.append(row)
    print(engines["kernl"].kernl_report)
    return rows


def encoder_rows(engines: dict) -> list[dict]:
    """The encoder rows: every engine at every :data:`ENCODER_SHAPES` shape, warm-up and latency."""
    rows = []
    for batch, seq in ENCODER_SHAPES:
        ids, mask = inputs(batch, seq, engines["HF sdpa"].config.vocab_size)
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
        rows.append(row)
    return rows


def main(generate_only: bool = False, models: tuple[str, ...] = tuple(MODELS)) -> None:
    """Run every case, write the JSON and the chart; ``generate_only``: only the generate() rows, printed
    (nothing written); ``models``: the :data:`MODELS` whose generate() rows run."""
    results = {"encoder": [], "generate": []}
    with torch.inference_mode():
        for model_name in models:
            engines = encoder_engines(MODELS[model_name]())
            if model_name == "flan-T5-base" and not generate_only:
                results["encoder"] = encoder_rows(engines)
            results["generate"] += generate_rows(model_name, engines)
            del engines
            torch.cuda.empty_cache()
    if generate_only:
        return
    write_results("t5", {"models": "random weights at real shapes, fp16; encoder: flan-T5-base", **results})
    save_figure(chart(results), "t5")


def _parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generate-only", action="store_true", help="generate() rows only, printed")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}"
    )
    arguments = parser.parse_args(argv)
    models = tuple(name.strip() for name in arguments.models.split(",") if name.strip())
    unknown = [name for name in models if name not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    return {"generate_only": arguments.generate_only, "models": models}


if __name__ == "__main__":
    main(**_parse(sys.argv[1:]))
