"""Run a rewritten graph under CUDA graphs: one capture per compiled graph, one memory pool per model.

TorchDynamo (``dynamic=False``) compiles one graph per input shape; ``optimize_model`` pads sequence
lengths up to a few buckets, so there is one graph, and one capture, per (batch, bucket).

Memory: every capture of one optimized model allocates from one pool (``torch.cuda.graph_pool_handle()``,
held by the backend). Graphs are never replayed concurrently and each copies its outputs out after
replay, so the intermediates of one capture reuse the blocks earlier captures freed: the pool grows to
about the largest graph's working set plus each graph's (small) static inputs and outputs, not the sum
of all working sets.
"""

import operator
import time

import torch


class CudaGraphRunner:
    """Callable that replays ``fn`` (the rewritten graph) from a CUDA graph captured on the first call.

    ``static`` holds the indices of inputs that keep their storage between calls (the model's weights
    and buffers): the graph reads them in place. The other inputs are copied into static buffers on
    each call. Outputs are copied out of the pool, so callers may keep them across calls.
    A different weight tensor in a static slot triggers a new capture. When ``fn`` raises during the
    warm-up, ``original`` (the graph as TorchDynamo gave it) is captured instead; when capturing fails,
    the graph runs without a CUDA graph. Either way the reason goes to ``record.error``.
    """

    def __init__(self, fn, original, static: list[int], record, pool):
        self.fn, self.original, self.record, self.pool = fn, original, record, pool
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

    def _warm_up(self, device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles and autotunes the kernels outside the capture
                self.fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)

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
            try:
                self._warm_up(device)
            except Exception as error:  # noqa: BLE001 - the kernels failed: run the graph as PyTorch
                self.record.error = f"kernels failed ({type(error).__name__}: {error}); graph runs as PyTorch"
                self.fn = self.original
                self._warm_up(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*self.inputs)
            torch.cuda.synchronize(device)
            self.graph, self.outputs = graph, outputs  # an earlier graph is released only now
            self.record.runs_as = "CUDA graph"
        except Exception as error:  # noqa: BLE001 - anything the capture cannot handle runs as is
            self.failed = True
            self.record.runs_as = "PyTorch (no CUDA graph)"
            self.record.error = f"CUDA graph capture failed: {type(error).__name__}: {error}"
        self.record.warmup_s = time.perf_counter() - start
