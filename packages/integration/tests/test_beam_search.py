"""kernl.integration.decode.beam_search against transformers' own beam search.

* The same processed log-probabilities, replayed into ``generate()`` by a logits processor that
  replaces the model's, give the same tokens fed back at every step, the same stopping step and the same
  sequences and ``sequences_scores`` as transformers' ``_beam_search``.
* A tiny T5 and a tiny BART driven by a plain eager loop around :class:`BeamSearch` generate what
  ``model.generate(num_beams=...)`` generates.
* On CUDA, ``BeamSearch.step`` captured in a CUDA graph and replayed gives the same results.
"""

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from kernl.integration import hf_compat
from kernl.integration.decode.beam_search import BeamSearch, BeamSettings
from kernl_testing import on_gpu

DEVICE = "cuda" if on_gpu() else "cpu"
VOCAB = 13  # small, so that EOS tokens are often among a step's candidates
PROMPT_LENGTH = 3


class ReplayLogProbs(LogitsProcessor):
    """Replaces the model's processed log-probabilities of step ``t`` by ``log_probs[t]`` and records the
    running sequences transformers passed in."""

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs
        self.running_sequences = []

    def __call__(self, input_ids, scores):
        self.running_sequences.append(input_ids.clone())
        return self.log_probs[len(self.running_sequences) - 1].clone()


def random_log_probs(settings: BeamSettings, batch: int, seed: int, eos_rows_from: dict[int, int]):
    """(max_new_tokens, batch * num_beams, VOCAB) float32 log-probabilities, a tenth of them -inf (banned
    tokens, as logits processors ban them); in row ``r`` of ``eos_rows_from``, EOS tokens are favoured
    from step ``eos_rows_from[r]`` on, so that the beams of that row finish early."""
    generator = torch.Generator().manual_seed(seed)
    steps, beams = settings.max_new_tokens, settings.num_beams
    logits = torch.randn(steps, batch, beams, VOCAB, generator=generator) * 2
    banned = torch.rand(steps, batch, beams, VOCAB, generator=generator) < 0.1
    logits = logits.masked_fill(banned, float("-inf"))
    for row, first_step in eos_rows_from.items():
        for token in settings.eos_token_ids:
            # likely but not certain: the running beams stay close enough that early_stopping=True ends
            # searches the heuristic would continue
            logits[first_step:, row, :, token] += 3.0
    return logits.reshape(steps, batch * beams, VOCAB).log_softmax(dim=-1).to(DEVICE)


_TINY_GPT2 = {}


def tiny_gpt2():
    """A tiny decoder-only model: only its vocabulary matters, the replayed log-probs replace its logits."""
    if "model" not in _TINY_GPT2:
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=64,
            bos_token_id=None,
            eos_token_id=None,
        )
        _TINY_GPT2["model"] = GPT2LMHeadModel(config).eval().to(DEVICE)
    return _TINY_GPT2["model"]


def transformers_beam_search(settings: BeamSettings, prompt: torch.Tensor, log_probs: torch.Tensor):
    """transformers' beam search over the replayed ``log_probs``: its output and the replay processor."""
    replay = ReplayLogProbs(log_probs)
    output = tiny_gpt2().generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        num_beams=settings.num_beams,
        num_return_sequences=settings.num_return_sequences,
        length_penalty=settings.length_penalty,
        early_stopping=settings.early_stopping,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(settings.eos_token_ids) or None,
        pad_token_id=settings.pad_token_id,
        logits_processor=LogitsProcessorList([replay]),
        return_dict_in_generate=True,
        output_scores=True,
    )
    return output, replay


def unit_case(batch, num_beams, length_penalty, early_stopping, num_return_sequences, eos_rows_from):
    """``(batch, BeamSettings arguments, eos_rows_from)``: ``eos_rows_from`` maps a row to the first step
    where its EOS tokens are favoured (see :func:`random_log_probs`)."""
    arguments = dict(
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
    )
    return batch, arguments, eos_rows_from


