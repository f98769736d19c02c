"""Logits processing on the device, capturable in a CUDA graph: the transformers logits processors that
kernl's decode loop runs.

Each processor is a frozen dataclass of plain values (hashable: it is part of a capture's key) whose
``processor(tokens, scores)`` gives the scores transformers' processor of the same name gives for the same
tokens. The step-dependent conditions transformers evaluates on the host (``input_ids.shape[-1] <
min_length``) are evaluated on the device from :class:`Tokens`, so one captured graph serves every step.
:func:`from_transformers` translates a transformers processor into its kernl counterpart.
"""

import math
from dataclasses import dataclass

import torch
from transformers.generation import logits_process as hf

NEG_INF = -math.inf


@dataclass(frozen=True)
class Tokens:
    """The tokens so far, in buffers that live at fixed addresses.

    ``ids``: int64 ``(batch, width)``, the first ``length`` columns real (transformers' ``input_ids``);
    ``length``: int64 ``(1,)``; ``max_length``: int64 ``(1,)``, the call's ``max_length``; ``starts``:
    int64 ``(batch,)``, the column each row's repetition penalty counts from when transformers gives it per
    row (a decoder-only model's left padding; :func:`row_starts`), else zeros.
    """

    ids: torch.Tensor
    length: torch.Tensor
    max_length: torch.Tensor
    starts: torch.Tensor

    def positions(self) -> torch.Tensor:
        """int64 ``(width,)``: 0, 1, ... width - 1."""
        return torch.arange(self.ids.shape[1], device=self.ids.device)


def _vocab(scores: torch.Tensor) -> torch.Tensor:
    return torch.arange(scores.shape[-1], device=scores.device)


def _token_mask(scores: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """bool ``(vocab,)``: True at ``token_ids``."""
    vocab = _vocab(scores)
    mask = torch.zeros_like(vocab, dtype=torch.bool)
    for token in token_ids:
        mask = mask | (vocab == token)
    return mask


def _only(scores: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """fp32 ``(vocab,)``: 0 at ``token_ids``, -inf elsewhere (a forced token's scores)."""
    return torch.where(_token_mask(scores, token_ids), 0.0, NEG_INF).to(scores.dtype)


@dataclass(frozen=True)
class RepetitionPenalty:
    """``RepetitionPenaltyLogitsProcessor``: the scores of tokens already in the sequence (from
    ``prompt_ignore_length`` on, or with ``per_row`` from each row's ``tokens.starts`` on) divided by
    ``penalty`` when positive, multiplied when negative."""

    penalty: float
    prompt_ignore_length: int = 0
    per_row: bool = False

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        vocab_size = scores.shape[-1]
        positions = tokens.positions()
        first = tokens.starts[:, None] if self.per_row else self.prompt_ignore_length
        counted = (positions < tokens.length) & (positions >= first)
        # ids past the vocab (and positions not counted) go to a spare column, dropped afterwards
        ids = torch.where(counted, tokens.ids.clamp(max=vocab_size), vocab_size)
        seen = torch.zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids, True)
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen[:, :vocab_size], penalised, scores)


@dataclass(frozen=True)
class NoRepeatNGram:
    """``NoRepeatNGramLogitsProcessor``: a token that would complete an n-gram already in the sequence
    gets -inf."""

    ngram_size: int

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        size, vocab_size = self.ngram_size, scores.shape[-1]
        if tokens.ids.shape[1] < size:
            return scores
        # the last size - 1 tokens, matched against the start of every window of size tokens that ends
        # before the last token: a match bans the window's last token
        prefix_at = (tokens.length - (size - 1) + torch.arange(size - 1, device=scores.device)).clamp(min=0)
        prefix = tokens.ids.index_select(1, prefix_at)
        windows = tokens.ids.unfold(1, size, 1)
        starts = torch.arange(windows.shape[1], device=scores.device)
        inside = starts <= tokens.length - size
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1) & inside
        banned = torch.zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
        return scores.masked_fill(banned[:, :vocab_size], NEG_INF)


@dataclass(frozen=True)
class MinLength:
    """``MinLengthLogitsProcessor``: end-of-sequence tokens get -inf while the sequence (prompt
    included) is shorter than ``min_length``."""

    min_length: int
    eos_token_ids: tuple[int, ...]

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        banned = _token_mask(scores, self.eos_token_ids) & (tokens.length < self.min_length)
        return torch.where(banned, NEG_INF, scores)


@dataclass(frozen=True)
class MinNewTokensLength:
    """``MinNewTokensLengthLogitsProcessor``: end-of-sequence tokens get -inf while fewer than
    ``min_new_tokens`` tokens follow the first ``prompt_length_to_skip``."""

    prompt_length_to_skip: int
    min_new_tokens: int
    eos_token_ids: tuple[int, ...]

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        short = tokens.length - self.prompt_length_to_skip < self.min_new_tokens
        return torch.where(_token_mask(scores, self.eos_token_ids) & short, NEG_INF, scores)


