"""Fusions for T5's decoder step, on small TorchDynamo graphs written as transformers writes T5 and in
``generate()`` of a tiny fp16 T5: the fp16 overflow guard fused into the RMS norm that reads it (and the
residual add before it); the relative-position buckets read from a table made at compile time."""

import copy
import operator

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from kernl.integration import optimize_model
from kernl.integration.rules.clamped_rms_norm import clamped_rms_norm_call
from kernl.integration.rules.overflow_guard import overflow_clamp_call
from kernl.integration.rules.position_buckets import rows_at
from kernl.integration.rules.rms_norm import rms_norm_call
from kernl_testing import assert_matches_reference, on_gpu
from kernl_testing.fx_rewrite import rewritten

FP16 = torch.float16


def guard(h):
    """transformers' T5 block guard, with fp16's limits whatever h's dtype (the fp64 reference's too)."""
    clamp_value = torch.where(torch.isinf(h).any(), torch.finfo(FP16).max - 1000, torch.finfo(FP16).max)
    return torch.clamp(h, min=-clamp_value, max=clamp_value)


def t5_norm(h, weight):
    """transformers' T5LayerNorm.forward, verbatim."""
    variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + 1e-6)
    if weight.dtype in [torch.float16, torch.bfloat16]:
        h = h.to(weight.dtype)
    return weight * h


def calls_to(gm, target):
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is target]


def check_against_fp64(fn, compiled, *inputs):
    """Every output of ``compiled`` meets the tolerance rule against ``fn`` in fp64 (HF in fp16 the peer)."""
    expected = fn(*(t.double() for t in inputs))
    for actual, reference, peer in zip(compiled(*inputs), expected, fn(*inputs), strict=True):
        assert_matches_reference(actual, reference, peer)


def inputs(rows: int, width: int, inject, seed: int):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(rows, width, generator=g).mul(4).to(FP16) for _ in range(2))
    a[0, :3] = 65504.0  # at the guard's limit: clamped to 64512 only when an infinity is anywhere
    if inject is not None:
        a[rows - 1, width - 2] = inject  # the last row: every row's clamp must see it
    weight = (1 + 0.2 * torch.randn(width, generator=g)).to(FP16)
    return a.to(DEVICE), b.to(DEVICE), weight.to(DEVICE)


DEVICE = "cuda" if on_gpu() else "cpu"


@pytest.mark.parametrize("inject", [None, float("inf"), -float("inf")])
def test_guard_then_norm_is_one_call_with_the_residual_add(inject):
    def fn(a, b, w):
        h = guard(a + b)  # a sublayer's residual add, then the block's guard, then the next norm
        x = t5_norm(h, w) * 2 + h
        y = guard(x)  # no add before it: fused without a residual
        return h, t5_norm(y, w), y, guard(x * 3)  # the last guard reaches no norm: it stays alone

    a, b, w = inputs(5, 48, inject, seed=1)
    record, gm, compiled = rewritten(fn, a, b, w)
    assert record.fired["overflow_guard"] == 3 and record.fired["rms_norm"] == 2
    assert record.fired["clamped_rms_norm"] == 2 and record.kept == {}
    assert len(calls_to(gm, overflow_clamp_call)) == 1 and calls_to(gm, rms_norm_call) == []
    with_residual, without = calls_to(gm, clamped_rms_norm_call)
    assert [with_residual.args[i].op for i in (0, 5)] == ["placeholder"] * 2  # a + b went into the call
    assert without.args[5] is None
    torch.testing.assert_close(compiled(a, b, w)[0], fn(a, b, w)[0], rtol=0, atol=0)  # the guard itself
    check_against_fp64(fn, compiled, a, b, w)


def test_a_sum_read_elsewhere_stays_and_the_guard_still_fuses():
    def fn(a, b, w):
        s = a + b
        return t5_norm(guard(s), w), s * 2

    a, b, w = inputs(3, 40, float("inf"), seed=2)
    record, gm, compiled = rewritten(fn, a, b, w)
    assert record.fired["clamped_rms_norm"] == 1
    (call,) = calls_to(gm, clamped_rms_norm_call)
    assert call.args[5] is None and call.args[0].target is operator.add
    check_against_fp64(fn, compiled, a, b, w)


def test_a_norm_with_its_own_residual_is_not_fused_with_the_guard():
    def fn(a, b, w):  # guard, then add, then norm: the norm fuses the add, the guard stays alone
        g = guard(a)
        return (t5_norm(g + b, w),)

    a, b, w = inputs(3, 40, None, seed=3)
    record, gm, compiled = rewritten(fn, a, b, w)
    assert record.fired["rms_norm"] == 1 and record.fired["overflow_guard"] == 1
    assert record.fired.get("clamped_rms_norm", 0) == 0
    check_against_fp64(fn, compiled, a, b, w)


