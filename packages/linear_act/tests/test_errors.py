"""Bad input gets a clear error naming the argument; CPU tensors without the interpreter use the reference."""

import pytest
import torch
import torch.nn.functional as F

from kernl.linear_act import gated_linear_act, linear_act
from kernl.matmul import launch
from kernl_testing import TEST_DEVICE, needs_two_devices, other_device

x = torch.randn(4, 8, device=TEST_DEVICE)
w = torch.randn(6, 8, device=TEST_DEVICE)
b = torch.randn(6, device=TEST_DEVICE)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: linear_act(x.long(), w), TypeError, "x must be float16"),
        (lambda: linear_act(x, w.double()), TypeError, "weight must be float16"),
        (lambda: linear_act(x, w.half()), ValueError, "weight must have the dtype of x"),
        (lambda: linear_act(x[0], w), ValueError, "x must have at least 2 dimensions"),
        (lambda: linear_act(x, w[:, :7]), ValueError, "x's last dimension"),
        (lambda: linear_act(x, w.clone().requires_grad_()), ValueError, "weight requires grad"),
        (lambda: linear_act(x, w, b.clone().requires_grad_()), ValueError, "bias requires grad"),
        (lambda: linear_act(x, w[None]), ValueError, "weight must be 2-D"),
        (lambda: linear_act(x, w, b[:5]), ValueError, r"bias must have shape \(6,\)"),
        (lambda: linear_act(x, w, b.half()), ValueError, "bias must have the dtype"),
        (lambda: linear_act(x, w, b, "gelu_fast"), ValueError, "activation must be one of"),
        (lambda: linear_act(x, w, b, ["gelu"]), TypeError, "activation must be a str"),
        (lambda: linear_act(x, w, b, "relu", x), ValueError, "residual must have shape"),
        (
            lambda: linear_act(x, w, b, "relu", torch.zeros(4, 6, dtype=torch.half, device=TEST_DEVICE)),
            ValueError,
            "residual must have the dtype",
        ),  # fmt: skip
        (lambda: gated_linear_act(x, w, w[:5]), ValueError, "w1 must have w0's shape"),
        (lambda: gated_linear_act(x, w, [1.0]), TypeError, "w1 must be a torch.Tensor"),
        (lambda: gated_linear_act(x, w, w, "softmax"), ValueError, "activation must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_bias_past_32_bit_indexing_is_refused_naming_it(monkeypatch):
    """The epilogue indexes the bias in 32 bits, as the operands: a strided bias (a column of a huge
    table) spanning 2**31 elements is refused like them (here with the limit lowered to 1024)."""
    monkeypatch.setattr(launch, "MAX_SPAN", 1024)
    column = torch.randn(6, 300, device=TEST_DEVICE)[:, 0]  # 1501 elements from first to last
    with pytest.raises(ValueError, match="bias spans 1501 elements"):
        linear_act(x, w, column)


@needs_two_devices
def test_device_mismatch_names_the_argument():
    other = other_device()
    with pytest.raises(ValueError, match="bias is on"):
        linear_act(x, w, b.to(other))


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_x, cpu_w, cpu_b = torch.randn(2, 5, 40), torch.randn(24, 40), torch.randn(24)
    assert torch.equal(linear_act(cpu_x, cpu_w, cpu_b, "relu"), F.relu(F.linear(cpu_x, cpu_w, cpu_b)))


def test_parameters_that_require_grad_run_under_no_grad():
    layer = torch.nn.Linear(8, 6).to(TEST_DEVICE)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            expected = F.linear(x, layer.weight, layer.bias)
            torch.testing.assert_close(linear_act(x, layer.weight, layer.bias), expected)
