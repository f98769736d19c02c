"""kernl's decode loop: ``generate()``'s greedy, sampled and beam-search decoding with every step on the
device.

:class:`DecodeLoop.decode` is handed to ``generate()`` as its ``custom_generate`` decoding method
(:mod:`kernl.integration.decode.route`): transformers prepares the call (encoder, static cache, logits
processors, stopping criteria) and the loop runs it:

1. the prefill, as transformers runs it, then the first token's choice;
2. the other steps in chunks of :data:`STEPS_PER_LAUNCH`: each step builds its inputs from the state
   (:class:`~kernl.integration.decode.state.DecodeState`: the last tokens, the cache, whose device-side
   length gives the query's position, and the model arguments, held steady by the model kind's
   :mod:`~kernl.integration.decode.step_arguments`: a decoder-only model's attention mask and per-row
   positions), runs the decoder step compiled by kernl's backend, processes the scores
   (:mod:`~kernl.integration.decode.processors`), picks the tokens and appends them; a finished row emits
   the pad token (beam search: :mod:`~kernl.integration.decode.beam_search` picks, and the rows'
   sequences and the cache are reordered in place by the beams they continue). No step reads anything
   back to the host: on a GPU a chunk is captured in one CUDA graph
   (:class:`~kernl.integration.cuda_graphs.CudaGraphs`, keyed by the loop's settings; its first call runs
   directly, as its warm-up) and replayed;
3. after each launch the host reads one number, the length transformers' loop would have stopped at:
   shorter than the steps run means every row has finished, and the loop stops (beam search: its done
   flag).

The last launch may run up to ``STEPS_PER_LAUNCH - 1`` steps past ``max_length``: their tokens are cut off,
and the static cache has room for them (:data:`EXTRA_CACHE_POSITIONS`, added by kernl's cache
factory). Sampling draws its noise per step before each launch
(:mod:`~kernl.integration.decode.draws`). Without a GPU (the Triton interpreter) the same chunks run
directly. The model's decoder step is a callable and its arguments an adapter: the loop holds nothing
specific to a model family (T5, BART, GPT-2, Llama, ...).
"""

import torch

from kernl.integration import hf_compat
from kernl.integration.cuda_graphs import FIRST_CALL, CudaGraphs, WeightAddresses, on_inputs_gpu
from kernl.integration.decode.draws import draw_noise, generator_as_global, sampled
from kernl.integration.decode.processors import row_starts
from kernl.integration.decode.settings import LoopSettings, call_kind, loop_settings
from kernl.integration.decode.state import DecodeState
from kernl.integration.decode.step_arguments import StepArguments
from kernl.integration.forward_graphs import signature
from kernl.integration.report import OptimizationReport

STEPS_PER_LAUNCH = 8
# Positions a static cache holds beyond max_length for the steps the last launch runs past it.
EXTRA_CACHE_POSITIONS = STEPS_PER_LAUNCH - 1
KEPT_STATES = 4
MAX_CAPTURES_PER_STATE = 4


def advance(state: DecodeState, settings: LoopSettings, logits: torch.Tensor, slot: int) -> None:
    """One step's token choice, on the device: process the last position's ``logits`` (``(rows, seq,
    vocab)``), pick each row's token (greedy, sampled with ``state.noise[slot]``, or beam search), append
    it, and update which rows are unfinished, as transformers' ``_sample`` and ``_beam_search`` do."""
    scores = logits[:, -1].to(dtype=torch.float32, copy=True)
    if settings.beams is not None:
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
    for processor in settings.processors:
        scores = processor(state.tokens, scores)
    if settings.beams is not None:
        _advance_beams(state, settings, scores)
    else:
        _advance_rows(state, settings, scores, slot)


def _append(state: DecodeState, chosen: torch.Tensor) -> None:
    tokens = state.tokens
    tokens.ids.scatter_(1, tokens.length.view(1, 1).expand(chosen.shape[0], 1), chosen[:, None])
    tokens.length.add_(1)
    state.token.copy_(chosen[:, None])


def _advance_rows(state: DecodeState, settings: LoopSettings, scores: torch.Tensor, slot: int) -> None:
    """Greedy or sampled: finished rows emit the pad token."""
    unfinished = state.unfinished
    chosen = sampled(scores, state.noise[slot]) if settings.do_sample else torch.argmax(scores, dim=-1)
    if settings.eos_token_ids:
        chosen = chosen * unfinished + settings.pad_token_id * (1 - unfinished)
    state.out_length.add_(unfinished.amax())  # transformers' loop takes this step if a row is unfinished
    _append(state, chosen)
    ended = torch.zeros_like(chosen, dtype=torch.bool)
    for eos in settings.eos_token_ids:
        ended = ended | (chosen == eos)
    unfinished.mul_((~ended & (state.tokens.length < state.tokens.max_length)).long())


