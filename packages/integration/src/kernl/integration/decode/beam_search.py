"""Beam search whose every step runs on the device, with no host synchronisation: capturable in a CUDA graph.

It follows transformers' ``GenerationMixin._beam_search`` (the vectorised version of transformers 5)
operation for operation, so that the same processed log-probabilities give the same tokens and the same
``sequences_scores``:

* each step keeps the top ``(1 + number of EOS tokens) * num_beams`` continuations (at least
  ``2 * num_beams``) over all beams of a row;
* the best ``num_beams`` of them that hit no stopping criterion (an EOS token, or the last allowed token)
  run on;
* those among the first ``num_beams`` that hit one compete, with their length-penalised score, for the
  row's ``num_beams`` finished slots;
* a row takes no more finished hypotheses once it is full (``early_stopping=True``) or once transformers'
  heuristic says its running beams cannot beat its worst finished one; the search is done when no row can
  improve, or every candidate hit a stopping criterion.

Every state tensor is allocated once, in :class:`BeamSearch`'s constructor, and updated in place by
:meth:`BeamSearch.step`, so a CUDA graph that captured ``step`` replays it on the same state. Once the
search is done, further steps leave the finished hypotheses as they are: a loop that checks
:meth:`BeamSearch.done` only every few steps returns what transformers returns.
"""

import math
from dataclasses import dataclass

import torch

_EXCLUDED = -1.0e9  # the score transformers gives a candidate or a slot that must not be chosen