@dataclass(frozen=True)
class ForcedBOSToken:
    """``ForcedBOSTokenLogitsProcessor``: the first generated token (sequence length 1) is ``bos_token_id``."""

    bos_token_id: int

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        return torch.where(tokens.length == 1, _only(scores, (self.bos_token_id,)), scores)


@dataclass(frozen=True)
class ForcedEOSToken:
    """``ForcedEOSTokenLogitsProcessor``: the last token before ``max_length`` is an end-of-sequence token."""

    eos_token_ids: tuple[int, ...]

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        last = tokens.length == tokens.max_length - 1
        return torch.where(last, _only(scores, self.eos_token_ids), scores)


@dataclass(frozen=True)
class Temperature:
    """``TemperatureLogitsWarper``: scores divided by ``temperature``."""

    temperature: float

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


@dataclass(frozen=True)
class TopK:
    """``TopKLogitsWarper``: scores below the ``top_k``-th largest get ``filter_value``."""

    top_k: int
    filter_value: float = NEG_INF

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        top_k = min(self.top_k, scores.size(-1))
        removed = scores < torch.topk(scores, top_k)[0][..., -1, None]
        return scores.masked_fill(removed, self.filter_value)


@dataclass(frozen=True)
class TopP:
    """``TopPLogitsWarper``: the smallest-probability tokens whose probabilities add up to at most
    ``1 - top_p`` get ``filter_value``; the ``min_tokens_to_keep`` most likely always stay."""

    top_p: float
    filter_value: float = NEG_INF
    min_tokens_to_keep: int = 1

    def __call__(self, tokens: Tokens, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_removed = cumulative <= (1 - self.top_p)
        sorted_removed[..., -self.min_tokens_to_keep :] = 0
        removed = sorted_removed.scatter(1, sorted_indices, sorted_removed)
        return scores.masked_fill(removed, self.filter_value)


Processor = (
    RepetitionPenalty
    | NoRepeatNGram
    | MinLength
    | MinNewTokensLength
    | ForcedBOSToken
    | ForcedEOSToken
    | Temperature
    | TopK
    | TopP
)


def _ids(value) -> tuple[int, ...]:
    """Token ids given as an int, a list or a tensor, as a tuple (a tensor is read once, per call)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def from_transformers(processor, eos_token_ids: tuple[int, ...]) -> Processor | str:
    """The kernl processor for a transformers ``processor`` (its parameters read from it), or why there is
    none. ``eos_token_ids``: the call's end-of-sequence tokens (those transformers built the length
    processors with), read on the host once per call rather than from the processor's device tensor."""
    kind = type(processor)
    if kind is hf.RepetitionPenaltyLogitsProcessor:
        ignored = getattr(processor, "prompt_ignore_length", None)
        if isinstance(ignored, torch.Tensor):
            return RepetitionPenalty(processor.penalty, per_row=True)  # the rows' starts: row_starts()
        return RepetitionPenalty(processor.penalty, ignored or 0)
    if kind is hf.NoRepeatNGramLogitsProcessor:
        return NoRepeatNGram(processor.ngram_size)
    if kind is hf.MinLengthLogitsProcessor:
        return MinLength(processor.min_length, eos_token_ids)
    if kind is hf.MinNewTokensLengthLogitsProcessor:
        return MinNewTokensLength(processor.prompt_length_to_skip, processor.min_new_tokens, eos_token_ids)
    if kind is hf.ForcedBOSTokenLogitsProcessor:
        return ForcedBOSToken(int(processor.bos_token_id))
    if kind is hf.ForcedEOSTokenLogitsProcessor:
        return ForcedEOSToken(_ids(processor.eos_token_id))
    if kind is hf.TemperatureLogitsWarper:
        return Temperature(processor.temperature)
    if kind is hf.TopKLogitsWarper:
        return TopK(processor.top_k, processor.filter_value)
    if kind is hf.TopPLogitsWarper:
        return TopP(processor.top_p, processor.filter_value, processor.min_tokens_to_keep)
    return f"{kind.__name__} is not on kernl's loop"


def row_starts(logits_processor) -> torch.Tensor | None:
    """The per-row ``prompt_ignore_length`` (int64 ``(batch,)``) of the repetition penalty among
    ``logits_processor`` (transformers 5.25 gives a decoder-only model's left padding lengths; 5.17 has
    none), the :attr:`Tokens.starts` of a call; None without one."""
    for processor in logits_processor:
        if type(processor) is hf.RepetitionPenaltyLogitsProcessor:
            ignored = getattr(processor, "prompt_ignore_length", None)
            if isinstance(ignored, torch.Tensor):
                return ignored
    return None
