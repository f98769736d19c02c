"""Rule: the T5 norm chain ``weight * (x * rsqrt(mean(x.float() ** 2, -1) + eps))[.to(dtype)]``, and
Llama's (Mistral's, Qwen2's) ``weight * (h * rsqrt(mean(h ** 2, -1) + eps)).to(x.dtype)`` with
``h = x.float()``, become ``kernl.layernorm.rms_norm``; ``a + b`` feeding it is fused as the kernel's
residual.

Anchored on ``rsqrt``: its argument must be ``mean(pow(x', 2), -1, keepdim=True) + eps`` where ``x'`` is
``x`` or ``x`` cast to float32, and its only user ``x * rsqrt``, optionally cast, then times a 1-D weight.
Every intermediate node has that one user, so the chain disappears whole.
"""

import operator

import torch
from torch import fx

from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import (
    arg,
    example,
    is_add,
    is_function,
    is_method,
    is_op,
    only_user,
    replace_with_norm_call,
    same_layout,
)
from kernl.layernorm import rms_norm

_MUL = (operator.mul, torch.mul)


def rms_norm_call(x, weight, eps, residual):
    """What the graph calls in place of the matched nodes: ``normed`` or ``(normed, x + residual)``."""
    return fallback.call("rms_norm", rms_norm, _pytorch, x, weight, eps, residual)


def _pytorch(x, weight, eps, residual):
    summed = x if residual is None else x + residual
    h = summed * torch.rsqrt(summed.float().pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * (h.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else h)
    return normed if residual is None else (normed, summed)


def _other(node: fx.Node, known):
    """The operand of binary ``node`` that is not ``known`` (None when both or neither are)."""
    a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
    return b if a is known and b is not known else a if b is known and a is not known else None


def _source(node):
    """``x`` when ``node`` is ``x`` cast to float32 (or already float32 and uncast)."""
    if is_method(node, ("float",)) and len(node.args) == 1:
        return node.args[0]
    if is_method(node, ("to",)) and node.args[1:] == (torch.float32,) and not node.kwargs:
        return node.args[0]
    ex = example(node)
    return node if ex is not None and ex.dtype == torch.float32 else None


def _match(rsqrt: fx.Node):
    """``(nodes of the chain in graph order, x, weight, eps)`` for the chain around ``rsqrt``, or None."""
    shifted = rsqrt.args[0] if len(rsqrt.args) == 1 else None
    if not is_add(shifted) or only_user(shifted) is not rsqrt:
        return None
    mean = next((a for a in shifted.args if isinstance(a, fx.Node)), None)
    eps = _other(shifted, mean)
    if not isinstance(eps, float) or not is_op(mean, (torch.mean,), "mean") or only_user(mean) is not shifted:
        return None
    dim, keepdim = arg(mean, 1, "dim"), arg(mean, 2, "keepdim", False)
    if dim not in (-1, [-1], (-1,)) or keepdim is not True or "dtype" in mean.kwargs:
        return None
    square = mean.args[0]
    if not is_op(square, (torch.pow,), "pow") or square.args[1:] not in ((2,), (2.0,)) or square.kwargs:
        return None
    x, cast = _source(square.args[0]), square.args[0]
    scaled = only_user(rsqrt)
    if x is None or only_user(square) is not mean or not is_function(scaled, _MUL):
        return None
    # T5 multiplies x itself; Llama multiplies the float32 copy it squared (which then has two users)
    llama = cast is not x and _other(scaled, rsqrt) is cast and set(cast.users) == {square, scaled}
    if not llama and (_other(scaled, rsqrt) is not x or (cast is not x and only_user(cast) is not square)):
        return None
    chain = (
        [square, mean, shifted, rsqrt, scaled] if cast is x else [cast, square, mean, shifted, rsqrt, scaled]
    )
    last, cast_to = only_user(scaled), None
    if is_method(last, ("to",)) and len(last.args) == 2 and not last.kwargs:
        chain, last, cast_to = chain + [last], only_user(last), last.args[1]
    weight = _other(last, chain[-1]) if is_function(last, _MUL) else None
    w, ex = example(weight), example(x)
    if w is None or ex is None or w.dim() != 1 or w.shape[0] != ex.shape[-1]:
        return None
    half = w.dtype in (torch.float16, torch.bfloat16)
    # rms_norm casts the normalised x to a half-precision weight's dtype, and only then: Llama's cast back
    # to x's dtype is that cast when the weight has x's dtype (or a no-op in float32)
    expected_cast = w.dtype if half else None
    if llama and w.dtype == ex.dtype and cast_to == ex.dtype:
        cast_to = expected_cast
    if cast_to != expected_cast:
        return None
    return chain + [last], x, weight, eps


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each matched norm chain (with the ``a + b`` feeding it, where there is one)."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, (torch.rsqrt,), "rsqrt") or (match := _match(node)) is None:
            continue
        chain, x, weight, eps = match
        source, residual = None, None
        later = all(u in chain or u > chain[-1] for u in x.users)  # the fused call stands at chain[-1]
        if is_add(x) and same_layout(*x.args) and same_layout(x.args[0], x) and later:
            source, (x, residual) = x, x.args
        replace_with_norm_call(gm, chain[-1], rms_norm_call, (x, weight, eps, residual), chain, source)
        replaced += 1
    return replaced


RULE = Rule(
    name="rms_norm",
    matches="weight * (x * rsqrt(mean(x.float() ** 2, -1, keepdim=True) + eps))[.to(half)] (T5LayerNorm), "
    "weight * (h * rsqrt(mean(h ** 2, -1, keepdim=True) + eps)).to(x.dtype), h = x.float() (LlamaRMSNorm), "
    "optionally fed by a + b of one shape and dtype",
    replacement="kernl.layernorm.rms_norm(x, w, eps[, residual=]) (fused add + norm)",
    rewrite=rewrite,
)
