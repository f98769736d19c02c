"""The rules' helpers: every kernel is found, and autocast casting follows PyTorch's."""

import torch

from kernl.integration.kernels import KERNELS, find
from kernl.integration.rules._fx import cast_all


def test_every_kernel_of_the_installed_stack_is_found():
    """With the whole stack installed, a kernel that is not found (a package failing to import) would let
    every rule leave the graph alone, and the model tests compare Hugging Face with itself."""
    assert {name: find(name) is not None for name in KERNELS} == dict.fromkeys(KERNELS, True)


def test_cast_all_casts_as_autocast_does():
    """Autocast casts floating tensors below float64 and leaves float64, integer tensors and None alone."""
    x64, x32, ids = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x64, x64).dtype == torch.float64  # autocast skips it
        assert torch.nn.functional.linear(x32, x32).dtype == torch.bfloat16
    cast = cast_all(torch.bfloat16, x64, x32, ids, None)
    assert [None if t is None else t.dtype for t in cast] == [
        torch.float64,
        torch.bfloat16,
        torch.int64,
        None,
    ]
    assert cast_all(None, x32)[0] is x32
