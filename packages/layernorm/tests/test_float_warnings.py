"""Rows holding an infinity normalise to NaN, as F.layer_norm's do, and a residual sum past the fp16
range is stored as inf, as ``x + residual`` gives it: the other rows are untouched, and Triton's
interpreter raises no numpy warning on the way (the GPU gives these values silently)."""

import pytest
import torch
import torch.nn.functional as F

from kernl.layernorm import layer_norm, rms_norm
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, float_dtypes, make_tensor


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", float_dtypes())
def test_a_row_with_an_inf_is_nan_and_the_others_are_not(dtype):
    x = make_tensor((4, 33), dtype, ValueSpec(0, 1.0, 0.0))
    x[1, 0], x[2, 5] = float("inf"), float("-inf")
    weight = make_tensor((33,), dtype, ValueSpec(1, 1.0, 0.0))
    bias = make_tensor((33,), dtype, ValueSpec(2, 1.0, 0.0))
    out = layer_norm(x, weight, bias)
    reference = F.layer_norm(x.double(), (33,), weight.double(), bias.double())
    assert torch.isnan(out[1:3]).all() and not torch.isnan(out[[0, 3]]).any()
    assert_matches_reference(out, reference, F.layer_norm(x, (33,), weight, bias))


@pytest.mark.filterwarnings("error")
def test_a_residual_sum_past_fp16s_range_is_inf_as_in_torch():
    x = torch.full((2, 16), 60000.0, device=TEST_DEVICE, dtype=torch.float16)
    weight = torch.ones(16, device=TEST_DEVICE, dtype=torch.float16)
    _, summed = layer_norm(x, weight, None, residual=x)
    assert torch.equal(summed, x + x) and torch.isinf(summed).all()
    _, summed = rms_norm(x, weight, residual=x)
    assert torch.equal(summed, x + x)
