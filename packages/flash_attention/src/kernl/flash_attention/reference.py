"""Plain PyTorch reference with the kernels' semantics (also the CPU fallback without the interpreter).

Shapes: q ``(B, H, Q, D)``, k/v ``(B, H_kv, K, D)`` (``H % H_kv == 0``: query head ``h`` reads key/value
head ``h // (H / H_kv)``); bias/mask broadcastable to ``(B, H, Q, K)``;
key_padding_mask bool ``(B, K)`` (True = attend) or integer lengths ``(B,)``; cache_len an integer
tensor ``()`` or ``(B,)`` (valid prefix of a preallocated cache). A row with no visible key gives 0.
"""

import math

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    cache_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(scale * q @ k^T + bias, masked) @ v`` in fp32 (fp64 for fp64 inputs), output in q's dtype;
    k/v may have fewer heads than q (grouped-query attention, see the module docstring).

    Masked means: a False in a bool ``mask``, a key past the padding length or ``cache_len``, a key
    after the query under ``causal`` (top-left aligned, as ``F.scaled_dot_product_attention``), or
    ``-inf`` in an additive mask/bias.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves `group` heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    n_q, n_k = q.shape[2], k.shape[2]
    if n_k == 0:  # no keys: every row is fully masked
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    scores = scale * (q.to(compute) @ k.to(compute).transpose(-1, -2))
    if bias is not None:
        scores = scores + bias.to(compute)
    keep = torch.ones((1, 1, n_q, n_k), dtype=torch.bool, device=q.device)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        scores = scores + mask.to(compute)
    positions = torch.arange(n_k, device=q.device)
    # Keys the kernel never reads: past a length, past cache_len, after a bool padding mask's last True.
    # A preallocated cache may hold anything there (NaN from torch.empty); their values count as zeros.
    readable = torch.ones((1, 1, 1, n_k), dtype=torch.bool, device=q.device)
    if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
        keep = keep & key_padding_mask[:, None, None, :]
        extent = torch.where(key_padding_mask, positions + 1, 0).amax(-1)
        readable = readable & (positions < extent.reshape(-1, 1, 1, 1))
    elif key_padding_mask is not None:
        readable = readable & (positions < key_padding_mask.reshape(-1, 1, 1, 1))
    if cache_len is not None:
        readable = readable & (positions < cache_len.reshape(-1, 1, 1, 1))
    keep = keep & readable
    if causal:
        keep = keep & (positions[None, :] <= torch.arange(n_q, device=q.device)[:, None])
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    p = torch.exp(scores - row_max)
    denominator = p.sum(-1, keepdim=True)
    values = v.to(compute).masked_fill(~readable.transpose(-1, -2), 0.0)
    out = (p @ values) / torch.where(denominator == 0, 1.0, denominator)
    return out.to(q.dtype)


def write_rows(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    position: torch.Tensor,
) -> None:
    """Store a decoding step's row in place: ``k_cache[b, :, position[b]] = k_new[b, :, 0]`` (and v alike)
    for each batch element ``b`` whose position lies in ``[0, K)``; others write nothing. Caches ``(B, H_kv,
    K, D)``, new rows ``(B, H_kv, 1, D)``, position an integer tensor ``()``, ``(1,)`` or ``(B,)``."""
    batch, n_k = k_cache.shape[0], k_cache.shape[2]
    positions = position.reshape(-1).to(torch.int64).expand(batch)
    inside = (positions >= 0) & (positions < n_k)
    rows, columns = torch.arange(batch, device=k_cache.device)[inside], positions[inside]
    k_cache[rows, :, columns] = k_new[inside, :, 0].to(k_cache.dtype)
    v_cache[rows, :, columns] = v_new[inside, :, 0].to(v_cache.dtype)


def attention_decode_write_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    position: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cache_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decoding step: :func:`write_rows` of ``k_new``/``v_new`` into the caches at ``position``, then
    :func:`attention_reference` of q over the updated caches (no causal mask; ``cache_len`` as there)."""
    write_rows(k_cache, v_cache, k_new, v_new, position)
    return attention_reference(
        q, k_cache, v_cache, scale=scale, bias=bias, mask=mask, key_padding_mask=key_padding_mask,
        cache_len=cache_len,
    )  # fmt: skip


def expand_relative_bias(relative_bias: torch.Tensor, length: int) -> torch.Tensor:
    """The dense ``(H, L, L)`` bias of a relative-position table ``(H, 2R + 1)``: entry ``(h, i, j)`` is
    ``relative_bias[h, clamp(j - i, -R, R) + R]``, in the table's dtype and on its device."""
    radius = (relative_bias.shape[1] - 1) // 2
    positions = torch.arange(length, device=relative_bias.device)
    distance = (positions[None, :] - positions[:, None]).clamp(-radius, radius) + radius
    return relative_bias[:, distance]


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    relative_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed attention, one sequence at a time: q ``(T, H, D)``, k/v ``(T, H_kv, D)`` (``H % H_kv == 0``,
    kv head ``g`` serves q heads ``g * H / H_kv`` onwards), cu_seqlens ``(S + 1,)`` integer offsets.

    Sequence ``s`` (tokens ``cu[s]:cu[s + 1]``) attends to itself only, causal within it if asked, its
    scaled scores plus :func:`expand_relative_bias` of ``relative_bias`` ``(H, 2R + 1)`` over its own
    length when given; rows from ``cu[S]`` on are padding and hold zeros. Reads ``cu_seqlens`` on the
    host (a test oracle and the CPU fallback, not for CUDA graphs). Returns ``(T, H, D)`` in q's dtype,
    contiguous.
    """
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    as_batch = lambda t: t.transpose(0, 1)[None]  # (L, H, D) -> (1, H, L, D)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        k_seq, v_seq = as_batch(k[start:end]), as_batch(v[start:end])
        bias = None if relative_bias is None else expand_relative_bias(relative_bias, end - start)[None]
        seq_out = attention_reference(
            as_batch(q[start:end]), k_seq, v_seq, scale=scale, causal=causal, bias=bias
        )
        out[start:end] = seq_out[0].transpose(0, 1)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., D/2:], x[..., :D/2])`` (Llama's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding ``x * cos + rotate_half(x) * sin`` of q ``(B, Hq, S, D)`` and k
    ``(B, Hk, S, D)``, cos/sin broadcastable to ``(B, 1, S, D)``; computed in fp32 (fp64 for fp64
    inputs), returned in q's and k's dtypes."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = cos.to(compute), sin.to(compute)
    rotated = [(x.to(compute) * c + rotate_half(x.to(compute)) * s).to(x.dtype) for x in (q, k)]
    return rotated[0], rotated[1]
