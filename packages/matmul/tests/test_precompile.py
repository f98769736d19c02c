"""A tuning's candidates are compiled side by side before they are timed, and the choice is unchanged."""

from functools import partial

import pytest
import torch
from triton.runtime import jit

from kernl.matmul import config_cache, gemm, precompile, tuning
from kernl.matmul.config_cache import TORCH
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor, on_gpu

pytestmark = pytest.mark.skipif(
    precompile.AsyncCompileMode is None, reason="this Triton has no AsyncCompileMode"
)


class RecordingKernel:
    """Stands for a Triton kernel: records whether it was launched or only compiled (``warmup``)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("launch", grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime._async_compile import active_mode

        self.calls.append(("warmup", grid, args, {**kwargs, "async": active_mode.get() is not None}))


def test_launches_inside_precompiled_only_compile_and_run_in_the_async_mode():
    kernel = RecordingKernel()

    def launch(config):
        precompile.launch_kernel(kernel, (config, 1), "a", BLOCK=config)

    precompile.precompiled([partial(launch, c) for c in (16, 32, 64)])
    launch(128)
    assert kernel.calls == [
        ("warmup", (16, 1), ("a",), {"BLOCK": 16, "async": True}),
        ("warmup", (32, 1), ("a",), {"BLOCK": 32, "async": True}),
        ("warmup", (64, 1), ("a",), {"BLOCK": 64, "async": True}),
        ("launch", (128, 1), ("a",), {"BLOCK": 128}),
    ]


def test_a_config_whose_launch_raises_is_left_to_the_timing():
    kernel = RecordingKernel()

    def launch(config):
        if config == 32:
            raise ValueError("this config cannot run this problem")
        precompile.launch_kernel(kernel, (config,), BLOCK=config)

    precompile.precompiled([partial(launch, c) for c in (16, 32, 64)])
    assert [call[1] for call in kernel.calls] == [(16,), (64,)]


def test_inside_the_callers_own_async_mode_nothing_is_compiled_ahead():
    import concurrent.futures

    kernel = RecordingKernel()

    def launch(config):
        precompile.launch_kernel(kernel, (config,), BLOCK=config)

    with concurrent.futures.ThreadPoolExecutor(1) as pool, precompile.AsyncCompileMode(pool):
        precompile.precompiled([partial(launch, 16), partial(launch, 32)])
    assert kernel.calls == []


def test_launches_of_several_problems_compile_in_one_pool(monkeypatch):
    kernels = {"qkv": RecordingKernel(), "ffn": RecordingKernel()}
    pools = []
    real_pool = precompile.concurrent.futures.ThreadPoolExecutor

    def counting_pool(*args, **kwargs):
        pools.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(precompile.concurrent.futures, "ThreadPoolExecutor", counting_pool)

    def launch(problem, config):
        precompile.launch_kernel(kernels[problem], (config,), BLOCK=config)

    precompile.precompiled([partial(launch, p, c) for p in ("qkv", "ffn") for c in (16, 32)])
    assert len(pools) == 1
    for kernel in kernels.values():
        assert [(call[0], call[1], call[3]["async"]) for call in kernel.calls] == [
            ("warmup", (16,), True),
            ("warmup", (32,), True),
        ]


@pytest.mark.skipif(not on_gpu(), reason="tuning needs the GPU")
def test_tuning_finds_every_triton_candidate_compiled_and_still_picks_the_fastest(tmp_path, monkeypatch):
    for name, empty in (("_memory", {}), ("_loaded", set()), ("_unwritable", set())):
        monkeypatch.setattr(config_cache, name, empty)  # nothing remembered: this call tunes
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_rankings", {})  # no neighbouring class tuned: the full candidate list
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KERNL_AUTOTUNE", raising=False)
    phase, compiles, timings = ["before"], {"precompile": 0, "timing": 0}, {}
    real_compile, real_precompiled, real_time_ms = (
        jit.JITFunction._do_compile,
        tuning.precompiled,
        tuning._time_ms,
    )

    def counting_compile(self, *args, **kwargs):
        compiles[phase[0]] = compiles.get(phase[0], 0) + 1
        return real_compile(self, *args, **kwargs)

    def marking_precompiled(calls):
        phase[0] = "precompile"
        real_precompiled(calls)
        phase[0] = "timing"

    def recording(launch, config, flush):
        timings[config] = real_time_ms(launch, config, flush)
        return timings[config]

    monkeypatch.setattr(jit.JITFunction, "_do_compile", counting_compile)
    monkeypatch.setattr(tuning, "precompiled", marking_precompiled)
    monkeypatch.setattr(tuning, "_time_ms", recording)
    x = make_tensor((1, 200, 768), torch.float16, ValueSpec(11, 1.0, 0.0))
    w = make_tensor((1, 3 * 257, 768), torch.float16, ValueSpec(12, 768**-0.5, 0.0)).transpose(1, 2)
    out = gemm(x, w, activation="gelu")
    expected = torch.nn.functional.gelu(x[0].double() @ w[0].double())
    assert_matches_reference(out[0], expected, torch.nn.functional.gelu(x[0] @ w[0]))
    assert timings, "the call did not tune"
    triton_configs = [c for c in timings if c != TORCH]
    assert compiles["precompile"] >= len(triton_configs) - sum(
        timings[c] == float("inf") for c in triton_configs
    )
    assert compiles["timing"] == 0, f"{compiles['timing']} candidates compiled while timed"
    chosen = tuning._chosen[next(iter(tuning._chosen))]
    assert chosen == min(timings, key=timings.get)