def t5_position_bias(weight, query_length, key_length, past_seen_tokens, bidirectional):
    """transformers' T5Attention.compute_bias, verbatim but for the module attributes made arguments."""
    context_position = (
        torch.arange(query_length, dtype=torch.long, device=weight.device)[:, None] + past_seen_tokens
    )
    memory_position = torch.arange(key_length, dtype=torch.long, device=weight.device)[None, :]
    relative_position = memory_position - context_position
    relative_position_bucket = T5Attention._relative_position_bucket(
        relative_position, bidirectional=bidirectional, num_buckets=32, max_distance=20
    )
    values = torch.nn.functional.embedding(relative_position_bucket, weight)
    return values.permute([2, 0, 1]).unsqueeze(0)


@pytest.mark.parametrize("query_length", [1, 3])
def test_decoder_step_buckets_are_read_at_the_cache_offset(query_length):
    """As in a decoder step over a static cache of 25 positions: the offset (the tokens already in the
    cache) is snapshotted, then advanced in place; the buckets come from a table, for every offset."""
    keys = 25

    def fn(weight, cumulative_length):
        past_seen_tokens = cumulative_length.clone()
        cumulative_length.add_(query_length)
        bias = t5_position_bias(weight, query_length, keys, past_seen_tokens, bidirectional=False)
        return (bias.contiguous(),)

    weight = torch.randn(32, 4, generator=torch.Generator().manual_seed(4)).to(DEVICE, FP16)
    start = torch.tensor([0], device=DEVICE)
    record, gm, compiled = rewritten(fn, weight, start.clone())
    assert record.fired["position_buckets"] == 1
    (lookup,) = calls_to(gm, rows_at)
    embedding = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.embedding)
    assert embedding.args[0] is lookup and lookup.args[1].target == "clone"
    assert not any(n.target is torch.log for n in gm.graph.nodes)  # no bucket arithmetic left
    cache, expected_cache = start.clone(), start.clone()
    for _ in range(keys // query_length):  # every offset the cache takes: 0, Q, 2Q ... up to K - Q
        (bias,) = compiled(weight, cache)
        (expected,) = fn(weight.double(), expected_cache)
        assert torch.equal(cache, expected_cache)
        torch.testing.assert_close(bias.double(), expected, rtol=0, atol=0)  # lookups of one table: exact
    if not on_gpu():  # on a GPU the same failure is a device-side assert, which ends the process's CUDA use
        with pytest.raises((IndexError, RuntimeError)):  # queries past the keys: no row, no wrong bias
            compiled(weight, torch.tensor([keys - query_length + 1], device=DEVICE))


def test_buckets_of_a_cache_position_input_are_read_from_the_table():
    """Earlier transformers releases spell the step's query position as a ``cache_position`` input."""
    keys = 17

    def fn(weight, cache_position):
        context_position = cache_position[:, None].to(weight.device)
        memory_position = torch.arange(keys, dtype=torch.long, device=weight.device)[None, :]
        buckets = T5Attention._relative_position_bucket(
            memory_position - context_position, bidirectional=False, num_buckets=32, max_distance=20
        )
        return (torch.nn.functional.embedding(buckets, weight).permute([2, 0, 1]).unsqueeze(0),)

    weight = torch.randn(32, 4, generator=torch.Generator().manual_seed(6)).to(DEVICE, FP16)
    record, _, compiled = rewritten(fn, weight, torch.tensor([0], device=DEVICE))
    assert record.fired["position_buckets"] == 1
    for position in range(keys):
        at = torch.tensor([position], device=DEVICE)
        torch.testing.assert_close(
            compiled(weight, at)[0].double(), fn(weight.double(), at)[0], rtol=0, atol=0
        )


def test_encoder_buckets_of_constants_are_a_buffer():
    def fn(weight):
        return (t5_position_bias(weight, 13, 13, 0, bidirectional=True).contiguous(),)

    weight = torch.randn(32, 4, generator=torch.Generator().manual_seed(5)).to(DEVICE, FP16)
    with torch.inference_mode():  # as generate() compiles: the table must still serve calls outside it
        record, gm, compiled = rewritten(fn, weight)
    assert record.fired["position_buckets"] == 1
    embedding = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.embedding)
    assert embedding.args[0].op == "get_attr" and not getattr(gm, embedding.args[0].target).is_inference()
    torch.testing.assert_close(compiled(weight)[0].double(), fn(weight.double())[0], rtol=0, atol=0)


