"""On the GPU, a CUDA graph's first warm-up run defers its GEMM tunings to its end
(kernl.matmul.tuning.deferred_tuning): each problem is tuned once, all of one run's compiled in one
thread pool, and the graph replays the tuned configs with the same outputs. The CPU wiring test is in
test_capture.py."""

import pytest
import torch
from transformers import BertConfig, BertModel

from kernl.integration.cuda_graphs import CudaGraphs
from kernl.linear_act import linear_act
from kernl.matmul import config_cache, tuning
from kernl_testing import ValueSpec, assert_matches_reference, make_tensor, on_gpu

pytestmark = pytest.mark.skipif(not on_gpu(), reason="GEMM tuning and CUDA graphs need a GPU")


@pytest.fixture
def tunings(tmp_path, monkeypatch):
    """Nothing tuned or remembered (the cache under ``tmp_path``); yields the cache keys of each tuning
    call (one list per call of ``tuning._tune``) and the number of launches each thread pool compiled."""
    for name, empty in (("_memory", {}), ("_loaded", set()), ("_unwritable", set())):
        monkeypatch.setattr(config_cache, name, empty)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_rankings", {})
    monkeypatch.setenv("KERNL_CACHE_DIR", str(tmp_path))
    for name in ("KERNL_AUTOTUNE", "KERNL_TORCH_CANDIDATE"):
        monkeypatch.delenv(name, raising=False)
    calls, pools = [], []
    real_tune, real_precompiled = tuning._tune, tuning.precompiled

    def tune(problems):
        calls.append([untuned.key for untuned in problems])
        return real_tune(problems)

    def precompiled(launches):
        pools.append(len(launches))
        real_precompiled(launches)

    monkeypatch.setattr(tuning, "_tune", tune)
    monkeypatch.setattr(tuning, "precompiled", precompiled)
    return calls, pools


def _tuned_keys(calls: list[list[str]]) -> list[str]:
    return [key for call in calls for key in call]


def test_a_captured_function_tunes_each_gemm_once_in_one_pool_and_replays_the_choices(tunings):
    calls, pools = tunings
    w_up = make_tensor((3 * 257, 384), torch.float16, ValueSpec(32, 384**-0.5, 0.0))
    b_up = make_tensor((3 * 257,), torch.float16, ValueSpec(33, 1.0, 0.0))
    w_down = make_tensor((384, 3 * 257), torch.float16, ValueSpec(34, 771**-0.5, 0.0))

    def block(x):
        return linear_act(linear_act(x, w_up, b_up, "gelu"), w_down, residual=x)

    def reference(x, dtype=torch.float64):
        x, up, bias, down = (t.to(dtype) for t in (x, w_up, b_up, w_down))
        return torch.nn.functional.gelu(x @ up.T + bias) @ down.T + x

    graphs = CudaGraphs(block, lambda args, kwargs: args[0].shape, torch.cuda.graph_pool_handle())
    for seed in (1, 2):  # captured (warm-up, tuning, capture), then replayed
        x = make_tensor((300, 384), torch.float16, ValueSpec(seed, 1.0, 0.0))
        assert_matches_reference(graphs(x), reference(x), reference(x, torch.float16))
    assert len(calls) == 1 and len(_tuned_keys(calls)) == 2, "both problems tuned together, once"
    assert len(pools) == 1
    with tuning.recorded_choices() as ran:
        block(x)
    assert ran == [config_cache._memory[key] for key in calls[0]], "the tuned configs run after the warm-up"


def test_a_tiny_bert_matches_hugging_face_and_tunes_each_problem_once(kit, tunings):
    calls, pools = tunings
    model = kit.build(BertModel, kit.tiny_config(BertConfig))
    ids, mask = kit.padded_batch(3, 40, [40, 7, 23], vocab=120)
    calls_in = [
        dict(input_ids=ids, attention_mask=mask),
        dict(input_ids=ids[:2, :17], attention_mask=mask[:2, :17]),
    ]
    report = kit.compare_with_reference(
        model, torch.float16, calls_in, ["last_hidden_state", "pooler_output"]
    )
    keys = _tuned_keys(calls)
    assert keys and len(keys) == len(set(keys)), f"a problem tuned twice: {keys}"
    assert len(pools) == len(calls) and max(len(call) for call in calls) > 1, (
        "a warm-up's problems tune together"
    )
    assert any(record.matmul_tuning_s > 0 for record in report.warmups), str(report)
