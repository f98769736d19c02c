"""Packed MPNet (issue 20): the relative position bias is added per block inside the varlen kernel, from
a per-head table by distance, within each packed row; no ``T x T`` bias is made.

Against Hugging Face (fp64 reference, same-dtype peer) at the real tokens, with heavy and uneven
padding, a row of length 1, batches of one row and of many, left padding (a head that reads no first
token), and sentence-transformers' mean pooling over the output.
"""

import copy

import pytest
import torch
from transformers import MPNetConfig, MPNetForMaskedLM, MPNetModel

from kernl.integration import backend, optimize_model
from kernl.integration.rules.packed_attention import packed_attention_call
from kernl_testing import assert_matches_reference

PACKED_BIAS = "packed rows (varlen) + relative position bias"


@pytest.fixture
def dtype(kit):
    return torch.float16 if kit.device == "cuda" else torch.float32


def _packed_graphs(report) -> list:
    return [g for g in report.graphs if g.fired.get("packed_attention")]


def _uneven(kit, lengths, columns, seed):
    """Right-padded ``input_ids`` (pad token 1, MPNet's) and ``attention_mask`` of ``lengths``."""
    ids, mask = kit.padded_batch(len(lengths), columns, lengths, vocab=120, seed=seed)
    ids[mask == 0] = 1
    return ids, mask


def test_packed_mpnet_matches_hugging_face_at_real_tokens(kit, dtype):
    """Uneven padding with a row of length 1, heavy padding (26 of 160 tokens real), one row without a
    mask: the padded calls packed, every attention with the bias by distance, nothing left to PyTorch."""
    model = kit.build(MPNetModel, kit.tiny_config(MPNetConfig), attn_implementation="eager")
    uneven, heavy = _uneven(kit, [12, 3, 1, 7], 12, seed=0), _uneven(kit, [9, 1, 2, 13, 1], 32, seed=1)
    one_row = torch.randint(5, 120, (1, 21), generator=torch.Generator().manual_seed(2))
    calls = [dict(zip(("input_ids", "attention_mask"), pair, strict=True)) for pair in (uneven, heavy)]
    calls.append(dict(input_ids=one_row))
    report = kit.compare_with_reference(
        model, dtype, calls, ["last_hidden_state", "pooler_output"], scale=2.0
    )
    # 23 and 26 real tokens: both token bucket 32; the row without padding to remove (21 tokens, bucket 32
    # either way) runs packed as it is, on the same trace
    (graph,) = report.graphs
    assert graph.attention_masks == {PACKED_BIAS: 2} and graph.kept == {} and graph.error is None, str(report)
    assert not any("not packed" in note for note in report.notes), report.notes
    if kit.device == "cuda":  # the packed forward holds no host copy: captured whole
        assert all(g.runs_as == "CUDA graph (whole forward)" for g in report.graphs), str(report)


def test_left_padding_and_one_row_batches(kit, dtype):
    """A masked-LM head reads no first token, so left padding runs packed too: distances within a row do
    not depend on where its real tokens sit. Batches of one row: 6 real tokens of 40, and 13 of 13 (no
    padding to remove: packed as it is), all on the one packed trace."""
    model = kit.build(MPNetForMaskedLM, kit.tiny_config(MPNetConfig), attn_implementation="eager")
    ids, right = _uneven(kit, [14, 1, 6], 14, seed=3)
    left = right.flip(1)
    ids = torch.where(left.bool(), ids.flip(1), torch.ones_like(ids))
    one_ids, one_right = _uneven(kit, [6], 40, seed=7)
    calls = [
        dict(input_ids=ids, attention_mask=left),
        dict(input_ids=one_ids.flip(1), attention_mask=one_right.flip(1)),
        dict(input_ids=torch.randint(5, 120, (1, 13)), attention_mask=torch.ones(1, 13, dtype=torch.long)),
    ]
    report = kit.compare_with_reference(model, dtype, calls, [], aggregate_fields=["logits"])
    packed = _packed_graphs(report)
    # token buckets 32 and 16 share the one packed trace (the token count is symbolic)
    assert len(packed) == 1 and len(report.graphs) == 1, str(report)
    assert all(graph.attention_masks == {PACKED_BIAS: 2} for graph in packed), str(report)


def test_a_row_with_a_gap_in_its_mask_runs_unpacked(kit, dtype):
    """Hugging Face's bias is by column distance: with masked columns between real tokens the packed
    distances would be shorter, so the call runs unpacked (and still matches)."""
    model = kit.build(MPNetModel, kit.tiny_config(MPNetConfig), attn_implementation="eager")
    ids, mask = _uneven(kit, [10, 4, 7], 10, seed=4)
    mask[0, 3:5] = 0
    report = kit.compare_with_reference(
        model, dtype, [dict(input_ids=ids, attention_mask=mask)], ["last_hidden_state"], scale=2.0
    )
    assert report.graphs and not _packed_graphs(report), str(report)


def test_mean_pooled_sentence_embeddings_match(kit, dtype):
    """sentence-transformers' mean pooling (all-mpnet-base-v2's) over the packed output: masked positions
    hold zeros and are left out by the mask, real tokens match Hugging Face."""
    model = kit.build(MPNetModel, kit.tiny_config(MPNetConfig), attn_implementation="eager")
    ids, mask = _uneven(kit, [5, 19, 1, 11, 8, 2], 19, seed=5)
    peer, optimized = (copy.deepcopy(model).to(kit.device, dtype) for _ in range(2))
    report = optimize_model(optimized)
    reference = copy.deepcopy(model).double()

    def mean_pooled(m, device):
        weights = mask.to(device)[..., None]
        with torch.inference_mode():
            hidden = m(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        # in the model's dtype, so that the tolerance is that dtype's (the int mask would promote to fp32)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).to(hidden.dtype)

    expected = mean_pooled(reference, "cpu")
    assert_matches_reference(
        mean_pooled(optimized, kit.device), expected, mean_pooled(peer, kit.device), scale=2.0
    )
    assert len(_packed_graphs(report)) == 1, str(report)


def test_the_packed_graph_makes_no_token_by_token_bias(kit, dtype, monkeypatch):
    """The dense ``(1, H, T, T)`` bias and its batch copy are dead once attention is packed: no tensor with
    two dimensions of the packed length (32) stays; the per-distance table goes to the kernel."""
    rewritten, rewrite_graph = [], backend.rewrite_graph
    monkeypatch.setattr(
        backend, "rewrite_graph", lambda *a: rewritten.append(rewrite_graph(*a)) or rewritten[-1]
    )
    model = kit.build(
        MPNetModel, kit.tiny_config(MPNetConfig, num_hidden_layers=1), attn_implementation="eager"
    )
    ids, mask = _uneven(kit, [12, 3, 1, 7], 12, seed=6)
    optimized = copy.deepcopy(model).to(kit.device, dtype)
    optimize_model(optimized)
    with torch.inference_mode():
        optimized(input_ids=ids.to(kit.device), attention_mask=mask.to(kit.device))
    (graph,) = rewritten
    nodes = list(graph.graph.nodes)
    values = [n.meta.get("example_value") for n in nodes]
    shapes = [tuple(value.shape) for value in values if isinstance(value, torch.Tensor)]
    assert any(32 in s for s in shapes), shapes  # the examples hold the traced call's token count
    assert not [s for s in shapes if s.count(32) >= 2], shapes
    (call,) = [n for n in nodes if n.target is packed_attention_call]
    table = call.args[5].meta["example_value"]
    assert tuple(table.shape) == (4, 2 * 512 + 1), table.shape  # heads x distances -512..512
