"""Compiling a tuning's candidates side by side before they are timed.

Timing a candidate first compiles it, and compiling (Triton's passes, then ``ptxas``) is most of a
cold tuning's cost. :func:`precompiled` runs each candidate's launch (of one problem, or of every
problem a warm-up run met: :func:`kernl.matmul.tuning.deferred_tuning`) with the Triton launches turned
into ``warmup`` calls under Triton's ``AsyncCompileMode``, so the compilations run in a thread pool
while nothing executes on the GPU; the timing that follows finds every kernel compiled. The choice is
the same as with serial compilation: only when the compiling happens changes.
"""

import concurrent.futures
import contextlib
import contextvars
import os
from collections.abc import Callable

try:
    from triton.runtime._async_compile import AsyncCompileMode, active_mode
except ImportError:  # a Triton release without it compiles each candidate when first timed
    AsyncCompileMode = active_mode = None

_compile_only = contextvars.ContextVar("kernl_matmul_compile_only", default=False)
MAX_THREADS = 16


def launch_kernel(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or only its compilation inside :func:`precompiled`."""
    if _compile_only.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def _compiling_only():
    token = _compile_only.set(True)
    try:
        yield
    finally:
        _compile_only.reset(token)


def precompiled(calls: list[Callable[[], object]]) -> None:
    """Compile the kernels of every call in ``calls`` at once, in a thread pool; returns when all are
    compiled. Each call launches one candidate and takes no arguments (``functools.partial(launch,
    config)``); the candidates of several problems may be mixed, and then share the pool. A call that
    fails to compile is left for the timing to skip."""
    if AsyncCompileMode is None or len(calls) < 2:
        return
    if active_mode.get() is not None:  # the caller compiles asynchronously already: one mode at a time
        return
    threads = min(MAX_THREADS, len(calls), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        with AsyncCompileMode(pool, ignore_errors=True), _compiling_only():
            for call in calls:
                with contextlib.suppress(Exception):  # the timing reports it (or skips the config)
                    call()
