"""Bad input gets a clear error naming the argument; CPU tensors without the interpreter use the reference."""

import pytest
import torch

from kernl.matmul import Config, gemm, matmul
from kernl_testing import TEST_DEVICE, needs_two_devices, other_device

a = torch.randn(4, 8, device=TEST_DEVICE)
b = torch.randn(8, 5, device=TEST_DEVICE)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: matmul(a.long(), b), TypeError, "a must be float16"),
        (lambda: matmul(a, b.double()), TypeError, "b must be float16"),
        (lambda: matmul([1.0], b), TypeError, "a must be a torch.Tensor"),
        (lambda: matmul(a, b.half()), ValueError, "b must have the dtype of a"),
        (lambda: matmul(a[0], b), ValueError, "a must be 2-D or 3-D"),
        (lambda: matmul(a, b[None, None]), ValueError, "b must be 2-D or 3-D"),
        (lambda: matmul(a, b[:7]), ValueError, "a's last dimension"),
        (lambda: matmul(a, b.clone().requires_grad_()), ValueError, "b requires grad"),
        (lambda: matmul(a.expand(2, 4, 8), b.expand(3, 8, 5)), ValueError, "cannot be broadcast"),
        (lambda: matmul(a, b, allow_tf32=1), TypeError, "allow_tf32"),
        (lambda: gemm(a[None], b[None], activation="gelu_erf"), ValueError, "activation must be one of"),
        (
            lambda: gemm(a[None], b[None], config=Config(block_m=16, block_n=48, block_k=16)),
            ValueError,
            "config must be a launchable",
        ),
        (
            lambda: gemm(
                a[None], b[None], config=Config(block_m=64, block_n=64, block_k=64, epilogue_parts=2)
            ),
            ValueError,
            "config",
        ),
        (lambda: gemm(a[None], b[None], config=(64, 64, 64)), ValueError, "config must be a launchable"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_two_devices
def test_device_mismatch_names_the_argument():
    other = other_device()
    with pytest.raises(ValueError, match="b is on"):
        matmul(a, b.to(other))


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_a, cpu_b = torch.randn(3, 5, 40), torch.randn(40, 6)
    assert torch.equal(matmul(cpu_a, cpu_b), torch.matmul(cpu_a, cpu_b))
