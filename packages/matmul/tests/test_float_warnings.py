"""Large values through the GEMM: the epilogue activations saturate without an overflowing intermediate
(checked on the activations alone, where no launch-wide numpy setting applies), and a product past the
fp16 range comes out as inf, as torch's, with no numpy warning under Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernl.matmul import matmul, matmul_reference
from kernl.matmul.activations import apply_activation
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor

TORCH_ACTIVATIONS = {
    "tanh": torch.tanh,
    "silu": F.silu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@triton.jit
def _activation_kernel(X, Y, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, apply_activation(x, ACTIVATION), mask=offs < n)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
def test_activations_of_large_values_are_right_without_overflow(activation):
    x = torch.tensor(
        [-3e3, -200.0, -90.0, -45.0, -10.0, -0.3, 0.0, 0.3, 10.0, 45.0, 90.0, 200.0, 3e3], device=TEST_DEVICE
    )  # exp(2 * 45) is past fp32's range
    y = torch.empty_like(x)
    _activation_kernel[(1,)](x, y, x.numel(), ACTIVATION=activation, BLOCK=16)
    reference = TORCH_ACTIVATIONS[activation](x.double())
    assert_matches_reference(y, reference, TORCH_ACTIVATIONS[activation](x))


@pytest.mark.filterwarnings("error")
def test_fp16_products_past_the_range_are_inf_as_in_torch():
    a = make_tensor((16, 32), torch.float16, ValueSpec(1, 1.0, 60.0))  # each product ~60 * 60 * 32 > 65504
    b = make_tensor((32, 24), torch.float16, ValueSpec(2, 1.0, 60.0))
    b[:, :12] *= -1  # both signs of infinity
    out = matmul(a, b)
    reference = matmul_reference(a.double(), b.double())
    assert torch.isinf(out).all() and torch.equal(out.sign(), reference.sign().half())
    assert torch.equal(out, a @ b if TEST_DEVICE == "cuda" else matmul_reference(a, b))
