"""Additive masks and biases whose inf or NaN results are meant: HF's ``finfo.min`` padding mask in
fp32 (scaled to base 2 it passes fp32's range: -inf, a weight of 0) and an inf or NaN addition (a NaN
row, as SDPA's); in packed attention, an inf or NaN key (its sequence's rows NaN). The results match the reference and Triton's interpreter raises no numpy warning."""

import pytest
import torch

from kernl.flash_attention import attention, attention_reference, attention_varlen, attention_varlen_reference
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor


@pytest.mark.filterwarnings("error")
def test_an_hf_finfo_min_padding_mask_in_fp32_is_quiet_and_right():
    q = make_tensor((2, 2, 5, 16), torch.float32, ValueSpec(0, 1.0, 0.0))
    k, v = (make_tensor((2, 2, 37, 16), torch.float32, ValueSpec(i, 1.0, 0.0)) for i in (1, 2))
    valid = torch.arange(37, device=TEST_DEVICE) < torch.tensor([[11], [37]], device=TEST_DEVICE)
    mask = torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    out = attention(q, k, v, mask=mask)
    reference = attention_reference(q.double(), k.double(), v.double(), mask=mask.double())
    assert_matches_reference(out, reference, attention_reference(q, k, v, mask=mask))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_an_inf_or_nan_bias_gives_a_nan_row_quietly(bad):
    q = make_tensor((1, 2, 5, 16), torch.float16, ValueSpec(0, 1.0, 0.0))
    k, v = (make_tensor((1, 2, 37, 16), torch.float16, ValueSpec(i, 1.0, 0.0)) for i in (1, 2))
    bias = torch.zeros((1, 2, 5, 37), device=TEST_DEVICE, dtype=torch.float16)
    bias[0, 1, 2, 30] = bad
    out = attention(q, k, v, bias=bias)
    assert torch.isnan(out[0, 1, 2]).all()
    reference = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    assert_matches_reference(out, reference, attention_reference(q, k, v, bias=bias))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_packed_attention_with_an_inf_or_nan_key_is_quiet_and_right(bad):
    q = make_tensor((40, 2, 16), torch.float16, ValueSpec(0, 1.0, 0.0))
    k, v = (make_tensor((40, 1, 16), torch.float16, ValueSpec(i, 1.0, 0.0)) for i in (1, 2))
    k[7, 0, 3] = bad  # in the second sequence: its rows are NaN, the others untouched
    cu_seqlens = torch.tensor([0, 5, 25, 38], dtype=torch.int32, device=TEST_DEVICE)
    out = attention_varlen(q, k, v, cu_seqlens)
    assert torch.isnan(out[5:25]).any() and not torch.isnan(out[:5]).any()
    reference = attention_varlen_reference(q.double(), k.double(), v.double(), cu_seqlens)
    assert_matches_reference(out, reference, attention_varlen_reference(q, k, v, cu_seqlens))
