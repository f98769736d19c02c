"""kernl's decode loop inside ``generate()`` of optimized encoder-decoder models: the tokens of Hugging Face's
generate() for greedy and seeded sampling, rows ending at different steps, padded prompts, the logits
processors it runs on the device, and calls outside its set running transformers' loop, with the report
saying which loop ran and why."""

import copy

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LogitsProcessorList,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    TemperatureLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from kernl.integration import optimize_model
from kernl.integration.decode import loop as decode_loop
from kernl_testing import on_gpu

DEVICE = "cuda" if on_gpu() else "cpu"
DTYPE = torch.float16 if on_gpu() else torch.float32
VOCAB = 120
KERNL_LOOP = "kernl's loop"


def _t5(feed_forward_proj: str):
    return T5ForConditionalGeneration, T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj=feed_forward_proj, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )  # fmt: skip


def _mt5():
    return MT5ForConditionalGeneration, MT5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


def _bart():
    return BartForConditionalGeneration, BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        forced_eos_token_id=None,
    )  # fmt: skip


FAMILIES = {"t5-relu": lambda: _t5("relu"), "t5-gated": lambda: _t5("gated-gelu"), "mt5": _mt5, "bart": _bart}


def _pair(family: str):
    """(optimized, reference): a tiny model of ``family`` with random weights whose greedy tokens depend on
    the prompt (logits ~ N(0, 1)), optimized, and the same model as Hugging Face runs it."""
    model_class, config = FAMILIES[family]()
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.125, generator=torch.Generator().manual_seed(1))
    optimized = copy.deepcopy(model).to(DEVICE, DTYPE)
    optimize_model(optimized)
    return optimized, model.to(DEVICE, DTYPE)


def _prompt(seed: int = 0, lengths=(9, 5)):
    """Two right-padded prompts of 9 tokens (the second one's last 4 masked)."""
    ids = torch.randint(5, VOCAB, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def _same(optimized, reference, seed=None, **arguments):
    """generate() on both models (sampling: kernl's with ``generator=``, HF's from the global generator,
    both seeded with ``seed``); asserts the same tokens (fp32 on the CPU; in fp16 a near tie may flip one)
    and returns kernl's output."""
    with torch.inference_mode():
        if seed is not None:
            generator = torch.Generator(DEVICE).manual_seed(seed)
            ours = optimized.generate(generator=generator, **arguments)
            torch.manual_seed(seed)
        else:
            ours = optimized.generate(**arguments)
        theirs = reference.generate(**arguments)
    ours_ids, theirs_ids = (getattr(out, "sequences", out) for out in (ours, theirs))
    assert ours_ids.shape == theirs_ids.shape or on_gpu(), (ours_ids.shape, theirs_ids.shape)
    assert on_gpu() or torch.equal(ours_ids, theirs_ids), (ours_ids, theirs_ids)
    return ours


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_and_seeded_sampling_give_hugging_face_tokens(family):
    optimized, reference = _pair(family)
    ids, mask = _prompt()
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    _same(optimized, reference, **base, do_sample=False)
    _same(optimized, reference, seed=3, **base, do_sample=True, temperature=0.8, top_k=30, top_p=0.9)
    _same(optimized, reference, **base, do_sample=False, num_beams=3, num_return_sequences=2)
    loops = optimized.kernl_report.generate_loops
    assert [kind for kind in loops] == ["greedy", "sampling", "beam search"], loops
    assert all(outcomes[0].startswith(KERNL_LOOP) and len(outcomes) == 1 for outcomes in loops.values()), (
        loops
    )


@pytest.fixture(scope="module")
def t5_pair():
    return _pair("t5-gated")


def _ending_token(free: torch.Tensor) -> tuple[int, int, int]:
    """``(token, row, step)``: a token one row of ``free`` (greedy tokens of two rows, no end of sequence)
    emits first at ``step`` >= 1 and the other row not by ``step + 1``: as the end-of-sequence token, it
    ends that row alone at that step."""
    rows = [free[row, 1:].tolist() for row in range(2)]
    for step in range(1, len(rows[0]) - 2):
        for row in range(2):
            token = rows[row][step]
            if token not in rows[row][:step] and token not in rows[1 - row][: step + 2]:
                return token, row, step
    raise AssertionError(f"no token ends one row alone: {rows}")


def test_rows_end_on_eos_at_different_steps_then_emit_pad(t5_pair):
    """The end-of-sequence token is set to a token one row emits at an early step and the other later or
    never: that row ends first and pads; once every row has ended the call stops short of max_new_tokens."""
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=1)
    base = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=7)
    with torch.inference_mode():
        free = reference.generate(**base, eos_token_id=None)  # nothing ends: every token
    eos, row, step = _ending_token(free)
    out = _same(optimized, reference, **base, eos_token_id=eos)
    pad = optimized.generation_config.pad_token_id
    if not on_gpu():
        assert out[row, step + 2 :].eq(pad).all() and not out[1 - row, step + 2 :].eq(pad).all(), out
    # both rows end: the other row's next token ends it too
    out = _same(optimized, reference, **base, eos_token_id=[eos, free[1 - row, step + 2].item()])
    assert on_gpu() or out.shape[1] < 1 + 7
    # min_new_tokens holds the end back
    _same(optimized, reference, **base, eos_token_id=eos, min_new_tokens=5)
    loops = optimized.kernl_report.generate_loops["greedy"]
    assert all(outcome.startswith(KERNL_LOOP) for outcome in loops), loops


