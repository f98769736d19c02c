"""optimize_model on tiny Bert models: same outputs as Hugging Face, every target op replaced."""

import copy
import inspect
import warnings

import pytest
import torch
from transformers import BertConfig, BertModel

from kernl.integration import optimize_model
from kernl.integration.arguments import argument_namer
from kernl_testing import assert_matches_reference, on_gpu

# CPU: fp32 through the interpreter (bf16 is wrong there); GPU: fp16 everywhere, bf16 once.
DTYPES = [torch.float16] if on_gpu() else [torch.float32]
CASES = [(DTYPES[0], attn, masking) for attn in ("sdpa", "eager") for masking in ("heavy_padding", "no_mask")]
if on_gpu():
    CASES.append((torch.bfloat16, "sdpa", "heavy_padding"))
LAYERS = 2


def expected_replacements(layers: int) -> dict[str, int]:
    """Per graph of a BertModel: what each rule must replace."""
    return {"attention": layers, "linear_act": 6 * layers + 1, "layer_norm": 2 * layers + 1}


def fired(report, graph: int) -> dict[str, int]:
    record = report.graphs[graph]
    attention = record.fired.get("attention_sdpa", 0) + record.fired.get("attention_eager", 0)
    counts = {"attention": attention, "linear_act": record.fired.get("linear_act", 0)}
    counts["layer_norm"] = record.fired.get("layer_norm", 0)
    return counts


@pytest.mark.parametrize(("dtype", "attn_implementation", "masking"), CASES, ids=str)
def test_bert_matches_hugging_face(kit, dtype, attn_implementation, masking):
    model = kit.build(BertModel, kit.tiny_config(BertConfig), attn_implementation)
    ids, mask = kit.padded_batch(3, 13, [13, 2, 5], vocab=120)
    mask[2] = mask[2].flip(0)  # one row padded on the left
    ids_7, mask_7 = kit.padded_batch(2, 7, [7, 1], vocab=120, seed=1)
    if masking == "no_mask":
        mask = mask_7 = None
    calls = [dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids_7[:2], attention_mask=mask_7)]
    # the bucketed path (calls packing does not cover; packed calls: test_packing.py)
    report = kit.compare_with_reference(
        model, dtype, calls, ["last_hidden_state", "pooler_output"], packed=False
    )
    # lengths 13 and 7 share the bucket 16: one graph per batch size, not per length
    assert len(report.graphs) == 2
    for graph in range(2):
        assert fired(report, graph) == expected_replacements(LAYERS)
        assert report.graphs[graph].kept == {}, report.graphs[graph].kept
        # padded to the bucket: the mask comes from attention_mask and reaches the kernel as [B, K]
        assert report.graphs[graph].attention_masks == {"key padding [B, K]": LAYERS}
    assert report.graphs[0].fired["dropout"] >= 2 * LAYERS + 1
    # each layer's Q, K, V: one launch on back-to-back weights
    assert report.graphs[0].fired["fused_projections"] == LAYERS


def test_length_on_a_bucket_and_no_mask_needs_no_padding(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    ids, _ = kit.padded_batch(2, 16, [16, 16], vocab=120)
    call = dict(input_ids=ids)
    report = kit.compare_with_reference(model, DTYPES[0], [call], ["last_hidden_state"], packed=False)
    assert report.graphs[0].inputs.startswith("[2x16 int64] on")  # no attention_mask was added
    # no mask reaches the kernel (transformers 5.17 builds an all-True one while tracing: dropped)
    assert report.graphs[0].attention_masks == {"none": LAYERS}


def test_positional_and_keyword_calls_agree(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1)).to(kit.device, DTYPES[0])
    optimize_model(model)
    ids, mask = (t.to(kit.device) for t in kit.padded_batch(2, 9, [9, 4], vocab=120))  # padded to a bucket
    with torch.inference_mode():
        by_name = model(input_ids=ids, attention_mask=mask)
        by_position = model(ids, mask)
        if on_gpu():  # both calls name their arguments: one capture serves them
            assert len(model.kernl_packed_graphs.captures) == 1
        mixed = model(ids, attention_mask=mask, return_dict=False)
    assert by_name.last_hidden_state.shape == (2, 9, 64)
    for output in (by_position.last_hidden_state, mixed[0]):
        torch.testing.assert_close(output, by_name.last_hidden_state, rtol=0, atol=0)
    with pytest.raises(TypeError):
        model(ids, input_ids=ids)  # a name given twice: the signature refuses it


