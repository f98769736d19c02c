"""The ``kernl`` command: ``bench`` (the main job) and ``demo`` work and check their own numbers."""

import json
import os
import signal
import sys
import threading
import time
import types

import pytest
import torch
from triton.runtime.jit import JITFunction

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
    "option, value, message",
    [("--engines", "kernl,HF sdpaa", "unknown engine"), ("--shapes", "1x", "expected batch x sequence"),
     ("--shapes", "ax16", "expected batch x sequence"), ("--shapes", "8x0", "must be positive"),
     ("--shapes", "0x0", "must be positive"), ("--shapes", "1x16,1x1024", "at most 512"),
     ("--out", "/proc/kernl-results", "cannot create"), ("--out", __file__, "cannot create"),
     ("--out", f"{__file__}/results", "cannot create")],
)  # fmt: skip
def test_bad_bench_options_are_refused_naming_the_option(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and option in err and message in err and "usage: kernl bench" in err


@pytest.mark.parametrize("argv", [["bench", "--bogus", "1"], ["bench", "stray"], ["demo", "--quick"]])
def test_an_unknown_option_prints_the_commands_own_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"usage: kernl {argv[0]}" in err and "unrecognized arguments" in err


def test_bench_help_lists_the_engines(capsys):
    from kernl.integration.bench.engines import ENGINES

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert exit_info.value.code == 0 and all(f"  {name}" in lines for name in ENGINES)


def test_the_cpu_path_turns_the_interpreter_on_whatever_it_was(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels could not run on the CPU at all
    assert select_device() == "cpu" and os.environ["TRITON_INTERPRET"] == "1"


def test_a_gpu_older_than_ampere_is_not_selected(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_device() == "cpu" and os.environ["TRITON_INTERPRET"] == "1"


def test_demo_on_a_gpu_older_than_ampere_says_why_it_runs_on_the_cpu(monkeypatch, capsys):
    """On an H100 this process imported triton without the interpreter: the demo runs in a fresh Python."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # restored after
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert main(["demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "compute capability 7.5" in lines[0] and "8.0 (Ampere)" in lines[0] and "interpreter" in lines[0]
    assert any("layer_norm(x + residual)" in line and line.endswith("OK") for line in lines)


def test_demo_runs_in_a_fresh_python_when_triton_was_imported_without_the_interpreter(monkeypatch, capsys):
    import triton  # noqa: F401  (imported already by the kernels; the case is a process that has it)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("no CUDA GPU:") and "kernl demo on cpu" in lines[1]
    assert sum(line.endswith("OK") for line in lines) == 3


def _compiled_kernel(x):
    return x


def test_cpu_commands_run_in_a_fresh_python_when_kernels_were_compiled_whatever_the_variable_says(
    monkeypatch,
):
    """An earlier CPU command of the process set TRITON_INTERPRET=1 after kernl's kernels were compiled
    (the GPU suite's case): the variable says interpreter, the kernels are not."""
    from kernl.integration import cli

    compiled = types.ModuleType("kernl.compiled_for_this_test")
    compiled.kernel = JITFunction(_compiled_kernel)
    monkeypatch.setitem(sys.modules, compiled.__name__, compiled)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(cli, "run_in_fresh_python", lambda module: ran.append(module) or 0)
    assert main(["demo"]) == 0 and ran == ["kernl.integration.demo"]


def test_bench_on_an_old_gpu_checks_on_the_cpu_in_a_fresh_python(monkeypatch, capsys):
    from kernl.integration import cli

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    ran = []
    monkeypatch.setattr(cli, "run_in_fresh_python", lambda module: ran.append(module) or 0)
    assert main(["bench", "--quick"]) == 0 and ran == ["kernl.integration.bench.cpu_check"]
    out = capsys.readouterr().out
    assert "compute capability 7.0" in out and "ignored here" in out


def test_out_on_the_cpu_creates_no_folder(monkeypatch, tmp_path, capsys):
    from kernl.integration import cli
    from kernl.integration.bench import cpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cpu_check, "run_cpu_check", lambda say: True)
    # where compiled kernels were imported earlier (a GPU machine), the check runs in a fresh python
    monkeypatch.setattr(cli, "run_in_fresh_python", lambda module: 0)
    out = tmp_path / "results" / "h100"
    assert main(["bench", "--out", str(out)]) == 0
    assert not (tmp_path / "results").exists() and "ignored here" in capsys.readouterr().out


def test_out_is_checked_but_not_made_when_parsed(tmp_path):
    from kernl.integration.bench.run import results_folder

    assert results_folder(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()


def test_bench_options_listing_an_engine_or_shape_twice_run_it_once_and_say_so():
    from kernl.integration.bench.run import engine_list, once, shape_list

    said = []
    assert once("--shapes", shape_list("1x16,8x128,1x16"), said.append) == [(1, 16), (8, 128)]
    assert once("--engines", engine_list("kernl,HF sdpa, kernl"), said.append) == ["kernl", "HF sdpa"]
    assert said == ["--shapes lists 1x16 more than once: each runs once",
                    "--engines lists kernl more than once: each runs once"]  # fmt: skip
    assert once("--engines", ["kernl"], said.append) == ["kernl"] and len(said) == 2


def test_redirected_output_is_not_wrapped_at_80_columns(capsys):
    from rich.table import Table

    from kernl.integration.bench.run import log_console

    console = log_console()  # capsys: not a terminal, as a file or a pipe
    line = "kernl: " + "x" * 200 + " [B,K]"
    table = Table()
    for name in ("batch x seq", "HF eager", "HF sdpa", "HF sdpa + CUDA graphs", "torch.compile reduce-overhead",
                 "torch.compile max-autotune", "kernl"):  # fmt: skip
        table.add_column(name)
    console.print(line)
    console.print(table)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == line and any("torch.compile max-autotune" in row and "kernl" in row for row in out)
