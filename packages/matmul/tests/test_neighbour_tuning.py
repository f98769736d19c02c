"""A cold tuning next to a tuned M class times that class's best few tiles, fitted to its own M."""

from dataclasses import replace

import pytest
import torch

from kernl.matmul import config_cache, gemm, matmul_reference, tuning
from kernl.matmul.config_cache import TORCH, Config
from kernl.matmul.tuning import NEIGHBOUR_BEST, Problem, candidates, fitted, neighbour_keys, neighbour_ranking
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor, on_gpu

FFN_UP = Problem(
    batch=1, m=1792, n=3072, k=768, dtype=torch.float16, precision="tf32", a_k_contiguous=True,
    b_k_contiguous=True, gated=False, tma=True, activation="gelu", bias=True,
)  # fmt: skip
GPU = "h100"


@pytest.fixture(autouse=True)
def neighbours_on(monkeypatch):
    monkeypatch.delenv("KERNL_TUNING_NEIGHBOURS", raising=False)
    monkeypatch.delenv("KERNL_TORCH_CANDIDATE", raising=False)
    monkeypatch.setattr(tuning, "_rankings", {})


def _ranked(problem: Problem) -> list[Config]:
    """A ranking of ``problem``'s Triton candidates that is not their guess order (the last first)."""
    return [c for c in candidates(problem, 132) if c.kernel != "torch"][::-1]


def test_the_neighbours_best_are_timed_in_its_order_then_pytorchs():
    tuning._rankings[tuning.cache_key(FFN_UP, GPU)] = _ranked(FFN_UP)
    near = replace(FFN_UP, m=900)
    reused = neighbour_ranking(near, GPU)
    assert reused == _ranked(FFN_UP)
    timed = candidates(near, 132, reused)
    assert timed == [fitted(near, c, 132) for c in _ranked(FFN_UP)[:NEIGHBOUR_BEST]] + [TORCH]


def test_the_nearest_neighbour_wins_and_two_classes_is_the_reach():
    far, nearest = replace(FFN_UP, m=4096), replace(FFN_UP, m=400)
    tuning._rankings[tuning.cache_key(far, GPU)] = [Config(block_m=128, block_n=256, block_k=64)]
    tuning._rankings[tuning.cache_key(nearest, GPU)] = [Config(block_m=64, block_n=64, block_k=64)]
    assert neighbour_ranking(replace(FFN_UP, m=1000), GPU) == [Config(block_m=64, block_n=64, block_k=64)]
    assert neighbour_ranking(replace(FFN_UP, m=2000), GPU) == [Config(block_m=128, block_n=256, block_k=64)]
    assert neighbour_ranking(replace(FFN_UP, m=20000), GPU) is None  # three powers of two away
    assert neighbour_ranking(replace(FFN_UP, m=33), GPU) is None  # small M: another regime


def test_neighbours_are_the_same_problem_in_the_same_regime():
    keys = neighbour_keys(replace(FFN_UP, m=100), GPU)
    assert keys == [tuning.cache_key(replace(FFN_UP, m=m), GPU) for m in (256, 512)]  # not 64 or 32: small M
    assert neighbour_keys(replace(FFN_UP, m=64), GPU) == [
        tuning.cache_key(replace(FFN_UP, m=m), GPU) for m in (32, 16)
    ]
    tuning._rankings[tuning.cache_key(replace(FFN_UP, activation="none"), GPU)] = _ranked(FFN_UP)
    tuning._rankings[tuning.cache_key(replace(FFN_UP, m=128, n=768), GPU)] = _ranked(FFN_UP)
    assert neighbour_ranking(replace(FFN_UP, m=1024), GPU) is None, "another epilogue or N is no neighbour"


def test_kernl_tuning_neighbours_0_times_the_full_list(monkeypatch):
    tuning._rankings[tuning.cache_key(FFN_UP, GPU)] = _ranked(FFN_UP)
    monkeypatch.setenv("KERNL_TUNING_NEIGHBOURS", "0")
    assert neighbour_ranking(replace(FFN_UP, m=1000), GPU) is None


def test_small_m_tiles_take_their_rows_from_m_and_keep_their_split():
    small = replace(FFN_UP, m=48)
    tile = Config(block_m=16, block_n=32, block_k=128, split_k=5, num_stages=6)
    assert fitted(small, tile, 132) == replace(tile, block_m=64)
    assert fitted(replace(small, m=9), replace(tile, kernel="tma", split_k=1), 132).block_m == 16


