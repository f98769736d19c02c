"""Rule: eager attention ``matmul(q, k^T) [* scale | / d] [+ mask] -> softmax -> matmul(., v)`` becomes
``kernl.flash_attention.attention`` (run after the dropout rule, which removes the probability dropout).

The transpose of k can be ``transpose(-1, -2)``/``(2, 3)`` as a method or function; the softmax can be
``F.softmax``, ``torch.softmax`` or the method, over the last dimension, optionally cast back with
``.to(dtype)``. Every intermediate must have no other user (so ``output_attentions`` stays PyTorch).
A float mask whose provenance is a ``[B, K]`` input goes to the kernel as a key padding mask. Two added
terms (T5: the position bias, then the padding mask) are a bias and a mask when one of them turns
into a key padding mask; the other goes to the kernel as ``bias=``.
"""

import operator

import torch
from torch import fx

from kernl.integration.rules import Rule
from kernl.integration.rules._fx import (
    KEPT_REASON,
    arg,
    example,
    is_add,
    is_function,
    is_method,
    is_op,
    only_user,
    replace_with_call,
)
from kernl.integration.rules.attention_sdpa import (
    AttentionArgs,
    attention_args,
    attention_call,
    contiguous_once,
    qkv_ok,
    unsupported_shape,
)

MATMUL_TARGETS = (torch.matmul, operator.matmul)
SOFTMAX_TARGETS = (torch.nn.functional.softmax, torch.softmax)


def _is_matmul(node) -> bool:
    return is_op(node, MATMUL_TARGETS, "matmul") and len(node.args) == 2


def _transposed_key(node) -> fx.Node | None:
    if not (is_method(node, ("transpose",)) or is_function(node, (torch.transpose,))):
        return None
    dims = {d % 4 for d in node.args[1:3] if isinstance(d, int)}
    return node.args[0] if dims == {2, 3} and only_user(node) is not None else None


def _is_sum(node) -> bool:
    """``a + b``, or ``a += b`` (MPNet adds its position bias in place): the result is the new scores."""
    return is_add(node) or (is_function(node, (operator.iadd,)) and len(node.args) == 2)


def _is_scores(node) -> bool:
    return _is_matmul(node) or is_function(node, (operator.mul, operator.truediv)) or _is_sum(node)


def softmax_input(node) -> fx.Node | None:
    """The scores of ``node`` when it is a softmax over the last of 4 dimensions, else None."""
    if is_function(node, SOFTMAX_TARGETS):
        dim = arg(node, 1, "dim")
    elif is_method(node, ("softmax",)):
        dim = arg(node, 1, "dim")
    else:
        return None
    return node.args[0] if isinstance(dim, int) and dim % 4 == 3 else None


def _match(probs_matmul: fx.Node):
    """``(q, k, v, scale, mask, chain)`` for the attention ending at ``probs_matmul``, or None."""
    probs, v = probs_matmul.args
    chain = [probs_matmul]
    if is_method(probs, ("to", "type_as")) and only_user(probs) is probs_matmul:
        chain.append(probs)
        probs = probs.args[0]
    scores = softmax_input(probs)
    if scores is None or only_user(probs) is None:
        return None
    chain.append(probs)
    addends = []  # the mask, or a bias and a mask (T5: position bias, then the padding mask)
    while _is_sum(scores) and only_user(scores) is not None and len(addends) < 2:
        chain.append(scores)
        in_place = scores.target is operator.iadd
        scores, addend = scores.args if in_place or _is_scores(scores.args[0]) else reversed(scores.args)
        addends.append(addend)  # in place: the scores are the operand written, used by the sum alone
    scale = None
    if is_function(scores, (operator.mul, operator.truediv)) and only_user(scores) is not None:
        a, b = scores.args
        number, tensor = (b, a) if isinstance(b, float | int) else (a, b)
        if not isinstance(number, float | int) or (scores.target is operator.truediv and number is a):
            return None
        scale = float(number) if scores.target is operator.mul else 1.0 / float(number)
        chain.append(scores)
        scores = tensor
    if not _is_matmul(scores) or only_user(scores) is None:
        return None
    q, key_t = scores.args
    k = _transposed_key(key_t)
    if k is None or not qkv_ok(q, k, v):
        return None
    chain += [scores, key_t]
    if any(
        example(a) is None or example(a).dim() != 4 or not example(a).is_floating_point() for a in addends
    ):
        return None
    return q, k, v, 1.0 if scale is None else scale, addends, chain


def _call_args(gm: fx.GraphModule, q, k, v, scale, addends) -> AttentionArgs | None:
    """Arguments of :func:`attention_call` for the added terms: no term, a mask, or a bias beside a mask
    that must turn into a key padding mask (or go away); None when neither term is such a mask."""
    if len(addends) < 2:
        return attention_args(gm, q, k, v, scale, addends[0] if addends else None, False, True)
    for mask, bias in (addends, addends[::-1]):
        call_args = attention_args(gm, q, k, v, scale, mask, False, True)
        # the mask became a key padding mask, or lets everything through; a bias folded into it
        # (where(keep, bias, -big)) would make two biases, which the kernel does not take
        if call_args.mask is None and call_args.bias is None:
            return call_args._replace(bias=contiguous_once(gm, _one_batch_source(bias)))
    return None


def _one_batch_source(bias: fx.Node) -> fx.Node:
    """``x`` when ``bias`` is ``x.expand(B, ...)[.contiguous()]`` with ``x`` of batch 1 (MPNet's position
    bias, copied once per batch row): the kernel broadcasts it and reads one copy; else ``bias``."""
    node = bias.args[0] if is_method(bias, ("contiguous",)) and len(bias.args) == 1 else bias
    source = node.args[0] if is_method(node, ("expand",)) and node.args else None
    value, expanded = example(source), example(bias)
    if value is None or value.dim() != 4 or value.shape[0] != 1 or value.shape[1:] != expanded.shape[1:]:
        return bias
    return source


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each matched eager attention; return how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not _is_matmul(node) or (match := _match(node)) is None:
            continue
        q, k, v, scale, addends, chain = match
        if (reason := unsupported_shape(q)) is not None:
            for kept in chain:
                kept.meta[KEPT_REASON] = reason
            continue
        if (call_args := _call_args(gm, q, k, v, scale, addends)) is None:
            continue
        replace_with_call(gm, node, attention_call, tuple(call_args), list(reversed(chain)))
        replaced += 1
    return replaced


RULE = Rule(
    name="attention_eager",
    matches="matmul(q, k.transpose(-1,-2)) [* s | / s] [+ bias] [+ mask] -> softmax(-1) [-> .to] -> matmul(., v)",
    replacement="kernl.flash_attention.attention(q, k, v, scale=s, bias=, key_padding_mask=[B,K] | mask=)",
    rewrite=rewrite,
)
