"""Launch of :mod:`.rotary_kernel` on validated inputs."""

import torch
import triton

from kernl.flash_attention.rotary_kernel import _rotary_kernel


def rotary_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``(B, Hq, S, D)``, k ``(B, Hk, S, D)``, cos/sin broadcastable to ``(B, 1, S, D)``, any strides;
    returns the rotated q and k, each laid out as its input (``torch.empty_like``)."""
    batch, heads_q, n_seq, head_dim = q.shape
    heads_k = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if batch * n_seq == 0 or q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    full = (batch, 1, n_seq, head_dim)
    scb, _, scs, scd = torch.broadcast_to(cos, full).stride()
    ssb, _, sss, ssd = torch.broadcast_to(sin, full).stride()
    half = head_dim // 2
    block_half = max(16, triton.next_power_of_2(half))
    # about 4k elements a step: every head of a token in one or a few steps
    block_h = max(1, min(triton.next_power_of_2(max(heads_q, heads_k)), 4096 // block_half))
    _rotary_kernel[(batch * n_seq,)](
        q, k, cos, sin, q_out, k_out, n_seq, heads_q, heads_k, half,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), scb, scs, scd, ssb, sss, ssd,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
    )  # fmt: skip
    return q_out, k_out
