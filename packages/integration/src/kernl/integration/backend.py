"""The TorchDynamo backend: apply the FX rules to each graph, then run it under CUDA graphs on CUDA.

Anything the backend cannot handle runs as plain PyTorch: a rule that raises leaves the graph as
TorchDynamo gave it (the error goes in the report), a failed CUDA-graph capture runs the graph directly.
"""

from collections import Counter

import torch
from torch import fx

from kernl.integration.cuda_graphs import CudaGraphRunner
from kernl.integration.kernels import find, qualified_name
from kernl.integration.report import GraphRecord, OptimizationReport, kept_as_pytorch
from kernl.integration.rules import RULES
from kernl.integration.rules.attention_sdpa import attention_call


def _describe_inputs(example_inputs, static: set[int]) -> str:
    shapes = [
        f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"
        for i, t in enumerate(example_inputs)
        if i not in static and isinstance(t, torch.Tensor)
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
            _, _, _, _, mask, key_padding_mask, _ = node.args
            kinds[
                "key padding [B, K]"
                if key_padding_mask is not None
                else "dense"
                if mask is not None
                else "none"
            ] += 1
    return dict(kinds)


class KernlBackend:
    """``torch.compile(fn, backend=KernlBackend(...))``: rules, then CUDA graphs when on CUDA.

    ``static_tensors``: the model's parameters and buffers; graph inputs among them keep their storage
    between calls, so a CUDA graph reads them in place.
    """

    def __init__(self, report: OptimizationReport, static_tensors=(), cuda_graphs: bool = True):
        self.report = report
        self.static_ids = {id(t) for t in static_tensors}
        self.cuda_graphs = cuda_graphs
        self.pool = None

    def __call__(self, gm: fx.GraphModule, example_inputs):
        static = [i for i, t in enumerate(example_inputs) if id(t) in self.static_ids]
        record = GraphRecord(inputs=_describe_inputs(example_inputs, set(static)))
        self.report.graphs.append(record)
        work = rewrite_graph(gm, record)
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        if on_cuda and self.cuda_graphs:
            if self.pool is None:  # one pool for every graph of this model; the backend keeps it alive
                self.pool = torch.cuda.graph_pool_handle()
            return CudaGraphRunner(work.forward, gm.forward, static, record, self.pool)
        record.runs_as = "rewritten graph, no CUDA graph" + (" (Triton interpreter)" if not on_cuda else "")
        return work.forward
