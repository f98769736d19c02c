"""Run a model's whole optimized forward under CUDA graphs (:class:`~kernl.integration.cuda_graphs.CudaGraphs`).

The captured region is the full ``forward`` (TorchDynamo's compiled graphs with kernl's kernels, and the
PyTorch code between them), so a replay costs one graph launch plus the input copies: TorchDynamo's
guards and the Python of ``forward`` run only while capturing. That is safe because the capture is
keyed by everything the guards would look at that can change between calls (:func:`signature`): each
tensor argument's shape, dtype and device, every other argument's value, the autocast state and whether
inference mode is on (a graph captured in inference mode reads inference tensors, which no call outside
it may write); and because the model's parameters and buffers are checked to still live where the
graphs read them (a replaced parameter, or ``model.half()`` after ``optimize_model``, drops every graph
and the call runs again on a new capture). That check runs while the GPU replays, not before.
"""

import torch

from kernl.integration.cuda_graphs import TWICE_ON_COPIES, Capture, CudaGraphs, WarmUp, WeightAddresses
from kernl.integration.report import OptimizationReport, WarmupRecord, shape_and_dtype


class Unkeyable(Exception):
    """An argument a capture key cannot stand for (an arbitrary object)."""


def describe(value):
    """A hashable description of an argument: tensors by shape, dtype and device, containers item by
    item, plain values as they are; raises :class:`Unkeyable` for anything else."""
    if isinstance(value, torch.Tensor):
        return (value.shape, value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return (type(value), tuple((key, describe(item)) for key, item in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(describe(item) for item in value))
    raise Unkeyable(type(value).__name__)


def signature(args: tuple, kwargs: dict) -> tuple | None:
    """What a whole-forward capture depends on; ``None`` when an argument cannot be part of a key (an
    object)."""
    parts = [
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        torch.is_inference_mode_enabled(),
    ]
    try:
        parts += [(name, describe(value)) for name, value in [*enumerate(args), *kwargs.items()]]
    except Unkeyable:
        return None
    return tuple(parts)


def warmup_record(capture: Capture) -> WarmupRecord:
    """The report's record of ``capture``'s warm-up (``capture.times`` set): its copied inputs and where
    its seconds went."""
    shapes = [shape_and_dtype(t) for t in capture.inputs]
    device = capture.inputs[0].device if capture.inputs else "cpu"
    times = capture.times
    return WarmupRecord(
        inputs=f"[{', '.join(shapes)}] on {device}",
        warmup_s=times.warmup_s,
        matmul_tuning_s=times.matmul_tuning_s,
        triton_compile_s=times.triton_compile_s,
        other_s=times.other_s,
    )


class ForwardGraphs(CudaGraphs):
    """``runner(*args, **kwargs)``: ``forward(*args, **kwargs)`` replayed from a CUDA graph captured per key.

    ``model`` owns the parameters and buffers the graphs read in place. ``key``: the capture key
    (:func:`signature` by default); ``warm_up``: :class:`~kernl.integration.cuda_graphs.WarmUp` (by
    default two runs on the capture's inputs; a forward that updates a cache in place warms up on its
    first call instead). A capture that fails leaves its key running ``forward`` directly, with the
    reason in the report; the report's graphs compiled while capturing say how they run.
    """

    def __init__(
        self,
        forward,
        model: torch.nn.Module,
        report: OptimizationReport,
        key=signature,
        warm_up: WarmUp = TWICE_ON_COPIES,
        max_captures: int | None = None,
    ):
        super().__init__(
            forward,
            key,
            torch.cuda.graph_pool_handle(),
            warm_up=warm_up,
            max_captures=max_captures,
            weights=WeightAddresses(model),
            on_capture=self._note,
        )
        self.report, self.first_record = report, 0

    def __call__(self, *args, **kwargs):
        self.first_record = len(self.report.graphs)  # graphs compiled from here on belong to this call
        return super().__call__(*args, **kwargs)

    def _note(self, capture: Capture) -> None:
        if capture.times is not None:
            self.report.warmups.append(warmup_record(capture))
        for record in self.report.graphs[self.first_record :]:
            record.runs_as = (
                "CUDA graph (whole forward)" if capture.error is None else "rewritten graph, no CUDA graph"
            )
            record.warmup_s = capture.seconds
            record.error = record.error or capture.error
