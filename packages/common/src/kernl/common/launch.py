"""Where and how a kernl kernel launches: Triton kernel or PyTorch reference, device properties,
programmatic dependent launch, environment switches, numpy's warnings under Triton's interpreter."""

import contextlib
import functools
import os

import torch


def switched_off(variable: str) -> bool:
    """Whether environment variable ``variable`` turns a feature off: ``0``, ``false``, ``off`` or ``no``
    (any case, surrounding spaces ignored)."""
    return os.environ.get(variable, "").strip().lower() in ("0", "false", "off", "no")


def runs_triton_kernel(x: torch.Tensor) -> bool:
    """True when ``x`` is processed by the Triton kernel (a CUDA tensor, or any tensor under Triton's
    interpreter, ``TRITON_INTERPRET=1``), False when by the PyTorch reference."""
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    """``(major, minor)`` compute capability of CUDA device ``device_index``."""
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programmatic_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` use programmatic dependent launch: CUDA devices of compute capability
    9.0 or newer (Hopper), unless ``KERNL_PDL`` turns it off (:func:`switched_off`). Each kernel waits for
    the previous one's writes first thing, then lets the next one be scheduled, so a stream of small
    kernels overlaps its launch latencies. Off on CPU tensors: the interpreter has no ``griddepcontrol``."""
    return device.type == "cuda" and not switched_off("KERNL_PDL") and capability(_index(device))[0] >= 9


_NOTHING_TO_SILENCE = contextlib.nullcontext()


def float_errors_ignored(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which numpy does not warn about overflow and invalid operations, for a launch on a
    CPU tensor (Triton's interpreter computes with numpy). For kernels whose inf or NaN results are the
    intended ones, as a GPU gives them silently: a product past the fp16 range stored as inf, the NaN
    of a row holding an inf. For CUDA tensors, a shared no-op context (launches stay cheap)."""
    if device.type == "cuda":
        return _NOTHING_TO_SILENCE
    import numpy  # only the interpreter's launches get here, and the interpreter needs numpy

    return numpy.errstate(over="ignore", invalid="ignore")
