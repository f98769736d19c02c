"""Per-model compilation (issue 20 item 3): no TorchDynamo state shared between models, no limit hit silently."""

import copy
import warnings

import pytest
import torch
from transformers import BertConfig, BertModel

from kernl.integration import optimize_model
from kernl.integration.compile_state import own_code
from kernl_testing import assert_matches_reference, on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32
LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def test_each_model_keeps_its_rules_past_another_models_recompile_limit(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))
    reference = copy.deepcopy(model).double()
    first, second = (copy.deepcopy(model).to(kit.device, DTYPE) for _ in range(2))
    peer = copy.deepcopy(model).to(kit.device, DTYPE)
    first_report, second_report = (optimize_model(m, packed=False) for m in (first, second))
    ids = torch.randint(5, 120, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch._dynamo.config.patch(**{LIMIT: 2}):
        for batch in (1, 2):  # a bucket length and no mask: one graph per batch size
            first(input_ids=ids[:batch].to(kit.device))
        with pytest.warns(UserWarning, match=r"recompile limit \(2\) reached"):
            beyond = first(input_ids=ids.to(kit.device))  # a third signature: past the limit
        first(input_ids=ids.to(kit.device))  # said once
        assert_matches_reference(
            beyond[0], reference(input_ids=ids)[0], peer(input_ids=ids.to(kit.device))[0]
        )
        second(input_ids=ids.to(kit.device))
    assert len(first_report.graphs) == 2
    assert sum("recompile limit (2) reached" in note for note in first_report.notes) == 1
    (graph,) = second_report.graphs  # the second model compiles its own graphs, with every rule
    assert graph.fired["linear_act"] >= 7 and graph.fired["attention_sdpa"] == 1, str(second_report)


def test_packed_calls_past_the_limit_run_unpacked(kit):
    """Token buckets share the packed graph (no recompilation), so a limit of 1 holds any number of them;
    a new kind of call (inputs_embeds) past it runs unpacked, and says so."""
    model = kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))
    reference = copy.deepcopy(model).double()
    optimized, peer = (copy.deepcopy(model).to(kit.device, DTYPE) for _ in range(2))
    report = optimize_model(optimized)
    ids = torch.randint(5, 120, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), torch._dynamo.config.patch(**{LIMIT: 1}):
        optimized(input_ids=ids[:1].to(kit.device))  # 40 tokens: bucket 48 (not 64), the one packed graph
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimized(input_ids=ids.to(kit.device))  # 120 tokens: bucket 128, the same graph
        assert not [w for w in caught if "recompile limit" in str(w.message)], [
            str(w.message) for w in caught
        ]
        embeds = model.embeddings.word_embeddings(ids).detach()
        with pytest.warns(UserWarning, match="packed forward"):
            actual = optimized(inputs_embeds=embeds.to(kit.device, DTYPE))  # a new graph, past the limit
        expected = reference(inputs_embeds=embeds.double())
        same = peer(inputs_embeds=embeds.to(kit.device, DTYPE))
    assert_matches_reference(actual.last_hidden_state, expected.last_hidden_state, same.last_hidden_state)
    assert_matches_reference(actual.pooler_output, expected.pooler_output, same.pooler_output)
    assert [g.part for g in report.graphs] == ["packed", ""], str(report)


def test_own_code_is_a_private_copy_that_behaves_the_same():
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = BertModel(config).eval()
    method = own_code(model.forward)
    assert method.__func__.__code__ is not model.forward.__func__.__code__
    assert method.__self__ is model and method.__name__ == model.forward.__name__
    ids = torch.randint(0, 100, (1, 5))
    with torch.inference_mode():
        torch.testing.assert_close(method(input_ids=ids)[0], model(input_ids=ids)[0], rtol=0, atol=0)
