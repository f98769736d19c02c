"""The one switch that selects where the tests run: ``KERNL_TEST_DEVICE=cpu`` (default) or ``cuda``.

``cpu`` runs the real Triton kernels through Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors; ``cuda`` compiles them for the GPU. The root ``conftest.py`` calls :func:`configure` before
anything imports triton, because the interpreter flag is read when kernels are decorated.
"""

import os

import pytest
import torch

TEST_DEVICE = os.environ.get("KERNL_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"KERNL_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")


def configure() -> None:
    """Set the environment for the selected device (interpreter mode for ``cpu``)."""
    if TEST_DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise RuntimeError("KERNL_TEST_DEVICE=cuda but torch sees no CUDA device")


def on_gpu() -> bool:
    """True when the tests run compiled kernels on CUDA tensors."""
    return TEST_DEVICE == "cuda"


def float_dtypes() -> list[torch.dtype]:
    """Dtypes a kernel is tested in here: bf16 only on the GPU (the interpreter computes it wrongly)."""
    dtypes = [torch.float32, torch.float16]
    return dtypes + [torch.bfloat16] if on_gpu() else dtypes


def other_device() -> str:
    """The device that is not the test device, for the "argument on another device" error tests."""
    return "cpu" if TEST_DEVICE == "cuda" else "cuda"


needs_two_devices = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device to mix devices"
)
needs_two_gpus = pytest.mark.skipif(
    not on_gpu() or torch.cuda.device_count() < 2, reason="needs two GPUs (tensors off the current one)"
)
