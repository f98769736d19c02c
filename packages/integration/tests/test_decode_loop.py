"""kernl's decode loop inside ``generate()`` of optimized encoder-decoder models: the tokens of Hugging Face's
generate() for greedy and seeded sampling, rows ending at different steps, padded prompts, the logits
processors it runs on the device, and calls outside its set running transformers' loop, with the report
saying which loop ran and why."""

import copy
import warnings

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

from kernl.integration import optimize_model
from kernl.integration.decode import loop as decode_loop
from kernl_testing import decode_checks as checks
from kernl_testing import on_gpu

DEVICE, DTYPE = checks.DEVICE, checks.DTYPE
VOCAB = 120


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_seeded_sampling_and_beams_give_hugging_face_tokens(family):
    """Right-padded prompts, the second row's padding masked. No capture fails (on the GPU: BART's fp16
    encoder had a host read, its overflow check, that failed the encoder's capture)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized, reference = _pair(family)
        checks.greedy_sampling_and_beams(optimized, reference, *_prompt(), max_new_tokens=4)
    failed = [str(w.message) for w in caught if "capture failed" in str(w.message)]
    assert not failed, failed
    assert all(graph.error is None for graph in optimized.kernl_report.graphs), str(optimized.kernl_report)


@pytest.fixture(scope="module")
def t5_pair():
    return _pair("t5-gated")


def test_rows_end_on_eos_at_different_steps_then_emit_pad(t5_pair):
    """The end-of-sequence token is set to a token one row emits at an early step and the other later or
    never: that row ends first and pads; once every row has ended the call stops short of max_new_tokens."""
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=1)
    checks.rows_end_on_eos_at_different_steps(optimized, reference, ids, mask, max_new_tokens=7)


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
        out = checks.same_tokens(
            optimized, reference, seed=index if setting["do_sample"] else None, **base, **setting
        )
        if not on_gpu() and "forced_bos_token_id" in setting:
            assert out[:, 1].eq(7).all() and out[:, -1].eq(9).all()
    checks.only_kernl_loop(optimized, ["greedy", "sampling"])


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
        checks.same_tokens(optimized, reference, **base, **setting)
    # return_dict_in_generate: the sequences, beam_indices (traced back by the search) and the cache
    out = checks.same_tokens(optimized, reference, **base, **settings[1], return_dict_in_generate=True)
    with torch.inference_mode():
        expected = reference.generate(**base, **settings[1], return_dict_in_generate=True)
    assert on_gpu() or torch.equal(out.beam_indices, expected.beam_indices)
    assert out.sequences_scores is None and out.past_key_values is not None
    checks.only_kernl_loop(optimized, ["beam search"])


def test_return_dict_in_generate_and_launches_that_run_past_max_length(t5_pair):
    """``return_dict_in_generate``: the sequences and the cache; and launches of the full number of steps
    (as on the GPU, where a capture fixes them), the last one running past max_length, give the same
    tokens."""
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=3)
    base = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3)
    out = checks.same_tokens(optimized, reference, **base, return_dict_in_generate=True)
    assert out.scores is None and out.past_key_values is not None
    with checks.launches_of_full_chunks(optimized):
        checks.same_tokens(optimized, reference, **base)
    checks.only_kernl_loop(optimized, ["greedy"])
    assert decode_loop.EXTRA_CACHE_POSITIONS == decode_loop.STEPS_PER_LAUNCH - 1


def test_calls_outside_the_loop_run_transformers_loop_and_the_report_says_why(t5_pair):
    optimized, reference = t5_pair
    ids, mask = _prompt(seed=4)
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    checks.a_streamer_runs_transformers_loop(optimized, reference, **base)
    custom = LogitsProcessorList([TemperatureLogitsWarper(0.5)])
    checks.same_tokens(optimized, reference, seed=5, **base, do_sample=True, logits_processor=custom)
    # suppress_tokens: the processor is known only once generate() prepared it
    checks.same_tokens(optimized, reference, **base, do_sample=False, suppress_tokens=[4, 5])
    loops = optimized.kernl_report.generate_loops
    assert "transformers' loop: SuppressTokensLogitsProcessor is not on kernl's loop" in loops["greedy"], (
        loops
    )
    assert "transformers' loop: custom logits_processor given" in loops["sampling"], loops
    checks.same_tokens(
        optimized, reference, seed=6, **base, do_sample=True, num_beams=2
    )  # beam sampling, seeded
    assert "transformers' loop: beam sampling is not on kernl's loop" in loops["beam sampling"], loops
    assert "generate() greedy: " in str(optimized.kernl_report)
    with torch.inference_mode(), pytest.raises(TypeError, match="generator"):
        optimized.generate(**base, do_sample=True, generator=5)


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["t5-gated", "bart"])
def test_chunks_of_steps_are_captured_and_match_the_loop_without_cuda_graphs(family):
    """On the GPU: a launch replays a chunk of steps captured once per cache and settings, and gives bit
    for bit the tokens of the same loop run without CUDA graphs, call after call (BART: learned
    positions read at the cache's device-side length)."""
    model_class, config = FAMILIES[family]()
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").eval().to(DEVICE, DTYPE)
    checks.chunks_match_the_loop_without_cuda_graphs(model, _prompt)
