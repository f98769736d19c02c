"""The capture primitive: a function's calls replayed from CUDA graphs, one capture per key.

:class:`CudaGraphs` is the one CUDA-graph mechanism of kernl.integration. Its users differ only in
their key, warm-up and inputs:

- the whole forward of a model (:class:`~kernl.integration.forward_graphs.ForwardGraphs`), keyed by
  the arguments' shapes and values, warmed up by two runs on the capture's own inputs;
- a whole decoder step of ``generate()`` (the same class), keyed by the cache and where its tensors
  live, warmed up by its first call (it updates the cache in place: it cannot run twice);
- each compiled graph of that decoder (:func:`~kernl.integration.step_graphs.step_graphs`), keyed by
  the addresses of its inputs that live at fixed addresses (weights, the static cache).

A replay copies the call's *copied* inputs into the graph's own buffers (one launch), replays, and
hands out the outputs (cloned: the next replay overwrites the graph's memory). Every other tensor the
call reaches (weights, a static cache) is read, and written, where it lives: the capture recorded its
address. Captures of one user allocate from one memory pool; graphs never replay concurrently and
outputs are copied out after each replay, so a capture's intermediates reuse the blocks earlier
captures freed: the pool grows to about the largest graph's working set, not the sum of all.
"""

import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from kernl.integration.trees import map_tensors, objects_in, tensors_in
from kernl.integration.user_warnings import warn
from kernl.integration.warmup_clock import WarmupTimes, warmup_clock
from kernl.matmul import tuning

_warm_up_streams: dict[int, torch.cuda.Stream] = {}


def warm_up_stream() -> torch.cuda.Stream:
    """The side stream warm-ups run on, one per device for the process. The caching allocator reuses a
    freed block only for the stream it was allocated on: a new stream per capture would keep each
    warm-up's working set (and a tuner's scratch) reserved for good, one more with every capture."""
    device = torch.cuda.current_device()
    if device not in _warm_up_streams:
        _warm_up_streams[device] = torch.cuda.Stream()
    return _warm_up_streams[device]


def captured(run, warm_up, pool) -> tuple:
    """``(graph, outputs)``: ``warm_up()`` run on the side stream :func:`warm_up_stream` (first calls
    compile and autotune, which a capture cannot hold), then one call of ``run()`` captured in a new CUDA
    graph allocating from ``pool``; ``outputs`` are what the captured call returned, living in the
    graph's memory."""
    side = warm_up_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    torch.cuda.synchronize()
    return graph, outputs


def on_inputs_gpu(*groups) -> torch.cuda.device:
    """A context in which the GPU of the first CUDA tensor among ``groups`` (iterables of values) is the
    current device (streams, captures and synchronisation act on the current device, not on a model's);
    a no-op without one."""
    tensors = (v for group in groups for v in group if isinstance(v, torch.Tensor) and v.is_cuda)
    return torch.cuda.device(next((t.device.index for t in tensors), -1))


@dataclass(frozen=True)
class WarmUp:
    """How a new key gets ready for its capture (compilation and autotuning cannot run inside one).

    ``direct_calls``: the key's first calls run the function as they are, uncaptured. A call that
    updates state in place (a decoder step writing its cache) must run once per call, so its first
    call is its warm-up; such calls are never run twice (see ``weights`` of :class:`CudaGraphs`).
    ``runs``: then, just before capturing, runs of the function on the capture's own inputs, on a side
    stream; with two or more, the first defers its GEMM tunings to its end, where they compile together
    (:func:`kernl.matmul.tuning.deferred_tuning`: meanwhile cuBLAS runs them). ``fresh(tensor) -> bool``: inputs read in place that each of those runs gets a fresh copy
    of (a static cache the function writes: the warm-up then changes nothing).
    """

    direct_calls: int = 0
    runs: int = 2
    fresh: Callable[[torch.Tensor], bool] | None = None


# A call without side effects: two runs on the capture's own inputs (compilation and GEMM tuning, then
# a run on the chosen configs).
TWICE_ON_COPIES = WarmUp(direct_calls=0, runs=2)
# A call that updates state in place (a decoder step writing its cache): its first call is the warm-up.
FIRST_CALL = WarmUp(direct_calls=1, runs=0)


