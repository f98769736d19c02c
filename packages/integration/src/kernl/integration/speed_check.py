"""Never slower than PyTorch: when a new signature warms up, time kernl's path against the model's
original forward for the same call, and keep the faster for every later call of that signature.

A signature is what one compiled and captured graph serves: a (batch, length bucket) of the bucketed
path, a token bucket of the packed path. Its first call runs kernl's path (compilation, autotuning and
the CUDA-graph capture happen there); then each path runs :data:`REPLAYS` more times, alternately,
timed between CUDA events with the GPU idle before each (so the host's launch work counts, as it does
for the caller), after one untimed run of the original forward (its own first-call work). The median
decides; a tie keeps kernl. The check costs about ``2 x REPLAYS + 1`` forwards per signature, once.

``optimize_model(model, check_speed=False)``, or ``KERNL_CHECK_SPEED=0`` in the environment (tests that
check kernl's own outputs), turns the check off. Only calls on a GPU are timed. On the CPU kernl's kernels run through Triton's interpreter, for
checking, not for speed: there is nothing to time, and every call runs kernl's path.
"""

import statistics
import time
from collections.abc import Callable, Hashable

import torch

from kernl.common.launch import switched_off
from kernl.integration.report import OptimizationReport, SpeedRecord
from kernl.integration.user_warnings import warn

REPLAYS = 3  # timed runs of each path per new signature
TIMED_DEVICE_TYPES = frozenset({"cuda"})  # where a check runs (the CPU has nothing to time)


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds one call of ``fn()`` takes on ``device``: between CUDA events on a GPU, which is idle
    when the first is recorded (the host's launch work is counted); by the host clock elsewhere."""
    if device.type == "cuda":
        # the work runs on the model's GPU, which need not be the current one: events recorded on the
        # current device's stream would time an idle stream
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_both(
    kernl: Callable[[], object], pytorch: Callable[[], object], device: torch.device, replays: int = REPLAYS
) -> tuple[float, float]:
    """Median milliseconds of ``kernl()`` and ``pytorch()`` over ``replays`` alternate runs each, after one
    untimed run of ``pytorch()`` (``kernl()`` is warm: its first call came before)."""
    if replays < 1:
        raise ValueError(f"replays must be >= 1, got {replays}")
    pytorch()
    kernl_ms, pytorch_ms = [], []
    for _ in range(replays):
        kernl_ms.append(elapsed_ms(kernl, device))
        pytorch_ms.append(elapsed_ms(pytorch, device))
    return statistics.median(kernl_ms), statistics.median(pytorch_ms)


def decide(signature: str, kernl_ms: float, pytorch_ms: float) -> SpeedRecord:
    """The record of one check: PyTorch is kept only when strictly faster."""
    kept = "PyTorch" if pytorch_ms < kernl_ms else "kernl"
    return SpeedRecord(signature=signature, kernl_ms=kernl_ms, pytorch_ms=pytorch_ms, kept=kept)


class SpeedCheck:
    """Per-signature verdicts of one optimized forward, kept in ``report.speed``.

    ``device``: where the model runs; nothing is timed unless its type is in :data:`TIMED_DEVICE_TYPES`.
    :meth:`run` serves a call whose signature is known before it runs; a caller that learns the
    signature while running kernl's path uses :meth:`keeps_pytorch` and :meth:`judge` instead.
    """

    def __init__(self, report: OptimizationReport, device: torch.device):
        self.report, self.device = report, device
        self.verdicts: dict[Hashable, SpeedRecord] = {}

    @property
    def active(self) -> bool:
        """Whether calls are timed here (a GPU, and no CUDA-graph capture in progress)."""
        if self.device.type not in TIMED_DEVICE_TYPES:
            return False
        return not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    def keeps_pytorch(self, key: Hashable) -> bool:
        """Whether calls of signature ``key`` run the original forward (a check found it faster)."""
        verdict = self.verdicts.get(key)
        return verdict is not None and verdict.kept == "PyTorch"

    def judged(self, key: Hashable) -> bool:
        """Whether signature ``key`` was checked already."""
        return key in self.verdicts

    def judge(
        self, key: Hashable, signature: str, kernl: Callable[[], object], pytorch: Callable[[], object]
    ):
        """Time ``kernl()`` against ``pytorch()`` (two ways of computing the same call; ``kernl()`` ran once
        already) and keep the verdict for ``key``; ``signature`` describes it in the report. Kept PyTorch:
        a warning says why."""
        if not self.active or key in self.verdicts:
            return
        try:
            record = decide(signature, *time_both(kernl, pytorch, self.device))
        except Exception as error:  # noqa: BLE001 - e.g. no memory left for the original forward's run
            why = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            nan = float("nan")
            record = SpeedRecord(signature=signature, kernl_ms=nan, pytorch_ms=nan, kept="kernl", error=why)
            warn(f"kernl: {record.describe()}")
        self.verdicts[key] = record
        self.report.speed.append(record)
        if record.kept == "PyTorch":
            warn(f"kernl: {record.describe()}; calls of this signature run the model's original forward")

    def run(self, key: Hashable | None, signature: str, kernl: Callable, pytorch: Callable):
        """The output of the call: ``pytorch()`` where signature ``key`` keeps PyTorch, else ``kernl()``,
        judged against ``pytorch()`` on the first call of ``key`` (None: never judged)."""
        if key is not None and self.keeps_pytorch(key):
            return pytorch()
        output = kernl()
        if key is not None:
            self.judge(key, signature, kernl, pytorch)
        return output


def speed_check_for(report: OptimizationReport, device: torch.device, enabled: bool) -> SpeedCheck | None:
    """The never-slower check of a model on ``device``, or None (with a note in ``report``) when it is
    turned off (``enabled`` False, or the environment variable ``KERNL_CHECK_SPEED=0``) or nothing can be
    timed there."""
    if not enabled or switched_off("KERNL_CHECK_SPEED"):
        why = "check_speed=False" if not enabled else "KERNL_CHECK_SPEED=0"
        report.notes.append(f"speed check off ({why}): every signature runs kernl's path")
        return None
    if device.type not in TIMED_DEVICE_TYPES:
        report.notes.append(
            "speed check: nothing to time on the CPU (interpreted kernels); every signature runs kernl's path"
        )
        return None
    return SpeedCheck(report, device)
