"""Whisper on kernl: the encoder forward and greedy ``generate(input_features)``, against Hugging Face in the
same run.

whisper-base shapes (d_model 512, 8 heads, FFN 2048, 6 + 6 layers, vocabulary 51865, 80 mel bins, 1500
encoder positions), random weights, fp16, 30 s of random log-mel features (80 x 3000). Encoder: wall-clock
latency of ``model.get_encoder()(input_features)`` for HF (sdpa), HF with
``torch.compile(mode="reduce-overhead")`` and kernl. Generation: ``generate(input_features, language="en")``
(the prompt is Whisper's 4 tokens: start, language, task, no timestamps), 64 new tokens, greedy: HF with
its default dynamic cache, HF with ``cache_implementation="static"`` (transformers compiles the decoder
step with ``torch.compile(mode="reduce-overhead")``) and kernl (encoder and decoder on kernl, static
cache by default). Each warm-up call is timed on its own (``... warm-up calls s``).
Writes benchmarks/results/<gpu>/whisper.json and whisper.png (whisper_batch<sizes>.* for other batch sizes).
Run: python packages/integration/benchmarks/bench_whisper.py [--batches 1,8]
"""

import argparse
import copy
import functools
import time

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

from kernl.integration import optimize_model
from kernl.integration.bench.gpu import time_generate, wall_clock_ms
from kernl_testing.benchmarking import save_figure, write_results

NEW_TOKENS = 64
# generate() calls before timing: kernl compiles the encoder and the decoder step in the model's first,
# the prefill (the first call that reuses a static cache) in its second; HF's static cache compiles in
# the first.
WARM_UP_CALLS = 3
# generate() engines: name -> extra generate() arguments (kernl: its defaults, a static cache)
GENERATE_ENGINES = {
    "HF dynamic cache": {},
    "HF static cache + torch.compile": {"cache_implementation": "static"},
    "kernl": {},
}
# whisper-base's special tokens (its generation_config.json)
START, END, ENGLISH, TRANSCRIBE, TRANSLATE, NO_TIMESTAMPS = 50258, 50257, 50259, 50359, 50358, 50363


def whisper_base() -> WhisperForConditionalGeneration:
    """whisper-base's configuration with random weights, fp16 on the GPU, and the generation settings
    ``generate(language="en")`` needs."""
    config = WhisperConfig(
        vocab_size=51865, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=START,
        eos_token_id=END, pad_token_id=END, bos_token_id=END, suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval().to("cuda", torch.float16)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=START, eos_token_id=END, pad_token_id=END, bos_token_id=END,
        no_timestamps_token_id=NO_TIMESTAMPS, is_multilingual=True, lang_to_id={"<|en|>": ENGLISH},
        task_to_id={"transcribe": TRANSCRIBE, "translate": TRANSLATE}, max_length=448,
    )  # fmt: skip
    return model


def encoder_engines(model):
    """name -> model: HF, HF with its encoder under torch.compile reduce-overhead, kernl."""
    compiled = copy.deepcopy(model)
    encoder = compiled.get_encoder()
    encoder.forward = torch.compile(encoder.forward, mode="reduce-overhead")
    kernl = copy.deepcopy(model)
    optimize_model(kernl)
    return {"HF sdpa": model, "torch.compile reduce-overhead": compiled, "kernl": kernl}


