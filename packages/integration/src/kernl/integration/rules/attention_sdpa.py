"""Rule: ``F.scaled_dot_product_attention`` becomes ``kernl.flash_attention.attention``.

Matches sdpa on 4-D ``(B, H, S, D)`` q/k/v with ``dropout_p == 0``. The mask goes to the kernel as a
key padding mask ``[B, K]`` when its provenance from a ``[B, K]`` graph input (``attention_mask``) is
checked (see :mod:`._padding_mask`), so padded key blocks are skipped; otherwise as the dense mask.
A bias folded into the mask (T5's position bias: ``where(keep, bias, -big)``) goes to the kernel as
``bias=`` beside the mask it was folded with.
"""

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import fx

from kernl.flash_attention import MAX_HEAD_DIM, attention
from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._causal_mask import causal_source
from kernl.integration.rules._fx import (
    KEPT_REASON,
    arg,
    autocast_dtype,
    cast_all,
    example,
    is_function,
    is_method,
    replace_with_call,
)
from kernl.integration.rules._padding_mask import (
    ADDITIVE_MASKED,
    attends_everywhere,
    key_padding_node,
    key_padding_source,
)

SDPA_TARGETS = (torch.nn.functional.scaled_dot_product_attention,)


class SdpaCall(NamedTuple):
    """The arguments of a ``F.scaled_dot_product_attention`` node, given by position or by name: graph
    nodes (tensors) or constants, with sdpa's defaults where the call leaves one out."""

    q: object
    k: object
    v: object
    mask: object
    dropout_p: object
    causal: object
    scale: object
    enable_gqa: object


def sdpa_calls(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, SdpaCall]]:
    """Each sdpa node of ``gm`` (one of :data:`SDPA_TARGETS`) with its arguments, in graph order; the
    nodes are listed first, so the caller may replace them as it goes."""
    for node in list(gm.graph.nodes):
        if is_function(node, SDPA_TARGETS):
            yield (
                node,
                SdpaCall(
                    q=arg(node, 0, "query"),
                    k=arg(node, 1, "key"),
                    v=arg(node, 2, "value"),
                    mask=arg(node, 3, "attn_mask"),
                    dropout_p=arg(node, 4, "dropout_p", 0.0),
                    causal=arg(node, 5, "is_causal", False),
                    scale=arg(node, 6, "scale"),
                    enable_gqa=arg(node, 7, "enable_gqa", False),
                ),
            )


class AttentionArgs(NamedTuple):
    """The arguments of :func:`attention_call`, in its order: graph nodes (tensors) or constants.

    ``mask``: a dense mask ``[B, 1|H, Q, K]`` (bool: True = attend, or additive), or None;
    ``key_padding_mask``: bool ``[B, K]`` (True = real token) standing for the mask, or None;
    ``bias``: an additive ``[1|B, H, Q, K]`` bias (T5's position bias), or None.
    """

    q: object
    k: object
    v: object
    scale: float | None
    mask: object
    key_padding_mask: object
    causal: bool
    bias: object = None


def attention_call(q, k, v, scale, mask, key_padding_mask, causal, bias=None):
    """What the graph calls in place of the matched attention (autocast dtype when it is on)."""
    q, k, v = cast_all(autocast_dtype(q.device.type), q, k, v)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    if bias is not None:
        bias = bias.to(q.dtype)
    return fallback.call(
        "attention", attention, _pytorch, q, k, v,
        scale=scale, bias=bias, mask=mask, key_padding_mask=key_padding_mask, causal=causal,
    )  # fmt: skip


def _pytorch(q, k, v, *, scale, bias, mask, key_padding_mask, causal):
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
    if bias is not None:
        mask = bias if mask is None else torch.where(mask, bias, torch.finfo(bias.dtype).min)
    grouped = k.shape[1] != q.shape[1]  # grouped-query attention: k/v hold the key/value heads
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, mask, scale=scale, is_causal=causal, enable_gqa=grouped
    )


