"""Each rule on small TorchDynamo graphs: the spellings it must match, and what it must leave alone."""

import copy
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F

from kernl.integration import fallback, optimize_model
from kernl.integration.report import OptimizationReport
from kernl.integration.rules.attention_sdpa import AttentionArgs, attention_call
from kernl.integration.rules.gated_ffn import gated_linear_act_call
from kernl.integration.rules.linear_act import linear_act_call
from kernl_testing import assert_matches_reference, on_gpu
from kernl_testing.fx_rewrite import rewritten


def check_same(fn, compiled, *inputs):
    """Every output of ``compiled`` meets the tolerance rule against ``fn`` in fp64."""
    expected = fn(*[t.double() if t.is_floating_point() else t for t in inputs])
    for actual, reference, peer in zip(compiled(*inputs), expected, fn(*inputs), strict=True):
        assert_matches_reference(actual, reference, peer)


def test_linear_activation_and_residual_spellings():
    def fn(x, w, b, r, w2):
        h = F.gelu(F.linear(x, w, b), approximate="tanh")
        h = torch.nn.functional.linear(h, w2, bias=None) + r
        t = torch.tanh(F.linear(h, w2)).relu()
        return (F.dropout(t, 0.1, False) + F.silu(F.linear(input=x, weight=w)),)

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    r, w2 = torch.randn(2, 5, 12, generator=g), torch.randn(12, 12, generator=g)
    record, gm, compiled = rewritten(fn, x, w, b, r, w2)
    assert record.fired["linear_act"] == 4 and record.fired["dropout"] == 1
    assert record.kept == {"activation": 1}  # .relu() after a fused tanh stays PyTorch
    check_same(fn, compiled, x, w, b, r, w2)


def test_add_layer_norm_and_shared_sum():
    def fn(a, b, w, bias):
        s = a + b
        return (F.layer_norm(s, (a.shape[-1],), w, bias, 1e-6) * 2 + s, F.layer_norm(a, [7], eps=1e-5))

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    w, bias = torch.rand(7, generator=g), torch.randn(7, generator=g)
    record, gm, compiled = rewritten(fn, a, b, w, bias)
    assert record.fired["layer_norm"] == 2 and record.kept == {}
    check_same(fn, compiled, a, b, w, bias)


def test_a_sum_used_before_its_norm_is_not_fused():
    def t5_norm(h, w):
        return w * (h * torch.rsqrt(h.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6))

    def fn(a, b, w):  # the fused call would stand after `t`, which reads the sum: an invalid graph
        s, s2 = a + b, a - b + b
        t, t2 = s * 2, s2 * 3
        return F.layer_norm(s, (7,), w) + t, t5_norm(s2, w) + t2

    g = torch.Generator().manual_seed(2)
    a, b, w = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g), torch.rand(7, generator=g)
    record, gm, compiled = rewritten(fn, a, b, w)
    assert record.error is None
    assert record.fired["layer_norm"] == 1 and record.fired["rms_norm"] == 1
    assert sum(n.target is operator.add for n in gm.graph.nodes) == 4  # both sums and outputs stay
    check_same(fn, compiled, a, b, w)


@pytest.mark.parametrize("device", ["cpu", "cuda"] if on_gpu() else ["cpu"])
def test_add_layer_norm_under_autocast_keeps_torch_dtypes(device):
    def fn(a, b, w):
        s = a + b
        return F.layer_norm(s, (40,), w, None, 1e-5), s

    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(3, 40, generator=g).mul(100).half().to(device) for _ in range(2))
    w = torch.rand(40, generator=g).half().to(device)
    # CUDA autocast runs layer_norm in fp32 (not the add: the sum stays fp16); CPU autocast leaves it alone
    with torch.autocast(device, dtype=torch.float16):
        record, _, compiled = rewritten(fn, a, b, w)
        expected, actual = fn(a, b, w), compiled(a, b, w)
    assert record.fired["layer_norm"] == 1
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype
    assert torch.equal(actual[1], expected[1])
    assert_matches_reference(actual[0], F.layer_norm(expected[1].double(), (40,), w.double()), expected[0])


