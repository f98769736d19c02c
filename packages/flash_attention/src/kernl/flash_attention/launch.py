"""Block sizes, split-KV choice and the launch of :mod:`.kernel` (+ :mod:`.merge` when split)."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernl.common.launch import capability, programmatic_launch
from kernl.common.launch import sm_count as multiprocessor_count
from kernl.flash_attention.kernel import LOG2E, _attn_fwd_kernel
from kernl.flash_attention.merge import _merge_kernel
from kernl.flash_attention.reference import write_rows

MAX_HEAD_DIM = 128
MAX_SPLITS = 64


class LaunchConfig(NamedTuple):
    """Block of queries and keys per step, warps, pipeline depth, how many KV splits, and how the dense
    kernel loads q, k and v: ``tma`` through tensor descriptors (fp16/bf16 inputs whose layout a
    descriptor can describe, see :func:`descriptor_layout_ok`; pointer loads otherwise),
    ``warp_specialize`` its interior key loop split into producer and consumer warps by Triton (with
    descriptor loads only: ignored where the loads fall back to pointers)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int = 1
    tma: bool = False
    warp_specialize: bool = False


def descriptor_layout_ok(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can describe ``t`` in place: no empty dimension, unit last stride, the
    other strides positive multiples of 16 bytes, a 16-byte aligned start (the bulk-copy unit's rules)."""
    size = t.element_size()
    if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(stride > 0 and stride * size % 16 == 0 for stride in t.stride()[:-1])


def _descriptor(t: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    """A 4-D descriptor over ``t`` ``(B, H, S, D)`` loading ``(1, 1, rows, block_d)`` blocks."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


def _split_count(programs: int, n_k: int, block_n: int, sm_count: int) -> int:
    """Enough KV splits to give every multiprocessor work, each split at least one key block."""
    if programs >= sm_count:
        return 1
    return max(1, min(triton.cdiv(2 * sm_count, programs), triton.cdiv(n_k, block_n), MAX_SPLITS))


def launch_config(
    batch_heads: int,
    n_q: int,
    n_k: int,
    head_dim: int,
    dtype: torch.dtype,
    loads_tiles: bool,
    device: torch.device,
) -> LaunchConfig:
    """Heuristic config (from the H100 sweeps, ``flash_attention.sweep.txt`` and
    ``flash_attention_candidates.json``): 64x64 tiles, 128-row tiles when a bias or mask tile is loaded
    too, 16-row tiles plus split-KV for at most 16 queries. With no tile loaded, fp16/bf16 on Hopper loads
    q, k and v through tensor descriptors, with 128-key blocks for keys of 2048 and more at head_dim <= 64
    (the candidates sweep's fastest there, causal or not; pointer loads where the layout does not allow).

    fp32 inputs run in fp64 (see the kernel): smaller tiles keep the fp64 operands in shared memory.
    Under Triton's interpreter (CPU tensors) the blocks are small and fixed, and the split count acts
    as if the device had 4 multiprocessors, so small tests still take the split-KV path.
    """
    tma = False
    if device.type != "cuda":
        block_m, block_n, warps, stages, sm_count = (16 if n_q <= 16 else 32), 16, 4, 1, 4
    else:
        sm_count = multiprocessor_count(device.index or 0)
        tma = (
            dtype != torch.float32 and n_q > 16 and not loads_tiles and capability(device.index or 0)[0] == 9
        )
        if dtype == torch.float32:
            block_m, block_n, warps, stages = (16 if n_q <= 16 else 64), 32, 4, 2
        elif n_q <= 16:
            block_m, block_n, warps, stages = 16, 128 if head_dim <= 64 else 64, 4, 3
        elif tma:
            block_m, block_n, warps, stages = 64, 128 if head_dim <= 64 and n_k >= 2048 else 64, 4, 3
        elif head_dim <= 64:
            block_m, block_n, warps, stages = 128 if loads_tiles else 64, 64, 4, 3
        else:
            block_m, block_n, warps, stages = 128, 64, 8, 3
    programs = batch_heads * triton.cdiv(n_q, block_m)
    splits = _split_count(programs, n_k, block_n, sm_count) if n_q <= 16 else 1
    return LaunchConfig(block_m, block_n, warps, stages, splits, tma=tma)


class NewRow(NamedTuple):
    """A decoding step's new cache row, stored by the attention launch itself (see :mod:`.kernel`): ``k``
    and ``v`` ``(B, H_kv, 1, D)`` in the cache's dtype, ``position`` an int32/int64 tensor ``()``, ``(1,)``
    or ``(B,)`` on the cache's device."""

    k: torch.Tensor
    v: torch.Tensor
    position: torch.Tensor


def _strides4(t: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Strides of ``t`` broadcast to ``shape`` (0 along broadcast dimensions)."""
    return torch.broadcast_to(t, shape).stride() if t is not None else (0, 0, 0, 0)


def _row_strides(new_row: NewRow | None) -> tuple[int, ...]:
    """Strides of the new row's k and v (batch, head, dim) and of its position along the batch (0 for one
    position shared by every batch element)."""
    if new_row is None:
        return (0,) * 7
    k, v, position = new_row
    per_batch = position.dim() == 1 and position.shape[0] > 1
    return (k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
            position.stride(0) if per_batch else 0)  # fmt: skip


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cache_len: torch.Tensor | None,
    causal: bool,
    config: LaunchConfig | None = None,
    new_row: NewRow | None = None,
) -> torch.Tensor:
    """Launch on validated inputs: q ``(B, H, Q, D)``, k/v ``(B, H_kv, K, D)`` (``H % H_kv == 0``: query
    head ``h`` reads key/value head ``h // (H / H_kv)``), any strides.

    bias/mask broadcastable to ``(B, H, Q, K)``; key_padding_mask bool ``(B, K)`` (True = attend) or
    int32 lengths ``(B,)``; cache_len int32 ``()`` or ``(B,)``. Returns ``(B, H, Q, D)`` in q's dtype,
    a transposed view of a contiguous ``(B, Q, H, D)`` buffer (what a model's output projection wants).
    ``config`` overrides :func:`launch_config` (used by the tuning sweep). ``new_row``: the row to store
    into k and v at its position first, as the attention sees it (a position outside ``[0, K)``: none).
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    out = torch.empty((batch, n_q, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        if new_row is not None and n_k > 0:  # no query to attend, the row is stored all the same
            write_rows(k, v, new_row.k, new_row.v, new_row.position)
        return out
    wide = q.dtype == torch.float32  # fp32 inputs are computed in fp64 (see the kernel)
    if wide and mask is not None and mask.dtype == torch.bool:
        # Triton 3.6 cannot lower fp64 dots beside a boolean mask tile: fp32 inputs get it additive
        mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
    loads_tiles = bias is not None or mask is not None
    cfg = config or launch_config(batch * heads, n_q, n_k, head_dim, q.dtype, loads_tiles, q.device)
    full = (batch, heads, n_q, n_k)
    mask_kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    kpm_kind = 0 if key_padding_mask is None else 2 if key_padding_mask.dtype == torch.bool else 1
    mask_arg = mask.view(torch.uint8) if mask_kind == 1 else mask
    kpm_arg = key_padding_mask.view(torch.uint8) if kpm_kind == 2 else key_padding_mask
    kpm_strides = (key_padding_mask.stride() + (0,))[:2] if key_padding_mask is not None else (0, 0)
    splits = cfg.num_splits
    if splits > 1:
        part_dtype = torch.float64 if wide else torch.float32
        target = torch.empty((batch * heads, splits, n_q, head_dim), dtype=part_dtype, device=q.device)
        part_ml = torch.empty((batch * heads, splits, 2, n_q), dtype=part_dtype, device=q.device)
    else:
        target, part_ml = out, out
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(n_q, cfg.block_m), batch * heads, splits)
    pdl = programmatic_launch(q.device)
    tma = cfg.tma and not wide and new_row is None and all(descriptor_layout_ok(t) for t in (q, k, v))
    if tma:
        q_in, k_in, v_in = (
            _descriptor(q, cfg.block_m, block_d),
            *(_descriptor(t, cfg.block_n, block_d) for t in (k, v)),
        )
    else:
        q_in, k_in, v_in = q, k, v
    _attn_fwd_kernel[grid](
        q_in, k_in, v_in, target, bias if bias is not None else q, mask_arg if mask is not None else q,
        kpm_arg if kpm_arg is not None else q, cache_len if cache_len is not None else q, part_ml,
        *((new_row.k, new_row.v, new_row.position) if new_row is not None else (q, q, q)),
        scale, scale * LOG2E.value, n_q, n_k, heads, heads // k.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_strides4(bias, full), *_strides4(mask, full), *kpm_strides,
        cache_len.stride(0) if cache_len is not None and cache_len.dim() == 1 else 0,
        *_row_strides(new_row),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_BIAS=bias is not None, MASK_KIND=mask_kind, KPM_KIND=kpm_kind,
        HAS_CACHE_LEN=cache_len is not None, CAUSAL=causal,
        SCAN_BLOCK=min(max(16, triton.next_power_of_2(n_k)), 4096 if q.is_cuda else 32), SPLIT=splits > 1,
        ACC_DTYPE=tl.float64 if wide else tl.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, USE_PDL=pdl, launch_pdl=pdl,
        TMA=tma, WARP_SPECIALIZE=cfg.warp_specialize and tma,  # pointer loads: the pass does not compile
        WRITE_ROW=new_row is not None,
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(n_q, batch * heads)](
            target, part_ml, out, n_q, heads, splits, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            USE_PDL=pdl, launch_pdl=pdl,
        )  # fmt: skip
    return out