def _bias_and_keep(mask: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(bias, keep)`` when the additive ``mask`` is ``where(keep, bias, <very negative>)[.contiguous()]``:
    T5 under sdpa folds its position bias and the padding into one ``[B, H, Q, K]`` tensor that way."""
    if is_method(mask, ("contiguous",)) and len(mask.args) == 1:
        mask = mask.args[0]
    if not is_function(mask, (torch.where,)) or len(mask.args) != 3 or mask.kwargs:
        return None
    keep, bias, blocked = mask.args
    ek, eb = example(keep), example(bias)
    if ek is None or eb is None or ek.dtype != torch.bool or not eb.is_floating_point() or eb.dim() != 4:
        return None
    return (bias, keep) if isinstance(blocked, float) and blocked <= ADDITIVE_MASKED else None


def contiguous_once(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node.contiguous()``, one node shared by every attention that reads ``node``. T5's position bias
    is a permuted view with the heads innermost: the kernel would read its tiles with a stride of H."""
    for user in node.users:
        if user.meta.get("kernl_contiguous"):
            return user
    with gm.graph.inserting_after(node):
        copy = gm.graph.call_method("contiguous", (node,))
    copy.meta["kernl_contiguous"] = True
    return copy


def attention_args(gm: fx.GraphModule, q, k, v, scale, mask, causal, additive: bool) -> AttentionArgs:
    """Arguments of :func:`attention_call`: the mask turned into a key padding mask where possible, and
    an additive bias taken out of the mask where it was folded in (see :func:`_bias_and_keep`)."""
    eq = example(q)
    split = _bias_and_keep(mask) if additive else None
    if split is not None:
        bias, keep = split
        unbiased = attention_args(gm, q, k, v, scale, keep, causal, additive=False)
        return unbiased._replace(bias=contiguous_once(gm, bias))
    plain = AttentionArgs(q, k, v, scale, mask=None, key_padding_mask=None, causal=causal)
    if mask is None or attends_everywhere(mask, additive):
        return plain
    keys = example(k).shape[2]
    if not causal and (found := causal_source(mask, eq.shape[1], eq.shape[2], keys, additive)) is not None:
        (source,) = found  # a decoder's causal mask, and its padding: the kernel's causal flag
        padding = None if source is None else key_padding_node(gm, source)
        return plain._replace(causal=True, key_padding_mask=padding)
    source = key_padding_source(mask, heads=eq.shape[1], queries=eq.shape[2], additive=additive)
    if source is None:
        return plain._replace(mask=mask)
    return plain._replace(key_padding_mask=key_padding_node(gm, source))


def unsupported_shape(q) -> str | None:
    """Why the kernel cannot take attention over ``q`` (a node with a 4-D example value), or None."""
    head_dim = example(q).shape[-1]
    return f"head_dim {head_dim} > {MAX_HEAD_DIM}" if head_dim > MAX_HEAD_DIM else None


def qkv_ok(*nodes) -> bool:
    """q, k, v have 4-D example values of one dtype."""
    values = [example(n) for n in nodes]
    return all(t is not None and t.dim() == 4 for t in values) and len({t.dtype for t in values}) == 1


def replace_sdpa(gm: fx.GraphModule, node: fx.Node, q, k, v, mask, causal, scale) -> bool:
    """Replace the sdpa ``node`` by :func:`attention_call` over nodes ``q``, ``k``, ``v`` (k/v may have
    fewer heads, a divisor of q's: grouped-query attention) when the kernel takes its mask, causal flag,
    scale and head size; return whether it did (a head size it cannot take is noted on the node)."""
    if not isinstance(causal, bool) or not (scale is None or isinstance(scale, float | int)):
        return False
    if mask is not None and (example(mask) is None or example(mask).dim() != 4):
        return False
    if (reason := unsupported_shape(q)) is not None:
        node.meta[KEPT_REASON] = reason
        return False
    additive = mask is not None and example(mask).dtype != torch.bool
    call_args = attention_args(gm, q, k, v, scale, mask, causal, additive)
    replace_with_call(gm, node, attention_call, tuple(call_args), [node])
    return True


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each matched sdpa call; return how many were replaced."""
    replaced = 0
    for node, call in sdpa_calls(gm):
        q, k, v, mask, dropout_p, causal, scale, enable_gqa = call
        if dropout_p != 0 or not qkv_ok(q, k, v) or enable_gqa:
            continue
        replaced += replace_sdpa(gm, node, q, k, v, mask, causal, scale)
    return replaced


RULE = Rule(
    name="attention_sdpa",
    matches="F.scaled_dot_product_attention(q, k, v, attn_mask=None | bool | additive, dropout_p=0)",
    replacement="kernl.flash_attention.attention(q, k, v, scale=, bias=, key_padding_mask=[B,K] | mask=, causal=)",
    rewrite=rewrite,
)
