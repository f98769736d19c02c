"""Per-model compilation: each compiled forward keeps its own TorchDynamo state, and a limit reached is said.

TorchDynamo keeps its compiled graphs, and counts recompilations against ``recompile_limit``, per code
object. Every transformers model's ``forward`` runs through the same decorator
(``transformers.utils.generic``'s ``wrapper``), so without :func:`own_code` the graphs of every model
in the process would count toward one limit; once reached, TorchDynamo runs new signatures eagerly,
silently. :func:`limit_guarded` turns that silence into a warning, a report line and a fallback.
"""

import contextlib
import types

import torch

from kernl.integration.report import OptimizationReport
from kernl.integration.user_warnings import warn


class RecompileLimitReached(Exception):
    """TorchDynamo's recompile limit for this compiled forward is reached: the call is not compiled."""


def own_code(method):
    """``method`` (a bound method) rebound to a copy of its function with a code object of its own, so
    TorchDynamo's cache and recompile count for it belong to this model alone. Anything but a bound
    Python method (a forward replaced by a callable object) is returned as it is."""
    if not isinstance(method, types.MethodType) or not isinstance(method.__func__, types.FunctionType):
        return method
    function = method.__func__
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__ = function.__qualname__
    return copy.__get__(method.__self__)


# The switch and its exception were renamed with "cache_size_limit" -> "recompile_limit" (torch 2.6).
_SWITCH = next(
    (
        n
        for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
        if hasattr(torch._dynamo.config, n)
    ),
    None,
)
_LIMIT_ERRORS = tuple(
    getattr(torch._dynamo.exc, n)
    for n in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    if hasattr(torch._dynamo.exc, n)
)


def _limit_patch():
    """A config patch making TorchDynamo raise at its recompile limit (where the torch release has it)."""
    return contextlib.nullcontext() if _SWITCH is None else torch._dynamo.config.patch(**{_SWITCH: True})


def limit_guarded(compiled, on_limit, report: OptimizationReport, part: str):
    """``compiled(*args, **kwargs)``, or ``on_limit(*args, **kwargs)`` when TorchDynamo's recompile limit
    keeps the call from compiling; the first time, a warning and a report line say that new input
    signatures of ``part`` run unoptimized."""
    said = []

    def call(*args, **kwargs):
        try:
            with _limit_patch():
                return compiled(*args, **kwargs)
        except _LIMIT_ERRORS:
            if not said:
                said.append(True)
                config = torch._dynamo.config
                limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", None))
                message = (
                    f"TorchDynamo's recompile limit ({limit}) reached for the {part} forward: new input "
                    "signatures run unoptimized (PyTorch); signatures compiled before stay on kernl"
                )
                report.notes.append(message)
                warn(f"kernl: {message}")
        return on_limit(*args, **kwargs)

    return call
