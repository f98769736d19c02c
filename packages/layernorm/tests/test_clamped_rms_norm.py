"""T5's fp16 overflow guard fused into the RMS norm after it: the guarded input exactly as transformers'
five ops give it, the norm against fp64, in both of the kernel's modes (a whole-tensor scan in every
program for small tensors, a flag pass first for large ones), infinities and NaN in any program's rows."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.t5.modeling_t5 import T5LayerNorm

from kernl.layernorm import clamped_rms_norm, clamped_rms_norm_reference, overflow_clamp_reference
from kernl.layernorm.kernel import SCAN_LIMIT
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor
from kernl_testing.strategies import dtypes, layouts, value_specs

FP16_LIMITS = (torch.finfo(torch.float16).max - 1000, torch.finfo(torch.float16).max)


def _fp64_norm(guarded, weight, eps):
    """T5LayerNorm in fp64 on the guarded input, keeping the module's rounding to a half weight dtype."""
    hidden = guarded.double() * torch.rsqrt(guarded.double().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.to(weight.dtype)
    return weight.double() * hidden.double()


def _t5_block_then_norm(hidden_states, norm):
    """transformers' T5 block guard, verbatim apart from the dtype test, then the next layer's norm."""
    clamp_value = torch.where(
        torch.isinf(hidden_states).any(),
        torch.finfo(hidden_states.dtype).max - 1000,
        torch.finfo(hidden_states.dtype).max,
    )
    hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return norm(hidden_states), hidden_states


@given(m=st.integers(1, 40), n=st.one_of(st.integers(1, 300), st.sampled_from([768, 2500])), x_dtype=dtypes(),
       w_dtype=dtypes(), layout=layouts(), spec=value_specs(), with_residual=st.booleans(),
       specials=st.lists(st.sampled_from(["inf", "-inf", "nan", "60000", "-65504"]), max_size=3),
       limits=st.sampled_from([FP16_LIMITS, (1.5, 2.5), (3.0, 0.5)]), data=st.data())  # fmt: skip
def test_matches_guard_then_norm(m, n, x_dtype, w_dtype, layout, spec, with_residual, specials, limits, data):
    x = make_tensor((m, n), x_dtype, spec, layout)
    for value in specials:  # at drawn places: in any program's rows, the scan or the flag must see them
        x[data.draw(st.integers(0, m - 1)), data.draw(st.integers(0, n - 1))] = float(value)
    weight = make_tensor((n,), w_dtype, ValueSpec(spec.seed + 1, 0.5, 1.0))
    residual = make_tensor((m, n), x_dtype, ValueSpec(spec.seed + 2, 1.0, 0.0)) if with_residual else None
    normed, guarded = clamped_rms_norm(x, weight, 1e-6, *limits, residual=residual)
    expected_guarded = overflow_clamp_reference(x + residual if with_residual else x, *limits)
    assert guarded.dtype == x_dtype and guarded.is_contiguous() and normed.is_contiguous()
    torch.testing.assert_close(guarded, expected_guarded, rtol=0, atol=0, equal_nan=True)
    torch_normed, _ = clamped_rms_norm_reference(x, weight, 1e-6, *limits, residual)
    assert normed.dtype == torch_normed.dtype and normed.shape == x.shape
    assert_matches_reference(normed, _fp64_norm(expected_guarded, weight, 1e-6), torch_normed)


@pytest.mark.parametrize("rows", [3, SCAN_LIMIT // 768 + 2])  # one launch (scan), and flag pass + launch
@pytest.mark.parametrize("inject", [None, float("inf"), -float("inf")])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_transformers_t5_block_and_layer_norm(rows, inject, with_residual):
    module = T5LayerNorm(768, eps=1e-6).to(TEST_DEVICE, torch.float16)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.5, 1.5, 768))
    x = make_tensor((rows, 768), torch.float16, ValueSpec(11, 2.0, 0.0))
    x[0, :5] = 65504.0  # clamped to 64512 (64504 in fp16) only when an infinity is anywhere
    x[1, :5] = -65504.0
    residual = make_tensor((rows, 768), torch.float16, ValueSpec(12, 1.0, 0.0)) if with_residual else None
    if inject is not None:
        x[rows - 1, 700] = inject  # the last program's rows: the first one must still clamp
    with torch.no_grad():
        expected_normed, expected_guarded = _t5_block_then_norm(x + residual if with_residual else x, module)
        normed, guarded = clamped_rms_norm(x, module.weight, module.variance_epsilon, *FP16_LIMITS, residual)
    torch.testing.assert_close(guarded, expected_guarded, rtol=0, atol=0)
    assert (guarded[0, :5] == (64512.0 if inject is not None else 65504.0)).all()
    assert_matches_reference(normed, _fp64_norm(expected_guarded, module.weight, 1e-6), expected_normed)


@pytest.mark.parametrize("rows", [2, SCAN_LIMIT // 40 + 1])  # scan, flag pass
def test_a_sum_past_the_fp16_range_is_an_infinity_the_guard_sees(rows):
    x = torch.full((rows, 40), 2.0, dtype=torch.float16, device=TEST_DEVICE)
    x[rows - 1, 3] = 60000.0
    residual = torch.zeros_like(x)
    residual[rows - 1, 3] = 10000.0  # 70000 rounds to inf in fp16: the guard then clamps all to 64504
    residual[0, 0] = 65000.0
    _, guarded = clamped_rms_norm(x, torch.ones(40, device=TEST_DEVICE), 1e-6, *FP16_LIMITS, residual)
    assert guarded[rows - 1, 3] == 64512.0 and guarded[0, 0] == 64512.0  # 64504 rounds to 64512


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, w: clamped_rms_norm(x, w, 1e-6, -1.0, 2.0), ValueError, "limit_if_inf must be positive"),
        (lambda x, w: clamped_rms_norm(x, w, 1e-6, 1.0, "2"), TypeError, "limit must be a real number"),
        (lambda x, w: clamped_rms_norm(x, None, 1e-6, 1.0, 2.0), ValueError, "weight is required"),
        (lambda x, w: clamped_rms_norm(x, w[:5], 1e-6, 1.0, 2.0), ValueError, "weight must have shape"),
        (lambda x, w: clamped_rms_norm(x, w, 1e-6, 1.0, 2.0, x[:1]), ValueError, "residual must match x"),
        (lambda x, w: clamped_rms_norm(x.int(), w, 1e-6, 1.0, 2.0), TypeError, "x must be float16"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(call, error, message):
    x, w = torch.ones(3, 8, device=TEST_DEVICE), torch.ones(8, device=TEST_DEVICE)
    with pytest.raises(error, match=message):
        call(x, w)


@pytest.mark.parametrize("with_residual", [False, True])
def test_op_schema_and_fake(with_residual):
    x = torch.randn(4, 9, device=TEST_DEVICE)
    residual = torch.randn(4, 9, device=TEST_DEVICE) if with_residual else None
    weight = torch.randn(9, device=TEST_DEVICE).half()
    torch.library.opcheck(
        torch.ops.kernl.clamped_rms_norm.default,
        (x, residual, weight, 1e-6, 1.0, 2.0),
        test_utils=("test_schema", "test_faketensor"),
    )
