"""Rule: a decoding step's key/value cache writes move into the attention that reads the cache, one launch
(``kernl.flash_attention.attention_decode_write``) where there were three (two ``index_copy_`` and the
attention).

A static cache's update (transformers' ``StaticLayer.update``) writes the step's new key and value rows in
place, ``k_cache.index_copy_(2, position, k_new)`` and ``v_cache.index_copy_(2, position, v_new)`` with
``k_new``/``v_new`` ``(B, H_kv, 1, D)`` and ``position`` a one-element integer tensor, and the attention then
reads the whole updated cache. The rule matches that by what it computes, after the attention rules put
kernl's attention there: both writes at one position node, into the caches that a kernl attention call
(:func:`~kernl.integration.rules.attention_sdpa.attention_call` without the causal flag, or the one-token
grouped :func:`~kernl.integration.rules.attention_gqa.grouped_decode_call`) reads as its keys and values,
nothing else touching either cache between the write and the attention, and the write's own result
unused, and nothing changed in place between the writes and the attention (the fused call reads the position
and the new rows where the attention was). The fused call attends over the whole cache with the same mask,
bias and key padding: the same computation, the writes done by the attention launch.
"""

from typing import NamedTuple

import torch
from torch import fx

from kernl.flash_attention import attention_decode_write
from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import arg, autocast_dtype, example, is_function, is_method
from kernl.integration.rules.attention_gqa import grouped_decode_call
from kernl.integration.rules.attention_sdpa import AttentionArgs, attention_call
from kernl.integration.rules.attention_sdpa import _pytorch as attention_pytorch


def cache_write_attention_call(
    q, k_cache, v_cache, k_new, v_new, position, scale, mask, key_padding_mask, bias
):
    """``k_cache.index_copy_(2, position, k_new)``, the same for v, then :func:`attention_call` over the
    caches (no causal flag), in one launch: q ``(B, H, Q, D)``, caches ``(B, H_kv, K, D)``, new rows
    ``(B, H_kv, 1, D)``, position a one-element integer tensor. Returns ``(B, H, Q, D)``."""
    if _autocast_recasts(k_cache):  # the kernel would write into autocast's copy of the cache
        _write(k_cache, v_cache, k_new, v_new, position)
        return attention_call(q, k_cache, v_cache, scale, mask, key_padding_mask, False, bias)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    if bias is not None:
        bias = bias.to(q.dtype)
    return fallback.call(
        "attention_decode_write", attention_decode_write, _pytorch, q, k_cache, v_cache, k_new, v_new, position,
        scale=scale, bias=bias, mask=mask, key_padding_mask=key_padding_mask,
    )  # fmt: skip


