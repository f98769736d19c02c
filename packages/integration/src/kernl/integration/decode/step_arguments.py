"""The model arguments of the decode loop's steps: what differs between encoder-decoder and decoder-only
models, kept out of the loop.

transformers' loop grows some model arguments every step (``_update_model_kwargs_for_generation``,
:data:`~kernl.integration.hf_compat.DECODER_ONLY_GROWN_ARGUMENTS`): a decoder-only model's
``attention_mask`` gains a column of ones and its ``position_ids`` a column one past the last. A
captured chunk of steps needs its inputs at fixed shapes and addresses, so the loop holds them in a
steady form that gives each step the inputs transformers' growing ones give:

- :class:`EncoderDecoderArguments`: nothing grows (the encoder's outputs and mask, the cache);
- :class:`DecoderOnlyArguments`: the attention mask is widened to the static cache's length once, its
  new columns ones: a column past a step's own position is hidden by the causal mask (the query's
  position is the cache's device-side length), as are the zeros transformers pads a shorter mask with;
  the position ids are one column, the next step's positions (transformers' ``position_ids[..., -1:]``,
  per row: a left-padded row's positions start at its first real token), advanced by one after each step.

Both refuse a call whose last launch, running past ``max_length``, would feed a position past the model's
``max_position_embeddings`` (a table of learned positions, GPT-2's or BART's, has no row for it).
``step_arguments(model)`` picks one by ``model.config.is_encoder_decoder``.
"""

import torch

from kernl.integration.hf_compat import (
    CACHE_ARGUMENT_NAMES,
    DECODER_ONLY_GROWN_ARGUMENTS,
    DECODER_ONLY_STEADY_ARGUMENTS,
)


class _PositionLimit:
    """``position_limit``: the model's ``max_position_embeddings`` (None: no limit)."""

    def __init__(self, position_limit: int | None = None):
        self.position_limit = position_limit

    def length_refusal(self, length: int) -> str | None:
        """Why steps cannot run up to a sequence of ``length`` tokens (the call's ``max_length`` plus the
        steps a launch runs past it): the last one would feed a position past the limit; None when they
        can."""
        if self.position_limit is not None and length > self.position_limit:
            return (
                f"the steps a launch runs past max_length would feed positions past max_position_embeddings "
                f"({self.position_limit})"
            )
        return None


class EncoderDecoderArguments(_PositionLimit):
    """An encoder-decoder model's step arguments: the same tensors every step."""

    names = frozenset({"encoder_outputs", "attention_mask", "use_cache", *CACHE_ARGUMENT_NAMES})

    def refusal(self, model_kwargs: dict) -> str | None:
        """Why the loop cannot hold the arguments ``model_kwargs`` (those ``generate()`` prepared for the
        decoding method) steady; None when it can."""
        return _unknown(model_kwargs, self.names)

    def steady(self, model_kwargs: dict, room: int) -> dict:
        """The steps' arguments for ``model_kwargs`` as they are after the prefill: unchanged."""
        return model_kwargs

    def advance(self, model_kwargs: dict) -> None:
        """After a step: nothing changes."""


class DecoderOnlyArguments(_PositionLimit):
    """A decoder-only model's step arguments: a 2-D ``attention_mask`` (None without padding) widened to
    the cache, and ``position_ids`` as the next step's column (see the module docstring)."""

    names = frozenset({*DECODER_ONLY_GROWN_ARGUMENTS, *DECODER_ONLY_STEADY_ARGUMENTS, *CACHE_ARGUMENT_NAMES})

    def refusal(self, model_kwargs: dict) -> str | None:
        """Why the loop cannot hold ``model_kwargs`` steady: an argument other than :attr:`names`, a mask
        or positions that are not 2-D (a model with 3-D positions); None when it can."""
        unknown = _unknown(model_kwargs, self.names)
        if unknown is not None:
            return unknown
        for name in DECODER_ONLY_GROWN_ARGUMENTS:
            value = model_kwargs.get(name)
            if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2):
                return f"{name} is not a 2-D tensor"
        return None

    def steady(self, model_kwargs: dict, room: int) -> dict:
        """The steps' arguments for ``model_kwargs`` as they are after the prefill (the mask and positions
        one column past the prompt): the mask widened to ``room`` columns (the static cache's length) with
        ones, the positions' last column."""
        steady = dict(model_kwargs)
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            steady["attention_mask"] = torch.cat(
                (mask, mask.new_ones((mask.shape[0], room - mask.shape[1]))), 1
            )
        positions = model_kwargs.get("position_ids")
        if positions is not None:
            steady["position_ids"] = positions[:, -1:].clone()
        return steady

    def advance(self, model_kwargs: dict) -> None:
        """After a step, on the device: the next step's positions are one further."""
        positions = model_kwargs.get("position_ids")
        if positions is not None:
            positions.add_(1)


StepArguments = EncoderDecoderArguments | DecoderOnlyArguments


def step_arguments(model) -> StepArguments:
    """The step arguments of ``model``'s kind: encoder-decoder or decoder-only, with its position limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if getattr(model.config, "is_encoder_decoder", False):
        return EncoderDecoderArguments(limit)
    return DecoderOnlyArguments(limit)


def _unknown(model_kwargs: dict, names: frozenset) -> str | None:
    unknown = sorted(name for name in model_kwargs if name not in names)
    return f"model arguments {', '.join(unknown)}" if unknown else None
