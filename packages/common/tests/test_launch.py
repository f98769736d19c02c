"""The launch helpers every kernel package takes from kernl.common: Triton kernel or reference,
programmatic dependent launch (on for CUDA devices of compute capability 9.0 or newer, off on CPU
tensors, where the interpreter has no ``griddepcontrol``, on older GPUs, and with ``KERNL_PDL=0``),
the environment switches, and numpy's quiet mode inside interpreted launches."""

import warnings

import numpy as np
import pytest
import torch

from kernl.common import launch


def test_programmatic_launch_follows_device_capability_and_switch(monkeypatch):
    capability = {"value": (9, 0)}
    monkeypatch.setattr(launch, "capability", lambda index: capability["value"])
    monkeypatch.delenv("KERNL_PDL", raising=False)
    cuda = torch.device("cuda", 0)
    assert launch.programmatic_launch(cuda)
    assert not launch.programmatic_launch(torch.device("cpu"))
    for off in ("0", "false", "Off", " no "):
        monkeypatch.setenv("KERNL_PDL", off)
        assert not launch.programmatic_launch(cuda)
    monkeypatch.setenv("KERNL_PDL", "1")
    assert launch.programmatic_launch(cuda)
    monkeypatch.delenv("KERNL_PDL")
    capability["value"] = (8, 0)  # Ampere: no griddepcontrol
    assert not launch.programmatic_launch(cuda)


def test_programmatic_launch_on_an_unindexed_cuda_device_asks_the_current_device(monkeypatch):
    asked = []
    monkeypatch.setattr(launch, "capability", lambda index: asked.append(index) or (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.delenv("KERNL_PDL", raising=False)
    assert launch.programmatic_launch(torch.device("cuda")) and asked == [3]


@pytest.mark.parametrize("value, off", [("0", True), ("FALSE", True), (" off ", True), ("no", True),
                                        ("1", False), ("", False), ("yes", False)])  # fmt: skip
def test_switched_off_reads_the_usual_spellings(value, off, monkeypatch):
    monkeypatch.setenv("KERNL_SOME_FEATURE", value)
    assert launch.switched_off("KERNL_SOME_FEATURE") is off


def test_unset_switch_is_on(monkeypatch):
    monkeypatch.delenv("KERNL_SOME_FEATURE", raising=False)
    assert not launch.switched_off("KERNL_SOME_FEATURE")


def test_cpu_tensors_run_the_kernel_only_under_the_interpreter(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.runs_triton_kernel(cpu)
    for value in ("0", ""):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert not launch.runs_triton_kernel(cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not launch.runs_triton_kernel(cpu)


def test_float_errors_are_quiet_inside_an_interpreted_launch_only():
    huge = np.array([1e30], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with launch.float_errors_ignored(torch.device("cpu")):
            assert np.isinf(huge.astype(np.float16))[0]
            assert np.isnan(np.array([np.inf]) - np.array([np.inf]))[0]
        with pytest.raises(RuntimeWarning, match="overflow"):
            huge.astype(np.float16)
        with (
            launch.float_errors_ignored(torch.device("cuda")),
            pytest.raises(RuntimeWarning, match="overflow"),
        ):
            huge.astype(np.float16)  # CUDA launches run no numpy: nothing to silence, nothing silenced
