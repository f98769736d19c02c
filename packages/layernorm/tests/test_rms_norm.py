"""RMSNorm kernel vs. Hugging Face T5LayerNorm semantics, including mixed input/weight dtypes."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.t5.modeling_t5 import T5LayerNorm

from kernl.layernorm import rms_norm, rms_norm_reference
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor
from kernl_testing.strategies import dtypes, layouts, value_specs

hidden_sizes = st.one_of(st.integers(1, 300), st.sampled_from([512, 768, 1024, 4096, 16384]))


def _fp64_reference(x, weight, eps, residual=None):
    """T5 semantics in fp64, keeping the weight-dtype rounding step that the module does."""
    summed = (x + residual if residual is not None else x).double()
    hidden = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.to(weight.dtype)
    return weight.double() * hidden.double()


@given(m=st.integers(1, 40), n=hidden_sizes, x_dtype=dtypes(), w_dtype=dtypes(), layout=layouts(),
       spec=value_specs(), with_residual=st.booleans())  # fmt: skip
def test_rms_norm_matches_t5_semantics(m, n, x_dtype, w_dtype, layout, spec, with_residual):
    x = make_tensor((m, n), x_dtype, spec, layout)
    weight = make_tensor((n,), w_dtype, ValueSpec(spec.seed + 1, 0.5, 1.0))
    residual = make_tensor((m, n), x_dtype, ValueSpec(spec.seed + 2, 1.0, 0.0)) if with_residual else None
    result = rms_norm(x, weight, 1e-6, residual=residual)
    out = result[0] if with_residual else result
    torch_result = rms_norm_reference(x, weight, 1e-6, residual)
    torch_out = torch_result[0] if with_residual else torch_result
    assert out.dtype == torch_out.dtype
    if with_residual:
        assert torch.equal(result[1], x + residual)
    assert_matches_reference(out, _fp64_reference(x, weight, 1e-6, residual), torch_out)


def test_matches_transformers_t5_layer_norm_module():
    module = T5LayerNorm(96, eps=1e-6).to(TEST_DEVICE, torch.float16)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.5, 1.5, 96))
    x = make_tensor((3, 5, 96), torch.float16, ValueSpec(7, 2.0, 0.0))
    with torch.no_grad():  # the module's weight requires grad: kernl refuses it under grad mode
        expected = module(x)
        out = rms_norm(x, module.weight, module.variance_epsilon)
    assert out.dtype == expected.dtype
    assert_matches_reference(out, _fp64_reference(x, module.weight, 1e-6), expected)
