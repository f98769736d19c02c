"""What ``optimize_model`` did: per compiled graph, which rules fired how often and what stayed PyTorch."""

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from kernl.integration import fallback
from kernl.integration.rules._fx import KEPT_REASON, is_function, is_method
from kernl.integration.rules.attention_eager import MATMUL_TARGETS, SOFTMAX_TARGETS
from kernl.integration.rules.attention_sdpa import SDPA_TARGETS
from kernl.integration.rules.conv1d import ADDMM_TARGETS
from kernl.integration.rules.dropout import DROPOUT_TARGETS
from kernl.integration.rules.layer_norm import LAYER_NORM_TARGETS
from kernl.integration.rules.linear_act import LINEAR_TARGETS

F = torch.nn.functional
# Ops a rule exists for, in every spelling a rule matches: when they are still in a graph after
# rewriting, they ran as plain PyTorch.
_KEPT_FUNCTIONS = {
    **dict.fromkeys(LINEAR_TARGETS + ADDMM_TARGETS, "linear"),
    **dict.fromkeys((F.gelu, F.relu, torch.relu, torch.tanh, F.tanh, F.silu), "activation"),
    **dict.fromkeys(LAYER_NORM_TARGETS, "layer_norm"),
    torch.rsqrt: "rms_norm",
    torch.isinf: "overflow guard",
    **dict.fromkeys(SDPA_TARGETS, "attention (sdpa)"),
    **dict.fromkeys(SOFTMAX_TARGETS, "attention (softmax)"),
    **dict.fromkeys(MATMUL_TARGETS, "matmul"),
    **dict.fromkeys(DROPOUT_TARGETS, "dropout"),
}
_KEPT_METHODS = {
    "softmax": "attention (softmax)",
    "matmul": "matmul",
    "tanh": "activation",
    "relu": "activation",
    "rsqrt": "rms_norm",
}


# Why a rule leaves such an op alone, unless the rule noted a reason of its own on the node.
KEPT_WHY = {
    "linear": "its weight or input is not a floating-point matrix",
    "activation": "not applied to a linear's output alone",
    "layer_norm": "not over the last dimension alone, or its eps is not a constant",
    "rms_norm": "not T5's or Llama's norm chain, or its steps are used elsewhere",
    "overflow guard": "not T5's clamp(h, -c, c) guard",
    "attention (sdpa)": "dropout, a scale that is not a constant, or a mask not 4-D",
    "attention (softmax)": "not in matmul -> softmax -> matmul, or its probabilities are used elsewhere",
    "matmul": "not in matmul -> softmax -> matmul, or its probabilities are used elsewhere",
    "dropout": "training mode with p > 0",
}


def _kept_kind(node: fx.Node) -> str | None:
    if is_function(node, tuple(_KEPT_FUNCTIONS)):
        return _KEPT_FUNCTIONS[node.target]
    if is_method(node, tuple(_KEPT_METHODS)):
        return _KEPT_METHODS[node.target]
    return None


def kept_as_pytorch(gm: fx.GraphModule) -> dict[str, int]:
    """Count the ops of ``gm`` that a rule targets but that are still plain PyTorch calls."""
    return dict(Counter(kind for node in gm.graph.nodes if (kind := _kept_kind(node)) is not None))


def kept_reasons(gm: fx.GraphModule) -> dict[str, str]:
    """Why each kind of op of :func:`kept_as_pytorch` stayed PyTorch: the reasons the rules noted on its
    nodes, else the usual one (:data:`KEPT_WHY`)."""
    noted: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        kind = _kept_kind(node)
        if kind is not None and node.meta.get(KEPT_REASON) not in noted.setdefault(kind, []):
            noted[kind].append(node.meta.get(KEPT_REASON))
    return {
        kind: "; ".join(KEPT_WHY[kind] if reason is None else reason for reason in reasons)
        for kind, reasons in noted.items()
    }


@dataclass
class GraphRecord:
    """One graph TorchDynamo handed the backend (one per input shape and input set)."""

    inputs: str
    part: str = ""  # the model part, for models compiled in parts ("encoder", "decoder")
    fired: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    kept_why: dict[str, str] = field(default_factory=dict)  # by kind of op kept: why
    attention_masks: dict[str, int] = field(default_factory=dict)  # key padding / dense / none
    runs_as: str = ""
    warmup_s: float | None = None
    error: str | None = None


def shape_and_dtype(t: torch.Tensor) -> str:
    """A tensor as the report lists a graph's inputs: ``1x16 int64`` (``scalar int64`` when 0-d)."""
    return f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"


@dataclass
class WarmupRecord:
    """One CUDA-graph capture of a whole forward (one per input signature: a token bucket of the packed
    path) and where its warm-up went (:mod:`kernl.integration.warmup_clock`): the parts sum to
    ``warmup_s`` at most; ``triton_compile_s`` is None where Triton cannot tell its compilations."""

    inputs: str  # the captured call's copied inputs, e.g. "[1x1792 int64, 1x1792 int64] on cuda:0"
    warmup_s: float = 0.0  # warm-up runs and capture, as GraphRecord.warmup_s
    matmul_tuning_s: float = 0.0  # GEMM config tunings: compiling and timing candidates
    triton_compile_s: float | None = None  # Triton compilations outside those tunings
    other_s: float = 0.0  # the rest: TorchDynamo's trace, the rules, the warm-up runs, the capture

    def describe(self) -> str:
        """E.g. ``[1x1792 int64] on cuda:0: 18.55 s (GEMM tuning 12.10, Triton compiles 3.20, rest 3.25)``."""
        compiled = "?" if self.triton_compile_s is None else f"{self.triton_compile_s:.2f}"
        return (
            f"{self.inputs}: {self.warmup_s:.2f} s (GEMM tuning {self.matmul_tuning_s:.2f}, "
            f"Triton compiles {compiled}, rest {self.other_s:.2f})"
        )


