"""Epilogue activations on large pre-activations: the right saturated values, and no numpy warning
under Triton's interpreter (the formulas never overflow on the way to a finite result)."""

import pytest
import torch

from kernl.linear_act import gated_linear_act, linear_act
from kernl.linear_act.reference import gated_linear_act_reference, linear_act_reference
from kernl_testing import (
    TEST_DEVICE,
    ValueSpec,
    assert_matches_reference,
    float_dtypes,
    make_tensor,
    reduction_scale,
)


def _large_inputs(dtype):
    # Pre-activations of a few hundred, either sign: exp(2|h|) is past fp32's range for |h| > 44.
    x = make_tensor((9, 16), dtype, ValueSpec(1, 30.0, 0.0))
    w0 = make_tensor((24, 16), dtype, ValueSpec(2, 1.0, 0.0))
    w1 = make_tensor((24, 16), dtype, ValueSpec(3, 1.0, 0.0))
    return x, w0, w1


def _as64(*tensors):
    return [t.double() for t in tensors]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize("activation", ["tanh", "silu", "gelu_tanh", "gelu", "relu"])
def test_linear_act_on_large_values_is_right_and_quiet(activation, dtype):
    x, w0, _ = _large_inputs(dtype)
    out = linear_act(x, w0, None, activation)
    reference = linear_act_reference(*_as64(x, w0), None, activation)
    assert_matches_reference(out, reference, linear_act_reference(x, w0, None, activation))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_gated_linear_act_on_large_values_is_right_and_quiet(activation, dtype):
    x, w0, w1 = _large_inputs(dtype)
    out = gated_linear_act(x, w0, w1, activation)
    reference = gated_linear_act_reference(*_as64(x, w0, w1), activation)
    # terms of about 30 summed over K = 16: the summation order's rounding is absolute, not relative
    scale = reduction_scale(x, x.shape[1])
    assert_matches_reference(
        out, reference, gated_linear_act_reference(x, w0, w1, activation), atol_scale=scale
    )


@pytest.mark.parametrize("activation, expected", [("tanh", [-1.0, 1.0]), ("silu", [0.0, 1e4])])
def test_saturated_activations_are_exact(activation, expected):
    x = torch.tensor([[-1e4], [1e4]], device=TEST_DEVICE)
    out = linear_act(x, torch.ones(1, 1, device=TEST_DEVICE), None, activation)
    assert out.flatten().tolist() == expected