def test_layer_norm_over_two_dims_is_kept():
    def fn(x):
        return (F.layer_norm(x, x.shape[-2:]),)

    record, _, _ = rewritten(fn, torch.randn(2, 3, 4))
    assert record.fired.get("layer_norm", 0) == 0 and record.kept == {"layer_norm": 1}


def test_the_report_counts_every_spelling_a_rule_matches_that_stays_pytorch():
    def fn(h, w):
        probs = torch.softmax(h @ h.transpose(-1, -2), dim=-1)  # also returned: the attention stays
        return (
            torch.dropout(h, 0.1, True),  # training: kept
            torch.layer_norm(h, [6, 8], None, None, 1e-5, False),  # over two dims: kept
            F.tanh(h),  # no linear before it: kept
            probs @ h,
            probs,
        )

    record, _, _ = rewritten(fn, torch.randn(2, 3, 6, 8), torch.randn(8))
    assert record.kept == {
        "dropout": 1,
        "layer_norm": 1,
        "activation": 1,
        "matmul": 2,
        "attention (softmax)": 1,
    }
    report = OptimizationReport(graphs=[record])  # and says why each stayed
    assert "dropout x1 (training mode with p > 0)" in str(report)
    assert "activation x1 (not applied to a linear's output alone)" in str(report)


@pytest.mark.parametrize("spelling", ["sdpa", "eager"])
def test_attention_the_kernel_cannot_take_is_left_as_pytorch_when_rewriting(spelling):
    def sdpa(q, k, v):
        return (F.scaled_dot_product_attention(q, k, v),)

    def eager(q, k, v):
        return (torch.softmax(q @ k.transpose(-1, -2) * 0.0625, dim=-1) @ v,)

    fn = sdpa if spelling == "sdpa" else eager
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 5, 256, generator=g) for _ in range(3))  # head_dim 256 > 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no kernel call that fails and falls back at run time
        record, _, compiled = rewritten(fn, q, k, v)
        check_same(fn, compiled, q, k, v)
    assert record.fired[f"attention_{spelling}"] == 0
    kind = "attention (sdpa)" if spelling == "sdpa" else "attention (softmax)"
    assert record.kept_why[kind] == "head_dim 256 > 128"
    assert f"{kind} x1 (head_dim 256 > 128)" in str(OptimizationReport(graphs=[record]))


def _attention_calls(gm) -> list[AttentionArgs]:
    return [AttentionArgs(*n.args) for n in gm.graph.nodes if n.target is attention_call]


def test_padding_mask_becomes_key_padding_mask_and_with_a_causal_mask_the_causal_flag_too():
    def fn(q, k, v, attention_mask):
        b, _, s, _ = q.shape
        padding = attention_mask.bool()[:, None, None, :].expand(b, 1, s, s)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=padding, scale=0.3)
        return (F.scaled_dot_product_attention(out, k, v, padding & causal),)

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 4:] = 0
    record, gm, compiled = rewritten(fn, q, k, v, mask)
    assert record.fired["attention_sdpa"] == 2
    first, second = _attention_calls(gm)
    assert first.key_padding_mask is not None and first.mask is None  # key padding mask, no dense mask
    assert second.key_padding_mask is not None and second.mask is None and second.causal  # see _causal_mask
    check_same(fn, compiled, q, k, v, mask)


def test_a_mask_built_from_nothing_that_lets_everything_through_is_dropped():
    # transformers 5.17 builds this when called without attention_mask while tracing
    def fn(q, k, v):
        b, _, s, _ = q.shape
        everything = (torch.arange(s)[None, None, :, None] >= 0).expand(b, 1, s, s)
        causal = torch.ones(1, 1, s, s, dtype=torch.bool).tril()  # from nothing too, but not all True
        additive = torch.zeros(b, 1, s, s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=everything)
        out = F.scaled_dot_product_attention(out, k, v, attn_mask=additive)
        return (F.scaled_dot_product_attention(out, k, v, attn_mask=causal),)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    record, gm, compiled = rewritten(fn, q, k, v)
    assert record.attention_masks == {"none": 2, "causal": 1}  # the causal flag: see _causal_mask
    check_same(fn, compiled, q, k, v)


