"""The packed (varlen) attention the packed graphs call: the one import to swap.

``kernl.flash_attention.attention_varlen`` is being added beside this package; until it is on main,
:func:`attention_varlen` here is a PyTorch stand-in with its exact signature and semantics. Once it is,
replace the body of this module with ``from kernl.flash_attention import attention_varlen``.
"""

import torch


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention over sequences packed end to end: q ``(T, H, D)``, k/v ``(T, H_kv, D)``, cu_seqlens int32
    ``(S + 1,)`` non-decreasing from 0; sequence ``s`` is tokens ``[cu[s], cu[s + 1])`` and attends to
    itself only; rows from ``cu[S]`` on are zeros. Returns ``(T, H, D)`` in q's dtype.

    Stand-in: one ``(T, T)`` block-diagonal mask built on the device (no host synchronisation, so a
    CUDA graph can hold it), then ``F.scaled_dot_product_attention``.
    """
    tokens = q.shape[0]
    positions = torch.arange(tokens, device=q.device)
    cu = cu_seqlens.to(torch.int64)
    sequence = torch.searchsorted(cu[1:], positions, right=True)  # S for padding tokens
    real = positions < cu[-1]
    allowed = (sequence[:, None] == sequence[None, :]) & real[:, None] & real[None, :]
    if causal:
        allowed &= positions[:, None] >= positions[None, :]
    group = q.shape[1] // k.shape[1]
    as_heads = lambda t: t.transpose(0, 1).repeat_interleave(group, dim=0)[None]  # (1, H, T, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], as_heads(k), as_heads(v), attn_mask=allowed[None, None], scale=scale
    )
    return torch.where(real[:, None, None], out[0].transpose(0, 1), 0.0).contiguous()
