"""Packed (varlen) attention vs. the per-sequence fp64 reference, eager attention in q's dtype as yardstick."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernl.flash_attention import (
    attention,
    attention_varlen,
    attention_varlen_reference,
    expand_relative_bias,
)
from kernl.flash_attention.launch import LaunchConfig
from kernl.flash_attention.launch_varlen import attention_varlen_forward, varlen_grid, varlen_launch_config
from kernl_testing import (
    TEST_DEVICE,
    ValueSpec,
    assert_matches_reference,
    make_tensor,
    needs_two_gpus,
    on_gpu,
)
from kernl_testing.strategies import dtypes, value_specs

MAX_LEN = 300 if on_gpu() else 40  # per sequence; the CPU tiles are 16 x 16
HEAD_DIMS = [16, 32, 64, 80, 96, 128, 24, 8] if on_gpu() else [16, 32, 24]
PACKED_LAYOUTS = ["contiguous", "from_4d", "padded_rows", "strided_head_dim"]
more_on_cpu = settings(max_examples=40) if not on_gpu() else settings()


def make_packed(n_tokens, heads, head_dim, dtype, spec, layout="contiguous"):
    """A ``(T, heads, D)`` tensor; "from_4d" is ``x[0].transpose(0, 1)`` of a ``(1, heads, T, D)`` tensor, as
    the packed-encoder integration passes it; "strided_head_dim" has a last-dimension stride above 1."""
    if layout == "from_4d":
        return make_tensor((1, heads, n_tokens, head_dim), dtype, spec)[0].transpose(0, 1)
    if layout == "strided_head_dim":
        return make_tensor((n_tokens, head_dim, heads), dtype, spec).transpose(1, 2)
    return make_tensor((n_tokens, heads, head_dim), dtype, spec, layout)


def offsets(lengths) -> torch.Tensor:
    """cu_seqlens of ``lengths``: int32 ``(S + 1,)`` on the test device."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=TEST_DEVICE)  # fmt: skip