@dataclass
class SpeedRecord:
    """One never-slower check (:mod:`kernl.integration.speed_check`): a signature's first call, timed."""

    signature: str  # what one graph serves, e.g. "token bucket 2048" or "batch 8 x length bucket 128"
    kernl_ms: float
    pytorch_ms: float  # the model's original forward, same call
    kept: str  # "kernl" or "PyTorch": what runs this signature's calls from then on
    error: str | None = None  # why the timing could not finish (kernl is then kept, untimed)

    def describe(self) -> str:
        """E.g. ``kept PyTorch for token bucket 2048: kernl was 0.41x (kernl 1.220 ms, PyTorch 0.500 ms)``."""
        if self.error is not None:
            return f"kept {self.kept} for {self.signature}, untimed: the timing failed ({self.error})"
        ratio = self.pytorch_ms / self.kernl_ms if self.kernl_ms > 0 else float("inf")
        return (
            f"kept {self.kept} for {self.signature}: kernl was {ratio:.2f}x "
            f"(kernl {self.kernl_ms:.3f} ms, PyTorch {self.pytorch_ms:.3f} ms)"
        )


@dataclass
class OptimizationReport:
    """The record of one ``optimize_model`` call; ``print(report)`` shows it as a table."""

    model: str = ""
    status: str = "optimized"
    notes: list[str] = field(default_factory=list)
    graphs: list[GraphRecord] = field(default_factory=list)
    speed: list[SpeedRecord] = field(default_factory=list)  # never-slower checks, in call order
    warmups: list[WarmupRecord] = field(default_factory=list)  # whole-forward captures, in call order
    # generate() calls by kind ("greedy", "sampling", "beam search"): which loop ran them and why, each
    # outcome once
    generate_loops: dict[str, list[str]] = field(default_factory=dict)

    def note_loop(self, kind: str, outcome: str) -> None:
        """Record that a ``generate()`` call of ``kind`` ran ``outcome`` (the loop, and why)."""
        outcomes = self.generate_loops.setdefault(kind, [])
        if outcome not in outcomes:
            outcomes.append(outcome)

    def totals(self) -> dict[str, int]:
        """Replacements per rule, summed over every graph."""
        total = Counter()
        for graph in self.graphs:
            total.update(graph.fired)
        return dict(total)

    def warmup_totals(self) -> dict[str, float | None]:
        """Seconds summed over every capture's warm-up (:class:`WarmupRecord`), by part;
        ``triton_compile_s`` is None when some capture could not tell it."""
        fields = ("warmup_s", "matmul_tuning_s", "triton_compile_s", "other_s")
        values = {name: [getattr(record, name) for record in self.warmups] for name in fields}
        return {name: None if None in seen else round(sum(seen), 3) for name, seen in values.items()}

    def to_dict(self) -> dict:
        """Plain data (for JSON). ``kernel_failures``: kernel signatures that raised and ran as PyTorch, in
        this process (any model: a signature that failed once is not tried again)."""
        return {**asdict(self), "totals": self.totals(), "kernel_failures": fallback.summary()}

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"kernl optimize_model report: {self.model} ({self.status})"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  generate() {kind}: {'; '.join(loops)}" for kind, loops in self.generate_loops.items()]
        if not self.graphs:
            lines.append("  no graph compiled yet (graphs are compiled on the first call of each shape)")
        for index, graph in enumerate(self.graphs):
            part = f" ({graph.part})" if graph.part else ""
            lines.append(f"  graph {index}{part}: {graph.inputs} -> runs as {graph.runs_as or 'not run yet'}")
            fired = ", ".join(f"{name} x{count}" for name, count in graph.fired.items() if count) or "none"
            lines.append(f"    rules fired: {fired}")
            kept = (
                ", ".join(
                    f"{name} x{count} ({graph.kept_why.get(name, KEPT_WHY[name])})"
                    for name, count in sorted(graph.kept.items())
                )
                or "nothing"
            )
            lines.append(f"    kept as PyTorch: {kept}")
            if graph.attention_masks:
                masks = ", ".join(f"{kind} x{count}" for kind, count in graph.attention_masks.items())
                lines.append(f"    attention masks handed to the kernel: {masks}")
            if graph.warmup_s is not None:
                lines.append(f"    warm-up (capture) {graph.warmup_s:.2f} s")
            if graph.error:
                lines.append(f"    fell back to PyTorch: {graph.error}")
        lines += [f"  speed check: {record.describe()}" for record in self.speed]
        lines += [f"  warm-up: {record.describe()}" for record in self.warmups]
        lines += [
            f"  in this process, a kernel call ran as PyTorch after an error: {line}"
            for line in fallback.summary()
        ]
        return "\n".join(lines)
