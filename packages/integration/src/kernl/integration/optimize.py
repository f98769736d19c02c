"""``optimize_model``: install kernl in place on a Hugging Face Bert-family model (or on the encoder of an
encoder-decoder model such as T5); this module routes a model to the part that gets optimized.

The model's ``forward`` becomes: pad the sequence to a bucket length (padding is masked out), replay
the CUDA graph of the ``torch.compile``d forward for that input signature, and cut the outputs back
to the caller's length (:mod:`kernl.integration.install`). One graph is compiled and captured per
(batch, bucket), so a stream of many sequence lengths costs a bounded number of warm-ups.
"""

import torch

from kernl.integration.buckets import DEFAULT_BUCKETS, bucket, safe_buckets, usable_buckets
from kernl.integration.decoder_only import is_decoder_only, optimize_decoder_only
from kernl.integration.generation import optimize_generation
from kernl.integration.install import install_forward
from kernl.integration.report import OptimizationReport
from kernl.integration.user_warnings import warn
from kernl.integration.validation import check_model, check_module, checked_buckets
from kernl.integration.whisper import is_whisper, optimize_whisper


def _sentence_transformer_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model inside a sentence-transformers model, else None."""
    return model._first_module().auto_model if hasattr(model, "_first_module") else None


def _optimize_encoder_decoder(model: torch.nn.Module, buckets, cuda_graphs: bool) -> OptimizationReport:
    """Encoder-decoder models (T5, BART): the encoder stack is optimized in place, so ``forward`` and
    ``generate()`` (which calls the encoder directly) run it on kernl; ``generate()``'s decoder steps run on
    kernl too, over a static cache (:mod:`kernl.integration.generation`). A direct ``forward`` call's
    decoder stays PyTorch."""
    encoder = model.get_encoder()
    report = install_forward(encoder, buckets, cuda_graphs, part="encoder")
    report.model = f"{type(model).__name__} (encoder: {report.model})"
    model.kernl_report = report
    if report.status == "optimized" and getattr(model, "generation_config", None) is not None:
        buckets = safe_buckets(model, buckets)
        optimize_generation(model, report, lambda length: bucket(length, buckets), cuda_graphs)
    return report


def optimize_model(
    model: torch.nn.Module, *, buckets=DEFAULT_BUCKETS, cuda_graphs: bool = True, packed: bool = True
):
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
    on kernl over a static key/value cache; Whisper's too, its encoder taking its fixed-length log-mel
    input unbucketed (:mod:`kernl.integration.whisper`).
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
    check_module(model)
    inner = _sentence_transformer_model(model)
    if inner is not None:
        return optimize_model(inner, buckets=buckets, cuda_graphs=cuda_graphs, packed=packed)
    check_model(model)
    asked = checked_buckets(buckets)
    buckets = usable_buckets(model, asked)
    # the caller's own choice, for a model that is bucketed (a decoder-only model is not): say so
    if len(buckets) < len(asked) and asked != DEFAULT_BUCKETS and not is_decoder_only(model):
        warn(
            f"kernl: buckets {sorted(set(asked) - set(buckets))} are longer than the inputs this model "
            f"takes (config.max_position_embeddings): left out, the buckets are {buckets}",
        )
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    part = model.get_encoder() if encoder_decoder and hasattr(model, "get_encoder") else model
    if hasattr(part, "kernl_original_forward"):
        warn(
            "kernl: optimize_model was already applied to this model; it stays as it is",
        )
        return model.kernl_report
    if part is not model and is_whisper(model):
        return optimize_whisper(model, cuda_graphs)
    if part is not model:
        return _optimize_encoder_decoder(model, buckets, cuda_graphs)
    if is_decoder_only(model):
        return optimize_decoder_only(model, cuda_graphs)
    return install_forward(model, buckets, cuda_graphs, packed=packed)