def test_eager_attention_spellings():
    def fn(q, k, v, additive):
        scores = torch.matmul(q, k.transpose(-1, -2)) / 4.0
        probs = torch.softmax(scores + additive, dim=-1)
        out = F.dropout(probs, p=0.0, training=False) @ v
        raw = q.matmul(k.transpose(2, 3)).softmax(-1)
        return (out + torch.matmul(raw, v),)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g) for _ in range(3))
    additive = torch.zeros(2, 1, 5, 5)
    additive[0, ..., 3:] = torch.finfo(torch.float32).min
    record, gm, compiled = rewritten(fn, q, k, v, additive)
    assert record.fired["attention_eager"] == 2 and record.kept == {}
    check_same(fn, compiled, q, k, v, additive)


def test_attention_probabilities_used_elsewhere_are_kept():
    def fn(q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return (probs @ v, probs)

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    record, _, _ = rewritten(fn, q, k, v)
    assert record.fired.get("attention_eager", 0) == 0
    assert record.kept.get("attention (softmax)") == 1


def test_a_failing_kernel_call_runs_as_pytorch_and_is_remembered(monkeypatch):
    monkeypatch.setattr(fallback, "FAILURES", {})
    calls = []

    def broken(x):
        calls.append(x)
        raise RuntimeError("out of resource: shared memory")

    x = torch.randn(3, 5)
    with pytest.warns(UserWarning, match="runs as PyTorch"):
        assert torch.equal(fallback.call("test_kernel", broken, torch.neg, x), -x)
    assert torch.equal(fallback.call("test_kernel", broken, torch.neg, x), -x)
    assert len(calls) == 1
    assert fallback.summary() == [
        "test_kernel(3x5 float32 on cpu): RuntimeError: out of resource: shared memory"
    ]


def test_projections_of_one_input_become_one_call_on_back_to_back_weights():
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(24, width) for width in (24, 24, 8))
    out = torch.nn.Linear(24, 24)
    weights = [q.weight, k.weight, v.weight]

    def projections(x, modules=(q, k, v, out)):
        q_, k_, v_, out_ = modules
        return q_(x) * 2, k_(x).relu(), v_(x), out_(x)

    x = torch.randn(2, 5, 24)
    in_fp64 = [copy.deepcopy(m).double() for m in (q, k, v, out)]
    with torch.no_grad():
        expected, peer = projections(x.double(), in_fp64), projections(x)
        record, gm, compiled = rewritten(projections, x)
        # k has its relu fused: q, v and out (plain, same input) merge into one call
        assert record.fired["fused_projections"] == 1 and record.fired["linear_act"] == 4
        for actual, reference, same in zip(compiled(x), expected, peer, strict=True):
            assert_matches_reference(actual, reference, same)
    # the weights now lie back to back in one buffer, same parameters, values unchanged
    assert [w is p for w, p in zip(weights, (q.weight, k.weight, v.weight), strict=True)] == [True] * 3
    assert q.weight.untyped_storage().data_ptr() == v.weight.untyped_storage().data_ptr()
    assert q.weight.untyped_storage().data_ptr() == out.weight.untyped_storage().data_ptr()


def test_stacked_weights_are_laid_out_when_compiling_and_running_the_graph_moves_nothing():
    torch.manual_seed(0)
    q, k = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

    def projections(x):
        return q(x), k(x)

    x = torch.randn(3, 16)
    with torch.no_grad():
        record, gm, compiled = rewritten(projections, x)
        assert record.fired["fused_projections"] == 1
        laid_out = [t.data_ptr() for t in (q.weight, k.weight, q.bias, k.bias)]
        assert laid_out[1] == laid_out[0] + q.weight.numel() * q.weight.element_size()
        k.weight.data = k.weight.detach() * 2  # moved by the user: the graph concatenates, leaves it there
        moved = k.weight.data_ptr()
        for actual, expected in zip(compiled(x), projections(x), strict=True):
            torch.testing.assert_close(actual, expected)
        assert k.weight.data_ptr() == moved and q.weight.data_ptr() == laid_out[0]