UNIT_CASES = [
    unit_case(1, 2, 1.0, False, 1, {}),
    unit_case(3, 3, 0.0, True, 2, {1: 2}),
    unit_case(5, 4, -0.7, "never", 4, {0: 1, 3: 4}),
    unit_case(3, 5, 2.0, "never", 3, {2: 3}),
    unit_case(3, 2, 1.0, True, 2, {0: 1, 1: 1, 2: 2}),
    unit_case(5, 3, 0.5, False, 1, {4: 0}),
    unit_case(1, 5, 1.5, False, 5, {}),
    unit_case(3, 4, 1, True, 3, {}),
    # every row ends early: the stopping heuristic ends the search before max_new_tokens
    unit_case(3, 3, 1.0, False, 2, {0: 1, 1: 2, 2: 2}),
    unit_case(5, 2, 0.0, "never", 1, dict.fromkeys(range(5), 1)),
    unit_case(3, 4, 2.0, "never", 4, {0: 1, 1: 1, 2: 3}),
    # row 0 stops improving (the heuristic) while the others run on: it must take no more hypotheses
    unit_case(3, 2, 2.0, False, 2, {0: 1}),
]
# eos_token_ids, pad_token_id: one EOS or several, pad 0 (transformers then pads with the first EOS),
# another pad, no pad; no EOS at all
SPECIAL_TOKENS = [((1,), 0), ((1, 4), 7), ((2,), None), ((1, 3, 5), 0), ((0, 1), 0), ((), 0)]


# each case with two of the special token sets, every set with several cases
CASE_PAIRS = [
    (case, (case + shift) % len(SPECIAL_TOKENS)) for case in range(len(UNIT_CASES)) for shift in (0, 3)
]


@pytest.mark.parametrize("case, special", CASE_PAIRS)
def test_steps_follow_transformers_beam_search(case, special):
    batch, arguments, eos_rows_from = UNIT_CASES[case]
    eos_token_ids, pad_token_id = SPECIAL_TOKENS[special]
    if not eos_token_ids:
        eos_rows_from = {}
    settings = BeamSettings(
        **arguments, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, max_new_tokens=7
    )
    log_probs = random_log_probs(settings, batch, seed=10 * case + special, eos_rows_from=eos_rows_from)
    assert_steps_follow_transformers(settings, batch, log_probs)


def assert_steps_follow_transformers(settings: BeamSettings, batch: int, log_probs: torch.Tensor):
    """BeamSearch fed ``log_probs`` step by step feeds back the tokens transformers' beam search feeds back,
    stops at its step and returns its sequences, scores and beam indices, bit for bit."""
    prompt = torch.randint(6, VOCAB, (batch, PROMPT_LENGTH), device=DEVICE)
    expected, replay = transformers_beam_search(settings, prompt, log_probs)
    steps = len(replay.running_sequences)

    search = BeamSearch(settings, batch_size=batch, prompt_length=PROMPT_LENGTH, device=DEVICE)
    running = prompt.repeat_interleave(settings.num_beams, dim=0)
    for step in range(steps):
        assert torch.equal(running, replay.running_sequences[step]), f"step {step}: running sequences differ"
        assert not search.done(), f"done before step {step}, transformers ran {steps} steps"
        # a captured loop passes the step as a device tensor: every other step does here
        step_argument = torch.tensor(step, device=DEVICE) if step % 2 else step
        choice = search.step(log_probs[step], step_argument)
        running = torch.cat((running[choice.beam_rows], choice.next_tokens[:, None]), dim=1)
    assert search.done(), f"not done after the {steps} steps transformers ran"
    # Steps after the search is done (a loop that checks done() every few steps) change nothing.
    for extra in range(steps, steps + 2):
        search.step(log_probs[extra % settings.max_new_tokens], torch.tensor(extra, device=DEVICE))

    result = search.finish(prompt)
    assert torch.equal(result.sequences, expected.sequences)
    assert torch.equal(result.sequences_scores, expected.sequences_scores)
    assert torch.equal(search.beam_indices(), expected.beam_indices)


# How a float32 tensor divided by a Python float is rounded: correctly (the CPU), or as a multiplication by a
# float32 reciprocal, which torch's CUDA kernels compute as float32(1 / float32(divisor)) or, in other
# releases, float32(1 / divisor). transformers divides scores by the length penalty that way.
DIVISIONS = {
    "reciprocal of float32": lambda divisor: float(1.0 / torch.tensor(divisor, dtype=torch.float32)),
    "float32 of reciprocal": lambda divisor: float(torch.tensor(1.0 / divisor, dtype=torch.float32)),
}


