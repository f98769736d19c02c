"""The engines ``kernl bench`` compares, each built from the same fp16 Bert weights.

An engine is a name and a ``prepare(model) -> forward`` function; ``forward(input_ids, attention_mask)``
runs one batch. Warm-up (compilation, autotuning, graph capture) happens on the first call per shape.
"""

import copy

import torch

from kernl.integration import optimize_model
from kernl.integration.cuda_graphs import captured


def _hf(model, attn_implementation):
    model.set_attn_implementation(attn_implementation)
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask)


def sdpa_cuda_graph(model):
    """HF sdpa captured in a ``torch.cuda.CUDAGraph`` (two warm-up calls first), one graph per shape,
    captured on its first call, one shared pool: what a user would write by hand. The returned
    ``forward(ids, mask)`` keeps its captures in ``forward.graphs``."""
    model.set_attn_implementation("sdpa")
    graphs, pool = {}, torch.cuda.graph_pool_handle()

    def forward(ids, mask):
        key = tuple(ids.shape)
        if key not in graphs:
            static = (ids.clone(), mask.clone())

            def run():
                return model(input_ids=static[0], attention_mask=static[1]).last_hidden_state

            graph, out = captured(run, lambda: (run(), run()), pool)
            graphs[key] = (graph, static, out)
        graph, static, out = graphs[key]
        static[0].copy_(ids)
        static[1].copy_(mask)
        graph.replay()
        return out.clone()

    forward.graphs = graphs
    return forward


def _compiled(model, mode):
    model.set_attn_implementation("sdpa")
    compiled = torch.compile(model, mode=mode, dynamic=False)
    return lambda ids, mask: compiled(input_ids=ids, attention_mask=mask)


def _kernl(model):
    report = optimize_model(model)

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask)

    forward.report = report
    return forward


ENGINES = {
    "HF eager": lambda m: _hf(m, "eager"),
    "HF sdpa": lambda m: _hf(m, "sdpa"),
    "HF sdpa + CUDA graphs": sdpa_cuda_graph,
    "torch.compile reduce-overhead": lambda m: _compiled(m, "reduce-overhead"),
    "torch.compile max-autotune": lambda m: _compiled(m, "max-autotune"),
    "kernl": _kernl,
}


def prepare(name: str, model: torch.nn.Module):
    """A fresh copy of ``model`` set up as engine ``name``; returns its forward."""
    torch._dynamo.reset()
    return ENGINES[name](copy.deepcopy(model))
