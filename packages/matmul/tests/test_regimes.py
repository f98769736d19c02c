"""Every config the tuner may pick, in each regime (small M with split-K, large M, ragged), is correct,
PyTorch's candidate included."""

import pytest
import torch

from kernl.matmul import Config, gemm, matmul_reference
from kernl.matmul.config_cache import TORCH
from kernl.matmul.launch import effective_split, input_precision, tma_eligible
from kernl.matmul.tuning import MAX_CANDIDATES, MAX_SMALL_M_CANDIDATES, Problem, candidates, heuristic
from kernl_testing import ValueSpec, assert_matches_reference, float_dtypes, make_tensor, on_gpu

# (batch, M, N, K): decode / batch-1 encoder rows, a compute-bound block (smaller on the interpreter),
# ragged sizes where neither N nor K is a multiple of any tile, and ragged sizes the TMA kernel takes
# (rows 16-byte aligned, but M, N and K still off the tile grid).
REGIMES = {
    "small_m": (1, 16, 384, 768) if on_gpu() else (1, 9, 96, 320),
    "large_m": (1, 1024, 768, 320) if on_gpu() else (1, 160, 272, 96),
    "ragged": (2, 1000, 531, 333) if on_gpu() else (2, 70, 131, 75),
    "ragged_tma": (1, 1000, 536, 328) if on_gpu() else (1, 70, 136, 72),
    "batched_tma": (48, 384, 384, 64) if on_gpu() else (3, 70, 136, 72),
}


def _problem(shape, dtype, gated=False):
    batch, m, n, k = shape
    tma = not gated and dtype != torch.float32 and n % 8 == 0 and k % 8 == 0
    return Problem(batch=batch, m=m, n=n, k=k, dtype=dtype, precision=input_precision(dtype, False),
                   a_k_contiguous=True, b_k_contiguous=False, gated=gated, tma=tma)  # fmt: skip


def _tiles(problem):
    """The tuner's Triton candidates for ``problem`` (without PyTorch's)."""
    return [c for c in candidates(problem, 132) if c.kernel != "torch"]


def _configs(regime, dtype):
    problem = _problem(REGIMES[regime], dtype)
    return dict.fromkeys(candidates(problem, 132) + [heuristic(problem)])


@pytest.mark.parametrize(
    "regime, dtype, config",
    [(r, d, c) for r in REGIMES for d in float_dtypes() for c in _configs(r, d)],
    ids=str,
)
def test_every_candidate_config_is_correct(regime, dtype, config):
    """Every Triton tile the tuner may time, and PyTorch's candidate (half precision), routed by ``config``."""
    batch, m, n, k = REGIMES[regime]
    a = make_tensor((batch, m, k), dtype, ValueSpec(1, 1.0, 0.5))
    b = make_tensor((batch, n, k), dtype, ValueSpec(2, 1.0, 0.0)).transpose(-1, -2)  # nn.Linear weight.T
    assert tma_eligible(a, b, None, batch) == _problem(REGIMES[regime], dtype).tma
    out = gemm(a, b, config=config)
    expected = torch.matmul(a, b)
    scale = max(1.0, k**0.5 / 4)  # a K-long dot product: rounding error grows like sqrt(K), in absolute
    assert_matches_reference(out, matmul_reference(a.double(), b.double()), expected, atol_scale=scale)


def test_small_m_candidates_spread_the_work_over_every_sm():
    problem = _problem((1, 16, 768, 3072), torch.float16)
    for config in _tiles(problem):
        tiles = triton_cdiv(16, config.block_m) * triton_cdiv(768, config.block_n)
        programs = tiles * effective_split(3072, config.block_k, config.split_k)
        assert programs >= 66, f"{config} leaves most of the 132 SMs idle ({programs} programs)"


def test_short_k_small_m_problems_also_time_a_tile_without_split_k():
    """Few rows and a short K (T5 decode, 768 -> 768): one candidate reads K whole, without split-K's pass."""
    for shape in [(1, 1, 768, 768), (1, 16, 768, 512)]:
        configs = _tiles(_problem(shape, torch.float16))
        assert configs[0].split_k > 1 and any(c.split_k == 1 and c.block_n == 32 for c in configs), configs
    assert all(c.split_k > 1 for c in _tiles(_problem((1, 1, 768, 2048), torch.float16)))


def test_candidate_lists_are_bounded_and_fit_the_shape():
    for shape in [(1, 1, 768, 768), (1, 64, 3072, 768), (1, 16384, 3072, 768), (384, 384, 384, 64)]:
        for gated in (False, True):
            problem = _problem(shape, torch.float16, gated)
            configs = _tiles(problem)
            assert 1 <= len(configs) <= (MAX_CANDIDATES if shape[1] > 64 else MAX_SMALL_M_CANDIDATES)
            assert all(c.block_m <= max(16, 2 * shape[1]) for c in configs)
            assert candidates(problem, 132)[-1] == TORCH, "PyTorch's candidate is timed too, last"
    assert TORCH not in candidates(_problem((1, 64, 3072, 768), torch.float32), 132), (
        "fp32 follows allow_tf32"
    )


