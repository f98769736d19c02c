"""optimize_model on decoder-only models (GPT-2, Llama, Mistral, Qwen2): the forward without a cache on
kernl (under CUDA graphs on a GPU), generate() over a static cache on kernl, a dynamic cache as PyTorch;
the same logits, caches and generated tokens as Hugging Face."""

import copy
import warnings

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kernl.integration import optimize_model
from kernl.integration.decoder_only import DYNAMIC_CACHE_NOTE, SLIDING_CACHE_NOTE
from kernl.integration.hf_compat import CACHE_NAME
from kernl_testing import assert_matches_reference, on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32
LAYERS = 2
SCALE = 4.0  # whole-model outputs compound each layer's rounding (see test_t5.py)
VOCAB = 100
LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def llama_like(config_class, kv_heads: int = 2, **extra):
    """hidden 64, 4 heads of 16, ``kv_heads`` key/value heads, 2 layers, vocabulary 100."""
    return config_class(
        hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra,
    )  # fmt: skip


FAMILIES = {
    "gpt2": (
        GPT2LMHeadModel,
        GPT2Config(
            n_embd=64,
            n_layer=LAYERS,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),  # fmt: skip
    "llama": (LlamaForCausalLM, llama_like(LlamaConfig)),
    "mistral": (MistralForCausalLM, llama_like(MistralConfig, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, llama_like(Qwen2Config)),
}


def left_padded(batch: int, length: int, lengths, seed: int = 0):
    """``input_ids`` and an ``attention_mask`` with each row's real tokens at its end (left padding),
    tokens never the pad, start or end token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, length - real :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def build(kit, family: str, config=None):
    model_class, default = FAMILIES[family]
    model = kit.build(model_class, config or default)
    with torch.no_grad():  # logits ~ N(0, 1): greedy tokens that depend on the prompt, no near ties
        head = model.get_output_embeddings().weight
        head.normal_(0, 1.0 / model.config.hidden_size**0.5, generator=torch.Generator().manual_seed(1))
        head[:3] = -1  # never the pad, start or end token: every call generates its full length
    return model


def same_tokens(tokens, expected) -> bool:
    """Greedy tokens equal HF's; fp16 on the GPU: a near tie between two logits may flip a token."""
    return tokens.shape == expected.shape and (torch.equal(tokens, expected) or on_gpu())


PREFILL_CASES = [(family, DTYPE) for family in FAMILIES] + (
    [("llama", torch.bfloat16), ("gpt2", torch.bfloat16)]
    if on_gpu()
    else []  # bf16 is wrong in the interpreter
)


@pytest.mark.parametrize("family, dtype", PREFILL_CASES)
def test_prefill_matches_hugging_face(kit, family, dtype):
    model = build(kit, family)
    ids, mask = left_padded(2, 9, [9, 5])
    calls = [dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids[:1, :6], use_cache=False)]
    report = kit.compare_with_reference(model, dtype, calls, [], SCALE, ["logits"])
    assert len(report.graphs) == 2 and all(graph.error is None for graph in report.graphs), str(report)
    expected_runs_as = "CUDA graph (whole forward)" if on_gpu() else "rewritten graph, no CUDA graph"
    assert all(graph.runs_as.startswith(expected_runs_as) for graph in report.graphs), str(report)
    norms = "layer_norm" if family == "gpt2" else "rms_norm"
    assert all(graph.fired[norms] == 2 * LAYERS + 1 for graph in report.graphs), str(report)
    assert family == "gpt2" or report.graphs[0].fired["gated_ffn"] == LAYERS
    # 4 query heads over 2 key/value heads: the kernel reads them in place, masked or not
    grouped = [graph.fired.get("attention_gqa", 0) for graph in report.graphs]
    assert grouped == [0 if family == "gpt2" else LAYERS] * 2, str(report)
    rotary = [graph.fired.get("rotary", 0) for graph in report.graphs]  # q's and k's in one launch
    assert rotary == [0 if family == "gpt2" else LAYERS] * 2, str(report)
    if not on_gpu():  # the left-padded causal mask, proven by replay (transformers 5.25's spelling)
        assert report.graphs[0].attention_masks == {"key padding [B, K] + causal": LAYERS}, str(report)
    if family == "gpt2":  # Conv1D projections, gelu_new written out and the residual adds: all fused
        assert all(graph.fired["conv1d"] == 4 * LAYERS and graph.kept == {} for graph in report.graphs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_matches_hugging_face(kit, family):
    model = build(kit, family)
    ids, mask = left_padded(2, 9, [9, 5])
    optimized = copy.deepcopy(model).to(kit.device, DTYPE)
    report = optimize_model(optimized)
    reference = model.to(kit.device, DTYPE)
    arguments = dict(max_new_tokens=4, do_sample=False)
    # The first call's prefill allocates the static cache (PyTorch); its steps run on kernl's decode loop,
    # which compiles the step graph and runs its first chunk of steps as the capture's warm-up. The second
    # call reuses the cache: its prefill compiles (a new key of the whole-step graphs, whose first call is
    # its warm-up: it updates the cache in place) and its chunk is captured; the third call's prefill is
    # captured, and every later call replays both.
    for _ in range(3):
        with torch.inference_mode():
            tokens = optimized.generate(ids.to(kit.device), attention_mask=mask.to(kit.device), **arguments)
            expected = reference.generate(ids.to(kit.device), attention_mask=mask.to(kit.device), **arguments)
        assert same_tokens(tokens, expected), (tokens, expected)
    assert [graph.part for graph in report.graphs] == ["decoder", "decoder"], str(report)
    assert all(graph.error is None for graph in report.graphs), str(report)
    norms = "layer_norm" if family == "gpt2" else "rms_norm"
    assert all(graph.fired[norms] == 2 * LAYERS + 1 for graph in report.graphs), str(report)
    if family == "llama":  # the step reads the 2 key/value heads, not repeat_kv's copies of the cache
        assert report.graphs[0].fired["attention_gqa_decode"] == LAYERS, str(report)
        assert report.graphs[1].fired["attention_gqa"] == LAYERS, str(report)  # the prefill: no repeat_kv
        assert all(graph.fired["rotary"] == LAYERS for graph in report.graphs), str(report)
    if on_gpu():  # the prefill captured whole, and the loop's chunk of steps
        captures = optimized.kernl_decoder_graphs.captures
        assert len(captures) == 1 and all(c.graph is not None for c in captures.values()), captures
        (state,) = optimized.kernl_decode_loop.states.values()
        chunks = state.graphs.captures
        assert len(chunks) == 1 and all(c.graph is not None for c in chunks.values()), chunks
    assert report.generate_loops["greedy"][0].startswith("kernl's loop"), report.generate_loops


def test_past_the_recompile_limit_a_decoder_warns_and_runs_as_pytorch(kit):
    """The forward without a cache and generate()'s decoder step compile code of their own: a limit
    reached is said (warning, report) and the call runs as PyTorch, never silently unoptimized."""
    model = build(kit, "llama")
    optimized, peer = (copy.deepcopy(model).to(kit.device, DTYPE) for _ in range(2))
    report = optimize_model(optimized)
    ids, mask = left_padded(2, 9, [9, 5], seed=5)
    arguments = dict(attention_mask=mask.to(kit.device), max_new_tokens=3, do_sample=False)
    with torch.inference_mode(), torch._dynamo.config.patch(**{LIMIT: 1}):
        optimized(input_ids=ids[:1, :6].to(kit.device), use_cache=False)  # the forward's one graph
        with pytest.warns(UserWarning, match=r"recompile limit \(1\) reached for the decoder-only forward"):
            beyond = optimized(input_ids=ids.to(kit.device), use_cache=False)
        same = peer(input_ids=ids.to(kit.device), use_cache=False)
        torch.testing.assert_close(beyond.logits, same.logits)  # HF's own forward, in the same dtype
        first = optimized.generate(ids.to(kit.device), **arguments)  # the step's one graph
        with pytest.warns(UserWarning, match=r"recompile limit \(1\) reached for the decoder step forward"):
            second = optimized.generate(ids.to(kit.device), **arguments)  # its prefill: past the limit
        expected_tokens = peer.generate(ids.to(kit.device), **arguments)
    assert same_tokens(first, expected_tokens) and same_tokens(second, expected_tokens)
    assert [graph.part for graph in report.graphs] == ["forward", "decoder"], str(report)
    assert sum("recompile limit (1) reached" in note for note in report.notes) == 2, str(report)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_attention_ratios(kit, kv_heads):
    model = kit.build(LlamaModel, llama_like(LlamaConfig, kv_heads=kv_heads))
    ids, mask = left_padded(2, 7, [7, 4], seed=kv_heads)
    calls = [dict(input_ids=ids, attention_mask=mask, use_cache=False), dict(input_ids=ids)]
    report = kit.compare_with_reference(model, DTYPE, calls, ["last_hidden_state"], SCALE)
    assert all(graph.error is None for graph in report.graphs), str(report)
    # Grouped heads reach the kernel without repeat_kv copies either way: through attention_gqa where
    # transformers repeats the heads, or through attention_sdpa where it passes enable_gqa=True (5.17)
    assert all(
        graph.fired["attention_gqa"] + graph.fired["attention_sdpa"] == LAYERS for graph in report.graphs
    ), str(report)
    if kv_heads == 4:  # one key/value head per query head: nothing to group
        assert all(graph.fired["attention_gqa"] == 0 for graph in report.graphs), str(report)
    # transformers 5.17's rotary embedding takes its angles as one (D/2 x 1) @ (1 x S) matmul: PyTorch's
    assert all(
        set(graph.kept) <= {"matmul"} and graph.kept.get("matmul", 0) <= 1 for graph in report.graphs
    ), str(report)


def test_returned_cache_is_hugging_face_s_and_a_fresh_object_each_call(kit):
    """The cache a prefill returns holds HF's keys and values; two calls never share one (on a GPU both
    come from one CUDA graph, whose memory the second replay overwrites)."""
    model = build(kit, "llama")
    optimized = copy.deepcopy(model).to(kit.device, DTYPE)
    optimize_model(optimized)
    reference = copy.deepcopy(model).double()
    peer = model.to(kit.device, DTYPE)
    first, second = left_padded(2, 8, [8, 6], seed=1)[0], left_padded(2, 8, [8, 6], seed=2)[0]
    with torch.inference_mode():
        outputs = [optimized(input_ids=ids.to(kit.device)) for ids in (first, first, second)]
        expected, same_dtype = reference(input_ids=first), peer(input_ids=first.to(kit.device))
    caches = [output.past_key_values for output in outputs]
    assert all(type(cache) is type(expected.past_key_values) for cache in caches)
    assert len({id(cache) for cache in caches}) == 3
    for ours, theirs, hf in zip(
        caches[0].layers, expected.past_key_values.layers, same_dtype.past_key_values.layers, strict=True
    ):
        assert_matches_reference(ours.keys, theirs.keys, hf.keys, name="keys", scale=SCALE)
        assert_matches_reference(ours.values, theirs.values, hf.values, name="values", scale=SCALE)
    assert torch.equal(caches[0].layers[0].keys, caches[1].layers[0].keys)
    assert not torch.equal(caches[0].layers[0].keys, caches[2].layers[0].keys)


def test_beam_search_and_sampling_draw_hugging_face_tokens(kit):
    model = build(kit, "qwen2")
    optimized = copy.deepcopy(model).to(kit.device, DTYPE)
    optimize_model(optimized)
    reference = model.to(kit.device, DTYPE)
    ids, mask = (t.to(kit.device) for t in left_padded(2, 8, [8, 5], seed=3))
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    sampling = dict(max_new_tokens=3, do_sample=True, top_k=20, temperature=0.9)
    for arguments in (beams, sampling):
        with torch.inference_mode():
            torch.manual_seed(0)
            tokens = optimized.generate(ids, attention_mask=mask, **arguments)
            torch.manual_seed(0)
            expected = reference.generate(ids, attention_mask=mask, **arguments)
        assert same_tokens(tokens, expected), (arguments, tokens, expected)


def test_a_dynamic_cache_runs_as_pytorch_and_the_report_says_why(kit):
    model = build(kit, "llama")
    optimized = copy.deepcopy(model).to(kit.device, DTYPE)
    report = optimize_model(optimized)
    reference = model.to(kit.device, DTYPE)
    ids = left_padded(1, 6, [6])[0].to(kit.device)
    arguments = dict(max_new_tokens=3, do_sample=False)
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = optimized.generate(ids, cache_implementation="dynamic", **arguments)
        cache = DynamicCache()
        step = optimized(input_ids=ids, **{CACHE_NAME: cache})
        expected_step = reference(input_ids=ids, **{CACHE_NAME: DynamicCache()})
        expected = reference.generate(ids, cache_implementation="dynamic", **arguments)
    assert torch.equal(tokens, expected) and torch.equal(step.logits, expected_step.logits)
    assert step.past_key_values is cache
    assert DYNAMIC_CACHE_NOTE in report.notes and report.notes.count(DYNAMIC_CACHE_NOTE) == 1
    assert any(DYNAMIC_CACHE_NOTE in str(w.message) for w in caught)
    assert report.graphs == []  # nothing compiled: the rewritten graph never runs kernel by kernel


def test_a_sliding_window_cache_runs_as_pytorch_and_the_report_says_why(kit):
    """Mistral with a window shorter than the generation: the static cache's sliding layers keep their
    length in a Python int, so no step is compiled or captured; HF's tokens."""
    model = kit.build(MistralForCausalLM, llama_like(MistralConfig, sliding_window=4))
    optimized = copy.deepcopy(model).to(kit.device, DTYPE)
    report = optimize_model(optimized)
    reference = model.to(kit.device, DTYPE)
    ids, mask = (t.to(kit.device) for t in left_padded(2, 7, [7, 5], seed=4))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            tokens = optimized.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert torch.equal(tokens, expected)
    assert SLIDING_CACHE_NOTE in report.notes and report.graphs == []


def test_a_deep_copy_of_an_optimized_base_model_is_a_plain_model(kit):
    """A base model (no generate(), so no generation hooks) copied after optimize_model: the copy
    carried kernl's forward, a closure over the original model and its weights."""
    model = kit.build(LlamaModel, llama_like(LlamaConfig)).to(kit.device)
    optimize_model(model)
    with pytest.warns(UserWarning, match="copy of an optimized model is a plain PyTorch model"):
        copied = copy.deepcopy(model)
    assert "forward" not in copied.__dict__ and not hasattr(copied, "kernl_original_forward")
