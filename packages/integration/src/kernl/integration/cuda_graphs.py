"""Run a rewritten graph under CUDA graphs: one capture per compiled graph, one shared memory pool.

TorchDynamo (``dynamic=False``) compiles one graph per input shape; ``optimize_model`` pads sequence
lengths up to a few buckets, so there is one graph, and one capture, per (batch, bucket).

Memory: every capture allocates from one pool per device (``torch.cuda.graph_pool_handle()``). Graphs
are never replayed concurrently and each copies its outputs out after replay, so the intermediates of
one capture can reuse the blocks another capture freed: the pool grows to about the largest graph's
working set plus each graph's (small) static inputs and outputs, not the sum of all working sets.
"""

import operator
import time

import torch

_POOLS: dict[int, tuple] = {}


def shared_pool(device: torch.device):
    """The memory pool every kernl CUDA graph on ``device`` captures into."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


class CudaGraphRunner:
    """Callable that replays ``fn`` (the rewritten graph) from a CUDA graph captured on the first call.

    ``static`` holds the indices of inputs that keep their storage between calls (the model's weights
    and buffers): the graph reads them in place. The other inputs are copied into static buffers on
    each call. Outputs are copied out of the pool, so callers may keep them across calls.
    A different weight tensor in a static slot triggers a new capture; a failed capture falls back to
    running ``fn`` directly, with the reason kept in ``record.error``.
    """

    def __init__(self, fn, static: list[int], record):
        self.fn, self.record = fn, record
        self.static_indices = static
        pick = operator.itemgetter(*static) if static else None
        self.pick_static = lambda args: (pick(args) if len(static) > 1 else (pick(args),)) if pick else ()
        self.graph = None
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.graph is None or not all(map(operator.is_, self.pick_static(args), self.static_args)):
            self._capture(args)
            if self.failed:
                return self.fn(*args)
        for index in self.dynamic_indices:
            self.inputs[index].copy_(args[index])
        self.graph.replay()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs)

    def _capture(self, args) -> None:
        start = time.perf_counter()
        static = set(self.static_indices)
        self.dynamic_indices = [
            i for i, a in enumerate(args) if i not in static and isinstance(a, torch.Tensor)
        ]
        self.inputs = [a.clone() if i in self.dynamic_indices else a for i, a in enumerate(args)]
        self.static_args = self.pick_static(args)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles and autotunes the kernels outside the capture
                    self.fn(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=shared_pool(device)):
                self.outputs = self.fn(*self.inputs)
            torch.cuda.synchronize(device)
            self.graph = graph
            self.record.runs_as = "CUDA graph"
        except Exception as error:  # noqa: BLE001 - anything the capture cannot handle runs as is
            self.failed = True
            self.record.runs_as = "PyTorch (no CUDA graph)"
            self.record.error = f"CUDA graph capture failed: {type(error).__name__}: {error}"
        self.record.warmup_s = time.perf_counter() - start
