"""Rule: the rotary position embedding of q and k (Llama, Mistral, Qwen2) becomes one
``kernl.flash_attention.rotary`` launch for both.

Matches ``x * c + r * s`` (each product's operands, and the sum's, in either order) where ``r`` computes
``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``. That is judged by what ``r`` computes, not by how
it is spelled: the few nodes between ``x`` and ``r`` must read no other tensor, and replaying them on a
probe row of ``x``'s last dimension must give exactly the rotated halves (slices and ``cat``, ``chunk``,
a negation written as ``-x`` or ``x * -1`` all match; a rotation of interleaved pairs does not). ``c``
and ``s`` (transformers' ``cos.unsqueeze(1)``, ``sin.unsqueeze(1)``) must broadcast to ``(B, 1, S, D)``,
all in ``x``'s dtype. Two such sums over the same ``c`` and ``s`` (q's and k's) become one call; a
sum without a partner stays PyTorch.
"""

import operator
from typing import NamedTuple

import torch
from torch import fx

from kernl.flash_attention import SUPPORTED_DTYPES, rotary
from kernl.flash_attention.functional import MAX_ROTARY_DIM
from kernl.flash_attention.reference import rotate_half
from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import example, is_add, is_op

MUL_TARGETS = (operator.mul, torch.mul)
MAX_ROTATE_NODES = 8  # rotate_half is 4 nodes as transformers writes it; a bound on the walk back to x


class RotaryTerms(NamedTuple):
    """A matched ``x * cos + rotate_half(x) * sin``: the sum node and its graph inputs."""

    node: fx.Node
    x: fx.Node
    cos: fx.Node
    sin: fx.Node


def rotary_call(q, k, cos, sin):
    """What the graph calls in place of q's and k's rotary embeddings: ``(q_rotated, k_rotated)``."""
    return fallback.call("rotary", rotary, _pytorch, q, k, cos, sin)


def _pytorch(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _factors(node) -> tuple | None:
    """``(a, b)`` when ``node`` is ``a * b``."""
    if not is_op(node, MUL_TARGETS, "mul") or len(node.args) != 2 or node.kwargs:
        return None
    return node.args


def computes_rotate_half(r: fx.Node, x: fx.Node) -> bool:
    """Whether ``r`` is ``rotate_half(x)``: the nodes from ``x`` to ``r`` read no other tensor and, replayed
    on a probe of ``x``'s last dimension, give its halves swapped with the second negated."""
    between, stack = set(), [r]
    while stack:
        node = stack.pop()
        if node is x or node in between:
            continue
        if node.op not in ("call_function", "call_method") or len(between) >= MAX_ROTATE_NODES:
            return False
        between.add(node)
        stack.extend(node.all_input_nodes)
    ex = example(x)
    if not between or ex is None or ex.shape[-1] % 2:
        return False
    graph = fx.Graph()
    env = {x: graph.placeholder("x")}
    for node in x.graph.nodes:
        if node in between:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[r])
    generator = torch.Generator().manual_seed(0)  # never the caller's random state (sampling)
    probe = torch.randn((1,) * (ex.dim() - 1) + (ex.shape[-1],), dtype=torch.float64, generator=generator)
    try:
        value = fx.GraphModule(torch.nn.Module(), graph)(probe)
    except Exception:  # noqa: BLE001 - an op we cannot replay here (shapes baked in): not matched
        return False
    return (
        isinstance(value, torch.Tensor)
        and value.shape == probe.shape
        and torch.equal(value, rotate_half(probe))
    )


def _angles_fit(node: fx.Node, x: fx.Node, cos, sin) -> bool:
    """``cos``/``sin`` broadcast to ``(B, 1, S, D)`` of ``x`` ``(B, H, S, D)``; every tensor in one dtype."""
    ex, ec, es, eo = example(x), example(cos), example(sin), example(node)
    if any(t is None for t in (ex, ec, es, eo)) or ex.dim() != 4 or ec.shape != es.shape:
        return False
    if not 2 <= ex.shape[-1] <= MAX_ROTARY_DIM or eo.shape != ex.shape:
        return False
    full = (ex.shape[0], 1, ex.shape[2], ex.shape[3])
    lead = 4 - ec.dim()
    fits = lead >= 0 and all(size in (1, full[lead + i]) for i, size in enumerate(ec.shape))
    return fits and len({ex.dtype, ec.dtype, es.dtype, eo.dtype}) == 1 and ex.dtype in SUPPORTED_DTYPES


def rotary_terms(node: fx.Node) -> RotaryTerms | None:
    """The terms of ``node`` when it is ``x * cos + rotate_half(x) * sin`` (see the module docstring)."""
    if not is_add(node):
        return None
    a, b = node.args
    for plain, rotated in ((a, b), (b, a)):
        p, r = _factors(plain), _factors(rotated)
        if p is None or r is None:
            continue
        for x, cos in (p, p[::-1]):
            for half, sin in (r, r[::-1]):
                if not (isinstance(x, fx.Node) and isinstance(half, fx.Node)):
                    continue
                if computes_rotate_half(half, x) and _angles_fit(node, x, cos, sin):
                    return RotaryTerms(node, x, cos, sin)
    return None


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each pair of matched rotary embeddings (q's, then k's) by one call; return how many pairs."""
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    found = [terms for node in list(gm.graph.nodes) if (terms := rotary_terms(node)) is not None]
    replaced, paired = 0, set()
    for i, q in enumerate(found):
        if q.node in paired:
            continue
        eq = example(q.x)
        k = next(
            (
                t
                for t in found[i + 1 :]
                if t.node not in paired
                and (t.cos, t.sin) == (q.cos, q.sin)
                and order[t.x] < order[q.node]  # k exists where q's sum is: the call goes there
                and example(t.x).shape[0] == eq.shape[0]
                and example(t.x).shape[2:] == eq.shape[2:]
            ),
            None,
        )
        if k is None:
            continue
        paired.update((q.node, k.node))
        with gm.graph.inserting_before(q.node):
            call = gm.graph.call_function(rotary_call, (q.x, k.x, q.cos, q.sin))
            outputs = [gm.graph.call_function(operator.getitem, (call, index)) for index in (0, 1)]
        for terms, output in zip((q, k), outputs, strict=True):
            output.meta = dict(terms.node.meta)
            terms.node.replace_all_uses_with(output)
            gm.graph.erase_node(terms.node)
        replaced += 1
    return replaced


RULE = Rule(
    name="rotary",
    matches="q * cos + rotate_half(q) * sin and k * cos + rotate_half(k) * sin over the same cos and sin "
    "(rotate_half recognised by what it computes)",
    replacement="kernl.flash_attention.rotary(q, k, cos, sin) (one launch for both)",
    rewrite=rewrite,
)
