"""LayerNorm kernel vs. the fp64 reference, with torch in the same dtype as the yardstick."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kernl.layernorm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor, needs_two_gpus
from kernl_testing.strategies import dtypes, layouts, value_specs

hidden_sizes = st.one_of(st.integers(1, 300), st.sampled_from([512, 768, 1000, 1024, 4096, 5120, 16384]))
leading_shapes = st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 3), st.integers(1, 17)))


@given(lead=leading_shapes, n=hidden_sizes, dtype=dtypes(), layout=layouts(), spec=value_specs(),
       eps=st.sampled_from([1e-5, 1e-12]), with_affine=st.booleans())  # fmt: skip
def test_layer_norm_matches_reference(lead, n, dtype, layout, spec, eps, with_affine):
    x = make_tensor((*lead, n), dtype, spec, layout)
    weight = make_tensor((n,), dtype, ValueSpec(spec.seed + 1, 1.0, 1.0)) if with_affine else None
    bias = make_tensor((n,), dtype, ValueSpec(spec.seed + 2, 1.0, 0.0)) if with_affine else None
    out = layer_norm(x, weight, bias, eps)
    assert out.dtype == dtype and out.shape == x.shape
    as64 = lambda t: t.double() if t is not None else None
    reference = layer_norm_reference(as64(x), as64(weight), as64(bias), eps)
    assert_matches_reference(out, reference, F.layer_norm(x, (n,), weight, bias, eps))


@given(lead=leading_shapes, n=hidden_sizes, dtype=dtypes(), layout=layouts(), spec=value_specs())
def test_add_layer_norm_matches_reference(lead, n, dtype, layout, spec):
    x = make_tensor((*lead, n), dtype, spec, layout)
    residual = make_tensor((*lead, n), dtype, ValueSpec(spec.seed + 3, 1.0, 0.0))
    weight = make_tensor((n,), dtype, ValueSpec(spec.seed + 1, 1.0, 1.0))
    bias = make_tensor((n,), dtype, ValueSpec(spec.seed + 2, 1.0, 0.0))
    out, summed = layer_norm(x, weight, bias, 1e-12, residual=residual)
    torch_sum = x + residual
    assert torch.equal(summed, torch_sum), "the returned sum must be x + residual rounded as torch rounds it"
    reference, _ = layer_norm_reference(x.double(), weight.double(), bias.double(), 1e-12, residual.double())
    assert_matches_reference(out, reference, F.layer_norm(torch_sum, (n,), weight, bias, 1e-12))


def test_zero_rows_return_empty():
    x = make_tensor((0, 33), torch.float32, ValueSpec(11, 1.0, 0.0))
    assert layer_norm(x).shape == (0, 33)


def test_nan_and_inf_propagate_like_torch():
    x = make_tensor((4, 50), torch.float32, ValueSpec(11, 1.0, 0.0))
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    out = layer_norm(x)
    assert_matches_reference(out, layer_norm_reference(x.double(), None, None), F.layer_norm(x, (50,)))
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all() and torch.isfinite(out[[0, 3]]).all()


def test_rows_spanning_more_than_2_31_elements_of_memory(monkeypatch):
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)  # 4 GiB, untouched
    try:
        storage = torch.empty(2**31 + 8, dtype=torch.float16, device=TEST_DEVICE)
    except (RuntimeError, MemoryError) as error:  # a machine that will not even reserve 4 GiB
        pytest.skip(f"cannot reserve 4 GiB: {error}")
    # Column offsets up to 2 * (2**30 + 1) > 2**31: 32-bit offsets wrap (a crash or garbage).
    x, residual = (storage.as_strided((2, 3), (1, 2**30 + 1), offset) for offset in (0, 2))
    x.copy_(torch.tensor([[1.0, 2.0, 4.0], [-1.0, 0.5, 3.0]]))
    residual.copy_(torch.tensor([[0.5, -2.0, 1.0], [2.0, 0.25, -1.0]]))
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float16, device=TEST_DEVICE)
    w64 = weight.double()
    reference = layer_norm_reference(x.double(), w64, None)
    assert_matches_reference(layer_norm(x, weight), reference, F.layer_norm(x, (3,), weight))
    out, summed = layer_norm(x, weight, residual=residual)
    assert torch.equal(summed, x + residual)
    reference = layer_norm_reference(summed.double(), w64, None)
    assert_matches_reference(out, reference, F.layer_norm(summed, (3,), weight))
    reference = rms_norm_reference(x.double(), w64)
    assert_matches_reference(rms_norm(x, weight), reference, rms_norm_reference(x, weight))


@needs_two_gpus
def test_tensors_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device: the norms must make x's GPU current."""
    x, r = (make_tensor((37, 768), torch.float16, ValueSpec(i, 1.0, 0.0)).to("cuda:1") for i in (1, 2))
    w, b = (make_tensor((768,), torch.float16, ValueSpec(i, 1.0, 0.5)).to("cuda:1") for i in (3, 4))
    with torch.cuda.device(0):
        y, summed = layer_norm(x, w, b, eps=1e-5, residual=r)
        t5 = rms_norm(x, w, eps=1e-6)
    torch.cuda.synchronize(1)
    expected, expected_sum = layer_norm_reference(x.double(), w.double(), b.double(), 1e-5, r.double())
    assert_matches_reference(y, expected, F.layer_norm(x + r, (768,), w, b, 1e-5))
    assert_matches_reference(summed, expected_sum, x + r)
    assert_matches_reference(
        t5, rms_norm_reference(x.double(), w.double(), 1e-6), rms_norm_reference(x, w, 1e-6)
    )