def _advance_beams(state: DecodeState, settings: LoopSettings, log_probs: torch.Tensor) -> None:
    """Beam search (:class:`~kernl.integration.decode.beam_search.BeamSearch`): the rows' sequences and
    the cache are reordered by the beams each continues, in place."""
    search = state.searches[(settings.beams, settings.prompt_length)]
    generated = (state.tokens.length - settings.prompt_length).reshape(())
    choice = search.step(log_probs, generated)
    state.tokens.ids.copy_(state.tokens.ids.index_select(0, choice.beam_rows))
    _append(state, choice.next_tokens)
    state.cache.reorder_cache(choice.beam_rows)


def _cache_refusal(cache, length: int) -> str | None:
    """Why the loop cannot run steps up to a sequence of ``length`` tokens over ``cache`` (the call's static
    cache); None when it can."""
    if cache is not None and hf_compat.has_sliding_layers(cache):  # their room is the window's
        return "the static cache has sliding-window layers, whose length a captured step would replay stale"
    if cache is None or hf_compat.self_attention_room(cache) < length:
        return "the static cache has no room for the steps past max_length of a launch"
    return None


class DecodeLoop:
    """The decode loop of one optimized model.

    ``step(**inputs)``: the model's decoder step (its forward, compiled by kernl's backend), run over a
    static cache; ``arguments``: the step arguments of the model's kind
    (:func:`~kernl.integration.decode.step_arguments.step_arguments`); ``cuda_graphs``: capture chunks of
    steps on a GPU; ``report``: where each call's loop is noted (``report.generate_loops``);
    ``reorder_in_place(cache)``: make ``cache.reorder_cache`` keep its tensors where they are (beam search
    reorders the cache a captured step reads).
    """

    def __init__(
        self,
        model,
        step,
        arguments: StepArguments,
        report: OptimizationReport,
        cuda_graphs: bool,
        reorder_in_place,
    ):
        self.model, self.step, self.arguments = model, step, arguments
        self.report, self.reorder_in_place = report, reorder_in_place
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # run only the steps a call needs in its last launch (only where no capture fixes a launch's length)
        self.exact_launches = not self.cuda_graphs
        self.enabled = True  # False: every call runs transformers' loop (comparisons, benchmarks)
        self.states: dict[tuple, DecodeState] = {}

    def decode(
        self,
        model,
        input_ids: torch.Tensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        generator: torch.Generator | None = None,
        **model_kwargs,
    ):
        """``generate()``'s decoding method (its ``custom_generate``): the call's sequences, or its
        ``GenerateEncoderDecoderOutput`` / ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate``.
        ``generator``: the draws of sampling (kernl's extension; default: the global generator). A call
        outside the loop's set runs transformers' decoding method, with the reason in the report."""
        kind = call_kind(lambda name: getattr(generation_config, name, None))
        settings = loop_settings(
            generation_config,
            logits_processor,
            stopping_criteria,
            model_kwargs,
            input_ids.shape[1],
            self.arguments,
        )
        if isinstance(settings, LoopSettings):
            # the longest sequence a step may feed: the last launch runs up to EXTRA_CACHE_POSITIONS steps
            # past max_length
            length = generation_config.max_length - 1 + EXTRA_CACHE_POSITIONS
            cache = hf_compat.cache_argument(model_kwargs)[1]
            settings = _cache_refusal(cache, length) or self.arguments.length_refusal(length) or settings
        if isinstance(settings, str):
            self.report.note_loop(kind, f"transformers' loop: {settings}")
            method = hf_compat.transformers_decoding(generation_config)
            with generator_as_global(generator):
                return method(
                    model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs
                )
        self.report.note_loop(kind, self._describe())
        starts = row_starts(logits_processor)
        sequences, cache, search = self._run(
            input_ids, settings, generation_config, generator, model_kwargs, starts
        )
        if generation_config.return_dict_in_generate:
            beam_indices = None if search is None else search.beam_indices()
            return hf_compat.generate_output(model, sequences, cache, beam_indices)
        return sequences

    def _describe(self) -> str:
        if self.cuda_graphs:
            return f"kernl's loop ({STEPS_PER_LAUNCH} steps per CUDA graph launch)"
        return f"kernl's loop ({STEPS_PER_LAUNCH} steps between host reads, no CUDA graphs off the GPU)"

    def _run(
        self, input_ids, settings: LoopSettings, generation_config, generator, model_kwargs, starts
    ) -> tuple:
        """Prefill, then chunks of steps until ``max_length`` or every row finished: ``(sequences, cache,
        beam search or None)``. ``starts``: :attr:`~kernl.integration.decode.processors.Tokens.starts`."""
        model = self.model
        outputs, model_kwargs = hf_compat.prefill(model, input_ids, generation_config, model_kwargs)
        logits = outputs.logits
        del outputs
        room = hf_compat.self_attention_room(hf_compat.cache_argument(model_kwargs)[1])
        model_kwargs = self.arguments.steady(model_kwargs, room)
        max_length, prompt = generation_config.max_length, input_ids.shape[1]
        state = self._state(model_kwargs, input_ids.shape[0], max_length + EXTRA_CACHE_POSITIONS)
        state.start(input_ids, max_length, model_kwargs, starts)
        search = None
        if settings.beams is not None:
            search = state.search(settings.beams, prompt)
        if settings.do_sample:
            draw_noise(state.noise_slots(STEPS_PER_LAUNCH, logits.shape[-1]), 1, generator)
        advance(state, settings, logits, slot=0)
        del logits
        total, done = max_length - prompt, 1
        while done < total:
            if settings.do_sample:
                draw_noise(state.noise, min(STEPS_PER_LAUNCH, total - done), generator)
            steps = min(STEPS_PER_LAUNCH, total - done) if self.exact_launches else STEPS_PER_LAUNCH
            # a capture and its replays act on the current device's stream: the model's GPU must be current
            with on_inputs_gpu([state.token]):
                state.graphs(settings, steps)
            done += steps
            # the loop's one host read per launch: whether every row has ended (for rows, a length short
            # of the steps run)
            if search is not None:
                if bool(search.done()):
                    break
            elif int(state.out_length.item()) < prompt + min(done, total):
                break
        cache = hf_compat.cache_argument(model_kwargs)[1]
        if search is not None:
            return search.finish(input_ids).sequences, cache, search
        stopped_at = int(state.out_length.item())
        return state.tokens.ids[:, :stopped_at].clone(), cache, None

    def _state(self, model_kwargs: dict, batch: int, width: int) -> DecodeState:
        """The kept state for these step arguments (their cache, shapes and values), else a new one."""
        cache_name, cache = hf_compat.cache_argument(model_kwargs)
        others = {name: value for name, value in model_kwargs.items() if name != cache_name}
        tensors = [t for layer in hf_compat.cache_layers(cache) for t in hf_compat.layer_tensors(layer)]
        key = (signature((), others), id(cache), tuple(t.data_ptr() for t in tensors), batch, width)
        state = self.states.pop(key, None)
        if state is None:
            self.reorder_in_place(cache)  # before beam search's first reorder: the state's cache stays put
            state = DecodeState(model_kwargs, batch, width, self.model.device)
            state.graphs = self._graphs(state)
        self.states[key] = state
        while len(self.states) > KEPT_STATES:
            self.states.pop(next(iter(self.states)))
        return state

    def _graphs(self, state: DecodeState):
        """``run(settings, steps)``: a chunk of ``steps`` steps over ``state``, captured per settings and
        steps on a GPU."""

        def chunk(settings: LoopSettings, steps: int) -> None:
            for slot in range(steps):
                inputs = hf_compat.step_inputs(self.model, state.token, state.model_kwargs)
                outputs = self.step(**inputs, return_dict=True)
                self.arguments.advance(state.model_kwargs)
                advance(state, settings, outputs.logits, slot)

        if not self.cuda_graphs:
            return chunk
        return CudaGraphs(
            chunk,
            lambda args, kwargs: args,
            self.pool,
            copied=lambda args, kwargs: [],
            warm_up=FIRST_CALL,
            max_captures=MAX_CAPTURES_PER_STATE,
            weights=WeightAddresses(self.model),
            on_capture=self._note_capture,
        )

    def _note_capture(self, capture) -> None:
        if capture.error is not None:
            self.report.notes.append(
                f"kernl's loop: a chunk of steps runs without a CUDA graph: {capture.error}"
            )
