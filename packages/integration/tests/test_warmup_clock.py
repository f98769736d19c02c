"""A warm-up's seconds split into GEMM tuning, Triton compilation and the rest, in the report per capture."""

import json
import threading
import time
from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertModel

from kernl.integration import optimize_model, warmup_clock
from kernl.integration.cuda_graphs import Capture
from kernl.integration.forward_graphs import warmup_record
from kernl.integration.report import OptimizationReport, WarmupRecord
from kernl.matmul import config_cache, tuning
from kernl_testing import on_gpu

needs_listener = pytest.mark.skipif(
    warmup_clock._listener_slot() is None, reason="this Triton has no compilation listener"
)


def _compiled(seconds: float) -> None:
    """What Triton tells its compilation listener after compiling a kernel in ``seconds``."""
    times = warmup_clock.knobs.CompileTimes(
        ir_initialization=0, lowering_stages=[("cubin", int(seconds * 1e6))], store_results=0
    )
    warmup_clock.knobs.compilation.listener(
        src=None, metadata={}, metadata_group={}, times=times, cache_hit=False
    )


def _tuning(monkeypatch, seconds: float, compile_inside: float) -> None:
    """Stands for a GEMM tuning of ``seconds`` (wall time), compiling for ``compile_inside`` of them."""
    monkeypatch.setattr(tuning, "_tunings_running", tuning._tunings_running + 1)
    _compiled(compile_inside)
    time.sleep(seconds)
    monkeypatch.setattr(tuning, "_tunings_running", tuning._tunings_running - 1)
    monkeypatch.setattr(tuning, "_tuning_seconds", tuning._tuning_seconds + seconds)


def _check_parts(times) -> None:
    parts = [times.matmul_tuning_s, times.triton_compile_s, times.other_s]
    assert all(part >= 0 for part in parts)
    assert sum(parts) <= times.warmup_s + 1e-9


@needs_listener
def test_parts_do_not_overlap_and_sum_to_the_warmup(monkeypatch):
    with warmup_clock.warmup_clock() as times:
        _tuning(monkeypatch, 0.05, compile_inside=0.04)  # inside tuning: tuning's, not counted again
        _compiled(0.02)  # a kernel compiled by this thread outside tuning, in 20 ms
        time.sleep(0.02)
        other = threading.Thread(target=_compiled, args=(5.0,))  # another thread's: not this warm-up's
        other.start()
        other.join()
        time.sleep(0.03)
    _check_parts(times)
    assert times.matmul_tuning_s == pytest.approx(0.05)
    assert times.triton_compile_s == pytest.approx(0.02)
    assert times.other_s >= 0.03
    assert times.warmup_s == pytest.approx(times.matmul_tuning_s + times.triton_compile_s + times.other_s)


@needs_listener
def test_a_tuning_or_compile_longer_than_the_block_is_cut_to_it(monkeypatch):
    with warmup_clock.warmup_clock() as times:
        monkeypatch.setattr(tuning, "_tuning_seconds", tuning._tuning_seconds + 100.0)
        _compiled(100.0)
    _check_parts(times)
    assert times.matmul_tuning_s == times.warmup_s and times.triton_compile_s == 0 == times.other_s


@needs_listener
def test_a_listener_already_set_still_hears_every_compilation_and_is_restored(monkeypatch):
    heard = []
    mine = lambda **kwargs: heard.append(kwargs["times"].total)  # noqa: E731
    monkeypatch.setattr(warmup_clock.knobs.compilation, "listener", mine)
    with warmup_clock.warmup_clock():
        _compiled(0.001)
    assert heard == [1000]
    assert warmup_clock.knobs.compilation.listener is mine


def test_without_a_listener_compilation_is_unknown_and_the_rest_is_the_rest(monkeypatch):
    monkeypatch.setattr(warmup_clock, "_listener_slot", lambda: None)
    with warmup_clock.warmup_clock() as times:
        time.sleep(0.01)
    assert times.triton_compile_s is None
    assert times.other_s == pytest.approx(times.warmup_s) and times.matmul_tuning_s == 0


def test_the_report_keeps_each_captures_warmup_with_its_inputs():
    ids = torch.zeros(1, 48, dtype=torch.long)
    times = warmup_clock.WarmupTimes(warmup_s=3.0, matmul_tuning_s=2.0, triton_compile_s=0.5, other_s=0.5)
    capture = Capture(graph=None, inputs=[ids, ids.float()], times=times)
    record = warmup_record(capture)
    assert record == WarmupRecord(
        inputs="[1x48 int64, 1x48 float32] on cpu",
        warmup_s=3.0,
        matmul_tuning_s=2.0,
        triton_compile_s=0.5,
        other_s=0.5,
    )
    report = OptimizationReport(model="BertModel", warmups=[record])
    assert json.loads(report.to_json())["warmups"] == [
        {
            "inputs": "[1x48 int64, 1x48 float32] on cpu",
            "warmup_s": 3.0,
            "matmul_tuning_s": 2.0,
            "triton_compile_s": 0.5,
            "other_s": 0.5,
        }
    ]
    assert (
        "warm-up: [1x48 int64, 1x48 float32] on cpu: 3.00 s (GEMM tuning 2.00, Triton compiles 0.50"
        in str(report)
    )
    report.warmups.append(replace(record, warmup_s=1.0, matmul_tuning_s=0.25))
    assert report.warmup_totals() == {
        "warmup_s": 4.0,
        "matmul_tuning_s": 2.25,
        "triton_compile_s": 1.0,
        "other_s": 1.0,
    }
    report.warmups.append(replace(record, triton_compile_s=None))
    assert report.warmup_totals()["triton_compile_s"] is None


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
def test_on_the_gpu_every_capture_reports_its_warmup(kit, tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))  # GEMM tunings happen in this test
    monkeypatch.delenv("KERNL_AUTOTUNE", raising=False)
    for name, empty in (("_memory", {}), ("_loaded", set()), ("_unwritable", set())):
        monkeypatch.setattr(config_cache, name, empty)  # nothing remembered from earlier tests
    monkeypatch.setattr(tuning, "_chosen", {})
    model = kit.build(BertModel, kit.tiny_config(BertConfig)).to("cuda", torch.float16)
    report = optimize_model(model, packed=True)
    with torch.inference_mode():
        for rows, length in ((3, 40), (5, 100)):
            ids = torch.randint(1, 99, (rows, length), device="cuda")
            mask = torch.ones_like(ids)
            mask[0, length // 2 :] = 0  # padding: the call runs packed
            model(input_ids=ids, attention_mask=mask)
    assert len(report.warmups) >= 2, str(report)
    for record in report.warmups:
        _check_parts(record if record.triton_compile_s is not None else _known(record))
    assert any(record.matmul_tuning_s > 0 for record in report.warmups), str(report)
    if warmup_clock._listener_slot() is not None:
        assert all(record.triton_compile_s is not None for record in report.warmups)


def _known(record: WarmupRecord) -> WarmupRecord:
    """``record`` with an unknown compile time counted as zero."""
    return WarmupRecord(**{**record.__dict__, "triton_compile_s": 0.0})
