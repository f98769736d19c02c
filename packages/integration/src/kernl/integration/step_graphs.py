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

import torch

from kernl.integration.cuda_graphs import Capture, CudaGraphs, WarmUp
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


def step_graphs(fn, example_inputs, static_ids: set[int], pool, record: GraphRecord) -> CudaGraphs:
    """``runner(*inputs)``: ``fn(*inputs)`` replayed from CUDA graphs (see the module docstring).

    ``example_inputs``: the inputs TorchDynamo compiled ``fn`` for; ``static_ids``: ids of the model's
    parameters and buffers; ``pool``: the memory pool shared by the captures of one model part; ``record``:
    the graph's line in the report. The warm-up runs twice on fresh copies of the cache, so it changes
    nothing (a second update of one copy could write past the end of the cache: a prefill fills the
    cross-attention cache whole).
    """
    tensors = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)]
    static = [i for i in tensors if has_static_address(example_inputs[i], static_ids)]
    copied = [i for i in tensors if i not in static]

    def note(capture: Capture) -> None:
        if capture.error is None:
            record.runs_as = f"CUDA graph ({record.part or 'graph'})"
        else:
            record.error, record.runs_as = capture.error, "rewritten graph, no CUDA graph"
        record.warmup_s = capture.seconds

    return CudaGraphs(
        fn,
        lambda args, kwargs: tuple(args[i].data_ptr() for i in static),
        pool,
        copied=lambda args, kwargs: [args[i] for i in copied],
        warm_up=WarmUp(runs=2, fresh=lambda t: holds_state(t, static_ids)),
        max_captures=MAX_CAPTURES,
        on_capture=note,
    )
