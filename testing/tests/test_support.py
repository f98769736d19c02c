"""The test support itself must be able to fail: poisoning and the tolerance rule are checked here."""

import pytest
import torch

from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor


def test_uninitialized_memory_is_poisoned():
    assert torch.isnan(torch.empty(64, device=TEST_DEVICE)).all()


@pytest.mark.parametrize("layout", ["contiguous", "padded_rows", "transposed"])
def test_make_tensor_layouts(layout):
    t = make_tensor((5, 7), torch.float32, ValueSpec(seed=1, scale=0.5, offset=-20.0), layout)
    assert t.shape == (5, 7)
    assert t.is_contiguous() == (layout == "contiguous")
    assert -25 < float(t.mean()) < -15


def test_tolerance_rejects_nan_and_large_errors():
    ref = torch.linspace(-2, 2, 17, dtype=torch.float64)
    ok = ref.to(torch.float16)
    assert_matches_reference(ok, ref, ok)
    with pytest.raises(AssertionError, match="NaN"):
        bad = ok.clone()
        bad[3] = float("nan")
        assert_matches_reference(bad, ref, ok)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_matches_reference(ok + 0.05, ref, ok)


def test_tolerance_accepts_matching_nan():
    ref = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    assert_matches_reference(ref.float(), ref, None)
    with pytest.raises(AssertionError, match="infinities"):
        assert_matches_reference(torch.tensor([1.0, float("nan"), -float("inf")]), ref, None)


def test_an_overflowed_yardstick_does_not_let_any_value_pass():
    ref = torch.tensor([1.0, 2.0, 7e4], dtype=torch.float64)
    peer = torch.tensor([1.0, float("inf"), float("inf")], dtype=torch.float16)  # torch overflowed at [1]
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_matches_reference(torch.tensor([1.0, 1234.0, float("inf")], dtype=torch.float16), ref, peer)
    # beyond fp16's range the right answer overflows: inf or the largest value, of the reference's sign
    for top in (float("inf"), 65504.0):
        assert_matches_reference(torch.tensor([1.0, 2.0, top], dtype=torch.float16), ref, peer)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_matches_reference(torch.tensor([1.0, 2.0, -float("inf")], dtype=torch.float16), ref, peer)


def test_atol_scale_widens_the_absolute_part_only():
    ref = torch.tensor([0.0, 300.0], dtype=torch.float64)
    assert_matches_reference(torch.tensor([0.05, 300.0], dtype=torch.float16), ref, None, atol_scale=70)
    with pytest.raises(AssertionError, match="out of tolerance"):  # 2% off a large result: still caught
        assert_matches_reference(torch.tensor([0.0, 306.0], dtype=torch.float16), ref, None, atol_scale=70)
