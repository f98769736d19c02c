"""kernl's decode loop without a model: each on-device logits processor gives the scores of transformers'
processor of the same name, the loop's settings refuse what it does not run, and its sampling draws
transformers' tokens from the same generator state."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.generation import logits_process as hf
from transformers.generation import stopping_criteria as hf_stopping

from kernl.integration.decode import draws, processors, settings
from kernl.integration.decode.beam_search import BeamSettings
from kernl.integration.decode.step_arguments import DecoderOnlyArguments, EncoderDecoderArguments
from kernl.integration.report import OptimizationReport
from kernl_testing import on_gpu

DEVICE = "cuda" if on_gpu() else "cpu"
ENCODER_DECODER = EncoderDecoderArguments()

VOCAB = 37  # odd, and smaller than some ids in the buffers' unused columns


def _tokens(batch: int, length: int, width: int, seed: int, max_length: int = 8, vocab: int = VOCAB):
    """Random ``input_ids`` (batch, length) with few distinct tokens (repeats and n-grams happen), and
    :class:`processors.Tokens` holding them in a wider buffer whose other columns hold garbage ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (batch, length), generator=generator)
    buffer = torch.randint(0, vocab + 5, (batch, width), generator=generator)  # past the vocab too
    buffer[:, :length] = ids
    tokens = processors.Tokens(
        ids=buffer.to(DEVICE),
        length=torch.tensor([length], device=DEVICE),
        max_length=torch.tensor([max_length], device=DEVICE),
        starts=torch.zeros(batch, dtype=torch.int64, device=DEVICE),
    )
    return ids.to(DEVICE), tokens


def _scores(batch: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    scores = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed + 100)) * 3
    scores[0, 0] = 0.0  # the sign boundary of the repetition penalty
    return scores.to(DEVICE)


# (transformers' processor, kernl's) built from the same parameters
PAIRS = {
    "repetition_penalty": lambda: (
        hf.RepetitionPenaltyLogitsProcessor(1.7),
        processors.RepetitionPenalty(1.7),
    ),
    "repetition_penalty_ignoring_prompt": lambda: (
        hf.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=3),
        processors.RepetitionPenalty(0.6, 3),
    ),
    "min_length": lambda: (
        hf.MinLengthLogitsProcessor(6, [2, 5], device=DEVICE),
        processors.MinLength(6, (2, 5)),
    ),
    "min_new_tokens": lambda: (
        hf.MinNewTokensLengthLogitsProcessor(2, 4, 3, device=DEVICE),
        processors.MinNewTokensLength(2, 4, (3,)),
    ),
    "forced_bos": lambda: (hf.ForcedBOSTokenLogitsProcessor(4), processors.ForcedBOSToken(4)),
    "forced_eos": lambda: (
        hf.ForcedEOSTokenLogitsProcessor(8, [1, 7], device=DEVICE),
        processors.ForcedEOSToken((1, 7)),
    ),
    "temperature": lambda: (hf.TemperatureLogitsWarper(0.7), processors.Temperature(0.7)),
    "top_k": lambda: (hf.TopKLogitsWarper(5), processors.TopK(5)),
    "top_k_past_the_vocab": lambda: (hf.TopKLogitsWarper(500), processors.TopK(500)),
    "top_p": lambda: (hf.TopPLogitsWarper(0.8), processors.TopP(0.8)),
    "top_p_keeping_three": lambda: (
        hf.TopPLogitsWarper(0.3, min_tokens_to_keep=3),
        processors.TopP(0.3, min_tokens_to_keep=3),
    ),
    **{
        f"no_repeat_{size}_gram": (
            lambda size=size: (hf.NoRepeatNGramLogitsProcessor(size), processors.NoRepeatNGram(size))
        )
        for size in (1, 2, 3, 4)
    },
}


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 13])
def test_each_processor_gives_transformers_scores(name, length):
    theirs, ours = PAIRS[name]()
    for seed in range(3):
        ids, tokens = _tokens(batch=3, length=length, width=length + 9, seed=seed)
        scores = _scores(3, seed)
        expected = theirs(ids, scores.clone())
        actual = ours(tokens, scores.clone())
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual, expected), (name, length, seed)


