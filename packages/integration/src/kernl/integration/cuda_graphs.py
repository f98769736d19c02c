"""Run the whole optimized forward under CUDA graphs: one capture per input signature, one pool per model.

The captured region is the full ``forward`` (TorchDynamo's compiled graphs with kernl's kernels, and the
PyTorch code between them), so a replay costs one graph launch plus the input copies: TorchDynamo's
guards and the Python of ``forward`` run only while capturing. That is safe because the capture is
keyed by everything the guards would look at that can change between calls: each tensor argument's
shape, dtype and device, every other argument's value, the autocast state and whether inference mode
is on (a graph captured in inference mode reads inference tensors, which no call outside it may
write); and because the model's parameters and buffers are checked to still live where the graphs
read them (a replaced parameter, or ``model.half()`` after ``optimize_model``, drops every graph and
the call runs again on a new capture). That check (~60 us of Python for Bert-base's 201 tensors on
the H100 machine) runs while the GPU replays, not before: the graphs hold references to the tensors
they read, so memory a stale graph reads is never freed under it, and a stale replay's result is
thrown away.

Memory: every capture of one model allocates from one pool (``torch.cuda.graph_pool_handle()``).
Graphs never replay concurrently and outputs are copied out after each replay, so a capture's
intermediates reuse the blocks earlier captures freed: the pool grows to about the largest graph's
working set plus each graph's small static inputs and outputs, not the sum of all working sets.
"""

import time
from dataclasses import dataclass

import torch

from kernl.integration.report import OptimizationReport


