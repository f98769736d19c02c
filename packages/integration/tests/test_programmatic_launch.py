"""Programmatic dependent launch: on for CUDA devices of compute capability 9.0 or newer, off on CPU
tensors (the interpreter has no ``griddepcontrol``), on older GPUs, and with ``KERNL_PDL=0`` (or false/off/no)."""

import pytest
import torch

from kernl.flash_attention import launch as attention_launch
from kernl.layernorm import kernel as norm_launch
from kernl.matmul import launch as matmul_launch

LAUNCHERS = [matmul_launch, norm_launch, attention_launch]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda m: m.__name__)
def test_programmatic_launch_follows_device_capability_and_switch(launcher, monkeypatch):
    capability = {"value": (9, 0)}
    monkeypatch.setattr(launcher, "_capability", lambda index: capability["value"])
    monkeypatch.delenv("KERNL_PDL", raising=False)
    cuda = torch.device("cuda", 0)
    assert launcher.programmatic_launch(cuda)
    assert not launcher.programmatic_launch(torch.device("cpu"))
    for off in ("0", "false", "Off", " no "):
        monkeypatch.setenv("KERNL_PDL", off)
        assert not launcher.programmatic_launch(cuda)
    monkeypatch.setenv("KERNL_PDL", "1")
    assert launcher.programmatic_launch(cuda)
    monkeypatch.delenv("KERNL_PDL")
    capability["value"] = (8, 0)  # Ampere: no griddepcontrol
    assert not launcher.programmatic_launch(cuda)
