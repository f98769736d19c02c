"""optimize_model on the Bert heads and RoBERTa: same logits as Hugging Face, nothing left in PyTorch;
outputs cut back to the caller's length whatever their layout (per-token 2-D logits, tuples, choices)."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from kernl.integration.kernels import KERNELS, find
from kernl_testing import on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32
ROBERTA = dict(pad_token_id=1, max_position_embeddings=130)
CASES = {
    "bert-sequence-classification": (BertForSequenceClassification, BertConfig, {"num_labels": 3}, "logits"),
    "bert-token-classification": (BertForTokenClassification, BertConfig, {"num_labels": 5}, "logits"),
    "bert-masked-lm": (BertForMaskedLM, BertConfig, {}, "logits"),
    "bert-question-answering": (
        BertForQuestionAnswering,
        BertConfig,
        {},
        "start_logits",
    ),  # (B, S): per token
    "roberta": (RobertaModel, RobertaConfig, ROBERTA, "last_hidden_state"),
    "roberta-masked-lm": (RobertaForMaskedLM, RobertaConfig, ROBERTA, "logits"),
    "xlm-roberta-sequence-classification": (
        XLMRobertaForSequenceClassification,
        XLMRobertaConfig,
        {**ROBERTA, "num_labels": 2},
        "logits",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_head_matches_hugging_face(kit, case):
    model_class, config_class, overrides, field = CASES[case]
    model = kit.build(model_class, kit.tiny_config(config_class, **overrides))
    ids, mask = kit.padded_batch(2, 11, [11, 6], vocab=120)
    ids[1, 6:] = model.config.pad_token_id
    report = kit.compare_with_reference(model, DTYPE, [dict(input_ids=ids, attention_mask=mask)], [field])
    (graph,) = report.graphs
    assert graph.error is None
    if all(find(name) for name in KERNELS):
        assert graph.kept == {}, graph.kept
        assert graph.fired["linear_act"] >= 13 and graph.fired["layer_norm"] >= 5


def test_tuple_outputs_as_wide_as_the_bucket_run_unpadded(kit):
    # return_dict=False: a (B, 64) pooler output at bucket 64 cannot be told from per-token logits
    model = kit.build(BertModel, kit.tiny_config(BertConfig))  # hidden 64
    ids, mask = kit.padded_batch(2, 40, [40, 23], vocab=120)
    call = dict(input_ids=ids, attention_mask=mask, return_dict=False)
    report = kit.compare_with_reference(model, DTYPE, [call, call], [0, 1])
    assert len(report.graphs) == 2  # the padded try once, then the caller's length; no third compile


def test_multiple_choice_runs_as_called(kit):
    model = kit.build(BertForMultipleChoice, kit.tiny_config(BertConfig))
    ids, mask = kit.padded_batch(6, 11, [11, 6, 9, 11, 3, 7], vocab=120)
    ids, mask = ids.view(2, 3, 11), mask.view(2, 3, 11)  # (batch, choices, tokens)
    calls = [dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask)]
    assert kit.compare_with_reference(model, DTYPE, calls, ["logits"]).status == "optimized"


def test_buckets_stop_at_the_position_table(kit):
    # 33 tokens would be padded to 64, past a 40-position table: that bucket is not used
    model = kit.build(BertModel, kit.tiny_config(BertConfig, max_position_embeddings=40))
    ids, mask = kit.padded_batch(2, 33, [33, 20], vocab=120)
    kit.compare_with_reference(
        model, DTYPE, [dict(input_ids=ids, attention_mask=mask)], ["last_hidden_state"]
    )


def test_usable_buckets_follow_each_family_position_table(kit):
    from transformers import BartConfig, BartModel

    from kernl.integration.optimize import _usable_buckets

    buckets = (16, 32, 64, 128, 256)
    bert = kit.build(BertModel, kit.tiny_config(BertConfig, max_position_embeddings=64))
    assert _usable_buckets(bert, buckets) == (16, 32, 64)
    roberta = kit.build(RobertaModel, kit.tiny_config(RobertaConfig, **ROBERTA))  # positions from pad + 1 = 2
    assert _usable_buckets(roberta, buckets) == (16, 32, 64, 128)  # 130 positions: 128 tokens
    bart = kit.build(BartModel, BartConfig(vocab_size=120, d_model=32, encoder_layers=1, decoder_layers=1,
                                           encoder_attention_heads=2, decoder_attention_heads=2,
                                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=100))  # fmt: skip
    assert _usable_buckets(bart, buckets) == (16, 32, 64)