def chart(results: dict):
    """Two panels: encoder speedup over HF per engine and batch; generate() speedup per engine and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5))
    for panel, (key, baseline, what) in zip(
        panels,
        [
            ("encoder", "HF sdpa", "encoder speedup over Hugging Face (sdpa)"),
            ("generate", "HF dynamic cache", f"generate() speedup over HF, {NEW_TOKENS} new tokens"),
        ],
        strict=True,
    ):
        rows = results[key]
        engines = [n.removesuffix(" ms") for n in rows[0] if n.endswith(" ms") and n != f"{baseline} ms"]
        for index, engine in enumerate(engines):
            ratios = [
                row[f"{baseline} ms"] / row[f"{engine} ms"] if f"{engine} ms" in row else 0 for row in rows
            ]
            bars = panel.bar([i + (index - 0.5) * 0.4 for i in range(len(rows))], ratios, 0.4, label=engine)
            panel.bar_label(bars, labels=[f"{r:.1f}x" if r else "failed" for r in ratios], fontsize=7)
        panel.set_xticks(range(len(rows)), [f"batch {row['batch']}" for row in rows])
        panel.set_ylabel(what)
        panel.legend(fontsize=8, loc="upper left")
        panel.set_ylim(top=panel.get_ylim()[1] * 1.25)  # room for the legend above the bars
    figure.suptitle("Whisper (whisper-base shapes, fp16, 30 s of audio): kernl against Hugging Face")
    figure.tight_layout()
    return figure


def encoder_row(engines: dict, features: torch.Tensor) -> dict:
    """Warm-up seconds and median wall-clock ms of each engine's encoder on ``features``."""
    row = {"batch": features.shape[0], "frames": features.shape[-1]}
    for name, engine in engines.items():
        encoder = engine.get_encoder()
        start = time.perf_counter()
        encoder(features)
        torch.cuda.synchronize()
        row[f"{name} warm-up s"] = round(time.perf_counter() - start, 2)
        row[f"{name} ms"] = wall_clock_ms(functools.partial(encoder, features))
    peer = min(row[f"{n} ms"] for n in engines if n != "kernl")
    row["kernl / best peer"] = round(peer / row["kernl ms"], 3)
    return row


def generate_row(engines: dict, features: torch.Tensor) -> dict:
    """Warm-up seconds, median wall-clock ms and tokens of each generate() engine on ``features``."""
    row = {"batch": features.shape[0], "new_tokens": NEW_TOKENS}
    outputs = {}
    for name, arguments in GENERATE_ENGINES.items():
        engine = engines["kernl" if name == "kernl" else "HF sdpa"]
        generate = functools.partial(
            engine.generate, features, language="en", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, **arguments,
        )  # fmt: skip
        outputs[name] = time_generate(generate, row, name, WARM_UP_CALLS)
    peers = [row[f"{n} ms"] for n in GENERATE_ENGINES if n != "kernl" and f"{n} ms" in row]
    row["kernl / HF dynamic"] = round(row["HF dynamic cache ms"] / row["kernl ms"], 3)
    row["kernl / best peer"] = round(min(peers) / row["kernl ms"], 3)
    row["kernl tokens / s"] = round(features.shape[0] * NEW_TOKENS / row["kernl ms"] * 1e3, 1)
    # fp16 on both sides: a near tie between two logits may flip a token, and every later one with it
    same = outputs["kernl"] == outputs["HF dynamic cache"]
    row["tokens equal to HF dynamic cache"] = f"{int(same.sum())} / {same.numel()}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    batches = [int(b) for b in parser.parse_args().batches.split(",")]
    start = time.perf_counter()
    model = whisper_base()
    engines = encoder_engines(model)
    frames = 2 * model.config.max_source_positions
    results = {"encoder": [], "generate": []}
    with torch.inference_mode():
        for batch in batches:
            features = torch.randn(
                batch, model.config.num_mel_bins, frames, device="cuda", dtype=torch.float16
            )
            results["encoder"].append(encoder_row(engines, features))
            print(results["encoder"][-1], flush=True)
            results["generate"].append(generate_row(engines, features))
            print(results["generate"][-1], f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    print(engines["kernl"].kernl_report)
    model_name = "whisper-base shapes, random weights, fp16, 30 s of random log-mel features"
    # a run of other batch sizes than the default's keeps its own files
    name = "whisper" if batches == [1, 8] else "whisper_batch" + "_".join(map(str, batches))
    write_results(name, {"model": model_name, **results})
    save_figure(chart(results), name)


if __name__ == "__main__":
    main()
