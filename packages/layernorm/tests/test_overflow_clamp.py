"""T5's fp16 overflow guard: the two-pass kernel vs transformers' five ops, exactly, infinities and NaN included."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernl.layernorm import overflow_clamp, overflow_clamp_reference
from kernl_testing import TEST_DEVICE, make_tensor
from kernl_testing.strategies import dtypes, layouts, value_specs


def _t5_guard(hidden_states):
    """transformers' T5 block code, verbatim apart from the dtype test."""
    clamp_value = torch.where(
        torch.isinf(hidden_states).any(),
        torch.finfo(hidden_states.dtype).max - 1000,
        torch.finfo(hidden_states.dtype).max,
    )
    return torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)


@given(m=st.integers(1, 40), n=st.one_of(st.integers(1, 300), st.sampled_from([768, 4097])), dtype=dtypes(),
       layout=layouts(), spec=value_specs(), specials=st.lists(st.sampled_from(["inf", "-inf", "nan"]), max_size=3),
       limits=st.sampled_from([(64504.0, 65504.0), (1.5, 2.5), (3.0, 0.5)]), data=st.data())  # fmt: skip
def test_matches_the_reference_exactly(m, n, dtype, layout, spec, specials, limits, data):
    x = make_tensor((m, n), dtype, spec, layout)
    for value in specials:  # infinities and NaN at drawn places, possibly in any program's block
        x[data.draw(st.integers(0, m - 1)), data.draw(st.integers(0, n - 1))] = float(value)
    out = overflow_clamp(x, *limits)
    expected = overflow_clamp_reference(x, *limits)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("inject", [None, float("inf"), -float("inf")])
def test_matches_transformers_t5_guard(inject):
    x = torch.full((3, 5000), 65504.0, dtype=torch.float16, device=TEST_DEVICE)
    x[1] = -65504.0
    x[2] = torch.linspace(-60000, 60000, 5000)
    if inject is not None:
        x[2, 4321] = inject  # the last program's block: the first one must still see the flag
    limits = (torch.finfo(torch.float16).max - 1000, torch.finfo(torch.float16).max)
    torch.testing.assert_close(overflow_clamp(x, *limits), _t5_guard(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: overflow_clamp(torch.ones(3, dtype=torch.int32, device=TEST_DEVICE), 1.0, 2.0), TypeError, "x must be float16"),
        (lambda: overflow_clamp(torch.ones(3, device=TEST_DEVICE), -1.0, 2.0), ValueError, "limit_if_inf must be positive"),
        (lambda: overflow_clamp(torch.ones(3, device=TEST_DEVICE), 1.0, None), TypeError, "limit must be a real number"),
        (lambda: overflow_clamp(torch.ones(3, device=TEST_DEVICE), "64504", 2.0), TypeError, "limit_if_inf must be a real number, got str"),
        (lambda: overflow_clamp(torch.ones(3, device=TEST_DEVICE), 1.0, 0.0), ValueError, "limit must be positive"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_op_schema_and_fake():
    x = torch.randn(4, 9, device=TEST_DEVICE)
    torch.library.opcheck(
        torch.ops.kernl.overflow_clamp.default, (x, 1.0, 2.0), test_utils=("test_schema", "test_faketensor")
    )