def test_token_ids_absolute_positions_and_random_indices_are_left_alone():
    def fn(ids, weight, positions, past):  # one token of one row, a view of it; and a random index
        noise = torch.randint(0, 32, (3, 3), device=weight.device)
        return (
            torch.nn.functional.embedding(ids.view(-1, 1), weight),
            torch.nn.functional.embedding(noise, weight),
            torch.nn.functional.embedding(positions * 2, weight),  # a many-element input
            # absolute positions after `past` tokens: their range is the table's, not a key axis
            torch.nn.functional.embedding(torch.arange(1, device=weight.device)[None, :] + past, weight),
        )

    weight = torch.randn(32, 4, device=DEVICE)
    ids, positions = torch.tensor([[7]], device=DEVICE), torch.tensor([1, 2], device=DEVICE)
    record, _, compiled = rewritten(fn, ids, weight, positions, torch.tensor([0], device=DEVICE))
    assert record.fired["position_buckets"] == 0
    for token in (7, 9):
        at = torch.tensor([token], device=DEVICE)
        out = compiled(at.view(1, 1), weight, positions, at)
        torch.testing.assert_close(out[0], weight[token].view(1, 1, 4))
        torch.testing.assert_close(out[3], weight[token].view(1, 1, 4))


def tiny_t5() -> T5ForConditionalGeneration:
    """A gated (flan-style) T5 of 2 layers a side, fp16, whose greedy tokens have clear margins."""
    config = T5Config(
        vocab_size=120, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # logits ~ N(0, 1): tokens that depend on the inputs, never pad or end
        model.lm_head.weight.normal_(0, 0.125, generator=torch.Generator().manual_seed(1))
        model.lm_head.weight[:2] = 0
    return model.to(DEVICE, FP16)


def test_t5_fp16_generate_runs_guards_fused_into_norms():
    reference = tiny_t5()
    optimized = copy.deepcopy(reference)
    report = optimize_model(optimized)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 120, (2, 9), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    arguments = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.inference_mode():
        tokens = optimized.generate(ids, attention_mask=mask, **arguments)
        expected = reference.generate(ids, attention_mask=mask, **arguments)
    assert tokens.shape == expected.shape
    assert torch.equal(tokens, expected) or on_gpu()  # on a GPU a near tie in fp16 may flip a token
    layers = reference.config.num_layers
    encoder, *decoder = report.graphs
    assert encoder.part == "encoder" and decoder and all(graph.part == "decoder" for graph in decoder)
    # the encoder: two guards a layer, each before a norm; a decoder step: three
    assert encoder.fired["clamped_rms_norm"] == encoder.fired["overflow_guard"] == 2 * layers
    assert encoder.fired["position_buckets"] == 1  # computed once for the stack, now a table
    for graph in decoder:
        assert graph.error is None and graph.kept == {}
        assert graph.fired["clamped_rms_norm"] == graph.fired["overflow_guard"] == 3 * layers
        assert graph.fired["position_buckets"] == 1


def test_a_literal_range_read_by_arithmetic_is_a_buffer():
    def fn(cumulative_length, keys, new):  # a static cache's write positions, as each layer computes them
        cache_position = torch.arange(2, device=keys.device) + cumulative_length
        cumulative_length.add_(2)
        keys.index_copy_(0, cache_position, new)
        viewed = torch.arange(4, device=keys.device).view(2, 2)  # a view of it: stays a call
        changed = torch.arange(3, device=keys.device)
        changed.add_(1)  # changed in place: stays a call
        return viewed * 1, changed, torch.arange(5, device=keys.device)  # returned: stays a call

    keys, new = torch.zeros(6, 3, device=DEVICE), torch.ones(2, 3, device=DEVICE)
    record, gm, compiled = rewritten(fn, torch.tensor([0], device=DEVICE), keys.clone(), new)
    assert record.fired["constant_arange"] == 1
    assert sum(node.target is torch.arange for node in gm.graph.nodes) == 3
    counter, expected_counter, expected_keys = (
        torch.tensor([0], device=DEVICE),
        torch.tensor([0], device=DEVICE),
        keys.clone(),
    )
    for step in range(3):  # the buffer is read, never changed: every call writes its own positions
        outputs = compiled(counter, keys, new * step)
        expected = fn(expected_counter, expected_keys, new * step)
        for actual, reference in zip(
            (counter, keys, *outputs), (expected_counter, expected_keys, *expected), strict=True
        ):
            torch.testing.assert_close(actual, reference, rtol=0, atol=0)