def map_tensors(fn, value):
    """``value`` with ``fn`` applied to every tensor inside (tuples, lists, dicts, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        # Filled item by item: a transformers ModelOutput (an OrderedDict subclass) keeps its attributes
        # in step through __setitem__, without its dataclass __init__ (~10 us a call).
        mapped = type(value).__new__(type(value))
        for key, item in value.items():
            mapped[key] = map_tensors(fn, item)
        return mapped
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    return value


def holds_objects(value) -> bool:
    """True when ``value`` holds anything beyond tensors, plain values and containers of them (a Cache)."""
    if isinstance(value, dict):
        return any(holds_objects(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return any(holds_objects(item) for item in value)
    return not isinstance(value, (torch.Tensor, bool, int, float, str, type(None)))


def _tensors(args: tuple, kwargs: dict) -> list:
    """Every tensor in the arguments, nested ones (a ModelOutput, a tuple) included, in a fixed order."""
    found = []
    map_tensors(found.append, (args, kwargs))
    return found


def on_inputs_gpu(values) -> torch.cuda.device:
    """A context in which the GPU of the first CUDA tensor among ``values`` is the current device (streams,
    captures and synchronisation act on the current device, not on a model's); a no-op without one."""
    tensors = (v for v in values if isinstance(v, torch.Tensor) and v.is_cuda)
    return torch.cuda.device(next((t.device.index for t in tensors), -1))


def captured(run, warm_up, pool) -> tuple:
    """``(graph, outputs)``: ``warm_up()`` run on a side stream (first calls compile and autotune, which a
    capture cannot hold), then one call of ``run()`` captured in a new CUDA graph allocating from ``pool``;
    ``outputs`` are what the captured call returned, living in the graph's memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    torch.cuda.synchronize()
    return graph, outputs


class _Unkeyable(Exception):
    """An argument a capture key cannot stand for (an arbitrary object)."""


def _describe(value):
    """A hashable description of an argument: tensors by shape, dtype and device, containers item by
    item, plain values as they are; raises :class:`_Unkeyable` for anything else."""
    if isinstance(value, torch.Tensor):
        return (value.shape, value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return (type(value), tuple((key, _describe(item)) for key, item in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_describe(item) for item in value))
    raise _Unkeyable(type(value).__name__)


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph | None  # None: capturing failed, this signature runs without a graph
    tensors: list  # the static input tensors the graph reads, in argument order
    outputs: object = None


class ForwardGraphs:
    """``runner(*args, **kwargs)``: ``forward(*args, **kwargs)`` replayed from a CUDA graph captured per signature.

    ``model`` owns the parameters and buffers the graphs read in place. The first call of a signature
    warms up (two plain calls on a side stream: compilation and autotuning), then captures; a capture
    that fails leaves that signature running ``forward`` directly, with the reason in the report.
    ``signature(args, kwargs)`` replaces :meth:`signature` as the capture key. A ``stateful`` forward
    (one that updates a cache in place) is never called twice for one call: the first call of a
    signature runs directly and is the warm-up, the second captures. Beyond ``max_captures`` graphs,
    new signatures run directly.
    """

    def __init__(
        self,
        forward,
        model: torch.nn.Module,
        report: OptimizationReport,
        signature=None,
        stateful=False,
        max_captures=None,
    ):
        self.forward, self.report = forward, report
        self.key = signature or self.signature
        self.stateful, self.max_captures, self.warm = stateful, max_captures, set()
        self.slots = [(m._parameters, n) for m in model.modules() for n in m._parameters] + [
            (m._buffers, n) for m in model.modules() for n in m._buffers
        ]
        self.captures: dict[tuple, _Capture] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._remember_weights()

    def _remember_weights(self) -> None:
        """Note where every parameter and buffer lives, holding a reference to its memory (see above)."""
        tensors = [owner[name] for owner, name in self.slots]
        self.kept = [None if t is None else t.detach() for t in tensors]  # same memory, outlives a .data swap
        self.addresses = [0 if t is None else t.data_ptr() for t in tensors]

    def _weights_moved(self) -> bool:
        return [
            0 if owner[name] is None else owner[name].data_ptr() for owner, name in self.slots
        ] != self.addresses

    def _forget_captures(self) -> None:
        self.captures.clear()
        self._remember_weights()

    def _drop_stale_captures(self) -> None:
        """Forget every graph when a parameter or buffer no longer lives where the graphs read it."""
        if self._weights_moved():
            self._forget_captures()

    @staticmethod
    def signature(args: tuple, kwargs: dict) -> tuple | None:
        """What a capture depends on; ``None`` when an argument cannot be part of a key (an object)."""
        parts = [
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            torch.is_inference_mode_enabled(),
        ]
        try:
            parts += [(name, _describe(value)) for name, value in [*enumerate(args), *kwargs.items()]]
        except _Unkeyable:
            return None
        return tuple(parts)

    def __call__(self, *args, **kwargs):
        tensors = _tensors(args, kwargs)
        with on_inputs_gpu(tensors):
            return self._run(tensors, args, kwargs)

    def _run(self, tensors: list, args: tuple, kwargs: dict):
        key = self.key(args, kwargs)
        if key is None:
            return self.forward(*args, **kwargs)
        if self.stateful:  # checked before the replay: a call that updates a cache cannot run twice
            self._drop_stale_captures()
        capture = self.captures.get(key)
        if capture is None:
            if self.max_captures is not None and len(self.captures) >= self.max_captures:
                return self.forward(*args, **kwargs)
            if self.stateful and key not in self.warm:  # this call compiles and warms up the kernels
                self.warm.add(key)
                return self.forward(*args, **kwargs)
            self._drop_stale_captures()
            capture = self.captures[key] = self._capture(args, kwargs)
        if capture.graph is None:
            return self.forward(*args, **kwargs)
        if capture.tensors:
            torch._foreach_copy_(capture.tensors, tensors)  # one launch for all inputs
        capture.graph.replay()
        outputs = map_tensors(torch.Tensor.clone, capture.outputs)
        if not self.stateful and self._weights_moved():  # checked while the GPU replays: outputs dropped
            torch.cuda.current_stream().synchronize()  # it finishes before its graph is destroyed
            self._forget_captures()
            return self(*args, **kwargs)
        return outputs

    def _capture(self, args: tuple, kwargs: dict) -> _Capture:
        start, first_record = time.perf_counter(), len(self.report.graphs)
        args, kwargs = map_tensors(torch.Tensor.clone, (args, kwargs))
        capture = _Capture(graph=None, tensors=_tensors(args, kwargs))
        error = None

        def warm_up():  # compiles and autotunes outside the capture
            for _ in range(0 if self.stateful else 2):
                self.forward(*args, **kwargs)
            self._drop_stale_captures()  # the warm-up may move weights (fused projections)

        try:
            capture.graph, capture.outputs = captured(
                lambda: self.forward(*args, **kwargs), warm_up, self.pool
            )
        except Exception as failure:  # noqa: BLE001 - anything a capture cannot handle runs without one
            error = f"CUDA graph capture failed ({type(failure).__name__}: {failure}); runs without"
        if error is None and not self.stateful and holds_objects(capture.outputs):
            capture.graph = None  # every replay would hand out the same object, its tensors overwritten
            error = "outputs hold an object (a key/value cache) each replay would overwrite; runs without"
        for record in self.report.graphs[first_record:]:
            record.runs_as = (
                "CUDA graph (whole forward)" if error is None else "rewritten graph, no CUDA graph"
            )
            record.warmup_s = time.perf_counter() - start
            record.error = record.error or error
        return capture
