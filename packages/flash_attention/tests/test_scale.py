"""Any finite scale, as SDPA takes it: 0 (every visible key weighs the same) and negative scales give
the reference's result, never NaN, with and without masks, padding, causality and bias."""

import pytest
import torch
import torch.nn.functional as F

from kernl.flash_attention import attention, attention_decode, attention_reference
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, float_dtypes, make_tensor

MASKS = ["none", "bool", "float", "lengths", "causal"]


def _inputs(dtype, mask_kind):
    b, h, n_q, n_k, d = 2, 2, 5, 37, 16  # 37 keys: a ragged last block on the CPU's 16-key blocks
    q, k, v = (make_tensor((b, h, n, d), dtype, ValueSpec(seed, 1.0, 0.0)) for seed, n in
               ((1, n_q), (2, n_k), (3, n_k)))  # fmt: skip
    keep = torch.rand((b, 1, n_q, n_k), generator=torch.Generator().manual_seed(4)) > 0.3
    masks = {
        "bool": {"mask": keep.to(TEST_DEVICE)},
        "float": {"mask": torch.where(keep, 0.0, float("-inf")).to(TEST_DEVICE, dtype)},
        "lengths": {"key_padding_mask": torch.tensor([11, n_k], device=TEST_DEVICE)},
        "causal": {"causal": True},
    }
    return q, k, v, masks.get(mask_kind, {})


@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_zero_and_negative_scales_match_the_reference(scale, mask_kind, dtype):
    q, k, v, masks = _inputs(dtype, mask_kind)
    out = attention(q, k, v, scale=scale, **masks)
    as64 = {
        n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for n, t in masks.items()
    }
    reference = attention_reference(q.double(), k.double(), v.double(), scale=scale, **as64)
    same_dtype = attention_reference(q, k, v, scale=scale, **masks)
    assert not torch.isnan(out).any()
    assert_matches_reference(out, reference, same_dtype)


def test_zero_scale_averages_the_visible_values_as_sdpa_does():
    q, k, v, masks = _inputs(torch.float32, "bool")
    out = attention(q, k, v, scale=0.0, **masks)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=masks["mask"], scale=0.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _check_against_reference(out, q, k, v, scale, **extra):
    as64 = {n: t.double() for n, t in extra.items()}
    reference = attention_reference(q.double(), k.double(), v.double(), scale=scale, **as64)
    assert_matches_reference(out, reference, attention_reference(q, k, v, scale=scale, **extra))


@pytest.mark.parametrize("scale", [0.0, -0.25])
def test_decode_takes_zero_and_negative_scales(scale):
    q, k, v, _ = _inputs(torch.float32, "none")
    bias = make_tensor((1, 2, 5, 37), torch.float32, ValueSpec(5, 1.0, 0.0))
    out = attention_decode(q, k, v, 30, scale=scale, bias=bias)
    _check_against_reference(out, q, k[:, :, :30], v[:, :, :30], scale, bias=bias[..., :30])
    out = attention_decode(q, k, v, 30, scale=scale)
    _check_against_reference(out, q, k[:, :, :30], v[:, :, :30], scale)
