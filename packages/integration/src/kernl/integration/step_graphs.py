"""CUDA graphs for one compiled graph that reads and writes tensors living at fixed addresses.

Used for the decoder of ``generate()``: TorchDynamo calls the decoder's graph once per generated
token, and among its inputs are the model's weights and a static key/value cache
(``torch._dynamo.mark_static_address``) that the graph updates in place (``index_copy_``). Those
inputs are used where they live: the capture records their addresses and each replay reads and writes
them there. Every other tensor input (token ids, masks: a few bytes) is copied into the graph's own
buffers before the replay, and the graph's own outputs are copied out after it.

One capture per set of static addresses: a new cache, or weights moved by ``model.half()``, is a new
set. At most :data:`MAX_CAPTURES` are kept per graph; an address set beyond them (a cache that moves
at every step) runs the graph without a CUDA graph.
"""

import time
from dataclasses import dataclass

import torch

from kernl.integration.cuda_graphs import captured, on_inputs_gpu
from kernl.integration.report import GraphRecord

MAX_CAPTURES = 4


def has_static_address(tensor: torch.Tensor, static_ids: set[int]) -> bool:
    """A model parameter or buffer, or a tensor marked with ``torch._dynamo.mark_static_address``."""
    return (
        id(tensor) in static_ids
        or isinstance(tensor, torch.nn.Parameter)
        or hasattr(tensor, "_dynamo_static_input_type")
    )


def holds_state(tensor: torch.Tensor, static_ids: set[int]) -> bool:
    """A tensor at a fixed address that is not a weight: a static cache's buffer or length, which a graph
    may update in place."""
    return (
        hasattr(tensor, "_dynamo_static_input_type")
        and id(tensor) not in static_ids
        and not isinstance(tensor, torch.nn.Parameter)
    )


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph | None  # None: capturing failed, this address set runs without a graph
    inputs: list  # the graph's own buffers for the copied inputs
    outputs: list
    owned: list  # per output: True when it lives in the graph's memory (copied out after a replay)


class StepGraph:
    """``runner(*inputs)``: ``fn(*inputs)`` replayed from a CUDA graph (see the module docstring).

    ``example_inputs``: the inputs TorchDynamo compiled ``fn`` for; ``static_ids``: ids of the model's
    parameters and buffers; ``pool``: the memory pool shared by the captures of one model part.
    """

    def __init__(self, fn, example_inputs, static_ids: set[int], pool, record: GraphRecord):
        self.fn, self.pool, self.record = fn, pool, record
        tensors = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)]
        self.static = [i for i in tensors if has_static_address(example_inputs[i], static_ids)]
        self.copied = [i for i in tensors if i not in self.static]
        # The cache: the warm-up runs on copies of it, so it changes nothing.
        self.state = [i for i in self.static if holds_state(example_inputs[i], static_ids)]
        self.captures: dict[tuple, _Capture] = {}

    def __call__(self, *args):
        with on_inputs_gpu(args):
            return self._run(*args)

    def _run(self, *args):
        if torch.cuda.is_current_stream_capturing():  # inside a capture of the whole call: record the kernels
            return self.fn(*args)
        key = tuple(args[i].data_ptr() for i in self.static)
        capture = self.captures.get(key)
        if capture is None:
            if len(self.captures) >= MAX_CAPTURES:
                return self.fn(*args)
            capture = self.captures[key] = self._capture(args)
        if capture.graph is None:
            return self.fn(*args)
        if capture.inputs:
            torch._foreach_copy_(capture.inputs, [args[i] for i in self.copied])
        capture.graph.replay()
        return [t.clone() if owned else t for t, owned in zip(capture.outputs, capture.owned, strict=True)]

    def _with(self, args, positions, tensors) -> list:
        args = list(args)
        for i, tensor in zip(positions, tensors, strict=True):
            args[i] = tensor
        return args

    def _capture(self, args) -> _Capture:
        start = time.perf_counter()
        inputs = [args[i].clone() for i in self.copied]
        graph_args = self._with(args, self.copied, inputs)
        capture = _Capture(graph=None, inputs=inputs, outputs=[], owned=[])

        def warm_up():  # twice, on fresh copies of the state each time: a second update of the same copy
            # could write past the end of the cache (a prefill fills the cross-attention cache whole)
            for _ in range(2):
                self.fn(*self._with(graph_args, self.state, [args[i].clone() for i in self.state]))

        try:
            graph, outputs = captured(lambda: list(self.fn(*graph_args)), warm_up, self.pool)
            read_in_place = {args[i].untyped_storage().data_ptr() for i in self.static}
            capture.owned = [
                isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in read_in_place
                for t in outputs
            ]
            capture.graph, capture.outputs = graph, outputs
            self.record.runs_as = f"CUDA graph ({self.record.part or 'graph'})"
        except Exception as failure:  # noqa: BLE001 - anything a capture cannot handle runs without one
            self.record.error = (
                f"CUDA graph capture failed ({type(failure).__name__}: {failure}); runs without"
            )
            self.record.runs_as = "rewritten graph, no CUDA graph"
        self.record.warmup_s = time.perf_counter() - start
        return capture
