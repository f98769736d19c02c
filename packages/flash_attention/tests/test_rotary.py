"""Rotary position embedding of q and k in one launch vs. the fp64 reference, with transformers' own
formula in the inputs' dtype as the yardstick."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernl.flash_attention import rotary, rotary_reference
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor, on_gpu
from kernl_testing.strategies import dtypes, value_specs

HEAD_DIMS = [2, 8, 16, 24, 64, 96, 128, 256] if on_gpu() else [2, 8, 16, 24, 64]
LAYOUTS = ["contiguous", "padded_rows", "transposed", "hf_heads"]


def make_heads(b, h, s, d, dtype, spec, layout):
    """``(B, H, S, D)``; "hf_heads": a ``(B, S, H, D)`` projection viewed as ``(B, H, S, D)``."""
    if layout == "hf_heads":
        return make_tensor((b, s, h, d), dtype, spec).transpose(1, 2)
    return make_tensor((b, h, s, d), dtype, spec, layout)


def make_angles(b, s, d, dtype, form, seed):
    """cos and sin of positions times frequencies, in the forms a caller may pass."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (b, s), generator=generator).double()
    frequencies = 10000.0 ** (-torch.arange(0, d, 2).double() / d)
    angles = (positions[..., None] * frequencies).repeat(1, 1, 2)  # (B, S, D), as transformers builds them
    cos, sin = (f(angles).to(TEST_DEVICE, dtype) for f in (torch.cos, torch.sin))
    if form == "b1sd":  # transformers' cos.unsqueeze(1)
        return cos[:, None], sin[:, None]
    if form == "sd":  # one row of positions for every batch element
        return cos[0], sin[0]
    # "strided": every other element of a wider buffer
    wide = [torch.stack([t, t], dim=-1).flatten(-2)[..., ::2][:, None] for t in (cos, sin)]
    return wide[0], wide[1]


def transformers_rotary(x, cos, sin):
    """transformers' apply_rotary_pos_emb, in x's dtype."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@given(b=st.integers(1, 2), heads_q=st.integers(1, 5), heads_k=st.integers(1, 3), s=st.integers(1, 40),
       d=st.sampled_from(HEAD_DIMS), dtype=dtypes(), specs=st.tuples(value_specs(), value_specs()),
       layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 2), form=st.sampled_from(["b1sd", "sd", "strided"]))  # fmt: skip
def test_rotary_matches_reference(b, heads_q, heads_k, s, d, dtype, specs, layouts, form):
    q = make_heads(b, heads_q, s, d, dtype, specs[0], layouts[0])
    k = make_heads(b, heads_k, s, d, dtype, specs[1], layouts[1])
    cos, sin = make_angles(b, s, d, dtype, form, specs[0].seed)
    q_out, k_out = rotary(q, k, cos, sin)
    q_ref, k_ref = rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    for out, x, ref in ((q_out, q, q_ref), (k_out, k, k_ref)):
        assert out.shape == x.shape and out.dtype == x.dtype and out.stride() == torch.empty_like(x).stride()
        assert_matches_reference(out, ref, transformers_rotary(x, cos, sin))


def test_reference_is_transformers_formula():
    q, k = (make_tensor((2, 3, 5, 8), torch.float64, ValueSpec(i, 1.0, 0.0)) for i in range(2))
    cos, sin = make_angles(2, 5, 8, torch.float64, "b1sd", 3)
    q_ref, k_ref = rotary_reference(q, k, cos, sin)
    # rotate_half by hand: (x1, x2) -> (-x2, x1)
    x1, x2 = q[..., :4], q[..., 4:]
    expected = torch.cat((x1 * cos[..., :4] - x2 * sin[..., :4], x2 * cos[..., 4:] + x1 * sin[..., 4:]), -1)
    torch.testing.assert_close(q_ref, expected)
    torch.testing.assert_close(k_ref, transformers_rotary(k, cos, sin))


def test_empty_sizes():
    q = make_tensor((2, 3, 0, 8), torch.float32, ValueSpec(1, 1.0, 0.0))
    cos = make_tensor((2, 1, 0, 8), torch.float32, ValueSpec(2, 1.0, 0.0))
    q_out, k_out = rotary(q, q[:, :0], cos, cos)
    assert q_out.shape == q.shape and k_out.shape == (2, 0, 0, 8)


def test_registered_op_runs_inside_torch_compile():
    q, k = (make_tensor((1, 4, 6, 16), torch.float32, ValueSpec(i, 1.0, 0.0)) for i in range(2))
    cos, sin = make_angles(1, 6, 16, torch.float32, "b1sd", 5)
    torch.library.opcheck(
        torch.ops.kernl.rotary.default, (q, k, cos, sin), test_utils=("test_schema", "test_faketensor")
    )
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: rotary(*a)[0] * 2, backend="aot_eager", fullgraph=True)
    q_ref, _ = rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    assert_matches_reference(compiled(q, k, cos, sin), 2 * q_ref, 2 * transformers_rotary(q, cos, sin))


q4 = torch.randn(2, 4, 5, 8, device=TEST_DEVICE)
k4 = torch.randn(2, 2, 5, 8, device=TEST_DEVICE)
c4 = torch.randn(2, 1, 5, 8, device=TEST_DEVICE)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: rotary([1.0], k4, c4, c4), TypeError, "q must be a torch.Tensor"),
        (lambda: rotary(q4.double(), k4, c4, c4), TypeError, "q must be float16"),
        (lambda: rotary(q4, k4.half(), c4, c4), ValueError, "k must have q's dtype"),
        (lambda: rotary(q4[0], k4, c4, c4), ValueError, "q must be 4-D"),
        (lambda: rotary(q4, k4[:, :, :4], c4, c4), ValueError, r"k must have shape \(2, H_k, 5, 8\)"),
        (lambda: rotary(q4[..., :7], k4[..., :7], c4[..., :7], c4[..., :7]), ValueError, "head_dim must be even"),
        (lambda: rotary(q4, k4, c4[..., :4], c4), ValueError, "cos of shape"),
        (lambda: rotary(q4, k4, c4.expand(2, 2, 5, 8), c4), ValueError, "cos of shape"),
        (lambda: rotary(q4, k4, c4, c4.int()), TypeError, "sin must be float16"),
        (lambda: rotary(q4, k4, c4, c4[0, 0]), ValueError, "sin must have cos's shape"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
