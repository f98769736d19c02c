"""Public entry points: validate the arguments, then call the registered ``torch.library`` op."""

import math
import numbers

import torch

from kernl.common.checks import SUPPORTED_DTYPES, check_real, check_same, check_tensor
from kernl.flash_attention import ops
from kernl.flash_attention.launch import MAX_HEAD_DIM

MAX_BATCH_HEADS = 65535  # the grid's second axis
MAX_ROTARY_DIM = 256


_QKV_NAMES = ("q", "k", "v")
_CACHE_NAMES = ("q", "k_cache", "v_cache")


def _check_qkv_tensors(q, k, v, layout: tuple[str, ...], names: tuple[str, str, str] = _QKV_NAMES) -> None:
    """q, k, v: float tensors of rank ``len(layout)`` (``layout`` names the dims), one dtype, q's device;
    ``names``: the arguments' names, for the errors."""
    for name, t in zip(names, (q, k, v), strict=True):
        check_tensor(name, t, SUPPORTED_DTYPES, "float16, bfloat16 or float32")
        if t.dim() != len(layout):
            raise ValueError(
                f"{name} must be {len(layout)}-D ({', '.join(layout)}), got shape {tuple(t.shape)}"
            )
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q must be on a CUDA device (or CPU), got {q.device}")
    for name, t in zip(names[1:], (k, v), strict=True):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_qkv(q, k, v, names: tuple[str, str, str] = _QKV_NAMES) -> None:
    _check_qkv_tensors(q, k, v, ("batch", "heads", "seq", "head_dim"), names)
    batch, heads, _, head_dim = q.shape
    _, k_name, v_name = names
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"{k_name} must have shape ({batch}, H_kv, K, {head_dim}) to match q, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"{v_name} must have {k_name}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"{k_name}'s head count {k.shape[1]} must divide q's head count {heads}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if batch * heads > MAX_BATCH_HEADS:
        raise ValueError(f"batch * heads must be at most {MAX_BATCH_HEADS}, got {batch * heads}")


def _check_broadcastable(name: str, t, full: tuple[int, ...], device, allow_bool: bool) -> None:
    dtypes = SUPPORTED_DTYPES + ((torch.bool,) if allow_bool else ())
    what = "float16, bfloat16 or float32"
    check_tensor(name, t, dtypes, f"bool or {what}" if allow_bool else what)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    shape, lead = tuple(t.shape), 4 - t.dim()  # aligned on the right, as broadcasting is
    if lead < 0 or any(shape[i] not in (1, full[lead + i]) for i in range(len(shape))):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to (B, H, Q, K) = {full}")


