"""MPNet and DeBERTa (issue 20, item 4): relative-position buckets computed once, outside the captured
forward, so the forward holds no host-to-device copy and captures as one CUDA graph.

Against Hugging Face at the real tokens (fp64 reference, same-dtype peer); on the CPU the compiled graph
is checked to compute no bucket (no ``torch.tensor`` constant, no ``log``); on a GPU the report must show
the whole forward captured.
"""

import copy

import pytest
import torch
from transformers import (
    DebertaConfig,
    DebertaModel,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    MPNetConfig,
    MPNetForMaskedLM,
    MPNetModel,
)

from kernl.integration import optimize_model
from kernl.integration.bench.zoo import FAMILIES
from kernl.integration.position_tables import TABLE, precompute_position_tables
from kernl_testing import on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32
# DeBERTa-v3's settings (log buckets: transformers computes part of them on the CPU), tiny: the zoo's
DEBERTA_V3 = FAMILIES["DeBERTa-v2"].tiny
DEBERTA_V2 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1)
CASES = {
    "mpnet": (MPNetModel, MPNetConfig, {}, "last_hidden_state"),
    "mpnet-masked-lm": (MPNetForMaskedLM, MPNetConfig, {}, "logits"),
    "deberta-v3": (DebertaV2Model, DebertaV2Config, DEBERTA_V3, "last_hidden_state"),
    "deberta-v3-classification": (
        DebertaV2ForSequenceClassification,
        DebertaV2Config,
        {**DEBERTA_V3, "num_labels": 3},
        "logits",
    ),
    "deberta-v2-unbucketed": (DebertaV2Model, DebertaV2Config, DEBERTA_V2, "last_hidden_state"),
    "deberta": (DebertaModel, DebertaConfig, {"relative_attention": True}, "last_hidden_state"),
}


def _model(kit, case):
    model_class, config_class, overrides, _ = CASES[case]
    return kit.build(model_class, kit.tiny_config(config_class, **overrides), attn_implementation="eager")


def _calls(kit):
    ids, mask = kit.padded_batch(3, 37, [37, 20, 1], vocab=120, seed=3)
    return [dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids[:1, :9])]


@pytest.mark.parametrize("case", CASES)
def test_outputs_match_hugging_face(kit, case):
    if kit.device == "cpu" and case in (
        "mpnet-masked-lm",
        "deberta-v3-classification",
        "deberta-v2-unbucketed",
    ):
        pytest.skip("the same encoder as another case: on the GPU only (the interpreter is slow)")
    model = _model(kit, case)
    report = kit.compare_with_reference(model, DTYPE, _calls(kit), [CASES[case][3]], scale=2.0)
    assert any("relative-position buckets of" in note for note in report.notes), report.notes
    assert report.graphs and all(graph.error is None for graph in report.graphs)
    if kit.device == "cuda":  # the point of the tables: each signature's forward is captured whole
        assert all(graph.runs_as == "CUDA graph (whole forward)" for graph in report.graphs), str(report)


@pytest.mark.parametrize("case", ["mpnet", "deberta-v3"])
def test_the_compiled_forward_computes_no_position_bucket(kit, case):
    """transformers' bucket code takes a ``log`` (MPNet, DeBERTa's log buckets) and moves a CPU constant
    to the device (DeBERTa's ``torch.tensor(mid - 1).type_as(...)``, a copy no CUDA graph can hold); with
    the table installed neither is left in the graph."""
    model = _model(kit, case)
    precompute_position_tables(model)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids, mask = _calls(kit)[0].values()
    with torch.no_grad():
        torch.compile(model, backend=record, dynamic=False)(input_ids=ids, attention_mask=mask)
    nodes = [node for gm in graphs for node in gm.graph.nodes]
    bucket_ops = [n for n in nodes if n.op == "call_function" and n.target in (torch.log, torch.sign)]
    moved_constants = [
        n
        for n in nodes
        if n.op == "call_method"
        and n.target in ("type_as", "to")
        and getattr(n.args[0], "target", None) is torch.tensor
    ]
    assert graphs and not bucket_ops and not moved_constants, bucket_ops + moved_constants


def test_the_table_holds_what_transformers_computes_and_uncovered_calls_run_the_original(kit):
    model = _model(kit, "mpnet")
    reference = copy.deepcopy(model)
    lines = precompute_position_tables(model)
    assert lines == [
        "relative-position buckets of encoder computed once (one per distance up to 512), outside the captured forward"
    ]
    assert precompute_position_tables(model) == []  # installed once
    encoder, original = model.encoder, reference.encoder
    x = torch.randn(2, 50, 64)
    assert torch.equal(encoder.compute_position_bias(x), original.compute_position_bias(x))
    assert torch.equal(  # other buckets than the table's: the original code
        encoder.compute_position_bias(x, num_buckets=16), original.compute_position_bias(x, num_buckets=16)
    )
    longer = torch.randn(1, 600, 64)  # past the table: its last entries, where the buckets stopped growing
    assert torch.equal(encoder.compute_position_bias(longer), original.compute_position_bias(longer))
    deberta = _model(kit, "deberta-v3")
    expected = copy.deepcopy(deberta).encoder.get_rel_pos(torch.randn(1, 41, 64))
    precompute_position_tables(deberta)
    assert torch.equal(deberta.encoder.get_rel_pos(torch.randn(1, 41, 64)), expected)
    assert TABLE not in deberta.state_dict() and TABLE in dict(deberta.encoder.named_buffers())


def test_a_copy_of_an_optimized_model_has_no_table(kit):
    model = _model(kit, "deberta-v3").to(kit.device, DTYPE)
    optimize_model(model)
    with pytest.warns(UserWarning, match="plain PyTorch model"):
        copied = copy.deepcopy(model)
    assert TABLE not in dict(copied.encoder.named_buffers()) and "get_rel_pos" not in copied.encoder.__dict__


def test_a_deberta_without_relative_attention_is_left_alone(kit):
    model = kit.build(DebertaV2Model, kit.tiny_config(DebertaV2Config), attn_implementation="eager")
    assert precompute_position_tables(model) == [] and TABLE not in dict(model.named_buffers())


def test_mpnet_buckets_by_distance_are_transformers_own_out_to_16k(kit):
    """The per-distance table, clamped past its ends, holds transformers' ``relative_position_bucket`` of
    every distance up to 16K either way, bit for bit (the buckets stop growing at 128)."""
    model = _model(kit, "mpnet")
    precompute_position_tables(model)
    table = getattr(model.encoder, TABLE)
    radius = (table.shape[0] - 1) // 2
    distances = torch.arange(-16384, 16385)
    expected = type(model.encoder).relative_position_bucket(distances)
    assert torch.equal(table[distances.clamp(-radius, radius) + radius], expected)


def test_mpnet_buckets_not_one_per_distance_leave_the_encoder_alone(kit):
    """A bucket function that is not a function of the distance alone (a transformers release that would
    change it) is not turned into a table by distance: the original method stays."""
    model = _model(kit, "mpnet")
    bucket = model.encoder.relative_position_bucket

    def by_position(relative_position, num_buckets=32, max_distance=128):
        return (bucket(relative_position, num_buckets, max_distance) + relative_position[:1]) % num_buckets

    model.encoder.relative_position_bucket = by_position
    assert precompute_position_tables(model) == []
    assert "compute_position_bias" not in model.encoder.__dict__ and TABLE not in dict(model.named_buffers())
