"""Whisper on kernl: ``generate(input_features)`` of a ``WhisperForConditionalGeneration`` runs its encoder
and its decoder steps on kernl.

- Encoder: its input is always ``(batch, num_mel_bins, 2 * max_source_positions)`` log-mel frames (30 s
  of audio, padded by the feature extractor), so it is not bucketed: one compiled graph (the FX rules:
  attention, linear + GELU, layer norm) replayed from a CUDA graph per batch size. The two ``Conv1d`` +
  GELU of its stem run as PyTorch (no rule rewrites a convolution). Whisper's ``generate()`` calls the
  encoder module itself (``model.get_encoder()`` in transformers' generic ``generate()``, the whole
  model in language detection): that module's ``forward`` is the one replaced, so every such call runs
  on kernl.
- Decoder: ``generate()``'s steps run over a static key/value cache, compiled by kernl's backend and
  replayed from CUDA graphs, as for T5 (:func:`~kernl.integration.generation.optimize_generation`); the
  decoder prompt (start, language, task and timestamp tokens) runs at its own length.
- Language detection (a multilingual model called without ``language``) runs one decoder step without
  a cache, as PyTorch, before the generation on kernl; the report says so.
- What stays on transformers' path, with a warning and a report note (:func:`transformers_only_reason`):
  long-form audio (more frames than one 30 s window) and ``return_token_timestamps``. Their encoder calls
  still run on kernl.

The Whisper internals read here (``config.max_source_positions``, the encoder's ``conv1``/``conv2``
strides, ``generate()``'s ``input_features`` / ``return_token_timestamps`` / ``language`` arguments,
``generation_config.lang_to_id``) are those of transformers 5.17 and 5.25.
"""

import functools

import torch

from kernl.integration.generation import optimize_generation
from kernl.integration.install import install_forward
from kernl.integration.report import OptimizationReport
from kernl.integration.user_warnings import warn

FRAMES_PER_SECOND = 100  # the feature extractor's 10 ms hop
LANGUAGE_DETECTION_NOTE = (
    "generate(): language detection (a multilingual model called without language=) runs one decoder step "
    "without a cache as PyTorch; the encoder and the generation run on kernl"
)


def is_whisper(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a Whisper encoder-decoder (``WhisperModel``, ``WhisperForConditionalGeneration``)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "whisper" and getattr(config, "is_encoder_decoder", False)


def segment_frames(model: torch.nn.Module) -> int:
    """The log-mel frames of one 30 s window: the encoder's input length, ``max_source_positions`` times the
    stride of its two convolutions (3000 for every released Whisper)."""
    encoder = model.get_encoder()
    return model.config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]


def optimize_whisper(model: torch.nn.Module, cuda_graphs: bool) -> OptimizationReport:
    """Run a Whisper model's encoder on kernl, and ``generate()``'s decoder steps too when it generates
    (see the module docstring); in place. Returns the report, also kept as ``model.kernl_report``."""
    encoder = model.get_encoder()
    report = install_forward(encoder, (), cuda_graphs, part="encoder")
    report.model = f"{type(model).__name__} (encoder: {report.model})"
    model.kernl_report = report
    if report.status != "optimized":
        return report
    frames = segment_frames(model)
    report.notes.append(
        f"encoder: input features of fixed length ({model.config.num_mel_bins} x {frames} frames, "
        f"{frames / FRAMES_PER_SECOND:g} s of audio): not bucketed, one graph per batch size; its two "
        "Conv1d + GELU run as PyTorch"
    )
    if getattr(model, "generation_config", None) is None or not hasattr(model, "detect_language"):
        return report
    optimize_generation(model, report, None, cuda_graphs)
    model.generate = _whisper_generate(model, model.generate, model.kernl_original_generate, report, frames)
    return report


def transformers_only_reason(args: tuple, kwargs: dict, frames: int) -> str | None:
    """Why a ``generate(*args, **kwargs)`` call of a Whisper model runs transformers' decoder rather than
    kernl's, or None. ``frames``: the frames of one 30 s window (:func:`segment_frames`)."""
    if kwargs.get("return_token_timestamps"):
        return (
            "return_token_timestamps reads the decoder's cross-attention maps (transformers switches the "
            "model to eager attention): the decoder runs as PyTorch"
        )
    features = args[0] if args else kwargs.get("input_features")
    if isinstance(features, torch.Tensor) and features.dim() == 3 and features.shape[-1] > frames:
        return (
            f"long-form audio ({features.shape[-1]} frames, more than one {frames}-frame window): "
            "transformers' sequential loop (a decoder prompt that grows with the previous window's text, "
            "a batch that shrinks as rows finish, temperature fallback) runs its decoder as PyTorch; each "
            "window's encoder runs on kernl"
        )
    return None


def _detects_language(model, kwargs: dict) -> bool:
    """Whether Whisper's ``generate()`` will run language detection: a multilingual generation config
    (``lang_to_id``) and no language given (in the call, the config, or ``forced_decoder_ids``, which
    Whisper reads only when neither a language nor a task is given)."""
    config = kwargs.get("generation_config") or model.generation_config
    if not hasattr(config, "lang_to_id"):
        return False
    if kwargs.get("language") is not None or getattr(config, "language", None) is not None:
        return False
    if kwargs.get("task") is not None or getattr(config, "task", None) is not None:
        return True
    forced = getattr(config, "forced_decoder_ids", None) or getattr(model.config, "forced_decoder_ids", None)
    return not (forced and forced[0][0] == 1 and forced[0][1] is not None)


def _whisper_generate(model, kernl_generate, transformers_generate, report: OptimizationReport, frames: int):
    """``generate()`` that runs ``kernl_generate``, or ``transformers_generate`` (with a warning and a report
    note) for the calls :func:`transformers_only_reason` names."""

    @functools.wraps(transformers_generate)
    def generate(*args, **kwargs):
        reason = transformers_only_reason(args, kwargs, frames)
        if reason is not None:
            note = f"generate(): ran on transformers' path: {reason}"
            if note not in report.notes:
                report.notes.append(note)
            warn(f"kernl: {reason}")
            return transformers_generate(*args, **kwargs)
        if _detects_language(model, kwargs) and LANGUAGE_DETECTION_NOTE not in report.notes:
            report.notes.append(LANGUAGE_DETECTION_NOTE)
        return kernl_generate(*args, **kwargs)

    return generate