def test_stacked_rows_is_a_view_once_parameters_are_laid_out():
    from kernl.integration.rules.fused_projections import lay_out, stacked_rows

    parts = [torch.nn.Parameter(torch.randn(rows, 6)) for rows in (3, 5, 2)]
    expected = torch.cat([p.detach().clone() for p in parts])
    addresses = [p.data_ptr() for p in parts]
    assert torch.equal(stacked_rows(*parts), expected)
    assert [p.data_ptr() for p in parts] == addresses  # running the graph moves nothing
    lay_out(*parts)  # what the backend does when it compiles
    second = stacked_rows(*parts)
    assert torch.equal(second, expected)
    assert second.data_ptr() == parts[0].data_ptr()  # a view: no copy per call
    with torch.no_grad():
        parts[1].mul_(2)  # in-place updates of a parameter show through the stacked view
    assert torch.equal(stacked_rows(*parts)[3:8], parts[1])
    plain = [torch.randn(2, 4), torch.randn(3, 4)]  # not parameters: concatenated, left where they are
    assert torch.equal(stacked_rows(*plain), torch.cat(plain))
    assert plain[1].untyped_storage().data_ptr() != plain[0].untyped_storage().data_ptr()


def test_parameters_made_under_inference_mode_are_concatenated():
    from kernl.integration.rules.fused_projections import lay_out, stacked_rows

    with torch.inference_mode():  # e.g. a model loaded and cast inside inference_mode: storage cannot move
        parts = [torch.nn.Parameter(torch.randn(rows, 6)) for rows in (3, 5)]
    with torch.inference_mode():
        lay_out(*parts)
        assert torch.equal(stacked_rows(*parts), torch.cat(parts))
    assert parts[1].untyped_storage().data_ptr() != parts[0].untyped_storage().data_ptr()


def test_model_made_under_inference_mode(kit):
    from transformers import BertConfig, BertModel

    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    ids, mask = kit.padded_batch(2, 7, [7, 3], vocab=120)
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        optimized = copy.deepcopy(model)
        optimize_model(optimized)
        actual = optimized(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask != 0  # masked positions hold zeros under packed execution
    assert_matches_reference(actual[real], expected[real].double(), expected[real])


def test_shared_projection_weights_are_stacked_once():
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(16, 16) for _ in range(3))

    def layers(x, y):  # ALBERT-style: the same projections on two inputs, plus q twice and a mix
        return q(x), k(x), v(x), q(y), k(y), v(y), q(x) + 1, q(y * 2), v(y * 2)

    x, y = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        expected = layers(x, y)
        record, gm, compiled = rewritten(layers, x, y)
        # {q, k, v} on x and on y share one stack; {q, v} on y * 2 would need another layout: kept apart
        assert record.fired["fused_projections"] == 2
        for actual, reference in zip(compiled(x, y), expected, strict=True):
            torch.testing.assert_close(actual, reference)
        for actual, reference in zip(compiled(x, y), expected, strict=True):  # the layout stays put
            torch.testing.assert_close(actual, reference)


def test_projections_read_through_as_strided_are_not_stacked():
    torch.manual_seed(0)
    q, k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def chunks(x):  # Longformer's sliding-window chunks: strides dynamo took from the unfused layout
        a, b = q(x), k(x)
        return (a.as_strided((2, 3, 8), a.stride()) + b.as_strided((2, 3, 8), b.stride()),)

    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        record, gm, compiled = rewritten(chunks, x)
        assert record.fired["fused_projections"] == 0 and record.fired["linear_act"] == 2
        torch.testing.assert_close(compiled(x)[0], chunks(x)[0])  # a wide output's slice: off by ~2.6


def test_projections_viewed_across_their_last_dimension_are_not_stacked():
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(16, 16) for _ in range(3))

    def flattened(x):  # views a column slice of a wide output cannot take; the heads split still can
        return q(x).view(-1), k(x)[1].view(-1), v(x).view(2, 3, 4, 4).transpose(1, 2)

    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        record, gm, compiled = rewritten(flattened, x)
        assert record.fired["fused_projections"] == 0 and record.fired["linear_act"] == 3
        for actual, expected in zip(compiled(x), flattened(x), strict=True):
            torch.testing.assert_close(actual, expected)

    def split_heads(x):
        return tuple(m(x).view(2, 3, 4, 4).transpose(1, 2) for m in (q, k, v))

    with torch.no_grad():
        record, gm, compiled = rewritten(split_heads, x)
        assert record.fired["fused_projections"] == 1
        for actual, expected in zip(compiled(x), split_heads(x), strict=True):
            torch.testing.assert_close(actual, expected)


