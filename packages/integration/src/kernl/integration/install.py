"""Install kernl on one module's forward, in place: ``torch.compile`` with kernl's backend
(TorchDynamo, ``dynamic=False``, :class:`~kernl.integration.backend.KernlBackend`), CUDA graphs per
input signature (:class:`~kernl.integration.forward_graphs.ForwardGraphs`), and the bucketed forward
around them (:mod:`kernl.integration.bucketed_forward`).
"""

import functools

import torch

from kernl.integration import token_buckets
from kernl.integration.backend import KernlBackend
from kernl.integration.bucketed_forward import bucketed_forward
from kernl.integration.buckets import position_table_length, safe_buckets
from kernl.integration.compile_state import limit_guarded, own_code
from kernl.integration.copies import copies_unoptimized
from kernl.integration.forward_graphs import ForwardGraphs
from kernl.integration.overflow_branches import make_overflow_clamps_branchless
from kernl.integration.packing import packed_forward
from kernl.integration.position_tables import precompute_position_tables
from kernl.integration.report import OptimizationReport
from kernl.integration.speed_check import speed_check_for
from kernl.integration.user_warnings import warn
from kernl.integration.validation import unknown_model_reason, unsupported_reason


def raise_recompile_limit(graphs: int) -> None:
    """Let TorchDynamo compile at least ``graphs`` graphs of one function (one per bucket and batch size;
    the setting is process-wide and was renamed in torch 2.6)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs))
            return


def start_report(model: torch.nn.Module, device: torch.device, reason: str | None) -> OptimizationReport:
    """A new report for ``model`` on ``device``, kept as ``model.kernl_report``. With a ``reason`` (why
    kernl cannot run on it) the report says the model runs unchanged and kernl warns."""
    report = OptimizationReport(model=type(model).__name__)
    model.kernl_report = report
    if reason is not None:
        report.status = "not optimized"
        report.notes.append(reason + "; the model runs unchanged")
        warn(f"kernl: {reason}; the model runs unchanged")
    elif device.type == "cpu":
        report.notes.append("Triton interpreter on CPU: kernels run for debugging, not for speed")
    return report


def install_forward(
    model: torch.nn.Module,
    buckets,
    cuda_graphs: bool,
    part: str = "",
    packed: bool = False,
    check_speed: bool = True,
) -> OptimizationReport:
    """Replace ``model.forward`` by the bucketed, compiled, CUDA-graphed call (see the module docstring);
    ``part`` names the model part in the report; ``packed``: calls run packed where they can, around
    the bucketed call (:mod:`kernl.integration.packing`); ``check_speed``: each new signature's first
    call is timed against the original forward and the faster kept (:mod:`kernl.integration.speed_check`).
    Returns the report, also kept as ``model.kernl_report``."""
    device = next(model.parameters()).device
    reason = unsupported_reason(device) or unknown_model_reason(model)
    report = start_report(model, device, reason)
    if reason is not None:
        return report
    raise_recompile_limit(64)
    report.notes += precompute_position_tables(model)  # before the weights' addresses are taken
    report.notes += make_overflow_clamps_branchless(model)  # BART's fp16 clamp: no host read to capture
    static = [*model.parameters(), *model.buffers()]
    backend = KernlBackend(report, static, part)
    original = model.forward
    compiled = torch.compile(own_code(original), backend=backend, dynamic=False)
    compiled = limit_guarded(compiled, original, report, part or "model")
    if device.type == "cuda" and cuda_graphs:
        compiled = model.kernl_cuda_graphs = ForwardGraphs(compiled, model, report)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    safe = safe_buckets(model, buckets)
    if buckets and not safe:
        report.notes.append(
            f"model type {model.config.model_type!r} is not known to keep padding out of its real tokens' "
            "outputs: no bucketing, each sequence length compiles and captures its own graph"
        )
    longest = position_table_length(model)
    speed = speed_check_for(report, device, check_speed)
    model.forward = bucketed_forward(model, compiled, original, safe, pad_id, longest, speed)
    model.kernl_original_forward = original
    if packed:  # packed execution hook: see kernl.integration.packing
        graphs = compiled if isinstance(compiled, ForwardGraphs) else None
        buckets = token_buckets.DEFAULT_TOKEN_BUCKETS
        packed_call = packed_forward(
            model, model.forward, report, static, part, graphs, buckets, longest, safe, speed
        )
        if packed_call is not None:
            model.forward = functools.wraps(original)(packed_call)
    copies_unoptimized(model)
    return report
