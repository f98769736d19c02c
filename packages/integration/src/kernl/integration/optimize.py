"""``optimize_model``: install kernl in place on a Hugging Face Bert-family model (or on the encoder of an
encoder-decoder model such as T5).

The model's ``forward`` becomes: pad the sequence to a bucket length (padding is masked out), replay
the CUDA graph of the ``torch.compile``d forward for that input signature
(TorchDynamo, ``dynamic=False``, :class:`~kernl.integration.backend.KernlBackend`;
:class:`~kernl.integration.forward_graphs.ForwardGraphs`), and cut the outputs back to the caller's
length. One graph is compiled and captured per (batch, bucket), so a stream of many sequence lengths
costs a bounded number of warm-ups.
"""

import functools
import inspect
import os
import warnings

import torch

from kernl.integration.backend import KernlBackend
from kernl.integration.copies import copies_unoptimized
from kernl.integration.forward_graphs import ForwardGraphs
from kernl.integration.generation import optimize_generation
from kernl.integration.report import OptimizationReport
from kernl.integration.trees import holds_objects, map_tensors

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 384, 512)
# Per-token inputs the wrapper pads (input_ids with the pad token, the others with zeros).
_PADDED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
# 2-D ModelOutput fields with one value per token, cut back like 3-D hidden states: by field name, and by
# output class for fields whose name does not tell (ELECTRA's discriminator logits are (B, S)).
_PER_TOKEN_2D = ("start_logits", "end_logits")
_PER_TOKEN_2D_BY_OUTPUT = {"ElectraForPreTrainingOutput": ("logits",)}
# 2-D ModelOutput fields with one value per sequence (a pooler output as wide as a bucket is not cut).
_PER_SEQUENCE_2D = ("pooler_output",)
# Models whose real tokens never see padding that attention masks out (positions mix only through
# attention): padding them to a bucket leaves their outputs unchanged. Others (ConvBERT's span
# convolution, Nystromformer's value convolution mix neighbouring positions) run at the caller's length.
BUCKETED_MODEL_TYPES = frozenset(
    {
        "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "albert", "distilbert",
        "ernie", "data2vec-text", "xmod", "mpnet", "megatron-bert", "rembert", "roformer", "deberta",
        "deberta-v2", "t5", "mt5", "umt5", "bart", "mbart",
    }
)  # fmt: skip


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


def _cut_outputs(output, length: int, padded: int):
    """``output`` with the padded positions cut off, or ``None`` when that cannot be done safely.

    A 2-D output ``(B, padded)`` may hold one value per token (question answering's ``start_logits``)
    or per sequence (a pooler output or classification logits as wide as the bucket): in a ModelOutput
    the field name, or the output class, tells for the fields of :data:`_PER_TOKEN_2D`,
    :data:`_PER_TOKEN_2D_BY_OUTPUT` and :data:`_PER_SEQUENCE_2D`; for any other field as wide as the
    bucket, and in a plain tuple, nothing does, so ``None``."""
    if holds_objects(output):  # a returned key/value cache: as long as the padded input, cannot be cut
        return None
    if isinstance(output, dict):
        per_token_fields = _PER_TOKEN_2D + _PER_TOKEN_2D_BY_OUTPUT.get(type(output).__name__, ())
        cut = type(output).__new__(type(output))
        for key, item in output.items():
            flat = isinstance(item, torch.Tensor) and item.dim() == 2 and key not in _PER_SEQUENCE_2D
            if flat and key in per_token_fields:
                cut[key] = item[:, :length].contiguous()
            elif flat and item.shape[-1] == padded:
                return None
            else:
                cut[key] = map_tensors(lambda t: _cut(t, length, padded), item)
        return cut
    widths = []
    map_tensors(lambda t: widths.append(t.shape[-1] if t.dim() == 2 else None), output)
    if padded in widths:
        return None
    return map_tensors(lambda t: _cut(t, length, padded), output)


def _one_sequence_a_row(arguments: dict) -> bool:
    """Whether every tensor argument is a per-token input of one ``(B, S)`` layout (``inputs_embeds``
    ``(B, S, H)``) and no argument is an object (a cache of earlier positions): the calls bucketing pads."""
    tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
    if any(k not in _PADDED_INPUTS for k in tensors) or holds_objects(arguments):
        return False
    shapes = {
        tuple(t.shape[:2]) if k == "inputs_embeds" and t.dim() == 3 else tuple(t.shape)
        for k, t in tensors.items()
    }
    return len(shapes) == 1 and len(next(iter(shapes))) == 2


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


def _call_kind(arguments: dict) -> tuple:
    """What decides a call's output structure: the argument names, and the plain values (flags)."""
    plain = (bool, int, float, str, type(None))
    return tuple((k, v if isinstance(v, plain) else type(v).__name__) for k, v in arguments.items())


