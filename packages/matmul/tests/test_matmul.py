"""matmul vs. the fp64 reference, with torch.matmul in the same dtype as the yardstick."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernl.matmul import launch, matmul, matmul_reference
from kernl.matmul.functional import tf32_allowed
from kernl.matmul.launch import check_spans
from kernl_testing import (
    ValueSpec,
    assert_matches_reference,
    make_tensor,
    needs_two_gpus,
    on_gpu,
    reduction_scale,
)
from kernl_testing.strategies import dtypes, layouts, value_specs

sizes = st.one_of(st.integers(1, 80), st.sampled_from([96, 128, 129, 200]))
# How the batch appears: none, both 3-D, one side broadcast (batch 1 or a 2-D operand).
batch_modes = st.sampled_from(["2d", "3d", "a_bcast", "b_bcast", "a_2d", "b_2d"])


def _operands(mode, batch, m, n, k, dtype, layout_a, layout_b, spec):
    ba = {"2d": None, "a_2d": None, "a_bcast": 1}.get(mode, batch)
    bb = {"2d": None, "b_2d": None, "b_bcast": 1}.get(mode, batch)
    a = make_tensor((*([ba] if ba else []), m, k), dtype, spec, layout_a)
    b = make_tensor((*([bb] if bb else []), k, n), dtype, ValueSpec(spec.seed + 1, 1.0, 0.0), layout_b)
    return a, b


@given(mode=batch_modes, batch=st.integers(1, 3), m=sizes, n=sizes, k=sizes, dtype=dtypes(), layout_a=layouts(),
       layout_b=layouts(), spec=value_specs())  # fmt: skip
def test_matmul_matches_reference(mode, batch, m, n, k, dtype, layout_a, layout_b, spec):
    a, b = _operands(mode, batch, m, n, k, dtype, layout_a, layout_b, spec)
    out = matmul(a, b)
    expected = torch.matmul(a, b)
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    assert_matches_reference(
        out, matmul_reference(a.double(), b.double()), expected, atol_scale=reduction_scale(a, k)
    )


def test_sliced_views_and_folded_batch():
    base = make_tensor((4, 40, 70), torch.float32, ValueSpec(1, 1.0, 0.5))
    a = base[1:, 3:33, 5:69]  # (3, 30, 64), no unit stride to fold the batch with
    b = make_tensor((64, 48), torch.float32, ValueSpec(2, 1.0, 0.0))
    assert_matches_reference(matmul(a, b), matmul_reference(a.double(), b.double()), torch.matmul(a, b))
    a = base[:, :, :64]  # viewable as (160, 64): one folded GEMM
    assert_matches_reference(matmul(a, b), matmul_reference(a.double(), b.double()), torch.matmul(a, b))


def test_empty_and_k_zero():
    a = make_tensor((0, 5), torch.float32, ValueSpec(1, 1.0, 0.0))
    assert matmul(a, make_tensor((5, 7), torch.float32, ValueSpec(2, 1.0, 0.0))).shape == (0, 7)
    out = matmul(make_tensor((3, 0), torch.float16, ValueSpec(1, 1.0, 0.0)),
                 make_tensor((0, 7), torch.float16, ValueSpec(1, 1.0, 0.0)))  # fmt: skip
    assert torch.equal(out.float().cpu(), torch.zeros(3, 7))
    spec = ValueSpec(3, 1.0, 0.0)
    empty_batch = make_tensor((0, 5, 7), torch.float32, spec)
    for b in (make_tensor((7, 6), torch.float32, spec), make_tensor((1, 7, 6), torch.float32, spec)):
        assert matmul(empty_batch, b).shape == torch.matmul(empty_batch, b).shape == (0, 5, 6)


def test_k_zero_slices_with_aligned_rows():
    """K = 0 views of wider tensors keep 16-byte aligned row strides, as the TMA kernel wants, but a tensor
    descriptor cannot describe an empty dimension: the result is still zeros (it raised an assertion)."""
    spec = ValueSpec(1, 1.0, 0.0)
    a = make_tensor((2, 100, 64), torch.float16, spec)[..., :0]
    b = make_tensor((2, 64, 48), torch.float16, spec)[:, :0]
    for x, y in ((a[0], b[0]), (a, b)):
        out = matmul(x, y)
        assert out.shape == torch.matmul(x, y).shape and not out.float().cpu().any()


@pytest.mark.parametrize("batches", [(7, 7), (7, 1), (1, 7)])
def test_batches_past_the_grid_limit_run_in_parts(monkeypatch, batches):
    """CUDA caps the grid's batch axis at 65535 programs: larger batches launch in parts (here, parts of 3)."""
    monkeypatch.setattr(launch, "MAX_GRID_Z", 3)
    a = make_tensor((batches[0], 9, 20), torch.float32, ValueSpec(1, 1.0, 0.0))
    b = make_tensor((batches[1], 20, 11), torch.float32, ValueSpec(2, 1.0, 0.0))
    assert_matches_reference(matmul(a, b), matmul_reference(a.double(), b.double()), torch.matmul(a, b))