def test_small_m_with_a_long_k_also_splits_over_two_waves():
    """M=16, 3072 -> 768 (Bert's FFN down at batch 1): candidates with more programs than SMs, beside one wave."""
    programs = [
        triton_cdiv(16, c.block_m) * triton_cdiv(768, c.block_n) * effective_split(3072, c.block_k, c.split_k)
        for c in _tiles(_problem((1, 16, 768, 3072), torch.float16))
    ]
    assert max(programs) > 132 and min(programs) <= 132, programs


def test_few_row_problems_get_narrow_deep_tma_tiles():
    """A few hundred rows (128x128 tiles short of one wave): narrow TMA tiles with 128-wide K steps are timed."""
    for shape in [(1, 128, 768, 768), (1, 128, 2304, 768), (1, 512, 3072, 768), (1, 512, 768, 3072)]:
        tma = [c for c in _tiles(_problem(shape, torch.float16)) if c.kernel == "tma"]
        assert any(c.block_k == 128 and c.block_n <= 64 and c.num_stages >= 5 for c in tma), (shape, tma)
    many_tiles = _tiles(_problem((1, 16384, 3072, 768), torch.float16))
    assert all(c.block_k == 64 for c in many_tiles if c.kernel == "tma")


def test_effective_split_never_leaves_a_split_empty():
    for k in range(1, 300, 7):
        for split in range(1, 20):
            s = effective_split(k, 16, split)
            steps = triton_cdiv(k, 16)
            per = triton_cdiv(steps, s)
            assert 1 <= s <= max(split, 1) and (s - 1) * per < steps


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize(
    "config",
    [
        Config(kernel="tma", block_m=64, block_n=64, block_k=64),
        *(Config(kernel="tma", block_m=64, block_n=256, block_k=64, epilogue_parts=e) for e in (2, 4)),
    ],
    ids=str,
)
def test_tma_kernel_with_fused_epilogue_on_ragged_edges(config):
    """Bias, GELU and residual on tiles past every edge, the epilogue whole or in column blocks (the
    last blocks of the last column of tiles partly, or wholly, past N; two columns of 256-wide tiles
    on the interpreter too, so that a column block is placed in a tile other than the first)."""
    m, n, k = (1000, 536, 328) if on_gpu() else (70, 392, 72)
    a = make_tensor((1, m, k), torch.float16, ValueSpec(3, 1.0, 0.0))
    w = make_tensor((n, k), torch.float16, ValueSpec(4, k**-0.5, 0.0))
    bias = make_tensor((n,), torch.float16, ValueSpec(5, 1.0, 0.0))
    residual = make_tensor((m, n), torch.float16, ValueSpec(6, 1.0, 0.0), "padded_rows")
    for b in (w.t()[None], w.t().contiguous()[None]):  # K-major (nn.Linear weight) and N-major
        assert tma_eligible(a, b, None, 1)
        out = gemm(a, b, bias=bias, residual=residual, activation="gelu", config=config)
        expected = torch.nn.functional.gelu(a[0].double() @ b[0].double() + bias.double()) + residual.double()
        torch_same = torch.nn.functional.gelu(a[0] @ b[0] + bias) + residual
        assert_matches_reference(out[0], expected, torch_same)


@pytest.mark.parametrize("parts", [1, 4])
def test_batched_tma_kernel_with_n_major_b(parts):
    a = make_tensor((3, 40, 72), torch.float16, ValueSpec(1, 1.0, 0.0))
    b = make_tensor((3, 72, 48), torch.float16, ValueSpec(2, 1.0, 0.0))
    assert tma_eligible(a, b, None, 3)
    out = gemm(
        a, b, config=Config(kernel="tma", block_m=64, block_n=64, block_k=64, epilogue_parts=parts)
    )  # 16-wide blocks: one past N
    assert_matches_reference(out, matmul_reference(a.double(), b.double()), torch.matmul(a, b))
    assert not tma_eligible(a[:1], b, None, 3), "a broadcast batch cannot be described by a descriptor"


def test_expanded_operands_take_the_pointer_kernel():
    """Views with a 0 stride (``expand``) are not given to a tensor descriptor (CUDA's tensor maps
    step through memory); the pointer kernel computes them."""
    row = make_tensor((1, 1, 72), torch.float16, ValueSpec(1, 1.0, 0.0))
    a = make_tensor((3, 40, 72), torch.float16, ValueSpec(2, 1.0, 0.0))
    b = make_tensor((3, 72, 48), torch.float16, ValueSpec(3, 1.0, 0.0))
    for x, y in ((row.expand(1, 40, 72), b[:1]), (row.expand(3, 40, 72), b), (a, b[:1].expand(3, 72, 48))):
        assert not tma_eligible(x, y, None, y.shape[0])
        assert_matches_reference(gemm(x, y), matmul_reference(x.double(), y.double()), torch.matmul(x, y))


def test_tma_config_on_an_ineligible_problem_is_refused():
    a = make_tensor((1, 8, 75), torch.float16, ValueSpec(1, 1.0, 0.0))  # rows of 150 bytes: not aligned
    b = make_tensor((1, 75, 16), torch.float16, ValueSpec(2, 1.0, 0.0))
    with pytest.raises(ValueError, match="TMA"):
        gemm(a, b, config=Config(kernel="tma", block_m=64, block_n=64, block_k=64))