def _pad_arguments(arguments: dict, token_input: torch.Tensor, extra: int, pad_id: int) -> dict:
    """``arguments`` with every per-token input right-padded by ``extra`` positions (a mask of ones for
    the real tokens of ``token_input``, ``(B, S[, H])``, is made when there is none: the padding is
    masked out)."""
    padded = dict(arguments)
    if padded.get("attention_mask") is None:
        padded["attention_mask"] = torch.ones(
            token_input.shape[:2], dtype=torch.long, device=token_input.device
        )
    for name in _PADDED_INPUTS:
        value = padded.get(name)
        if value is None:
            continue
        fill = pad_id if name == "input_ids" else 0
        pad = (0, 0, 0, extra) if name == "inputs_embeds" else (0, extra)
        padded[name] = torch.nn.functional.pad(value, pad, value=fill)
    return padded


def _input_wants_gradients(args: tuple, kwargs: dict) -> bool:
    """Whether, under grad mode, a tensor argument requires grad (``inputs_embeds`` for attributions):
    kernl's kernels have no backward, so such a call runs the original forward."""
    values = (*args, *kwargs.values())
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _padded_call(model, compiled, original, buckets, pad_id):
    name_arguments = _argument_namer(inspect.signature(original))
    unpadded_only = set()  # kinds of call (see _call_kind) whose outputs cannot be cut back

    def call(named: dict):  # by keyword: positional and keyword calls share a capture
        with torch.no_grad():
            return compiled(**named)

    @functools.wraps(original)  # inspect.signature(model.forward) still tells the model's arguments
    def forward(*args, **kwargs):
        if model.training or _input_wants_gradients(args, kwargs):  # dropout or gradients: plain PyTorch
            return original(*args, **kwargs)
        if name_arguments is None:
            with torch.no_grad():
                return compiled(*args, **kwargs)
        arguments = name_arguments(args, kwargs)
        ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        token_input = ids if ids is not None else embeds
        if token_input is None or not _one_sequence_a_row(arguments):
            return call(arguments)  # multiple choice (B, choices, S), a 4-D mask, a cache: run as called
        length = token_input.shape[1]
        padded = _bucket(length, buckets)
        if padded == length:
            return call(arguments)
        kind = (padded, _call_kind(arguments))
        if kind not in unpadded_only:
            cut = _cut_outputs(
                call(_pad_arguments(arguments, token_input, padded - length, pad_id)), length, padded
            )
            if cut is not None:
                return cut
            unpadded_only.add(kind)  # outputs such a call cannot cut: run it as called from now on
        return call(arguments)

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
        buckets = _safe_buckets(model, buckets)
        optimize_generation(model, report, lambda length: _bucket(length, buckets), cuda_graphs)
    return report


def optimize_model(model: torch.nn.Module, *, buckets=DEFAULT_BUCKETS, cuda_graphs: bool = True):
    """Make ``model`` (a transformers Bert/RoBERTa model or head, T5, eval mode) run on kernl, in place.

    Sequence lengths are padded up to the next of ``buckets`` (with ``attention_mask`` zeros, so the
    outputs of the real tokens do not change) and the outputs are cut back. Returns the
    :class:`OptimizationReport`, also kept as ``model.kernl_report``; it fills in as graphs compile
    (one per batch size and bucket, on first use). On a CPU model (without ``TRITON_INTERPRET=1``) or a
    GPU below compute capability 8.0 the model is left as it was and the report says why; so is a module
    without a transformers config (a module of your own around a Bert: the report names the transformers
    models inside it, which can be optimized instead).
    A sentence-transformers model is accepted too: its transformer module's model is optimized. Of an
    encoder-decoder model (T5, BART) the encoder is optimized, and ``generate()`` runs its decoder steps
    on kernl over a static key/value cache.
    A model put back in training mode (``model.train()``) runs its original forward, plain PyTorch with
    dropout and gradients, until ``model.eval()``; so does a call, under grad mode, with an input that
    requires grad (``inputs_embeds`` for attributions).
    The original forward stays available as ``model.kernl_original_forward``. A model optimized
    before is left as it is (a warning says so) and its report returned.

    ``buckets``: the padded sequence lengths, positive integers; longer inputs run at their own length
    (one graph each; TorchDynamo's recompile limit, a process-wide setting, is raised to 64 for them,
    beyond which it runs the model as PyTorch). ``cuda_graphs=False`` runs the compiled forward
    without capturing it.
    Raises ``TypeError``/``ValueError`` naming the argument for a model that is not a ``torch.nn.Module``
    with parameters, a model in training mode, or bad ``buckets``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    inner = model._first_module().auto_model if hasattr(model, "_first_module") else None
    if inner is not None:
        return optimize_model(inner, buckets=buckets, cuda_graphs=cuda_graphs)
    if model.training:
        raise ValueError("optimize_model is for inference: call model.eval() first")
    if next(model.parameters(), None) is None:
        raise ValueError(f"model ({type(model).__name__}) has no parameters: nothing for kernl to run")
    buckets = _usable_buckets(model, _checked_buckets(buckets))
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    part = model.get_encoder() if encoder_decoder and hasattr(model, "get_encoder") else model
    if hasattr(part, "kernl_original_forward"):
        warnings.warn(
            "kernl: optimize_model was already applied to this model; it stays as it is", stacklevel=2
        )
        return model.kernl_report
    if part is not model:
        return _optimize_encoder_decoder(model, buckets, cuda_graphs)
    return _optimize_forward(model, buckets, cuda_graphs)


def _usable_buckets(model: torch.nn.Module, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets no longer than the longest input the model's position table takes (a prompt padded
    past it would index out of the table): ``config.max_position_embeddings``, less the offset of
    tables indexed from ``padding_idx + 1`` (RoBERTa). All of them without such a table (T5)."""
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(longest, int):
        return buckets
    for name, module in model.named_modules():  # the position table (not word embeddings of that size)
        if "position" in name and isinstance(module, torch.nn.Embedding) and module.num_embeddings == longest:
            longest -= 0 if module.padding_idx is None else module.padding_idx + 1
            break
    return tuple(b for b in buckets if b <= longest)