def _check_key_padding(t, batch: int, n_k: int, device) -> None:
    ints = (torch.int32, torch.int64)
    check_tensor("key_padding_mask", t, (torch.bool, *ints), "bool (B, K) or int32/int64 lengths (B,)")
    expected = (batch, n_k) if t.dtype == torch.bool else (batch,)
    if tuple(t.shape) != expected:
        raise ValueError(
            f"key_padding_mask of dtype {t.dtype} must have shape {expected}, got {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"key_padding_mask is on {t.device} but q is on {device}")
    if t.dtype != torch.bool and _values_readable(t) and t.numel() and t.min().item() < 0:
        raise ValueError(f"key_padding_mask lengths must be >= 0, got {t.tolist()}")


def _values_readable(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values: it waits for the device, which a CUDA-graph capture does
    not allow and tracing cannot do (there the kernel clamps lengths to ``[0, K]``)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _attention_op():
    """The registered op when tracing (torch.compile), the plain implementation in eager mode."""
    return torch.ops.kernl.attention if torch.compiler.is_compiling() else ops.attention_impl


def _check_scale(scale, head_dim: int, *, positive: bool = False) -> float:
    """``scale`` as a float (default ``1/sqrt(head_dim)``): a finite real number, above 0 when ``positive``
    (the varlen kernel folds the scale into the exponent and has no additive path for the others)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_real("scale", scale, positive=positive)


def _check_common(
    q, k, v, scale, bias, mask, key_padding_mask, names: tuple[str, str, str] = _QKV_NAMES
) -> float:
    _check_qkv(q, k, v, names)
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if bias is not None:
        _check_broadcastable("bias", bias, full, q.device, allow_bool=False)
    if mask is not None:
        _check_broadcastable("mask", mask, full, q.device, allow_bool=True)
    if key_padding_mask is not None:
        _check_key_padding(key_padding_mask, q.shape[0], k.shape[2], q.device)
    return _check_scale(scale, q.shape[-1])


def _bias_for_scale(scale: float, bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """A zero bias when ``scale <= 0`` and there is none. Without a bias the kernel folds the scale into
    the exponent and scales the running maximum and the masked ``-inf`` scores with it: a zero scale
    turns ``-inf * 0`` into NaN, a negative one makes the maximum the minimum. With a bias it computes
    ``scale * q.k + bias`` first, then masks: right for every scale, as SDPA's."""
    if scale > 0 or bias is not None:
        return bias
    return q.new_zeros((1, 1, 1, 1))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """``softmax(scale * q @ k^T + bias, masked) @ v`` fused, fp32 accumulation and softmax.

    q ``(B, H, Q, D)``, k/v ``(B, H_kv, K, D)``: float16/bfloat16/float32, any strides, ``Q`` may differ
    from ``K`` (cross-attention), ``1 <= D <= 128``. ``H_kv`` divides ``H`` (grouped-query attention:
    query head ``h`` reads key/value head ``h // (H / H_kv)`` in place, no ``repeat_kv`` copy). scale: any finite number, default ``1/sqrt(D)``.
    bias: additive float, broadcastable to ``(B, H, Q, K)`` (T5 position bias ``(1, H, Q, K)``).
    mask: broadcastable to ``(B, H, Q, K)``, bool (True = attend) or additive float (HF's forms).
    key_padding_mask: bool ``(B, K)`` (True = real token) or integer lengths ``(B,)``, each >= 0; the
    kernel stops at each sequence's last valid key instead of masking the padding.
    causal: key ``j`` visible to query ``i`` when ``j <= i`` (top-left, as SDPA's ``is_causal``).
    A row whose keys are all masked returns zeros, never NaN. Returns ``(B, H, Q, D)`` in q's dtype
    (a transposed view of a contiguous ``(B, Q, H, D)`` buffer).
    """
    scale = _check_common(q, k, v, scale, bias, mask, key_padding_mask)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__module__}.{type(causal).__name__}")
    bias = _bias_for_scale(scale, bias, q)
    return _attention_op()(q, k, v, scale, bias, mask, key_padding_mask, None, causal)


def _check_cache_len_tensor(cache_len, q: torch.Tensor) -> None:
    """cache_len: an int32/int64 tensor ``()`` or ``(B,)`` on q's device."""
    check_tensor("cache_len", cache_len, (torch.int32, torch.int64), "int32 or int64")
    if cache_len.shape not in ((), (q.shape[0],)) or cache_len.device != q.device:
        raise ValueError(f"cache_len must be a () or ({q.shape[0]},) tensor on {q.device}")


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a few query tokens against a KV cache, the key length split across programs.

    q ``(B, H, Q, D)`` with small ``Q`` (1 for a greedy step); k_cache/v_cache ``(B, H_kv, K, D)``
    (``H_kv`` divides ``H``, as in :func:`attention`), preallocated. cache_len: valid prefix of the cache, an int (the cache is sliced) or an integer
    tensor ``()``/``(B,)`` on q's device (read by the kernel: fixed buffers, CUDA-graph friendly);
    None = all ``K``. bias, mask, key_padding_mask, scale: as :func:`attention`, over the full ``K``.
    Every valid cache key is visible (no causal mask). Rows with no visible key return zeros.
    """
    scale = _check_common(q, k_cache, v_cache, scale, bias, mask, key_padding_mask, _CACHE_NAMES)
    n_k = k_cache.shape[2]
    if isinstance(cache_len, torch.Tensor):
        _check_cache_len_tensor(cache_len, q)
    elif isinstance(cache_len, numbers.Integral) and not isinstance(cache_len, bool):
        if not 0 <= cache_len <= n_k:
            raise ValueError(f"cache_len must be between 0 and the cache length {n_k}, got {cache_len}")
        k_cache, v_cache = k_cache[:, :, :cache_len], v_cache[:, :, :cache_len]
        trim = lambda t: t[..., :cache_len] if t is not None and t.dim() and t.shape[-1] == n_k else t
        bias, mask = trim(bias), trim(mask)
        if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
            key_padding_mask = key_padding_mask[:, :cache_len]
        cache_len = None
    elif cache_len is not None:
        raise TypeError(f"cache_len must be an int or an integer tensor, got {type(cache_len).__name__}")
    bias = _bias_for_scale(scale, bias, q)
    return _attention_op()(q, k_cache, v_cache, scale, bias, mask, key_padding_mask, cache_len, False)


def _check_new_row(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new, v_new, position) -> None:
    """Caches whose elements each have memory of their own (one program stores a row: two elements at one
    address, or one cache in both places, would make the stores race); k_new/v_new ``(B, H_kv, 1, D)``
    with the cache's dtype and device; position an integer tensor ``()``, ``(1,)`` or ``(B,)`` there."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(stride == 0 and size > 1 for stride, size in zip(cache.stride(), cache.shape, strict=True)):
            raise ValueError(
                f"{name} has elements sharing memory (a zero stride {cache.stride()}): it is written"
            )
    traced = torch.compiler.is_compiling()  # a traced call cannot compare addresses
    same_start = not traced and k_cache.numel() > 0 and k_cache.data_ptr() == v_cache.data_ptr()
    if k_cache is v_cache or same_start:
        raise ValueError("k_cache and v_cache are the same memory: each is written with its own row")
    batch, kv_heads, _, head_dim = k_cache.shape
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, t, SUPPORTED_DTYPES, "float16, bfloat16 or float32")
        check_same(name, t, "k_cache", k_cache)
        if tuple(t.shape) != (batch, kv_heads, 1, head_dim):
            raise ValueError(
                f"{name} must have shape ({batch}, {kv_heads}, 1, {head_dim}), got {tuple(t.shape)}"
            )
    check_tensor("position", position, (torch.int32, torch.int64), "int32 or int64")
    if tuple(position.shape) not in ((), (1,), (batch,)) or position.device != k_cache.device:
        raise ValueError(
            f"position must be a (), (1,) or ({batch},) tensor on {k_cache.device}, "
            f"got shape {tuple(position.shape)} on {position.device}"
        )