def test_arguments_are_named_as_the_signature_binds_them():
    def forward(input_ids=None, attention_mask=None, *, output_hidden_states=None, **kwargs): ...

    name = argument_namer(inspect.signature(forward))
    assert name((1, 2), {"return_dict": False}) == dict(input_ids=1, attention_mask=2, return_dict=False)
    assert name((), {"attention_mask": 2}) == dict(attention_mask=2)
    with pytest.raises(TypeError, match="multiple values"):
        name((1,), {"input_ids": 1})
    with pytest.raises(TypeError):
        name((1, 2, 3), {})  # output_hidden_states is keyword-only
    assert argument_namer(inspect.signature(lambda x, /, y: None)) is None  # called as it was


def test_report_lists_rules_and_kept_ops(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))
    ids, mask = kit.padded_batch(2, 9, [9, 4], vocab=120)
    report = kit.compare_with_reference(model, DTYPES[0], [dict(input_ids=ids, attention_mask=mask)], [])
    text = str(report)
    assert "BertModel" in text and "rules fired:" in text and "kept as PyTorch:" in text
    assert report.to_dict()["totals"]["dropout"] >= 3


def test_without_a_usable_device_the_model_runs_unchanged(kit, monkeypatch):
    # a CPU model without the interpreter: nothing to run the kernels on
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))
    forward = model.forward
    with pytest.warns(UserWarning, match="compute capability >= 8.0"):
        report = optimize_model(model)
    assert report.status == "not optimized" and model.forward == forward
    assert "runs unchanged" in str(report)


class _Classifier(torch.nn.Module):
    """A user's own module around a BertModel: no transformers config of its own."""

    def __init__(self, bert):
        super().__init__()
        self.bert, self.head = bert, torch.nn.Linear(bert.config.hidden_size, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.head(
            self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        )


def test_a_module_of_ones_own_is_left_unchanged_and_its_transformers_model_is_named(kit):
    """A module around a Bert has no config: its forward (Python between the transformers calls) is
    not known, so it runs as it is, and the report names the model inside that can be optimized."""
    torch.manual_seed(0)
    model = _Classifier(kit.build(BertModel, kit.tiny_config(BertConfig))).eval()
    reference, peer = copy.deepcopy(model).double(), copy.deepcopy(model).to(kit.device, DTYPES[0])
    optimized = copy.deepcopy(model).to(kit.device, DTYPES[0])
    forward = optimized.forward
    with pytest.warns(UserWarning, match="model.bert"):
        report = optimize_model(optimized)
    assert report.status == "not optimized" and optimized.forward == forward
    assert "_Classifier is not a transformers model" in str(report)
    bert_report = optimize_model(optimized.bert)
    ids, mask = kit.padded_batch(2, 11, [11, 6], vocab=120)
    with torch.inference_mode():
        expected = reference(ids, mask)
        same_dtype, actual = (m(ids.to(kit.device), mask.to(kit.device)) for m in (peer, optimized))
    assert_matches_reference(actual, expected, same_dtype)
    # 17 real tokens: token bucket 32, as many as 2 x 16 unpacked: a tie of two rows runs unpacked
    assert bert_report.status == "optimized" and bert_report.graphs[0].inputs.startswith("[2x16 int64")


def test_training_mode_is_refused(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1)).train()
    with pytest.raises(ValueError, match="eval"):
        optimize_model(model)


def test_training_mode_after_optimizing_runs_as_pytorch(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1)).to(kit.device)
    optimized = copy.deepcopy(model)
    optimize_model(optimized)
    ids, mask = (t.to(kit.device) for t in kit.padded_batch(2, 7, [7, 3], vocab=120))
    optimized(input_ids=ids, attention_mask=mask)  # compiled (and the Q/K/V weights moved) in eval mode
    outputs = []
    for m in (optimized.train(), model.train()):
        torch.manual_seed(0)  # the same dropout masks
        outputs.append(m(input_ids=ids, attention_mask=mask).last_hidden_state)
    # it ran without gradients, through kernels, padded to a bucket (other dropout masks) before
    assert outputs[0].requires_grad
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    outputs[0].sum().backward()
    assert all(p.grad is not None for p in optimized.encoder.parameters())


