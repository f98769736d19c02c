"""Rows holding an infinity normalise to NaN, as F.layer_norm's do, and a residual sum past the fp16
range is stored as inf, as ``x + residual`` gives it: the other rows are untouched, and Triton's
interpreter raises no numpy warning on the way (the GPU gives these values silently)."""

import pytest
import torch
import torch.nn.functional as F

from kernl.layernorm import layer_norm, rms_norm
from kernl_testing import TEST_DEVICE, float_dtypes


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", float_dtypes())
def test_a_row_with_an_inf_is_nan_and_the_others_are_not(dtype):
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(0)).to(TEST_DEVICE, dtype)
    x[1, 0], x[2, 5] = float("inf"), float("-inf")
    weight, bias = (
        torch.ones(33, device=TEST_DEVICE, dtype=dtype),
        torch.zeros(33, device=TEST_DEVICE, dtype=dtype),
    )
    out = layer_norm(x, weight, bias)
    expected = F.layer_norm(x.float(), (33,), weight.float(), bias.float())
    assert torch.isnan(out[1:3]).all() and torch.isnan(expected[1:3]).all()
    torch.testing.assert_close(out[[0, 3]].float(), expected[[0, 3]], rtol=1e-2, atol=1e-2)


@pytest.mark.filterwarnings("error")
def test_a_residual_sum_past_fp16s_range_is_inf_as_in_torch():
    x = torch.full((2, 16), 60000.0, device=TEST_DEVICE, dtype=torch.float16)
    weight = torch.ones(16, device=TEST_DEVICE, dtype=torch.float16)
    _, summed = layer_norm(x, weight, None, residual=x)
    assert torch.equal(summed, x + x) and torch.isinf(summed).all()
    _, summed = rms_norm(x, weight, residual=x)
    assert torch.equal(summed, x + x)