def test_gated_products_of_each_activation_spelling():
    from transformers.activations import NewGELUActivation

    def fn(x, w0, w1, w2):
        written_out = NewGELUActivation()(F.linear(x, w0)) * F.linear(x, w1)  # T5 v1.1 "gelu_new"
        called = F.linear(x, w1) * F.silu(F.linear(x, w0))  # the gate on the right-hand side
        return written_out, called, F.relu(F.linear(x, w0)) * F.linear(x, w2)

    g = torch.Generator().manual_seed(3)
    x, w0, w1 = (
        torch.randn(2, 5, 8, generator=g),
        torch.randn(12, 8, generator=g),
        torch.randn(12, 8, generator=g),
    )
    w2 = torch.randn(12, 8, generator=g)
    record, gm, compiled = rewritten(fn, x, w0, w1, w2)
    assert record.fired["gated_ffn"] == 3 and record.kept == {}
    calls = [n for n in gm.graph.nodes if n.target is gated_linear_act_call]
    assert sorted(n.args[3] for n in calls) == ["gelu_tanh", "relu", "silu"]
    check_same(fn, compiled, x, w0, w1, w2)


def test_products_that_are_not_a_gated_ffn_are_kept():
    def fn(x, w0, w1, b):
        not_an_activation = torch.sigmoid(F.linear(x, w0)) * F.linear(x, w1)
        with_bias = F.gelu(F.linear(x, w0, b)) * F.linear(x, w1)
        other_input = F.gelu(F.linear(x, w0)) * F.linear(x * 2, w1)
        clipped = torch.clip(F.gelu(F.linear(x, w0)), -10, 10) * F.linear(x, w1)  # HF "gelu_10"
        return not_an_activation, with_bias, other_input, clipped

    g = torch.Generator().manual_seed(4)
    x, w0, w1 = (
        torch.randn(3, 8, generator=g),
        torch.randn(6, 8, generator=g) * 4,
        torch.randn(6, 8, generator=g),
    )
    b = torch.randn(6, generator=g)  # w0 * 4: gate values beyond the clip at 10
    record, _, compiled = rewritten(fn, x, w0, w1, b)
    assert record.fired.get("gated_ffn", 0) == 0
    check_same(fn, compiled, x, w0, w1, b)


def test_a_gate_written_in_place_does_not_change_the_probe_of_later_gates():
    def in_place(x, w0, w1):
        return (F.relu(F.linear(x, w0), inplace=True) * F.linear(x, w1),)

    def leaky(x, w0, w1):  # relu on the probe's positive half: only its negative half tells them apart
        return (F.leaky_relu(F.linear(x, w0), 0.2) * F.linear(x, w1),)

    g = torch.Generator().manual_seed(10)
    x, w0, w1 = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    with torch.no_grad():
        record, _, compiled = rewritten(in_place, x, w0, w1)
        assert record.fired["gated_ffn"] == 1
        check_same(in_place, compiled, x, w0, w1)
        record, _, compiled = rewritten(leaky, x, w0, w1)
        assert record.fired.get("gated_ffn", 0) == 0
        check_same(leaky, compiled, x, w0, w1)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
def test_t5_norm_chain_with_and_without_its_residual(weight_dtype):
    def t5_norm(h, w):  # transformers' T5LayerNorm.forward, as written there
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + 1e-6)
        if w.dtype in [torch.float16, torch.bfloat16]:
            h = h.to(w.dtype)
        return w * h

    def fn(a, b, w):
        s = a + b
        return t5_norm(s, w) + s, t5_norm(a, w), a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True) + 1e-6)

    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(2, 5, 24, generator=g).to(weight_dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(24, generator=g)).to(weight_dtype)
    record, _, compiled = rewritten(fn, a, b, w)
    assert record.fired["rms_norm"] == 2  # the sum of squares (not a mean) is not an RMS norm
    assert record.kept == {"rms_norm": 1}
    check_same(fn, compiled, a, b, w)


