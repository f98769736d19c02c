"""Which ``generate()`` calls kernl's decode loop runs, and why a call runs transformers' loop instead.

Two checks, each giving a reason string when the call is outside the loop's set:

- :func:`call_refusal`, on the call's arguments before ``generate()`` runs: arguments that change what
  transformers does around the loop (a streamer, assisted generation, custom processors or stopping
  criteria, returned attentions, hidden states or scores, a cache of the caller's, beam sampling);
- :func:`loop_settings`, inside ``generate()`` on what transformers prepared for the loop: every logits
  processor must have a kernl counterpart (:mod:`kernl.integration.decode.processors`), the stopping
  criteria must be the maximum length and end-of-sequence ones, and the loop must be able to hold the
  model arguments steady between steps (:mod:`kernl.integration.decode.step_arguments`).
"""

from collections.abc import Callable
from dataclasses import dataclass

from transformers.generation import GenerationMixin
from transformers.generation import stopping_criteria as hf_stopping

from kernl.integration.decode.beam_search import BeamSettings
from kernl.integration.decode.processors import Processor, from_transformers
from kernl.integration.decode.step_arguments import StepArguments
from kernl.integration.hf_compat import CACHE_ARGUMENT_NAMES

# generate() arguments that run transformers' loop whenever they are given (not None, not empty).
_ARGUMENT_REASONS = {
    "custom_generate": "custom_generate given",
    "logits_processor": "custom logits_processor given",
    "stopping_criteria": "custom stopping_criteria given",
    "streamer": "streamer given",
    "assistant_model": "assisted generation",
    "prefix_allowed_tokens_fn": "prefix_allowed_tokens_fn given",
    "negative_prompt_ids": "negative_prompt_ids given",
    "synced_gpus": "synced_gpus",
    "decoder_attention_mask": "decoder_attention_mask given (it grows every step)",
}
# Generation settings (the call's, else the generation config's) that run transformers' loop when set.
_SETTING_REASONS = {
    "prompt_lookup_num_tokens": "assisted generation",
    "assistant_early_exit": "assisted generation",
    "output_attentions": "output_attentions requested",
    "output_hidden_states": "output_hidden_states requested",
    "output_scores": "output_scores requested",
    "output_logits": "output_logits requested",
}


def call_kind(setting: Callable[[str], object]) -> str:
    """``"greedy"``, ``"sampling"``, ``"beam search"`` or ``"beam sampling"``: what the report names a call
    by. ``setting(name)``: the call's value, else the generation config's."""
    beams = (setting("num_beams") or 1) > 1
    sampled = bool(setting("do_sample"))
    return ("beam " if beams else "") + ("sampling" if sampled else "search" if beams else "greedy")


def call_refusal(model, kwargs: dict, setting: Callable[[str], object]) -> str | None:
    """Why a ``generate()`` call (its keyword arguments ``kwargs``; ``setting(name)``: the call's value,
    else the generation config's) runs transformers' loop; None when kernl's loop takes it."""
    if getattr(type(model), "generate", None) is not GenerationMixin.generate:
        return (
            f"{type(model).__name__} has a generate() of its own (kernl's loop runs transformers' generate())"
        )
    for name, reason in _ARGUMENT_REASONS.items():
        value = kwargs.get(name)
        if value is not None and value is not False and not (hasattr(value, "__len__") and len(value) == 0):
            return reason
    for name, reason in _SETTING_REASONS.items():
        if setting(name):
            return reason
    if (setting("num_beam_groups") or 1) > 1 or any(
        setting(name) is not None
        for name in ("penalty_alpha", "dola_layers", "constraints", "force_words_ids")
    ):
        return "a generation mode transformers moved to the Hub (group beams, contrastive, DoLa, constraints)"
    if (setting("num_beams") or 1) > 1:
        if setting("do_sample"):
            return "beam sampling is not on kernl's loop"
    if setting("use_cache") is False:
        return "use_cache=False"
    given_cache = any(kwargs.get(name) is not None for name in CACHE_ARGUMENT_NAMES)
    if given_cache or setting("cache_implementation") != "static":
        return "the call names its own cache"
    return None


@dataclass(frozen=True)
class LoopSettings:
    """What a captured chunk of steps bakes in (hashable: part of the capture's key).

    ``processors``: in transformers' order; ``do_sample``: sampled, else greedy; ``eos_token_ids``: empty
    when the call stops only at ``max_length`` (rows are then never padded); ``pad_token_id``: what a
    finished row emits; ``prompt_length``: the decoder prompt's length (an encoder-decoder's start
    token: 1; a decoder-only model's prompt, left padding included); ``beams``: beam search's settings,
    None for greedy and sampling.
    """

    processors: tuple[Processor, ...]
    do_sample: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    prompt_length: int = 1
    beams: BeamSettings | None = None


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def loop_settings(
    generation_config,
    logits_processor,
    stopping_criteria,
    model_kwargs: dict,
    prompt_length: int,
    arguments: StepArguments,
) -> LoopSettings | str:
    """The loop's settings for what ``generate()`` prepared (its generation config, logits processors,
    stopping criteria, model arguments and the decoder prompt's length), or why the loop cannot run it.
    ``arguments``: the model kind's step arguments, which say whether the model arguments can be held
    steady."""
    mode = getattr(generation_config.get_generation_mode(), "value", None)
    if mode not in ("greedy_search", "sample", "beam_search"):
        return f"generation mode {mode} is not on kernl's loop"
    unsteady = arguments.refusal(model_kwargs)
    if unsteady is not None:
        return unsteady
    eos = _token_ids(generation_config.eos_token_id)
    for criterion in stopping_criteria:
        if type(criterion) not in (hf_stopping.MaxLengthCriteria, hf_stopping.EosTokenCriteria):
            return f"stopping criterion {type(criterion).__name__}"
    if not any(isinstance(c, hf_stopping.EosTokenCriteria) for c in stopping_criteria):
        eos = ()
    processors = []
    for processor in logits_processor:
        translated = from_transformers(processor, eos)
        if isinstance(translated, str):
            return translated
        processors.append(translated)
    pad = generation_config.pad_token_id
    beams = None
    if mode == "beam_search":
        try:
            beams = BeamSettings(
                num_beams=generation_config.num_beams,
                length_penalty=generation_config.length_penalty,
                early_stopping=generation_config.early_stopping or False,  # None behaves as False
                num_return_sequences=generation_config.num_return_sequences,
                eos_token_ids=eos,
                pad_token_id=pad,
                max_new_tokens=generation_config.max_length - prompt_length,
            )
        except (TypeError, ValueError) as refused:
            return f"beam search settings: {refused}"
    if pad is None and eos:  # transformers pads finished rows with the first end-of-sequence token
        pad = eos[0]
    return LoopSettings(tuple(processors), bool(generation_config.do_sample), eos, pad, prompt_length, beams)
