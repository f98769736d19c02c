"""The cache_write_attention rule: a decoding step's ``index_copy_`` writes into a static key/value cache
become part of the attention that reads the cache, on small TorchDynamo graphs written as transformers'
``StaticLayer.update`` and sdpa attention are, and in ``generate()`` of tiny T5 and Llama models on kernl's
decode loop (Hugging Face's tokens, the rule fired)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from kernl.integration import optimize_model
from kernl.integration.rules.attention_gqa import grouped_decode_call
from kernl.integration.rules.attention_sdpa import attention_call
from kernl.integration.rules.cache_write_attention import cache_write_attention_call, grouped_cache_write_call
from kernl_testing import assert_matches_reference
from kernl_testing import decode_checks as checks
from kernl_testing.fx_rewrite import rewritten

DEVICE, DTYPE = checks.DEVICE, checks.DTYPE


def static_update(k_cache, v_cache, length, k_new, v_new):
    """transformers' ``StaticLayer.update`` (5.25) for one step's rows."""
    position = torch.arange(k_new.shape[-2], device=k_cache.device) + length
    length.add_(k_new.shape[-2])
    k_cache.index_copy_(2, position, k_new)
    v_cache.index_copy_(2, position, v_new)
    return k_cache, v_cache


def repeat_kv(h, groups):
    """transformers' ``repeat_kv``: ``(B, Hkv, K, D)`` to ``(B, Hkv * groups, K, D)``."""
    batch, kv_heads, length, head_dim = h.shape
    h = h[:, :, None, :, :].expand(batch, kv_heads, groups, length, head_dim)
    return h.reshape(batch, kv_heads * groups, length, head_dim)


