"""The ``kernl`` command: ``bench`` (the main job) and ``demo`` work and check their own numbers."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from kernl.integration.bench.run import termination_as_interrupt
from kernl.integration.cli import main
from kernl.integration.runtime import select_device
from kernl_testing import on_gpu


def test_demo_passes(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm(x + residual)" in out and "MISMATCH" not in out


def test_rules_lists_every_rule_with_what_it_matches(capsys):
    from kernl.integration.rules import RULES

    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert all(f"{rule.name}\n  matches: {rule.matches}" in out for rule in RULES)
    assert out.count("puts there:") == len(RULES)


def test_bench(capsys, tmp_path):
    if not on_gpu():  # no options on CPU: the embedded small-Bert check through the interpreter
        assert main(["bench"]) == 0
        out = capsys.readouterr().out
        assert "MISMATCH" not in out and "rules fired:" in out and "speed figures need a CUDA GPU" in out
        return
    assert (
        main(
            ["bench", "--shapes", "1x16,2x40", "--engines", "HF eager,HF sdpa,kernl", "--out", str(tmp_path)]
        )
        == 0
    )
    results = json.loads((tmp_path / "integration.json").read_text())
    kernl = results["engines"]["kernl"]
    assert set(kernl["shapes"]) == {"1x16", "2x40"} and (tmp_path / "integration.png").exists()
    assert all(entry["max_abs_diff_vs_hf_sdpa"] < 0.05 for entry in kernl["shapes"].values())


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_a_bench_cut_short_by_sigterm_is_interrupted_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), termination_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode boundary, well before this ends
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "option, value",
    [("--engines", "kernl,HF sdpaa"), ("--shapes", "1x"), ("--shapes", "8x0"), ("--shapes", "ax16"),
     ("--shapes", "1x16,1x1024"), ("--out", "/proc/kernl-results"), ("--out", __file__)],
)  # fmt: skip
def test_bad_bench_options_are_refused_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", option, value])
    assert exit_info.value.code == 2 and option in capsys.readouterr().err


def test_the_cpu_path_turns_the_interpreter_on_whatever_it_was(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels could not run on the CPU at all
    assert select_device() == "cpu" and os.environ["TRITON_INTERPRET"] == "1"


def test_a_gpu_older_than_ampere_is_not_selected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_device() == "cpu" and os.environ["TRITON_INTERPRET"] == "1"


def test_demo_on_a_gpu_older_than_ampere_says_why_it_runs_on_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert main(["demo"]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "no CUDA GPU found" not in first_line and "compute capability" in first_line


def test_bench_options_listing_an_engine_or_shape_twice_run_it_once():
    from kernl.integration.bench.run import engine_list, shape_list

    assert shape_list("1x16,8x128,1x16") == [(1, 16), (8, 128)]
    assert engine_list("kernl,HF sdpa, kernl") == ["kernl", "HF sdpa"]
