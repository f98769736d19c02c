"""The whole-forward CUDA graphs: what a capture is keyed by, and that replays stay correct when
inputs, arguments or weights change."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from kernl.integration import optimize_model
from kernl.integration.forward_graphs import signature
from kernl.integration.trees import map_tensors
from kernl_testing import assert_matches_reference, needs_two_gpus, on_gpu


def test_signature_covers_shapes_dtypes_and_plain_arguments():
    ids = torch.zeros(2, 16, dtype=torch.long)
    key = signature((ids,), {"attention_mask": ids, "output_hidden_states": False})
    assert key == signature((ids.clone(),), {"attention_mask": ids, "output_hidden_states": False})
    assert key != signature((ids[:1],), {"attention_mask": ids, "output_hidden_states": False})
    assert key != signature((ids,), {"attention_mask": ids.int(), "output_hidden_states": False})
    assert key != signature((ids,), {"attention_mask": ids, "output_hidden_states": True})
    nested = {"encoder_outputs": {"last_hidden_state": torch.zeros(2, 16, 8)}, "head_mask": [1, None]}
    key = signature((ids,), nested)
    assert key == signature((ids,), copy.deepcopy(nested))
    assert key != signature((ids,), {**nested, "head_mask": [1, 2]})
    assert key != signature((ids,), {**nested, "encoder_outputs": {"last_hidden_state": ids}})
    assert signature((ids,), {"cache": object()}) is None  # an object: runs without a graph
    outside = signature((ids,), {})
    with torch.inference_mode():  # a graph captured in inference mode holds inference tensors
        assert signature((ids,), {}) != outside


def test_map_tensors_keeps_the_structure():
    value = {"a": torch.ones(2), "b": (torch.zeros(1), None, 3)}
    doubled = map_tensors(lambda t: t * 2, value)
    assert torch.equal(doubled["a"], torch.full((2,), 2.0)) and doubled["b"][1:] == (None, 3)
    output = BaseModelOutputWithPooling(last_hidden_state=torch.ones(1, 2, 3), pooler_output=torch.ones(1, 3))
    copied = map_tensors(torch.Tensor.clone, output)
    assert type(copied) is BaseModelOutputWithPooling
    assert list(copied) == ["last_hidden_state", "pooler_output"]
    assert copied.pooler_output is copied[1] is copied["pooler_output"] is not output.pooler_output
    assert copied.hidden_states is None and copied.to_tuple()[0].shape == (1, 2, 3)


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
def test_replays_follow_inputs_arguments_and_weights(kit):
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    reference = copy.deepcopy(model).double()
    optimized = copy.deepcopy(model).to("cuda", torch.float16)
    peer = copy.deepcopy(model).to("cuda", torch.float16)
    report = optimize_model(optimized)

    def check(ids, mask, mode=torch.inference_mode, **kwargs):
        with mode():
            expected = reference(input_ids=ids, attention_mask=mask, **kwargs)
            same = peer(input_ids=ids.cuda(), attention_mask=mask.cuda(), **kwargs)
            actual = optimized(input_ids=ids.cuda(), attention_mask=mask.cuda(), **kwargs)
        real = mask != 0  # masked positions: zeros under packed execution, no defined value in HF
        hidden = (o.last_hidden_state.cpu()[real] for o in (actual, expected, same))
        assert_matches_reference(*hidden, name="last_hidden_state")
        assert_matches_reference(actual.pooler_output, expected.pooler_output, same.pooler_output)
        return actual

    first = check(*kit.padded_batch(2, 16, [16, 5], vocab=120, seed=1))
    kept = first.last_hidden_state.clone()
    check(*kit.padded_batch(2, 16, [9, 16], vocab=120, seed=2))  # same graph, new inputs
    assert torch.equal(first.last_hidden_state, kept)  # outputs are copies: the replay did not overwrite them
    assert report.graphs[0].runs_as == "CUDA graph (whole forward)", str(report)
    check(*kit.padded_batch(2, 16, [7, 16], vocab=120, seed=9), mode=torch.no_grad)  # not inference mode
    hidden = check(*kit.padded_batch(2, 16, [16, 3], vocab=120, seed=3), output_hidden_states=True)
    assert len(hidden.hidden_states) == 3  # another argument: another capture
    for target in (reference, peer, optimized):  # weights changed in place: the graph reads them in place
        with torch.no_grad():
            target.encoder.layer[0].attention.self.query.weight.mul_(0.5)
            target.encoder.layer[1].output.dense.bias.add_(0.25)
    check(*kit.padded_batch(2, 16, [16, 5], vocab=120, seed=4))
    for target in (reference, peer, optimized):  # a parameter replaced: the graphs are captured again
        dense = target.pooler.dense
        dense.weight = torch.nn.Parameter(dense.weight.detach().flip(0).clone(), requires_grad=False)
    check(*kit.padded_batch(2, 16, [16, 5], vocab=120, seed=5))
    bias = {}
    for target in (reference, peer, optimized):  # a parameter set to None, then back: captured again
        bias[id(target)], target.pooler.dense.bias = target.pooler.dense.bias, None
    check(*kit.padded_batch(2, 16, [16, 5], vocab=120, seed=6))
    for target in (reference, peer, optimized):
        target.pooler.dense.bias = bias[id(target)]
    check(*kit.padded_batch(2, 16, [16, 5], vocab=120, seed=7))
    for target in (reference, peer, optimized):  # new memory under the same parameter (what .half() does)
        dense = target.encoder.layer[1].intermediate.dense
        dense.weight.data = dense.weight.detach() * 0.5
    check(*kit.padded_batch(2, 16, [16, 5], vocab=120, seed=8))


def _cache_step(weight, cache, position, x):
    """A decoder step in miniature: write ``x @ weight`` into ``cache`` at ``position``, read it all."""
    cache.index_copy_(0, position, x @ weight)
    position.add_(1)
    return cache.sum(0) * 2


@pytest.mark.parametrize("step_graphs", [False, True] if on_gpu() else [False])
def test_in_place_updates_of_static_inputs_survive(step_graphs):
    """The rewritten graph keeps in-place updates (FX deems methods pure), and under per-graph CUDA graphs
    a replay writes the static cache where it lives; new cache memory is captured anew, a few times."""
    from kernl.integration.backend import KernlBackend
    from kernl.integration.report import OptimizationReport
    from kernl.integration.step_graphs import MAX_CAPTURES

    device = "cuda" if on_gpu() else "cpu"
    weight = torch.nn.Parameter(torch.randn(8, 8, device=device), requires_grad=False)
    report = OptimizationReport()
    step = torch.compile(
        _cache_step, backend=KernlBackend(report, [weight], "step", step_graphs), dynamic=False
    )
    torch._dynamo.reset()
    for _ in range(MAX_CAPTURES + 2):  # the last ones exceed the captures kept: no graph
        cache, position = torch.zeros(6, 8, device=device), torch.zeros(1, dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(cache)
        torch._dynamo.mark_static_address(position)
        expected_cache, expected_position = cache.clone(), position.clone()
        for _ in range(4):
            x = torch.randn(1, 8, device=device)
            expected = _cache_step(weight, expected_cache, expected_position, x)
            torch.testing.assert_close(step(weight, cache, position, x), expected)
            torch.testing.assert_close(cache, expected_cache)
            assert torch.equal(position, expected_position)
    assert len(report.graphs) == 1 and report.graphs[0].error is None, str(report)
    assert report.graphs[0].inputs == f"[1x8 float32, 2 static cache tensors] on {cache.device}"
    if step_graphs:
        assert report.graphs[0].runs_as == "CUDA graph (step)"


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
def test_a_failed_capture_runs_without_a_graph_and_warns():
    from kernl.integration.cuda_graphs import CudaGraphs

    def uncapturable(x):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("this step cannot be captured")
        return x * 6.0

    graphs = CudaGraphs(
        uncapturable, lambda args, kwargs: tuple(args[0].shape), torch.cuda.graph_pool_handle()
    )
    x = torch.arange(4.0, device="cuda")
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = graphs(x)
    torch.testing.assert_close(out, x * 6.0)
    assert graphs.captures[(4,)].graph is None and "capture failed" in graphs.captures[(4,)].error


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
def test_memory_kept_by_many_captures_is_bounded_by_the_largest():
    """Captures of one pool reuse each other's freed intermediates, and warm-ups reuse one side stream's
    cached blocks: eight keys whose calls each need 64 MiB scratches keep about four, not eighteen
    (a warm-up on a new stream per capture kept one more scratch reserved with every capture). A call
    holds two scratches at once (``ones`` and the product): the pool and the side stream keep two each."""
    from kernl.integration.cuda_graphs import CudaGraphs

    scratch = 16 * 2**20  # float32 elements: 64 MiB

    def with_scratch(x):
        return (torch.ones(scratch, device=x.device) * x.sum()).sum() + x

    graphs = CudaGraphs(
        with_scratch, lambda args, kwargs: tuple(args[0].shape), torch.cuda.graph_pool_handle()
    )
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    for size in range(1, 9):
        x = torch.full((size,), 2.0, device="cuda")
        torch.testing.assert_close(graphs(x), x + 2.0 * scratch * size)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_reserved() - before
    assert len(graphs.captures) == 8 and all(c.graph is not None for c in graphs.captures.values())
    assert kept <= 6 * 4 * scratch, f"{kept / 2**20:.0f} MiB kept by 8 captures of a 64 MiB scratch"


@needs_two_gpus
def test_a_model_on_a_gpu_other_than_the_current_one(kit):
    """Streams, captures and kernels follow the model's GPU, not the current device (silently missing
    work in the graph otherwise: the model's ops ran on a stream the capture did not watch)."""
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    reference = copy.deepcopy(model).double()
    peer = copy.deepcopy(model).to("cuda:1", torch.float16)
    optimized = copy.deepcopy(model).to("cuda:1", torch.float16)
    report = optimize_model(optimized)
    for seed in (1, 2, 3):  # warm-up, capture, replays
        ids, mask = kit.padded_batch(2, 16, [16, 5], vocab=120, seed=seed)
        with torch.inference_mode(), torch.cuda.device(0):
            expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            same = peer(input_ids=ids.to("cuda:1"), attention_mask=mask.to("cuda:1")).last_hidden_state
            actual = optimized(input_ids=ids.to("cuda:1"), attention_mask=mask.to("cuda:1")).last_hidden_state
        real = mask != 0  # masked positions: zeros under packed execution, no defined value in HF
        assert_matches_reference(actual.cpu()[real], expected[real], same.cpu()[real])
    assert report.graphs[0].runs_as == "CUDA graph (whole forward)", str(report)
