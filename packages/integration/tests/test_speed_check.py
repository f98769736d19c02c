"""Never slower (issue 20, item 4): a new signature's first call is timed against the original forward and
the faster is kept; the report and a warning say so.

On the CPU nothing is timed by ``optimize_model`` (interpreted kernels are for checking): the decision
is tested with real timings of two real callables, and the wiring by letting the check time CPU calls
(``TIMED_DEVICE_TYPES``), where kernl's interpreted path is really slower than PyTorch. On a GPU, kernl's
CUDA-graph replay is made really slower (a GPU sleep queued with it) and must fall back.
"""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from kernl.integration import optimize_model, speed_check
from kernl.integration.report import OptimizationReport
from kernl_testing.device import needs_two_gpus

SIZE = 96


@pytest.fixture(autouse=True)
def speed_check_on(monkeypatch):
    """conftest.py turns the check off for the other tests."""
    monkeypatch.delenv("KERNL_CHECK_SPEED", raising=False)


def _light():
    a = torch.ones(SIZE, SIZE)
    return a @ a


def _heavy():  # the same product, 40 times over: real work, not a sleep or a made-up figure
    a = torch.ones(SIZE, SIZE)
    for _ in range(40):
        b = a @ a
    return b


def test_the_faster_of_two_real_callables_is_kept_either_way_round():
    cpu = torch.device("cpu")
    light_ms, heavy_ms = speed_check.time_both(_light, _heavy, cpu)
    assert 0 < light_ms < heavy_ms
    assert speed_check.decide("s", light_ms, heavy_ms).kept == "kernl"
    kernl_ms, pytorch_ms = speed_check.time_both(_heavy, _light, cpu)
    record = speed_check.decide("bucket 2048 tokens", kernl_ms, pytorch_ms)
    assert record.kept == "PyTorch"
    assert record.describe().startswith("kept PyTorch for bucket 2048 tokens: kernl was 0.")


def test_a_tie_keeps_kernl_and_replays_must_be_positive():
    assert speed_check.decide("s", 1.0, 1.0).kept == "kernl"
    with pytest.raises(ValueError, match="replays"):
        speed_check.time_both(_light, _light, torch.device("cpu"), replays=0)


def test_a_signature_judged_slower_runs_pytorch_from_then_on(monkeypatch):
    monkeypatch.setattr(speed_check, "TIMED_DEVICE_TYPES", frozenset({"cpu"}))
    report = OptimizationReport()
    check = speed_check.SpeedCheck(report, torch.device("cpu"))
    calls = []

    def kernl():
        calls.append("kernl")
        return _heavy()

    def pytorch():
        calls.append("pytorch")
        return _light()

    with pytest.warns(UserWarning, match="kept PyTorch for token bucket 64: kernl was"):
        check.run("k", "token bucket 64", kernl, pytorch)
    judged = len(calls)
    assert calls[0] == "kernl" and calls.count("kernl") == 1 + speed_check.REPLAYS
    check.run("k", "token bucket 64", kernl, pytorch)
    assert calls[judged:] == ["pytorch"] and [r.kept for r in report.speed] == ["PyTorch"]
    assert "speed check: kept PyTorch for token bucket 64" in str(report)
    check.run(None, "unkeyed", kernl, pytorch)  # a call no key stands for is never judged
    assert calls[-1] == "kernl" and len(report.speed) == 1


def test_a_timing_that_fails_keeps_kernl_and_says_why(monkeypatch):
    monkeypatch.setattr(speed_check, "TIMED_DEVICE_TYPES", frozenset({"cpu"}))
    report = OptimizationReport()
    check = speed_check.SpeedCheck(report, torch.device("cpu"))
    calls = []

    def pytorch():
        calls.append("pytorch")
        raise MemoryError("no room for the original forward's activations")

    with pytest.warns(UserWarning, match="untimed: the timing failed .MemoryError: no room"):
        output = check.run("k", "token bucket 64", lambda: calls.append("kernl") or "kernl's output", pytorch)
    assert output == "kernl's output" and not check.keeps_pytorch("k")
    assert check.run("k", "token bucket 64", lambda: "kernl again", pytorch) == "kernl again"
    assert calls.count("pytorch") == 1, "a failed signature is not timed again"
    assert "kept kernl for token bucket 64, untimed: the timing failed" in str(report)


def test_nothing_is_timed_on_the_cpu():
    check = speed_check.SpeedCheck(OptimizationReport(), torch.device("cpu"))
    ran = []
    check.run("k", "s", lambda: ran.append("kernl"), lambda: ran.append("pytorch"))
    assert ran == ["kernl"] and not check.judged("k")


def _tiny_bert(kit):
    return kit.build(BertModel, kit.tiny_config(BertConfig))


