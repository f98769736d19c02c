"""The ops are real torch.library ops: schema/fake checks pass and they run inside torch.compile."""

import pytest
import torch

from kernl.layernorm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor

x = make_tensor((6, 48), torch.float32, ValueSpec(3, 1.0, 0.5))
r = make_tensor((6, 48), torch.float32, ValueSpec(4, 1.0, 0.0))
w = make_tensor((48,), torch.float32, ValueSpec(5, 0.1, 1.0))


@pytest.mark.parametrize(
    "op, args",
    [
        (torch.ops.kernl.layer_norm.default, (x, w, w, 1e-5)),
        (torch.ops.kernl.add_layer_norm.default, (x, r, w, None, 1e-5)),
        (torch.ops.kernl.rms_norm.default, (x, w.half(), 1e-6)),
        (torch.ops.kernl.add_rms_norm.default, (x, r, w, 1e-6)),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _block(hidden, residual, norm, rms):
    normed, summed = norm(hidden, w.to(hidden.dtype), w.to(hidden.dtype), 1e-5, residual=residual)
    return rms(normed * 2, w.to(hidden.dtype), 1e-6) + summed


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_runs_inside_torch_compile(backend):
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda h, res: _block(h, res, layer_norm, rms_norm), backend=backend, fullgraph=True
    )
    expected = _block(x.double(), r.double(), layer_norm_reference, rms_norm_reference)
    assert_matches_reference(compiled(x, r), expected, _block(x, r, layer_norm_reference, rms_norm_reference))
