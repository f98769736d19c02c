"""optimize_model on the Bert heads and RoBERTa: same logits as Hugging Face, nothing left in PyTorch."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
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
