"""The fused ops reproduce the Hugging Face modules they replace (Bert intermediate/pooler, T5 FFNs)."""

import torch
from transformers import BertConfig, T5Config
from transformers.models.bert.modeling_bert import BertIntermediate, BertPooler
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

from kernl.linear_act import gated_linear_act, gated_linear_act_reference, linear_act, linear_act_reference
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor, on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32


def _module(cls, config):
    torch.manual_seed(0)
    return cls(config).to(TEST_DEVICE, DTYPE).eval()


@torch.no_grad()
def test_bert_intermediate_gelu_and_pooler_tanh():
    config = BertConfig(hidden_size=64, intermediate_size=160, num_attention_heads=2)
    x = make_tensor((2, 7, 64), DTYPE, ValueSpec(1, 1.0, 0.0))
    inter = _module(BertIntermediate, config)
    dense = inter.dense
    out = linear_act(x, dense.weight, dense.bias, activation="gelu")
    reference = linear_act_reference(x.double(), dense.weight.double(), dense.bias.double(), "gelu")
    assert_matches_reference(out, reference, inter(x))
    pooler = _module(BertPooler, config)
    first = x[:, 0]
    out = linear_act(first, pooler.dense.weight, pooler.dense.bias, activation="tanh")
    reference = linear_act_reference(
        first.double(), pooler.dense.weight.double(), pooler.dense.bias.double(), "tanh"
    )
    assert_matches_reference(out, reference, pooler(x))


@torch.no_grad()
def test_t5_relu_and_gated_gelu_ffn_up_projection():
    x = make_tensor((2, 5, 48), DTYPE, ValueSpec(2, 1.0, 0.0))
    relu_ffn = _module(T5DenseActDense, T5Config(d_model=48, d_ff=96, dense_act_fn="relu"))
    out = linear_act(x, relu_ffn.wi.weight, None, activation="relu")
    expected = relu_ffn.act(relu_ffn.wi(x))
    assert_matches_reference(out, linear_act_reference(x.double(), relu_ffn.wi.weight.double(), None, "relu"),
                             expected)  # fmt: skip
    gated = _module(T5DenseGatedActDense, T5Config(d_model=48, d_ff=96, feed_forward_proj="gated-gelu"))
    out = gated_linear_act(x, gated.wi_0.weight, gated.wi_1.weight, activation="gelu_new")
    expected = gated.act(gated.wi_0(x)) * gated.wi_1(x)
    reference = gated_linear_act_reference(x.double(), gated.wi_0.weight.double(), gated.wi_1.weight.double())
    assert_matches_reference(out, reference, expected)
