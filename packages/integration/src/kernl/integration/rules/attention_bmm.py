"""Rule: attention written over heads folded into the batch, ``(B*H, S, D)`` tensors and ``torch.bmm``
(DeBERTa-v2/v3's disentangled attention), becomes ``kernl.flash_attention.attention`` on ``(B, H, S, D)``
views of the same tensors, with the added score terms as the kernel's dense additive ``bias``.

What it matches, by what it computes::

    scores = bmm(q, k^T [/ s | * s]) [/ s | * s] [+ bias]     # (B*H, Q, K)
    scores = scores.view(B, H, Q, K).masked_fill(~keep, <very negative>)
    out = bmm(softmax(scores, -1).view(B*H, Q, K), v)       # (B*H, Q, D)

The scale ``s`` is a number, or a tensor that depends on no graph input (DeBERTa divides by
``sqrt(tensor(D) * factor)`` cast to the model's dtype): it is computed once here, in that dtype, as the
model computes it. ``bias`` is any ``(B*H, Q, K)`` float term: DeBERTa's content-to-position and
position-to-content scores, gathered from relative positions, which stay PyTorch (the kernel reads the
sum once per tile instead of the softmax's three passes over it). ``keep`` goes to the kernel as the
padding mask it is (``[B, K]``) where its provenance proves it, else as the dense bool mask: DeBERTa's
``keep[b, q, k] = real[b, q] and real[b, k]`` blocks every key of a padded query row, where the kernel
returns zeros (HF averages every value; neither is a defined output). Every intermediate must have no
other user. q, k, v and the bias reach :func:`attention_call` (what the other attention rules put in
place) as ``unflatten`` views; when the output is only unfolded back to ``(B, H, Q, D)``, that view is
replaced too: the kernel writes ``(B, Q, H, D)``, which the usual ``permute(0, 2, 1, 3).contiguous()``
then reads free.
"""

import operator

import torch
from torch import fx

from kernl.integration.rules import Rule
from kernl.integration.rules._fx import (
    KEPT_REASON,
    arg,
    example,
    is_function,
    is_method,
    only_user,
)
from kernl.integration.rules._padding_mask import (
    ADDITIVE_MASKED,
    attends_everywhere,
    constant_value,
    key_padding_node,
    key_padding_source,
)
from kernl.integration.rules.attention_eager import softmax_input
from kernl.integration.rules.attention_sdpa import AttentionArgs, attention_call, unsupported_shape

BMM_TARGETS = (torch.bmm,)
VIEW_METHODS = ("view", "reshape")
INVERT_TARGETS = (operator.invert, torch.logical_not, torch.bitwise_not)


def _scale_factor(node) -> float | None:
    """The number ``node`` stands for: a Python number, or a tensor computed from no graph input."""
    if isinstance(node, bool):
        return None
    if isinstance(node, int | float):
        return float(node)
    value = constant_value(node)
    return float(value) if value is not None and value.numel() == 1 else None


def _unscaled(node, chain: list) -> tuple[object, float] | None:
    """``(x, factor)`` when ``node`` is ``x * s``, ``x / s`` or ``x`` alone (factor 1), ``node``
    used once (appended to ``chain`` when it is a product); None when ``s`` is not a constant."""
    if not is_function(node, (operator.mul, operator.truediv)) or only_user(node) is None:
        return node, 1.0
    x, s = node.args
    factor = _scale_factor(s)
    if factor is None and node.target is operator.mul:  # s * x
        x, s = s, x
        factor = _scale_factor(s)
    if factor is None or factor == 0 or not isinstance(x, fx.Node):
        return None
    chain.append(node)
    return x, factor if node.target is operator.mul else 1.0 / factor


def _is_product(node) -> bool:
    """``bmm(...)``, scaled or not."""
    found = _unscaled(node, [])
    return found is not None and _is_bmm(found[0])


def _scores(node, chain: list):
    """``(q, k, scale)`` when ``node`` is ``bmm(q, k^T [* s]) [* s]``, else None."""
    found = _unscaled(node, chain)
    if found is None or not _is_bmm(found[0]) or only_user(found[0]) is None:
        return None
    product, after = found
    q, key_t = product.args
    chain.append(product)
    found = _unscaled(key_t, chain)
    if found is None:
        return None
    key_t, before = found
    is_transpose = is_method(key_t, ("transpose",)) or is_function(key_t, (torch.transpose,))
    if not is_transpose or only_user(key_t) is None or {d % 3 for d in key_t.args[1:3]} != {1, 2}:
        return None
    chain.append(key_t)
    return q, key_t.args[0], after * before


def _is_bmm(node) -> bool:
    """``torch.bmm(a, b)`` or ``a.bmm(b)``."""
    return (is_function(node, BMM_TARGETS) or is_method(node, ("bmm",))) and len(node.args) == 2


def _filled_mask(node) -> tuple[fx.Node, bool] | None:
    """``(mask, is_keep)`` for ``masked_fill(scores, blocked, <very negative>)``: ``blocked`` itself, or
    ``keep`` when ``blocked`` is ``~keep`` spelled out (``is_keep``); None for a fill that blocks nothing."""
    blocked, fill = arg(node, 1, "mask"), arg(node, 2, "value")
    if not isinstance(fill, float | int) or fill > ADDITIVE_MASKED or not isinstance(blocked, fx.Node):
        return None
    if is_function(blocked, INVERT_TARGETS) or is_method(blocked, ("logical_not", "bitwise_not")):
        return blocked.args[0], True
    return blocked, False


