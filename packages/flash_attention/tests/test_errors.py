"""Bad input gets a clear error naming the argument; CPU tensors without the interpreter use the reference."""

import pytest
import torch

from kernl.flash_attention import (
    attention,
    attention_decode,
    attention_reference,
    attention_varlen,
    attention_varlen_reference,
)
from kernl_testing import TEST_DEVICE, needs_two_devices, other_device

q = torch.randn(2, 3, 5, 16, device=TEST_DEVICE)
kv = torch.randn(2, 3, 7, 16, device=TEST_DEVICE)
lengths = torch.tensor([3, 7], device=TEST_DEVICE)
packed_q = torch.randn(9, 4, 16, device=TEST_DEVICE)
packed_kv = torch.randn(9, 2, 16, device=TEST_DEVICE)
cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=TEST_DEVICE)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: attention([1.0], kv, kv), TypeError, "q must be a torch.Tensor"),
        (lambda: attention(q.double(), kv, kv), TypeError, "q must be float16"),
        (lambda: attention(q, kv.long(), kv), TypeError, "k must be float16"),
        (lambda: attention(q, kv.half(), kv), ValueError, "k must have q's dtype"),
        (lambda: attention(q[0], kv, kv), ValueError, "q must be 4-D"),
        (lambda: attention(q, kv, kv.clone().requires_grad_()), ValueError, "v requires grad"),
        (lambda: attention(q, kv[:1], kv), ValueError, r"k must have shape \(2, H_kv, K, 16\)"),
        (
            lambda: attention(q, kv[:, :2], kv[:, :2]),
            ValueError,
            "k's head count 2 must divide q's head count 3",
        ),
        (lambda: attention(q, kv[:, :0], kv[:, :0]), ValueError, "k's head count 0 must divide"),
        (lambda: attention_decode(q, kv[:, :2], kv[:, :2]), ValueError, "k_cache's head count 2 must divide"),
        (lambda: attention(q, kv[:, :1], kv), ValueError, "v must have k's shape"),
        (lambda: attention(q, kv[..., :8], kv), ValueError, r"k must have shape"),
        (lambda: attention(q, kv, kv[:, :, :6]), ValueError, "v must have k's shape"),
        (lambda: attention(torch.randn(1, 1, 4, 129, device=TEST_DEVICE), kv, kv), ValueError, "k must have"),
        (lambda: attention(*[torch.randn(1, 1, 4, 129, device=TEST_DEVICE)] * 3), ValueError, "head_dim"),
        (
            lambda: attention(*[torch.randn(1, 65536, 1, 16, device=TEST_DEVICE)] * 3),
            ValueError,
            "batch \\* heads",
        ),
        (lambda: attention(q, kv, kv, scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: attention(q, kv, kv, scale=True), TypeError, "scale must be a real number"),
        (lambda: attention(q, kv, kv, scale="0.5"), TypeError, "scale must be a real number, got str"),
        (
            lambda: attention(q, kv, kv, key_padding_mask=torch.tensor([3, -1], device=TEST_DEVICE)),
            ValueError,
            r"key_padding_mask lengths must be >= 0, got \[3, -1\]",
        ),
        (
            lambda: attention_decode(q, kv, kv, key_padding_mask=torch.tensor([-2, 7], device=TEST_DEVICE)),
            ValueError,
            "key_padding_mask lengths must be >= 0",
        ),
        (
            lambda: attention(q, kv, kv, bias=torch.zeros(3, 5, 6, device=TEST_DEVICE)),
            ValueError,
            "bias of shape",
        ),
        (
            lambda: attention(q, kv, kv, bias=torch.zeros(5, 7, dtype=torch.bool, device=TEST_DEVICE)),
            TypeError,
            "bias must be float16, bfloat16 or float32, got torch.bool",
        ),  # fmt: skip
        (
            lambda: attention(q, kv, kv, bias=torch.zeros(5, 7, dtype=torch.float64, device=TEST_DEVICE)),
            TypeError,
            "bias must be float16, bfloat16 or float32, got torch.float64",  # it said "must be a float tensor"
        ),  # fmt: skip
        (
            lambda: attention(q, kv, kv, mask=torch.zeros(2, 2, 5, 7, device=TEST_DEVICE)),
            ValueError,
            "mask of shape",
        ),
        (
            lambda: attention(q, kv, kv, mask=torch.zeros(5, 7, dtype=torch.int32, device=TEST_DEVICE)),
            TypeError,
            "mask must be bool",
        ),  # fmt: skip
        (
            lambda: attention(q, kv, kv, mask=torch.zeros(1, 1, 1, 1, 7, device=TEST_DEVICE)),
            ValueError,
            "mask of",
        ),
        (
            lambda: attention(
                q, kv, kv, key_padding_mask=torch.ones(2, 6, dtype=torch.bool, device=TEST_DEVICE)
            ),
            ValueError,
            r"key_padding_mask of dtype torch.bool must have shape \(2, 7\)",
        ),  # fmt: skip
        (lambda: attention(q, kv, kv, key_padding_mask=lengths[:1]), ValueError, r"must have shape \(2,\)"),
        (
            lambda: attention(q, kv, kv, key_padding_mask=lengths.float()),
            TypeError,
            "key_padding_mask must be bool",
        ),
        (lambda: attention(q, kv, kv, causal=1), TypeError, "causal must be a bool"),
        (lambda: attention_decode(q, kv, kv, 8), ValueError, "cache_len must be between 0 and"),
        (lambda: attention_decode(q, kv, kv, -1), ValueError, "cache_len must be between 0 and"),
        (lambda: attention_decode(q, kv, kv, 2.5), TypeError, "cache_len must be an int"),
        (lambda: attention_decode(q, kv, kv, lengths.float()), TypeError, "cache_len must be int32"),
        (
            lambda: attention_decode(q, kv, kv, lengths[None]),
            ValueError,
            r"cache_len must be a \(\) or \(2,\)",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: attention_varlen([1.0], packed_kv, packed_kv, cu), TypeError, "q must be a torch.Tensor"),
        (lambda: attention_varlen(packed_q.double(), packed_kv, packed_kv, cu), TypeError, "q must be float16"),
        (lambda: attention_varlen(packed_q, packed_kv.half(), packed_kv, cu), ValueError, "k must have q's dtype"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv.int(), cu), TypeError, "v must be float16"),
        (lambda: attention_varlen(packed_q[None], packed_kv, packed_kv, cu), ValueError, "q must be 3-D"),
        (lambda: attention_varlen(packed_q, packed_kv[:8], packed_kv, cu), ValueError, r"k must have shape \(9, H_kv, 16\)"),
        (lambda: attention_varlen(packed_q, packed_kv[..., :8], packed_kv, cu), ValueError, "k must have shape"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv[:, :1], cu), ValueError, "v must have k's shape"),
        (lambda: attention_varlen(packed_q, packed_q[:, :3], packed_q[:, :3], cu), ValueError, "k's head count 3 must divide q's head count 4"),
        (lambda: attention_varlen(packed_q, packed_q[:, :0], packed_q[:, :0], cu), ValueError, "k's head count 0"),
        (lambda: attention_varlen(*[torch.randn(9, 1, 129, device=TEST_DEVICE)] * 3, cu), ValueError, "head_dim"),
        (lambda: attention_varlen(*[torch.randn(1, 65536, 1, device=TEST_DEVICE)] * 3, cu), ValueError, "heads must be at most"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv.clone().requires_grad_(), cu), ValueError, "v requires grad"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, [0, 4, 9]), TypeError, "cu_seqlens must be a torch.Tensor"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu.long()), TypeError, "cu_seqlens must be int32, got torch.int64"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu.float()), TypeError, "cu_seqlens must be int32"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu[None]), ValueError, "cu_seqlens must be 1-D"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu[:0]), ValueError, "cu_seqlens must be 1-D"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu[0]), ValueError, "cu_seqlens must be 1-D"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, scale=-1.0), ValueError, "scale must be positive"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, scale=float("inf")), ValueError, "scale must be finite"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, scale="0.1"), TypeError, "scale must be a real number"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, causal=None), TypeError, "causal must be a bool"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, relative_bias=[0.0]), TypeError, "relative_bias must be a torch.Tensor"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, relative_bias=torch.zeros(4, 3, dtype=torch.int64, device=TEST_DEVICE)), TypeError, "relative_bias must be float16"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, relative_bias=torch.zeros(2, 3, device=TEST_DEVICE)), ValueError, r"relative_bias must have shape \(4, 2R \+ 1\)"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, relative_bias=torch.zeros(4, 4, device=TEST_DEVICE)), ValueError, "an odd count of distances"),
        (lambda: attention_varlen(packed_q, packed_kv, packed_kv, cu, relative_bias=torch.zeros(4, 3, 1, device=TEST_DEVICE)), ValueError, "relative_bias must have shape"),
    ],
)  # fmt: skip
def test_bad_varlen_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_two_devices
def test_device_mismatch_names_the_argument():
    other = other_device()
    with pytest.raises(ValueError, match="k is on"):
        attention(q, kv.to(other), kv)
    with pytest.raises(ValueError, match="key_padding_mask is on"):
        attention(q, kv, kv, key_padding_mask=lengths.to(other))
    with pytest.raises(ValueError, match="cu_seqlens is on"):
        attention_varlen(packed_q, packed_kv, packed_kv, cu.to(other))
    with pytest.raises(ValueError, match="v is on"):
        attention_varlen(packed_q, packed_kv, packed_kv.to(other), cu)
    with pytest.raises(ValueError, match="relative_bias is on"):
        attention_varlen(packed_q, packed_kv, packed_kv, cu, relative_bias=torch.zeros(4, 3, device=other))


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_q, cpu_kv = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16)
    kpm = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    expected = attention_reference(cpu_q, cpu_kv, cpu_kv, scale=0.5, key_padding_mask=kpm)
    out = attention(cpu_q, cpu_kv, cpu_kv, scale=0.5, key_padding_mask=kpm)
    assert torch.equal(out, expected) and out.stride() == attention(cpu_q, cpu_kv, cpu_kv).stride()


def test_varlen_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_q, cpu_kv = torch.randn(11, 4, 16), torch.randn(11, 2, 16)
    offsets = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    expected = attention_varlen_reference(cpu_q, cpu_kv, cpu_kv, offsets, scale=0.5, causal=True)
    out = attention_varlen(cpu_q, cpu_kv, cpu_kv, offsets, scale=0.5, causal=True)
    assert torch.equal(out, expected) and out.is_contiguous()
    assert torch.equal(out[9:], torch.zeros_like(out[9:]))