def grouped_cache_write_call(q, k_cache, v_cache, k_new, v_new, position, scale, mask):
    """:func:`cache_write_attention_call` for :func:`grouped_decode_call`'s one query token with ``H = G *
    H_kv`` heads: the ``G`` query heads of a key/value head become ``G`` queries of it (mask over keys
    only, broadcastable to ``(B, 1, 1, K)``). Returns ``(B, H, 1, D)``."""
    if _autocast_recasts(k_cache):
        _write(k_cache, v_cache, k_new, v_new, position)
        return grouped_decode_call(q, k_cache, v_cache, scale, mask)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    batch, heads, _, head_dim = q.shape
    grouped = q.reshape(batch, k_cache.shape[1], heads // k_cache.shape[1], head_dim)
    out = fallback.call(
        "attention_decode_write", attention_decode_write, _pytorch, grouped, k_cache, v_cache, k_new, v_new,
        position, scale=scale, bias=None, mask=mask, key_padding_mask=None,
    )  # fmt: skip
    return out.reshape(batch, heads, 1, head_dim)


def _autocast_recasts(cache: torch.Tensor) -> bool:
    target = autocast_dtype(cache.device.type)
    return target is not None and cache.is_floating_point() and cache.dtype not in (target, torch.float64)


def _write(k_cache, v_cache, k_new, v_new, position) -> None:
    k_cache.index_copy_(2, position, k_new)
    v_cache.index_copy_(2, position, v_new)


def _pytorch(q, k_cache, v_cache, k_new, v_new, position, *, scale, bias, mask, key_padding_mask):
    _write(k_cache, v_cache, k_new, v_new, position)
    return attention_pytorch(
        q,
        k_cache,
        v_cache,
        scale=scale,
        bias=bias,
        mask=mask,
        key_padding_mask=key_padding_mask,
        causal=False,
    )


class IndexCopy(NamedTuple):
    """The parts of ``cache.index_copy_(dim, index, source)``."""

    cache: fx.Node
    dim: object
    index: fx.Node
    source: fx.Node


def _index_copy(node) -> IndexCopy | None:
    """``node``'s parts when it is ``cache.index_copy_(dim, index, source)`` (method or
    ``torch.Tensor.index_copy_``) on graph nodes, else None."""
    if not (is_method(node, ("index_copy_",)) or is_function(node, (torch.Tensor.index_copy_,))):
        return None
    parts = IndexCopy(
        arg(node, 0, "self"), arg(node, 1, "dim"), arg(node, 2, "index"), arg(node, 3, "source")
    )
    nodes = (parts.cache, parts.index, parts.source)
    return parts if all(isinstance(n, fx.Node) for n in nodes) else None


def _out_of_place(node: fx.Node) -> bool:
    """Whether ``node`` is a call that changes nothing in place: no in-place method or function (a name
    ending in ``_``), nothing impure."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and not (name.endswith("_") and not name.endswith("__"))


def _unused(node: fx.Node) -> bool:
    """Whether ``node`` leads to nothing: an out-of-place call whose users (if any) all lead to nothing, such
    as the ``repeat_kv`` views of a cache that an attention rule stopped reading (dead code, removed after
    the rules ran)."""
    return _out_of_place(node) and all(_unused(user) for user in node.users)


def _changes_between(nodes: list[fx.Node], first: int, last: int, writes: tuple[fx.Node, ...]) -> bool:
    """Whether a call among ``nodes[first + 1 : last]``, the writes aside, may change a tensor in place
    (the position or a new row, which the fused call reads where the attention was)."""
    calls = ("call_function", "call_method", "call_module")
    return any(n.op in calls and n not in writes and not _out_of_place(n) for n in nodes[first + 1 : last])


def _row_write(cache: fx.Node, attention: fx.Node, order: dict) -> fx.Node | None:
    """The ``index_copy_`` node writing one row into ``cache`` that ``attention`` is the next to read: the
    cache's only other user before ``attention`` (besides :func:`_unused` ones), its result unused, its row ``(B, H_kv, 1, D)`` of the
    cache's dtype at a one-element integer position along the sequence dimension."""
    before = [
        user
        for user in cache.users
        if user is not attention and order[user] < order[attention] and not _unused(user)
    ]
    if len(before) != 1 or before[0].users:
        return None
    write = _index_copy(before[0])
    if write is None or write.cache is not cache:
        return None
    ec, ei, es = example(cache), example(write.index), example(write.source)
    if ec is None or ei is None or es is None or ec.dim() != 4 or write.dim not in (2, -2):
        return None
    if ei.dtype not in (torch.int32, torch.int64) or tuple(ei.shape) != (1,):
        return None
    if es.dtype != ec.dtype or tuple(es.shape) != (ec.shape[0], ec.shape[1], 1, ec.shape[3]):
        return None
    return before[0]


def _fuse(gm: fx.GraphModule, attention: fx.Node, function, args: tuple, writes: list[fx.Node]) -> None:
    with gm.graph.inserting_before(attention):
        fused = gm.graph.call_function(function, args)
    fused.meta = dict(attention.meta)
    attention.replace_all_uses_with(fused)
    for node in (attention, *writes):
        gm.graph.erase_node(node)


def rewrite(gm: fx.GraphModule) -> int:
    """Fuse each matched pair of cache writes into the attention reading the caches; return how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        grouped = is_function(node, (grouped_decode_call,))
        if not (grouped or is_function(node, (attention_call,))):
            continue
        q, k_cache, v_cache = node.args[:3]
        if not grouped and AttentionArgs(*node.args).causal is not False:
            continue
        if not isinstance(k_cache, fx.Node) or not isinstance(v_cache, fx.Node) or k_cache is v_cache:
            continue
        nodes = list(gm.graph.nodes)  # afresh: fusing adds and removes nodes
        order = {n: i for i, n in enumerate(nodes)}
        k_write, v_write = _row_write(k_cache, node, order), _row_write(v_cache, node, order)
        if k_write is None or v_write is None:
            continue
        if _changes_between(nodes, min(order[k_write], order[v_write]), order[node], (k_write, v_write)):
            continue
        k_parts, v_parts = _index_copy(k_write), _index_copy(v_write)
        position, k_new, v_new = k_parts.index, k_parts.source, v_parts.source
        eq, ek = example(q), example(k_cache)
        if (
            v_parts.index is not position
            or eq is None
            or eq.dtype != ek.dtype
            or example(v_cache).dtype != ek.dtype
        ):
            continue
        if grouped:
            _, _, _, scale, mask = node.args
            args = (q, k_cache, v_cache, k_new, v_new, position, scale, mask)
            _fuse(gm, node, grouped_cache_write_call, args, [k_write, v_write])
        else:
            call = AttentionArgs(*node.args)
            args = (q, k_cache, v_cache, k_new, v_new, position, call.scale, call.mask, call.key_padding_mask,
                    call.bias)  # fmt: skip
            _fuse(gm, node, cache_write_attention_call, args, [k_write, v_write])
        fused += 1
    return fused


def attention_args(node: fx.Node) -> AttentionArgs | None:
    """The attention arguments of a fused call ``node`` (the report's mask kinds), or None for another node."""
    if is_function(node, (cache_write_attention_call,)):
        q, k_cache, v_cache, _, _, _, scale, mask, key_padding_mask, bias = node.args
        return AttentionArgs(q, k_cache, v_cache, scale, mask, key_padding_mask, False, bias)
    return None


RULE = Rule(
    name="cache_write_attention",
    matches="k_cache.index_copy_(2, position, k_new) and v_cache's at the same position, then kernl's "
    "attention reading both caches (no causal flag; one-token grouped attention too)",
    replacement="kernl.flash_attention.attention_decode_write(q, k_cache, v_cache, k_new, v_new, position, "
    "scale=, bias=, mask=, key_padding_mask=): the rows stored by the attention launch",
    rewrite=rewrite,
)