def test_gpt2_conv1d_with_its_written_out_activation_or_its_residual():
    def conv1d(x, w, b):  # transformers' Conv1D.forward, as written there
        size_out = x.size()[:-1] + (w.size(-1),)
        return torch.addmm(b, x.view(-1, x.size(-1)), w).view(size_out)

    def gelu_new(h):  # transformers' NewGELUActivation, as written there
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))

    def fn(x, w1, b1, w2, b2):
        h = gelu_new(conv1d(x, w1, b1))
        return conv1d(h, w2, b2) + x, conv1d(x, w1, b1), gelu_new(conv1d(x, w1, b1)) * 2.0

    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 24, generator=g)
    w1, w2 = torch.randn(24, 40, generator=g) / 5, torch.randn(40, 24, generator=g) / 6
    b1, b2 = torch.randn(40, generator=g), torch.randn(24, generator=g)
    record, gm, compiled = rewritten(fn, x, w1, b1, w2, b2)
    assert record.fired["conv1d"] == 4 and record.kept == {}
    calls = [n.args for n in gm.graph.nodes if n.target is linear_act_call]
    assert sorted(str(args[3]) for args in calls) == ["None", "None", "gelu_tanh", "gelu_tanh"]
    assert sum(args[4] is not None for args in calls) == 1  # the residual add, fused
    check_same(fn, compiled, x, w1, b1, w2, b2)


def test_a_decoder_s_causal_mask_becomes_the_causal_flag_and_its_padding_a_key_padding_mask():
    def fn(q, k, v, attention_mask):
        position = torch.arange(q.shape[2])
        causal = position[None, :] <= position[:, None]
        window = causal & (position[None, :] > position[:, None] - 3)  # sliding window: not causal alone
        padded = causal[None, None] & attention_mask.bool()[:, None, None, :]
        additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
        return (
            F.scaled_dot_product_attention(q, k, v, padded),
            F.scaled_dot_product_attention(q, k, v, additive[None, None]),
            F.scaled_dot_product_attention(q, k, v, window[None, None]),
        )

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    record, gm, compiled = rewritten(fn, q, k, v, attention_mask)
    calls = [AttentionArgs(*n.args) for n in gm.graph.nodes if n.target is attention_call]
    assert [(a.causal, a.key_padding_mask is not None, a.mask is not None) for a in calls] == [
        (True, True, False),
        (True, False, False),
        (False, False, True),
    ]
    check_same(fn, compiled, q, k, v, attention_mask)


def repeat_kv(h, groups):  # transformers' repeat_kv, as written there
    batch, kv_heads, length, head_dim = h.shape
    h = h[:, :, None, :, :].expand(batch, kv_heads, groups, length, head_dim)
    return h.reshape(batch, kv_heads * groups, length, head_dim)


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_one_token_grouped_attention_reads_the_key_value_heads_without_repeating_them(kv_heads):
    def fn(q, k, v, mask):
        groups = q.shape[1] // k.shape[1]
        repeated = F.scaled_dot_product_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), mask, scale=0.3
        )
        given = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
        return repeated, given

    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(3, 1, 8, 16, generator=g).transpose(1, 2)  # HF's (B, S, H, D) projection, viewed
    k, v = (torch.randn(3, kv_heads, 37, 16, generator=g) for _ in range(2))
    mask = torch.rand(3, 1, 1, 37, generator=g) < 0.7
    mask[:, :, :, 0] = True
    record, gm, compiled = rewritten(fn, q, k, v, mask)
    if kv_heads < 8:
        assert record.fired["attention_gqa_decode"] == 2 and record.kept == {}
        assert not any(is_method_call(n, "expand") for n in gm.graph.nodes)  # no repeat_kv left
    else:  # as many key/value heads as query heads: the kernel's heads, one each (no repeat either)
        assert record.fired["attention_gqa_decode"] == 0 and record.fired["attention_gqa"] == 2
    assert record.kept == {}
    assert not any(is_method_call(n, "expand") for n in gm.graph.nodes)
    check_same(fn, compiled, q, k, v, mask)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_attention_of_several_query_tokens_reads_the_key_value_heads_in_the_kernel(kv_heads):
    """A prefill's grouped attention, as transformers calls it without a mask (enable_gqa=True, causal)
    and with a decoder's left-padded causal mask (repeat_kv): the kernel's grouped heads, the causal
    flag and a key padding mask; no repeat_kv copy left in the graph."""

    def fn(q, k, v, attention_mask):
        groups = q.shape[1] // k.shape[1]
        given = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        n = q.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        mask = causal & attention_mask.bool()[:, None, None, :]
        repeated = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), mask)
        return given, repeated

    g = torch.Generator().manual_seed(3 + kv_heads)
    q = torch.randn(2, 9, 4, 16, generator=g).transpose(1, 2)  # HF's (B, S, H, D) projection, viewed
    k, v = (torch.randn(2, 9, kv_heads, 16, generator=g).transpose(1, 2) for _ in range(2))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    record, gm, compiled = rewritten(fn, q, k, v, attention_mask)
    assert record.fired["attention_gqa"] == 2 and record.fired["attention_sdpa"] == 0, record
    assert record.kept == {} and not any(is_method_call(n, "expand") for n in gm.graph.nodes)
    calls = [AttentionArgs(*n.args) for n in gm.graph.nodes if n.target is attention_call]
    assert [(a.causal, a.key_padding_mask is not None, a.mask is None) for a in calls] == [
        (True, False, True),
        (True, True, True),
    ]
    assert all(example_heads(a.k) == kv_heads for a in calls)
    check_same(fn, compiled, q, k, v, attention_mask)


