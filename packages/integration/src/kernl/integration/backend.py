"""The TorchDynamo backend: apply the FX rules to each graph TorchDynamo hands it.

Anything the backend cannot handle runs as plain PyTorch: a rule that raises leaves the graph as
TorchDynamo gave it (the error goes in the report). CUDA graphs wrap the whole forward, outside the
backend (:mod:`kernl.integration.cuda_graphs`), except for the decoder of ``generate()``, whose graphs
the backend wraps one by one (:mod:`kernl.integration.step_graphs`).
"""

from collections import Counter

import torch
from torch import fx

from kernl.integration.dynamic_tokens import concrete_examples, is_symbolic
from kernl.integration.report import (
    GraphRecord,
    OptimizationReport,
    kept_as_pytorch,
    kept_reasons,
    shape_and_dtype,
)
from kernl.integration.rules import RULES, cache_write_attention, packed_attention
from kernl.integration.rules.attention_sdpa import AttentionArgs, attention_call
from kernl.integration.rules.fused_projections import lay_out_stacked_weights
from kernl.integration.step_graphs import has_static_address, holds_state, step_graphs


def _describe_inputs(example_inputs, static_ids: set[int]) -> str:
    """The graph's tensor inputs other than the model's weights, e.g. ``[1x16 int64, 1x16 int64] on cuda:0``;
    tensors updated in place at a fixed address (a static key/value cache) are counted, not listed."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    shapes = [shape_and_dtype(t) for t in tensors if not has_static_address(t, static_ids)]
    in_place = sum(holds_state(t, static_ids) for t in tensors)
    in_place = [f"{in_place} static cache tensors"] if in_place else []
    device = tensors[0].device if tensors else "cpu"
    return f"[{', '.join(shapes + in_place)}] on {device}"


def _mutates(node: fx.Node) -> bool:
    """Whether dead code elimination must keep ``node``: FX's own rule, plus in-place tensor methods and
    functions (``index_copy_``, ``add_``: a static key/value cache updated in place), which FX deems pure."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    # operator.and_ / or_ / not_ end in "_" only to dodge keywords: pure (a mask's dead T x T `&`)
    keyword_dodge = getattr(node.target, "__module__", None) == "_operator"
    in_place = isinstance(name, str) and name.endswith("_") and not name.endswith("__") and not keyword_dodge
    return node.is_impure() or (node.op in ("call_method", "call_function") and in_place)


def rewrite_graph(gm: fx.GraphModule, record: GraphRecord, example_inputs, packing=None) -> fx.GraphModule:
    """A copy of ``gm`` with every rule applied; ``gm`` itself when rewriting fails. ``example_inputs``:
    the tensors TorchDynamo compiles ``gm`` for (the weights of stacked projections are laid out now,
    so that running the graph moves nothing). ``packing``: the row offsets of a packed graph
    (:mod:`kernl.integration.packing`), which then gets the packed pass."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    work = fx.GraphModule(gm, graph)
    try:
        concrete_examples(work)  # a packed graph's symbolic token count: the rules see the traced call's
        for rule in RULES:
            record.fired[rule.name] = rule.rewrite(work)
        if packing is not None:  # packed execution hook (kernl.integration.packing)
            record.fired["packed_attention"] = packed_attention.rewrite(work, packing)
        work.graph.eliminate_dead_code(is_impure_node=_mutates)
        work.graph.lint()
        work.recompile()
        lay_out_stacked_weights(work, example_inputs)
    except Exception as error:  # noqa: BLE001 - never break the model: run the original graph
        record.error = f"rewriting failed ({type(error).__name__}: {error}); graph runs as PyTorch"
        record.fired.clear()
        record.kept, record.kept_why = kept_as_pytorch(gm), kept_reasons(gm)
        return gm
    record.kept, record.kept_why = kept_as_pytorch(work), kept_reasons(work)
    record.attention_masks = attention_masks(work)
    return work


def attention_masks(gm: fx.GraphModule) -> dict[str, int]:
    """How the rewritten attention calls of ``gm`` receive their mask."""
    kinds = Counter()
    for node in gm.graph.nodes:
        if node.target is packed_attention.packed_attention_call:
            relative = len(node.args) > 5 and node.args[5] is not None
            kinds["packed rows (varlen)" + (" + relative position bias" if relative else "")] += 1
        call = AttentionArgs(*node.args) if node.target is attention_call else None
        call = call or cache_write_attention.attention_args(node)  # the attention with the cache writes
        if call is not None:
            mask = (
                "key padding [B, K]"
                if call.key_padding_mask is not None
                else "dense"
                if call.mask is not None
                else None
            )
            parts = [mask, "causal" if call.causal else None, "bias" if call.bias is not None else None]
            kinds[" + ".join(part for part in parts if part) or "none"] += 1
    return dict(kinds)


def _refuse_packed(reason: str):
    """A compiled graph that raises :class:`PackingUnsupported`: packed rows must never run unpacked."""

    def refuse(*args):
        raise packed_attention.PackingUnsupported(reason)

    return refuse


class KernlBackend:
    """``torch.compile(fn, backend=KernlBackend(report, weights))``: each graph rewritten by the rules.

    ``static_tensors``: the model's parameters and buffers (left out of the report's input lists).
    ``part`` names the model part in the report (``"decoder"``); ``packing``: the row offsets of a
    packed forward (its graphs get the packed pass; one that fails raises
    :class:`~kernl.integration.rules.packed_attention.PackingUnsupported` when run, never running
    unpacked attention over packed rows); with ``step_graphs`` each graph on
    a GPU also runs under its own CUDA graphs (:func:`~kernl.integration.step_graphs.step_graphs`),
    for callers that are not wrapped whole, such as the decoder that ``generate()`` calls once a step.
    """

    def __init__(
        self,
        report: OptimizationReport,
        static_tensors=(),
        part: str = "",
        step_graphs: bool = False,
        packing=None,
    ):
        self.report, self.part, self.step_graphs, self.packing = report, part, step_graphs, packing
        self.static_ids = {id(t) for t in static_tensors}
        self.pool = None

    def __call__(self, gm: fx.GraphModule, example_inputs):
        inputs = _describe_inputs(example_inputs, self.static_ids)
        if is_symbolic(gm):  # a packed graph: see kernl.integration.dynamic_tokens
            inputs += " (token count symbolic: traced once for every token bucket)"
        record = GraphRecord(inputs=inputs, part=self.part)
        self.report.graphs.append(record)
        work = rewrite_graph(gm, record, example_inputs, self.packing)
        if self.packing is not None and record.error is not None:
            return _refuse_packed(record.error)
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        record.runs_as = "rewritten graph, no CUDA graph" + (" (Triton interpreter)" if not on_cuda else "")
        if not (on_cuda and self.step_graphs):
            return work.forward
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return step_graphs(work.forward, example_inputs, self.static_ids, self.pool, record)
