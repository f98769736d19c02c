"""The capture primitive (kernl.integration.cuda_graphs.CudaGraphs): keys, warm-up policies, inputs copied or
read in place, outputs handed out, weights that move. On the CPU a stand-in graph replays by running the
captured call again on the capture's own inputs; the GPU tests in test_cuda_graphs.py use real graphs."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from kernl.integration import cuda_graphs
from kernl.integration.cuda_graphs import FIRST_CALL, TWICE_ON_COPIES, CudaGraphs, WarmUp, WeightAddresses
from kernl.integration.trees import tensors_in
from kernl.matmul import tuning
from kernl_testing import on_gpu


class _StandInGraph:
    """Replays ``run`` on the inputs it was captured with, writing into the outputs of the capture."""

    replaying = False  # a real replay runs no Python: calls made while this is set are not counted

    def __init__(self, run, outputs):
        self.run, self.outputs = run, outputs

    def replay(self):
        _StandInGraph.replaying = True
        try:
            new = self.run()
        finally:
            _StandInGraph.replaying = False
        for mine, value in zip(tensors_in(self.outputs), tensors_in(new), strict=True):
            if mine is not value:
                mine.copy_(value)


def _count(calls: list) -> None:
    """Note a Python call of the captured function (not a replay)."""
    if not _StandInGraph.replaying:
        calls.append(1)


@pytest.fixture
def stand_in(monkeypatch):
    """CPU stand-ins for CUDA graph capture (no-op on a GPU: the real thing runs)."""
    if on_gpu():
        return None

    def captured(run, warm_up, pool):
        warm_up()
        outputs = run()
        return _StandInGraph(run, outputs), outputs

    monkeypatch.setattr(cuda_graphs, "captured", captured)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(synchronize=lambda: None))
    return None


def _pool():
    return torch.cuda.graph_pool_handle() if on_gpu() else None


def _device():
    return "cuda" if on_gpu() else "cpu"


def _by_shape(args, kwargs):
    return tuple(t.shape for t in args)


def test_a_key_is_warmed_up_twice_captured_once_then_replayed(stand_in):
    calls = []

    def fn(x):
        _count(calls)
        return {"double": x * 2, "plain": 3}

    notes = []
    graphs = CudaGraphs(fn, _by_shape, _pool(), on_capture=notes.append)
    x = torch.arange(4.0, device=_device())
    first = graphs(x)
    assert len(calls) == 3 and torch.equal(first["double"], x * 2) and first["plain"] == 3
    second = graphs(x + 1)  # a replay: fn does not run, the inputs' new values are read
    assert len(calls) == 3 and torch.equal(second["double"], (x + 1) * 2)
    assert torch.equal(first["double"], x * 2)  # outputs are copies: the replay did not overwrite them
    graphs(torch.ones(2, device=_device()))  # another key, another capture
    assert len(calls) == 6 and len(graphs.captures) == 2
    assert [n.error for n in notes] == [None, None] and all(n.seconds > 0 for n in notes)
    assert graphs.key is _by_shape and _by_shape((x,), {}) in graphs.captures


def test_a_call_that_updates_state_warms_up_on_its_first_call_and_never_runs_twice(stand_in):
    state = torch.zeros(3, device=_device())
    calls = []

    def step(x, cache):
        _count(calls)
        cache["state"].copy_(x)  # idempotent: the CPU stand-in runs the captured call, a GPU capture does not
        return cache["state"] * 1, cache

    class Cache:  # an object argument (a key/value cache in generate()): not looked into, read in place
        def __init__(self):
            self.state = state

        def __getitem__(self, name):
            return getattr(self, name)

    cache = Cache()
    graphs = CudaGraphs(step, lambda args, kwargs: id(args[1]), _pool(), warm_up=FIRST_CALL)
    for value in (1.0, 2.0, 4.0):  # direct, captured, replayed
        out, returned = graphs(torch.full((3,), value, device=_device()), cache)
        assert torch.equal(out, state) and returned is cache
    assert len(calls) == 2 and state.tolist() == [4.0, 4.0, 4.0]


def test_inputs_read_in_place_are_handed_out_as_they_are_and_the_warm_up_leaves_them_alone(stand_in):
    cache = torch.zeros(4, device=_device())
    written_to = []

    def write(x, cache_argument):
        if not _StandInGraph.replaying:
            written_to.append(cache_argument is cache)
        cache_argument.copy_(x)
        return cache_argument, cache_argument.sum(0, keepdim=True)

    graphs = CudaGraphs(
        write,
        lambda args, kwargs: args[1].data_ptr(),
        _pool(),
        copied=lambda args, kwargs: [args[0]],
        warm_up=WarmUp(runs=2, fresh=lambda t: t is cache),
    )
    for step in range(1, 4):
        written, total = graphs(torch.full((4,), float(step), device=_device()), cache)
        assert written is cache and cache.tolist() == [float(step)] * 4 and total.item() == 4.0 * step
    assert written_to == [False, False, True]  # two warm-up runs on fresh copies, then the capture


def test_an_object_the_call_makes_is_refused_and_runs_uncaptured(stand_in):
    made = []

    def fn(x):
        made.append(object())
        return x + 1, made[-1]

    notes = []
    graphs = CudaGraphs(fn, _by_shape, _pool(), on_capture=notes.append)
    x = torch.zeros(2, device=_device())
    assert graphs(x)[1] is made[-1] and graphs(x)[1] is made[-1]  # a new object each call, as PyTorch
    assert graphs.captures[_by_shape((x,), {})].graph is None
    assert "outputs hold an object" in notes[0].error


def test_moved_weights_drop_every_capture_and_the_call_runs_again(stand_in):
    layer = torch.nn.Linear(3, 3, bias=False).to(_device())
    weights = WeightAddresses(layer)
    graphs = CudaGraphs(lambda x: layer(x), _by_shape, _pool(), weights=weights)
    x = torch.randn(2, 3, device=_device())
    with torch.no_grad():
        graphs(x)
        graphs(x)
        layer.weight.data = layer.weight.detach() * 2  # new memory under the same parameter
        torch.testing.assert_close(graphs(x), layer(x))
        torch.testing.assert_close(graphs(x), layer(x))
    assert len(graphs.captures) == 1 and not weights.moved()


def test_keys_beyond_the_limit_and_calls_inside_a_capture_run_uncaptured(stand_in, monkeypatch):
    calls = []

    def fn(x):
        _count(calls)
        return x * 2

    graphs = CudaGraphs(fn, _by_shape, _pool(), max_captures=1)
    graphs(torch.zeros(1, device=_device()))
    graphs(torch.zeros(2, device=_device()))
    graphs(torch.zeros(2, device=_device()))
    assert len(graphs.captures) == 1 and len(calls) == 3 + 2
    assert CudaGraphs(fn, lambda args, kwargs: None, _pool())(torch.ones(1, device=_device())).item() == 2
    if not on_gpu():
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        before = len(calls)
        graphs(torch.zeros(1, device=_device()))  # an outer capture records the call itself
        assert len(calls) == before + 1


@pytest.mark.parametrize(
    ("warm_up", "deferred"),
    [
        (TWICE_ON_COPIES, [True, False, False]),  # two warm-up runs, then the capture
        (WarmUp(runs=3), [True, False, False, False]),
        (WarmUp(runs=1), [False, False]),  # a single run: the capture would meet untuned problems
        (FIRST_CALL, [False, False]),  # the first call is the caller's: its output is used
    ],
    ids=["twice", "three runs", "one run", "first call"],
)
def test_the_first_of_two_or_more_warm_up_runs_defers_its_gemm_tunings(
    stand_in, monkeypatch, warm_up, deferred
):
    open_blocks = []

    @contextlib.contextmanager
    def deferred_tuning():
        open_blocks.append(True)
        try:
            yield
        finally:
            open_blocks.pop()

    monkeypatch.setattr(tuning, "deferred_tuning", deferred_tuning)
    inside = []

    def fn(x):
        if not _StandInGraph.replaying:
            inside.append(bool(open_blocks))
        return x * 2

    graphs = CudaGraphs(fn, _by_shape, _pool(), warm_up=warm_up)
    for _ in range(3):
        assert graphs(torch.ones(2, device=_device())).tolist() == [2.0, 2.0]
    assert inside == deferred
