"""Hypothesis strategies and tensor builders shared by the kernel tests.

Values are drawn as a :class:`ValueSpec` (seed, scale, offset) and materialised with a seeded torch
generator, so a failing example is reproducible from hypothesis' printout and never all zeros.
Layouts cover contiguous tensors, rows padded in memory (a sliced view) and transposed views.
"""

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from kernl_testing.device import TEST_DEVICE, float_dtypes

LAYOUTS = ("contiguous", "padded_rows", "transposed")


@dataclass(frozen=True)
class ValueSpec:
    """How to fill a tensor: ``offset + scale * randn`` from generator ``seed``."""

    seed: int
    scale: float
    offset: float


def value_specs() -> st.SearchStrategy[ValueSpec]:
    """Random values, including large offsets such as ``-20 + 0.5 * randn``."""
    return st.builds(
        ValueSpec,
        seed=st.integers(0, 2**31 - 1),
        scale=st.sampled_from([1.0, 0.5, 3.0, 0.05]),
        offset=st.sampled_from([0.0, 0.0, -20.0, 4.0]),
    )


def layouts() -> st.SearchStrategy[str]:
    """Memory layout of the last two dimensions (see :data:`LAYOUTS`)."""
    return st.sampled_from(LAYOUTS)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """The float dtypes the current device can test."""
    return st.sampled_from(float_dtypes())


def make_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    spec: ValueSpec,
    layout: str = "contiguous",
    device: str = TEST_DEVICE,
) -> torch.Tensor:
    """A tensor of ``shape`` filled from ``spec`` and laid out as ``layout`` (see :data:`LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    generator = torch.Generator().manual_seed(spec.seed)
    storage_shape = list(shape)
    if layout == "padded_rows":
        storage_shape[-1] += 3
    elif layout == "transposed" and len(shape) >= 2:
        storage_shape[-1], storage_shape[-2] = storage_shape[-2], storage_shape[-1]
    values = spec.offset + spec.scale * torch.randn(storage_shape, generator=generator, dtype=torch.float32)
    tensor = values.to(dtype=dtype, device=device)
    if layout == "padded_rows":
        return tensor[..., : shape[-1]]
    if layout == "transposed" and len(shape) >= 2:
        return tensor.transpose(-1, -2)
    return tensor
