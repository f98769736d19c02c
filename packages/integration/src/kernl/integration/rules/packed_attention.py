"""Packed graphs: attention becomes block-diagonal per original row, first-token reads become per-row.

A packed graph runs a model on one sequence ``(1, T)`` holding the real tokens of several rows end to
end (:mod:`kernl.integration.packing`). Run after :data:`~kernl.integration.rules.RULES`, this pass:

- turns every :func:`~kernl.integration.rules.attention_sdpa.attention_call` (what the sdpa and eager
  attention rules put in place of attention) into :func:`packed_attention_call`, which attends within
  each row only, through the row offsets (``cu_seqlens``) that the packed call fills before each run.
  The call's mask is dropped: in a packed call it only marks the padding after the last row, which the
  varlen kernel leaves out by itself. A bias that is a
  :func:`~kernl.integration.position_tables.relative_position_bias` over the packed length (MPNet's)
  is a function of ``key - query`` alone: its per-distance table goes to the kernel, which adds it
  within each row (the packed distance is the distance within the row), and the ``T x T`` tensor is
  never made;
- turns ``hidden[:, 0]`` (a pooler's or a sequence classification head's first token) into the first
  token of every row, ``(R, ...)``, through the rows' start offsets.

A packed graph in which any attention stays PyTorch, or an attention carries another bias or is causal,
would mix the rows: :func:`rewrite` raises :class:`PackingUnsupported` and the model keeps its unpacked path.
"""

import operator

import torch
from torch import fx

from kernl.flash_attention import attention_varlen
from kernl.integration import position_tables  # noqa: F401 - registers kernl::relative_position_bias
from kernl.integration.rules._fx import (
    autocast_dtype,
    cast_all,
    example,
    is_function,
    is_method,
    replace_with_call,
)
from kernl.integration.rules.attention_eager import SOFTMAX_TARGETS
from kernl.integration.rules.attention_sdpa import SDPA_TARGETS, AttentionArgs, attention_call

_FULL = slice(None, None, None)


class PackingUnsupported(Exception):
    """A packed graph this pass cannot make row-exact; the model runs its unpacked path."""


def packed_attention_call(q, k, v, scale, cu_seqlens, relative_bias=None):
    """Attention of ``q``/``k``/``v`` ``(1, H, T, D)`` within each row of ``cu_seqlens``, plus the
    per-distance bias ``relative_bias`` ``(H, 2R + 1)`` when given: ``(1, H, T, D)``."""
    q, k, v = cast_all(autocast_dtype(q.device.type), q, k, v)
    as_packed = lambda t: t[0].transpose(0, 1)  # (T, H, D), a view
    out = attention_varlen(
        as_packed(q), as_packed(k), as_packed(v), cu_seqlens, scale=scale, relative_bias=relative_bias
    )
    return out.transpose(0, 1)[None]


def first_tokens_call(hidden: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The first token of every row: ``hidden`` ``(1, T, ...)``, ``starts`` int64 ``(R,)`` -> ``(R, ...)``."""
    return hidden[0].index_select(0, starts)


def _reads_first_token(node: fx.Node, tokens: int) -> bool:
    """``x[:, 0]`` (or ``x[:, 0, :, ...]``) of a packed ``(1, T, ...)`` tensor."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    value, index = example(node.args[0]), node.args[1]
    if value is None or value.dim() < 2 or tuple(value.shape[:2]) != (1, tokens):
        return False
    if not isinstance(index, tuple) or len(index) < 2 or index[0] != _FULL or index[1] != 0:
        return False
    return all(item == _FULL for item in index[2:]) and isinstance(index[1], int)


def rewrite(gm: fx.GraphModule, offsets) -> int:
    """Rewrite ``gm`` for packed execution; return how many attention calls became packed.

    ``offsets`` provides the graph nodes' row offsets at run time: ``offsets.cu_seqlens()`` (int32
    ``(R + 1,)``) and ``offsets.row_starts()`` (int64 ``(R,)``); ``offsets.bucket`` is the packed length
    T of the call being compiled; ``offsets.reads_first_token`` is set when the graph reads per-row
    first tokens. Raises :class:`PackingUnsupported` (see the module).
    """
    if any(_unpacked_attention(node) for node in gm.graph.nodes):
        raise PackingUnsupported("an attention stayed PyTorch: the packed rows would attend to each other")
    tokens = offsets.bucket
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        cu_seqlens = gm.graph.call_function(offsets.cu_seqlens, ())
        starts = gm.graph.call_function(offsets.row_starts, ())
    packed = 0
    for node in list(gm.graph.nodes):
        if node.target is attention_call:
            call = AttentionArgs(*node.args)  # its mask only marks the bucket's padding: dropped
            by_distance = None if call.bias is None else _relative_table(call.bias, call.q)
            if call.causal or (call.bias is not None and by_distance is None):
                raise PackingUnsupported(
                    "attention with a causal mask or a position bias not by distance: not packed"
                )
            packed_args = (call.q, call.k, call.v, call.scale, cu_seqlens, by_distance)
            replace_with_call(gm, node, packed_attention_call, packed_args, [node])
            packed += 1
        elif _reads_first_token(node, tokens):
            replace_with_call(gm, node, first_tokens_call, (node.args[0], starts), [node])
            offsets.reads_first_token = True
    return packed


_RELATIVE_POSITION_BIAS = (
    torch.ops.kernl.relative_position_bias,
    torch.ops.kernl.relative_position_bias.default,
)


def _relative_table(bias: fx.Node, q: fx.Node) -> fx.Node | None:
    """The table ``(H, 2R + 1)`` when ``bias`` is ``relative_position_bias(table, T)`` (through
    ``.contiguous()`` and ``.expand``) with ``q`` ``(1, H, T, D)``: query ``i`` and key ``j`` of the
    packed sequence then get ``table[h, j - i]``, as the kernel adds it; else None."""
    node = bias
    while is_method(node, ("contiguous", "expand")) and node.args:
        node = node.args[0]
    if not is_function(node, _RELATIVE_POSITION_BIAS) or len(node.args) != 2 or node.kwargs:
        return None
    dense, queries, table = example(node), example(q), example(node.args[0])
    if dense is None or queries is None or table is None:
        return None
    _, heads, tokens, _ = queries.shape
    return node.args[0] if tuple(dense.shape) == (1, heads, tokens, tokens) else None


def _unpacked_attention(node: fx.Node) -> bool:
    """An attention (or its softmax) that the attention rules left as PyTorch."""
    return is_function(node, (*SDPA_TARGETS, *SOFTMAX_TARGETS)) or is_method(node, ("softmax",))
