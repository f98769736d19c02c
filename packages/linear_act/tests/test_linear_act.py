"""linear_act / gated_linear_act vs. the fp64 reference, with the unfused torch composition in the same
dtype as the yardstick."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kernl.linear_act import (
    ACTIVATIONS,
    TORCH_ACTIVATIONS,
    gated_linear_act,
    gated_linear_act_reference,
    linear_act,
    linear_act_reference,
)
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor, reduction_scale
from kernl_testing.strategies import dtypes, layouts, value_specs

sizes = st.one_of(st.integers(1, 80), st.sampled_from([96, 128, 131, 192]))
leading_shapes = st.one_of(st.tuples(st.integers(1, 70)), st.tuples(st.integers(1, 3), st.integers(1, 17)),
                           st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5)))  # fmt: skip


def _torch_unfused(x, weight, bias, activation, residual):
    h = TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
    return h + residual if residual is not None else h


@given(lead=leading_shapes, n=sizes, k=sizes, dtype=dtypes(), x_layout=layouts(), w_layout=layouts(),
       spec=value_specs(), activation=st.sampled_from(ACTIVATIONS), with_bias=st.booleans(),
       with_residual=st.booleans())  # fmt: skip
def test_linear_act_matches_reference(lead, n, k, dtype, x_layout, w_layout, spec, activation, with_bias,
                                      with_residual):  # fmt: skip
    x = make_tensor((*lead, k), dtype, spec, x_layout)
    weight = make_tensor((n, k), dtype, ValueSpec(spec.seed + 1, k**-0.5, 0.0), w_layout)
    bias = make_tensor((n,), dtype, ValueSpec(spec.seed + 2, 1.0, 0.0)) if with_bias else None
    residual = make_tensor((*lead, n), dtype, ValueSpec(spec.seed + 3, 1.0, 0.0)) if with_residual else None
    out = linear_act(x, weight, bias, activation, residual)
    assert out.dtype == dtype and out.shape == (*lead, n) and out.is_contiguous()
    as64 = lambda t: t.double() if t is not None else None
    reference = linear_act_reference(as64(x), as64(weight), as64(bias), activation, as64(residual))
    assert_matches_reference(out, reference, _torch_unfused(x, weight, bias, activation, residual),
                             atol_scale=reduction_scale(x, k))  # fmt: skip


@given(lead=leading_shapes, n=sizes, k=sizes, dtype=dtypes(), x_layout=layouts(), w_layout=layouts(),
       spec=value_specs(), activation=st.sampled_from(["gelu_tanh", "gelu", "relu", "silu"]),
       with_residual=st.booleans())  # fmt: skip
def test_gated_linear_act_matches_reference(lead, n, k, dtype, x_layout, w_layout, spec, activation,
                                            with_residual):  # fmt: skip
    x = make_tensor((*lead, k), dtype, spec, x_layout)
    w0 = make_tensor((n, k), dtype, ValueSpec(spec.seed + 1, k**-0.5, 0.0), w_layout)
    w1 = make_tensor((n, k), dtype, ValueSpec(spec.seed + 2, k**-0.5, 0.0), w_layout)
    residual = make_tensor((*lead, n), dtype, ValueSpec(spec.seed + 3, 1.0, 0.0)) if with_residual else None
    out = gated_linear_act(x, w0, w1, activation, residual)
    assert out.dtype == dtype and out.shape == (*lead, n)
    reference = gated_linear_act_reference(x.double(), w0.double(), w1.double(), activation,
                                           residual.double() if with_residual else None)  # fmt: skip
    unfused = TORCH_ACTIVATIONS[activation](F.linear(x, w0)) * F.linear(x, w1)
    if with_residual:
        unfused = unfused + residual
    assert_matches_reference(out, reference, unfused, atol_scale=reduction_scale(x, k))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_tails_and_nan(activation):
    """Large |h| (exp overflow in tanh/silu/gelu), exact zeros, and NaN, through every activation."""
    k = 4
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([-200.0, -30.0, -9.0, -1e-4, 0.0, 1e-4, 3.0, 9.0, 30.0, 200.0, float("nan")])
    weight = values[:, None] * torch.ones(1, k)
    zeros = make_tensor((4, k), torch.float32, ValueSpec(0, 0.0, 0.0))  # on the test device
    x, weight = zeros + x.to(zeros.device), weight.to(zeros.device)
    out = linear_act(x, weight, None, activation)
    reference = linear_act_reference(x.double(), weight.double(), None, activation)
    assert_matches_reference(out, reference, _torch_unfused(x, weight, None, activation, None))


def test_tanh_keeps_fp32_relative_precision_near_zero():
    """tanh(x) ~ x for small x: relative error within a few fp32 ulps (``1 - 2 / (exp(2x) + 1)`` alone
    cancels there: it gives tanh(1e-8) = 0 and tanh(1e-6) 4.6% off)."""
    values = torch.tensor([1e-30, 1e-8, -1e-6, 1e-4, -0.01, 0.3, -0.62, 0.63, 1.0, -3.0, 12.0])
    x = make_tensor((values.numel(), 1), torch.float32, ValueSpec(0, 0.0, 0.0)) + values[:, None].to(
        TEST_DEVICE
    )
    weight = torch.ones(1, 1, device=x.device)
    out = linear_act(x, weight, None, "tanh")[:, 0].cpu()
    torch.testing.assert_close(out.double(), torch.tanh(values.double()), rtol=1e-6, atol=0)


def test_hf_activation_names_are_accepted():
    x = make_tensor((3, 40), torch.float32, ValueSpec(1, 1.0, 0.0))
    w = make_tensor((24, 40), torch.float32, ValueSpec(2, 0.2, 0.0))
    assert torch.equal(linear_act(x, w, activation="gelu_new"), linear_act(x, w, activation="gelu_tanh"))
    assert torch.equal(linear_act(x, w, activation=None), linear_act(x, w, activation="none"))


@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_k_zero_gives_the_activation_of_the_bias(lead):
    x = make_tensor((*lead, 0), torch.float32, ValueSpec(1, 1.0, 0.0))
    weight = make_tensor((5, 0), torch.float32, ValueSpec(2, 1.0, 0.0))
    bias = make_tensor((5,), torch.float32, ValueSpec(3, 1.0, 0.0))
    assert torch.allclose(
        linear_act(x, weight, bias, activation="gelu").cpu(), F.gelu(bias.cpu()).expand(*lead, 5)
    )
    gated = gated_linear_act(x, weight, weight, "gelu_tanh")
    assert gated.shape == (*lead, 5) and torch.equal(gated.cpu(), torch.zeros(*lead, 5))