def _tunings_deferred(run: int, runs: int):
    """The context of warm-up run ``run`` of ``runs``: the first of two or more defers its GEMM tunings
    to its end (:func:`kernl.matmul.tuning.deferred_tuning`), where the candidates of all its problems
    compile together; its outputs are discarded, and the runs after it use the chosen configs."""
    return tuning.deferred_tuning() if run == 0 and runs >= 2 else contextlib.nullcontext()


class WeightAddresses:
    """Where a model's parameters and buffers live, as its CUDA graphs read them.

    A capture reads each weight at its address; ``model.half()``, a replaced parameter or
    ``param.data = ...`` moves it, and every graph must then be captured again. A reference to each
    weight's memory is kept, so memory a stale graph reads is never freed under it.
    """

    def __init__(self, model: torch.nn.Module):
        self.slots = [(m._parameters, n) for m in model.modules() for n in m._parameters] + [
            (m._buffers, n) for m in model.modules() for n in m._buffers
        ]
        self.remember()

    def _addresses(self) -> list[int]:
        return [0 if owner[name] is None else owner[name].data_ptr() for owner, name in self.slots]

    def remember(self) -> None:
        """Note where every weight lives now."""
        tensors = [owner[name] for owner, name in self.slots]
        self.kept = [None if t is None else t.detach() for t in tensors]  # same memory, outlives a move
        self.addresses = self._addresses()

    def moved(self) -> bool:
        """Whether a weight lives elsewhere than where :meth:`remember` saw it."""
        return self._addresses() != self.addresses


@dataclass
class Capture:
    """One key's CUDA graph."""

    graph: torch.cuda.CUDAGraph | None  # None: capturing failed or was refused; the key runs uncaptured
    inputs: list  # the graph's own copies of the copied inputs, filled before each replay
    outputs: object = None  # what the captured call returned, in the graph's memory
    in_place: frozenset = frozenset()  # storages of the inputs read in place: outputs there are not cloned
    error: str | None = None
    times: WarmupTimes | None = None  # the warm-up and capture's seconds, and where they went

    @property
    def seconds(self) -> float:
        """Seconds of warm-up and capture (0 before the capture is timed)."""
        return self.times.warmup_s if self.times is not None else 0.0


def _clone_owned(in_place: frozenset):
    """The hand-out of a replay's output tensors: cloned, except those in the storages ``in_place``."""
    if not in_place:
        return torch.Tensor.clone
    return lambda t: t if t.untyped_storage().data_ptr() in in_place else t.clone()


