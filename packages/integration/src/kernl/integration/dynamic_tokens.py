"""One packed graph for every token bucket: the packed token dimension is symbolic.

A packed call's inputs are ``(1, T)`` with ``T`` a token bucket. Traced with ``T`` static, each new
bucket would cost a TorchDynamo trace of the whole forward and a pass of every rule. :func:`mark_tokens`
marks ``T`` dynamic on a call's inputs instead, so TorchDynamo traces the forward once, with ``T`` a
symbol, and later buckets reuse that graph (its guards hold for every ``T`` the model accepts).

The rules read shapes from the fake tensors TorchDynamo records (``node.meta["example_value"]``) and
compare them with ints, or build meta tensors from them: with a symbolic ``T`` that would add guards
(specialising the graph to one bucket again) or fail inside the fake-tensor dispatch.
:func:`concrete_examples` therefore hands the rules a copy of those records with every symbol replaced
by the value it had in the traced call (its hint). A rule's decisions depend on which ops a graph
calls and on its feature sizes (heads, widths, dtypes), not on ``T``; the graph's own ops keep
reading ``T`` from their inputs at run time.
"""

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def mark_tokens(inputs: dict) -> None:
    """Mark dimension 1 (the packed tokens) of every tensor of ``inputs`` with at least two dimensions
    dynamic for TorchDynamo; a model whose forward needs a fixed length gets a static graph instead."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(value, 1)


def tokens_marked(compiled):
    """``compiled(**inputs)`` (a ``torch.compile``-d forward called by keyword with packed ``(1, T, ...)``
    inputs) on inputs marked by :func:`mark_tokens` first. The mark is an attribute of each tensor
    object, so it is set on the tensors TorchDynamo gets: a CUDA-graph capture calls with its own
    copies of the caller's inputs."""

    def call(**inputs):
        mark_tokens(inputs)
        return compiled(**inputs)

    return call


def _hint(value):
    """The value a symbolic int, float or bool had in the traced call (itself when it has none)."""
    hint = getattr(value.node, "hint", None)  # a property of SymNode in the torch releases kernl runs on
    return value if hint is None else hint


def _symbolic_tensor(value: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride(), value.storage_offset()))


def _concrete(value, mode: FakeTensorMode):
    """``value`` (a recorded example) with its symbols replaced by their hints."""
    if isinstance(value, _SYMBOLIC):
        return _hint(value)
    if isinstance(value, torch.Tensor) and _symbolic_tensor(value):
        shape = [_hint(s) if isinstance(s, torch.SymInt) else s for s in value.shape]
        stride = [_hint(s) if isinstance(s, torch.SymInt) else s for s in value.stride()]
        with mode:
            return torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
    if isinstance(value, tuple | list):
        items = [_concrete(item, mode) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
    return value


def is_symbolic(gm: fx.GraphModule) -> bool:
    """Whether any placeholder of ``gm`` has a symbolic size (or is a symbolic int)."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, _SYMBOLIC) or (isinstance(value, torch.Tensor) and _symbolic_tensor(value)):
            return True
    return False


def concrete_examples(gm: fx.GraphModule) -> None:
    """Replace, in place, each node's recorded example of ``gm`` (a copy of TorchDynamo's graph) by one
    whose sizes are the traced call's: see the module docstring. A graph without symbols is left as is."""
    if not is_symbolic(gm):
        return
    mode = FakeTensorMode()  # no shape environment: sizes are plain ints, comparisons add no guard
    for node in gm.graph.nodes:
        for key in ("example_value", "val"):
            if key in node.meta:
                node.meta[key] = _concrete(node.meta[key], mode)
