"""PyTorch's candidate (``Config(kernel="torch")``): the function the Triton kernels compute, with
every epilogue, routed to by a forced config or by the tuner, inside CUDA graphs too."""

import pytest
import torch

from kernl.matmul import ACTIVATIONS, gemm, launch, matmul, matmul_reference, torch_path, tuning
from kernl.matmul.config_cache import TORCH
from kernl.matmul.torch_path import ADDMM_GELU, TORCH_ACTIVATIONS
from kernl_testing import TEST_DEVICE, ValueSpec, assert_matches_reference, make_tensor, on_gpu

HALF = [torch.float16, torch.bfloat16]  # PyTorch's own ops: bf16 is right on the CPU too (no interpreter)
M, N, K = 19, 24, 40


class _NoTriton:
    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel was launched")


@pytest.fixture
def no_triton(monkeypatch):
    """Fail the test if either Triton kernel is launched."""
    monkeypatch.setattr(launch, "gemm_kernel", _NoTriton())
    monkeypatch.setattr(launch, "gemm_tma_kernel", _NoTriton())


def _expected(a, b, b2, bias, residual, activation):
    """fp64 reference and the unfused PyTorch composition in the operands' dtype."""
    results = []
    for dtype in (torch.float64, a.dtype):
        cast = [t.to(dtype) if t is not None else None for t in (a, b, b2, bias, residual)]
        a_, b_, b2_, bias_, residual_ = cast
        h = a_ @ b_ + (bias_ if bias_ is not None else 0)
        h = TORCH_ACTIVATIONS[activation](h)
        if b2_ is not None:
            h = h * (a_ @ b2_)
        results.append(h + residual_ if residual_ is not None else h)
    return results


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "with_bias, with_residual", [(False, False), (True, False), (False, True), (True, True)]
)
def test_every_epilogue_matches_the_reference(dtype, activation, with_bias, with_residual, no_triton):
    a = make_tensor((1, M, K), dtype, ValueSpec(1, 1.0, 0.5), "padded_rows")
    b = make_tensor((N, K), dtype, ValueSpec(2, K**-0.5, 0.0)).t()[None]  # an nn.Linear weight, transposed
    bias = make_tensor((N,), dtype, ValueSpec(3, 1.0, 0.0)) if with_bias else None
    residual = make_tensor((M, N), dtype, ValueSpec(4, 1.0, 0.0), "transposed") if with_residual else None
    out = gemm(a, b, bias=bias, residual=residual, activation=activation, config=TORCH)
    assert out.shape == (1, M, N) and out.dtype == dtype and out.is_contiguous()
    reference, torch_same = _expected(a[0], b[0], None, bias, residual, activation)
    assert_matches_reference(out[0], reference, torch_same)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu", "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gated_epilogue_matches_the_reference(dtype, activation, with_bias, with_residual, no_triton):
    a = make_tensor((1, M, K), dtype, ValueSpec(5, 1.0, 0.0))
    b = make_tensor((N, K), dtype, ValueSpec(6, K**-0.5, 0.0)).t()[None]
    b2 = make_tensor((N, K), dtype, ValueSpec(7, K**-0.5, 0.0)).t()
    bias = make_tensor((N,), dtype, ValueSpec(29, 1.0, 0.0)) if with_bias else None
    residual = make_tensor((M, N), dtype, ValueSpec(8, 1.0, 0.0)) if with_residual else None
    out = gemm(a, b, b2=b2, bias=bias, residual=residual, activation=activation, config=TORCH)
    reference, torch_same = _expected(a[0], b[0], b2, bias, residual, activation)
    assert_matches_reference(out[0], reference, torch_same)


@pytest.mark.parametrize("batches", [(3, 3), (3, 1), (1, 3)])
def test_batched_and_broadcast_operands(batches, no_triton):
    a = make_tensor((batches[0], M, K), torch.float16, ValueSpec(9, 1.0, 0.0))
    b = make_tensor((batches[1], N, K), torch.float16, ValueSpec(10, 1.0, 0.0)).transpose(1, 2)
    out = gemm(a, b, activation="relu", config=TORCH)
    assert out.shape == (3, M, N) and out.is_contiguous()
    expected = matmul_reference(a.double(), b.double()).relu()
    assert_matches_reference(out, expected, torch.matmul(a, b).relu())


@pytest.mark.parametrize("batches", [(3, 1), (1, 3)])
@pytest.mark.parametrize("gated", [False, True])
def test_batched_epilogue_operands_are_shared_by_every_batch_entry(batches, gated, no_triton):
    """bias, residual and the gate apply to each batch entry, as the Triton kernels apply them."""
    dtype = torch.float16
    a = make_tensor((batches[0], M, K), dtype, ValueSpec(30, 1.0, 0.0))
    b = make_tensor((batches[1], K, N), dtype, ValueSpec(31, K**-0.5, 0.0))
    b2 = make_tensor((K, N), dtype, ValueSpec(32, K**-0.5, 0.0)) if gated else None
    bias = make_tensor((N,), dtype, ValueSpec(33, 1.0, 0.0))
    residual = make_tensor((N, M), dtype, ValueSpec(34, 1.0, 0.0)).t()
    out = gemm(a, b, b2=b2, bias=bias, residual=residual, activation="silu", config=TORCH)
    assert out.shape == (3, M, N) and out.dtype == dtype and out.is_contiguous()
    reference, torch_same = _expected(a, b, b2, bias, residual, "silu")
    assert_matches_reference(out, reference, torch_same)


