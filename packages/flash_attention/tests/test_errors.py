"""Bad input gets a clear error naming the argument; CPU tensors without the interpreter use the reference."""

import pytest
import torch

from kernl.flash_attention import attention, attention_decode, attention_reference
from kernl_testing import TEST_DEVICE, needs_two_devices, other_device

q = torch.randn(2, 3, 5, 16, device=TEST_DEVICE)
kv = torch.randn(2, 3, 7, 16, device=TEST_DEVICE)
lengths = torch.tensor([3, 7], device=TEST_DEVICE)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: attention([1.0], kv, kv), TypeError, "q must be a torch.Tensor"),
        (lambda: attention(q.double(), kv, kv), TypeError, "q must be float16"),
        (lambda: attention(q, kv.long(), kv), TypeError, "k must be float16"),
        (lambda: attention(q, kv.half(), kv), ValueError, "k must have q's dtype"),
        (lambda: attention(q[0], kv, kv), ValueError, "q must be 4-D"),
        (lambda: attention(q, kv, kv.clone().requires_grad_()), ValueError, "v requires grad"),
        (lambda: attention(q, kv[:1], kv), ValueError, r"k must have shape \(2, 3, K, 16\)"),
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


@needs_two_devices
def test_device_mismatch_names_the_argument():
    other = other_device()
    with pytest.raises(ValueError, match="k is on"):
        attention(q, kv.to(other), kv)
    with pytest.raises(ValueError, match="key_padding_mask is on"):
        attention(q, kv, kv, key_padding_mask=lengths.to(other))


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_q, cpu_kv = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16)
    kpm = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    expected = attention_reference(cpu_q, cpu_kv, cpu_kv, scale=0.5, key_padding_mask=kpm)
    out = attention(cpu_q, cpu_kv, cpu_kv, scale=0.5, key_padding_mask=kpm)
    assert torch.equal(out, expected) and out.stride() == attention(cpu_q, cpu_kv, cpu_kv).stride()
