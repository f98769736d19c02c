"""Compile keys name what a launch compiles, and the tuner's candidates over a token-bucket ladder stay few."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kernl.matmul import Config, gemm, launch, tuning
from kernl.matmul.compile_keys import compile_key, in_guess_order, tuned_compile_keys
from kernl.matmul.tuning import NEIGHBOUR_BEST, Problem

_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "count_compile_keys.py"
_spec = importlib.util.spec_from_file_location("count_compile_keys", _SCRIPT)
count_compile_keys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(count_compile_keys)

LADDER = (16, 32, 48, 64, 96, 128, 176, 240, 336, 464, 656, 912, 1280, 1792, 2496)
# Before neighbour reuse, tuning Bert-base's GEMMs over these buckets compiled 169 kernels (167 in the
# stream's order); with it, 88 and 84 when each neighbour's ranking is its guess order
MAX_KERNELS = 100


class Recorder:
    """Stands for ``launch_kernel``: keeps the kernel's name and keyword arguments, runs nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel, grid, *args, **kwargs):
        self.calls.append((kernel.fn.__name__, kwargs))


LAUNCH_OPTIONS = ("launch_pdl",)  # launch attributes, not compiled in


@pytest.mark.parametrize(
    ("rows", "config", "residual", "activation"),
    [
        (24, Config(block_m=32, block_n=64, block_k=64, split_k=4, num_stages=4), True, "none"),
        (24, Config(block_m=32, block_n=64, block_k=128, split_k=1, num_stages=4), False, "gelu"),
        (300, Config(block_m=64, block_n=32, block_k=64, num_warps=8), True, "gelu"),
        (300, Config(kernel="tma", block_m=64, block_n=64, block_k=64, occupancy=2), True, "none"),
        (40, Config(kernel="tma", block_m=64, block_n=64, block_k=32, epilogue_parts=2), False, "relu"),
    ],
)
def test_compile_key_is_what_the_launch_passes(monkeypatch, rows, config, residual, activation):
    recorder = Recorder()
    monkeypatch.setattr(launch, "launch_kernel", recorder)
    monkeypatch.setattr(launch, "programmatic_launch", lambda device: True)
    monkeypatch.setattr(tuning, "sm_count", lambda index: 132)
    n, k = 96, 192
    x = torch.zeros(1, rows, k, dtype=torch.float16)
    w = torch.zeros(n, k, dtype=torch.float16).t()[None]
    bias = torch.zeros(n, dtype=torch.float16)
    r = torch.zeros(rows, n, dtype=torch.float16) if residual else None
    gemm(x, w, bias=bias, residual=r, activation=activation, config=config)
    (name, passed), *_ = recorder.calls
    problem = Problem(
        batch=1, m=rows, n=n, k=k, dtype=torch.float16, precision="tf32", a_k_contiguous=True,
        b_k_contiguous=True, gated=False, tma=config.kernel == "tma", activation=activation,
        residual=residual, bias=True,
    )  # fmt: skip
    key = compile_key(problem, config, 132)
    expected = dict(key.constants)
    assert name == key.kernel
    compiled = {name: value for name, value in passed.items() if name.isupper() or name.startswith("num_")}
    if config.kernel == "tma":  # the interpreter runs a few programs; a GPU one per SM and occupancy
        assert expected.pop("NUM_PROGRAMS") == 132 * config.occupancy
        compiled.pop("NUM_PROGRAMS")
    else:  # argument classes, not constexprs: noted in the key so that layouts stay apart
        assert (expected.pop("A_K_CONTIGUOUS"), expected.pop("B_K_CONTIGUOUS")) == (True, True)
    assert compiled == expected
    assert not set(passed) - set(compiled) - set(LAUNCH_OPTIONS) - {"NUM_PROGRAMS"}


def test_the_split_factor_is_no_part_of_a_compile_key_but_splitting_is():
    (problem,) = count_compile_keys.bert_problems(16)[:1]
    tile = Config(block_m=16, block_n=64, block_k=128, num_stages=4)
    assert compile_key(problem, replace(tile, split_k=3), 132) == compile_key(
        problem, replace(tile, split_k=6), 132
    )
    assert compile_key(problem, replace(tile, split_k=3), 132) != compile_key(problem, tile, 132)
    assert compile_key(problem, Config(kernel="torch"), 132) is None


@pytest.mark.parametrize("order", [LADDER, count_compile_keys.STREAM_ORDER])
def test_tuning_bert_base_over_the_bucket_ladder_compiles_few_kernels(monkeypatch, order):
    monkeypatch.delenv("KERNL_TUNING_NEIGHBOURS", raising=False)
    problems = [p for m in order for p in count_compile_keys.bert_problems(m)]

    def reversed_guesses(problem, configs):  # the worst ranking for reuse: the last guesses fastest
        return in_guess_order(problem, configs)[::-1]

    for rank in (in_guess_order, reversed_guesses):
        per_problem = tuned_compile_keys(problems, 132, rank)
        assert len(set().union(*per_problem)) <= MAX_KERNELS
    counted = count_compile_keys.count(order)
    assert counted["tunings"] == 36  # one per M class (9) and projection (4): the cache keys are unchanged
    assert counted["distinct_compile_keys"] <= MAX_KERNELS


def test_a_reused_tuning_compiles_at_most_the_neighbours_best(monkeypatch):
    monkeypatch.delenv("KERNL_TUNING_NEIGHBOURS", raising=False)
    problems = [count_compile_keys.bert_problems(m)[2] for m in (1792, 912, 336, 64, 32, 16)]
    first, *reused = tuned_compile_keys(problems, 132)
    assert len(first) > NEIGHBOUR_BEST
    small_m_start = 2  # 64 tokens: the small-M regime starts afresh, 32 and 16 reuse it
    assert [len(keys) <= NEIGHBOUR_BEST for keys in reused] == [True, True, False, True, True]
    assert len(reused[small_m_start]) > NEIGHBOUR_BEST


def test_without_neighbour_reuse_every_class_compiles_its_full_list(monkeypatch):
    monkeypatch.setenv("KERNL_TUNING_NEIGHBOURS", "0")
    counted = count_compile_keys.count(LADDER)
    assert counted["distinct_compile_keys"] > 150
