"""``kernl bench --zoo``: ``optimize_model`` across model families, at base size, against HF sdpa.

Each family's base model is built from its config (random weights, seeded) at base size and run at
(batch 8, 128 tokens) with half the rows padded (rows 4-7 hold 8 to 127 real tokens), fp16, on a GPU:
speed-up of kernl over HF (sdpa where the family has it, else its eager attention: the peer's name
says which), wall clock, synchronised, median; the largest error at real tokens of kernl fp16 and of
HF fp16 against HF fp32 (same weights, same attention implementation); the rules fired, what stayed
PyTorch, how the graphs run, and the never-slower checks. Without a GPU (``kernl bench --zoo`` on a
CPU) the same families are built tiny (2 layers, hidden 64) and checked in fp32 through Triton's
interpreter at (4, 21), half the rows padded: errors and rules, no speed.
"""

import copy
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
import transformers

from kernl.integration import optimize_model
from kernl.integration.bench.gpu import wall_clock_ms

BATCH, LENGTH = 8, 128


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its transformers class and config, and the settings of its base and tiny sizes."""

    model_class: str
    config_class: str
    base: dict
    tiny: dict

    def build(self, tiny: bool) -> torch.nn.Module:
        """The family's model, random weights (seeded), fp32, CPU, eval mode, sdpa where it has it."""
        config = getattr(transformers, self.config_class)(**(self.tiny if tiny else self.base))
        model_class = getattr(transformers, self.model_class)
        attention = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
        torch.manual_seed(0)
        return model_class._from_config(config, attn_implementation=attention).eval()


_TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=120
)
_ROBERTA = dict(max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
_DEBERTA_V3 = dict(
    relative_attention=True,
    max_relative_positions=-1,
    pos_att_type=["p2c", "c2p"],
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    position_biased_input=False,
    type_vocab_size=0,
)
_MODERNBERT_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
FAMILIES = {
    "Bert": Family("BertModel", "BertConfig", {}, _TINY),
    "RoBERTa": Family(
        "RobertaModel", "RobertaConfig", {**_ROBERTA, "vocab_size": 50265}, {**_TINY, **_ROBERTA}
    ),
    "XLM-R": Family(
        "XLMRobertaModel", "XLMRobertaConfig", {**_ROBERTA, "vocab_size": 250002}, {**_TINY, **_ROBERTA}
    ),
    "DistilBERT": Family(
        "DistilBertModel",
        "DistilBertConfig",
        {},
        dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=120),
    ),
    "ELECTRA": Family(
        "ElectraModel",
        "ElectraConfig",
        dict(embedding_size=768, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
        {**_TINY, "embedding_size": 32},
    ),
    "ALBERT": Family(
        "AlbertModel",
        "AlbertConfig",
        dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, embedding_size=128),
        {**_TINY, "embedding_size": 32},
    ),
    "MPNet": Family("MPNetModel", "MPNetConfig", {}, _TINY),
    "ModernBERT": Family(
        "ModernBertModel",
        "ModernBertConfig",
        {},
        {**_TINY, **_MODERNBERT_IDS, "max_position_embeddings": 256, "local_attention": 32},
    ),
    "DeBERTa-v2": Family(  # deberta-v3-base's settings (the DeBERTa-v2 code)
        "DebertaV2Model",
        "DebertaV2Config",
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=128100,
            position_buckets=256,
            **_DEBERTA_V3,
        ),
        {**_TINY, "position_buckets": 16, **_DEBERTA_V3},
    ),
    "GPT-2": Family(
        "GPT2Model", "GPT2Config", {}, dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=120)
    ),
    "Llama": Family(  # a base-sized Llama: 12 layers of 768, grouped-query attention (4 key/value heads)
        "LlamaModel",
        "LlamaConfig",
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            intermediate_size=2048,
            vocab_size=32000,
        ),
        {**_TINY, "num_key_value_heads": 2},
    ),
}


