"""Rule: T5's fp16 overflow guard and the RMS norm that reads it become one
``kernl.layernorm.clamped_rms_norm`` call, with the ``a + b`` feeding the guard as its residual.

Runs after the ``rms_norm`` and ``overflow_guard`` rules and fuses what they put in the graph: an
``overflow_clamp_call(h, A, B)`` read by an ``rms_norm_call`` without a residual. The fused call returns
``(normed, guarded)``: the norm's users take the first, the guard's other users (the next sublayer's
residual) the second. One launch in place of the guard's flag, scan and clamp kernels and the norm's.
"""

import operator

from torch import fx

from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import is_add, only_user, same_layout
from kernl.integration.rules.overflow_guard import overflow_clamp_call
from kernl.integration.rules.rms_norm import rms_norm_call
from kernl.layernorm import clamped_rms_norm, clamped_rms_norm_reference


def clamped_rms_norm_call(x, weight, eps, limit_if_inf, limit, residual):
    """What the graph calls in place of guard and norm: ``(rms_norm(guarded), guarded)`` with
    ``guarded = overflow_clamp(x [+ residual], limit_if_inf, limit)``."""
    return fallback.call(
        "clamped_rms_norm", clamped_rms_norm, _pytorch, x, weight, eps, limit_if_inf, limit, residual
    )


def _pytorch(x, weight, eps, limit_if_inf, limit, residual):
    return clamped_rms_norm_reference(x, weight, eps, limit_if_inf, limit, residual)


def _defined_before(value, node: fx.Node) -> bool:
    """Whether ``value`` (a node or a constant) is available where ``node`` stands."""
    return not isinstance(value, fx.Node) or value.op == "placeholder" or value < node


def _match(guard: fx.Node):
    """``(norm node, x, weight, eps, limit_if_inf, limit, residual add or None)``, or None."""
    h, limit_if_inf, limit = guard.args
    norm = next((u for u in guard.users if u.target is rms_norm_call and u.args[0] is guard), None)
    if norm is None:
        return None
    _, weight, eps, residual = norm.args
    if residual is not None or not _defined_before(weight, guard):  # the fused call stands at the guard
        return None
    add = (
        h
        if is_add(h) and only_user(h) is guard and same_layout(*h.args) and same_layout(h.args[0], h)
        else None
    )
    return norm, h, weight, eps, limit_if_inf, limit, add


def rewrite(gm: fx.GraphModule) -> int:
    """Fuse each guard with the norm reading it; return how many were fused."""
    fused = 0
    for guard in list(gm.graph.nodes):
        if guard.op != "call_function" or guard.target is not overflow_clamp_call:
            continue
        if (match := _match(guard)) is None:
            continue
        norm, x, weight, eps, limit_if_inf, limit, add = match
        x, residual = add.args if add is not None else (x, None)
        with gm.graph.inserting_before(guard):
            call = gm.graph.call_function(
                clamped_rms_norm_call, (x, weight, eps, limit_if_inf, limit, residual)
            )
            normed = gm.graph.call_function(operator.getitem, (call, 0))
            guarded = gm.graph.call_function(operator.getitem, (call, 1))
        normed.meta, guarded.meta = dict(norm.meta), dict(guard.meta)
        norm.replace_all_uses_with(normed)
        guard.replace_all_uses_with(guarded)
        gm.graph.erase_node(norm)
        gm.graph.erase_node(guard)
        if add is not None:
            gm.graph.erase_node(add)
        fused += 1
    return fused


RULE = Rule(
    name="clamped_rms_norm",
    matches="kernl's overflow_clamp(h, A, B) read by its rms_norm (h optionally a + b of one shape and dtype)",
    replacement="kernl.layernorm.clamped_rms_norm(x, w, eps, A, B[, residual=]) -> (normed, guarded)",
    rewrite=rewrite,
)
