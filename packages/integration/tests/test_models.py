"""optimize_model on the Bert heads and RoBERTa: same logits as Hugging Face, nothing left in PyTorch;
outputs cut back to the caller's length whatever their layout (per-token 2-D logits, tuples, choices)."""

import copy

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
    ElectraConfig,
    ElectraForPreTraining,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from kernl.integration import hf_compat, optimize_model
from kernl_testing import assert_matches_reference, on_gpu

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
    # the discriminator's logits are (B, S): one per token, cut back though 2-D and not named per token
    "electra-pretraining": (ElectraForPreTraining, ElectraConfig, {"embedding_size": 32}, "logits"),
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
    assert graph.kept == {}, graph.kept
    assert graph.fired["linear_act"] >= 13 and graph.fired["layer_norm"] >= 5


def test_tuple_outputs_as_wide_as_the_bucket_run_unpadded(kit):
    # return_dict=False: a (B, 64) pooler output at bucket 64 cannot be told from per-token logits
    model = kit.build(BertModel, kit.tiny_config(BertConfig))  # hidden 64
    ids, mask = kit.padded_batch(2, 40, [40, 23], vocab=120)
    call = dict(input_ids=ids, attention_mask=mask, return_dict=False)
    report = kit.compare_with_reference(model, DTYPE, [call, call], [0, 1], packed=False)
    assert len(report.graphs) == 2  # the padded try once, then the caller's length; no third compile


def test_two_dimensional_fields_as_wide_as_the_bucket_are_cut_only_when_known_per_token():
    """A (B, bucket) field may hold one value per token or per sequence (``num_labels`` logits as wide as
    the bucket): a field not known to be either cannot be cut, and the call runs at its own length."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

    from kernl.integration.padding import cut_outputs

    assert cut_outputs(SequenceClassifierOutput(logits=torch.zeros(2, 16)), 11, 16) is None
    assert cut_outputs(SequenceClassifierOutput(logits=torch.zeros(2, 3)), 11, 16).logits.shape == (2, 3)
    pooled = BaseModelOutputWithPooling(
        last_hidden_state=torch.zeros(2, 16, 16), pooler_output=torch.zeros(2, 16)
    )
    cut = cut_outputs(pooled, 11, 16)
    assert cut.last_hidden_state.shape == (2, 11, 16) and cut.pooler_output.shape == (2, 16)


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

    from kernl.integration.buckets import usable_buckets

    buckets = (16, 32, 64, 128, 256)
    bert = kit.build(BertModel, kit.tiny_config(BertConfig, max_position_embeddings=64))
    assert usable_buckets(bert, buckets) == (16, 32, 64)
    # word embeddings as large as the position table (padding_idx 0) are not taken for it (64 was dropped)
    bert = kit.build(BertModel, kit.tiny_config(BertConfig, max_position_embeddings=64, vocab_size=64))
    assert usable_buckets(bert, buckets) == (16, 32, 64)
    roberta = kit.build(RobertaModel, kit.tiny_config(RobertaConfig, **ROBERTA))  # positions from pad + 1 = 2
    assert usable_buckets(roberta, buckets) == (16, 32, 64, 128)  # 130 positions: 128 tokens
    bart = kit.build(BartModel, BartConfig(vocab_size=120, d_model=32, encoder_layers=1, decoder_layers=1,
                                           encoder_attention_heads=2, decoder_attention_heads=2,
                                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=100))  # fmt: skip
    assert usable_buckets(bart, buckets) == (16, 32, 64)


def test_bert_decoder_with_a_cache_runs_as_called(kit):
    """A Bert decoder returns a key/value cache: a padded call would return one of the bucket's length,
    and the next step would read padding as keys (greedy tokens went wrong from the 6th on); a CUDA graph
    replay would hand every call the same cache object, overwritten by the next call."""
    from transformers import BertLMHeadModel

    model = kit.build(BertLMHeadModel, kit.tiny_config(BertConfig, is_decoder=True))
    ids, other = (kit.padded_batch(1, 5, [5], vocab=120, seed=seed)[0] for seed in (0, 1))
    step = torch.tensor([[7]])
    report = kit.compare_with_reference(model, DTYPE, [dict(input_ids=ids, use_cache=True)], ["logits"])
    assert report.status == "optimized"
    optimized, peer = (copy.deepcopy(model).to(kit.device, DTYPE) for _ in range(2))
    optimize_model(optimized)
    reference = copy.deepcopy(model).double()

    def two_steps(m, device):
        first = m(input_ids=ids.to(device), use_cache=True)
        length = first.past_key_values.get_seq_length()
        m(input_ids=other.to(device), use_cache=True)  # same signature: must not overwrite first's cache
        cache = {hf_compat.CACHE_NAME: first.past_key_values}
        second = m(input_ids=step.to(device), **cache, use_cache=True)
        return length, second

    with torch.inference_mode():
        (length, actual), (_, expected), (_, same_dtype) = (
            two_steps(m, d) for m, d in ((optimized, kit.device), (reference, "cpu"), (peer, kit.device))
        )
        assert length == 5 and actual.past_key_values.get_seq_length() == 6
        assert_matches_reference(actual.logits, expected.logits, same_dtype.logits)
        tokens = [
            m.generate(ids.to(kit.device), max_new_tokens=6, do_sample=False) for m in (optimized, peer)
        ]
    assert torch.equal(*tokens) or on_gpu()  # fp16: a near tie may flip a token


def test_four_dimensional_attention_masks_run_as_called(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    ids, mask = kit.padded_batch(2, 11, [11, 6], vocab=120)
    square = (mask[:, None, None, :] * torch.ones(1, 1, 11, 1, dtype=torch.long)).bool()  # [B, 1, S, S]
    call = dict(input_ids=ids, attention_mask=square)
    kit.compare_with_reference(model, DTYPE, [call], ["last_hidden_state"])


def test_models_that_mix_positions_outside_attention_are_not_bucketed(kit):
    """ConvBERT's span convolution sees the padding a bucket adds: it runs at the caller's length."""
    from transformers import ConvBertConfig, ConvBertModel

    model = kit.build(ConvBertModel, kit.tiny_config(ConvBertConfig, embedding_size=64), "eager")
    ids, mask = kit.padded_batch(2, 11, [11, 6], vocab=120)
    report = kit.compare_with_reference(
        model, DTYPE, [dict(input_ids=ids[:1], attention_mask=mask[:1])], ["last_hidden_state"]
    )
    assert "no bucketing" in " ".join(report.notes)
    assert report.graphs[0].inputs.startswith("[1x11")
