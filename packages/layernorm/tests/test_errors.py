"""Bad input gets a clear error naming the argument; CPU tensors without the interpreter use the reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernl.layernorm import MAX_N, layer_norm, rms_norm
from kernl_testing import TEST_DEVICE, ValueSpec, make_tensor, needs_two_devices, other_device

x = torch.randn(4, 8, device=TEST_DEVICE)
w = torch.ones(8, device=TEST_DEVICE)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: layer_norm(x.long()), TypeError, "x must be float16"),
        (lambda: layer_norm(x.double()), TypeError, "x must be float16"),
        (lambda: layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: layer_norm(x, w[:7]), ValueError, r"weight must have shape \(8,\)"),
        (lambda: layer_norm(x, w, w.int()), TypeError, "bias must be float16"),
        (lambda: layer_norm(x, residual=x[:3]), ValueError, "residual must match x"),
        (lambda: layer_norm(x, residual=x.half()), ValueError, "residual must match x"),
        (lambda: layer_norm(torch.empty(4, 0, device=TEST_DEVICE)), ValueError, "last dimension"),
        (lambda: layer_norm(torch.tensor(1.0, device=TEST_DEVICE)), ValueError, "at least one dimension"),
        (lambda: layer_norm(torch.empty(1, MAX_N + 1, device=TEST_DEVICE)), ValueError, "last dimension"),
        (lambda: layer_norm(x, eps=-1.0), ValueError, "eps"),
        (lambda: layer_norm(x, eps=float("nan")), ValueError, "eps"),
        (lambda: layer_norm(x, eps=True), TypeError, "eps must be a real number"),
        (lambda: layer_norm(x, eps="1e-5"), TypeError, "eps must be a real number, got str"),
        (lambda: rms_norm(x, w, eps="1e-6"), TypeError, "eps must be a real number, got str"),
        (lambda: rms_norm(x, None), ValueError, "weight is required"),
        (lambda: rms_norm(x, w.reshape(1, 8)), ValueError, "weight must have shape"),
        (lambda: layer_norm(x, w.clone().requires_grad_()), ValueError, "weight requires grad"),
        (lambda: rms_norm(x.clone().requires_grad_(), w), ValueError, "x requires grad"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_two_devices
def test_device_mismatch_names_the_argument():
    other = other_device()
    with pytest.raises(ValueError, match="weight is on"):
        layer_norm(x, w.to(other))


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_x = torch.randn(5, 40)
    cpu_w, cpu_b = torch.randn(40), torch.randn(40)
    expected = F.layer_norm(cpu_x, (40,), cpu_w, cpu_b, 1e-5)
    assert torch.equal(layer_norm(cpu_x, cpu_w, cpu_b, 1e-5), expected)


def test_eps_as_a_numpy_scalar_is_accepted():
    x = make_tensor((3, 17), torch.float32, ValueSpec(1, 1.0, 0.0))
    assert torch.equal(layer_norm(x, eps=np.float32(1e-5)), layer_norm(x, eps=float(np.float32(1e-5))))