def _model_type(model: torch.nn.Module) -> str | None:
    """``model.config.model_type``; None for a module without a transformers config (a user's own
    module around a transformers model)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _unknown_model_reason(model: torch.nn.Module) -> str | None:
    """Why a module without a transformers config is left alone (None for a transformers model): nothing
    tells what its own forward does between the transformers calls (a branch on a tensor's value would
    be replayed as captured); the transformers models inside it can be optimized instead."""
    if _model_type(model) is not None:
        return None
    inner = [name for name, module in model.named_modules() if name and _model_type(module) is not None]
    outermost = [name for name in inner if not any(name.startswith(other + ".") for other in inner)]
    hint = (
        f"call optimize_model on the transformers model inside it ({', '.join(f'model.{n}' for n in outermost)})"
        if outermost
        else "it holds no transformers model"
    )
    return f"{type(model).__name__} is not a transformers model (no config.model_type): {hint}"


def _safe_buckets(model: torch.nn.Module, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """``buckets``, or none for a model type not in :data:`BUCKETED_MODEL_TYPES` (or no model type)."""
    return buckets if _model_type(model) in BUCKETED_MODEL_TYPES else ()


def _checked_buckets(buckets) -> tuple[int, ...]:
    """``buckets`` sorted, after checking they are positive integers."""
    try:
        values = tuple(buckets)
    except TypeError:
        raise TypeError(f"buckets must be a sequence of positive ints, got {buckets!r}") from None
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in values):
        raise ValueError(f"buckets must be a non-empty sequence of positive ints, got {buckets!r}")
    return tuple(sorted(values))


def _optimize_forward(
    model: torch.nn.Module, buckets, cuda_graphs: bool, part: str = ""
) -> OptimizationReport:
    """Replace ``model.forward`` by the bucketed, compiled, CUDA-graphed call (see the module docstring)."""
    report = OptimizationReport(model=type(model).__name__)
    model.kernl_report = report
    device = next(model.parameters()).device
    reason = _unsupported_reason(device) or _unknown_model_reason(model)
    if reason is not None:
        report.status = "not optimized"
        report.notes.append(reason + "; the model runs unchanged")
        warnings.warn(f"kernl: {reason}; the model runs unchanged", stacklevel=2)
        return report
    if device.type == "cpu":
        report.notes.append("Triton interpreter on CPU: kernels run for debugging, not for speed")
    _raise_recompile_limit(64)
    static = [*model.parameters(), *model.buffers()]
    backend = KernlBackend(report, static, part)
    original = model.forward
    compiled = torch.compile(original, backend=backend, dynamic=False)
    if device.type == "cuda" and cuda_graphs:
        compiled = model.kernl_cuda_graphs = ForwardGraphs(compiled, model, report)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    safe = _safe_buckets(model, buckets)
    if buckets and not safe:
        report.notes.append(
            f"model type {model.config.model_type!r} is not known to keep padding out of its real tokens' "
            "outputs: no bucketing, each sequence length compiles and captures its own graph"
        )
    model.forward = _padded_call(model, compiled, original, safe, pad_id)
    model.kernl_original_forward = original
    copies_unoptimized(model)
    return report
