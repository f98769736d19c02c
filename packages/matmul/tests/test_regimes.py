"""Every config the tuner may pick, in each regime (small M with split-K, large M, ragged), is correct."""

import pytest
import torch

from kernl.matmul import Config, gemm, matmul_reference
from kernl.matmul.launch import effective_split, input_precision
from kernl.matmul.tuning import Problem, candidates, heuristic
from kernl_testing import ValueSpec, assert_matches_reference, float_dtypes, make_tensor, on_gpu

# (batch, M, N, K): decode / batch-1 encoder rows, a compute-bound block (smaller on the interpreter),
# and ragged sizes where neither N nor K is a multiple of any tile.
REGIMES = {
    "small_m": (1, 16, 384, 768) if on_gpu() else (1, 9, 96, 320),
    "large_m": (1, 1024, 768, 320) if on_gpu() else (1, 160, 272, 96),
    "ragged": (2, 1000, 531, 333) if on_gpu() else (2, 70, 131, 75),
}


def _problem(shape, dtype, gated=False):
    batch, m, n, k = shape
    return Problem(batch, m, n, k, dtype, input_precision(dtype, False), True, False, gated)


def _configs(regime):
    problem = _problem(REGIMES[regime], torch.float16)
    return candidates(problem, 132) + [heuristic(problem)]


@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize(
    "regime, config", [(r, c) for r in REGIMES for c in dict.fromkeys(_configs(r))], ids=str
)
def test_every_candidate_config_is_correct(regime, config, dtype):
    batch, m, n, k = REGIMES[regime]
    if dtype == torch.float32:  # fp32 tiles use half the K step (twice the bytes per element)
        config = Config(config.block_m, config.block_n, config.block_k // 2, config.split_k, config.group_m,
                        config.num_warps, config.num_stages)  # fmt: skip
    a = make_tensor((batch, m, k), dtype, ValueSpec(1, 1.0, 0.5))
    b = make_tensor((batch, n, k), dtype, ValueSpec(2, 1.0, 0.0)).transpose(-1, -2)  # nn.Linear weight.T
    out = gemm(a, b, config=config)
    expected = torch.matmul(a, b)
    assert_matches_reference(out, matmul_reference(a.double(), b.double()), expected)


def test_small_m_candidates_spread_the_work_over_every_sm():
    problem = _problem((1, 16, 768, 3072), torch.float16)
    for config in candidates(problem, 132):
        tiles = triton_cdiv(16, config.block_m) * triton_cdiv(768, config.block_n)
        programs = tiles * effective_split(3072, config.block_k, config.split_k)
        assert programs >= 66, f"{config} leaves most of the 132 SMs idle ({programs} programs)"


def test_candidate_lists_are_bounded_and_fit_the_shape():
    for shape in [(1, 1, 768, 768), (1, 64, 3072, 768), (1, 16384, 3072, 768), (384, 384, 384, 64)]:
        for gated in (False, True):
            configs = candidates(_problem(shape, torch.float16, gated), 132)
            assert 1 <= len(configs) <= 8
            assert all(c.block_m <= max(16, 2 * shape[1]) for c in configs)


def test_effective_split_never_leaves_a_split_empty():
    for k in range(1, 300, 7):
        for split in range(1, 20):
            s = effective_split(k, 16, split)
            steps = triton_cdiv(k, 16)
            per = triton_cdiv(steps, s)
            assert 1 <= s <= max(split, 1) and (s - 1) * per < steps


def triton_cdiv(a, b):
    return -(-a // b)