def divide_as_on_cuda(monkeypatch, division: str) -> None:
    """``float32 tensor / Python number`` rounded, on any device, as ``DIVISIONS[division]`` says."""
    reciprocal = DIVISIONS[division]
    true_divide = torch.Tensor.__truediv__

    def divide(tensor, other):
        if tensor.dtype == torch.float32 and isinstance(other, int | float) and not isinstance(other, bool):
            return tensor * reciprocal(other)  # a float32 value: exact as the float32 multiplier
        return true_divide(tensor, other)

    monkeypatch.setattr(torch.Tensor, "__truediv__", divide)


# (batch, BeamSettings arguments, eos_rows_from, seed): length penalties whose two CUDA roundings differ at
# some length (0.5 at 6 and 7 tokens, 1.3 at 3 and 9), early_stopping=False (its heuristic reads the
# penalised best running score too)
DIVISION_CASES = [
    (5, dict(UNIT_CASES[5][1], eos_token_ids=(), pad_token_id=0, max_new_tokens=7), {}, 55),
    (5, dict(UNIT_CASES[5][1], eos_token_ids=(2,), pad_token_id=None, max_new_tokens=7), {4: 0}, 52),
    (3, dict(num_beams=4, length_penalty=1.3, early_stopping=False, num_return_sequences=3,
             eos_token_ids=(1, 4), pad_token_id=0, max_new_tokens=9), {1: 3}, 5),
]  # fmt: skip


@pytest.mark.parametrize("division", sorted(DIVISIONS))
@pytest.mark.parametrize("case", range(len(DIVISION_CASES)))
def test_steps_follow_transformers_whatever_the_rounding_of_a_division_by_a_float(
    case, division, monkeypatch
):
    divide_as_on_cuda(monkeypatch, division)
    batch, arguments, eos_rows_from, seed = DIVISION_CASES[case]
    settings = BeamSettings(**arguments)
    log_probs = random_log_probs(settings, batch, seed=seed, eos_rows_from=eos_rows_from)
    assert_steps_follow_transformers(settings, batch, log_probs)


@pytest.mark.parametrize("division", ["the device's", *sorted(DIVISIONS)])
def test_length_penalised_scores_are_the_scores_divided_by_the_python_float(division, monkeypatch):
    if division != "the device's":
        divide_as_on_cuda(monkeypatch, division)
    generator = torch.Generator().manual_seed(7)
    scores = (-30 * torch.rand(4096, generator=generator)).to(DEVICE)
    for length_penalty in (0.5, 1.3, 1.5, -0.7, 2.0, 1):
        settings = BeamSettings(**valid_settings(length_penalty=length_penalty, max_new_tokens=40))
        search = BeamSearch(settings, batch_size=1, prompt_length=1, device=DEVICE)
        for length in range(1, settings.max_new_tokens + 1):
            penalised = search._length_penalised(scores, search._length_scales[length - 1])
            expected = scores / (length**length_penalty)  # what transformers computes
            assert torch.equal(penalised, expected), f"length_penalty {length_penalty}, length {length}"


def test_reset_starts_a_new_search_on_the_same_tensors():
    settings = BeamSettings(
        num_beams=3, length_penalty=1.0, early_stopping=False, num_return_sequences=2,
        eos_token_ids=(1,), pad_token_id=0, max_new_tokens=5,
    )  # fmt: skip
    search = BeamSearch(settings, batch_size=3, prompt_length=PROMPT_LENGTH, device=DEVICE)
    prompt = torch.randint(6, VOCAB, (3, PROMPT_LENGTH), device=DEVICE)
    results = []
    for seed in (1, 2):
        log_probs = random_log_probs(settings, 3, seed=seed, eos_rows_from={0: 1})
        expected, replay = transformers_beam_search(settings, prompt, log_probs)
        search.reset()
        for step in range(len(replay.running_sequences)):
            search.step(log_probs[step], step)
        results.append(search.finish(prompt))
        assert torch.equal(results[-1].sequences, expected.sequences)
        assert torch.equal(results[-1].sequences_scores, expected.sequences_scores)
    assert not torch.equal(results[0].sequences_scores, results[1].sequences_scores)


