"""Tunings deferred to the end of a block (tuning.deferred_tuning): the problems met inside run PyTorch's
candidate, then all are tuned together, their candidates compiled in one thread pool.

On the CPU the GPU is stood in for: device checks, compilation (``precompiled``) and timing (``_time_ms``)
are replaced by recorders, and each problem's launch notes the configs it ran."""

import contextlib
from dataclasses import replace

import pytest
import torch

from kernl.matmul import config_cache, gemm, tuning
from kernl.matmul.config_cache import TORCH, Config, cache_path, read_cache
from kernl.matmul.tuning import NEIGHBOUR_BEST, Problem, candidates, fitted
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor, on_gpu

FFN_UP = Problem(
    batch=1, m=1024, n=3072, k=768, dtype=torch.float16, precision="tf32", a_k_contiguous=True,
    b_k_contiguous=True, gated=False, tma=True, activation="gelu", bias=True,
)  # fmt: skip
FFN_DOWN = replace(FFN_UP, n=768, k=3072, activation="none", residual=True)
POOLER = replace(FFN_UP, m=8, n=768, activation="tanh")  # small M
GPU = "stand-in-gpu"
DEVICE = torch.device("cuda", 0)
SMS = 132


def _fake_ms(config: Config) -> float:
    """A stand-in timing that is not the candidates' guess order (a wider tile, a smaller time)."""
    return 1.0 if config == TORCH else 1.0 / (config.block_n * config.num_stages + config.split_k)


class StandInGpu:
    """Records what the tuner compiles and times; ``launch(name)`` is a problem's launch that notes runs."""

    def __init__(self):
        self.pools: list[list[tuple[str, Config]]] = []  # per precompiled() call: the launches compiled
        self.timed: list[tuple[str, Config]] = []
        self.ran: list[tuple[str, Config]] = []
        self.running_while_tuning: list[bool] = []
        self.current = None  # where launches note themselves: a pool being compiled, or the timed list

    def launch(self, name: str):
        def run(config: Config):
            self.ran.append((name, config))
            if self.current is not None:
                self.current.append((name, config))

        return run

    def precompiled(self, calls):
        self.running_while_tuning.append(tuning.tuning_running())
        self.pools.append([])
        self.current = self.pools[-1]
        for call in calls:
            call()
        self.current = None

    def time_ms(self, launch, config, flush):
        self.running_while_tuning.append(tuning.tuning_running())
        self.current = self.timed
        launch(config)
        self.current = None
        return _fake_ms(config)


