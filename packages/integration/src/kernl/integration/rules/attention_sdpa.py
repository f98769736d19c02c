"""Rule: ``F.scaled_dot_product_attention`` becomes ``kernl.flash_attention.attention``.

Matches sdpa on 4-D ``(B, H, S, D)`` q/k/v with ``dropout_p == 0``. The mask goes to the kernel as a
key padding mask ``[B, K]`` when its provenance from a ``[B, K]`` graph input (``attention_mask``) is
checked (see :mod:`._padding_mask`), so padded key blocks are skipped; otherwise as the dense mask.
"""

import torch
from torch import fx

from kernl.integration import fallback
from kernl.integration.kernels import find
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import arg, autocast_dtype, cast_all, example, is_function, replace_with_call
from kernl.integration.rules._padding_mask import attends_everywhere, key_padding_node, key_padding_source

SDPA_TARGETS = (torch.nn.functional.scaled_dot_product_attention,)


def attention_call(q, k, v, scale, mask, key_padding_mask, causal):
    """What the graph calls in place of the matched attention (autocast dtype when it is on)."""
    q, k, v = cast_all(autocast_dtype(q.device.type), q, k, v)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    return fallback.call("attention", _kernel, _pytorch, q, k, v, scale, mask, key_padding_mask, causal)


def _kernel(q, k, v, scale, mask, key_padding_mask, causal):
    return find("attention")(
        q, k, v, scale=scale, mask=mask, key_padding_mask=key_padding_mask, causal=causal
    )


def _pytorch(q, k, v, scale, mask, key_padding_mask, causal):
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=scale, is_causal=causal)


def attention_args(gm: fx.GraphModule, q, k, v, scale, mask, causal, additive: bool):
    """Arguments of :func:`attention_call`, the mask turned into a key padding mask where possible."""
    eq = example(q)
    if mask is None or attends_everywhere(mask, additive):
        return (q, k, v, scale, None, None, causal)
    source = key_padding_source(mask, heads=eq.shape[1], queries=eq.shape[2], additive=additive)
    if source is None:
        return (q, k, v, scale, mask, None, causal)
    return (q, k, v, scale, None, key_padding_node(gm, source), causal)


def qkv_ok(*nodes) -> bool:
    """q, k, v have 4-D example values of one dtype."""
    values = [example(n) for n in nodes]
    return all(t is not None and t.dim() == 4 for t in values) and len({t.dtype for t in values}) == 1


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each matched sdpa call; return how many were replaced."""
    if find("attention") is None:
        return 0
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_function(node, SDPA_TARGETS):
            continue
        q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        mask, dropout_p = arg(node, 3, "attn_mask"), arg(node, 4, "dropout_p", 0.0)
        causal, scale = arg(node, 5, "is_causal", False), arg(node, 6, "scale")
        if dropout_p != 0 or not qkv_ok(q, k, v) or arg(node, 7, "enable_gqa", False):
            continue
        if not isinstance(causal, bool) or not (scale is None or isinstance(scale, float | int)):
            continue
        if mask is not None and (example(mask) is None or example(mask).dim() != 4):
            continue
        additive = mask is not None and example(mask).dtype != torch.bool
        call_args = attention_args(gm, q, k, v, scale, mask, causal, additive)
        replace_with_call(gm, node, attention_call, call_args, [node])
        replaced += 1
    return replaced


RULE = Rule(
    name="attention_sdpa",
    kernel="attention",
    matches="F.scaled_dot_product_attention(q, k, v, attn_mask=None | bool | additive, dropout_p=0)",
    replacement="kernl.flash_attention.attention(q, k, v, scale=, key_padding_mask=[B,K] | mask=, causal=)",
    rewrite=rewrite,
)