def test_steps_after_the_search_is_done_change_nothing():
    # Two EOS tokens with the same log-probability make finished hypotheses of equal scores, whose order
    # a further top-k may change: once done, the state must stay as transformers leaves it.
    settings = BeamSettings(
        num_beams=3, length_penalty=0.0, early_stopping=True, num_return_sequences=3,
        eos_token_ids=(1, 4), pad_token_id=0, max_new_tokens=7,
    )  # fmt: skip
    batch = 5
    log_probs = random_log_probs(settings, batch, seed=3, eos_rows_from=dict.fromkeys(range(batch), 1))
    log_probs[..., 4] = log_probs[..., 1]
    prompt = torch.randint(6, VOCAB, (batch, PROMPT_LENGTH), device=DEVICE)
    expected, replay = transformers_beam_search(settings, prompt, log_probs)
    search = BeamSearch(settings, batch_size=batch, prompt_length=PROMPT_LENGTH, device=DEVICE)
    steps = len(replay.running_sequences)
    for step in range(steps + 3):
        search.step(log_probs[min(step, settings.max_new_tokens - 1)], torch.tensor(step, device=DEVICE))
    result = search.finish(prompt)
    assert torch.equal(result.sequences, expected.sequences)
    assert torch.equal(result.sequences_scores, expected.sequences_scores)
    assert torch.equal(search.beam_indices(), expected.beam_indices)
    assert len(set(result.sequences_scores.tolist())) < result.sequences_scores.numel(), (
        "no tie: tests nothing"
    )


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a CUDA device (KERNL_TEST_DEVICE=cuda)")
def test_step_captured_in_a_cuda_graph_replays_transformers_beam_search():
    settings = BeamSettings(
        num_beams=4, length_penalty=1.3, early_stopping=False, num_return_sequences=3,
        eos_token_ids=(1, 4), pad_token_id=0, max_new_tokens=9,
    )  # fmt: skip
    batch = 3
    log_probs = random_log_probs(settings, batch, seed=5, eos_rows_from={1: 3})
    prompt = torch.randint(6, VOCAB, (batch, PROMPT_LENGTH), device=DEVICE)
    expected, replay = transformers_beam_search(settings, prompt, log_probs)

    search = BeamSearch(settings, batch_size=batch, prompt_length=PROMPT_LENGTH, device=DEVICE)
    static_log_probs = log_probs[0].clone()
    static_step = torch.zeros((), dtype=torch.int64, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before the capture, as torch.cuda.graphs documents
        search.step(static_log_probs, static_step)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        choice = search.step(static_log_probs, static_step)
    search.reset()

    running = prompt.repeat_interleave(settings.num_beams, dim=0)
    steps = 0
    while not search.done():
        assert torch.equal(running, replay.running_sequences[steps])
        static_log_probs.copy_(log_probs[steps])
        static_step.fill_(steps)
        graph.replay()
        running = torch.cat((running[choice.beam_rows], choice.next_tokens[:, None]), dim=1)
        steps += 1
    assert steps == len(replay.running_sequences)
    result = search.finish(prompt)
    assert torch.equal(result.sequences, expected.sequences)
    assert torch.equal(result.sequences_scores, expected.sequences_scores)
    assert torch.equal(search.beam_indices(), expected.beam_indices)


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def tiny_bart() -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def with_likely_eos(model, scale: float):
    """``model`` (seeded, eval, on the test device) with its EOS row of the output projection scaled, so
    that some hypotheses end on EOS before ``max_new_tokens``."""
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] *= scale
    return model.eval().to(DEVICE)


@torch.no_grad()
def eager_beam_generate(model, input_ids, attention_mask, settings: BeamSettings):
    """The simplest loop around :class:`BeamSearch`: encoder once, then one decoder step per token over a
    dynamic cache reordered by the chosen beams. Returns the search and its result."""
    beams = settings.num_beams
    encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = encoder_outputs.last_hidden_state.repeat_interleave(beams, dim=0)
    mask = attention_mask.repeat_interleave(beams, dim=0)
    batch = input_ids.shape[0]
    prompt = torch.full((batch * beams, 1), model.generation_config.decoder_start_token_id, device=DEVICE)
    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    search = BeamSearch(settings, batch_size=batch, prompt_length=1, device=DEVICE)
    tokens = prompt
    for step in range(settings.max_new_tokens):
        outputs = model(
            encoder_outputs=(hidden,),
            attention_mask=mask,
            decoder_input_ids=tokens,
            use_cache=True,
            **{hf_compat.CACHE_NAME: cache},
        )
        choice = search.step(outputs.logits[:, -1].float().log_softmax(dim=-1), step)
        if search.done():
            break
        cache.reorder_cache(choice.beam_rows)
        tokens = choice.next_tokens[:, None]
    return search, search.finish(prompt)