def family_list(text: str) -> list[str]:
    """``"Bert,MPNet"`` -> ``["Bert", "MPNet"]``, each a key of :data:`FAMILIES`; ``ValueError`` otherwise."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if not names or unknown:
        raise ValueError(
            f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {unknown}; choose from {list(FAMILIES)}"
        )
    return list(dict.fromkeys(names))


def half_padded_batch(vocab: int, batch: int = BATCH, length: int = LENGTH, seed: int = 0) -> dict:
    """``input_ids`` and ``attention_mask`` ``(batch, length)`` (int64, CPU): the first half of the rows
    full, the others right-padded to 8 to ``length - 1`` real tokens (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch // 2, batch):
        real = int(torch.randint(min(8, length - 1), length, (1,), generator=generator))
        mask[row, real:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _error_at_real_tokens(output, expected: torch.Tensor, real: torch.Tensor) -> float:
    return float((_hidden(output).float() - expected)[real].abs().max())


def _report_summary(report) -> dict:
    kept: dict[str, int] = {}
    for graph in report.graphs:
        for kind, count in graph.kept.items():
            kept[kind] = kept.get(kind, 0) + count
    return {
        "status": report.status,
        "rules_fired": report.totals(),
        "kept_as_pytorch": kept,
        "graphs": [dict(inputs=g.inputs, runs_as=g.runs_as, error=g.error) for g in report.graphs],
        "speed_checks": [dataclasses.asdict(r) for r in report.speed],
        "notes": report.notes,
    }


def _timings(peer, optimized, inputs: dict) -> dict:
    """HF's and kernl's latency on ``inputs`` and the speed-up (GPU)."""
    hf_ms = wall_clock_ms(lambda: peer(**inputs), budget_s=0.25, max_reps=100)
    kernl_ms = wall_clock_ms(lambda: optimized(**inputs), budget_s=0.25, max_reps=100)
    return {
        "hf_ms": round(hf_ms, 4),
        "kernl_ms": round(kernl_ms, 4),
        "speedup_vs_hf": round(hf_ms / kernl_ms, 2),
    }


def run_family(name: str, device: str) -> dict:
    """One family at (8, 128) half padded: on ``"cuda"`` fp16 with timings, on ``"cpu"`` tiny, fp32."""
    on_gpu = device == "cuda"
    family = FAMILIES[name]
    with torch.device(device):  # random initialisation where the model runs (base sizes init fast there)
        model = family.build(tiny=not on_gpu)
    config = model.config
    shape = (BATCH, LENGTH) if on_gpu else (4, 21)  # the interpreter is slow: a small batch on the CPU
    inputs = half_padded_batch(config.vocab_size, *shape)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    real = inputs["attention_mask"].bool()
    dtype = torch.float16 if on_gpu else torch.float32
    peer = copy.deepcopy(model).to(dtype)
    optimized = copy.deepcopy(model).to(dtype)
    with torch.inference_mode():
        expected = _hidden(model(**inputs)).float()
        peer_error = _error_at_real_tokens(peer(**inputs), expected, real)
    del model
    torch._dynamo.reset()
    start = time.perf_counter()
    report = optimize_model(optimized)
    with torch.inference_mode():
        output = optimized(**inputs)
        if on_gpu:
            torch.cuda.synchronize()
        warm_up = time.perf_counter() - start
        record = {
            "family": name,
            "model": f"{family.model_class} ({'base' if on_gpu else 'tiny'} config)",
            "peer": f"HF {config._attn_implementation}",
            "dtype": str(dtype).removeprefix("torch."),
            "max_abs_error_vs_hf_fp32": _error_at_real_tokens(output, expected, real),
            "hf_same_dtype_max_abs_error_vs_hf_fp32": peer_error,
            "kernl_first_call_s": round(warm_up, 2),
        }
        if on_gpu:
            record.update(_timings(peer, optimized, inputs))
    record.update(_report_summary(report))
    del peer, optimized  # before the next family's models
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return record


def chart(records: list[dict], title: str):
    """Speed-up over HF per family, with the 1.0x and 1.5x lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if "speedup_vs_hf" in r]
    figure, axis = plt.subplots(figsize=(max(8, 0.8 * len(timed)), 4.5))
    colors = [
        "tab:green" if r["speedup_vs_hf"] >= 1.5 else "tab:orange" if r["speedup_vs_hf"] >= 1.0 else "tab:red"
        for r in timed
    ]
    bars = axis.bar([r["family"] for r in timed], [r["speedup_vs_hf"] for r in timed], color=colors)
    axis.bar_label(bars, labels=[f"{r['speedup_vs_hf']:.2f}x" for r in timed], fontsize=8)
    for level in (1.0, 1.5):
        axis.axhline(level, color="grey", linewidth=0.8, linestyle="--" if level > 1 else "-")
    axis.set_ylabel("HF time / kernl time (fp16, 8 x 128, half the rows padded)")
    axis.set_title(title)
    axis.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    return figure


def print_table(records: list[dict], title: str, console) -> None:
    """The records as a table: speed (GPU), errors, rules fired."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("family", "peer", "HF ms", "kernl ms", "speed-up", "kernl err", "HF err", "rules fired"):
        table.add_column(column, justify="left" if column in ("family", "peer", "rules fired") else "right")
    for r in records:
        if "error" in r:
            table.add_row(r["family"], "-", "-", "-", "-", "-", "-", f"failed: {r['error']}")
            continue
        rules = ", ".join(f"{k} x{v}" for k, v in r["rules_fired"].items() if v) or "none"
        table.add_row(
            r["family"],
            r["peer"],
            f"{r['hf_ms']:.3f}" if "hf_ms" in r else "-",
            f"{r['kernl_ms']:.3f}" if "kernl_ms" in r else "-",
            f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else "-",
            f"{r['max_abs_error_vs_hf_fp32']:.2e}",
            f"{r['hf_same_dtype_max_abs_error_vs_hf_fp32']:.2e}",
            rules,
        )
    console.print(table)
    for r in records:
        for check in r.get("speed_checks", []):
            console.print(f"{r['family']}: speed check kept {check['kept']} for {check['signature']}")


def run_zoo(families: list[str], device: str, console, out: Path | None = None) -> list[dict]:
    """Every family of ``families`` on ``device``; prints a table; on a GPU writes ``zoo.json`` and
    ``zoo.png`` into ``out``. A family that raises is recorded with its error, and the others run."""
    from kernl.integration.bench.run import environment, termination_as_interrupt

    records = []
    payload = {"environment": environment(), "shape": [BATCH, LENGTH], "records": records}
    start = time.perf_counter()
    try:
        with termination_as_interrupt():
            for name in families:
                console.print(f"{name}: building, optimizing, {'timing' if device == 'cuda' else 'checking'}")
                try:
                    records.append(run_family(name, device))
                except Exception as error:  # noqa: BLE001 - a family's failure is a result, not the run's end
                    records.append({"family": name, "error": f"{type(error).__name__}: {error}"})
                payload["total_s"] = round(time.perf_counter() - start, 1)
                if out is not None:  # partial results, kept if the run is cut short
                    (out / "zoo.json").write_text(json.dumps(payload, indent=2) + "\n")
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: report the families measured so far
        payload["interrupted"] = True
        console.print("interrupted: reporting the families measured so far")
    if device == "cuda":
        title = f"kernl model zoo, {BATCH} x {LENGTH} half padded, fp16, on {torch.cuda.get_device_name()}"
    else:
        title = "kernl model zoo, tiny configs, 4 x 21 half padded, fp32, on the CPU (Triton interpreter)"
    print_table(records, title, console)
    if out is not None:
        (out / "zoo.json").write_text(json.dumps(payload, indent=2) + "\n")
        chart(records, title).savefig(out / "zoo.png", dpi=120, bbox_inches="tight")
        console.print(f"results written to {out}/zoo.json and .png")
    return records


def zoo_passed(records: list[dict], tolerance: float = 1e-3) -> bool:
    """Whether every family ran and kernl's error is within ``tolerance`` or 4x HF's own at the same dtype."""
    return all(
        "error" not in r
        and r["max_abs_error_vs_hf_fp32"] <= max(tolerance, 4 * r["hf_same_dtype_max_abs_error_vs_hf_fp32"])
        for r in records
    )


if __name__ == "__main__":  # `kernl bench --zoo` on a CPU runs this in a fresh Python (see cli.main)
    import sys

    from kernl.integration.bench.run import log_console

    chosen = family_list(sys.argv[1]) if len(sys.argv) > 1 else list(FAMILIES)
    sys.exit(0 if zoo_passed(run_zoo(chosen, "cpu", log_console())) else 1)
