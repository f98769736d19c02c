"""attention_decode_write (a decoding step's cache write fused into its attention) vs. the fp64 reference:
the caches hold exactly the reference's rows afterwards, the output meets the tolerance rule, with eager
attention in the same dtype as the yardstick."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernl.flash_attention import attention_decode_write, attention_decode_write_reference
from kernl.flash_attention.reference import write_rows
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor, on_gpu
from kernl_testing.strategies import dtypes, value_specs

MAX_LEN = 600 if on_gpu() else 70
HEAD_DIMS = [16, 64, 80, 128, 24] if on_gpu() else [16, 24, 32]
CACHE_LAYOUTS = ["contiguous", "transposed", "hf_heads"]
# each example on the GPU may compile a new kernel specialisation: fewer there, to stay within minutes
examples = settings(max_examples=40)


def make_cache(b, heads, length, d, dtype, seed, layout):
    """A ``(B, H_kv, L, D)`` cache; "hf_heads" is a ``(B, L, H_kv, D)`` buffer viewed as the cache."""
    spec = ValueSpec(seed, 1.0, 0.0)
    if layout == "hf_heads":
        return make_tensor((b, length, heads, d), dtype, spec).transpose(1, 2)
    return make_tensor((b, heads, length, d), dtype, spec, layout)


def new_rows(b, kv_heads, d, dtype, seed):
    """k_new and v_new ``(B, H_kv, 1, D)`` as a fused projection gives them: strided views of one buffer."""
    both = make_tensor((b, 1, 2, kv_heads, d), dtype, ValueSpec(seed, 1.5, 0.0))
    return both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)


def eager_peer(q, k, v, scale, bias, mask, visible):
    """Plain PyTorch in q's dtype over caches already written: scores and probabilities rounded."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    for add in (bias, mask):
        if add is not None and add.dtype != torch.bool:
            scores = scores + add.to(q.dtype)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    probs = torch.softmax(scores.float().masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.to(q.dtype) @ v


def visible_keys(b, n_k, key_padding_mask, cache_len, device):
    """Boolean ``(B, 1, 1, K)``: keys the padding mask and the cache length leave visible."""
    positions = torch.arange(n_k, device=device)
    keep = torch.ones((b, 1, 1, n_k), dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        keep &= key_padding_mask[:, None, None, :]
    if cache_len is not None:
        keep &= positions < cache_len.reshape(-1, 1, 1, 1)
    return keep


def positions_for(kind, b, n_k, data):
    """The step's position(s) as the loop gives them: one for the batch (``()`` or ``(1,)``, as
    ``index_copy_`` takes it) or one per batch element, int32 or int64; sometimes outside the cache."""
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    values = data.draw(st.lists(st.integers(-1, n_k), min_size=b, max_size=b))
    values = [min(max(p, 0), n_k - 1) if data.draw(st.integers(0, 5)) else p for p in values]
    shaped = {"scalar": values[0], "one": values[:1], "per_batch": values}[kind]
    return torch.tensor(shaped, dtype=dtype, device=TEST_DEVICE)


@examples
@given(b=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       n_q=st.sampled_from([1, 1, 3]), n_k=st.integers(1, MAX_LEN), d=st.sampled_from(HEAD_DIMS),
       dtype=dtypes(), spec=value_specs(), layouts=st.tuples(*[st.sampled_from(CACHE_LAYOUTS)] * 2),
       position_kind=st.sampled_from(["scalar", "one", "per_batch"]), up_to_position=st.booleans(),
       with_bias=st.booleans(), mask_kind=st.sampled_from(["none", "bool", "float"]),
       with_kpm=st.booleans(), data=st.data())  # fmt: skip
def test_writes_the_row_and_attends_as_the_reference(
    b, kv_heads, group, n_q, n_k, d, dtype, spec, layouts, position_kind, up_to_position, with_bias,
    mask_kind, with_kpm, data,
):  # fmt: skip
    heads = kv_heads * group
    q = make_tensor((b, heads, n_q, d), dtype, spec, "transposed")
    k_cache = make_cache(b, kv_heads, n_k, d, dtype, spec.seed + 1, layouts[0])
    v_cache = make_cache(b, kv_heads, n_k, d, dtype, spec.seed + 2, layouts[1])
    k_new, v_new = new_rows(b, kv_heads, d, dtype, spec.seed + 3)
    position = positions_for(position_kind, b, n_k, data)
    cache_len = (position + 1).clamp(min=0).reshape(-1 if position_kind == "per_batch" else ())
    cache_len = cache_len if up_to_position else None
    if cache_len is not None:  # keys past the new one were never written: NaN must not reach the output
        unread = torch.arange(n_k, device=TEST_DEVICE) >= cache_len.reshape(-1, 1, 1)  # (B|1, 1, K)
        k_cache.masked_fill_(unread[..., None], float("nan"))
        v_cache.masked_fill_(unread[..., None], float("nan"))
    g = torch.Generator().manual_seed(spec.seed + 4)
    bias = make_tensor((1, heads, n_q, n_k), dtype, ValueSpec(spec.seed + 5, 1.0, 0.0)) if with_bias else None
    mask = {
        "none": None,
        "bool": (torch.rand((b, 1, 1, n_k), generator=g) > 0.2).to(TEST_DEVICE),
        "float": torch.where(torch.rand((b, 1, 1, n_k), generator=g) > 0.2, 0.0, -1e4).to(TEST_DEVICE, dtype),
    }[mask_kind]
    kpm = (torch.rand((b, n_k), generator=g) > 0.1).to(TEST_DEVICE) if with_kpm else None

    expected_k, expected_v = k_cache.double(), v_cache.double()
    as64 = lambda t: t.double() if t is not None and t.is_floating_point() else t
    reference = attention_decode_write_reference(
        q.double(), expected_k, expected_v, k_new.double(), v_new.double(), position, scale=0.3,
        bias=as64(bias), mask=as64(mask), key_padding_mask=kpm, cache_len=cache_len,
    )  # fmt: skip
    written_k, written_v = k_cache.clone(), v_cache.clone()
    write_rows(written_k, written_v, k_new, v_new, position)
    visible = visible_keys(b, n_k, kpm, cache_len, q.device)
    peer = eager_peer(q, written_k.nan_to_num(), written_v.nan_to_num(), 0.3, bias, mask, visible)

    out = attention_decode_write(
        q, k_cache, v_cache, k_new, v_new, position, cache_len=cache_len, scale=0.3, bias=bias, mask=mask,
        key_padding_mask=kpm,
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == dtype
    assert_matches_reference(out, reference, peer)
    torch.testing.assert_close(k_cache, written_k, rtol=0, atol=0, equal_nan=True)  # a copy: exact
    torch.testing.assert_close(v_cache, written_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "b, heads, kv_heads, n_q, n_k", [(2, 8, 2, 1, 5), (1, 2, 1, 1, 4 * MAX_LEN + 3), (2, 2, 1, 70, 9)]
)
def test_every_program_sees_the_new_row_not_the_stale_cache(b, heads, kv_heads, n_q, n_k):
    """The stale row at the position is NaN: a program reading it from the cache (before the store)
    instead of taking the new row would return NaN. Two batch elements, each at its own position, and
    4 query heads reading each key/value head; or one batch element whose long cache is split across
    programs (few programs: the launch splits the keys), the position in a split other than the storing
    program's; or 70 queries, several query blocks reading each key/value head."""
    q = make_tensor((b, heads, n_q, 16), torch.float32, ValueSpec(1, 1.0, 0.0))
    k_cache = make_tensor((b, kv_heads, n_k, 16), torch.float32, ValueSpec(2, 1.0, 0.0))
    v_cache = make_tensor((b, kv_heads, n_k, 16), torch.float32, ValueSpec(3, 1.0, 0.0))
    position = torch.tensor([n_k - 2, n_k // 2][:b] if b == 2 else [n_k // 2 + 5], device=TEST_DEVICE)
    for row, at in enumerate(position.tolist()):
        k_cache[row, :, at] = float("nan")
        v_cache[row, :, at] = float("nan")
    k_new = make_tensor((b, kv_heads, 1, 16), torch.float32, ValueSpec(4, 1.0, 0.0))
    v_new = make_tensor((b, kv_heads, 1, 16), torch.float32, ValueSpec(5, 1.0, 0.0))
    expected_k, expected_v = k_cache.double(), v_cache.double()
    reference = attention_decode_write_reference(
        q.double(), expected_k, expected_v, k_new.double(), v_new.double(), position
    )
    out = attention_decode_write(q, k_cache, v_cache, k_new, v_new, position)
    assert not torch.isnan(out).any()
    assert_matches_reference(out, reference, None)
    torch.testing.assert_close(k_cache.double(), expected_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache.double(), expected_v, rtol=0, atol=0)


def test_no_query_still_writes_the_row():
    q = torch.randn(2, 2, 0, 16, device=TEST_DEVICE)
    k_cache, v_cache = (
        torch.zeros(2, 1, 6, 16, device=TEST_DEVICE),
        torch.zeros(2, 1, 6, 16, device=TEST_DEVICE),
    )
    k_new, v_new = (
        torch.ones(2, 1, 1, 16, device=TEST_DEVICE),
        torch.full((2, 1, 1, 16), 2.0, device=TEST_DEVICE),
    )
    out = attention_decode_write(q, k_cache, v_cache, k_new, v_new, torch.tensor(3, device=TEST_DEVICE))
    assert out.shape == (2, 2, 0, 16)
    assert (k_cache[:, :, 3] == 1).all() and (v_cache[:, :, 3] == 2).all()
    assert k_cache.sum() == 2 * 16 and v_cache.sum() == 2 * 2 * 16


def test_matches_index_copy_then_attention_decode():
    """What the step graph computed before the fusion: ``index_copy_`` of k and v at the position, then
    attention_decode over the updated caches."""
    from kernl.flash_attention import attention_decode

    q = make_tensor((3, 4, 1, 32), torch.float32, ValueSpec(1, 1.0, 0.0))
    caches = [make_tensor((3, 2, 13, 32), torch.float32, ValueSpec(s, 1.0, 0.0)) for s in (2, 3)]
    k_new, v_new = (make_tensor((3, 2, 1, 32), torch.float32, ValueSpec(s, 1.0, 0.0)) for s in (4, 5))
    position = torch.tensor([7], device=TEST_DEVICE)
    bias = make_tensor((1, 4, 1, 13), torch.float32, ValueSpec(6, 1.0, 0.0))
    before = [c.clone() for c in caches]
    before[0].index_copy_(2, position, k_new)
    before[1].index_copy_(2, position, v_new)
    expected = attention_decode(q, *before, bias=bias, scale=1.0)
    out = attention_decode_write(q, *caches, k_new, v_new, position, bias=bias, scale=1.0)
    torch.testing.assert_close(out, expected)
    assert all(torch.equal(c, e) for c, e in zip(caches, before, strict=True))


def test_op_declares_its_cache_mutation():
    schema = torch.ops.kernl.attention_decode_write.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"k_cache", "v_cache"}


def test_opcheck():
    q = make_tensor((2, 4, 1, 16), torch.float32, ValueSpec(1, 1.0, 0.0))
    k_cache, v_cache = (make_tensor((2, 2, 9, 16), torch.float32, ValueSpec(s, 1.0, 0.0)) for s in (2, 3))
    k_new, v_new = (make_tensor((2, 2, 1, 16), torch.float32, ValueSpec(s, 1.0, 0.0)) for s in (4, 5))
    position = torch.tensor([4, 8], device=TEST_DEVICE)
    args = (q, k_cache, v_cache, k_new, v_new, position, 0.25, None, None, None, position + 1)
    torch.library.opcheck(
        torch.ops.kernl.attention_decode_write.default, args, test_utils=("test_schema", "test_faketensor")
    )


def test_runs_inside_torch_compile():
    torch._dynamo.reset()
    q = make_tensor((1, 2, 1, 16), torch.float32, ValueSpec(1, 1.0, 0.0))
    k_cache, v_cache = (make_tensor((1, 2, 6, 16), torch.float32, ValueSpec(s, 1.0, 0.0)) for s in (2, 3))
    k_new, v_new = (make_tensor((1, 2, 1, 16), torch.float32, ValueSpec(s, 1.0, 0.0)) for s in (4, 5))
    position = torch.tensor([2], device=TEST_DEVICE)
    expected_k, expected_v = k_cache.double(), v_cache.double()
    reference = attention_decode_write_reference(
        q.double(), expected_k, expected_v, k_new.double(), v_new.double(), position
    )
    step = torch.compile(lambda *args: attention_decode_write(*args) * 2, backend="aot_eager", fullgraph=True)
    out = step(q, k_cache, v_cache, k_new, v_new, position)
    assert_matches_reference(out, reference * 2, None)
    torch.testing.assert_close(k_cache.double(), expected_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache.double(), expected_v, rtol=0, atol=0)


_q = torch.randn(2, 4, 1, 16, device=TEST_DEVICE)
_cache = torch.randn(2, 2, 7, 16, device=TEST_DEVICE)
_row = torch.randn(2, 2, 1, 16, device=TEST_DEVICE)
_at = torch.tensor([3], device=TEST_DEVICE)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(k_new=[1.0]), TypeError, "k_new must be a torch.Tensor"),
        (dict(v_new=_row.long()), TypeError, "v_new must be float16"),
        (dict(k_new=_row.half()), ValueError, r"k_new must have the dtype of k_cache"),
        (dict(k_new=_row[:, :1]), ValueError, r"k_new must have shape \(2, 2, 1, 16\)"),
        (dict(v_new=torch.randn(2, 2, 2, 16, device=TEST_DEVICE)), ValueError, r"v_new must have shape"),
        (dict(position=3), TypeError, "position must be a torch.Tensor"),
        (dict(position=_at.float()), TypeError, "position must be int32 or int64"),
        (dict(position=torch.tensor([1, 2, 3], device=TEST_DEVICE)), ValueError, r"position must be a \(\)"),
        (
            dict(position=torch.zeros(2, 1, dtype=torch.long, device=TEST_DEVICE)),
            ValueError,
            "position must be",
        ),
        (dict(cache_len=4), TypeError, "cache_len must be a torch.Tensor"),
        (dict(cache_len=torch.tensor([1, 2, 3], device=TEST_DEVICE)), ValueError, "cache_len must be a"),
        (dict(k_cache=_cache[:, :, :, :8]), ValueError, "k_cache must have shape"),
        (dict(v_cache=_cache[:, :1]), ValueError, "v_cache must have k_cache's shape"),
        (dict(k_cache=_cache[:1].expand(2, -1, -1, -1)), ValueError, "k_cache has elements sharing memory"),
        (dict(v_cache=_cache), ValueError, "k_cache and v_cache are the same memory"),
        (dict(q=_q.double()), TypeError, "q must be float16"),
        (dict(scale=float("inf")), ValueError, "scale must be finite"),
    ],
)
def test_bad_input_names_the_argument(arguments, error, message):
    call = dict(q=_q, k_cache=_cache, v_cache=_cache.clone(), k_new=_row, v_new=_row, position=_at)
    call.update(arguments)
    keywords = {name: call.pop(name) for name in ("scale", "cache_len") if name in call}
    before = call["v_cache"].clone()
    with pytest.raises(error, match=message):
        attention_decode_write(*call.values(), **keywords)
    assert torch.equal(call["v_cache"], before)  # nothing written before the check