@pytest.fixture
def fresh_tuner(tmp_path, monkeypatch):
    """Autotuning and PyTorch's candidate on, nothing tuned or remembered, the cache under ``tmp_path``."""
    for name, empty in (("_memory", {}), ("_loaded", set()), ("_unwritable", set())):
        monkeypatch.setattr(config_cache, name, empty)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_rankings", {})
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    for name in ("KERNL_AUTOTUNE", "KERNL_TORCH_CANDIDATE", "KERNL_TUNING_NEIGHBOURS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gpu(fresh_tuner, monkeypatch):
    """A stand-in GPU (see the module docstring)."""
    stand_in = StandInGpu()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(tuning, "sm_count", lambda index: SMS)
    monkeypatch.setattr(tuning, "gpu_name", lambda device: GPU)
    monkeypatch.setattr(tuning, "_l2_flush", lambda device: None)
    monkeypatch.setattr(tuning, "precompiled", stand_in.precompiled)
    monkeypatch.setattr(tuning, "_time_ms", stand_in.time_ms)
    return stand_in


def _triton(configs: list[Config]) -> list[Config]:
    return [c for c in configs if c != TORCH]


def _fastest(configs: list[Config]) -> Config:
    return min(configs, key=_fake_ms)


def test_inside_the_block_a_miss_runs_pytorchs_candidate_and_is_not_remembered(gpu):
    with tuning.deferred_tuning():
        assert tuning.choose(FFN_UP, DEVICE, gpu.launch("up")) == TORCH
        assert tuning.choose(FFN_UP, DEVICE, gpu.launch("up again")) == TORCH
        assert gpu.ran == [] and gpu.pools == [], "nothing compiled or timed inside the block"
        assert (FFN_UP, DEVICE) not in tuning._chosen
        assert config_cache.lookup(tuning.cache_key(FFN_UP, GPU), cache_path(GPU)) is None
    assert len(gpu.pools) == 1
    assert {name for name, _ in gpu.timed} == {"up"}, "the first launch is the one timed"


def test_at_the_end_every_problem_is_compiled_in_one_pool_then_timed_once(gpu, tmp_path):
    same_bucket = replace(FFN_UP, m=1000)  # same cache key as FFN_UP: one tuning
    tuned_before = tuning.tuning_seconds()
    with tuning.deferred_tuning():
        for name, problem in (("up", FFN_UP), ("down", FFN_DOWN), ("pooler", POOLER), ("up'", same_bucket)):
            assert tuning.choose(problem, DEVICE, gpu.launch(name)) == TORCH
    lists = {name: candidates(p, SMS) for name, p in (("up", FFN_UP), ("down", FFN_DOWN), ("pooler", POOLER))}
    assert len(gpu.pools) == 1, "one thread pool for the whole block"
    assert gpu.pools[0] == [(name, c) for name, configs in lists.items() for c in _triton(configs)]
    assert gpu.timed == [(name, c) for name, configs in lists.items() for c in configs]
    assert all(gpu.running_while_tuning), "compilations and timings count as tuning (warmup_clock)"
    assert tuning.tuning_seconds() > tuned_before
    stored = read_cache(tmp_path / f"matmul-{GPU}.json")
    for name, problem in (("up", FFN_UP), ("down", FFN_DOWN), ("pooler", POOLER)):
        best = _fastest(lists[name])
        assert tuning._chosen[(problem, DEVICE)] == best
        assert stored[tuning.cache_key(problem, GPU)] == best
        assert tuning._rankings[tuning.cache_key(problem, GPU)][0] == best
    assert tuning.choose(same_bucket, DEVICE, gpu.launch("up'")) == _fastest(lists["up"])
    assert len(gpu.pools) == 1, "after the block, a remembered problem tunes no more"


def test_a_neighbouring_class_tuned_before_the_block_lends_its_best(gpu):
    tuning._rankings[tuning.cache_key(replace(FFN_UP, m=2048), GPU)] = _triton(candidates(FFN_UP, SMS))[::-1]
    with tuning.deferred_tuning():
        tuning.choose(FFN_UP, DEVICE, gpu.launch("up"))
    best = _triton(candidates(FFN_UP, SMS))[::-1][:NEIGHBOUR_BEST]
    assert gpu.timed == [("up", fitted(FFN_UP, c, SMS)) for c in best] + [("up", TORCH)]


def test_a_neighbour_met_earlier_in_the_block_is_tuned_first_and_lends_its_best(gpu):
    wider = replace(FFN_UP, m=4096)  # two powers of two away: a neighbour
    with tuning.deferred_tuning():
        for name, problem in (("up", FFN_UP), ("wider", wider), ("down", FFN_DOWN)):
            tuning.choose(problem, DEVICE, gpu.launch(name))
    assert [sorted({name for name, _ in pool}) for pool in gpu.pools] == [["down", "up"], ["wider"]]
    ranked = sorted(_triton(candidates(FFN_UP, SMS)), key=_fake_ms)
    timed_wider = [c for name, c in gpu.timed if name == "wider"]
    assert timed_wider == [fitted(wider, c, SMS) for c in ranked[:NEIGHBOUR_BEST]] + [TORCH]


def test_a_block_that_raises_tunes_nothing_and_the_next_launch_tunes(gpu):
    with pytest.raises(RuntimeError, match="the run failed"), tuning.deferred_tuning():
        tuning.choose(FFN_UP, DEVICE, gpu.launch("up"))
        raise RuntimeError("the run failed")
    assert gpu.pools == [] and gpu.timed == [] and tuning._chosen == {}
    assert tuning.choose(FFN_UP, DEVICE, gpu.launch("up")) == _fastest(candidates(FFN_UP, SMS))
    assert len(gpu.pools) == 1


def test_an_inner_block_tunes_at_its_end_and_the_outer_only_what_is_left(gpu):
    with tuning.deferred_tuning():
        tuning.choose(FFN_UP, DEVICE, gpu.launch("up"))
        with tuning.deferred_tuning():
            assert tuning.choose(FFN_DOWN, DEVICE, gpu.launch("down")) == TORCH
            assert tuning.choose(FFN_UP, DEVICE, gpu.launch("up (inner)")) == TORCH
        assert {name for name, _ in gpu.timed} == {"down", "up (inner)"}, "tuned when the inner block ends"
        assert tuning.choose(FFN_DOWN, DEVICE, gpu.launch("down")) == _fastest(candidates(FFN_DOWN, SMS))
    assert len(gpu.pools) == 1, "the outer block's problem was tuned by the inner block"


def test_problems_pytorch_cannot_stand_in_for_tune_at_once_inside_the_block(gpu, monkeypatch):
    fp32 = replace(FFN_DOWN, dtype=torch.float32, tma=False)
    with tuning.deferred_tuning():
        assert tuning.choose(fp32, DEVICE, gpu.launch("fp32")) == _fastest(candidates(fp32, SMS))
        assert len(gpu.pools) == 1
        monkeypatch.setenv("KERNL_TORCH_CANDIDATE", "0")
        assert tuning.choose(FFN_UP, DEVICE, gpu.launch("up")) == _fastest(candidates(FFN_UP, SMS))
        assert len(gpu.pools) == 2


def test_a_remembered_problem_uses_its_config_inside_the_block(gpu):
    chosen = Config(block_m=64, block_n=64, block_k=64)
    config_cache.cached_choice(tuning.cache_key(FFN_UP, GPU), cache_path(GPU), lambda: chosen)
    with tuning.deferred_tuning():
        assert tuning.choose(FFN_UP, DEVICE, gpu.launch("up")) == chosen
    assert gpu.pools == [] and gpu.timed == []


def test_outside_a_block_a_miss_compiles_and_times_its_own_candidates_at_once(gpu):
    assert tuning.choose(FFN_UP, DEVICE, gpu.launch("up")) == _fastest(candidates(FFN_UP, SMS))
    assert gpu.pools == [[("up", c) for c in _triton(candidates(FFN_UP, SMS))]]


@pytest.mark.skipif(not on_gpu(), reason="tuning needs the GPU")
def test_on_the_gpu_a_block_runs_cublas_then_tunes_both_problems_with_one_pool(
    fresh_tuner, tmp_path, monkeypatch
):
    pools = []
    real_precompiled = tuning.precompiled
    monkeypatch.setattr(
        tuning, "precompiled", lambda calls: (pools.append(len(calls)), real_precompiled(calls))
    )
    x = make_tensor((1, 200, 768), torch.float16, ValueSpec(21, 1.0, 0.0))
    w_up = make_tensor((1, 3 * 257, 768), torch.float16, ValueSpec(22, 768**-0.5, 0.0)).transpose(1, 2)
    w_down = make_tensor((1, 384, 3 * 257), torch.float16, ValueSpec(23, 771**-0.5, 0.0)).transpose(1, 2)

    def forward():
        h = gemm(x, w_up, activation="gelu")
        return h, gemm(h, w_down)

    def check(outputs):
        h, out = outputs
        expected_h = torch.nn.functional.gelu(x[0].double() @ w_up[0].double())
        assert_matches_reference(h[0], expected_h, torch.nn.functional.gelu(x[0] @ w_up[0]))
        expected = h[0].double() @ w_down[0].double()
        assert_matches_reference(out[0], expected, h[0] @ w_down[0])

    with tuning.recorded_choices() as ran, tuning.deferred_tuning():
        check(forward())
        assert pools == [], "nothing tuned inside the block"
    assert ran == [TORCH, TORCH]
    assert len(pools) == 1, "both problems' candidates compiled in one pool"
    stored = read_cache(tmp_path / f"matmul-{tuning.gpu_name(x.device)}.json")
    assert len(stored) == 2
    with tuning.recorded_choices() as ran:
        check(forward())
    assert sorted(map(str, ran)) == sorted(map(str, stored.values())), "then each runs its tuned config"
    assert len(pools) == 1