def _attention_decode_write_op():
    """The registered op when tracing (torch.compile), the plain implementation in eager mode."""
    if torch.compiler.is_compiling():
        return torch.ops.kernl.attention_decode_write
    return ops.attention_decode_write_impl


def attention_decode_write(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    position: torch.Tensor,
    *,
    cache_len: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decoding step's cache write and attention in one launch: stores ``k_new``/``v_new`` into
    ``k_cache``/``v_cache`` in place at ``position``, then returns :func:`attention_decode` of q over the
    updated caches.

    q ``(B, H, Q, D)`` (Q = 1 for a step; the G query heads of a key/value head may come as G queries);
    k_cache/v_cache ``(B, H_kv, K, D)``, ``H_kv`` dividing ``H``; k_new/v_new ``(B, H_kv, 1, D)``, the
    caches' dtype; any strides. position: an int32/int64 tensor on q's device, ``()`` or ``(1,)`` (one
    position for the batch, as ``index_copy_(2, position, k_new)`` writes) or ``(B,)`` (one per batch
    element), read by the kernel only (CUDA-graph friendly); a position outside ``[0, K)`` stores nothing.
    cache_len: None (every key, as the mask says) or an integer tensor ``()``/``(B,)``: only keys before it
    are visible (``position + 1``: the positions up to the new one). scale, bias, mask,
    key_padding_mask: as :func:`attention`, over the whole cache. Returns ``(B, H, Q, D)`` in q's dtype.
    """
    scale = _check_common(q, k_cache, v_cache, scale, bias, mask, key_padding_mask, _CACHE_NAMES)
    _check_new_row(k_cache, v_cache, k_new, v_new, position)
    if cache_len is not None:
        _check_cache_len_tensor(cache_len, q)
    bias = _bias_for_scale(scale, bias, q)
    return _attention_decode_write_op()(
        q, k_cache, v_cache, k_new, v_new, position, scale, bias, mask, key_padding_mask, cache_len
    )


def _check_packed_qkv(q, k, v) -> None:
    _check_qkv_tensors(q, k, v, ("tokens", "heads", "head_dim"))
    n_tokens, heads, head_dim = q.shape
    if k.shape[0] != n_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k must have shape ({n_tokens}, H_kv, {head_dim}) to match q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"k's head count {k.shape[1]} must divide q's head count {heads}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if heads > MAX_BATCH_HEADS:
        raise ValueError(f"heads must be at most {MAX_BATCH_HEADS}, got {heads}")


def _check_cu_seqlens(cu_seqlens, device) -> None:
    """Type, shape and device only: the values are read by the kernel, never on the host."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] == 0:
        raise ValueError(f"cu_seqlens must be 1-D (S + 1,) with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")


def _check_relative_bias(t, heads: int, device) -> None:
    """A float ``(H, 2R + 1)`` table on q's device (any of the supported dtypes, any strides)."""
    check_tensor("relative_bias", t, SUPPORTED_DTYPES, "float16, bfloat16 or float32")
    if t.dim() != 2 or t.shape[0] != heads or t.shape[1] % 2 != 1:
        raise ValueError(
            f"relative_bias must have shape ({heads}, 2R + 1) (q's heads, an odd count of distances), "
            f"got {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"relative_bias is on {t.device} but q is on {device}")


def _attention_varlen_op():
    """The registered op when tracing (torch.compile), the plain implementation in eager mode."""
    return torch.ops.kernl.attention_varlen if torch.compiler.is_compiling() else ops.attention_varlen_impl


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    relative_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over sequences packed end to end: each query sees only its own sequence's keys.

    q ``(T, H, D)``, k/v ``(T, H_kv, D)`` with ``H % H_kv == 0`` (grouped-query attention: kv head
    ``g`` serves q heads ``g * H / H_kv`` onwards, no copy); float16/bfloat16/float32, any strides,
    ``1 <= D <= 128``. cu_seqlens: int32 ``(S + 1,)`` on q's device, ``0 = cu[0] <= ... <= cu[S] <= T``;
    sequence ``s`` is tokens ``[cu[s], cu[s + 1])`` (equal values = empty sequences). Tokens from
    ``cu[S]`` on are padding: their rows are zeros. causal: within each sequence. scale: default
    ``1/sqrt(D)``. relative_bias: a relative-position bias as a float table ``(H, 2R + 1)`` on q's
    device (any supported dtype, any strides): query ``i`` and key ``j`` of one sequence get
    ``scale * q.k + relative_bias[h, clamp(j - i, -R, R) + R]`` (MPNet's and T5's bias is
    ``weight[bucket(d), h]`` for each distance ``d``; past ``R`` their buckets no longer change),
    computed per block inside the kernel. The values of cu_seqlens are read by the kernel only (no host
    synchronisation, the launch depends on shapes only: CUDA-graph safe) and are not validated: offsets
    that break the rules give unspecified rows but no access out of bounds. Returns a contiguous
    ``(T, H, D)`` in q's dtype.
    """
    _check_packed_qkv(q, k, v)
    _check_cu_seqlens(cu_seqlens, q.device)
    scale = _check_scale(scale, q.shape[-1], positive=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__module__}.{type(causal).__name__}")
    if relative_bias is not None:
        _check_relative_bias(relative_bias, q.shape[1], q.device)
    return _attention_varlen_op()(q, k, v, cu_seqlens, scale, causal, relative_bias)


def _check_rotary(q, k, cos, sin) -> None:
    _check_qkv_tensors(q, k, k, ("batch", "heads", "seq", "head_dim"))
    batch, _, n_seq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"k must have shape ({batch}, H_k, {n_seq}, {head_dim}) to match q, got {tuple(k.shape)}"
        )
    if head_dim % 2 or not 2 <= head_dim <= MAX_ROTARY_DIM:
        raise ValueError(f"head_dim must be even, between 2 and {MAX_ROTARY_DIM}, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check_broadcastable(name, t, (batch, 1, n_seq, head_dim), q.device, allow_bool=False)
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")


def _rotary_op():
    """The registered op when tracing (torch.compile), the plain implementation in eager mode."""
    return torch.ops.kernl.rotary if torch.compiler.is_compiling() else ops.rotary_impl


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys in one launch: ``x * cos + rotate_half(x) * sin``
    for ``x`` in q and k, with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])`` (Llama, Mistral,
    Qwen2).

    q ``(B, Hq, S, D)``, k ``(B, Hk, S, D)`` (any head counts): float16/bfloat16/float32, one dtype, any
    strides; ``D`` even, at most 256. cos, sin: float16/bfloat16/float32 of one shape, broadcastable to
    ``(B, 1, S, D)`` (transformers' ``cos.unsqueeze(1)``). Computed in fp32, rounded once. Returns the
    rotated ``(q, k)``, each in its input's dtype, laid out as ``torch.empty_like`` of it (HF's
    ``(B, S, H, D)`` projection viewed as ``(B, H, S, D)`` keeps its strides).
    """
    _check_rotary(q, k, cos, sin)
    return _rotary_op()(q, k, cos, sin)


__all__ = ["SUPPORTED_DTYPES", "attention", "attention_decode", "attention_varlen", "ops", "rotary"]
