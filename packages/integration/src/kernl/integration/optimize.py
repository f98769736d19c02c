"""``optimize_model``: install kernl in place on a Hugging Face Bert-family model (or on the encoder of an
encoder-decoder model such as T5).

The model's ``forward`` becomes: pad the sequence to a bucket length (padding is masked out), replay
the CUDA graph of the ``torch.compile``d forward for that input signature
(TorchDynamo, ``dynamic=False``, :class:`~kernl.integration.backend.KernlBackend`;
:class:`~kernl.integration.cuda_graphs.ForwardGraphs`), and cut the outputs back to the caller's
length. One graph is compiled and captured per (batch, bucket), so a stream of many sequence lengths
costs a bounded number of warm-ups.
"""

import inspect
import os
import warnings

import torch

from kernl.integration.backend import KernlBackend
from kernl.integration.cuda_graphs import ForwardGraphs, map_tensors
from kernl.integration.generation import optimize_generation
from kernl.integration.report import OptimizationReport

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 384, 512)
# Per-token inputs the wrapper pads: name -> value of the padding.
_PADDED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def _unsupported_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"GPU compute capability {major}.{minor} < 8.0: kernl's kernels need Ampere or newer"
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"model is on {device.type}, not a CUDA GPU: kernl needs a GPU of compute capability >= 8.0 "
        "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU for debugging)"
    )


def _bucket(length: int, buckets) -> int:
    return next((b for b in buckets if b >= length), length)


def _cut(t: torch.Tensor, length: int, padded: int) -> torch.Tensor:
    """Cut padded positions off a per-token output: dim 1 of a 3-D tensor, the last two of a 4-D map."""
    if t.dim() == 3 and t.shape[1] == padded:
        return t[:, :length].contiguous()
    if t.dim() == 4 and t.shape[-1] == padded and t.shape[-2] == padded:
        return t[..., :length, :length].contiguous()
    return t


def _argument_namer(signature: inspect.Signature):
    """``name(args, kwargs) -> {name: value}``, as ``signature.bind`` would name them, in ~1 us instead of
    ~15: positional arguments take the names of the leading parameters. ``None`` for a signature with
    positional-only parameters or ``*args`` (no Hugging Face model has them): such a forward is called
    as it was, without bucketing."""
    kinds = [p.kind for p in signature.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.POSITIONAL_ONLY in kinds:
        return None
    leading = [
        p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]

    def name(args: tuple, kwargs: dict) -> dict:
        if not args:
            return dict(kwargs)
        if len(args) > len(leading):
            signature.bind(*args, **kwargs)  # raises the TypeError a plain call would
        arguments = dict(zip(leading, args, strict=False))
        for key, value in kwargs.items():
            if key in arguments:
                raise TypeError(f"forward() got multiple values for argument '{key}'")
            arguments[key] = value
        return arguments

    return name


def _padded_call(compiled, signature, buckets, pad_id):
    name_arguments = _argument_namer(signature)

    def forward(*args, **kwargs):
        if name_arguments is None:
            with torch.no_grad():
                return compiled(*args, **kwargs)
        arguments = name_arguments(args, kwargs)

        def call():  # by keyword, with the (padded) arguments: positional and keyword calls share a capture
            with torch.no_grad():
                return compiled(**arguments)

        tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
        token_input = arguments.get("input_ids", arguments.get("inputs_embeds"))
        if token_input is None or any(k not in _PADDED_INPUTS for k in tensors) or token_input.dim() < 2:
            return call()
        batch, length = token_input.shape[:2]
        padded = _bucket(length, buckets)
        if padded != length:
            extra = padded - length
            if arguments.get("attention_mask") is None:
                arguments["attention_mask"] = torch.ones(
                    batch, length, dtype=torch.long, device=token_input.device
                )
            for name in _PADDED_INPUTS:
                value = arguments.get(name)
                if value is None:
                    continue
                fill = pad_id if name == "input_ids" else 0
                pad = (0, 0, 0, extra) if name == "inputs_embeds" else (0, extra)
                arguments[name] = torch.nn.functional.pad(value, pad, value=fill)
        output = call()
        if padded == length:
            return output
        return map_tensors(lambda t: _cut(t, length, padded), output)

    return forward


def _raise_recompile_limit(graphs: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs))
            return


