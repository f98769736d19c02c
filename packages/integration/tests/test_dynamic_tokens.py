"""A graph traced with a symbolic token count: the rules see the traced call's sizes, and the rewritten graph
serves every token count (kernl.integration.dynamic_tokens)."""

import pytest
import torch
from torch import fx

from kernl.integration.backend import rewrite_graph
from kernl.integration.dynamic_tokens import concrete_examples, is_symbolic, mark_tokens, tokens_marked
from kernl.integration.report import GraphRecord
from kernl_testing import assert_matches_reference, on_gpu

DEVICE = "cuda" if on_gpu() else "cpu"
DTYPE = torch.float16 if on_gpu() else torch.float32


class _Projections(torch.nn.Module):
    """Q, K and V of one input viewed as heads: what fused_projections stacks."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        batch, tokens, width = x.shape
        shape = (batch, tokens, self.heads, width // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
        return q * 2 + k - v


def _traced(module, x, dynamic: bool) -> tuple[fx.GraphModule, list]:
    """TorchDynamo's graph of ``module(x)`` (token dimension 1 symbolic when ``dynamic``), and its inputs."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward

    if dynamic:
        mark_tokens({"x": x})
    torch._dynamo.reset()
    torch.compile(module, backend=backend, dynamic=False)(x)
    ((gm, example_inputs),) = seen
    return gm, example_inputs


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def test_concrete_examples_hold_the_traced_sizes_and_leave_the_original_alone():
    module = _Projections()
    x = torch.randn(1, 48, 32)
    gm, _ = _traced(module, x, dynamic=True)
    assert is_symbolic(gm)
    work = _copy(gm)
    concrete_examples(work)
    examples = [n.meta.get("example_value") for n in work.graph.nodes]
    tensors = [e for e in examples if isinstance(e, torch.Tensor)]
    assert tensors and all(isinstance(s, int) for t in tensors for s in (*t.shape, *t.stride()))
    assert any(t.shape[:2] == (1, 48) for t in tensors)
    assert not any(isinstance(e, torch.SymInt) for e in examples)
    original = [n.meta.get("example_value") for n in gm.graph.nodes]
    assert any(isinstance(s, torch.SymInt) for t in original if isinstance(t, torch.Tensor) for s in t.shape)


def test_a_static_graph_keeps_its_examples():
    gm, _ = _traced(_Projections(), torch.randn(1, 48, 32), dynamic=False)
    assert not is_symbolic(gm)
    work = _copy(gm)
    before = [n.meta.get("example_value") for n in work.graph.nodes]
    concrete_examples(work)
    assert [n.meta.get("example_value") for n in work.graph.nodes] == before


@pytest.mark.parametrize("tokens", [16, 80])
def test_rules_rewrite_a_symbolic_graph_that_serves_every_token_count(tokens):
    """The rules fire on a graph whose token count is symbolic (fused_projections' view replay raised an
    internal assert of the fake-tensor dispatch there), and the rewritten graph computes other counts."""
    torch.manual_seed(0)
    module = _Projections().to(DEVICE, DTYPE)
    gm, example_inputs = _traced(module, torch.randn(1, 48, 32, device=DEVICE, dtype=DTYPE), dynamic=True)
    record = GraphRecord(inputs="", part="")
    work = rewrite_graph(gm, record, example_inputs)
    assert record.error is None and record.fired["fused_projections"] == 1, record
    assert record.fired["linear_act"] == 3, record
    x = torch.randn(1, tokens, 32, device=DEVICE, dtype=DTYPE)
    inputs = [
        tokens if isinstance(e, int | torch.SymInt) else x if e.dim() == 3 else e for e in example_inputs
    ]
    with torch.no_grad():
        (actual,) = work(*inputs)
        expected = module.double().cpu()(x.double().cpu())
        peer = module.to(DEVICE, DTYPE)(x)
    assert_matches_reference(actual, expected, peer)


def test_a_forward_called_through_tokens_marked_is_traced_once_for_every_token_count():
    """The inputs it is called with are marked (a CUDA-graph capture calls with copies of the caller's
    inputs, which carry no mark of their own)."""
    traced = []

    def backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    torch._dynamo.reset()
    module = _Projections()
    compiled = tokens_marked(torch.compile(lambda x: module(x), backend=backend, dynamic=False))
    for tokens in (16, 48, 96, 32):
        x = torch.randn(1, tokens, 32)
        torch.testing.assert_close(compiled(x=x.clone()), module(x))
    assert len(traced) == 1
