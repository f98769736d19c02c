"""linear_act / gated_linear_act when the tuner picks PyTorch's candidate (``Config(kernel="torch")``,
cuBLAS on the GPU): the same checks as the Triton kernels, and inside torch.compile."""

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
from kernl.matmul import launch, tuning
from kernl.matmul.config_cache import TORCH
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor, reduction_scale
from kernl_testing.strategies import layouts, value_specs

sizes = st.one_of(st.integers(1, 80), st.sampled_from([96, 128, 131, 192]))
half_dtypes = st.sampled_from([torch.float16, torch.bfloat16])  # PyTorch's ops: bf16 is right on the CPU


class _NoTriton:
    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel was launched")


@pytest.fixture
def torch_chosen(monkeypatch):
    """The tuner's answer is PyTorch's candidate (on the GPU it wins where it is faster); no Triton launch."""
    monkeypatch.setattr(tuning, "choose", lambda problem, device, run: TORCH)
    monkeypatch.setattr(launch, "gemm_kernel", _NoTriton())
    monkeypatch.setattr(launch, "gemm_tma_kernel", _NoTriton())


def _as64(t):
    return t.double() if t is not None else None


@given(rows=st.integers(1, 70), n=sizes, k=sizes, dtype=half_dtypes, x_layout=layouts(), w_layout=layouts(),
       spec=value_specs(), activation=st.sampled_from(ACTIVATIONS), with_bias=st.booleans(),
       with_residual=st.booleans())  # fmt: skip
def test_linear_act(
    torch_chosen, rows, n, k, dtype, x_layout, w_layout, spec, activation, with_bias, with_residual
):
    x = make_tensor((rows, k), dtype, spec, x_layout)
    weight = make_tensor((n, k), dtype, ValueSpec(spec.seed + 1, k**-0.5, 0.0), w_layout)
    bias = make_tensor((n,), dtype, ValueSpec(spec.seed + 2, 1.0, 0.0)) if with_bias else None
    residual = make_tensor((rows, n), dtype, ValueSpec(spec.seed + 3, 1.0, 0.0)) if with_residual else None
    out = linear_act(x, weight, bias, activation, residual)
    assert out.dtype == dtype and out.shape == (rows, n) and out.is_contiguous()
    reference = linear_act_reference(_as64(x), _as64(weight), _as64(bias), activation, _as64(residual))
    unfused = TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
    unfused = unfused + residual if with_residual else unfused
    assert_matches_reference(out, reference, unfused, atol_scale=reduction_scale(x, k))


@given(rows=st.integers(1, 70), n=sizes, k=sizes, dtype=half_dtypes, spec=value_specs(),
       activation=st.sampled_from(["gelu_tanh", "gelu", "relu", "silu"]), with_residual=st.booleans())  # fmt: skip
def test_gated_linear_act(torch_chosen, rows, n, k, dtype, spec, activation, with_residual):
    x = make_tensor((rows, k), dtype, spec)
    w0 = make_tensor((n, k), dtype, ValueSpec(spec.seed + 1, k**-0.5, 0.0))
    w1 = make_tensor((n, k), dtype, ValueSpec(spec.seed + 2, k**-0.5, 0.0))
    residual = make_tensor((rows, n), dtype, ValueSpec(spec.seed + 3, 1.0, 0.0)) if with_residual else None
    out = gated_linear_act(x, w0, w1, activation, residual)
    reference = gated_linear_act_reference(x.double(), w0.double(), w1.double(), activation, _as64(residual))
    unfused = TORCH_ACTIVATIONS[activation](F.linear(x, w0)) * F.linear(x, w1)
    unfused = unfused + residual if with_residual else unfused
    assert_matches_reference(out, reference, unfused, atol_scale=reduction_scale(x, k))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_tails_and_nan(torch_chosen, activation):
    """Large |h|, exact zeros and NaN through every activation, with a bias (cuBLASLt's fused GELU)."""
    values = torch.tensor([-200.0, -30.0, -9.0, -1e-4, 0.0, 1e-4, 3.0, 9.0, 30.0, 200.0, float("nan")])
    x = torch.eye(4, dtype=torch.float16, device=TEST_DEVICE)
    weight = (values[:, None] * torch.ones(1, 4)).to(x)
    bias = torch.zeros(values.numel(), dtype=x.dtype, device=x.device)
    out = linear_act(x, weight, bias, activation)
    reference = linear_act_reference(x.double(), weight.double(), bias.double(), activation)
    assert_matches_reference(out, reference, TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias)))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_inside_torch_compile(torch_chosen, backend):
    """As the integration's FX graphs call it: the op's eager implementation runs PyTorch's candidate."""
    x = make_tensor((2, 6, 40), torch.float16, ValueSpec(3, 1.0, 0.5))
    w = make_tensor((24, 40), torch.float16, ValueSpec(4, 0.2, 0.0))
    w1 = make_tensor((24, 40), torch.float16, ValueSpec(5, 0.2, 0.0))
    b = make_tensor((24,), torch.float16, ValueSpec(6, 1.0, 0.0))

    def ffn(h, lin, gated):
        return lin(h, w, b, "gelu", None) + gated(h, w, w1, "gelu_tanh", None)

    torch._dynamo.reset()
    compiled = torch.compile(lambda h: ffn(h, linear_act, gated_linear_act), backend=backend, fullgraph=True)
    expected = ffn(x.double(), linear_act_reference, gated_linear_act_reference)
    torch_same = F.gelu(F.linear(x, w, b)) + F.gelu(F.linear(x, w), approximate="tanh") * F.linear(x, w1)
    assert_matches_reference(compiled(x), expected, torch_same)
