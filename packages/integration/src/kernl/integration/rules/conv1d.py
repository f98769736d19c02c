"""Rule: GPT-2's ``Conv1D``, ``torch.addmm(bias, x, W)`` with ``W`` stored ``(K, N)``, becomes
``kernl.linear_act.linear_act(x, W.T, bias)`` (the kernel reads the transposed view in place), with
what follows the ``view`` that puts the tokens back fused where it can be: an activation, written out
or not (GPT-2's "gelu_new" is mul / pow / tanh / add, recognised on probe values as in
:mod:`.gated_ffn`), or a residual add of the same shape.
"""

import torch
from torch import fx

from kernl.integration.rules import Rule
from kernl.integration.rules._fx import example, is_add, is_function, is_method, only_user, same_layout
from kernl.integration.rules.gated_ffn import _activation_of, _region
from kernl.integration.rules.linear_act import linear_act_call

ADDMM_TARGETS = (torch.addmm,)
_REGION_LIMIT = 16  # nodes after the view searched for the end of a written-out activation


def _conv1d(node: fx.Node) -> tuple | None:
    """``(x, weight, bias)`` of ``addmm(bias, x, W)``: 2-D ``x`` ``(M, K)`` and ``W`` ``(K, N)``, bias ``(N,)``."""
    if not is_function(node, ADDMM_TARGETS) or len(node.args) != 3 or node.kwargs:
        return None
    bias, x, weight = node.args
    eb, ex, ew = example(bias), example(x), example(weight)
    if eb is None or ex is None or ew is None or ex.dim() != 2 or ew.dim() != 2:
        return None
    if eb.shape != (ew.shape[1],) or ex.shape[1] != ew.shape[0] or len({eb.dtype, ex.dtype, ew.dtype}) != 1:
        return None
    return x, weight, bias


def _activation_after(start: fx.Node, position: dict) -> tuple[str, fx.Node, list[fx.Node]] | None:
    """``(activation, last node, region)`` for the longest run of nodes after ``start`` that computes one
    of the kernel's activations from ``start`` alone, or None."""
    later = [n for n in start.graph.nodes if position.get(n, -1) > position[start]][:_REGION_LIMIT]
    for end in reversed(later):
        region = _region(start, end, position)
        if region is not None and (activation := _activation_of(region, start)) is not None:
            return activation, end, region
    return None


def _view_of(node: fx.Node) -> fx.Node | None:
    """The ``view`` that is ``node``'s only user, restoring the token dimensions."""
    user = only_user(node)
    return user if is_method(user, ("view",)) and user.args[0] is node and not user.kwargs else None


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each ``Conv1D`` (with its activation or residual add, where there is one)."""
    replaced = 0
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node not in position or (match := _conv1d(node)) is None:
            continue
        x, weight, bias = match
        view, activation, residual, last, dead = _view_of(node), None, None, node, [node]
        if view is not None:
            last, dead = view, [node, view]
            found = _activation_after(view, position)
            if found is not None:
                activation, last, region = found
                dead += region
            user = only_user(last)
            if activation is None and is_add(user):
                other = user.args[1] if user.args[0] is last else user.args[0]
                if other is not last and isinstance(other, fx.Node) and same_layout(other, last):
                    residual, last, dead = other, user, dead + [user]
        with gm.graph.inserting_before(last):
            transposed = gm.graph.call_function(torch.t, (weight,))
            flat = (
                None
                if residual is None
                else gm.graph.call_method("reshape", (residual, (-1, example(residual).shape[-1])))
            )
            call = gm.graph.call_function(linear_act_call, (x, transposed, bias, activation, flat))
            out = call if view is None else gm.graph.call_method("view", (call, *view.args[1:]))
        out.meta = dict(last.meta)
        last.replace_all_uses_with(out)
        for gone in sorted(dead, key=position.__getitem__, reverse=True):
            gm.graph.erase_node(gone)
            del position[gone]
        replaced += 1
    return replaced


RULE = Rule(
    name="conv1d",
    matches="torch.addmm(b, x, W) (GPT-2 Conv1D) [-> view -> activation, written out or not | + residual]",
    replacement="kernl.linear_act.linear_act(x, W.T, b, activation=..., residual=...)",
    rewrite=rewrite,
)
