"""Rule: ``act(linear(x, w0)) * linear(x, w1)`` (the T5 v1.1 / flan-T5 gated FFN) becomes one
``kernl.linear_act.gated_linear_act`` call that reads ``x`` once.

The activation may be one call (``F.gelu``, ``F.relu``, ``F.silu``) or the elementwise ops a module
writes out (transformers' "gelu_new" is mul / pow / tanh / add): the nodes between the first linear and
the product are run on probe values in fp64 and compared with each activation the kernel has, so no
spelling is assumed. Runs before the ``linear_act`` rule, which would otherwise take the linears apart.
"""

import operator

import torch
from torch import fx

from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import (
    arg,
    autocast_dtype,
    cast_all,
    example,
    is_function,
    is_op,
    replace_with_call,
)
from kernl.integration.rules.linear_act import LINEAR_TARGETS, TORCH_ACTIVATIONS
from kernl.linear_act import gated_linear_act

F = torch.nn.functional
ACTIVATIONS = {name: TORCH_ACTIVATIONS[name] for name in ("gelu", "gelu_tanh", "relu", "silu")}
# Probe values: dense where the activations bend, and out to 1e30 on both sides, so that a clamp after
# the activation (transformers' "gelu_10" clips at +-10) does not pass for the plain activation.
_TAILS = torch.logspace(1, 30, 59, dtype=torch.float64)
_PROBE = torch.cat([torch.linspace(-8.0, 8.0, 401, dtype=torch.float64), _TAILS, -_TAILS])


def gated_linear_act_call(x, w0, w1, activation):
    """What the graph calls in place of the matched nodes (in the autocast dtype under autocast)."""
    x, w0, w1 = cast_all(autocast_dtype(x.device.type), x, w0, w1)
    return fallback.call("gated_linear_act", gated_linear_act, _pytorch, x, w0, w1, activation)


def _pytorch(x, w0, w1, activation):
    return ACTIVATIONS[activation](F.linear(x, w0)) * F.linear(x, w1)


def _plain_linear(node) -> tuple | None:
    """``(x, weight)`` of ``F.linear(x, weight)`` without bias, or None."""
    if not is_function(node, LINEAR_TARGETS) or arg(node, 2, "bias") is not None:
        return None
    return arg(node, 0, "input"), arg(node, 1, "weight")


def _region(start: fx.Node, end: fx.Node, position: dict) -> list[fx.Node] | None:
    """The nodes computing ``end`` from ``start`` and constants alone, in graph order; None when another
    value feeds them, or when ``start`` or a node before ``end`` is used outside them."""
    region, stack = set(), [end]
    while stack:
        node = stack.pop()
        if node is start or node in region:
            continue
        if node.op not in ("call_function", "call_method"):
            return None
        region.add(node)
        stack.extend(node.all_input_nodes)
    if not region or any(user not in region for user in start.users):
        return None
    if any(user not in region for node in region - {end} for user in node.users):
        return None
    return sorted(region, key=position.__getitem__)


def _activation_of(region: list[fx.Node], start: fx.Node) -> str | None:
    """Which of :data:`ACTIVATIONS` the region computes from ``start``, judged on probe values."""
    values = {start: _PROBE.clone()}  # a region may work in place (relu(inplace=True)): not on _PROBE
    try:
        for node in region:
            args = fx.node.map_arg(node.args, values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
            if node.op == "call_function":
                values[node] = node.target(*args, **kwargs)
            else:
                values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - anything that does not run on a probe vector is not an activation
        return None
    out = values[region[-1]]
    if not isinstance(out, torch.Tensor) or out.shape != _PROBE.shape or out.dtype != torch.float64:
        return None
    return next(
        (name for name, act in ACTIVATIONS.items() if torch.allclose(out, act(_PROBE), rtol=1e-9, atol=1e-9)),
        None,
    )


def _linears_feeding(gate: fx.Node, limit: int = 64) -> list[fx.Node]:
    """Bias-free linears that ``gate`` is computed from, walking back through at most ``limit`` ops."""
    found, seen, stack = [], set(), [gate]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node is not gate and _plain_linear(node):
            found.append(node)
        elif node.op in ("call_function", "call_method"):
            stack.extend(node.all_input_nodes)
    return found


def _same_shape_and_dtype(a, b) -> bool:
    ea, eb = example(a), example(b)
    return (
        ea is not None and eb is not None and ea.dim() == 2 and ea.shape == eb.shape and ea.dtype == eb.dtype
    )


def _match(product: fx.Node, position: dict):
    """``((x, w0, w1, activation), dead nodes)`` for ``act(linear(x, w0)) * linear(x, w1)``, or None."""
    if not is_op(product, (operator.mul, torch.mul), "mul"):
        return None
    if len(product.args) != 2 or product.kwargs or not all(isinstance(a, fx.Node) for a in product.args):
        return None
    for gate, other in (product.args, product.args[::-1]):
        up = _plain_linear(other)
        if up is None or len(other.users) != 1:
            continue
        for first in _linears_feeding(gate):
            x, w0 = _plain_linear(first)
            if x is not up[0] or not _same_shape_and_dtype(w0, up[1]):
                continue
            region = _region(first, gate, position)
            activation = _activation_of(region, first) if region is not None else None
            if activation is not None:
                return (x, w0, up[1], activation), [first, other, *region, product]
    return None


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each gated product with one kernel call; return how many were replaced."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    replaced = 0
    for node in list(gm.graph.nodes):
        if node not in position or (match := _match(node, position)) is None:
            continue
        call_args, dead = match
        dead = sorted(dead, key=position.__getitem__)  # graph order: the product last
        for gone in dead:
            del position[gone]
        replace_with_call(gm, node, gated_linear_act_call, call_args, dead)
        replaced += 1
    return replaced


RULE = Rule(
    name="gated_ffn",
    matches="act(F.linear(x, W0)) * F.linear(x, W1), act gelu | gelu_tanh (also written out) | relu | silu",
    replacement="kernl.linear_act.gated_linear_act(x, W0, W1, activation=...)",
    rewrite=rewrite,
)