@dataclass(frozen=True, kw_only=True)
class BeamSettings:
    """The beam search arguments of ``generate()``, as transformers reads them from its ``GenerationConfig``.

    ``early_stopping`` is ``True`` (stop a row once it holds ``num_beams`` finished hypotheses), ``False``
    (stop when the best running beam at the current length cannot beat the worst finished one) or
    ``"never"`` (the same heuristic at the longest possible length when ``length_penalty > 0``).
    ``eos_token_ids`` may be empty (no EOS: beams end only at ``max_new_tokens``).
    ``pad_token_id`` is ``None`` or the model's pad token (see :attr:`fill_value`).
    """

    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    max_new_tokens: int

    def __post_init__(self):
        _check_int("num_beams", self.num_beams, minimum=2)
        _check_int("num_return_sequences", self.num_return_sequences, minimum=1)
        if self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) must be at most num_beams ({self.num_beams})"
            )
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, int | float):
            raise TypeError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty!r}")
        if not (
            self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"
        ):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.eos_token_ids, tuple):
            raise TypeError(f"eos_token_ids must be a tuple of ints, got {self.eos_token_ids!r}")
        for token in self.eos_token_ids:
            _check_int("eos_token_ids", token, minimum=0)
        if self.pad_token_id is not None:
            _check_int("pad_token_id", self.pad_token_id, minimum=0)

    @property
    def candidates_per_row(self) -> int:
        """How many continuations each step keeps per row: enough that ``num_beams`` of them can run on
        even if every finished one ended with a different EOS token."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams

    @property
    def fill_value(self) -> int:
        """The token after a finished hypothesis's last one, as transformers fills it: ``pad_token_id``
        unless that is ``None`` or 0 (transformers tests the pad token's truth), then the first EOS token,
        and -1 without EOS tokens."""
        if not self.eos_token_ids:
            return -1
        return self.pad_token_id or self.eos_token_ids[0]


@dataclass(frozen=True)
class BeamChoice:
    """What one step chose, as tensors of :class:`BeamSearch`'s state (overwritten by the next step).

    ``next_tokens``: (batch * num_beams,) int64, the token each beam feeds to the model next.
    ``beam_rows``: (batch * num_beams,) int64, the row of the previous step's batch that each beam
    continues: the caller reorders its key/value cache by it (``cache.reorder_cache(beam_rows)``).
    """

    next_tokens: torch.Tensor
    beam_rows: torch.Tensor


@dataclass(frozen=True)
class BeamResult:
    """The outcome of a search, as ``generate()`` returns it.

    ``sequences``: (batch * num_return_sequences, prompt_length + generated) int64, the prompt then the
    best hypotheses of each row, best first, padded with :attr:`BeamSettings.fill_value`.
    ``sequences_scores``: (batch * num_return_sequences,) float32, their length-penalised scores.
    """

    sequences: torch.Tensor
    sequences_scores: torch.Tensor


class BeamSearch:
    """The state of one beam search over ``batch_size`` rows of ``num_beams`` beams each.

    The caller runs the model, turns its last logits into float32 log-probabilities (``log_softmax``
    then the logits processors, as transformers does), and hands them to :meth:`step`, which picks the
    next token of every beam, until :meth:`done`; :meth:`finish` then returns the sequences and scores,
    :meth:`beam_indices` the beam indices. :meth:`reset` starts a new search on the same tensors.
    ``prompt_length`` is the length of the decoder's prompt (1 for an encoder-decoder's start token).
    """

    def __init__(
        self, settings: BeamSettings, *, batch_size: int, prompt_length: int, device: torch.device | str
    ):
        if not isinstance(settings, BeamSettings):
            raise TypeError(f"settings must be a BeamSettings, got {type(settings).__name__}")
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("prompt_length", prompt_length, minimum=1)
        self.settings = settings
        self.batch_size = batch_size
        self.prompt_length = prompt_length
        self.device = torch.device(device)
        beams, candidates, length = settings.num_beams, settings.candidates_per_row, settings.max_new_tokens

        def new(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=self.device)

        self._running_tokens = new((batch_size, beams, length), torch.int64)
        self._running_scores = new((batch_size, beams), torch.float32)
        self._finished_tokens = new((batch_size, beams, length), torch.int64)
        self._finished_scores = new((batch_size, beams), torch.float32)
        self._finished_lengths = new((batch_size, beams), torch.int64)
        self._finished_parents = new((batch_size, beams), torch.int64)
        self._row_history = new((length, batch_size * beams), torch.int64)
        self._is_finished = new((batch_size, beams), torch.bool)
        self._may_improve = new((batch_size, 1), torch.bool)
        self._done = new((), torch.bool)
        self._next_tokens = new((batch_size * beams,), torch.int64)
        self._beam_rows = new((batch_size * beams,), torch.int64)

        self._positions = torch.arange(length, device=self.device)
        self._row_offsets = torch.arange(batch_size, device=self.device)[:, None] * beams
        self._eos = torch.tensor(settings.eos_token_ids, dtype=torch.int64, device=self.device)
        self._in_first_beams = torch.arange(candidates, device=self.device) < beams
        self._penalty_multiplies = _divides_by_a_reciprocal(self.device)
        self._length_scales = self._length_penalty_scales()
        self.reset()

    def reset(self) -> None:
        """Start a new search: every state tensor is rewritten in place (capturable)."""
        fill = self.settings.fill_value
        self._running_tokens.fill_(fill)
        self._finished_tokens.fill_(fill)
        # Only the first beam of a row starts live, so the first step does not pick one token once per beam.
        self._running_scores.fill_(_EXCLUDED)
        self._running_scores[:, 0].fill_(0.0)
        self._finished_scores.fill_(_EXCLUDED)
        self._finished_lengths.zero_()
        self._finished_parents.fill_(-1)
        self._row_history.zero_()
        self._is_finished.zero_()
        self._may_improve.fill_(True)
        self._done.fill_(False)
        self._next_tokens.fill_(fill)
        self._beam_rows.copy_(torch.arange(self._beam_rows.numel(), device=self.device))

    def step(self, log_probs: torch.Tensor, step: int | torch.Tensor) -> BeamChoice:
        """Choose every beam's next token from ``log_probs`` and update the search's state in place.

        ``log_probs``: (batch * num_beams, vocab) float32, the processed log-probabilities of the next token
        for the beams in the order of the previous step's :class:`BeamChoice`.
        ``step``: how many tokens were generated before this one, a Python int or a 0-d integer tensor on
        the search's device (what a captured loop passes).
        Returns the chosen tokens and the cache rows they continue, as state tensors.
        """
        self._check_step_arguments(log_probs, step)
        settings = self.settings
        batch, beams = self.batch_size, settings.num_beams
        vocab = log_probs.shape[-1]

        # transformers' _get_top_k_continuations
        accumulated = log_probs.reshape(batch, beams, vocab) + self._running_scores[:, :, None]
        top_scores, top_indices = torch.topk(accumulated.reshape(batch, -1), k=settings.candidates_per_row)
        top_beams = top_indices // vocab
        top_rows = top_beams + self._row_offsets
        top_ids = top_indices % vocab
        top_tokens = _gather_beams(self._running_tokens, top_beams)
        top_tokens = torch.where(self._positions == step, top_ids[:, :, None], top_tokens)
        hits_stop = (top_ids[:, :, None] == self._eos).any(dim=-1) | (step + 1 >= settings.max_new_tokens)

        # transformers' _get_running_beams_for_next_iteration
        running_candidates = top_scores + hits_stop.to(torch.float32) * _EXCLUDED
        kept = torch.topk(running_candidates, k=beams)[1]
        running_scores = _gather_beams(running_candidates, kept)
        next_tokens = _gather_beams(top_ids, kept)
        beam_rows = _gather_beams(top_rows, kept)

        # transformers' _update_finished_beams
        step_index = self._step_index(step)
        # 0-d: the length penalty of this step's hypotheses (step + 1 tokens)
        length_scale = self._length_scales.index_select(0, step_index).reshape(())
        just_finished = hits_stop & self._in_first_beams
        finished_candidates = self._length_penalised(top_scores, length_scale)
        if settings.early_stopping is True:
            row_is_full = self._is_finished.all(dim=-1, keepdim=True)
            finished_candidates = finished_candidates + row_is_full.to(torch.float32) * _EXCLUDED
        finished_candidates = finished_candidates + (~self._may_improve).to(torch.float32) * _EXCLUDED
        finished_candidates = finished_candidates + (~just_finished) * _EXCLUDED
        merged_scores = torch.cat((self._finished_scores, finished_candidates), dim=1)
        chosen = torch.topk(merged_scores, k=beams)[1]
        candidate_lengths = torch.zeros_like(top_ids) + (step + 1)
        finished = (
            (self._finished_scores, merged_scores),
            (self._finished_tokens, torch.cat((self._finished_tokens, top_tokens), dim=1)),
            (self._finished_lengths, torch.cat((self._finished_lengths, candidate_lengths), dim=1)),
            (self._finished_parents, torch.cat((self._finished_parents, top_rows), dim=1)),
            (self._is_finished, torch.cat((self._is_finished, just_finished), dim=1)),
        )
        # Once done, the finished hypotheses stay as they are: another top-k could reorder equal scores.
        was_done = self._done  # read before this step updates it, below
        for state, merged in finished:
            torch.where(was_done, state, _gather_beams(merged, chosen), out=state)

        # transformers' _check_early_stop_heuristic and _beam_search_has_unfinished_sequences
        if settings.early_stopping == "never" and settings.length_penalty > 0.0:
            best_possible = running_scores[:, :1] / (settings.max_new_tokens**settings.length_penalty)
        else:
            best_possible = self._length_penalised(running_scores[:, :1], length_scale)
        worst_finished = torch.where(
            self._is_finished, self._finished_scores.min(dim=1, keepdim=True)[0], _EXCLUDED
        )
        self._may_improve &= (best_possible > worst_finished).any(dim=-1, keepdim=True)
        can_go_on = self._may_improve.any() & ~hits_stop.all()
        if settings.early_stopping is True:
            can_go_on = can_go_on & ~self._is_finished.all()
        self._done |= ~can_go_on

        self._running_tokens.copy_(_gather_beams(top_tokens, kept))
        self._running_scores.copy_(running_scores)
        self._next_tokens.copy_(next_tokens.reshape(-1))
        self._beam_rows.copy_(beam_rows.reshape(-1))
        # Steps after done write rows no finished hypothesis traces back through (past max_new_tokens: the
        # last row). A masked write rather than index_copy_, which torch's deterministic mode makes sort.
        this_step = (self._positions == step_index)[:, None]
        torch.where(this_step, self._beam_rows[None], self._row_history, out=self._row_history)
        return BeamChoice(next_tokens=self._next_tokens, beam_rows=self._beam_rows)

    def done(self) -> torch.Tensor:
        """0-d bool tensor on the device: True once transformers would stop generating. It is state,
        rewritten by each step: copy it to keep a past value."""
        return self._done

    def finish(self, prompt_ids: torch.Tensor) -> BeamResult:
        """The best ``num_return_sequences`` hypotheses of every row, after the prompt (one host sync).

        ``prompt_ids``: (batch, prompt_length) or (batch * num_beams, prompt_length) int64, the prompt
        (decoder input ids) the search started from.
        """
        self._check_prompt(prompt_ids)
        batch, returned = self.batch_size, self.settings.num_return_sequences
        generated = int(self._finished_lengths[:, :returned].max())
        tokens = self._finished_tokens[:, :returned, :generated].reshape(batch * returned, generated)
        prompts = prompt_ids.reshape(batch, -1, self.prompt_length)[:, :1].expand(batch, returned, -1)
        sequences = torch.cat((prompts.reshape(batch * returned, -1).to(torch.int64), tokens), dim=1)
        scores = self._finished_scores[:, :returned].reshape(-1).clone()
        return BeamResult(sequences=sequences, sequences_scores=scores)

    def beam_indices(self) -> torch.Tensor:
        """(batch * num_return_sequences, generated) int32: for each returned hypothesis, the row of the
        step's batch (``beam_rows``' numbering) its token at each position continued, -1 after its last
        token; ``generate()``'s ``beam_indices``. Traced back from the rows each step recorded (host loop
        over the positions: call it only when the caller returns it)."""
        returned = self.settings.num_return_sequences
        lengths = self._finished_lengths[:, :returned].reshape(-1)
        generated = int(lengths.max())
        rows = self._finished_parents[:, :returned].reshape(-1)
        columns = []
        for position in reversed(range(generated)):
            earlier = position < lengths - 1
            parents = self._row_history[position].gather(0, rows.clamp(min=0))
            rows = torch.where(earlier, parents, rows)
            columns.append(torch.where(position < lengths, rows, -1))
        if not columns:
            return torch.empty((lengths.numel(), 0), dtype=torch.int32, device=self.device)
        return torch.stack(columns[::-1], dim=1).to(torch.int32)

    def _length_penalty_scales(self) -> torch.Tensor:
        """(max_new_tokens,) float32 on the device: for a hypothesis of 1 .. max_new_tokens tokens, the
        factor :meth:`_length_penalised` applies to its score.

        transformers divides a float32 tensor by the Python float ``length ** length_penalty``. Where the
        device divides (the CPU), the table holds that divisor rounded to float32, as torch rounds it. Where
        it multiplies by a reciprocal instead (CUDA), the table holds the reciprocal the device itself
        computes, ``1 / divisor`` through the same operation: torch releases round that reciprocal
        differently (float32(1 / float32(divisor)) or float32(1 / divisor)), and a table computed here
        would match only one of them. Either way the scores match transformers' to the bit.
        """
        penalty = self.settings.length_penalty
        divisors = [length**penalty for length in range(1, self.settings.max_new_tokens + 1)]
        if not self._penalty_multiplies:
            return torch.tensor(divisors, dtype=torch.float32, device=self.device)
        one = torch.ones((), dtype=torch.float32, device=self.device)
        return torch.stack([one / divisor for divisor in divisors])

    def _step_index(self, step: int | torch.Tensor) -> torch.Tensor:
        """(1,) int64 on the device: ``step`` as an index into per-step tables, the last one for a step past
        ``max_new_tokens`` (after the search is done)."""
        if isinstance(step, int):
            return self._positions[step : step + 1]
        return step.clamp(max=self.settings.max_new_tokens - 1).reshape(1).to(torch.int64)

    def _length_penalised(self, scores: torch.Tensor, length_scale: torch.Tensor) -> torch.Tensor:
        """``scores`` divided by the length penalty, with transformers' rounding on this device."""
        return scores * length_scale if self._penalty_multiplies else scores / length_scale

    def _check_step_arguments(self, log_probs, step) -> None:
        rows = self.batch_size * self.settings.num_beams
        if not isinstance(log_probs, torch.Tensor):
            raise TypeError(f"log_probs must be a tensor, got {type(log_probs).__name__}")
        if log_probs.dtype != torch.float32:
            raise TypeError(f"log_probs must be float32, got {log_probs.dtype}")
        if log_probs.dim() != 2 or log_probs.shape[0] != rows:
            raise ValueError(f"log_probs must have shape ({rows}, vocab), got {tuple(log_probs.shape)}")
        minimum_vocab = self.settings.candidates_per_row // self.settings.num_beams
        if log_probs.shape[1] < minimum_vocab:
            raise ValueError(
                f"log_probs must have at least {minimum_vocab} columns, got {log_probs.shape[1]}"
            )
        if log_probs.device.type != self.device.type:
            raise ValueError(f"log_probs must be on {self.device}, got {log_probs.device}")
        if isinstance(step, torch.Tensor):
            if step.dim() != 0 or step.dtype not in (torch.int32, torch.int64):
                raise TypeError(
                    f"step must be a 0-d int32 or int64 tensor, got {step.dtype} {tuple(step.shape)}"
                )
            if step.device.type != self.device.type:
                raise ValueError(f"step must be on {self.device}, got {step.device}")
        elif isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int or a 0-d tensor, got {type(step).__name__}")
        elif not 0 <= step < self.settings.max_new_tokens:
            raise ValueError(f"step must be in [0, {self.settings.max_new_tokens}), got {step}")

    def _check_prompt(self, prompt_ids) -> None:
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("prompt_ids must be an int32 or int64 tensor")
        rows = (self.batch_size, self.batch_size * self.settings.num_beams)
        if (
            prompt_ids.dim() != 2
            or prompt_ids.shape[0] not in rows
            or prompt_ids.shape[1] != self.prompt_length
        ):
            raise ValueError(
                f"prompt_ids must have shape ({rows[0]} or {rows[1]}, {self.prompt_length}), "
                f"got {tuple(prompt_ids.shape)}"
            )
        if prompt_ids.device.type != self.device.type:
            raise ValueError(f"prompt_ids must be on {self.device}, got {prompt_ids.device}")


def _divides_by_a_reciprocal(device: torch.device) -> bool:
    """Whether ``float32 tensor / Python float`` on ``device`` multiplies by a reciprocal instead of
    dividing (torch's CUDA kernels do): 169 / 13 is exactly 13, one ulp more through float32(1 / 13).
    One host synchronisation."""
    quotient = torch.full((), 169.0, dtype=torch.float32, device=device) / 13.0
    return bool(quotient != 13.0)


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor`` (batch, beams, ...) at the beams ``indices`` (batch, chosen): (batch, chosen, ...)."""
    if tensor.dim() == 3:
        indices = indices[:, :, None].expand(-1, -1, tensor.shape[2])
    return tensor.gather(1, indices)


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
