"""``torch.library`` registration, so the kernel can sit inside ``torch.compile``d and FX graphs.

Opaque custom ops, ``kernl::attention``, ``kernl::attention_decode_write`` (which stores into its caches:
declared as mutating them), ``kernl::attention_varlen`` and ``kernl::rotary``, with a fake (meta) implementation: this works under
Triton's interpreter too, where ``triton_op``/``wrap_triton`` cannot be traced. Inputs are trusted
here; validation lives in :mod:`kernl.flash_attention.functional`, which calls :func:`attention_impl`
directly in eager mode (the custom-op dispatcher costs tens of microseconds of CPU time a call) and
the op when tracing.

CPU tensors run the Triton kernel only when Triton's interpreter is on (``TRITON_INTERPRET=1``);
otherwise they fall back to the PyTorch reference, so the op always returns the right answer.
"""

import torch

from kernl.common.launch import float_errors_ignored, runs_triton_kernel
from kernl.flash_attention.launch import NewRow, attention_forward
from kernl.flash_attention.launch_rotary import rotary_forward
from kernl.flash_attention.launch_varlen import attention_varlen_forward
from kernl.flash_attention.reference import (
    attention_decode_write_reference,
    attention_reference,
    attention_varlen_reference,
    rotary_reference,
)


def _as_int32(t: torch.Tensor | None, n_k: int) -> torch.Tensor | None:
    """Lengths as the kernel reads them: int32, clamped to ``[0, n_k]`` first (2**32 + 2 must not wrap to 2)."""
    if t is None or t.dtype in (torch.bool, torch.int32):
        return t
    return t.clamp(0, n_k).to(torch.int32)


def attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cache_len: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """``kernl::attention`` on validated inputs: q ``(B, H, Q, D)``, k/v ``(B, H_kv, K, D)`` -> ``(B, H, Q, D)``
    in q's dtype; the Triton kernel, or the PyTorch reference on CPU without the interpreter."""
    if not runs_triton_kernel(q):
        out = attention_reference(
            q, k, v, scale=scale, bias=bias, mask=mask, key_padding_mask=key_padding_mask,
            causal=causal, cache_len=cache_len,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel's layout
    key_padding_mask, cache_len = _as_int32(key_padding_mask, k.shape[2]), _as_int32(cache_len, k.shape[2])
    # Triton launches on the current device. Under the interpreter numpy would warn where the kernel
    # means its inf/NaN: a finfo.min mask times log2(e) is -inf, an inf or NaN addition makes its row NaN.
    with torch.cuda.device(q.device.index if q.is_cuda else -1), float_errors_ignored(q.device):
        return attention_forward(q, k, v, scale, bias, mask, key_padding_mask, cache_len, causal)


attention_op = torch.library.custom_op("kernl::attention", attention_impl, mutates_args=())


@attention_op.register_fake
def _(q, k, v, scale, bias, mask, key_padding_mask, cache_len, causal):
    batch, heads, n_q, head_dim = q.shape
    return q.new_empty((batch, n_q, heads, head_dim)).transpose(1, 2)


def attention_decode_write_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    position: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cache_len: torch.Tensor | None,
) -> torch.Tensor:
    """``kernl::attention_decode_write`` on validated inputs: stores k_new/v_new ``(B, H_kv, 1, D)`` into
    k_cache/v_cache ``(B, H_kv, K, D)`` at ``position`` (``()``, ``(1,)`` or ``(B,)``) and returns the
    attention of q ``(B, H, Q, D)`` over the updated caches, ``(B, H, Q, D)`` in q's dtype, in one launch
    (two when the keys are split); the PyTorch reference on CPU without the interpreter."""
    if not runs_triton_kernel(q):
        out = attention_decode_write_reference(
            q, k_cache, v_cache, k_new, v_new, position, scale=scale, bias=bias, mask=mask,
            key_padding_mask=key_padding_mask, cache_len=cache_len,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel's layout
    n_k = k_cache.shape[2]
    key_padding_mask, cache_len = _as_int32(key_padding_mask, n_k), _as_int32(cache_len, n_k)
    with torch.cuda.device(q.device.index if q.is_cuda else -1), float_errors_ignored(q.device):
        return attention_forward(
            q, k_cache, v_cache, scale, bias, mask, key_padding_mask, cache_len, False,
            new_row=NewRow(k_new, v_new, position),
        )  # fmt: skip


attention_decode_write_op = torch.library.custom_op(
    "kernl::attention_decode_write", attention_decode_write_impl, mutates_args=("k_cache", "v_cache")
)


@attention_decode_write_op.register_fake
def _(q, k_cache, v_cache, k_new, v_new, position, scale, bias, mask, key_padding_mask, cache_len):
    batch, heads, n_q, head_dim = q.shape
    return q.new_empty((batch, n_q, heads, head_dim)).transpose(1, 2)


def attention_varlen_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool,
    relative_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kernl::attention_varlen`` on validated inputs: q ``(T, H, D)``, k/v ``(T, H_kv, D)``, cu_seqlens
    int32 ``(S + 1,)``, relative_bias None or ``(H, 2R + 1)`` -> contiguous ``(T, H, D)`` in q's dtype;
    the Triton kernel, or the PyTorch reference on CPU without the interpreter."""
    if not runs_triton_kernel(q):
        return attention_varlen_reference(
            q, k, v, cu_seqlens, scale=scale, causal=causal, relative_bias=relative_bias
        )
    # Triton launches on the current device. Under the interpreter numpy would warn where the kernel
    # means its NaN: an inf or NaN score makes its row NaN, as SDPA's.
    with torch.cuda.device(q.device.index if q.is_cuda else -1), float_errors_ignored(q.device):
        return attention_varlen_forward(q, k, v, cu_seqlens, scale, causal, relative_bias=relative_bias)


attention_varlen_op = torch.library.custom_op(
    "kernl::attention_varlen", attention_varlen_impl, mutates_args=()
)


@attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens, scale, causal, relative_bias=None):
    return q.new_empty(q.shape)


def rotary_impl(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernl::rotary`` on validated inputs: q ``(B, Hq, S, D)``, k ``(B, Hk, S, D)``, cos/sin
    broadcastable to ``(B, 1, S, D)`` -> rotated q and k, each laid out as its input; the Triton kernel,
    or the PyTorch reference on CPU without the interpreter."""
    if not runs_triton_kernel(q):
        q_ref, k_ref = rotary_reference(q, k, cos, sin)
        return _laid_out_as(q_ref, q), _laid_out_as(k_ref, k)
    with torch.cuda.device(q.device.index if q.is_cuda else -1):
        return rotary_forward(q, k, cos, sin)


def _laid_out_as(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    out.copy_(value)
    return out


rotary_op = torch.library.custom_op("kernl::rotary", rotary_impl, mutates_args=())


@rotary_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)
