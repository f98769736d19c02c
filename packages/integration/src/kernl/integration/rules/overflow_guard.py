"""Rule: T5's fp16 overflow guard ``clamp(h, -c, c)``, ``c = where(isinf(h).any(), A, B)`` (twice a
layer, five small ops) becomes one ``kernl.layernorm.overflow_clamp(h, A, B)`` call (two light passes).

Each intermediate (``isinf``, ``any``, ``where``, the negation) must serve only the guard.
"""

import operator

import torch
from torch import fx

from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import arg, is_function, is_op, only_user, replace_with_call
from kernl.layernorm import overflow_clamp


def overflow_clamp_call(h, limit_if_inf, limit):
    """What the graph calls in place of the guard."""
    return fallback.call("overflow_clamp", overflow_clamp, _pytorch, h, limit_if_inf, limit)


def _pytorch(h, limit_if_inf, limit):
    bound = torch.where(torch.isinf(h).any(), limit_if_inf, limit)
    return torch.clamp(h, min=-bound, max=bound)


def _match(clamp: fx.Node):
    """``((h, A, B), guard nodes in graph order)`` for a guard ending at ``clamp``, or None."""
    h, low, high = arg(clamp, 0, "input"), arg(clamp, 1, "min"), arg(clamp, 2, "max")
    negated = is_op(low, (operator.neg, torch.neg), "neg")
    if not negated or low.args[0] is not high or only_user(low) is not clamp or len(high.users) != 2:
        return None
    if not is_function(high, (torch.where,)) or len(high.args) != 3 or high.kwargs:
        return None
    found, limit_if_inf, limit = high.args
    if not all(isinstance(v, float | int) for v in (limit_if_inf, limit)) or only_user(found) is not high:
        return None
    if not is_op(found, (torch.any,), "any") or len(found.args) != 1 or found.kwargs:
        return None
    infinite = found.args[0]
    if not is_op(infinite, (torch.isinf,), "isinf") or only_user(infinite) is not found:
        return None
    if infinite.args != (h,) or infinite.kwargs:
        return None
    return (h, float(limit_if_inf), float(limit)), [infinite, found, high, low, clamp]


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each guard by one kernel call; return how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, (torch.clamp,), "clamp"):
            continue
        if (match := _match(node)) is not None:
            replace_with_call(gm, node, overflow_clamp_call, *match)
            replaced += 1
    return replaced


RULE = Rule(
    name="overflow_guard",
    matches="clamp(h, -c, c) with c = where(isinf(h).any(), A, B) (T5's fp16 guard)",
    replacement="kernl.layernorm.overflow_clamp(h, A, B)",
    rewrite=rewrite,
)