def test_the_processors_bite_on_the_cases_they_exist_for():
    """Guards against processors that compare equal only because neither did anything."""
    ids, tokens = _tokens(batch=2, length=6, width=10, seed=0, max_length=7)
    ids[:] = torch.tensor(
        [2, 3, 2, 4, 1, 2], device=DEVICE
    )  # 2 follows 3 once: a repeat of "2 3" bans 3 after 2
    tokens.ids[:, :6] = ids
    scores = _scores(2, 0)
    assert torch.isinf(processors.NoRepeatNGram(2)(tokens, scores)[:, 3]).all()
    assert torch.isinf(processors.ForcedEOSToken((5,))(tokens, scores)).sum() == 2 * (VOCAB - 1)
    assert torch.isinf(processors.MinLength(7, (1,))(tokens, scores)[:, 1]).all()
    assert not torch.equal(processors.RepetitionPenalty(2.0)(tokens, scores), scores)


def test_processors_are_translated_from_transformers_with_their_parameters():
    eos = (1, 9)
    cases = [
        (hf.RepetitionPenaltyLogitsProcessor(1.2), processors.RepetitionPenalty(1.2, 0)),
        (hf.NoRepeatNGramLogitsProcessor(3), processors.NoRepeatNGram(3)),
        (hf.MinLengthLogitsProcessor(4, list(eos)), processors.MinLength(4, eos)),
        (hf.MinNewTokensLengthLogitsProcessor(1, 5, list(eos)), processors.MinNewTokensLength(1, 5, eos)),
        (hf.ForcedBOSTokenLogitsProcessor(3), processors.ForcedBOSToken(3)),
        (hf.ForcedEOSTokenLogitsProcessor(10, [7, 8]), processors.ForcedEOSToken((7, 8))),
        (hf.TemperatureLogitsWarper(0.5), processors.Temperature(0.5)),
        (hf.TopKLogitsWarper(4, min_tokens_to_keep=6), processors.TopK(6)),
        (hf.TopPLogitsWarper(0.9, min_tokens_to_keep=2), processors.TopP(0.9, -math.inf, 2)),
    ]
    for theirs, ours in cases:
        assert processors.from_transformers(theirs, eos) == ours
    reason = processors.from_transformers(hf.SuppressTokensLogitsProcessor([3]), eos)
    assert reason == "SuppressTokensLogitsProcessor is not on kernl's loop"
    per_row = hf.RepetitionPenaltyLogitsProcessor(1.2)
    per_row.prompt_ignore_length = torch.tensor([0, 2])  # transformers 5.25 with a decoder attention mask
    assert processors.from_transformers(per_row, eos) == processors.RepetitionPenalty(1.2, per_row=True)
    assert torch.equal(processors.row_starts([hf.TopKLogitsWarper(3), per_row]), torch.tensor([0, 2]))
    assert processors.row_starts([hf.RepetitionPenaltyLogitsProcessor(1.2)]) is None


@pytest.mark.parametrize("length", [1, 4, 9])
def test_a_per_row_repetition_penalty_counts_each_row_from_its_start(length):
    """Left-padded rows: each row's penalty counts its tokens from its own first column (transformers 5.25
    gives ``prompt_ignore_length`` per row), as transformers' processor does for that row alone."""
    ids, tokens = _tokens(batch=3, length=length, width=length + 5, seed=length)
    starts = torch.tensor([0, min(2, length), length], device=DEVICE)
    tokens.starts.copy_(starts)
    scores = _scores(3, length)
    actual = processors.RepetitionPenalty(1.9, per_row=True)(tokens, scores.clone())
    for row in range(3):
        theirs = hf.RepetitionPenaltyLogitsProcessor(1.9, prompt_ignore_length=int(starts[row]))
        expected = theirs(ids[row : row + 1], scores[row : row + 1].clone())
        assert torch.equal(actual[row : row + 1], expected), row
    assert not torch.equal(actual[0], scores[0])  # the first row counts every token: the penalty bites


def test_sampling_draws_transformers_tokens_and_leaves_the_generator_where_multinomial_does():
    for seed in range(5):
        probs_scores = _scores(4, seed)
        theirs = torch.Generator(DEVICE).manual_seed(seed)
        ours = torch.Generator(DEVICE).manual_seed(seed)
        noise = torch.empty(3, 4, VOCAB, device=DEVICE)
        draws.draw_noise(noise, 3, ours)
        for step in range(3):
            expected = torch.multinomial(torch.softmax(probs_scores + step, -1), 1, generator=theirs)
            assert torch.equal(draws.sampled(probs_scores + step, noise[step]), expected.squeeze(1))
        assert torch.equal(theirs.get_state(), ours.get_state())


