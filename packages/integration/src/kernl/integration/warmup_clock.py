"""Where a graph's warm-up goes: GEMM tuning, Triton compilation, and the rest.

:func:`warmup_clock` times a block (a CUDA graph's warm-up runs and capture) and splits its wall time
into three parts that do not overlap:

- ``matmul_tuning_s``: :mod:`kernl.matmul.tuning`'s tunings (compiling and timing GEMM candidates);
- ``triton_compile_s``: Triton compilations on the block's thread outside those tunings (the chosen
  kernels of every package, GEMM tiles launched at a new M included), from Triton's compilation
  listener (``triton.knobs.compilation.listener``); None where this Triton has none;
- ``other_s``: the rest: TorchDynamo's trace, kernl's rules, the warm-up runs themselves, the capture.
"""

import contextlib
import threading
import time
from dataclasses import dataclass

from kernl.matmul import tuning

try:
    from triton import knobs
except ImportError:  # a Triton without knobs: compilation is not told apart
    knobs = None


@dataclass
class WarmupTimes:
    """Seconds of one warm-up (:func:`warmup_clock`); the three parts sum to ``warmup_s`` at most."""

    warmup_s: float = 0.0
    matmul_tuning_s: float = 0.0
    triton_compile_s: float | None = 0.0
    other_s: float = 0.0


def _listener_slot():
    """Triton's compilation-listener settings, or None where this Triton has no listener."""
    compilation = getattr(knobs, "compilation", None)
    return compilation if compilation is not None and hasattr(compilation, "listener") else None


@contextlib.contextmanager
def warmup_clock():
    """Yields a :class:`WarmupTimes` that is filled in when the block ends (see the module docstring).
    Triton's compilation listener is chained (any listener already set still hears every compilation)
    and restored afterwards."""
    record = WarmupTimes()
    slot = _listener_slot()
    thread = threading.get_ident()
    compiled_us = [0]
    previous = slot.listener if slot is not None else None

    def listener(*, times, **kwargs):  # times: Triton's CompileTimes of one compilation, in us
        if threading.get_ident() == thread and not tuning.tuning_running():
            compiled_us[0] += times.total
        if previous is not None:
            previous(times=times, **kwargs)

    if slot is not None:
        slot.listener = listener
    tuned_before = tuning.tuning_seconds()
    start = time.perf_counter()
    try:
        yield record
    finally:
        record.warmup_s = time.perf_counter() - start
        if slot is not None:
            slot.listener = previous
        record.matmul_tuning_s = min(tuning.tuning_seconds() - tuned_before, record.warmup_s)
        left = record.warmup_s - record.matmul_tuning_s
        if slot is None:
            record.triton_compile_s = None
        else:
            record.triton_compile_s = min(compiled_us[0] / 1e6, left)
            left -= record.triton_compile_s
        record.other_s = left
