"""The ops are real torch.library ops: schema/fake checks pass and they run inside torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from kernl.linear_act import gated_linear_act, gated_linear_act_reference, linear_act, linear_act_reference
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor

x = make_tensor((2, 6, 40), torch.float32, ValueSpec(3, 1.0, 0.5))
w = make_tensor((24, 40), torch.float32, ValueSpec(4, 0.2, 0.0))
w1 = make_tensor((24, 40), torch.float32, ValueSpec(5, 0.2, 0.0))
b = make_tensor((24,), torch.float32, ValueSpec(6, 1.0, 0.0))
r = make_tensor((2, 6, 24), torch.float32, ValueSpec(7, 1.0, 0.0))


@pytest.mark.parametrize(
    "op, args",
    [
        (torch.ops.kernl.linear_act.default, (x, w, b, "gelu", r)),
        (torch.ops.kernl.linear_act.default, (x[0], w, None, "none", None)),
        (torch.ops.kernl.gated_linear_act.default, (x, w, w1, "gelu_tanh", None)),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _ffn(h, lin, gated):
    up = lin(h, w, b, "gelu", None) + gated(h, w, w1, "gelu_tanh", None)
    return lin(up, w1.t().contiguous(), None, "tanh", h)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_runs_inside_torch_compile(backend):
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: _ffn(h, linear_act, gated_linear_act), backend=backend, fullgraph=True)
    expected = _ffn(x.double(), linear_act_reference, gated_linear_act_reference)
    torch_same = (
        torch.tanh(F.linear(F.gelu(F.linear(x, w, b)) + gated_linear_act_reference(x, w, w1), w1.t())) + x
    )
    assert_matches_reference(compiled(x), expected, torch_same)
