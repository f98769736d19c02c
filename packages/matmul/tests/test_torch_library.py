"""kernl::matmul is a real torch.library op: schema/fake checks pass and it runs inside torch.compile."""

import pytest
import torch

from kernl.matmul import matmul, matmul_reference
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor

a = make_tensor((2, 6, 40), torch.float32, ValueSpec(3, 1.0, 0.5))
b = make_tensor((40, 24), torch.float32, ValueSpec(4, 1.0, 0.0))


@pytest.mark.parametrize("args", [(a, b, False), (a[0], b, False), (a, b.expand(2, 40, 24), False)])
def test_opcheck(args):
    torch.library.opcheck(torch.ops.kernl.matmul.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_runs_inside_torch_compile(backend):
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: matmul(x, y).relu() * 2, backend=backend, fullgraph=True)
    expected = matmul_reference(a.double(), b.double()).relu() * 2
    assert_matches_reference(compiled(a, b), expected, torch.matmul(a, b).relu() * 2)