@pytest.mark.skipif(not on_gpu(), reason="the grid limit is CUDA's; the interpreter would take minutes")
def test_batch_of_70000_on_the_gpu():
    a = make_tensor((70000, 4, 8), torch.float16, ValueSpec(1, 1.0, 0.0))
    b = make_tensor((70000, 8, 4), torch.float16, ValueSpec(2, 1.0, 0.0))
    assert_matches_reference(matmul(a, b), matmul_reference(a.double(), b.double()), torch.matmul(a, b))


def test_nan_and_inf_propagate_like_torch():
    a = make_tensor((5, 40), torch.float32, ValueSpec(1, 1.0, 0.0))
    b = make_tensor((40, 6), torch.float32, ValueSpec(2, 1.0, 0.0))
    a[1, 3] = float("nan")
    a[2, 5] = float("inf")
    b[:, 4] = 0.0
    out = matmul(a, b)
    expected = torch.matmul(a, b)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert_matches_reference(out, matmul_reference(a.double(), b.double()), expected)


@pytest.mark.parametrize("precision, tf32", [("tf32", True), ("ieee", False)])
def test_follows_pytorchs_new_fp32_precision_setting(precision, tf32):
    settings = torch.backends.cuda.matmul
    before = settings.fp32_precision
    settings.fp32_precision = precision
    try:
        assert tf32_allowed() is tf32
        a = make_tensor((5, 8), torch.float16, ValueSpec(1, 1.0, 0.0))
        assert matmul(a, a.t()).shape == (5, 5)  # reading the legacy flag here raised under "tf32"
    finally:
        settings.fp32_precision = before


def test_operands_past_32_bit_indexing_are_refused_naming_them():
    wide = SimpleNamespace(shape=(1, 3, 16), stride=lambda: (0, 2**30, 1), numel=lambda: 48)
    with pytest.raises(ValueError, match=r"a \(linear_act's x\) spans 2147483664 elements"):
        check_spans({"a (linear_act's x)": wide}, 3, 8)
    with pytest.raises(ValueError, match="output"):
        check_spans({}, 2**16, 2**15)
    check_spans(
        {"a": SimpleNamespace(shape=(4, 3, 16), stride=lambda: (2**40, 16, 1), numel=lambda: 192)}, 3, 8
    )


@needs_two_gpus
def test_operands_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device: the GEMM must make the operands' GPU current (small M
    with split-K and large M, tuned, so that the tuner's timing runs there too)."""
    for m in (5, 1000):
        a = make_tensor((m, 72), torch.float16, ValueSpec(1, 1.0, 0.0)).to("cuda:1")
        b = make_tensor((72, 136), torch.float16, ValueSpec(2, 1.0, 0.0)).to("cuda:1")
        with torch.cuda.device(0):
            out = matmul(a, b)
        torch.cuda.synchronize(1)
        assert out.device == a.device
        assert_matches_reference(out, matmul_reference(a.double(), b.double()), torch.matmul(a, b))