def _optimize_encoder_decoder(model: torch.nn.Module, buckets, cuda_graphs: bool) -> OptimizationReport:
    """Encoder-decoder models (T5, BART): the encoder stack is optimized in place, so ``forward`` and
    ``generate()`` (which calls the encoder directly) run it on kernl; ``generate()``'s decoder steps run on
    kernl too, over a static cache (:mod:`kernl.integration.generation`). A direct ``forward`` call's
    decoder stays PyTorch."""
    encoder = model.get_encoder()
    report = _optimize_forward(encoder, buckets, cuda_graphs, part="encoder")
    report.model = f"{type(model).__name__} (encoder: {report.model})"
    model.kernl_report = report
    if report.status == "optimized" and getattr(model, "generation_config", None) is not None:
        ordered = tuple(sorted(buckets))
        optimize_generation(model, report, lambda length: _bucket(length, ordered), cuda_graphs)
    return report


def optimize_model(model: torch.nn.Module, *, buckets=DEFAULT_BUCKETS, cuda_graphs: bool = True):
    """Make ``model`` (a transformers Bert/RoBERTa model or head, T5, eval mode) run on kernl, in place.

    Sequence lengths are padded up to the next of ``buckets`` (with ``attention_mask`` zeros, so the
    outputs of the real tokens do not change) and the outputs are cut back. Returns the
    :class:`OptimizationReport`, also kept as ``model.kernl_report``; it fills in as graphs compile
    (one per batch size and bucket, on first use). On a CPU model (without ``TRITON_INTERPRET=1``) or a
    GPU below compute capability 8.0 the model is left as it was and the report says why.
    A sentence-transformers model is accepted too: its transformer module's model is optimized. Of an
    encoder-decoder model (T5, BART) the encoder is optimized, and ``generate()`` runs its decoder steps
    on kernl over a static key/value cache.
    The original forward stays available as ``model.kernl_original_forward``.
    """
    inner = model._first_module().auto_model if hasattr(model, "_first_module") else None
    if inner is not None:
        return optimize_model(inner, buckets=buckets, cuda_graphs=cuda_graphs)
    if model.training:
        raise ValueError("optimize_model is for inference: call model.eval() first")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return _optimize_encoder_decoder(model, buckets, cuda_graphs)
    return _optimize_forward(model, buckets, cuda_graphs)


def _optimize_forward(
    model: torch.nn.Module, buckets, cuda_graphs: bool, part: str = ""
) -> OptimizationReport:
    """Replace ``model.forward`` by the bucketed, compiled, CUDA-graphed call (see the module docstring)."""
    report = OptimizationReport(model=type(model).__name__)
    model.kernl_report = report
    device = next(model.parameters()).device
    reason = _unsupported_reason(device)
    if reason is not None:
        report.status = "not optimized"
        report.notes.append(reason + "; the model runs unchanged")
        warnings.warn(f"kernl: {reason}; the model runs unchanged", stacklevel=2)
        return report
    if device.type == "cpu":
        report.notes.append("Triton interpreter on CPU: kernels run for debugging, not for speed")
    buckets = tuple(sorted(buckets))
    _raise_recompile_limit(64)
    static = [*model.parameters(), *model.buffers()]
    backend = KernlBackend(report, static, part)
    original = model.forward
    compiled = torch.compile(original, backend=backend, dynamic=False)
    if device.type == "cuda" and cuda_graphs:
        compiled = model.kernl_cuda_graphs = ForwardGraphs(compiled, model, report)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    model.forward = _padded_call(compiled, inspect.signature(original), buckets, pad_id)
    model.kernl_original_forward = original
    return report
