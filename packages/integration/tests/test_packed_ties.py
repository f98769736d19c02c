"""Calls with no padding to remove (issue 20): batch-1 rows, full batches whose token count is a bucket.

Single rows run on the packed trace rather than tracing, compiling and capturing unpacked graphs of their
own, unless the unpacked path already has a graph for them; full batches keep the unpacked path. Full rows (no padded position) run packed
without a gather or a scatter: the caller's tensors go in, views of the packed outputs come out.
"""

import collections
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from kernl.integration import optimize_model
from kernl_testing import assert_matches_reference, on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32
DEVICE = "cuda" if on_gpu() else "cpu"
GATHER_AND_SCATTER = {
    "index_select",
    "index_copy",
    "index_copy_",
    "nonzero_static",
    "index_put",
    "index_put_",
}


def _packed_graphs(report) -> list:
    return [g for g in report.graphs if g.fired.get("packed_attention")]


def _bert(kit, **overrides):
    return kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1, **overrides))


def _optimized(model, packed=True):
    optimized = copy.deepcopy(model).to(DEVICE, DTYPE)
    return optimized, optimize_model(optimized, packed=packed)


def _ids(batch, columns, seed):
    return torch.randint(5, 120, (batch, columns), generator=torch.Generator().manual_seed(seed))


def _padded(lengths, columns, seed):
    ids = _ids(len(lengths), columns, seed)
    mask = (torch.arange(columns)[None] < torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=ids, attention_mask=mask)


def _moved(call):
    """A call's tensors on the test device, float ones (``inputs_embeds``) in the models' dtype."""
    return {k: v.to(DEVICE, DTYPE if v.is_floating_point() else v.dtype) for k, v in call.items()}


def _check(reference, peer, actual, call, fields=("last_hidden_state", "pooler_output")):
    """``actual`` (the optimized model's output on ``call``) matches Hugging Face at the real tokens."""
    with torch.inference_mode():
        expected, same_dtype = reference(**call), peer(**_moved(call))
    mask = call.get("attention_mask")

    def pick(output):  # a per-token output at the real tokens only
        return output.cpu() if mask is None or output.dim() < 3 else output.cpu()[mask.bool()]

    for field in fields:
        assert_matches_reference(
            pick(actual[field]), pick(expected[field]), pick(same_dtype[field]), name=field
        )