def example_heads(node) -> int:
    return node.meta["example_value"].shape[1]


def is_method_call(node, name: str) -> bool:
    return node.op == "call_method" and node.target == name


def llama_norm(h, w):  # transformers' LlamaRMSNorm.forward (Mistral's, Qwen2's), as written there
    input_dtype = h.dtype
    h = h.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + 1e-6)
    return w * h.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_llama_norm_chain_with_and_without_its_residual(dtype):
    def fn(a, b, w):
        s = a + b
        return llama_norm(s, w) + s, llama_norm(a, w)

    g = torch.Generator().manual_seed(6)
    a, b = (torch.randn(2, 5, 24, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(24, generator=g)).to(dtype)
    record, _, compiled = rewritten(fn, a, b, w)
    assert record.fired["rms_norm"] == 2 and record.kept == {}
    check_same(fn, compiled, a, b, w)


def test_llama_norm_chain_with_a_weight_of_another_dtype_is_kept():
    """An fp32 weight times the norm cast to fp16 is not what rms_norm computes (it casts only to a
    half-precision weight's dtype)."""
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(2, 5, 24, generator=g).half(), torch.rand(24, generator=g)
    record, _, compiled = rewritten(lambda h, w: (llama_norm(h, w),), h, w)
    assert record.fired.get("rms_norm", 0) == 0 and record.kept == {"rms_norm": 1}


def test_a_mean_taken_in_another_dtype_is_not_an_rms_norm():
    def fn(h, w):  # the fp64 mean makes the whole chain fp64: the kernel's output would be fp32
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True, dtype=torch.float64)
        return (w * (h * torch.rsqrt(variance + 1e-6)),)

    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(2, 5, 24, generator=g), torch.rand(24, generator=g)
    record, _, compiled = rewritten(fn, h, w)
    assert record.fired.get("rms_norm", 0) == 0 and record.kept == {"rms_norm": 1}
    assert compiled(h, w)[0].dtype == torch.float64


def test_a_bias_folded_into_the_padding_mask_is_taken_out():
    def fn(q, k, v, attention_mask, bias):  # T5 under sdpa: where(keep, position bias, finfo.min)
        b, _, s, _ = q.shape
        keep = attention_mask.bool()[:, None, None, :].expand(b, 1, s, s)
        folded = torch.where(keep, bias, torch.finfo(q.dtype).min).contiguous()
        not_blocking = torch.where(keep, bias, -1.0)  # -1 does not block a key: stays one dense mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=folded, scale=1.0)
        return (F.scaled_dot_product_attention(out, k, v, attn_mask=not_blocking, scale=1.0),)

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 9, 9, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    record, gm, compiled = rewritten(fn, q, k, v, mask, bias)
    assert record.attention_masks == {"key padding [B, K] + bias": 1, "dense": 1}
    first, second = _attention_calls(gm)
    assert first.key_padding_mask is not None and first.mask is None and first.bias.target == "contiguous"
    assert second.mask is not None and second.bias is None
    check_same(fn, compiled, q, k, v, mask, bias)