def step(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """A T5-like self-attention step: the cache update, then sdpa with the position bias folded into the
    mask (``where(keep, bias, finfo.min)``)."""
    keys, values = static_update(k_cache, v_cache, length, k_new, v_new)
    folded = torch.where(mask, bias, torch.finfo(bias.dtype).min)
    return (F.scaled_dot_product_attention(q, keys, values, attn_mask=folded, scale=1.0) * 2,)


def grouped_step(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """A Llama-like step: the cache update, then sdpa over repeat_kv of the caches with a 4-D mask."""
    keys, values = static_update(k_cache, v_cache, length, k_new, v_new)
    groups = q.shape[1] // keys.shape[1]
    out = F.scaled_dot_product_attention(
        q, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=mask, scale=0.25
    )
    return (out,)


def step_inputs(heads, kv_heads, n_k=13, seed=0, written=6):
    """q ``(2, heads, 1, 16)`` as a projection view, the new rows, caches holding ``written`` positions (the
    rest zeros, as a reset static cache), their length, a causal mask over keys ``(2, 1, 1, K)`` (the second
    row left-padded by 2) and a position bias ``(1, heads, 1, K)``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, heads, 16, generator=g).transpose(1, 2)  # a (B, S, H, D) projection, viewed
    both = torch.randn(2, 1, 2, kv_heads, 16, generator=g)
    k_new, v_new = both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)
    caches = [torch.zeros(2, kv_heads, n_k, 16) for _ in range(2)]
    for cache in caches:
        cache[:, :, :written] = torch.randn(2, kv_heads, written, 16, generator=g)
    length = torch.tensor([written])
    mask = (torch.arange(n_k) <= written).expand(2, 1, 1, n_k).clone()
    mask[1, :, :, :2] = False
    bias = torch.randn(1, heads, 1, n_k, generator=g)
    return [t.to(DEVICE) for t in (q, k_new, v_new, *caches, length, mask, bias)]


def fresh(inputs):
    return [t.clone() for t in inputs]


def calls_to(gm, target):
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is target]


def index_copies(gm):
    return [node for node in gm.graph.nodes if node.op == "call_method" and node.target == "index_copy_"]


def check_step(fn, compiled, inputs):
    """The compiled step's output meets the tolerance rule against ``fn`` in fp64 (fn in fp32 the peer),
    and it leaves the caches and their length exactly as ``fn`` does."""
    as64 = [t.double() if t.is_floating_point() else t for t in fresh(inputs)]
    expected = fn(*as64)
    peer_inputs, ours = fresh(inputs), fresh(inputs)
    peer = fn(*peer_inputs)
    actual = compiled(*ours)
    for a, e, p in zip(actual, expected, peer, strict=True):
        assert_matches_reference(a, e, p)
    for index in (3, 4, 5):  # k_cache, v_cache, length
        torch.testing.assert_close(ours[index], peer_inputs[index], rtol=0, atol=0)
    assert not torch.equal(ours[3], inputs[3]) and not torch.equal(ours[4], inputs[4])  # the step wrote


def test_cache_writes_go_into_the_attention_with_its_mask_and_bias():
    inputs = step_inputs(heads=4, kv_heads=4)
    record, gm, compiled = rewritten(step, *fresh(inputs))
    assert record.fired["attention_sdpa"] == 1 and record.fired["cache_write_attention"] == 1, record
    assert index_copies(gm) == [] and calls_to(gm, attention_call) == []
    (fused,) = calls_to(gm, cache_write_attention_call)
    assert fused.args[9] is not None and fused.args[7] is not None  # the bias and the mask beside it
    assert record.attention_masks == {"dense + bias": 1}
    check_step(step, compiled, inputs)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_decode_attention_takes_the_cache_writes(kv_heads):
    inputs = step_inputs(heads=4, kv_heads=kv_heads, seed=kv_heads)
    record, gm, compiled = rewritten(grouped_step, *fresh(inputs))
    assert record.fired["cache_write_attention"] == 1 and index_copies(gm) == [], record
    if kv_heads < 4:  # grouped: the G query heads of a key/value head as G queries of it
        assert record.fired["attention_gqa_decode"] == 1 and calls_to(gm, grouped_decode_call) == []
        assert len(calls_to(gm, grouped_cache_write_call)) == 1
    else:
        assert len(calls_to(gm, cache_write_attention_call)) == 1
    check_step(grouped_step, compiled, inputs)


def read_between(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """The cache is read between the write and the attention: the write must happen there."""
    keys, values = static_update(k_cache, v_cache, length, k_new, v_new)
    peek = keys.sum()
    return (F.scaled_dot_product_attention(q, keys, values, attn_mask=mask) + peek,)


def two_positions(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """k and v written at different positions: not one row."""
    k_cache.index_copy_(2, length, k_new)
    v_cache.index_copy_(2, length + 1, v_new)
    return (F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask),)


def written_result_used(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """The write's result read back: the attention launch would store too late for it."""
    keys = k_cache.index_copy_(2, length, k_new)
    v_cache.index_copy_(2, length, v_new)
    return (F.scaled_dot_product_attention(q, keys, v_cache, attn_mask=mask), keys[:, :, :1] * 1)


def causal_prefill(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """Two rows written at once (a prefill), then causal attention over them."""
    positions = torch.arange(2, device=length.device) + length
    k_cache.index_copy_(2, positions, torch.cat((k_new, k_new * 2), 2))
    v_cache.index_copy_(2, positions, torch.cat((v_new, v_new * 2), 2))
    return (F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask),)


def position_moved_between(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """The position is bumped in place between the writes and the attention: the writes must use it before."""
    k_cache.index_copy_(2, length, k_new)
    v_cache.index_copy_(2, length, v_new)
    length.add_(1)
    return (F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask),)


def row_changed_between(q, k_new, v_new, k_cache, v_cache, length, mask, bias):
    """The new key row is changed in place between the writes and the attention: the cache holds the old."""
    k_cache.index_copy_(2, length, k_new)
    v_cache.index_copy_(2, length, v_new)
    k_new.mul_(2)
    return (F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask),)


@pytest.mark.parametrize(
    "fn",
    [
        read_between,
        two_positions,
        written_result_used,
        causal_prefill,
        position_moved_between,
        row_changed_between,
    ],
)
def test_writes_stay_where_the_attention_launch_cannot_take_them(fn):
    inputs = step_inputs(heads=4, kv_heads=4, seed=7)
    record, gm, compiled = rewritten(fn, *fresh(inputs))
    assert record.fired["attention_sdpa"] == 1 and record.fired["cache_write_attention"] == 0, record
    assert len(index_copies(gm)) == 2
    check_step(fn, compiled, inputs)


def _t5():
    return T5ForConditionalGeneration, T5Config(
        vocab_size=120, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip


def _llama():
    return LlamaForCausalLM, LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=100, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generate_gives_hugging_face_tokens_with_the_writes_in_the_attention(family):
    model_class, config = {"t5": _t5, "llama": _llama}[family]()
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # logits ~ N(0, 1): greedy tokens that depend on the prompt
        head = model.get_output_embeddings().weight
        head.normal_(0, 1.0 / config.hidden_size**0.5, generator=torch.Generator().manual_seed(1))
        head[:3] = 0
    optimized = copy.deepcopy(model).to(DEVICE, DTYPE)
    report = optimize_model(optimized)
    reference = model.to(DEVICE, DTYPE)
    ids = torch.randint(5, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # padding: left for the decoder-only model, and masked for T5's encoder alike
    checks.same_tokens(optimized, reference, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    checks.only_kernl_loop(optimized, ["greedy"])
    fired = [graph.fired.get("cache_write_attention", 0) for graph in report.graphs]
    assert config.num_hidden_layers in fired, str(report)  # the step graph: every self-attention layer
    assert all(graph.error is None for graph in report.graphs), str(report)