@pytest.mark.parametrize("packed", [True, False])
def test_an_interpreted_path_slower_than_pytorch_falls_back_and_the_report_says_so(kit, monkeypatch, packed):
    """Let the check time CPU calls: kernl's kernels through Triton's interpreter are far slower than
    PyTorch's, so the signature must go to PyTorch, and later calls give PyTorch's own outputs."""
    if kit.device != "cpu":
        pytest.skip("the interpreter runs on the CPU")
    monkeypatch.setattr(speed_check, "TIMED_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(speed_check, "REPLAYS", 1)
    model = _tiny_bert(kit)
    reference = copy.deepcopy(model)
    report = optimize_model(model, packed=packed)
    ids, mask = kit.padded_batch(3, 21, [21, 9, 4], vocab=120)
    with torch.inference_mode(), pytest.warns(UserWarning, match="kept PyTorch for"):
        model(input_ids=ids, attention_mask=mask)
    assert [r.kept for r in report.speed] == ["PyTorch"]
    record = report.speed[0]
    assert record.kernl_ms > record.pytorch_ms > 0
    assert record.signature == ("token bucket 48" if packed else "batch 3 x length bucket 32")
    graphs = len(report.graphs)
    with torch.inference_mode():
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
        if packed:  # the original forward on the caller's call: HF's outputs, bit for bit
            expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        else:  # the original forward on the call padded to its bucket, cut back
            pad = torch.zeros(3, 11, dtype=ids.dtype)
            padded = reference(input_ids=torch.cat([ids, pad], 1), attention_mask=torch.cat([mask, pad], 1))
            expected = padded.last_hidden_state[:, :21]
    assert torch.equal(again, expected)
    assert len(report.graphs) == graphs and len(report.speed) == 1  # judged once, nothing compiled again
    assert "speed check: kept PyTorch for" in str(report)


def test_check_speed_off_or_on_the_cpu_is_said_and_a_non_bool_is_refused(kit, monkeypatch):
    report = optimize_model(_tiny_bert(kit).to(kit.device), check_speed=False)
    assert any("speed check off (check_speed=False)" in note for note in report.notes)
    monkeypatch.setenv("KERNL_CHECK_SPEED", "off")
    report = optimize_model(_tiny_bert(kit).to(kit.device))
    assert any("speed check off (KERNL_CHECK_SPEED=0)" in note for note in report.notes)
    monkeypatch.delenv("KERNL_CHECK_SPEED")
    if kit.device == "cpu":
        report = optimize_model(_tiny_bert(kit))
        assert any("nothing to time on the CPU" in note for note in report.notes)
    with pytest.raises(TypeError, match="check_speed"):
        optimize_model(_tiny_bert(kit), check_speed="yes")


def _gpu_model(kit, dtype=torch.float16):
    return _tiny_bert(kit).to("cuda", dtype)


@pytest.mark.parametrize("packed", [True, False])
def test_on_a_gpu_a_replay_made_slower_falls_back_to_pytorch(kit, monkeypatch, packed):
    if kit.device != "cuda":
        pytest.skip("CUDA graphs and CUDA-event timing need a GPU")
    replay = torch.cuda.CUDAGraph.replay

    def slow_replay(graph):  # real GPU time: a ~20 ms sleep queued on the stream before each replay
        torch.cuda._sleep(40_000_000)
        return replay(graph)

    model = _gpu_model(kit)
    reference = copy.deepcopy(model)
    report = optimize_model(model, packed=packed)
    ids, mask = (t.cuda() for t in kit.padded_batch(3, 21, [21, 9, 4], vocab=120))
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", slow_replay)
    with torch.inference_mode(), pytest.warns(UserWarning, match="kept PyTorch for"):
        model(input_ids=ids, attention_mask=mask)
    assert [r.kept for r in report.speed] == ["PyTorch"] and report.speed[0].kernl_ms > 10
    assert any(g.runs_as == "CUDA graph (whole forward)" for g in report.graphs)
    with torch.inference_mode():
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(again[real].float(), expected[real].float(), atol=1e-2, rtol=1e-2)
    assert len(report.speed) == 1 and "speed check: kept PyTorch for" in str(report)


def test_on_a_gpu_each_new_signature_is_timed_once(kit):
    if kit.device != "cuda":
        pytest.skip("CUDA-event timing needs a GPU")
    model = _gpu_model(kit)
    report = optimize_model(model)
    with torch.inference_mode():
        for lengths in ([21, 9, 4], [21, 9, 4], [60, 3, 3, 3]):
            ids, mask = (t.cuda() for t in kit.padded_batch(len(lengths), max(lengths), lengths, vocab=120))
            model(input_ids=ids, attention_mask=mask)
    assert len(report.speed) == 2 and all(r.kernl_ms > 0 and r.pytorch_ms > 0 for r in report.speed)
    assert len({r.signature for r in report.speed}) == 2


def test_cuda_events_are_recorded_on_the_stream_of_the_timed_device(monkeypatch):
    """The model's GPU need not be the current one: the events go on that GPU's current stream (on the
    current device's stream they would time an idle stream). CUDA's calls are stood in for on the CPU."""
    recorded, streams = [], {1: object(), 0: object()}

    class Event:
        def __init__(self, enable_timing):
            self.stream = None

        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams[torch.device(device).index])
    assert speed_check.elapsed_ms(lambda: None, torch.device("cuda", 1)) == 1.0
    assert recorded == [streams[1], streams[1]]


@needs_two_gpus
def test_work_on_a_gpu_other_than_the_current_one_is_timed():
    """A ~20 ms GPU sleep queued on cuda:1 while cuda:0 is current takes about that long."""

    def sleep_on_the_second_gpu():
        with torch.cuda.device(1):
            torch.cuda._sleep(40_000_000)

    with torch.cuda.device(0):
        assert speed_check.elapsed_ms(sleep_on_the_second_gpu, torch.device("cuda", 1)) > 5
