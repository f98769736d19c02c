"""The op is a real torch.library op: schema/fake checks pass and it runs inside torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from kernl.flash_attention import attention, attention_decode, attention_reference
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor

q = make_tensor((2, 3, 9, 16), torch.float32, ValueSpec(1, 1.0, 0.0))
k = make_tensor((2, 3, 11, 16), torch.float32, ValueSpec(2, 1.0, 0.0))
v = make_tensor((2, 3, 11, 16), torch.float32, ValueSpec(3, 1.0, 0.0))
bias = make_tensor((1, 3, 9, 11), torch.float32, ValueSpec(4, 1.0, 0.0))
kpm = torch.tensor([[True] * 6 + [False] * 5, [True] * 11], device=TEST_DEVICE)
lengths = torch.tensor([4, 11], device=TEST_DEVICE, dtype=torch.int32)


@pytest.mark.parametrize(
    "args",
    [
        (q, k, v, 0.25, None, None, None, None, False),
        (q, k, v, 1.0, bias, kpm[:, None, None, :], kpm, None, True),
        (q[:, :, :1], k, v, 0.25, bias[:, :, :1], None, lengths, lengths, False),
    ],
)
def test_opcheck(args):
    torch.library.opcheck(
        torch.ops.kernl.attention.default, args, test_utils=("test_schema", "test_faketensor")
    )


def _bert_like_layer(q, k, v, mask):
    return attention(q, k, v, scale=0.25, mask=mask).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1) * 2


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_runs_inside_torch_compile(backend):
    torch._dynamo.reset()
    mask = kpm[:, None, None, :].expand(2, 1, 9, 11)
    compiled = torch.compile(_bert_like_layer, backend=backend, fullgraph=True)
    expected = attention_reference(q.double(), k.double(), v.double(), scale=0.25, mask=mask)
    expected = expected.transpose(1, 2).reshape(2, 9, -1) * 2
    peer = (
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25).transpose(1, 2).reshape(2, 9, -1)
        * 2
    )
    assert_matches_reference(compiled(q, k, v, mask), expected, peer)


def test_decode_step_compiles_with_a_tensor_cache_length():
    torch._dynamo.reset()
    step = torch.compile(
        lambda q, k, v, n: attention_decode(q, k, v, n, bias=bias[:, :, :1]),
        backend="aot_eager",
        fullgraph=True,
    )
    out = step(q[:, :, :1], k, v, lengths)
    expected = attention_reference(q[:, :, :1].double(), k.double(), v.double(), bias=bias[:, :, :1].double(),
                                   cache_len=lengths)  # fmt: skip
    assert_matches_reference(out, expected, None)
