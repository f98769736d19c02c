"""Block sizes and the launch of :mod:`.varlen_kernel` (packed sequences, per-sequence offsets)."""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernl.common.launch import programmatic_launch
from kernl.flash_attention.kernel import LOG2E
from kernl.flash_attention.launch import LaunchConfig, descriptor_layout_ok
from kernl.flash_attention.varlen_kernel import _varlen_fwd_kernel

MAX_SCAN_BLOCK = 1024  # sequences scanned per step when a program looks for its tile


def varlen_launch_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """Heuristic config, from the dense kernel's H100 sweep (fp16, head_dim 64): 64x64 tiles, 4 warps;
    128-row tiles and 8 warps for head_dim above 64; smaller tiles for fp32 (computed in fp64).

    Under Triton's interpreter (CPU tensors) the tiles are 16x16, so small tests cross tile edges.
    """
    if device.type != "cuda":
        return LaunchConfig(16, 16, 4, 1)
    if dtype == torch.float32:
        return LaunchConfig(64, 32, 4, 2)
    if head_dim <= 64:
        return LaunchConfig(64, 64, 4, 3)
    return LaunchConfig(128, 64, 8, 3)


def varlen_grid(n_tokens: int, n_seqs: int, heads: int, block_m: int) -> tuple[int, int]:
    """``(min(T, cdiv(T, BLOCK_M) + S), H)``: enough tiles for any split of ``T`` tokens into ``S`` sequences
    plus a padding tail (each cut adds at most one partial tile, and every tile holds a token), from
    shapes only."""
    return min(n_tokens, triton.cdiv(n_tokens, block_m) + n_seqs), heads


def attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool,
    config: LaunchConfig | None = None,
    relative_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch on validated inputs: q ``(T, H, D)``, k/v ``(T, H_kv, D)`` with ``H % H_kv == 0``, any
    strides; cu_seqlens int32 ``(S + 1,)`` on q's device, read only by the kernel (no host sync);
    relative_bias: None or a float ``(H, 2R + 1)`` table, any strides (see :mod:`.varlen_kernel`).
    Returns a contiguous ``(T, H, D)`` tensor in q's dtype, padding rows (from ``cu[S]``) zero.
    ``config`` overrides :func:`varlen_launch_config` (tests, tuning sweep).
    """
    n_tokens, heads, head_dim = q.shape
    out = torch.empty((n_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    cfg = config or varlen_launch_config(head_dim, q.dtype, q.device)
    n_seqs = cu_seqlens.shape[0] - 1
    pdl = programmatic_launch(q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    tma = cfg.tma and q.dtype != torch.float32 and all(descriptor_layout_ok(t) for t in (q, k, v))
    if tma:  # (T, H, D) descriptors loading (rows, 1, block_d) blocks
        describe = lambda t, rows: TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, 1, block_d])
        q_in, k_in, v_in = describe(q, cfg.block_m), describe(k, cfg.block_n), describe(v, cfg.block_n)
    else:
        q_in, k_in, v_in = q, k, v
    rel = cu_seqlens if relative_bias is None else relative_bias  # any pointer when there is none
    rel_radius = 0 if relative_bias is None else (relative_bias.shape[1] - 1) // 2
    rel_strides = (0, 0) if relative_bias is None else relative_bias.stride()
    _varlen_fwd_kernel[varlen_grid(n_tokens, n_seqs, heads, cfg.block_m)](
        q_in, k_in, v_in, out, cu_seqlens, rel,
        scale * LOG2E.value, scale, n_tokens, n_seqs, heads // k.shape[1], rel_radius,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), cu_seqlens.stride(0), *rel_strides,
        HEAD_DIM=head_dim, BLOCK_D=block_d, TMA=tma, HAS_REL=relative_bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SCAN_BLOCK=min(max(16, triton.next_power_of_2(n_seqs)), MAX_SCAN_BLOCK if q.is_cuda else 16),
        CAUSAL=causal, ACC_DTYPE=tl.float64 if q.dtype == torch.float32 else tl.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, USE_PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return out
