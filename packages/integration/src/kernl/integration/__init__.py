"""kernl.integration: ``optimize_model`` for Hugging Face Bert-family models, and the ``kernl`` command.

>>> from kernl.integration import optimize_model
>>> report = optimize_model(model)  # in place; model.eval(), on a CUDA GPU
>>> print(report)                   # which rules fired, per compiled graph
"""

import importlib

# Loaded on first use: the rules import the kernel packages, and with them triton, which reads
# TRITON_INTERPRET once, at import; the ``kernl`` command (kernl.integration.cli) sets it first.
_LAZY = {
    "DEFAULT_BUCKETS": "kernl.integration.buckets",
    "OptimizationReport": "kernl.integration.report",
    "optimize_model": "kernl.integration.optimize",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kernl.integration' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["DEFAULT_BUCKETS", "OptimizationReport", "optimize_model"]