class _Spy:
    """Wraps a packed forward's ``compiled``: counts its calls and keeps the last output; the aten ops
    dispatched outside it (the packed forward's own host work) are counted while :meth:`counting`."""

    def __init__(self, packed_forward):
        self.compiled, self.calls, self.output = packed_forward.compiled, 0, None
        self.ops = collections.Counter()
        packed_forward.compiled = self

    def __call__(self, **inputs):
        self.calls += 1
        with _disable_current_modes():  # the compiled call's own ops are not the packed forward's
            self.output = self.compiled(**inputs)
        return self.output

    def counting(self):
        spy = self

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                spy.ops[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.ops.clear()
        return Count()


def test_calls_without_padding_to_remove_run_on_the_packed_trace(kit):
    """A stream mixing padded batches with batch-1 rows of bucket lengths (with and without a mask), a
    shorter single row and full rows in fewer tokens than the unpacked path: every call runs packed, on
    the one packed trace; the unpacked path traces, compiles and captures nothing. Per-row outputs (the pooler)
    match Hugging Face too."""
    model = _bert(kit)
    reference, peer = copy.deepcopy(model).double(), copy.deepcopy(model).to(DEVICE, DTYPE)
    optimized, report = _optimized(model)
    calls = [
        _padded([12, 3, 7], 12, seed=0),
        dict(input_ids=_ids(1, 16, seed=1)),
        dict(input_ids=_ids(1, 64, seed=2), attention_mask=torch.ones(1, 64, dtype=torch.long)),
        dict(input_ids=_ids(1, 11, seed=3)),
        dict(  # the caller's own token types and position ids, flattened
            input_ids=_ids(2, 24, seed=21),
            token_type_ids=(torch.arange(24) >= 5).long().expand(2, 24),
            position_ids=(torch.arange(24) + 3).expand(2, 24),
        ),
        dict(input_ids=_ids(1, 11, seed=22), token_type_ids=torch.ones(1, 11, dtype=torch.long)),  # padded
    ]
    for call in calls:
        with torch.inference_mode():
            actual = optimized(**_moved(call))
        _check(reference, peer, actual, call)
    (graph,) = report.graphs  # the packed trace only
    assert graph.fired.get("packed_attention") == 1, str(report)
    if on_gpu():  # token buckets 32, 16, 64 and 48 (3 x 16, 2 x 24) captured; no unpacked capture or warm-up
        assert not optimized.kernl_cuda_graphs.captures, str(report)
        assert len(optimized.kernl_packed_graphs.captures) == len(report.warmups) == 4, str(report)


def test_a_tie_keeps_the_unpacked_graph_it_already_has(kit):
    """A left-padded row makes the pooler's model run it unpacked, compiling the unpacked (1, 16) graph;
    a later (1, 16) call with a mask of ones ties and keeps that graph, while a (1, 32) tie, which has no
    unpacked graph, runs packed."""
    model = _bert(kit)
    reference, peer = copy.deepcopy(model).double(), copy.deepcopy(model).to(DEVICE, DTYPE)
    optimized, report = _optimized(model)
    spy = _Spy(optimized.forward)
    left = dict(input_ids=_ids(1, 16, seed=6), attention_mask=(torch.arange(16) >= 5).long()[None])
    full = dict(input_ids=_ids(1, 16, seed=7), attention_mask=torch.ones(1, 16, dtype=torch.long))
    other = dict(input_ids=_ids(1, 32, seed=8), attention_mask=torch.ones(1, 32, dtype=torch.long))
    with torch.inference_mode():
        optimized(**_moved(left))  # packed first, learns the pooler reads first tokens: then unpacked
        graphs, packed_calls = len(report.graphs), spy.calls
        assert optimized.forward.unpacked.has_graph(_moved(full))
        actual = optimized(**_moved(full))
        assert spy.calls == packed_calls and len(report.graphs) == graphs, str(report)  # the unpacked graph
        assert not optimized.forward.unpacked.has_graph(_moved(other))
        other_actual = optimized(**_moved(other))
        assert spy.calls == packed_calls + 1 and len(report.graphs) == graphs, str(report)  # packed trace
    _check(reference, peer, actual, full)
    _check(reference, peer, other_actual, other)
    assert len(_packed_graphs(report)) == 1 and len(report.graphs) == 2, str(report)


def test_a_full_batch_tie_runs_unpacked(kit):
    """A batch of several full rows whose token count is a bucket (as the `kernl bench` grid's) saves no
    padding by packing: it runs on the unpacked path, with or without a mask of ones, and matches
    Hugging Face; a single row of the same tokens runs packed."""
    model = _bert(kit)
    reference, peer = copy.deepcopy(model).double(), copy.deepcopy(model).to(DEVICE, DTYPE)
    optimized, report = _optimized(model)
    spy = _Spy(optimized.forward)
    calls = [
        dict(input_ids=_ids(3, 16, seed=4)),
        dict(input_ids=_ids(2, 16, seed=5), attention_mask=torch.ones(2, 16, dtype=torch.long)),
    ]
    with torch.inference_mode():
        for call in calls:
            _check(reference, peer, optimized(**_moved(call)), call)
        assert spy.calls == 0 and not _packed_graphs(report), str(report)
        row = dict(input_ids=_ids(1, 16, seed=24))
        _check(reference, peer, optimized(**_moved(row)), row)
    assert spy.calls == 1 and len(_packed_graphs(report)) == 1, str(report)


def test_full_rows_run_packed_without_a_gather_or_a_scatter(kit):
    """A row filling its bucket comes back as the packed output itself, a shorter row and a full batch as
    views of it; none dispatches a gather or a scatter, and one row with no mask dispatches at most the
    pooler's view outside the compiled call (fresh copies of the inputs aside, which only a compiled call
    without CUDA graphs gets). Outputs equal the unpacked path's within rounding."""
    model = _bert(kit)
    reference = copy.deepcopy(model).double()
    optimized, _ = _optimized(model)
    unpacked, _ = _optimized(model, packed=False)
    spy = _Spy(optimized.forward)
    cases = [  # (call, batch, length)
        (dict(input_ids=_ids(1, 16, seed=9)), 1, 16),
        (dict(input_ids=_ids(1, 11, seed=10)), 1, 11),
        (dict(input_ids=_ids(1, 32, seed=11), attention_mask=torch.ones(1, 32, dtype=torch.long)), 1, 32),
        (dict(input_ids=_ids(3, 20, seed=12)), 3, 20),  # 60 tokens in bucket 64
        (dict(input_ids=_ids(2, 20, seed=13)), 2, 20),  # 40 tokens in bucket 48
    ]
    for call, batch, length in cases:
        moved = _moved(call)
        with torch.inference_mode():
            optimized(**moved)  # compiles and captures
            before = spy.calls
            with spy.counting():
                actual = optimized(**moved)
            expected_unpacked = unpacked(**moved)
        assert spy.calls == before + 1, "the call did not run packed"
        assert not GATHER_AND_SCATTER & set(spy.ops), spy.ops
        hidden, packed_hidden = actual.last_hidden_state, spy.output.last_hidden_state
        assert hidden.shape == (batch, length, 64) and hidden.data_ptr() == packed_hidden.data_ptr()
        if batch * length == packed_hidden.shape[1] and batch == 1:
            assert hidden is packed_hidden
        assert actual.pooler_output.shape == (batch, 64)
        with torch.inference_mode():
            expected = reference(**call)
        for field in ("last_hidden_state", "pooler_output"):
            assert_matches_reference(
                actual[field].cpu(), expected[field], expected_unpacked[field].cpu(), name=field
            )
        if len(call) == 1 and batch == 1 and length == 16:
            outside = sum(n for op, n in spy.ops.items() if op != "clone")
            assert outside <= 1, spy.ops


def test_roberta_full_rows_keep_their_positions(kit):
    """RoBERTa numbers positions from padding_idx + 1 (pad tokens at padding_idx): one row, a full batch
    and full rows of ``inputs_embeds`` (40 tokens, padded to 48) packed as they are match Hugging Face."""
    model = kit.build(
        RobertaModel,
        kit.tiny_config(RobertaConfig, num_hidden_layers=1, pad_token_id=1, max_position_embeddings=130),
    )
    reference, peer = copy.deepcopy(model).double(), copy.deepcopy(model).to(DEVICE, DTYPE)
    optimized, report = _optimized(model)
    spy = _Spy(optimized.forward)
    embeds = model.embeddings.word_embeddings(_ids(2, 20, seed=23)).detach()  # every token counts
    calls = [
        dict(input_ids=_ids(1, 16, seed=14)),
        dict(input_ids=_ids(2, 24, seed=15)),
        dict(inputs_embeds=embeds),
    ]
    for call in calls:
        with torch.inference_mode():
            actual = optimized(**_moved(call))
        _check(reference, peer, actual, call)
    # all packed: one trace for input_ids, one for inputs_embeds (another kind of call), none unpacked
    assert spy.calls == 3 and len(_packed_graphs(report)) == len(report.graphs) == 2, str(report)


def test_has_graph_tells_the_calls_the_bucketed_forward_compiled(kit):
    """The unpacked (bucketed) forward answers for a call's padded graph: lengths sharing a bucket share
    it; another batch, another bucket, a mask where none was, or another dtype do not."""
    optimized, _ = _optimized(_bert(kit), packed=False)
    has_graph = optimized.forward.has_graph
    call = _moved(dict(input_ids=_ids(2, 11, seed=16)))
    assert not has_graph(call)
    with torch.inference_mode():
        optimized(**call)
        assert has_graph(call) and has_graph(_moved(dict(input_ids=_ids(2, 9, seed=17))))
        assert not has_graph(_moved(dict(input_ids=_ids(3, 11, seed=18))))
        assert not has_graph(_moved(dict(input_ids=_ids(2, 16, seed=19))))  # no mask made at a bucket length
        assert not has_graph(_moved(dict(input_ids=_ids(2, 20, seed=20))))
        assert not has_graph({"input_ids": call["input_ids"].int()})
        assert has_graph({**call, "attention_mask": torch.ones_like(call["input_ids"])})  # as padding made it


def test_full_rows_outputs_outlive_the_next_call_of_their_bucket(kit):
    """The views full rows hand out belong to the caller: a later call of the same bucket (the same CUDA
    graph replayed) leaves an earlier call's outputs as they were."""
    model = _bert(kit)
    reference, peer = copy.deepcopy(model).double(), copy.deepcopy(model).to(DEVICE, DTYPE)
    optimized, _ = _optimized(model)
    seeds = {(1, 16): (30, 31), (3, 20): (32, 33)}  # bucket 16 twice, bucket 64 (60 tokens) twice
    calls = [dict(input_ids=_ids(*shape, seed=s)) for shape, pair in seeds.items() for s in pair]
    with torch.inference_mode():
        optimized(**_moved(calls[0]))  # compiles and captures bucket 16
        actual = [optimized(**_moved(call)) for call in calls]
    for call, got in zip(calls, actual, strict=True):
        _check(reference, peer, got, call)
