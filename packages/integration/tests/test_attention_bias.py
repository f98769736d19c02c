"""Attention with an additive bias (issue 20, item 4): MPNet's position bias added in place, and DeBERTa's
disentangled attention over heads folded into the batch, through kernl's flash_attention kernel.

The rules on small graphs written as each model writes its attention (fp64 reference, kernel failures
must not hide behind the PyTorch fallback), then the tiny models of the zoo against Hugging Face at the
real tokens of padded rows, with the rule in the report's fired rules and no softmax left as PyTorch.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DebertaV2Config, DebertaV2Model, MPNetConfig, MPNetForMaskedLM, MPNetModel

from kernl.integration import fallback
from kernl.integration.bench.zoo import FAMILIES
from kernl.integration.rules._fx import example
from kernl.integration.rules.attention_sdpa import AttentionArgs, attention_call
from kernl_testing import assert_matches_reference, on_gpu
from kernl_testing.fx_rewrite import rewritten

DEVICE = "cuda" if on_gpu() else "cpu"
HEADS = 3


@pytest.fixture(autouse=True)
def no_kernel_failure(monkeypatch):
    """A kernel that raises would run as PyTorch and pass: every test here must end with no failure."""
    monkeypatch.setattr(fallback, "FAILURES", {})
    yield
    assert fallback.FAILURES == {}


def _padding(batch: int, length: int, real: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.long, device=DEVICE)
    for row, count in enumerate(real):
        mask[row, :count] = 1
    return mask


def _random(*shape, generator):
    return torch.randn(*shape, generator=generator).to(DEVICE)


def mpnet_attention(q, k, v, table_bias, attention_mask):
    """MPNet's eager attention: the batch-expanded position bias added in place, then the padding mask."""
    b, _, s, _ = q.shape
    position_bias = table_bias.expand(b, -1, s, s).contiguous()
    keep = attention_mask.bool()[:, None, None, :].expand(b, 1, s, s)
    mask = torch.where(keep, torch.zeros((), dtype=q.dtype, device=q.device), torch.finfo(q.dtype).min)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores / 4.0
    scores += position_bias
    scores = scores + mask
    probs = F.dropout(F.softmax(scores, dim=-1), 0.1, False, False)
    return (torch.matmul(probs, v),)


def test_a_position_bias_added_in_place_goes_to_the_kernel_as_one_batch_row():
    g = torch.Generator().manual_seed(1)
    q, k, v = (_random(2, HEADS, 13, 16, generator=g) for _ in range(3))
    table_bias = _random(1, 13, 13, HEADS, generator=g).permute(0, 3, 1, 2)  # heads innermost, as MPNet's
    mask = _padding(2, 13, [13, 6])
    record, gm, compiled = rewritten(mpnet_attention, q, k, v, table_bias, mask)
    assert record.fired["attention_eager"] == 1 and record.kept == {}
    assert record.attention_masks == {"key padding [B, K] + bias": 1}
    (call,) = [AttentionArgs(*n.args) for n in gm.graph.nodes if n.target is attention_call]
    source = call.bias.args[0]  # made contiguous once, for every layer's call
    assert example(source).shape == (1, HEADS, 13, 13)  # not the B copies of it
    assert not any(n.target == "expand" for n in gm.graph.nodes)
    expected = mpnet_attention(*(t.double() for t in (q, k, v, table_bias)), mask)[0]
    assert_matches_reference(
        compiled(q, k, v, table_bias, mask)[0], expected, mpnet_attention(q, k, v, table_bias, mask)[0]
    )


def test_scores_added_in_place_into_an_input_are_not_taken():
    def fn(q, k, v, bias):
        bias += torch.matmul(q, k.transpose(-1, -2))  # the caller's bias is written: not ours to drop
        return (torch.matmul(torch.softmax(bias, dim=-1), v),)

    g = torch.Generator().manual_seed(2)
    q, k, v = (_random(1, 2, 5, 8, generator=g) for _ in range(3))
    bias = _random(1, 2, 5, 5, generator=g)
    written = bias.clone()
    record, _, compiled = rewritten(fn, q, k, v, written)
    assert record.fired["attention_eager"] == 0
    torch.testing.assert_close(written, bias + q @ k.transpose(-1, -2), rtol=1e-6, atol=1e-6)