def test_eager_attention_with_a_bias_beside_a_bias_folded_mask_keeps_both_biases():
    def fn(q, k, v, attention_mask, bias, folded_bias):
        b, _, s, _ = q.shape
        keep = attention_mask.bool()[:, None, None, :].expand(b, 1, s, s)
        folded = torch.where(keep, folded_bias, torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(-1, -2))
        return (torch.matmul(torch.softmax(scores + bias + folded, dim=-1), v),)

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    bias, folded_bias = (torch.randn(1, 3, 6, 6, generator=g) for _ in range(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    record, _, compiled = rewritten(fn, q, k, v, mask, bias, folded_bias)
    assert record.error is None
    check_same(fn, compiled, q, k, v, mask, bias, folded_bias)


@pytest.mark.parametrize("inject", [None, float("inf")])
def test_t5_overflow_guard(inject):
    def guard(h):  # transformers' T5 block, verbatim
        clamp_value = torch.where(
            torch.isinf(h).any(), torch.finfo(h.dtype).max - 1000, torch.finfo(h.dtype).max
        )
        return torch.clamp(h, min=-clamp_value, max=clamp_value)

    def fn(a, b):
        h = guard(a + b)
        return guard(h * 2) + 1, torch.clamp(h, min=-1.0, max=1.0)  # a plain clamp is not a guard

    g = torch.Generator().manual_seed(7)
    a, b = (torch.randn(3, 40, generator=g).mul(3e4).half() for _ in range(2))
    if inject is not None:
        a[2, 17] = inject
    record, _, compiled = rewritten(fn, a, b)
    assert record.fired["overflow_guard"] == 2 and record.kept == {}
    for actual, expected in zip(compiled(a, b), fn(a, b), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def rotate_half(x):  # transformers' rotate_half, as written there
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_by_chunks(x):  # the same function, spelled otherwise
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2 * -1, x1], -1)


def rotate_pairs(x):  # GPT-J's interleaved rotation: not rotate_half
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def test_rotary_embeddings_of_q_and_k_become_one_call():
    def fn(q, k, cos, sin, k2):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q_embed = (q * cos) + (rotate_half(q) * sin)  # transformers' apply_rotary_pos_emb
        k_embed = (k * cos) + (rotate_half(k) * sin)
        q_swapped = sin * rotate_half_by_chunks(q) + cos * q  # operands in the other order
        k_swapped = k * cos + rotate_half_by_chunks(k) * sin
        not_rotary = k2 * cos + rotate_pairs(k2) * sin  # left as it is
        return q_embed, k_embed, q_swapped, k_swapped, not_rotary

    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 7, 4, 16, generator=g).transpose(1, 2)  # HF's (B, S, H, D) projection, viewed
    k, k2 = (torch.randn(2, 7, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    angles = torch.randn(2, 7, 8, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    record, gm, compiled = rewritten(fn, q, k, cos, sin, k2)
    assert record.fired["rotary"] == 2, record
    assert sum(n.op == "call_function" and n.target is torch.cat for n in gm.graph.nodes) == 0
    assert sum(is_method_call(n, "flatten") for n in gm.graph.nodes) == 1  # the interleaved one stays
    check_same(fn, compiled, q, k, cos, sin, k2)


def test_a_rotary_sum_without_a_partner_or_with_other_angles_stays_pytorch():
    def fn(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        alone = q * cos + rotate_half(q) * sin
        other_angles = k * sin + rotate_half(k) * cos  # q's and k's angles differ: no pair
        return alone, other_angles

    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, 3, 5, 8, generator=g) for _ in range(2))
    cos, sin = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    record, _, compiled = rewritten(fn, q, k, cos, sin)
    assert record.fired["rotary"] == 0
    check_same(fn, compiled, q, k, cos, sin)