def test_a_generator_stands_for_the_global_one_and_takes_its_state_back():
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with draws.generator_as_global(generator):
        drawn = torch.rand(4)
    assert torch.equal(drawn, torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
    # the generator goes on from where the draws inside the context left it
    assert torch.equal(
        torch.rand(2, generator=generator), torch.rand(6, generator=torch.Generator().manual_seed(7))[4:]
    )
    with pytest.raises(TypeError, match="generator"):
        draws.check_generator(7, torch.device("cpu"))
    with pytest.raises(ValueError, match="generator"):
        draws.check_generator(torch.Generator(), torch.device("meta"))


class _EncoderDecoder(GenerationMixin):
    config = SimpleNamespace(is_encoder_decoder=True)


def _encoder_decoder():
    return _EncoderDecoder()


def test_calls_outside_the_loop_are_refused_with_their_reason():
    config = GenerationConfig(cache_implementation="static")
    refusals = {
        "streamer given": {"streamer": object()},
        "custom logits_processor given": {"logits_processor": [hf.TemperatureLogitsWarper(0.5)]},
        "custom stopping_criteria given": {"stopping_criteria": [object()]},
        "assisted generation": {"prompt_lookup_num_tokens": 3},
        "output_scores requested": {"output_scores": True},
        "output_attentions requested": {"output_attentions": True},
        "beam sampling is not on kernl's loop": {"num_beams": 3, "do_sample": True},
        "a generation mode transformers moved to the Hub (group beams, contrastive, DoLa, constraints)": {
            "num_beams": 4,
            "num_beam_groups": 2,
        },
        "use_cache=False": {"use_cache": False},
        "the call names its own cache": {"cache_implementation": "dynamic"},
        "decoder_attention_mask given (it grows every step)": {"decoder_attention_mask": torch.ones(1, 1)},
    }
    for reason, kwargs in refusals.items():
        setting = lambda name, kwargs=kwargs: kwargs.get(name, getattr(config, name, None))  # noqa: E731
        assert settings.call_refusal(_encoder_decoder(), kwargs, setting) == reason
    empty = {"logits_processor": [], "stopping_criteria": [], "num_beams": 3}  # empty lists change nothing
    assert settings.call_refusal(_encoder_decoder(), empty, lambda name: getattr(config, name, None)) is None
    decoder_only = _encoder_decoder()
    decoder_only.config = SimpleNamespace(is_encoder_decoder=False)  # served too
    assert settings.call_refusal(decoder_only, {}, lambda name: getattr(config, name, None)) is None

    class OwnGenerate(_EncoderDecoder):  # Whisper's generate() wraps transformers'
        def generate(self, *args, **kwargs):
            return super().generate(*args, **kwargs)

    reason = settings.call_refusal(OwnGenerate(), {}, lambda name: getattr(config, name, None))
    assert reason == "OwnGenerate has a generate() of its own (kernl's loop runs transformers' generate())"
    kinds = [({}, "greedy"), ({"do_sample": True}, "sampling"), ({"num_beams": 2}, "beam search")]
    for kwargs, kind in kinds:
        assert settings.call_kind(lambda name, kwargs=kwargs: kwargs.get(name)) == kind


def test_prepared_calls_outside_the_loop_are_refused_with_their_reason():
    config = GenerationConfig(max_length=9, eos_token_id=[1, 4], pad_token_id=0, do_sample=True, top_k=3)
    steady = {"encoder_outputs": None, "attention_mask": None, "use_cache": True}
    eos = hf_stopping.EosTokenCriteria(eos_token_id=[1, 4])
    stopping = [hf_stopping.MaxLengthCriteria(9), eos]
    loop = settings.loop_settings(config, [hf.TopKLogitsWarper(3)], stopping, steady, 1, ENCODER_DECODER)
    assert loop == settings.LoopSettings((processors.TopK(3),), True, (1, 4), 0, 1, None)
    without_eos = settings.loop_settings(config, [], stopping[:1], steady, 1, ENCODER_DECODER)
    assert without_eos.eos_token_ids == ()  # no end-of-sequence criterion: rows are never padded
    assert settings.loop_settings(
        config, [hf.SuppressTokensLogitsProcessor([3])], stopping, steady, 1, ENCODER_DECODER
    ) == ("SuppressTokensLogitsProcessor is not on kernl's loop")
    timed = [*stopping, hf_stopping.MaxTimeCriteria(10.0)]
    assert (
        settings.loop_settings(config, [], timed, steady, 1, ENCODER_DECODER)
        == "stopping criterion MaxTimeCriteria"
    )
    growing = {**steady, "decoder_position_ids": None}
    assert (
        settings.loop_settings(config, [], stopping, growing, 1, ENCODER_DECODER)
        == "model arguments decoder_position_ids"
    )
    beams = GenerationConfig(
        max_length=9,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.5,
        pad_token_id=0,
        eos_token_id=[1, 4],
    )
    searched = settings.loop_settings(beams, [], stopping, steady, 2, ENCODER_DECODER)
    assert searched.beams == BeamSettings(
        num_beams=3, length_penalty=0.5, early_stopping=False, num_return_sequences=2, eos_token_ids=(1, 4),
        pad_token_id=0, max_new_tokens=7,
    )  # fmt: skip
    sampled_beams = GenerationConfig(max_length=9, num_beams=2, do_sample=True)
    assert settings.loop_settings(sampled_beams, [], stopping, steady, 1, ENCODER_DECODER) == (
        "generation mode beam_sample is not on kernl's loop"
    )


def test_decoder_only_step_arguments_are_held_steady_as_transformers_grows_them():
    """After the prefill transformers' mask and positions are one column past the prompt and grow by one a
    step; the loop holds the mask at the cache's width (new columns ones) and the next positions, per row."""
    arguments = DecoderOnlyArguments()
    mask = torch.tensor(
        [[1, 1, 1, 1], [0, 0, 1, 1]]
    )  # the second row left-padded; the last column: the new token
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    prepared = {"attention_mask": mask, "position_ids": positions, "logits_to_keep": 1, "use_cache": True}
    assert arguments.refusal(prepared) is None
    steady = arguments.steady(prepared, room=7)
    assert torch.equal(steady["attention_mask"], torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]))
    assert torch.equal(steady["position_ids"], torch.tensor([[3], [1]]))
    arguments.advance(steady)
    assert torch.equal(steady["position_ids"], torch.tensor([[4], [2]]))
    assert torch.equal(positions[:, -1:], torch.tensor([[3], [1]]))  # transformers' tensor untouched
    without_mask = arguments.steady({"attention_mask": None, "position_ids": positions[:1]}, room=7)
    assert without_mask["attention_mask"] is None and torch.equal(
        without_mask["position_ids"], torch.tensor([[3]])
    )
    assert arguments.refusal({**prepared, "inputs_embeds": None}) == "model arguments inputs_embeds"
    three_d = {**prepared, "position_ids": positions[None]}  # a model with several position axes
    assert arguments.refusal(three_d) == "position_ids is not a 2-D tensor"
    assert EncoderDecoderArguments().refusal(prepared) == "model arguments logits_to_keep, position_ids"
    # a launch past max_length must not feed a position a table of learned positions (GPT-2's) lacks
    for kind in (DecoderOnlyArguments, EncoderDecoderArguments):
        assert kind(16).length_refusal(16) is None and kind().length_refusal(10**6) is None
        assert "max_position_embeddings (16)" in kind(16).length_refusal(17)


def test_the_report_lists_each_call_kinds_loops_once():
    report = OptimizationReport()
    report.note_loop("greedy", "kernl's loop")
    report.note_loop("greedy", "kernl's loop")
    report.note_loop("sampling", "transformers' loop: streamer given")
    report.note_loop("greedy", "transformers' loop: streamer given")
    assert report.generate_loops == {
        "greedy": ["kernl's loop", "transformers' loop: streamer given"],
        "sampling": ["transformers' loop: streamer given"],
    }
    text = str(report)
    assert "generate() sampling: transformers' loop: streamer given" in text
    assert report.to_dict()["generate_loops"] == report.generate_loops