@pytest.mark.parametrize(
    "model, buckets, error, match",
    [
        ("bert-base", (16,), TypeError, "torch.nn.Module"),
        (torch.nn.ReLU().eval(), (16,), ValueError, "no parameters"),
        (None, 16, TypeError, "buckets"),
        (None, (16, 0), ValueError, "buckets"),
        (None, ("16",), ValueError, "buckets"),
        (None, (), ValueError, "buckets"),
    ],
    ids=[
        "not-a-module",
        "no-parameters",
        "buckets-not-a-sequence",
        "bucket-zero",
        "bucket-string",
        "no-bucket",
    ],
)
def test_bad_arguments_name_the_argument(kit, model, buckets, error, match):
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1)) if model is None else model
    with pytest.raises(error, match=match):
        optimize_model(model, buckets=buckets)


def test_optimizing_twice_keeps_the_first_optimization(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1)).to(kit.device)
    original = model.forward
    report = optimize_model(model)
    optimized = model.forward
    with pytest.warns(UserWarning, match="already applied"):
        assert optimize_model(model) is report
    assert model.forward == optimized and model.kernl_original_forward == original


@pytest.mark.skipif(not on_gpu(), reason="autocast to fp16 is a GPU feature")
def test_fp32_weights_under_autocast(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    ids, mask = kit.padded_batch(2, 10, [10, 3], vocab=120)
    reference, peer, optimized = copy.deepcopy(model).double(), copy.deepcopy(model).cuda(), model.cuda()
    report = optimize_model(optimized)
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.autocast("cuda", dtype=torch.float16):
            same = peer(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
            actual = optimized(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
    # the work ran in fp16 (autocast): fp16's tolerance, on outputs rounded to fp16, at the real tokens
    # (masked positions hold zeros under packed execution)
    real = kit.real_tokens(dict(attention_mask=mask))
    assert_matches_reference(actual.half().cpu()[real], expected[real], same.half().cpu()[real])
    assert report.graphs[0].error is None and report.graphs[0].kept == {}


def test_a_deep_copy_of_an_optimized_model_is_a_plain_model_of_its_own_weights(kit):
    """kernl's forward is a closure over the optimized model: a copy carrying it computed with the
    original's weights (halving a weight of the copy changed nothing)."""
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1)).to(kit.device)
    plain = copy.deepcopy(model)
    optimize_model(model)
    ids, mask = (t.to(kit.device) for t in kit.padded_batch(2, 7, [7, 3], vocab=120))
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with pytest.warns(UserWarning, match="copy of an optimized model is a plain PyTorch model"):
        copied = copy.deepcopy(model)
    assert not hasattr(copied, "kernl_original_forward") and "forward" not in copied.__dict__
    with torch.no_grad():
        for target in (copied, plain):
            target.encoder.layer[0].output.dense.weight.mul_(0.5)
    with torch.inference_mode():
        actual = copied(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        kept = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # plain PyTorch on the copy's weights
    torch.testing.assert_close(kept, before)  # the original is untouched and still optimized
    assert optimize_model(copied).status == "optimized"


def test_an_input_that_requires_grad_runs_the_original_forward(kit):
    """Attributions (gradients to ``inputs_embeds``): kernl's kernels have no backward and ran under
    no_grad (backward raised); such a call runs the original forward, whose gradients are PyTorch's."""
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1)).to(kit.device)
    plain = copy.deepcopy(model)
    optimize_model(model)
    ids, mask = (t.to(kit.device) for t in kit.padded_batch(2, 7, [7, 3], vocab=120))
    grads = []
    for m in (model, plain):
        embeds = m.embeddings.word_embeddings(ids).detach().requires_grad_()
        m(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.sum().backward()
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_an_input_longer_than_the_position_table_says_so(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig))  # 128 positions
    optimize_model(model.to(kit.device))
    ids = torch.randint(5, 120, (1, 200), device=kit.device)
    with pytest.raises(ValueError, match="input_ids has 200 positions, more than the 128"):
        model(input_ids=ids)


def test_buckets_the_model_cannot_take_are_left_out_with_a_warning(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig))  # 128 positions
    with pytest.warns(UserWarning, match=r"buckets \[1000\] are longer than the inputs this model takes"):
        optimize_model(model.to(kit.device), buckets=(16, 1000))
    other = kit.build(BertModel, kit.tiny_config(BertConfig))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default buckets past 128 are left out without a word
        optimize_model(other.to(kit.device))
