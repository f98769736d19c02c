"""Rules: grouped-query attention (Llama, Mistral, Qwen2) becomes ``kernl.flash_attention.attention`` on the
key/value heads themselves, without transformers' ``repeat_kv`` copies.

Both match ``F.scaled_dot_product_attention`` whose keys and values are either ``repeat_kv``'s
``k[:, :, None].expand(B, Hkv, G, K, D).reshape(B, H, K, D)`` or passed with ``enable_gqa=True``
(``(B, Hkv, K, D)``).

- ``attention_gqa_decode``: one query token (``q`` ``(B, H, 1, D)``) with a mask over keys only. The
  ``G`` query heads that share a key/value head become ``G`` queries of that head: ``q.view(B, Hkv, G,
  D)`` is a view, and with a single query token no causal mask can tell those queries apart (a mask
  over keys, ``(B, 1, 1, K)`` or ``(B, K)`` broadcast, applies to each alike). Each key/value head is
  read once for its ``G`` queries, where indexing the heads in the kernel would read it ``G`` times
  (once per query head, each program padded to a tile of query rows): a decoding step is bound by
  those reads.
- ``attention_gqa`` (a prefill, or one token the decode rule leaves): the kernel's grouped heads,
  query head ``h`` reading key/value head ``h // G``, with the mask handled as
  :mod:`.attention_sdpa` does (a decoder's causal mask as the causal flag and its padding as a key
  padding mask, where proven by replay).
"""

import operator

import torch
from torch import fx

from kernl.flash_attention import attention
from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import (
    autocast_dtype,
    cast_all,
    example,
    is_function,
    is_method,
    replace_with_call,
)
from kernl.integration.rules.attention_sdpa import qkv_ok, replace_sdpa, sdpa_calls, unsupported_shape


def grouped_decode_call(q, k, v, scale, mask):
    """One query token's attention with ``H = G * Hkv`` query heads over ``Hkv`` key/value heads:
    q ``(B, H, 1, D)``, k/v ``(B, Hkv, K, D)``, mask broadcastable to ``(B, 1, 1, K)``; returns
    ``(B, H, 1, D)``."""
    q, k, v = cast_all(autocast_dtype(q.device.type), q, k, v)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    batch, heads, _, head_dim = q.shape
    grouped = q.reshape(batch, k.shape[1], heads // k.shape[1], head_dim)
    out = fallback.call("attention", attention, _pytorch, grouped, k, v, scale=scale, mask=mask)
    return out.reshape(batch, heads, 1, head_dim)


def _pytorch(q, k, v, *, scale, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=scale)


def _repeated_heads(node) -> fx.Node | None:
    """``k`` when ``node`` is ``k[:, :, None].expand(B, Hkv, G, K, D).reshape(B, Hkv * G, K, D)``."""
    if not is_method(node, ("reshape",)) or len(node.args) < 2:
        return None
    expanded = node.args[0]
    if not is_method(expanded, ("expand",)) or not is_function(expanded.args[0], (operator.getitem,)):
        return None
    indexed = expanded.args[0]
    source, index = indexed.args
    full = (slice(None), slice(None), None, slice(None), slice(None))
    es, ee = example(source), example(expanded)
    if index != full or es is None or ee is None or es.dim() != 4 or ee.dim() != 5:
        return None
    return source if ee.shape[:2] == es.shape[:2] and ee.shape[3:] == es.shape[2:] else None


def _mask_over_keys(mask) -> bool:
    em = example(mask)
    return mask is None or (em is not None and em.dim() == 4 and em.shape[1] == 1 and em.shape[2] == 1)


def _key_value_heads(k, v, enable_gqa) -> tuple | None:
    """``(k, v)`` with their own ``Hkv`` heads: as given under ``enable_gqa=True``, else the sources of
    ``repeat_kv``; None when neither is the case."""
    if enable_gqa is not True:
        k, v = _repeated_heads(k), _repeated_heads(v)
    ek, ev = example(k), example(v)
    return None if ek is None or ev is None or ek.shape != ev.shape else (k, v)


def rewrite_decode(gm: fx.GraphModule) -> int:
    """Replace each matched one-token grouped attention; return how many were replaced."""
    replaced = 0
    for node, call in sdpa_calls(gm):
        q, k, v, mask, dropout_p, causal, scale, gqa = call
        eq = example(q)
        if eq is None or eq.dim() != 4 or dropout_p != 0 or causal not in (False, True):
            continue
        if eq.shape[2] != 1 or causal or unsupported_shape(q) is not None:
            continue
        if not (scale is None or isinstance(scale, float | int)) or not _mask_over_keys(mask):
            continue
        heads = _key_value_heads(k, v, gqa)
        if heads is None:
            continue
        k, v = heads
        ek, ev = example(k), example(v)
        if (
            ek.shape[1] == eq.shape[1]
            or eq.shape[1] % ek.shape[1]
            or len({eq.dtype, ek.dtype, ev.dtype}) != 1
        ):
            continue
        replace_with_call(gm, node, grouped_decode_call, (q, k, v, scale, mask), [node])
        replaced += 1
    return replaced


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each grouped attention left (a prefill's) by the kernel's grouped heads; return how many."""
    replaced = 0
    for node, call in sdpa_calls(gm):
        q, k, v, mask, dropout_p, causal, scale, gqa = call
        if dropout_p != 0:
            continue
        heads = _key_value_heads(k, v, gqa)
        if heads is None or not qkv_ok(q, *heads) or example(q).shape[1] % example(heads[0]).shape[1]:
            continue
        replaced += replace_sdpa(gm, node, q, *heads, mask, causal, scale)
    return replaced


DECODE_RULE = Rule(
    name="attention_gqa_decode",
    matches="F.scaled_dot_product_attention of one query token over repeat_kv(k), repeat_kv(v) "
    "(or enable_gqa=True), mask over keys only",
    replacement="kernl.flash_attention.attention(q.view(B, Hkv, G, D), k, v, mask=) (no repeated cache)",
    rewrite=rewrite_decode,
)

RULE = Rule(
    name="attention_gqa",
    matches="F.scaled_dot_product_attention over repeat_kv(k), repeat_kv(v) (or enable_gqa=True), dropout_p=0",
    replacement="kernl.flash_attention.attention(q, k, v, scale=, key_padding_mask=[B,K] | mask=, causal=) "
    "on the Hkv key/value heads (query head h reads head h // G)",
    rewrite=rewrite,
)
