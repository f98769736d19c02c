"""kernl's decode loop inside ``generate()`` of optimized decoder-only models (GPT-2, Llama with grouped
key/value heads, Mistral, Qwen2): Hugging Face's tokens for greedy, seeded sampling and beam search over
left-padded prompts, rows ending at different steps, ``min_new_tokens``, the logits processors, launches
running past ``max_length``; the report says kernl's loop ran, and a call outside its set runs transformers'
loop with the reason."""

import copy

import pytest
import torch
from transformers import (
    GenerationMixin,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
)

from kernl.integration import hf_compat, optimize_model
from kernl.integration.decode.step_arguments import DecoderOnlyArguments
from kernl.integration.hf_compat import CACHE_NAME
from kernl_testing import decode_checks as checks
from kernl_testing import on_gpu

DEVICE, DTYPE = checks.DEVICE, checks.DTYPE
VOCAB = 100
PAD, BOS, EOS = 0, 1, 2


def _llama_like(config_class, kv_heads: int, **extra):
    """hidden 64, 4 query heads of 16 over ``kv_heads`` key/value heads, 2 layers, vocabulary 100."""
    return config_class(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False, **extra,
    )  # fmt: skip


FAMILIES = {
    "gpt2": lambda: (
        GPT2LMHeadModel,
        GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=128,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        ),
    ),  # fmt: skip
    "llama-kv4": lambda: (LlamaForCausalLM, _llama_like(LlamaConfig, kv_heads=4)),  # 1 query head a key head
    "llama-kv1": lambda: (LlamaForCausalLM, _llama_like(LlamaConfig, kv_heads=1)),  # 4 query heads a key head
    "mistral": lambda: (MistralForCausalLM, _llama_like(MistralConfig, kv_heads=2, sliding_window=None)),
    "qwen2": lambda: (Qwen2ForCausalLM, _llama_like(Qwen2Config, kv_heads=2)),
}


def _pair(family: str, **config_changes):
    """(optimized, reference): a tiny model of ``family`` with random weights whose greedy tokens depend on
    the prompt (logits ~ N(0, 1); the pad, start and end tokens' logits 0, rarely the largest), optimized,
    and the same model as Hugging Face runs it."""
    model_class, config = FAMILIES[family]()
    for name, value in config_changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.normal_(0, 1.0 / config.hidden_size**0.5, generator=torch.Generator().manual_seed(1))
        head[:3] = 0
    optimized = copy.deepcopy(model).to(DEVICE, DTYPE)
    optimize_model(optimized)
    return optimized, model.to(DEVICE, DTYPE)


def _prompt(seed: int = 0, lengths=(7, 4)):
    """Left-padded prompts: row ``i`` holds ``lengths[i]`` real tokens at its end, pad tokens before."""
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return ids.masked_fill(mask == 0, PAD).to(DEVICE), mask.to(DEVICE)


def test_steady_step_arguments_give_each_step_the_mask_and_positions_transformers_grows():
    """transformers' own ``_update_model_kwargs_for_generation`` and ``prepare_inputs_for_generation``
    (this release's) against the loop's steady arguments, step after step: the same positions fed, the
    same 4-D mask over the static cache (guards the transformers internals the loop relies on)."""
    model = _pair("llama-kv4")[1]
    ids, mask = _prompt(seed=6)
    batch, prompt = ids.shape
    room = prompt + 6
    cache = StaticCache(config=model.config, max_cache_len=room)
    with torch.inference_mode():
        prepared = {
            "attention_mask": mask,
            "position_ids": model._prepare_position_ids_for_generation(ids, {"attention_mask": mask}),
            "use_cache": True,
            CACHE_NAME: cache,
        }
        model(input_ids=ids, **prepared)  # the prefill fills the cache: its length is the prompt's
        arguments = DecoderOnlyArguments()
        grown = GenerationMixin._update_model_kwargs_for_generation(model, {}, prepared)
        steady = arguments.steady(grown, room)
        token = ids[:, -1:]
        for _ in range(3):
            theirs = model.prepare_inputs_for_generation(token, next_sequence_length=1, **grown)
            ours = hf_compat.step_inputs(model, token, steady)
            assert torch.equal(ours["position_ids"], theirs["position_ids"])
            assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
            assert ours["attention_mask"].shape == (batch, 1, 1, room)
            model(**theirs)  # one step: the cache's length goes on
            grown = GenerationMixin._update_model_kwargs_for_generation(model, {}, grown)
            arguments.advance(steady)
    assert not ours["attention_mask"][1, 0, 0, : prompt - 4].any()  # the second row's left padding


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_seeded_sampling_and_beams_give_hugging_face_tokens(family):
    """Left-padded prompts: each row's positions start at its first real token, its padding masked."""
    checks.greedy_sampling_and_beams(*_pair(family), *_prompt(), max_new_tokens=3)


@pytest.fixture(scope="module")
def llama_pair():
    return _pair("llama-kv1")


def test_rows_end_on_eos_at_different_steps_then_emit_pad(llama_pair):
    """The end-of-sequence token is one a row emits at an early step and the other later or never: that
    row ends first and pads; once both rows ended the call stops short of max_new_tokens; min_new_tokens
    holds the end back."""
    optimized, reference = llama_pair
    ids, mask = _prompt(seed=1)
    checks.rows_end_on_eos_at_different_steps(optimized, reference, ids, mask, max_new_tokens=6)


