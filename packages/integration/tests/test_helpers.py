"""The rules' helpers: autocast casting follows PyTorch's; importing the package leaves triton alone."""

import subprocess
import sys

import torch

from kernl.integration.rules._fx import cast_all


def test_importing_the_package_and_its_command_does_not_import_triton():
    """The rules import the kernel packages, and with them triton, which reads TRITON_INTERPRET once at
    import: the ``kernl`` command must be able to set it after importing kernl.integration."""
    code = "import sys, kernl.integration.cli; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


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