def test_processors_run_on_the_loop_with_hugging_face_tokens(t5_pair):
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=2)
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    settings = [
        dict(do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2),
        dict(do_sample=False, forced_bos_token_id=7, forced_eos_token_id=9, min_length=4),
        dict(
            do_sample=True,
            repetition_penalty=0.8,
            no_repeat_ngram_size=3,
            temperature=1.3,
            top_k=0,
            top_p=0.7,
        ),
    ]
    for index, setting in enumerate(settings):
        out = _same(optimized, reference, seed=index if setting["do_sample"] else None, **base, **setting)
        if not on_gpu() and "forced_bos_token_id" in setting:
            assert out[:, 1].eq(7).all() and out[:, -1].eq(9).all()
    loops = optimized.kernl_report.generate_loops
    assert all(outcome.startswith(KERNL_LOOP) for outcomes in loops.values() for outcome in outcomes), loops


def test_beam_search_gives_hugging_face_tokens(t5_pair):
    """num_beams, num_return_sequences, length_penalty, early_stopping, rows whose beams end on EOS, and a
    processor reading the beams' reordered sequences."""
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=5)
    base = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5)
    with torch.inference_mode():
        free = reference.generate(**base, eos_token_id=None)
    eos = [free[0, 2].item(), free[1, 3].item()]  # tokens the rows' greedy paths meet early
    settings = [
        dict(num_beams=3, num_return_sequences=3, length_penalty=0.6),
        dict(num_beams=2, eos_token_id=eos, early_stopping=True),
        dict(
            num_beams=3, eos_token_id=eos, early_stopping="never", length_penalty=1.5, repetition_penalty=1.4
        ),
    ]
    for setting in settings:
        _same(optimized, reference, **base, **setting)
    # return_dict_in_generate: the sequences, beam_indices (traced back by the search) and the cache
    out = _same(optimized, reference, **base, **settings[1], return_dict_in_generate=True)
    with torch.inference_mode():
        expected = reference.generate(**base, **settings[1], return_dict_in_generate=True)
    assert on_gpu() or torch.equal(out.beam_indices, expected.beam_indices)
    assert out.sequences_scores is None and out.past_key_values is not None
    loops = optimized.kernl_report.generate_loops["beam search"]
    assert all(outcome.startswith(KERNL_LOOP) for outcome in loops), loops


def test_return_dict_in_generate_and_launches_that_run_past_max_length(t5_pair):
    """``return_dict_in_generate``: the sequences and the cache; and launches of the full number of steps
    (as on the GPU, where a capture fixes them), the last one running past max_length, give the same
    tokens."""
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=3)
    base = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3)
    out = _same(optimized, reference, **base, return_dict_in_generate=True)
    assert out.scores is None and out.past_key_values is not None
    loop = optimized.kernl_decode_loop
    exact = loop.exact_launches
    loop.exact_launches = False
    try:
        _same(optimized, reference, **base)
    finally:
        loop.exact_launches = exact
    assert decode_loop.EXTRA_CACHE_POSITIONS == decode_loop.STEPS_PER_LAUNCH - 1


class _Recorder(BaseStreamer):
    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens.append(value)

    def end(self):
        pass


def test_calls_outside_the_loop_run_transformers_loop_and_the_report_says_why(t5_pair):
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=4)
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    streamer = _Recorder()
    _same(optimized, reference, **base, do_sample=False, streamer=streamer)
    assert len(streamer.tokens) >= 3  # transformers' loop fed it
    custom = LogitsProcessorList([TemperatureLogitsWarper(0.5)])
    _same(optimized, reference, seed=5, **base, do_sample=True, logits_processor=custom)
    _same(optimized, reference, **base, do_sample=False, suppress_tokens=[4, 5])  # known only once prepared
    loops = optimized.kernl_report.generate_loops
    assert "transformers' loop: streamer given" in loops["greedy"], loops
    assert "transformers' loop: SuppressTokensLogitsProcessor is not on kernl's loop" in loops["greedy"], (
        loops
    )
    assert "transformers' loop: custom logits_processor given" in loops["sampling"], loops
    _same(optimized, reference, seed=6, **base, do_sample=True, num_beams=2)  # beam sampling, seeded
    assert "transformers' loop: beam sampling is not on kernl's loop" in loops["beam sampling"], loops
    assert "generate() greedy: " in str(optimized.kernl_report)
    with torch.inference_mode(), pytest.raises(TypeError, match="generator"):
        optimized.generate(**base, do_sample=True, generator=5)


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
def test_chunks_of_steps_are_captured_and_match_the_loop_without_cuda_graphs():
    """On the GPU: a launch replays a chunk of steps captured once per cache and settings, and gives bit
    for bit the tokens of the same loop run without CUDA graphs, call after call."""
    model_class, config = FAMILIES["t5-gated"]()
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").eval().to(DEVICE, DTYPE)
    with_graphs, without = copy.deepcopy(model), copy.deepcopy(model)
    optimize_model(with_graphs)
    optimize_model(without, cuda_graphs=False)
    for seed in range(3):
        ids, mask = _prompt(seed)
        for setting in (dict(do_sample=False), dict(do_sample=True, top_k=20)):
            arguments = dict(
                input_ids=ids, attention_mask=mask, max_new_tokens=19, min_new_tokens=19, **setting
            )
            with torch.inference_mode():
                replayed = with_graphs.generate(
                    generator=torch.Generator(DEVICE).manual_seed(seed), **arguments
                )
                direct = without.generate(generator=torch.Generator(DEVICE).manual_seed(seed), **arguments)
            assert torch.equal(replayed, direct), (seed, setting)
    states = with_graphs.kernl_decode_loop.states
    assert len(states) == 1
    captures = next(iter(states.values())).graphs.captures
    assert len(captures) == 2 and all(capture.graph is not None for capture in captures.values())
    loops = with_graphs.kernl_report.generate_loops
    assert loops["greedy"] == [f"kernl's loop ({decode_loop.STEPS_PER_LAUNCH} steps per CUDA graph launch)"]
