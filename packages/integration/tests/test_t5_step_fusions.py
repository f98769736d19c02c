"""Fusions for T5's decoder step: the fp16 overflow guard fused into the RMS norm that reads it (and the
residual add before it), on small TorchDynamo graphs written as transformers writes T5, and in
``generate()`` of a tiny fp16 T5."""

import copy
import operator

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from kernl.integration import optimize_model
from kernl.integration.backend import rewrite_graph
from kernl.integration.report import GraphRecord
from kernl.integration.rules.clamped_rms_norm import clamped_rms_norm_call
from kernl.integration.rules.overflow_guard import overflow_clamp_call
from kernl.integration.rules.rms_norm import rms_norm_call
from kernl_testing import assert_matches_reference, on_gpu

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


def rewritten(fn, *inputs):
    """``(record, rewritten graph module, compiled fn)`` for the graph TorchDynamo captures of ``fn``."""
    record, captured = GraphRecord(inputs="test"), []

    def backend(gm, example_inputs):
        captured.append(rewrite_graph(gm, record, example_inputs))
        return captured[0].forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    compiled(*inputs)
    return record, captured[0], compiled


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
    for graph in decoder:
        assert graph.error is None and graph.kept == {}
        assert graph.fired["clamped_rms_norm"] == graph.fired["overflow_guard"] == 3 * layers
