"""The config cache: stored on disk per GPU, survives a process restart, tolerates a bad file."""

import json
import multiprocessing
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kernl.matmul import Config, config_cache, gemm, matmul, matmul_reference, tuning
from kernl.matmul.config_cache import TORCH, cache_path, cached_choice, read_cache, write_cache
from kernl.matmul.tuning import Problem, candidates
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor, on_gpu

PROBLEM = Problem(
    batch=1,
    m=16,
    n=3072,
    k=768,
    dtype=torch.float16,
    precision="tf32",
    a_k_contiguous=True,
    b_k_contiguous=True,
    gated=False,
)


def _restart(monkeypatch):
    """Forget everything held in memory, as a new process would."""
    monkeypatch.setattr(config_cache, "_memory", {})
    monkeypatch.setattr(config_cache, "_loaded", set())
    monkeypatch.setattr(config_cache, "_unwritable", set())


@pytest.fixture
def fresh_autotuner(tmp_path, monkeypatch):
    """Autotuning on, nothing chosen or cached in memory, the cache file under ``tmp_path``."""
    _restart(monkeypatch)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_rankings", {})  # no neighbouring class tuned: the full candidate list
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KERNL_AUTOTUNE", raising=False)


def test_key_buckets_m_and_batch_but_keeps_n_and_k():
    assert PROBLEM.key("h100") == replace(PROBLEM, m=9).key("h100")
    assert PROBLEM.key("h100") != replace(PROBLEM, m=17).key("h100")
    assert PROBLEM.key("h100") != replace(PROBLEM, k=769).key("h100")
    assert PROBLEM.key("h100") != replace(PROBLEM, dtype=torch.bfloat16).key("h100")
    assert PROBLEM.key("h100") != PROBLEM.key("a100")


def test_pytorchs_candidate_can_be_left_out_and_its_absence_is_cached_apart(monkeypatch):
    monkeypatch.delenv("KERNL_TORCH_CANDIDATE", raising=False)
    assert candidates(PROBLEM, 132)[-1] == TORCH
    with_torch = tuning.cache_key(PROBLEM, "h100")
    monkeypatch.setenv("KERNL_TORCH_CANDIDATE", "off")
    assert TORCH not in candidates(PROBLEM, 132)
    assert tuning.cache_key(PROBLEM, "h100") != with_torch


def test_key_tells_a_bias_apart():
    """PyTorch's candidate fuses a bias into cuBLASLt's epilogue: a choice made with one may not hold without."""
    assert PROBLEM.key("h100") != replace(PROBLEM, bias=True).key("h100")


def test_key_and_candidates_account_for_the_residual_epilogue():
    """A config tuned without a residual must not be reused with one (it may not fit in shared memory)."""
    plain = replace(PROBLEM, m=4096, n=768, tma=True)
    with_residual = replace(plain, residual=True)
    assert plain.key("h100") != with_residual.key("h100")
    for config in candidates(with_residual, 132)[:-1]:  # the Triton tiles (the last is PyTorch's)
        assert tuning._smem_bytes(with_residual, config) <= tuning.SHARED_MEMORY_BUDGET
    wide = [c for c in candidates(with_residual, 132) if c.kernel == "tma" and c.block_n == 256]
    assert wide and all(c.epilogue_parts > 1 for c in wide)  # it fits with the epilogue in parts


def test_cache_path_follows_kernl_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    assert cache_path("nvidia-h100") == tmp_path / "matmul-nvidia-h100.json"
    monkeypatch.setenv("KERNL_CACHE_DIR", "~/kernl-cache")  # as a shell would not expand it in quotes
    assert cache_path("gpu") == Path.home() / "kernl-cache" / "matmul-gpu.json"


def test_tuned_choice_is_written_and_reused_after_a_restart(tmp_path, monkeypatch):
    _restart(monkeypatch)
    path = tmp_path / "matmul-gpu.json"
    calls = []

    def tune():
        calls.append(1)
        return Config(block_m=16, block_n=64, block_k=128, split_k=6)

    key = PROBLEM.key("gpu")
    assert cached_choice(key, path, tune) == Config(block_m=16, block_n=64, block_k=128, split_k=6)
    assert cached_choice(key, path, tune) == Config(block_m=16, block_n=64, block_k=128, split_k=6)
    assert len(calls) == 1, "a remembered config must not be tuned again"
    assert json.loads(path.read_text())[key]["split_k"] == 6
    _restart(monkeypatch)
    assert cached_choice(key, path, tune) == Config(block_m=16, block_n=64, block_k=128, split_k=6)
    assert len(calls) == 1, "the on-disk cache must survive a restart"


