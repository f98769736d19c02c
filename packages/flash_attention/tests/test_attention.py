"""Attention kernel vs. the fp64 reference, with eager attention in the same dtype as the yardstick."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernl.flash_attention import attention, attention_decode, attention_reference
from kernl.flash_attention.launch import LaunchConfig, attention_forward, descriptor_layout_ok
from kernl_testing import (
    TEST_DEVICE,
    ValueSpec,
    assert_matches_reference,
    make_tensor,
    needs_two_gpus,
    on_gpu,
)
from kernl_testing.strategies import dtypes, value_specs

MAX_LEN = 600 if on_gpu() else 70
HEAD_DIMS = [16, 32, 64, 80, 96, 128, 24, 8] if on_gpu() else [16, 32, 64, 24]
QKV_LAYOUTS = ["contiguous", "padded_rows", "transposed", "hf_heads"]
# The CPU examples are small and quick: three times the cpu profile's count for the main properties.
more_on_cpu = settings(max_examples=60) if not on_gpu() else settings()


def make_qkv(b, h, n_q, n_k, d, dtype, specs, layouts, kv_heads=None):
    """q, k, v (k/v with ``kv_heads`` heads, default ``h``); layout "hf_heads" is a ``(B, S, H, D)``
    projection viewed as ``(B, H, S, D)``, as HF does."""
    kv_heads = h if kv_heads is None else kv_heads
    tensors = []
    for length, heads, spec, layout in zip(
        (n_q, n_k, n_k), (h, kv_heads, kv_heads), specs, layouts, strict=True
    ):
        if layout == "hf_heads":
            tensors.append(make_tensor((b, length, heads, d), dtype, spec).transpose(1, 2))
        else:
            tensors.append(make_tensor((b, heads, length, d), dtype, spec, layout))
    return tensors


def per_query_head(t, heads):
    """k or v ``(B, H_kv, K, D)`` as ``(B, heads, K, D)``: query head ``h`` gets key/value head
    ``h // (heads / H_kv)`` (grouped-query attention spelled out by indexing)."""
    return t[:, torch.arange(heads, device=t.device) // (heads // t.shape[1])]


def visible_keys(q, k, mask, key_padding_mask, causal, cache_len):
    """Boolean ``(B, H, Q, K)``: which keys each query may see (the masking rules of the reference)."""
    positions = torch.arange(k.shape[2], device=q.device)
    keep = torch.ones((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dtype=torch.bool, device=q.device)
    if mask is not None and mask.dtype == torch.bool:
        keep &= mask
    if key_padding_mask is not None:
        kpm = key_padding_mask
        keep &= kpm[:, None, None, :] if kpm.dtype == torch.bool else positions < kpm.reshape(-1, 1, 1, 1)
    if cache_len is not None:
        keep &= positions < cache_len.reshape(-1, 1, 1, 1)
    if causal:
        keep &= positions[None, :] <= torch.arange(q.shape[2], device=q.device)[:, None]
    return keep


def eager_attention(
    q, k, v, scale, bias=None, mask=None, key_padding_mask=None, causal=False, cache_len=None
):
    """What plain PyTorch gives in q's dtype, as HF's eager attention: scores and probabilities rounded."""
    k, v = per_query_head(k, q.shape[1]), per_query_head(v, q.shape[1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(q.dtype)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask.to(q.dtype)
    keep = visible_keys(q, k, mask, key_padding_mask, causal, cache_len)
    probs = torch.softmax(scores.float().masked_fill(~keep, float("-inf")), dim=-1).to(q.dtype)
    return probs @ v


def check(out, q, k, v, scale, **masks):
    """The shared tolerance rule against the fp64 reference; eager attention in q's dtype is the yardstick."""
    as64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    reference = attention_reference(
        as64(q), as64(k), as64(v), scale=scale, **{n: as64(t) for n, t in masks.items()}
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_matches_reference(out, reference, eager_attention(q, k, v, scale, **masks))


@st.composite
def shapes(draw, max_len=MAX_LEN):
    n_q = draw(st.integers(1, max_len))
    n_k = draw(st.one_of(st.just(n_q), st.integers(1, max_len)))
    return draw(st.integers(1, 2)), draw(st.integers(1, 3)), n_q, n_k, draw(st.sampled_from(HEAD_DIMS))


qkv_layouts = st.tuples(*[st.sampled_from(QKV_LAYOUTS)] * 3)
qkv_specs = st.tuples(value_specs(), value_specs(), value_specs())


@more_on_cpu
@given(shape=shapes(), dtype=dtypes(), layouts=qkv_layouts, specs=qkv_specs, causal=st.booleans(),
       scale=st.sampled_from([None, 1.0, 0.3]))  # fmt: skip
def test_attention_matches_reference(shape, dtype, layouts, specs, causal, scale):
    b, h, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, n_q, n_k, d, dtype, specs, layouts)
    out = attention(q, k, v, scale=scale, causal=causal)
    check(out, q, k, v, 1.0 / math.sqrt(d) if scale is None else scale, causal=causal)


@st.composite
def grouped_shapes(draw, max_len=MAX_LEN):
    """(B, H, H_kv, Q, K, D) with ``H = group * H_kv``, ``group >= 2``."""
    b, _, n_q, n_k, d = draw(shapes(max_len))
    kv_heads, group = draw(st.integers(1, 3 if on_gpu() else 2)), draw(st.sampled_from([2, 3, 4]))
    return b, kv_heads * group, kv_heads, n_q, n_k, d


@given(shape=grouped_shapes(), dtype=dtypes(), layouts=qkv_layouts, specs=qkv_specs, causal=st.booleans(),
       mask_kind=st.sampled_from(["none", "bool_b1qk", "float_b1qk"]),
       kpm_kind=st.sampled_from(["none", "lengths", "prefix", "scattered"]))  # fmt: skip
def test_grouped_query_attention_matches_reference(shape, dtype, layouts, specs, causal, mask_kind, kpm_kind):
    """k/v with fewer heads than q: each query head reads its group's key/value head in place."""
    b, h, kv_heads, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, n_q, n_k, d, dtype, specs, layouts, kv_heads)
    mask = make_mask(mask_kind, b, h, n_q, n_k, dtype, specs[1].seed)
    kpm = make_key_padding(kpm_kind, b, n_k, specs[2].seed)
    out = attention(q, k, v, scale=0.3, mask=mask, key_padding_mask=kpm, causal=causal)
    check(out, q, k, v, 0.3, mask=mask, key_padding_mask=kpm, causal=causal)


@settings(max_examples=10)
@given(shape=grouped_shapes(), n_q=st.integers(1, 4), dtype=dtypes(), spec=value_specs(), data=st.data())
def test_grouped_query_decode_matches_reference(shape, n_q, dtype, spec, data):
    """attention_decode over a grouped cache: split-KV with a per-row cache length tensor."""
    b, h, kv_heads, _, n_k, d = shape
    q, k, v = make_qkv(
        b, h, n_q, 4 * n_k, d, dtype, [spec] * 3, ["contiguous", "transposed", "hf_heads"], kv_heads
    )
    lengths = data.draw(st.lists(st.integers(0, 4 * n_k), min_size=b, max_size=b))
    cache_len = torch.tensor(lengths, device=TEST_DEVICE, dtype=torch.int32)
    out = attention_decode(q, k, v, cache_len, scale=0.2)
    check(out, q, k, v, 0.2, cache_len=cache_len)


def test_grouped_reference_reads_key_value_head_h_over_group():
    """The definition, head by head: with 6 query heads over 2 key/value heads, heads 0-2 read key/value
    head 0 and heads 3-5 head 1 (not ``h % H_kv``)."""
    q, k, v = make_qkv(
        2, 6, 5, 9, 16, torch.float64, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3, 2
    )
    grouped = attention_reference(q, k, v, causal=True)
    for head in range(6):
        alone = attention_reference(q[:, [head]], k[:, [head // 3]], v[:, [head // 3]], causal=True)
        torch.testing.assert_close(grouped[:, [head]], alone)


def make_mask(kind, b, h, n_q, n_k, dtype, seed):
    """The mask forms HF and users build, random but reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind in ("bool_b1qk", "bool_qk"):
        shape = (b, 1, n_q, n_k) if kind == "bool_b1qk" else (n_q, n_k)
        return (torch.rand(shape, generator=g) > 0.25).to(TEST_DEVICE)
    # additive float [B, 1, Q, K]: mostly 0, some -inf, some finite negative values
    u = torch.rand((b, 1, n_q, n_k), generator=g)
    values = torch.where(u < 0.15, float("-inf"), torch.where(u < 0.3, -3.0 * u, 0.0))
    return values.to(TEST_DEVICE, dtype)


def make_key_padding(kind, b, n_k, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n_k + 1, (b,), generator=g)
    if kind == "none":
        return None
    if kind == "lengths":
        return lengths.to(TEST_DEVICE)
    if kind == "prefix":
        return (torch.arange(n_k)[None, :] < lengths[:, None]).to(TEST_DEVICE)
    return (torch.rand((b, n_k), generator=g) > 0.3).to(TEST_DEVICE)  # "scattered": not a prefix


@more_on_cpu
@given(shape=shapes(), dtype=dtypes(), layouts=qkv_layouts, specs=qkv_specs, causal=st.booleans(),
       bias_shape=st.sampled_from(["none", "1hqk", "b1qk", "qk", "bhqk"]),
       mask_kind=st.sampled_from(["none", "bool_b1qk", "bool_qk", "float_b1qk"]),
       kpm_kind=st.sampled_from(["none", "lengths", "prefix", "scattered"]))  # fmt: skip
def test_masks_and_bias_match_reference(
    shape, dtype, layouts, specs, causal, bias_shape, mask_kind, kpm_kind
):
    b, h, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, n_q, n_k, d, dtype, specs, layouts)
    bias_shapes = {
        "1hqk": (1, h, n_q, n_k),
        "b1qk": (b, 1, n_q, n_k),
        "qk": (n_q, n_k),
        "bhqk": (b, h, n_q, n_k),
    }
    bias = (
        make_tensor(bias_shapes[bias_shape], dtype, ValueSpec(specs[0].seed + 5, 2.0, 0.0))
        if bias_shape != "none"
        else None
    )
    mask = make_mask(mask_kind, b, h, n_q, n_k, dtype, specs[1].seed)
    kpm = make_key_padding(kpm_kind, b, n_k, specs[2].seed)
    out = attention(q, k, v, scale=0.25, bias=bias, mask=mask, key_padding_mask=kpm, causal=causal)
    check(out, q, k, v, 0.25, bias=bias, mask=mask, key_padding_mask=kpm, causal=causal)
    assert not torch.isnan(out).any()


@more_on_cpu
@given(b=st.integers(1, 3), h=st.integers(1, 3), n_q=st.integers(1, 4), n_k=st.integers(1, 4 * MAX_LEN),
       d=st.sampled_from(HEAD_DIMS), dtype=dtypes(), spec=value_specs(), data=st.data(),
       cache_len_kind=st.sampled_from(["none", "int", "scalar_tensor", "per_batch_tensor"]),
       with_bias=st.booleans(), kpm_kind=st.sampled_from(["none", "lengths", "prefix", "scattered"]))  # fmt: skip
def test_decode_matches_reference(b, h, n_q, n_k, d, dtype, spec, data, cache_len_kind, with_bias, kpm_kind):
    q, k, v = make_qkv(
        b, h, n_q, n_k, d, dtype, [spec, ValueSpec(spec.seed + 1, 1.0, 0.0), spec], ["contiguous"] * 3
    )
    lengths = data.draw(st.lists(st.integers(0, n_k), min_size=b, max_size=b))
    cache_len = {
        "none": None,
        "int": lengths[0],
        "scalar_tensor": torch.tensor(lengths[0], device=TEST_DEVICE),
        "per_batch_tensor": torch.tensor(lengths, device=TEST_DEVICE, dtype=torch.int32),
    }[cache_len_kind]
    bias = make_tensor((1, h, n_q, n_k), dtype, ValueSpec(spec.seed + 2, 1.0, 0.0)) if with_bias else None
    kpm = make_key_padding(kpm_kind, b, n_k, spec.seed + 3)
    out = attention_decode(q, k, v, cache_len, scale=0.2, bias=bias, key_padding_mask=kpm)
    cache_tensor = torch.tensor(cache_len, device=TEST_DEVICE) if isinstance(cache_len, int) else cache_len
    check(out, q, k, v, 0.2, bias=bias, key_padding_mask=kpm, cache_len=cache_tensor)


@settings(max_examples=8)
@given(shape=shapes(), splits=st.integers(2, 5), causal=st.booleans(), spec=value_specs())
def test_split_kv_with_long_queries(shape, splits, causal, spec):
    """Split-KV on query blocks of several rows, with causal edges and a tail, merges exactly."""
    b, h, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, n_q, n_k, d, torch.float32, [spec] * 3, ["contiguous"] * 3)
    lengths = torch.randint(0, n_k + 1, (b,), generator=torch.Generator().manual_seed(spec.seed)).to(
        TEST_DEVICE
    )
    config = LaunchConfig(32, 16, 4, 1, splits) if not on_gpu() else LaunchConfig(64, 32, 4, 2, splits)
    out = attention_forward(q, k, v, 0.3, None, None, lengths.to(torch.int32), None, causal, config)
    check(out, q, k, v, 0.3, key_padding_mask=lengths, causal=causal)


@pytest.mark.parametrize("splits", [1, 3])
def test_scores_that_keep_growing_along_the_keys(splits):
    """Each key block raises every row's maximum by far more than the kernel's rescaling margin."""
    n_q, n_k, d = 33, MAX_LEN, 32
    generator = torch.Generator().manual_seed(7)
    direction = torch.randn(1, 2, 1, d, generator=generator)
    ramp = torch.arange(n_k, dtype=torch.float32)[None, None, :, None] / 2
    q = (direction + 0.1 * torch.randn(1, 2, n_q, d, generator=generator)).to(TEST_DEVICE)
    k = (direction * ramp / d + 0.1 * torch.randn(1, 2, n_k, d, generator=generator)).to(TEST_DEVICE)
    v = torch.randn(1, 2, n_k, d, generator=generator).to(TEST_DEVICE)
    for dtype in (torch.float16, torch.float32):
        q_, k_, v_ = (t.to(dtype) for t in (q, k, v))
        config = LaunchConfig(16, 16, 4, 1, splits) if not on_gpu() else LaunchConfig(64, 32, 4, 2, splits)
        out = attention_forward(q_, k_, v_, 1.0, None, None, None, None, False, config)
        check(out, q_, k_, v_, 1.0)


def test_fully_masked_rows_return_zeros():
    b, h, n_q, n_k, d = 3, 2, 20, 37, 32
    q, k, v = make_qkv(
        b, h, n_q, n_k, d, torch.float16, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3
    )
    kpm = torch.ones((b, n_k), dtype=torch.bool, device=TEST_DEVICE)
    kpm[1] = False  # batch 1: no key at all
    mask = torch.ones((b, 1, n_q, n_k), dtype=torch.bool, device=TEST_DEVICE)
    mask[0, :, 3] = False  # batch 0, query 3: all keys masked
    float_mask = torch.zeros((b, 1, n_q, n_k), dtype=torch.float16, device=TEST_DEVICE)
    float_mask[2, :, 5] = float("-inf")  # batch 2, query 5: all keys at -inf
    for kwargs in (
        dict(key_padding_mask=kpm, mask=mask),
        dict(mask=float_mask),
        dict(key_padding_mask=kpm.sum(-1)),
    ):
        out = attention(q, k, v, **kwargs)
        assert not torch.isnan(out).any()
        check(out, q, k, v, 1 / math.sqrt(d), **kwargs)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out = attention(q, k, v, key_padding_mask=kpm, mask=mask)
    assert (out[1] == 0).all() and (out[0, :, 3] == 0).all()
    assert (attention(q, k, v, mask=float_mask)[2, :, 5] == 0).all()
    decoded = attention_decode(q[:, :, :1], k, v, torch.tensor([5, 0, 9], device=TEST_DEVICE))
    assert (decoded[1] == 0).all() and not torch.isnan(decoded).any()


@pytest.mark.parametrize("fill", [-1e9, -1e10, -1e20, torch.finfo(torch.float32).min])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_q, splits", [(1, 4), (24, 1)])
def test_huge_finite_additive_masks(fill, dtype, n_q, splits):
    """Masked keys written as a huge finite number in an fp32 additive mask (HF's ``finfo.min``, or
    ``-1e9`` / ``-1e10`` by hand): no NaN in any key block or KV split, same result as the reference."""
    b, h, n_k, d = 2, 2, 64, 32
    specs = [ValueSpec(i, 1.0, 0.0) for i in range(3)]
    q, k, v = make_qkv(b, h, n_q, n_k, d, dtype, specs, ["contiguous"] * 3)
    valid = torch.arange(n_k, device=TEST_DEVICE) < torch.tensor([[20], [64]], device=TEST_DEVICE)
    mask = torch.where(valid, 0.0, fill)[:, None, None, :]  # fp32 (B, 1, 1, K); keys 20.. of batch 0 masked
    block_m = 16 if n_q <= 16 or not on_gpu() else 64
    config = LaunchConfig(block_m, 16, 4, 1 if not on_gpu() else 2, splits)  # 16-key splits: some all masked
    out = attention_forward(q, k, v, 1 / math.sqrt(d), None, mask, None, None, False, config)
    assert not torch.isnan(out).any()
    check(out, q, k, v, 1 / math.sqrt(d), mask=mask)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["bias", "mask"])
def test_nan_or_inf_additions_give_nan_rows_as_the_reference(bad, where):
    """A NaN or +inf in a bias or additive mask makes that query row NaN (reference, SDPA); other rows
    stay right. (The clamp of huge finite additions must not turn NaN into a weight of 1.)"""
    b, h, n_q, n_k, d = 1, 2, 5, 40, 16
    q, k, v = make_qkv(
        b, h, n_q, n_k, d, torch.float16, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3
    )
    addition = torch.zeros((1, h, n_q, n_k), device=TEST_DEVICE)
    addition[0, 1, 2, 33] = bad
    out = attention(q, k, v, **{where: addition})
    assert torch.isnan(out[0, 1, 2]).all()
    clean = torch.ones_like(out, dtype=torch.bool)
    clean[0, 1, 2] = False
    expected = attention_reference(q.double(), k.double(), v.double(), **{where: addition.double()})
    assert torch.isnan(expected[0, 1, 2]).all()
    assert_matches_reference(
        out[clean], expected[clean], eager_attention(q, k, v, d**-0.5, **{where: addition})[clean]
    )


def test_lengths_beyond_int32_are_clamped_not_wrapped():
    q, k, v = make_qkv(
        2, 1, 3, 9, 16, torch.float32, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3
    )
    full = attention(q, k, v)
    huge = torch.tensor([2**32 + 2, 2**40], device=TEST_DEVICE)  # int64: a cast alone would wrap to 2 and 0
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=huge), full)
    torch.testing.assert_close(attention_decode(q[:, :, :1], k, v, huge), full[:, :, :1])


def test_reference_never_reads_past_the_valid_keys():
    """The reference (the CPU fallback without the interpreter) treats unread cache slots as the kernel
    does: whatever they hold (NaN from ``torch.empty``) never reaches the output; no keys gives zeros."""
    q, k, v = make_qkv(
        2, 2, 1, 12, 16, torch.float32, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3
    )
    lengths = torch.tensor([5, 0], device=TEST_DEVICE)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[0, :, 5:] = v_nan[0, :, 5:] = k_nan[1] = v_nan[1] = float("nan")
    expected = attention_reference(q, k[:, :, :5], v[:, :, :5])[0]
    for kwargs in (
        dict(key_padding_mask=lengths),
        dict(key_padding_mask=torch.arange(12, device=TEST_DEVICE) < lengths[:, None]),
        dict(cache_len=lengths),
    ):
        for out in (
            attention_reference(q, k_nan, v_nan, **kwargs),
            attention_decode(q, k_nan, v_nan, lengths)
            if "cache_len" in kwargs
            else attention(q, k_nan, v_nan, **kwargs),
        ):
            torch.testing.assert_close(out[0], expected)
            assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(attention_reference(q, k[:, :, :0], v[:, :, :0]), torch.zeros_like(q))


def test_empty_sizes():
    q = make_tensor((2, 3, 5, 16), torch.float32, ValueSpec(1, 1.0, 0.0))
    no_keys = make_tensor((2, 3, 0, 16), torch.float32, ValueSpec(2, 1.0, 0.0))
    assert torch.equal(attention(q, no_keys, no_keys), torch.zeros_like(q))
    assert attention(q[:, :, :0], q, q).shape == (2, 3, 0, 16)
    assert attention_decode(q[:, :, :1], q, q, 0).abs().sum() == 0


def test_output_layout_feeds_the_output_projection_without_copy():
    q = make_tensor((2, 3, 7, 16), torch.float16, ValueSpec(1, 1.0, 0.0))
    out = attention(q, q, q)
    assert out.transpose(1, 2).is_contiguous()


def _spread_rows(t, step, offset):
    """``t`` ``(1, 1, n, d)`` as a view whose rows lie ``step`` elements apart, from element ``offset``
    of a (lazily allocated) buffer whose first ``d`` elements hold 99 instead (where a row offset
    wrapped past 2**31 lands). Skips the test where the buffer cannot be allocated."""
    n, d = t.shape[2], t.shape[3]
    try:
        buffer = torch.empty(offset + (n - 1) * step + d, dtype=t.dtype, device=t.device)
    except (RuntimeError, MemoryError):  # torch.OutOfMemoryError is a RuntimeError
        pytest.skip("cannot allocate the (mostly untouched) buffer")
    buffer[:d] = 99
    view = buffer.as_strided(t.shape, (0, 0, step, 1), storage_offset=offset)
    view.copy_(t)
    return view


def test_element_offsets_past_int32(monkeypatch):
    """Row offsets (Q x row stride: a ``(B, 1, Q, K)`` mask of 2**31 elements) and key offsets (K x row
    stride: a long cache) past 2**31 elements are computed in int64 (they wrapped: wrong rows, or a
    crash). Strides are large and lengths small so that the test stays quick."""
    # The buffers are mostly never touched (on CPU, never resident): no NaN poisoning of torch.empty.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    q, k, v = make_qkv(
        1, 1, 3, 129, 16, torch.float16, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3
    )
    mask = (torch.arange(129, device=TEST_DEVICE) % 3 != 0).expand(1, 1, 3, 129)
    wide_mask = _spread_rows(mask, 2**30, 2**31)  # row 2 at element 2**32 of the mask
    torch.testing.assert_close(attention(q, k, v, mask=wide_mask), attention(q, k, v, mask=mask))
    del wide_mask
    # key 128 at element 2**31 + 2**31 (one block of 128 keys times the stride still fits in int32)
    kv = _spread_rows(torch.cat([k, v], dim=-1), 2**24, 2**31)
    k_far, v_far = kv[..., :16], kv[..., 16:]
    torch.testing.assert_close(attention(q, k_far, v_far), attention(q, k, v))
    torch.testing.assert_close(attention_decode(q[:, :, :1], k_far, v_far), attention(q[:, :, :1], k, v))


def test_decode_with_int_cache_len_and_scalar_bias_or_mask():
    """0-d ``bias``/``mask`` (they broadcast) with an int ``cache_len`` (the cache is sliced): they raised
    IndexError while being trimmed to the cache length."""
    q, k, v = make_qkv(
        2, 2, 1, 20, 16, torch.float32, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3
    )
    bias = torch.tensor(0.5, device=TEST_DEVICE)
    mask = torch.tensor(True, device=TEST_DEVICE)
    out = attention_decode(q, k, v, 7, bias=bias, mask=mask)
    check(out, q, k, v, 0.25, bias=bias, mask=mask, cache_len=torch.tensor(7, device=TEST_DEVICE))


@needs_two_gpus
def test_tensors_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device: attention must make q's GPU current (the split-KV decode
    path's two kernels too)."""
    q, k, v = (
        t.to("cuda:1")
        for t in make_qkv(
            2, 3, 7, 300, 64, torch.float16, [ValueSpec(i, 1.0, 0.0) for i in range(3)], ["contiguous"] * 3
        )
    )
    lengths = torch.tensor([300, 41], device="cuda:1")
    with torch.cuda.device(0):
        outs = [attention(q, k, v, key_padding_mask=lengths), attention_decode(q[:, :, :1], k, v, lengths)]
    torch.cuda.synchronize(1)
    check(outs[0], q, k, v, 0.125, key_padding_mask=lengths)
    check(outs[1], q[:, :, :1], k, v, 0.125, key_padding_mask=lengths)


# The dense kernel's load candidates (tensor descriptors, warp specialisation). The whole suite also runs
# with a candidate in place of the heuristic's loads through KERNL_TEST_ATTENTION_LOADS (conftest.py);
# here each candidate meets the cases where its loads differ from pointer loads: keys past a valid length
# holding NaN (descriptors read them), head dimensions below the tile, query and key tails, split-KV,
# and layouts a descriptor cannot describe.
CANDIDATE_DTYPES = [torch.float16, torch.bfloat16] if on_gpu() else [torch.float16]
if on_gpu():  # one tile each way (compiles dominate: masks x causal x dtypes per candidate)
    CANDIDATES = [LaunchConfig(128, 64, 8, 3, tma=True), LaunchConfig(128, 64, 8, 3, tma=True, warp_specialize=True),
                  LaunchConfig(16, 64, 4, 3, 4, tma=True)]  # fmt: skip
else:
    CANDIDATES = [LaunchConfig(16, 16, 4, 1, tma=True), LaunchConfig(32, 16, 4, 1, tma=True, warp_specialize=True),
                  LaunchConfig(16, 32, 4, 1, 3, tma=True)]  # fmt: skip
CANDIDATE_IDS = [
    f"{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}k{c.num_splits}{'-ws' if c.warp_specialize else ''}"
    for c in CANDIDATES
]
CANDIDATE_MASKS = ["none", "lengths_nan_past", "bool_kpm", "bool_mask", "additive_mask", "bias"]


def _masks(kind, q, k, v):
    """Keyword masks for ``kind``; "lengths_nan_past" also fills k and v past each length with NaN."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    g = torch.Generator().manual_seed(n_q * 31 + n_k)
    if kind == "none":
        return {}
    if kind == "lengths_nan_past":
        lengths = torch.randint(0, n_k + 1, (b,), generator=g)
        lengths[0] = max(1, n_k - 5)
        for i, length in enumerate(lengths.tolist()):
            k[i, :, length:] = float("nan")
            v[i, :, length:] = float("nan")
        return {"key_padding_mask": lengths.to(torch.int32).to(TEST_DEVICE)}
    if kind == "bool_kpm":  # not a prefix: applied block by block
        return {"key_padding_mask": (torch.rand(b, n_k, generator=g) > 0.3).to(TEST_DEVICE)}
    if kind == "bool_mask":
        return {"mask": (torch.rand(b, 1, n_q, n_k, generator=g) > 0.25).to(TEST_DEVICE)}
    if kind == "additive_mask":
        mask = torch.where(torch.rand(b, 1, n_q, n_k, generator=g) > 0.25, 0.0, float("-inf"))
        return {"mask": mask.to(q.dtype).to(TEST_DEVICE)}
    return {"bias": make_tensor((1, h, n_q, n_k), q.dtype, ValueSpec(9, 1.0, 0.0))}


@pytest.mark.parametrize("config", CANDIDATES, ids=CANDIDATE_IDS)
@pytest.mark.parametrize("mask", CANDIDATE_MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_candidate_matches_reference(config, mask, causal):
    b, h, n_q, n_k, d = (2, 3, 45, 37, 24) if not on_gpu() else (2, 3, 300, 257, 80)
    for dtype in CANDIDATE_DTYPES:
        layouts = ["hf_heads", "contiguous", "hf_heads"]
        q, k, v = make_qkv(b, h, n_q, n_k, d, dtype, [ValueSpec(i, 1.0, 0.0) for i in range(3)], layouts)
        masks = _masks(mask, q, k, v)
        assert all(descriptor_layout_ok(t) for t in (q, k, v))  # the descriptor path is the one tested
        out = attention_forward(q, k, v, 0.3, masks.get("bias"), masks.get("mask"),
                                masks.get("key_padding_mask"), None, causal, config)  # fmt: skip
        check(out, q, k, v, 0.3, causal=causal, **masks)


@pytest.mark.parametrize("config", CANDIDATES[:2], ids=CANDIDATE_IDS[:2])
def test_layouts_a_descriptor_cannot_describe_fall_back_to_pointer_loads(config):
    """A last-dimension stride above 1, a row stride of 8 bytes (head_dim 4), fp32 inputs (computed in
    fp64), no key at all: pointer loads, same results."""
    strided = make_tensor((1, 2, 33, 48), torch.float16, ValueSpec(1, 1.0, 0.0))[..., ::2]
    narrow = make_tensor((1, 2, 33, 4), torch.float16, ValueSpec(2, 1.0, 0.0))
    wide = make_tensor((1, 2, 33, 16), torch.float32, ValueSpec(3, 1.0, 0.0))
    for t in (strided, narrow, wide):
        if t.dtype != torch.float32:
            assert not descriptor_layout_ok(t)
        out = attention_forward(t, t, t, 0.3, None, None, None, None, True, config)
        check(out, t, t, t, 0.3, causal=True)
    q = make_tensor((1, 2, 5, 16), torch.float16, ValueSpec(4, 1.0, 0.0))
    no_keys = q[:, :, :0]
    assert not descriptor_layout_ok(no_keys)
    check(
        attention_forward(q, no_keys, no_keys, 0.3, None, None, None, None, False, config),
        q,
        no_keys,
        no_keys,
        0.3,
    )