def deberta_attention(q, k, v, rel, attention_mask, mask_kind: str):
    """DeBERTa-v2's disentangled attention once its c2p + p2c terms are summed into ``rel``: q/k/v
    ``(B*H, S, D)``, rel ``(B*H, S, S)``, attention_mask ``(B, S)``. ``mask_kind``: ``"deberta"`` (a
    padded query row sees no key, ``masked_fill(~keep)``), ``"keys"`` (the key padding alone, the same
    spelling) or ``"blocked keys"`` (``masked_fill(attention_mask == 0)``)."""
    s, d = q.shape[1], q.shape[2]
    scale = torch.sqrt(torch.tensor(d, dtype=torch.float) * 3)
    scores = torch.bmm(q, k.transpose(-1, -2) / scale.to(dtype=q.dtype))
    scores = (scores + rel).view(-1, HEADS, s, s)
    extended = attention_mask[:, None, None, :]
    if mask_kind == "blocked keys":
        blocked = extended == 0
    else:
        keep = extended * extended.squeeze(-2).unsqueeze(-1) if mask_kind == "deberta" else extended
        blocked = ~keep.bool()
    scores = scores.masked_fill(blocked, torch.finfo(q.dtype).min)
    probs = F.dropout(F.softmax(scores, dim=-1), 0.1, False, False)
    out = torch.bmm(probs.view(-1, s, s), v)
    return (out.view(-1, HEADS, s, d).permute(0, 2, 1, 3).contiguous(),)


def _deberta_inputs(seed: int, length: int = 11, head_dim: int = 24):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_random(2 * HEADS, length, head_dim, generator=g) for _ in range(3))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # other strides than q's
    return q, k, v, _random(2 * HEADS, length, length, generator=g)


@pytest.mark.parametrize("mask_kind", ["deberta", "keys", "blocked keys"])
def test_folded_heads_attention_with_a_bias_and_a_filled_mask(mask_kind):
    q, k, v, rel = _deberta_inputs(seed=3)
    real = _padding(2, 11, [11, 4])
    record, gm, compiled = rewritten(deberta_attention, q, k, v, rel, real, mask_kind)
    assert record.fired["attention_bmm"] == 1 and record.kept == {}
    # DeBERTa's mask is no key padding mask: padded query rows see no key (HF averages every value
    # there, the kernel writes zeros; neither is a defined output), so it goes dense
    masks = "dense + bias" if mask_kind == "deberta" else "key padding [B, K] + bias"
    assert record.attention_masks == {masks: 1}
    assert not any(n.target is torch.tensor for n in gm.graph.nodes)  # the scale, computed once
    rows = real.bool() if mask_kind == "deberta" else torch.ones_like(real, dtype=torch.bool)
    actual = compiled(q, k, v, rel, real, mask_kind)[0]
    expected = deberta_attention(*(t.double() for t in (q, k, v, rel)), real, mask_kind)[0]
    peer = deberta_attention(q, k, v, rel, real, mask_kind)[0]
    assert_matches_reference(actual[rows], expected[rows], peer[rows])


def test_folded_heads_attention_whose_scale_is_an_input_stays_pytorch():
    def fn(q, k, v, rel, keep, temperature):
        s = q.shape[1]
        scores = (torch.bmm(q, k.transpose(1, 2)) / temperature + rel).view(-1, HEADS, s, s)
        probs = scores.masked_fill(~keep, -1e30).softmax(-1)
        return (torch.bmm(probs.view(-1, s, s), v),)

    q, k, v, rel = _deberta_inputs(seed=4, length=5, head_dim=8)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=DEVICE)
    record, _, _ = rewritten(fn, q, k, v, rel, keep, torch.full((), 2.0, device=DEVICE))
    assert record.error is None, record.error
    assert record.fired["attention_bmm"] == 0 and record.kept.get("attention (softmax)") == 1


MODELS = {
    "MPNet": (MPNetModel, MPNetConfig, "MPNet", "attention_eager", "last_hidden_state"),
    "MPNet-masked-lm": (MPNetForMaskedLM, MPNetConfig, "MPNet", "attention_eager", "logits"),
    "DeBERTa-v3": (DebertaV2Model, DebertaV2Config, "DeBERTa-v2", "attention_bmm", "last_hidden_state"),
    "DeBERTa-v2-unbucketed": (
        DebertaV2Model,
        DebertaV2Config,
        "DeBERTa-v2",
        "attention_bmm",
        "last_hidden_state",
    ),
}
OVERRIDES = {"DeBERTa-v2-unbucketed": {"position_buckets": -1}}  # relative positions not log-bucketed


@pytest.mark.parametrize("case", MODELS)
def test_tiny_models_match_hugging_face_with_their_bias_in_the_kernel(kit, case):
    if kit.device == "cpu" and case in ("MPNet-masked-lm", "DeBERTa-v2-unbucketed"):
        pytest.skip("the same attention as another case: on the GPU only (the interpreter is slow)")
    model_class, config_class, family, rule, field = MODELS[case]
    config = kit.tiny_config(config_class, **{**FAMILIES[family].tiny, **OVERRIDES.get(case, {})})
    model = kit.build(model_class, config, "eager")
    ids, mask = kit.padded_batch(4, 29, [29, 17, 29, 3], vocab=120, seed=5)
    dtype = torch.float16 if on_gpu() else torch.float32
    report = kit.compare_with_reference(
        model, dtype, [dict(input_ids=ids, attention_mask=mask)], [field], scale=2.0
    )
    layers = model.config.num_hidden_layers
    assert report.totals()[rule] == layers, report.totals()
    assert all("attention (softmax)" not in graph.kept and graph.error is None for graph in report.graphs)