def test_writes_merge_with_entries_from_other_processes(tmp_path):
    path = tmp_path / "sub" / "matmul-gpu.json"
    write_cache(path, "a", Config(block_m=16, block_n=32, block_k=64))
    write_cache(path, "b", Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4))
    assert read_cache(path) == {
        "a": Config(block_m=16, block_n=32, block_k=64),
        "b": Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4),
    }
    assert not list(path.parent.glob("*.tmp")), "no temporary file is left behind"
    assert path.stat().st_mode & 0o777 == 0o644, "readable by the user's other processes"


def test_pytorchs_candidate_is_stored_and_read_back(tmp_path, monkeypatch):
    _restart(monkeypatch)
    path = tmp_path / "matmul-gpu.json"
    assert cached_choice("k", path, lambda: TORCH) == TORCH
    assert json.loads(path.read_text())["k"]["kernel"] == "torch"
    _restart(monkeypatch)
    assert read_cache(path) == {"k": TORCH}
    assert cached_choice("k", path, lambda: Config(block_m=32, block_n=32, block_k=32)) == TORCH


def test_a_corrupt_or_foreign_cache_file_counts_as_empty(tmp_path, monkeypatch):
    _restart(monkeypatch)
    path = tmp_path / "matmul-gpu.json"
    path.write_text("{not json")
    assert read_cache(path) == {}
    path.write_text(json.dumps({"k": {"unknown_field": 1}}))
    assert read_cache(path) == {}
    assert cached_choice("k", path, lambda: Config(block_m=32, block_n=32, block_k=32)) == Config(
        block_m=32, block_n=32, block_k=32
    )
    assert read_cache(path) == {"k": Config(block_m=32, block_n=32, block_k=32)}


@pytest.mark.parametrize("contents", ["[]", "null", "42", '"text"'])
def test_a_cache_file_that_is_not_a_table_counts_as_empty(tmp_path, contents):
    path = tmp_path / "matmul-gpu.json"
    path.write_text(contents)
    assert read_cache(path) == {}
    write_cache(path, "k", Config(block_m=32, block_n=32, block_k=32))
    assert read_cache(path) == {"k": Config(block_m=32, block_n=32, block_k=32)}


def test_bad_entries_are_skipped_and_kept_and_good_ones_survive(tmp_path):
    path = tmp_path / "matmul-gpu.json"
    good = {"block_m": 64, "block_n": 64, "block_k": 32}
    bad = {
        "strings": {"block_m": "x", "block_n": 0, "block_k": None},
        "not a power of two": {"block_m": 48, "block_n": 64, "block_k": 32},
        "unknown kernel": {**good, "kernel": "cuda"},
        "newer version": {**good, "swizzle": 2},
        "warps not a power of two": {**good, "num_warps": 3},
        "tile too small for a dot": {**good, "block_m": 1},
        "tile too large": {**good, "block_m": 2**30},
        "split-K in the TMA kernel": {**good, "kernel": "tma", "split_k": 4},
        "epilogue in thirds": {**good, "kernel": "tma", "epilogue_parts": 3},
        "epilogue blocks under 16 wide": {**good, "block_n": 32, "kernel": "tma", "epilogue_parts": 4},
        "epilogue parts in the pointer kernel": {**good, "epilogue_parts": 2},
        "PyTorch's candidate with a tile": {**good, "kernel": "torch"},
        "PyTorch's candidate with split-K": {"kernel": "torch", "split_k": 2},
    }
    path.write_text(json.dumps({"good": good, **bad}))
    assert read_cache(path) == {"good": Config(block_m=64, block_n=64, block_k=32)}
    write_cache(path, "mine", Config(block_m=16, block_n=32, block_k=64))
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {"good", "mine", *bad}, "a write keeps what it cannot read"