class CudaGraphs:
    """``graphs(*args, **kwargs)``: ``fn(*args, **kwargs)``, replayed from a CUDA graph captured per key.

    ``key(args, kwargs)``: what a capture depends on beyond its copied inputs' values (shapes, flags,
    addresses read in place), hashable; ``None`` runs the call uncaptured. ``copied(args, kwargs)``:
    the tensors copied into the graph's buffers before each replay, in an order fixed by the key; every
    other tensor of the call is read where it lives. Default: every tensor in the arguments (nested in
    tuples, lists and dicts; an object such as a cache is not looked into). ``pool``: the captures'
    memory pool (``torch.cuda.graph_pool_handle()``). ``warm_up``: :class:`WarmUp`. ``max_captures``:
    beyond this many keys, new keys run uncaptured. ``weights``: :class:`WeightAddresses` the graphs read
    in place; when they move, every capture is dropped: checked after a replay, while the GPU runs it
    (the stale replay is waited for and the call runs again), or, for calls that must run once
    (``warm_up.direct_calls``), before it. ``on_capture(capture)``: called after each capture attempt
    (reports).

    Outputs are cloned after each replay, except tensors in the storage of an input read in place (a
    cache's tensors, handed out as they are). An object among the outputs must be one of the call's
    arguments (a cache passed in, whose identity the key holds): any other object (a cache the call
    made) would be handed out by every replay, its tensors overwritten, so such a key runs uncaptured.
    A call made while its stream is being captured runs ``fn``, so that an outer capture records it.
    A capture that raises leaves its key uncaptured, with the reason in ``capture.error`` and a warning.
    """

    def __init__(
        self,
        fn,
        key: Callable[[tuple, dict], Hashable | None],
        pool,
        *,
        copied: Callable[[tuple, dict], list] = lambda args, kwargs: tensors_in((args, kwargs)),
        warm_up: WarmUp = TWICE_ON_COPIES,
        max_captures: int | None = None,
        weights: WeightAddresses | None = None,
        on_capture: Callable[[Capture], None] | None = None,
    ):
        self.fn, self.key, self.pool, self.copied = fn, key, pool, copied
        self.warm_up, self.max_captures = warm_up, max_captures
        self.weights, self.on_capture = weights, on_capture
        self.runs_twice = warm_up.direct_calls == 0  # a stale replay may be followed by a second run
        self.captures: dict[Hashable, Capture] = {}
        self.direct_calls: dict[Hashable, int] = {}

    def clear(self) -> None:
        """Drop every capture (the next call of each key captures again)."""
        self.captures.clear()

    def _drop_if_weights_moved(self) -> bool:
        if self.weights is None or not self.weights.moved():
            return False
        self.clear()
        self.weights.remember()
        return True

    def __call__(self, *args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            return self.fn(*args, **kwargs)
        copied = self.copied(args, kwargs)
        with on_inputs_gpu(copied, args):
            return self._run(copied, args, kwargs)

    def _run(self, copied: list, args: tuple, kwargs: dict):
        key = self.key(args, kwargs)
        if key is None:
            return self.fn(*args, **kwargs)
        if not self.runs_twice:
            self._drop_if_weights_moved()
        capture = self.captures.get(key)
        if capture is None:
            if self.max_captures is not None and len(self.captures) >= self.max_captures:
                return self.fn(*args, **kwargs)
            if self.direct_calls.get(key, 0) < self.warm_up.direct_calls:
                self.direct_calls[key] = self.direct_calls.get(key, 0) + 1
                return self.fn(*args, **kwargs)
            capture = self._capture(copied, args, kwargs)
            self.captures[key] = capture
        if capture.graph is None:
            return self.fn(*args, **kwargs)
        if capture.inputs:
            torch._foreach_copy_(capture.inputs, copied)  # one launch for all inputs
        capture.graph.replay()
        outputs = map_tensors(_clone_owned(capture.in_place), capture.outputs)
        if self.runs_twice and self.weights is not None and self.weights.moved():
            torch.cuda.current_stream().synchronize()  # the stale replay ends before its memory may go
            self._drop_if_weights_moved()
            return self._run(copied, args, kwargs)
        return outputs

    def _capture(self, copied: list, args: tuple, kwargs: dict) -> Capture:
        with warmup_clock() as times:
            capture = self._warm_up_and_capture(copied, args, kwargs)
        capture.times = times
        if capture.error is not None:  # a fallback is never silent: the report has it, and so does a warning
            warn(f"kernl: {capture.error}")
        if self.on_capture is not None:
            self.on_capture(capture)
        return capture

    def _warm_up_and_capture(self, copied: list, args: tuple, kwargs: dict) -> Capture:
        inputs = [t.clone() for t in copied]
        own = {id(t): c for t, c in zip(copied, inputs, strict=True)}
        args, kwargs = map_tensors(lambda t: own.get(id(t), t), (args, kwargs))
        copies = {id(c) for c in inputs}
        in_place = frozenset(
            t.untyped_storage().data_ptr() for t in tensors_in((args, kwargs)) if id(t) not in copies
        )
        capture = Capture(graph=None, inputs=inputs, in_place=in_place)
        fresh = self.warm_up.fresh

        def warm_up():
            for run in range(self.warm_up.runs):
                run_args, run_kwargs = (
                    (args, kwargs)
                    if fresh is None
                    else map_tensors(lambda t: t.clone() if fresh(t) else t, (args, kwargs))
                )
                with _tunings_deferred(run, self.warm_up.runs):
                    self.fn(*run_args, **run_kwargs)
            # the backend compiles in the first warm-up run, and lays out stacked Q/K/V weights then
            self._drop_if_weights_moved()

        try:
            capture.graph, capture.outputs = captured(lambda: self.fn(*args, **kwargs), warm_up, self.pool)
        except Exception as failure:  # noqa: BLE001 - anything a capture cannot handle runs without one
            capture.error = f"CUDA graph capture failed ({type(failure).__name__}: {failure}); runs without"
        arguments = {id(o) for o in objects_in((args, kwargs))}
        if capture.error is None and any(id(o) not in arguments for o in objects_in(capture.outputs)):
            capture.graph = None  # every replay would hand out the same object, its tensors overwritten
            capture.error = (
                "outputs hold an object (a key/value cache) each replay would overwrite; runs without"
            )
        return capture