def test_processors_read_the_left_padded_rows_as_hugging_face_does(llama_pair):
    """repetition_penalty (transformers 5.25 counts each row from its first real token, 5.17 from the
    first column) and no_repeat_ngram_size, greedy, sampled and in beam search."""
    optimized, reference = llama_pair
    ids, mask = _prompt(seed=2)
    ids[:, -3:] = ids[:, -4:-3]  # a repeated token in every row's real tokens: the penalty bites
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    checks.same_tokens(
        optimized, reference, **base, do_sample=False, repetition_penalty=1.6, no_repeat_ngram_size=2
    )
    checks.same_tokens(
        optimized, reference, seed=4, **base, do_sample=True, repetition_penalty=0.7, top_k=0, top_p=0.8
    )
    checks.same_tokens(optimized, reference, **base, do_sample=False, num_beams=2, repetition_penalty=1.4)
    checks.only_kernl_loop(optimized, ["greedy", "sampling", "beam search"])


def test_unpadded_prompts_return_dict_and_launches_past_max_length(llama_pair):
    """A prompt without padding (transformers then drops the mask), ``return_dict_in_generate``, and
    launches of the full number of steps (as on the GPU, where a capture fixes them), the last one running
    past max_length into the cache's spare positions."""
    optimized, reference = llama_pair
    ids = _prompt(seed=3, lengths=(5, 5))[0]
    out = checks.same_tokens(
        optimized, reference, input_ids=ids, do_sample=False, max_new_tokens=3, return_dict_in_generate=True
    )
    assert type(out).__name__ == "GenerateDecoderOnlyOutput" and out.scores is None
    ids, mask = _prompt(seed=3)
    with checks.launches_of_full_chunks(optimized):
        checks.same_tokens(
            optimized, reference, input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=2
        )
    checks.only_kernl_loop(optimized, ["greedy"])


def test_calls_outside_the_loop_run_transformers_loop_and_the_report_says_why(llama_pair):
    optimized, reference = llama_pair
    ids, mask = _prompt(seed=4)
    checks.a_streamer_runs_transformers_loop(
        optimized, reference, input_ids=ids, attention_mask=mask, max_new_tokens=3
    )
    base = dict(attention_mask=mask, do_sample=False, max_new_tokens=3)
    with torch.inference_mode():
        embeds = reference.get_input_embeddings()(ids)
    # inputs_embeds: known only once generate() prepared it
    checks.same_tokens(optimized, reference, inputs_embeds=embeds, **base)
    loops = optimized.kernl_report.generate_loops["greedy"]
    assert "transformers' loop: model arguments inputs_embeds" in loops, loops


def test_a_sliding_window_cache_runs_transformers_loop_and_the_report_says_why():
    """Mistral with a window shorter than the generation: its static cache's sliding layers keep their
    length in a Python int, which a captured chunk of steps would replay stale."""
    optimized, reference = _pair("mistral", sliding_window=4)
    ids, mask = _prompt(seed=5)
    checks.same_tokens(
        optimized, reference, input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3
    )
    loops = optimized.kernl_report.generate_loops["greedy"]
    assert len(loops) == 1 and loops[0].startswith(
        "transformers' loop: the static cache has sliding-window"
    ), loops


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunks_of_steps_are_captured_and_match_the_loop_without_cuda_graphs(dtype):
    """On the GPU: a launch replays a chunk of steps captured once per cache and settings, and gives bit
    for bit the tokens of the same loop run without CUDA graphs, call after call."""
    model_class, config = FAMILIES["llama-kv1"]()
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").eval().to(DEVICE, dtype)
    checks.chunks_match_the_loop_without_cuda_graphs(model, _prompt)


@pytest.mark.skipif(not on_gpu() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_chunks_of_a_model_on_a_gpu_that_is_not_current_are_captured_on_its_gpu():
    """A capture and its replays act on the current device's stream: with the first GPU current, the chunks
    of a model on the second are captured there (not an empty graph on the first, whose replays would leave
    the tokens as they are) and give the tokens of the loop without CUDA graphs, call after call."""
    model_class, config = FAMILIES["llama-kv1"]()
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").eval().to("cuda:1", torch.float16)
    with_graphs, without = copy.deepcopy(model), copy.deepcopy(model)
    optimize_model(with_graphs)
    optimize_model(without, cuda_graphs=False)
    arguments = dict(max_new_tokens=19, min_new_tokens=19, do_sample=False)
    with torch.cuda.device(0), torch.inference_mode():
        for seed in range(3):
            ids, mask = (t.to("cuda:1") for t in _prompt(seed))
            replayed = with_graphs.generate(ids, attention_mask=mask, **arguments)
            direct = without.generate(ids, attention_mask=mask, **arguments)
            assert replayed.shape == (2, 7 + 19) and torch.equal(replayed, direct), seed
    (state,) = with_graphs.kernl_decode_loop.states.values()
    (capture,) = state.graphs.captures.values()
    assert capture.graph is not None, capture.error