def test_large_m_pointer_tiles_recompute_split_k_and_tma_tiles_stay():
    narrow = Config(block_m=64, block_n=128, block_k=64, split_k=1, num_stages=4)
    few_rows = replace(FFN_UP, m=100, n=768)  # 2 x 6 tiles: split to fill 132 SMs
    assert fitted(few_rows, narrow, 132).split_k == tuning._split_for(few_rows, 64, 128, 64, 132) > 1
    tma = Config(
        kernel="tma", block_m=128, block_n=128, block_k=64, num_warps=8, occupancy=2, epilogue_parts=4
    )
    assert fitted(few_rows, tma, 132) == tma


def test_a_neighbours_tile_that_cannot_run_here_is_dropped_and_none_left_means_the_full_list():
    too_tall = Config(block_m=256, block_n=128, block_k=64, num_warps=8)
    ok = Config(block_m=64, block_n=64, block_k=64)
    near = replace(FFN_UP, m=100)
    assert candidates(near, 132, [too_tall, ok]) == [fitted(near, ok, 132), TORCH]
    assert candidates(near, 132, [too_tall]) == candidates(near, 132)


@pytest.mark.skipif(not on_gpu(), reason="timing needs the GPU")
def test_on_the_gpu_a_neighbouring_class_times_only_the_first_ones_best(tmp_path, monkeypatch):
    for name, empty in (("_memory", {}), ("_loaded", set()), ("_unwritable", set())):
        monkeypatch.setattr(config_cache, name, empty)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KERNL_AUTOTUNE", raising=False)
    timed: list[list[Config]] = []  # per call: the configs its tuning timed
    real_time_ms = tuning._time_ms

    def recording(launch, config, flush):
        timed[-1].append(config)
        return real_time_ms(launch, config, flush)

    monkeypatch.setattr(tuning, "_time_ms", recording)
    w = make_tensor((1, 1000, 768), torch.float16, ValueSpec(21, 768**-0.5, 0.0)).transpose(1, 2)
    spent = tuning.tuning_seconds()
    for rows in (300, 130):  # M classes 512, then 256
        timed.append([])
        x = make_tensor((1, rows, 768), torch.float16, ValueSpec(20 + rows, 1.0, 0.0))
        out = gemm(x, w, activation="gelu")
        expected = torch.nn.functional.gelu(matmul_reference(x[0].double(), w[0].double()))
        assert_matches_reference(out[0], expected, torch.nn.functional.gelu(x[0] @ w[0]))
    first, second = timed
    assert len(first) > NEIGHBOUR_BEST + 1
    (ranking,) = [r for key, r in tuning._rankings.items() if "|M512|" in key]
    second_problem = replace(FFN_UP, m=130, n=1000, bias=False)
    assert second == candidates(second_problem, tuning.sm_count(0), ranking)
    assert len(second) <= NEIGHBOUR_BEST + 1 and second[-1] == TORCH
    assert tuning.tuning_seconds() > spent


@pytest.fixture
def choosing_on_a_gpu(tmp_path, monkeypatch):
    """``tuning._choose`` as on an H100 with nothing remembered, the tuning itself recorded, not run: the
    keys it was asked to tune."""
    for name, empty in (("_memory", {}), ("_loaded", set()), ("_unwritable", set())):
        monkeypatch.setattr(config_cache, name, empty)
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KERNL_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "sm_count", lambda index: 132)
    monkeypatch.setattr(tuning, "gpu_name", lambda device: GPU)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "_chosen", {})
    tuned: list[str] = []
    winner = Config(block_m=64, block_n=128, block_k=64)

    def tune(problems):
        tuned.extend(untuned.key for untuned in problems)
        return [winner] * len(problems)

    monkeypatch.setattr(tuning, "_tune", tune)
    return tuned, winner


def test_a_neighbours_ranking_changes_neither_kernl_autotune_0_nor_a_remembered_choice(
    choosing_on_a_gpu, monkeypatch
):
    tuned, winner = choosing_on_a_gpu
    device = torch.device("cuda", 0)
    near = replace(FFN_UP, m=1000)
    tuning._rankings[tuning.cache_key(FFN_UP, GPU)] = _ranked(FFN_UP)
    monkeypatch.setenv("KERNL_AUTOTUNE", "0")
    assert tuning._choose(near, device, launch=None) == tuning.heuristic(near, 132) and tuned == []
    monkeypatch.delenv("KERNL_AUTOTUNE")
    remembered = Config(block_m=128, block_n=64, block_k=32)
    config_cache._memory[tuning.cache_key(near, GPU)] = remembered
    assert tuning._choose(near, device, launch=None) == remembered and tuned == []
    other = replace(near, n=768)  # not remembered: tuned once, then remembered
    assert tuning._choose(other, device, launch=None) == winner
    assert tuning._choose(other, device, launch=None) == winner
    assert tuned == [tuning.cache_key(other, GPU)]
