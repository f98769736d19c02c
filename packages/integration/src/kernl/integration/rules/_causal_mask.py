"""Recover "causal, and these keys are padding" from the dense ``[B, 1, Q, K]`` mask a decoder's graph builds.

A decoder-only model without a cache builds its causal mask from ``arange`` (and, given an
``attention_mask``, ands it with the padding) through code that changes between transformers releases.
As :mod:`._padding_mask` does for padding alone, the mask is judged by its meaning: its nodes must
depend on no graph input, or on one ``[B, K]`` input, and running them (on test masks for that input)
must give "query i attends key j iff j <= i (and input[b, j] != 0)". The kernel then takes
``causal=True`` (top-left, as the mask) and the key padding mask instead of reading a dense mask.
"""

import torch
from torch import fx

from kernl.integration.rules._fx import example
from kernl.integration.rules._padding_mask import ADDITIVE_MASKED, _program, _test_masks


def _means_causal(value: torch.Tensor, keep: torch.Tensor | None, additive: bool, heads: int) -> bool:
    """Whether the mask ``value`` ``[B, 1|H, Q, K]`` lets query i attend key j iff j <= i and keep[b, j]."""
    if value.dim() != 4 or value.shape[1] not in (1, heads):
        return False
    batch, _, queries, keys = value.shape
    attend = torch.ones(queries, keys, dtype=torch.bool, device=value.device).tril()[None, None]
    if keep is not None:
        if keep.shape != (batch, keys):
            return False
        attend = attend & keep[:, None, None, :]
    attend = attend.expand(value.shape)
    if not additive:
        return value.dtype == torch.bool and torch.equal(value, attend)
    return bool((value[attend] == 0).all()) and bool((value[~attend] <= ADDITIVE_MASKED).all())


def causal_source(mask: fx.Node, heads: int, queries: int, keys: int, additive: bool) -> tuple | None:
    """``(source,)`` when ``mask`` is the causal mask ``[B, 1|H, queries, keys]``, anded with
    ``source != 0`` for a ``[B, K]`` graph input ``source`` (``(None,)`` when it depends on no input);
    None otherwise, or when its nodes cannot be replayed here."""
    found = _program(mask)
    value = example(mask)
    if found is None or value is None or value.dim() != 4 or tuple(value.shape[2:]) != (queries, keys):
        return None
    program, inputs = found
    try:
        if not inputs:
            return (None,) if _means_causal(program(), None, additive, heads) else None
        if len(inputs) != 1:
            return None
        source_node = inputs[0]
        source = example(source_node)
        if source is None or source.dim() != 2:
            return None
        for test in _test_masks(*source.shape, source.dtype, source.device):
            if not _means_causal(program(test), test != 0, additive, heads):
                return None
    except Exception:  # noqa: BLE001 - an op we cannot replay here: keep the dense mask
        return None
    return (source_node,)