def test_the_tuner_can_route_to_it(monkeypatch, no_triton):
    """What ``matmul`` runs when the tuner chose PyTorch's candidate (on the GPU it is timed; here forced)."""
    chosen = []
    monkeypatch.setattr(tuning, "choose", lambda problem, device, run: chosen.append(problem) or TORCH)
    a = make_tensor((2, M, K), torch.float16, ValueSpec(11, 1.0, 0.0))
    b = make_tensor((K, N), torch.float16, ValueSpec(12, 1.0, 0.0))
    assert_matches_reference(matmul(a, b), matmul_reference(a.double(), b.double()), torch.matmul(a, b))
    assert len(chosen) == 1 and chosen[0].m == 2 * M, "3-D a with a 2-D b is one GEMM of 2*M rows"


def test_an_autocast_region_around_the_call_does_not_recast_it(no_triton):
    a = make_tensor((1, M, K), torch.float16, ValueSpec(25, 1.0, 0.0))
    b = make_tensor((1, K, N), torch.float16, ValueSpec(26, K**-0.5, 0.0))
    bias = make_tensor((N,), torch.float16, ValueSpec(27, 1.0, 0.0))
    with torch.autocast(TEST_DEVICE, dtype=torch.bfloat16):
        out = gemm(a, b, bias=bias, activation="gelu", config=TORCH)
    assert out.dtype == torch.float16
    reference, torch_same = _expected(a[0], b[0], None, bias, None, "gelu")
    assert_matches_reference(out[0], reference, torch_same)


def test_float32_is_refused():
    a = make_tensor((1, M, K), torch.float32, ValueSpec(13, 1.0, 0.0))
    b = make_tensor((1, K, N), torch.float32, ValueSpec(14, 1.0, 0.0))
    with pytest.raises(ValueError, match="float16/bfloat16"):
        gemm(a, b, config=TORCH)


def test_addmm_gelu_is_the_form_its_name_says():
    """``torch._addmm_activation(..., use_gelu=True)`` is fused only for the GELU it computes on this device."""
    dtype = torch.float32
    a = make_tensor((M, K), dtype, ValueSpec(15, 1.0, 0.0))
    b = make_tensor((K, N), dtype, ValueSpec(16, K**-0.5, 0.0))
    bias = make_tensor((N,), dtype, ValueSpec(17, 1.0, 0.0))
    h = (bias.double() + a.double() @ b.double()) * 3  # wide enough for the two forms to differ
    fused = torch._addmm_activation(bias * 3, a * 3, b, use_gelu=True).double()
    claimed = TORCH_ACTIVATIONS[ADDMM_GELU[TEST_DEVICE]](h)
    other = TORCH_ACTIVATIONS["gelu" if ADDMM_GELU[TEST_DEVICE] == "gelu_tanh" else "gelu_tanh"](h)
    error, other_error = (fused - claimed).abs().max(), (fused - other).abs().max()
    assert error < 1e-4 and other_error > 2e-4, (error, other_error)  # the forms differ by up to ~5e-4


def test_cublas_accumulates_in_fp32_during_the_call_and_settings_are_restored(monkeypatch, no_triton):
    matmul_settings = torch.backends.cuda.matmul
    seen = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        seen.append(matmul_settings.allow_fp16_reduced_precision_reduction)
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch_path.torch, "addmm", spy)
    a = make_tensor((1, M, K), torch.float16, ValueSpec(18, 1.0, 0.0))
    b = make_tensor((1, K, N), torch.float16, ValueSpec(19, 1.0, 0.0))
    bias = make_tensor((N,), torch.float16, ValueSpec(20, 1.0, 0.0))
    saved = matmul_settings.allow_fp16_reduced_precision_reduction
    matmul_settings.allow_fp16_reduced_precision_reduction = True
    try:
        gemm(a, b, bias=bias, activation="tanh", config=TORCH)
        after = matmul_settings.allow_fp16_reduced_precision_reduction
    finally:
        matmul_settings.allow_fp16_reduced_precision_reduction = saved
    assert seen == [False], "reduced-precision reductions were allowed during the GEMM"
    assert after is True, "the process's setting was not restored"


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need the GPU")
def test_captured_in_a_cuda_graph(monkeypatch):
    """Chosen before the capture (as the tuner remembers it), PyTorch's candidate is captured and replayed."""
    monkeypatch.setattr(tuning, "choose", lambda problem, device, run: TORCH)
    x = make_tensor((1, 64, 256), torch.float16, ValueSpec(21, 1.0, 0.0))
    w = make_tensor((512, 256), torch.float16, ValueSpec(22, 256**-0.5, 0.0)).t()[None]
    bias = make_tensor((512,), torch.float16, ValueSpec(23, 1.0, 0.0))
    residual = make_tensor((64, 512), torch.float16, ValueSpec(24, 1.0, 0.0))
    eager = gemm(x, w, bias=bias, residual=residual, activation="gelu_tanh")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemm(x, w, bias=bias, residual=residual, activation="gelu_tanh")
    x.copy_(x * 0.5)
    graph.replay()
    reference, torch_same = _expected(x[0], w[0], None, bias, residual, "gelu_tanh")
    assert_matches_reference(captured[0], reference, torch_same)
    assert not torch.equal(captured, eager), "the replay computed from the new input"
