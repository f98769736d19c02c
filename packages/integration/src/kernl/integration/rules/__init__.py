"""The FX replacement rules, one per file, applied in the order of :data:`RULES`.

Each rule walks the nodes of a TorchDynamo graph, matches calls by their target function (never by a
transformers-specific spelling), reads arguments by position or name, and puts a kernl kernel call in
place of what it matched: a function that calls the kernel package directly (through
:func:`kernl.integration.fallback.call`, which runs PyTorch instead for a signature the kernel raised on).
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx


@dataclass(frozen=True)
class Rule:
    """A named graph rewrite. ``rewrite(graph_module)`` returns how many places it replaced."""

    name: str
    matches: str
    replacement: str
    rewrite: Callable[[fx.GraphModule], int]


def _rules() -> list[Rule]:
    from kernl.integration.rules import (
        attention_bmm,
        attention_eager,
        attention_gqa,
        attention_sdpa,
        cache_write_attention,
        clamped_rms_norm,
        constant_arange,
        conv1d,
        dropout,
        fused_projections,
        gated_ffn,
        layer_norm,
        linear_act,
        overflow_guard,
        position_buckets,
        rms_norm,
        rotary,
    )

    return [
        dropout.RULE,
        position_buckets.RULE,
        attention_gqa.DECODE_RULE,
        attention_gqa.RULE,
        attention_sdpa.RULE,
        attention_eager.RULE,
        attention_bmm.RULE,
        cache_write_attention.RULE,
        rotary.RULE,
        gated_ffn.RULE,
        conv1d.RULE,
        linear_act.RULE,
        fused_projections.RULE,
        layer_norm.RULE,
        rms_norm.RULE,
        overflow_guard.RULE,
        clamped_rms_norm.RULE,
        constant_arange.RULE,
    ]


RULES: list[Rule] = _rules()


def describe_rules() -> str:
    """The rules in the order they run: name, what each matches and what it puts there."""
    lines = []
    for rule in RULES:
        lines += [rule.name, f"  matches: {rule.matches}"]
        lines.append(f"  puts there: {rule.replacement}")
    return "\n".join(lines)


__all__ = ["RULES", "Rule", "describe_rules"]