def test_an_unwritable_cache_warns_once_and_keeps_the_choice(tmp_path, monkeypatch):
    _restart(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "matmul-gpu.json"  # its directory would be a file: cannot be created
    with pytest.warns(UserWarning, match="cannot write the GEMM config cache"):
        assert cached_choice("k", path, lambda: Config(block_m=32, block_n=32, block_k=32)) == Config(
            block_m=32, block_n=32, block_k=32
        )
    assert cached_choice("k", path, lambda: Config(block_m=64, block_n=64, block_k=64)) == Config(
        block_m=32, block_n=32, block_k=32
    )  # remembered
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_cache(path, "other", Config(block_m=16, block_n=16, block_k=16))  # warned once per file already


def _write_many(path, prefix, count):
    for i in range(count):
        write_cache(path, f"{prefix}-{i}", Config(block_m=16, block_n=32, block_k=64, split_k=i + 1))


def test_concurrent_writers_lose_no_entry(tmp_path):
    path = tmp_path / "matmul-gpu.json"
    context = multiprocessing.get_context("spawn" if sys.platform != "linux" else "fork")
    writers = [context.Process(target=_write_many, args=(path, f"p{n}", 15)) for n in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert all(writer.exitcode == 0 for writer in writers)
    assert len(read_cache(path)) == 60


def test_cpu_and_interpreter_pick_by_heuristic_without_timing():
    def launch(config):
        raise AssertionError("no timing on the CPU")

    assert tuning.choose(PROBLEM, torch.device("cpu"), launch) == tuning.heuristic(PROBLEM)
    assert tuning.heuristic(PROBLEM).kernel != "torch", "untimed, the choice stays a Triton tile"


@pytest.mark.skipif(not on_gpu(), reason="timing needs the GPU")
def test_autotuning_on_the_gpu_times_candidates_and_stores_the_winner(tmp_path, fresh_autotuner):
    a = make_tensor((24, 768), torch.float16, ValueSpec(1, 1.0, 0.0))
    b = make_tensor((384, 768), torch.float16, ValueSpec(2, 0.05, 0.0)).t()
    out = matmul(a, b)
    assert_matches_reference(out, matmul_reference(a.double(), b.double()), torch.matmul(a, b))
    stored = read_cache(tmp_path / f"matmul-{tuning.gpu_name(a.device)}.json")
    assert len(stored) == 1
    problem = replace(PROBLEM, m=24, n=384, tma=True)
    assert next(iter(stored.values())) in candidates(problem, tuning.sm_count(0))


@pytest.mark.skipif(not on_gpu(), reason="timing needs the GPU")
def test_pytorchs_candidate_is_timed_in_a_cuda_graph_and_the_fastest_wins(
    tmp_path, monkeypatch, fresh_autotuner
):
    monkeypatch.delenv("KERNL_TORCH_CANDIDATE", raising=False)
    timings = {}
    real_time_ms = tuning._time_ms

    def recording(launch, config, flush):
        timings[config] = real_time_ms(launch, config, flush)
        return timings[config]

    monkeypatch.setattr(tuning, "_time_ms", recording)
    x = make_tensor((1, 40, 768), torch.float16, ValueSpec(3, 1.0, 0.0))
    w = make_tensor((1536, 768), torch.float16, ValueSpec(4, 768**-0.5, 0.0)).t()[None]
    bias = make_tensor((1536,), torch.float16, ValueSpec(5, 1.0, 0.0))
    out = gemm(x, w, bias=bias, activation="relu")
    expected = torch.relu(x[0].double() @ w[0].double() + bias.double())
    assert_matches_reference(out[0], expected, torch.relu(x[0] @ w[0] + bias))
    assert timings[TORCH] < float("inf"), "PyTorch's candidate failed to run or to be captured"
    (key, chosen), *_ = read_cache(tmp_path / f"matmul-{tuning.gpu_name(x.device)}.json").items()
    assert "|bias1|" in key and chosen == min(timings, key=timings.get)


def test_recorded_choices_lists_the_config_of_each_gemm_in_the_block():
    a = make_tensor((1, 8, 32), torch.float16, ValueSpec(6, 1.0, 0.0))
    b = make_tensor((1, 32, 16), torch.float16, ValueSpec(7, 1.0, 0.0))
    with tuning.recorded_choices() as configs:
        gemm(a, b)
        gemm(a, b, config=TORCH)  # a forced config is not the tuner's choice
        gemm(a, b, activation="relu")
    assert len(configs) == 2 and all(c.kernel != "torch" for c in configs)
    gemm(a, b)
    assert len(configs) == 2, "nothing is recorded after the block"
