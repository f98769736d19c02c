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
unused. The fused call attends over the whole cache with the same mask, bias and key padding: the same
computation, the writes now done by the attention launch.
"""

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


def _index_copy(node) -> tuple[fx.Node, object, fx.Node, fx.Node] | None:
    """``(cache, dim, index, source)`` when ``node`` is ``cache.index_copy_(dim, index, source)`` (method
    or ``torch.Tensor.index_copy_``), else None."""
    if not (is_method(node, ("index_copy_",)) or is_function(node, (torch.Tensor.index_copy_,))):
        return None
    parts = (arg(node, 0, "self"), arg(node, 1, "dim"), arg(node, 2, "index"), arg(node, 3, "source"))
    return parts if all(isinstance(p, fx.Node) for p in parts[::2]) and parts[2] is not None else None


def _unused(node: fx.Node) -> bool:
    """Whether ``node`` leads to nothing: an out-of-place call whose users (if any) all lead to nothing, such
    as the ``repeat_kv`` views of a cache that an attention rule stopped reading (dead code, removed after
    the rules ran)."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not isinstance(name, str) or (name.endswith("_") and not name.endswith("__")):
        return False
    return all(_unused(user) for user in node.users)


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
    parts = _index_copy(before[0])
    if parts is None or parts[0] is not cache:
        return None
    _, dim, index, source = parts
    ec, ei, es = example(cache), example(index), example(source)
    if ec is None or ei is None or es is None or ec.dim() != 4 or dim not in (2, -2):
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
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # afresh: fusing adds and removes nodes
        k_write, v_write = _row_write(k_cache, node, order), _row_write(v_cache, node, order)
        if k_write is None or v_write is None:
            continue
        (_, _, position, k_new), (_, _, v_position, v_new) = _index_copy(k_write), _index_copy(v_write)
        eq, ek = example(q), example(k_cache)
        if (
            position is not v_position
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
