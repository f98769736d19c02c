"""The TorchDynamo backend: apply the FX rules to each graph TorchDynamo hands it.

Anything the backend cannot handle runs as plain PyTorch: a rule that raises leaves the graph as
TorchDynamo gave it (the error goes in the report). CUDA graphs wrap the whole forward, outside the
backend (:mod:`kernl.integration.cuda_graphs`).
"""

from collections import Counter

import torch
from torch import fx

from kernl.integration.kernels import find, qualified_name
from kernl.integration.report import GraphRecord, OptimizationReport, kept_as_pytorch
from kernl.integration.rules import RULES
from kernl.integration.rules.attention_sdpa import attention_call


def _describe_inputs(example_inputs, static_ids: set[int]) -> str:
    """The graph's tensor inputs other than the model's weights, e.g. ``[1x16 int64, 1x16 int64] on cuda:0``."""
    shapes = [
        f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"
        for t in example_inputs
        if isinstance(t, torch.Tensor) and id(t) not in static_ids
    ]
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")
    return f"[{', '.join(shapes)}] on {device}"


def rewrite_graph(gm: fx.GraphModule, record: GraphRecord) -> fx.GraphModule:
    """A copy of ``gm`` with every rule applied; ``gm`` itself when rewriting fails."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    work = fx.GraphModule(gm, graph)
    try:
        for rule in RULES:
            if rule.kernel is not None and find(rule.kernel) is None:
                record.skipped[rule.name] = f"{qualified_name(rule.kernel)} is not available: kept as PyTorch"
                continue
            record.fired[rule.name] = rule.rewrite(work)
        work.graph.eliminate_dead_code()
        work.graph.lint()
        work.recompile()
    except Exception as error:  # noqa: BLE001 - never break the model: run the original graph
        record.error = f"rewriting failed ({type(error).__name__}: {error}); graph runs as PyTorch"
        record.fired.clear()
        record.kept = kept_as_pytorch(gm)
        return gm
    record.kept = kept_as_pytorch(work)
    record.attention_masks = attention_masks(work)
    return work


def attention_masks(gm: fx.GraphModule) -> dict[str, int]:
    """How the rewritten attention calls of ``gm`` receive their mask."""
    kinds = Counter()
    for node in gm.graph.nodes:
        if node.target is attention_call:
            mask, key_padding_mask, bias = node.args[4], node.args[5], node.args[7]
            kind = (
                "key padding [B, K]"
                if key_padding_mask is not None
                else "dense"
                if mask is not None
                else "none"
            )
            kinds[kind + (" + bias" if bias is not None else "")] += 1
    return dict(kinds)


class KernlBackend:
    """``torch.compile(fn, backend=KernlBackend(report, weights))``: each graph rewritten by the rules.

    ``static_tensors``: the model's parameters and buffers (left out of the report's input lists).
    """

    def __init__(self, report: OptimizationReport, static_tensors=()):
        self.report = report
        self.static_ids = {id(t) for t in static_tensors}

    def __call__(self, gm: fx.GraphModule, example_inputs):
        record = GraphRecord(inputs=_describe_inputs(example_inputs, self.static_ids))
        self.report.graphs.append(record)
        work = rewrite_graph(gm, record)
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        record.runs_as = "rewritten graph, no CUDA graph" + (" (Triton interpreter)" if not on_cuda else "")
        return work.forward