E2E_CASES = [
    (2, 1.0, False, 2),
    (3, 0.6, True, 1),
    (4, 2.0, "never", 3),
    (5, -1.0, False, 5),
]


@pytest.mark.parametrize("build_model, eos_scale", [(tiny_t5, 40.0), (tiny_bart, 6.0)], ids=["t5", "bart"])
@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, num_return_sequences", E2E_CASES)
def test_eager_loop_generates_what_generate_does(
    build_model, eos_scale, num_beams, length_penalty, early_stopping, num_return_sequences
):
    torch.manual_seed(0)
    model = with_likely_eos(build_model(), eos_scale)
    generator = torch.Generator().manual_seed(num_beams)
    input_ids = torch.randint(3, 40, (3, 7), generator=generator).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    config = model.config
    settings = BeamSettings(
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
        eos_token_ids=(config.eos_token_id,),
        pad_token_id=config.pad_token_id,
        max_new_tokens=12,
    )
    arguments = dict(
        attention_mask=attention_mask,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_new_tokens=settings.max_new_tokens,
        return_dict_in_generate=True,
    )
    expected = model.generate(input_ids, **arguments, output_scores=True)
    # transformers (5.17, 5.25) returns sequences_scores only with output_scores=True
    without_scores = model.generate(input_ids, **arguments, output_scores=False)
    assert without_scores.sequences_scores is None and torch.equal(
        without_scores.sequences, expected.sequences
    )
    search, result = eager_beam_generate(model, input_ids, attention_mask, settings)
    assert torch.equal(result.sequences, expected.sequences)
    torch.testing.assert_close(result.sequences_scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(search.beam_indices(), expected.beam_indices)
    # the case exercises hypotheses that end on EOS before the longest one
    ends_on_eos = (result.sequences[:, 1:] == config.eos_token_id).any(dim=1)
    assert bool(ends_on_eos.any()), "no hypothesis ended on EOS: the case tests nothing about it"


def valid_settings(**overrides):
    arguments = dict(
        num_beams=3, length_penalty=1.0, early_stopping=False, num_return_sequences=2,
        eos_token_ids=(1,), pad_token_id=0, max_new_tokens=5,
    )  # fmt: skip
    return {**arguments, **overrides}


@pytest.mark.parametrize(
    "overrides, error, name",
    [
        (dict(num_beams=1), ValueError, "num_beams"),
        (dict(num_beams=2.0), TypeError, "num_beams"),
        (dict(num_return_sequences=4), ValueError, "num_return_sequences"),
        (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
        (dict(early_stopping="always"), ValueError, "early_stopping"),
        (dict(early_stopping=1), ValueError, "early_stopping"),
        (dict(length_penalty=float("nan")), ValueError, "length_penalty"),
        (dict(length_penalty="1"), TypeError, "length_penalty"),
        (dict(eos_token_ids=[1]), TypeError, "eos_token_ids"),
        (dict(eos_token_ids=(-1,)), ValueError, "eos_token_ids"),
        (dict(pad_token_id=-2), ValueError, "pad_token_id"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ],
)
def test_bad_settings_name_the_argument(overrides, error, name):
    with pytest.raises(error, match=name):
        BeamSettings(**valid_settings(**overrides))


def test_bad_search_arguments_name_the_argument():
    settings = BeamSettings(**valid_settings())
    with pytest.raises(ValueError, match="batch_size"):
        BeamSearch(settings, batch_size=0, prompt_length=1, device=DEVICE)
    with pytest.raises(ValueError, match="prompt_length"):
        BeamSearch(settings, batch_size=1, prompt_length=0, device=DEVICE)
    search = BeamSearch(settings, batch_size=2, prompt_length=1, device=DEVICE)
    log_probs = torch.zeros(6, VOCAB, device=DEVICE).log_softmax(dim=-1)
    with pytest.raises(ValueError, match="log_probs"):
        search.step(log_probs[:5], 0)
    with pytest.raises(TypeError, match="log_probs"):
        search.step(log_probs.half(), 0)
    with pytest.raises(ValueError, match="step"):
        search.step(log_probs, 5)
    with pytest.raises(TypeError, match="step"):
        search.step(log_probs, torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="prompt_ids"):
        search.finish(torch.zeros(3, 1, dtype=torch.int64, device=DEVICE))