def eager_varlen(q, k, v, cu_seqlens, scale, causal, relative_bias=None):
    """What plain PyTorch gives in q's dtype, one sequence at a time (scores and probabilities rounded)."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        q_s = q[start:end].transpose(0, 1)
        k_s, v_s = (t[start:end].transpose(0, 1).repeat_interleave(group, dim=0) for t in (k, v))
        scores = (q_s @ k_s.transpose(-1, -2)) * scale
        if relative_bias is not None:
            scores = scores + expand_relative_bias(relative_bias, end - start).to(q.dtype)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out[start:end] = (probs @ v_s).transpose(0, 1)
    return out


def check(out, q, k, v, cu_seqlens, scale, causal, relative_bias=None):
    """Shared tolerance rule against the fp64 reference; padding rows (from ``cu[S]``) exactly zero."""
    as64 = lambda t: None if t is None else t.double()
    reference = attention_varlen_reference(
        as64(q), as64(k), as64(v), cu_seqlens, scale=scale, causal=causal, relative_bias=as64(relative_bias)
    )
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    peer = eager_varlen(q, k, v, cu_seqlens, scale, causal, relative_bias)
    assert_matches_reference(out, reference, peer)
    packed_end = int(cu_seqlens[-1])
    assert torch.equal(out[packed_end:], torch.zeros_like(out[packed_end:])), "padding rows must be 0"


@st.composite
def packings(draw, max_len=MAX_LEN):
    """Sequence lengths (zeros = empty sequences, repeated offsets) and a padding tail."""
    lengths = draw(
        st.lists(st.one_of(st.integers(0, max_len), st.integers(0, 3), st.just(0)), min_size=0, max_size=7)
    )
    padding = draw(st.one_of(st.just(0), st.integers(0, 20)))
    if sum(lengths) + padding == 0:
        padding = 1
    return lengths, padding


@st.composite
def head_counts(draw):
    """``(H, H_kv)`` with ``H % H_kv == 0``: H_kv == H (encoders) or grouped-query attention."""
    heads_kv = draw(st.integers(1, 3))
    return heads_kv * draw(st.sampled_from([1, 1, 2, 3])), heads_kv


@more_on_cpu
@given(packing=packings(), heads=head_counts(), d=st.sampled_from(HEAD_DIMS), dtype=dtypes(),
       layouts=st.tuples(*[st.sampled_from(PACKED_LAYOUTS)] * 3),
       specs=st.tuples(value_specs(), value_specs(), value_specs()), causal=st.booleans(),
       scale=st.sampled_from([None, 1.0, 0.3]))  # fmt: skip
def test_varlen_matches_reference(packing, heads, d, dtype, layouts, specs, causal, scale):
    lengths, padding = packing
    n_tokens = sum(lengths) + padding
    h, h_kv = heads
    q = make_packed(n_tokens, h, d, dtype, specs[0], layouts[0])
    k, v = (
        make_packed(n_tokens, h_kv, d, dtype, s, lay) for s, lay in zip(specs[1:], layouts[1:], strict=True)
    )
    cu_seqlens = offsets(lengths)
    out = attention_varlen(q, k, v, cu_seqlens, scale=scale, causal=causal)
    check(out, q, k, v, cu_seqlens, 1.0 / math.sqrt(d) if scale is None else scale, causal)


PACKINGS = {
    "single sequence": ([45], 0),
    "single sequence and padding": ([29], 6),
    "length one among others": ([1, 20, 1, 1, 7], 2),
    "empty sequences first, inside and last": ([0, 0, 5, 0, 9, 0, 0], 3),
    "many short sequences in one tile": ([1, 2, 3, 1, 2, 1, 4, 2], 0),
    "lengths around the tile edges": ([15, 16, 17, 33, 31], 5),
    "no sequence at all": ([], 11),
    "only empty sequences": ([0, 0, 0], 7),
    "more sequences than one scan step": ([i % 3 for i in range(40)], 4),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("packing", PACKINGS.values(), ids=PACKINGS.keys())
def test_packings(packing, dtype, causal):
    lengths, padding = packing
    n_tokens = sum(lengths) + padding
    q, k, v = (make_packed(n_tokens, 2, 16, dtype, ValueSpec(i, 1.0, 0.0)) for i in range(3))
    cu_seqlens = offsets(lengths)
    check(attention_varlen(q, k, v, cu_seqlens, causal=causal), q, k, v, cu_seqlens, 0.25, causal)


def test_tokens_outside_a_sequence_never_reach_it():
    """Neighbouring sequences on a very different scale and a padding tail full of NaN: every sequence's
    rows equal attention over that sequence alone, and the padding rows are 0 (not NaN)."""
    lengths, padding = [13, 22, 9], 10
    n_tokens = sum(lengths) + padding
    specs = [ValueSpec(3, 1.0, 0.0), ValueSpec(4, 1.0, 0.0), ValueSpec(5, 1.0, 0.0)]
    q, k, v = (make_packed(n_tokens, 2, 32, torch.float32, s) for s in specs)
    k[13:35] *= 8.0  # the middle sequence's keys would dominate its neighbours' softmax
    v[13:35] += 100.0
    for t in (q, k, v):
        t[sum(lengths) :] = float("nan")
    cu_seqlens = offsets(lengths)
    out = attention_varlen(q, k, v, cu_seqlens)
    check(out, q, k, v, cu_seqlens, 1 / math.sqrt(32), False)
    for start, end in ((0, 13), (13, 35), (35, 44)):
        alone = attention(*(t[start:end].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], alone)


def relative_table(heads, radius, dtype, spec, transposed=False):
    """A ``(heads, 2 * radius + 1)`` relative-position table; ``transposed``: a view of a ``(2R + 1, H)``
    tensor (as an embedding weight's transpose is)."""
    if transposed:
        return make_tensor((2 * radius + 1, heads), dtype, spec).t()
    return make_tensor((heads, 2 * radius + 1), dtype, spec)


@more_on_cpu
@given(packing=packings(), heads=head_counts(), d=st.sampled_from(HEAD_DIMS), dtype=dtypes(),
       specs=st.tuples(value_specs(), value_specs(), value_specs(), value_specs()), causal=st.booleans(),
       radius=st.sampled_from([0, 1, 3, 8, 50]), table_in_q_dtype=st.booleans(), transposed=st.booleans(),
       scale=st.sampled_from([None, 1.0, 0.3]))  # fmt: skip
def test_relative_bias_matches_reference(
    packing, heads, d, dtype, specs, causal, radius, table_in_q_dtype, transposed, scale
):
    """Distances inside and past the table's radius, any sequence split, fp32 or q's dtype table."""
    lengths, padding = packing
    n_tokens = sum(lengths) + padding
    h, h_kv = heads
    q = make_packed(n_tokens, h, d, dtype, specs[0], "from_4d")
    k, v = (make_packed(n_tokens, h_kv, d, dtype, spec) for spec in specs[1:3])
    table_dtype = dtype if table_in_q_dtype else torch.float32
    table = relative_table(h, radius, table_dtype, specs[3], transposed)
    cu_seqlens = offsets(lengths)
    out = attention_varlen(q, k, v, cu_seqlens, scale=scale, causal=causal, relative_bias=table)
    check(out, q, k, v, cu_seqlens, 1.0 / math.sqrt(d) if scale is None else scale, causal, table)


@pytest.mark.parametrize(
    "config", [LaunchConfig(16, 16, 4, 1), LaunchConfig(32, 16, 4, 1, tma=True)], ids=["pointers", "tma"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_relative_bias_around_tile_edges_with_a_nan_tail(config, dtype):
    """Rows of length 1, odd lengths across tile edges, distances past the radius, a NaN padding tail."""
    if config.tma and dtype == torch.float32:
        pytest.skip("fp32 never loads through descriptors")
    lengths, padding = [1, 17, 33, 1, 5], 7
    n_tokens = sum(lengths) + padding
    q, k, v = (make_packed(n_tokens, 2, 16, dtype, ValueSpec(i, 1.0, 0.0), "from_4d") for i in range(3))
    for t in (q, k, v):
        t[sum(lengths) :] = float("nan")
    table = relative_table(2, 6, torch.float32, ValueSpec(7, 2.0, 0.0), transposed=True)
    cu_seqlens = offsets(lengths)
    out = attention_varlen_forward(q, k, v, cu_seqlens, 0.25, False, config, relative_bias=table)
    check(out, q, k, v, cu_seqlens, 0.25, False, table)


def test_a_table_hiding_every_later_key_is_causal_attention():
    """``-inf`` for every distance above 0 (clamped from far away too) is the causal mask, and a row
    whose every key is hidden gives zeros: the bias is indexed by key minus query, within the sequence."""
    lengths, padding = [9, 1, 26], 3
    n_tokens = sum(lengths) + padding
    q, k, v = (make_packed(n_tokens, 3, 16, torch.float32, ValueSpec(i, 1.0, 0.0)) for i in range(3))
    cu_seqlens = offsets(lengths)
    radius = 4
    table = torch.zeros(3, 2 * radius + 1, device=TEST_DEVICE)
    table[:, radius + 1 :] = float("-inf")
    expected = attention_varlen(q, k, v, cu_seqlens, causal=True)
    torch.testing.assert_close(attention_varlen(q, k, v, cu_seqlens, relative_bias=table), expected)
    table[:, radius] = float("-inf")  # no key at distance 0 either: the first token of a row sees none
    out = attention_varlen(q, k, v, cu_seqlens, relative_bias=table)
    assert not out[[0, 9, 10]].any() and not out.isnan().any()
    check(out, q, k, v, cu_seqlens, 0.25, False, table)


@pytest.mark.parametrize(
    "config",
    [LaunchConfig(16, 32, 4, 1), LaunchConfig(32, 16, 4, 1), LaunchConfig(64, 64, 4, 1),
     LaunchConfig(16, 32, 4, 1, tma=True), LaunchConfig(32, 16, 4, 1, tma=True)],
)  # fmt: skip
@pytest.mark.parametrize("causal", [False, True])
def test_tile_sizes(config, causal):
    """Other tiles than the heuristic's: query tiles wider than some sequences, key blocks narrower."""
    lengths, padding = [70, 1, 33, 0, 64, 5], 9
    n_tokens = sum(lengths) + padding
    q, k, v = (make_packed(n_tokens, 2, 16, torch.float16, ValueSpec(i, 1.0, 0.0)) for i in range(3))
    cu_seqlens = offsets(lengths)
    out = attention_varlen_forward(q, k, v, cu_seqlens, 0.25, causal, config)
    check(out, q, k, v, cu_seqlens, 0.25, causal)


def test_equal_lengths_match_dense_attention():
    """Equal lengths, no padding: the packed call is the dense batched call on a reshaped tensor."""
    batch, seq, heads, d = 3, 37, 2, 32
    q, k, v = (make_tensor((batch, seq, heads, d), torch.float16, ValueSpec(i, 1.0, 0.0)) for i in range(3))
    cu_seqlens = offsets([seq] * batch)
    packed = attention_varlen(*(t.reshape(batch * seq, heads, d) for t in (q, k, v)), cu_seqlens, causal=True)
    dense = attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True).transpose(1, 2)
    torch.testing.assert_close(packed.reshape(batch, seq, heads, d), dense, atol=1e-3, rtol=1e-3)


def test_one_launch_serves_any_split_of_the_tokens():
    """The grid comes from shapes only, and the same tensors give the right answer for other offsets."""
    n_tokens = 50
    assert varlen_grid(n_tokens, 4, 3, 16) == (math.ceil(n_tokens / 16) + 4, 3)
    assert varlen_grid(n_tokens, 64, 3, 16) == (n_tokens, 3)  # never more tiles than tokens
    q, k, v = (make_packed(n_tokens, 3, 16, torch.float32, ValueSpec(i, 1.0, 0.0)) for i in range(3))
    for lengths in ([50, 0, 0, 0], [1, 1, 1, 47], [20, 10, 5, 2], [0, 0, 0, 0], [17, 16, 16, 1]):
        cu_seqlens = offsets(lengths)
        check(attention_varlen(q, k, v, cu_seqlens), q, k, v, cu_seqlens, 0.25, False)


def padded_offsets(lengths, rows) -> torch.Tensor:
    """cu_seqlens of ``lengths`` padded with empty rows to ``rows + 1`` offsets, as a packed call's fixed
    row capacity has them."""
    cu = offsets(lengths)
    return torch.cat([cu, cu[-1:].expand(rows + 1 - cu.shape[0])])


ROW_CAPACITY_LAYOUTS = {
    "odd row count and a bucket tail": ([7, 13, 2, 21, 5], 17, 9),
    "a row of length 1 first and last": ([1, 30, 4, 1], 11, 8),
    "empty rows between": ([6, 0, 0, 19, 0, 3], 4, 16),
    "one row, mostly tail": ([3], 44, 5),
    "every token its own row": ([1] * 20, 0, 31),
    "more rows than tokens allow, tail too": ([1] * 9, 3, 40),
    "full capacity, no spare row": ([4, 9, 16, 2], 0, 4),
}


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ROW_CAPACITY_LAYOUTS.values(), ids=ROW_CAPACITY_LAYOUTS.keys())
def test_offsets_padded_to_a_row_capacity(layout, causal, tma):
    """The packed encoders' layout: ``T`` tokens (a token bucket), the real rows' offsets padded with empty
    rows to a fixed row capacity, a tail of padding tokens holding NaN; grids bounded by tokens and by
    rows; pointer and descriptor loads (which read the tail)."""
    lengths, tail, rows = layout
    n_tokens = sum(lengths) + tail
    q, k, v = (
        make_packed(n_tokens, 3, 16, torch.float16, ValueSpec(i, 1.0, 0.0), "from_4d") for i in range(3)
    )
    for t in (q, k, v):
        t[sum(lengths) :] = float("nan")  # the tail is never used
    cu_seqlens = padded_offsets(lengths, rows)
    config = varlen_launch_config(16, q.dtype, q.device)._replace(tma=tma)
    check(
        attention_varlen_forward(q, k, v, cu_seqlens, 0.25, causal, config), q, k, v, cu_seqlens, 0.25, causal
    )


def _spread_tokens(t, step, offset):
    """``t`` ``(T, H, D)`` as a view whose tokens lie ``step`` elements apart, from element ``offset`` of a
    (lazily allocated) buffer whose first elements hold 99 instead (where an offset wrapped past 2**31
    lands). Skips the test where the buffer cannot be allocated."""
    n_tokens, heads, head_dim = t.shape
    try:
        buffer = torch.empty(
            offset + (n_tokens - 1) * step + heads * head_dim, dtype=t.dtype, device=t.device
        )
    except (RuntimeError, MemoryError):  # torch.OutOfMemoryError is a RuntimeError
        pytest.skip("cannot allocate the (mostly untouched) buffer")
    buffer[: heads * head_dim] = 99
    view = buffer.as_strided(t.shape, (step, head_dim, 1), storage_offset=offset)
    view.copy_(t)
    return view


def test_element_offsets_past_int32(monkeypatch):
    """Token offsets (token x token stride) past 2**31 elements are computed in int64: query rows 2**30
    apart, keys and values 2**24 apart (a block of keys times the stride still fits in int32), all from
    element 2**31. Large strides and few tokens keep the test quick."""
    # The buffers are mostly never touched (on CPU, never resident): no NaN poisoning of torch.empty.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    q, k, v = (make_packed(7, 2, 16, torch.float16, ValueSpec(i, 1.0, 0.0)) for i in range(3))
    cu_seqlens = offsets([3, 4])
    expected = attention_varlen(q, k, v, cu_seqlens, causal=True)
    q_far = _spread_tokens(q, 2**30, 2**31)
    assert_close = torch.testing.assert_close
    assert_close(attention_varlen(q_far, k, v, cu_seqlens, causal=True), expected, atol=0, rtol=0)
    del q_far
    kv = _spread_tokens(torch.cat([k, v], dim=-1), 2**24, 2**31)
    k_far, v_far = kv[..., :16], kv[..., 16:]
    assert_close(attention_varlen(q, k_far, v_far, cu_seqlens, causal=True), expected, atol=0, rtol=0)


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs")
def test_cuda_graph_replay_with_new_offsets():
    """Captured once, replayed after the offsets are overwritten in place: no host read of cu_seqlens."""
    n_tokens = 300
    q, k, v = (make_packed(n_tokens, 4, 64, torch.float16, ValueSpec(i, 1.0, 0.0)) for i in range(3))
    cu_seqlens = offsets([100, 100, 90, 0])
    attention_varlen(q, k, v, cu_seqlens)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_varlen(q, k, v, cu_seqlens, causal=False)
    for lengths in ([100, 100, 90, 0], [1, 7, 250, 40], [300, 0, 0, 0], [3, 0, 5, 11]):
        cu_seqlens.copy_(offsets(lengths))
        graph.replay()
        check(out, q, k, v, cu_seqlens, 0.125, False)


@needs_two_gpus
def test_tensors_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device: attention_varlen must make q's GPU current."""
    q, k, v = (make_packed(90, 4, 64, torch.float16, ValueSpec(i, 1.0, 0.0)).to("cuda:1") for i in range(3))
    cu_seqlens = offsets([40, 0, 45]).to("cuda:1")
    with torch.cuda.device(0):
        out = attention_varlen(q, k, v, cu_seqlens)
    torch.cuda.synchronize(1)
    check(out, q, k, v, cu_seqlens, 0.125, False)


def test_no_tokens():
    q = make_packed(0, 2, 16, torch.float16, ValueSpec(1, 1.0, 0.0))
    assert attention_varlen(q, q, q, offsets([])).shape == (0, 2, 16)


def test_opcheck():
    lengths = [5, 0, 12, 1]
    q = make_packed(22, 4, 16, torch.float32, ValueSpec(1, 1.0, 0.0))
    k, v = (make_packed(22, 2, 16, torch.float32, ValueSpec(i, 1.0, 0.0), "from_4d") for i in (2, 3))
    for table in (None, make_tensor((4, 7), torch.float32, ValueSpec(4, 1.0, 0.0))):
        torch.library.opcheck(
            torch.ops.kernl.attention_varlen.default,
            (q, k, v, offsets(lengths), 0.25, True, table),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_runs_inside_torch_compile(backend):
    """Inside a traced graph, as the packed-encoder integration calls it: (1, H, T, D) projections."""
    torch._dynamo.reset()
    heads, n_tokens, d = 2, 30, 16
    layer = lambda q4, k4, v4, cu: attention_varlen(q4[0].transpose(0, 1), k4[0].transpose(0, 1),
                                                    v4[0].transpose(0, 1), cu, scale=0.3).reshape(n_tokens, -1) * 2  # fmt: skip
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    q4, k4, v4 = (
        make_tensor((1, heads, n_tokens, d), torch.float32, ValueSpec(i, 1.0, 0.0)) for i in range(3)
    )
    cu_seqlens = offsets([9, 14, 3])
    got = compiled(q4, k4, v4, cu_seqlens)
    packed = [t[0].transpose(0, 1) for t in (q4, k4, v4)]
    expected = attention_varlen_reference(*(t.double() for t in packed), cu_seqlens, scale=0.3)
    assert_matches_reference(got, expected.reshape(n_tokens, -1) * 2, None)