def _match(node: fx.Node):
    """The pieces of the folded-heads attention ending at the bmm ``node``, or None."""
    probs3, v = node.args
    if not is_method(probs3, VIEW_METHODS) or only_user(probs3) is None:
        return None
    chain = [node, probs3]
    probs = probs3.args[0]
    if is_method(probs, ("to", "type_as")) and only_user(probs) is not None:
        chain.append(probs)
        probs = probs.args[0]
    filled = softmax_input(probs)
    if filled is None or only_user(probs) is None or only_user(filled) is None:
        return None
    chain.append(probs)
    if not (is_method(filled, ("masked_fill",)) or is_function(filled, (torch.masked_fill,))):
        return None
    mask = _filled_mask(filled)
    scores4 = filled.args[0]
    if mask is None or not is_method(scores4, VIEW_METHODS) or only_user(scores4) is None:
        return None
    chain += [filled, scores4]
    scores3, bias = scores4.args[0], None
    if is_function(scores3, (operator.add, torch.add)) and len(scores3.args) == 2 and not scores3.kwargs:
        if only_user(scores3) is None:
            return None
        chain.append(scores3)
        scores3, bias = scores3.args if _is_product(scores3.args[0]) else scores3.args[::-1]
    found = _scores(scores3, chain)
    if found is None:
        return None
    q, k, scale = found
    return q, k, v, scale, bias, mask, scores4, chain


def _shapes_fit(q, k, v, bias, mask, scores4) -> bool:
    """(B*H, Q, D) q, (B*H, K, D) k and v, a (B*H, Q, K) float bias, a 4-D bool mask broadcastable to
    the (B, H, Q, K) scores, q/k/v of one dtype."""
    eq, ek, ev, es, em = (example(n) for n in (q, k, v, scores4, mask))
    if any(t is None for t in (eq, ek, ev, es, em)) or es.dim() != 4 or eq.dim() != 3:
        return False
    batch, heads, queries, keys = es.shape
    if (
        tuple(eq.shape[:2]) != (batch * heads, queries)
        or ek.shape != ev.shape
        or len({eq.dtype, ek.dtype, ev.dtype}) != 1
    ):
        return False
    if ek.dim() != 3 or tuple(ek.shape[:2]) != (batch * heads, keys) or ek.shape[2] != eq.shape[2]:
        return False
    if (
        em.dtype != torch.bool
        or em.dim() != 4
        or any(m not in (1, s) for m, s in zip(em.shape, es.shape, strict=True))
    ):
        return False
    eb = example(bias) if bias is not None else None
    return bias is None or (
        eb is not None and eb.is_floating_point() and tuple(eb.shape) == (batch * heads, queries, keys)
    )


def _mask_args(gm: fx.GraphModule, mask: fx.Node, is_keep: bool, scores4) -> tuple[object, object]:
    """``(mask, key_padding_mask)`` for the kernel from the filled ``mask`` (see :func:`_filled_mask`):
    the key padding node where the kept keys provably are one, nothing where every key is kept, else the
    dense bool mask (True = attend)."""
    keep = mask
    if not is_keep:
        with gm.graph.inserting_after(mask):
            keep = gm.graph.call_function(operator.invert, (mask,))  # left to dead code elimination if unused
    if attends_everywhere(keep, additive=False):
        return None, None
    heads, queries = example(scores4).shape[1:3]
    source = key_padding_source(keep, heads=heads, queries=queries, additive=False)
    return (keep, None) if source is None else (None, key_padding_node(gm, source))


def _unfolded(gm: fx.GraphModule, node, heads: int):
    """``node.unflatten(0, (-1, heads))``: ``(B*H, ...)`` viewed as ``(B, H, ...)`` (None stays None)."""
    return None if node is None else gm.graph.call_method("unflatten", (node, 0, (-1, heads)))


def _unfolding_view(node: fx.Node, scores4) -> fx.Node | None:
    """The only user of the output ``node`` when it is a view of it as ``(B, H, Q, D)``."""
    user, shape = only_user(node), tuple(example(scores4).shape[:3])
    value = example(user) if user is not None and is_method(user, VIEW_METHODS) else None
    return user if value is not None and value.dim() == 4 and tuple(value.shape[:3]) == shape else None


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each matched folded-heads attention; return how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not _is_bmm(node) or (match := _match(node)) is None:
            continue
        q, k, v, scale, bias, (mask, is_keep), scores4, chain = match
        if not _shapes_fit(q, k, v, bias, mask, scores4):
            continue
        if (reason := unsupported_shape(q)) is not None:
            for kept in chain:
                kept.meta[KEPT_REASON] = reason
            continue
        mask, key_padding_mask = _mask_args(gm, mask, is_keep, scores4)
        unfolding = _unfolding_view(node, scores4)
        last, dead = (node, chain[::-1]) if unfolding is None else (unfolding, [*chain[::-1], unfolding])
        heads = int(example(scores4).shape[1])
        with gm.graph.inserting_before(last):
            q4, k4, v4, bias4 = (_unfolded(gm, t, heads) for t in (q, k, v, bias))
            args = AttentionArgs(q4, k4, v4, scale, mask, key_padding_mask, False, bias4)
            call = gm.graph.call_function(attention_call, tuple(args))
            out = call if unfolding is not None else gm.graph.call_method("flatten", (call, 0, 1))
        out.meta = dict(last.meta)
        last.replace_all_uses_with(out)
        for dead_node in reversed(dead):
            gm.graph.erase_node(dead_node)
        replaced += 1
    return replaced


RULE = Rule(
    name="attention_bmm",
    matches="bmm(q, k^T / s) [+ bias] -> view(B, H, Q, K) -> masked_fill(~keep, min) -> softmax(-1) "
    "-> view(B*H, Q, K) -> bmm(., v)  (heads folded into the batch: DeBERTa-v2/v3)",
    replacement="kernl.flash_attention.attention on (B, H, S, D) views (scale=s, bias=, key_padding_mask= | mask=)",
    rewrite=rewrite,
)
