"""kernl.integration: ``optimize_model`` for Hugging Face Bert-family models, and the ``kernl`` command.

>>> from kernl.integration import optimize_model
>>> report = optimize_model(model)  # in place; model.eval(), on a CUDA GPU
>>> print(report)                   # which rules fired, per compiled graph
"""

from kernl.integration.optimize import DEFAULT_BUCKETS, optimize_model
from kernl.integration.report import OptimizationReport

__all__ = ["DEFAULT_BUCKETS", "OptimizationReport", "optimize_model"]
