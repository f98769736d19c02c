"""The L2 prefetch of the weight before the programmatic-launch wait: when a launch uses it, and that
it changes no result (bit for bit against the same launches without it, and against the reference)."""

import pytest
import torch

from kernl.linear_act import gated_linear_act, linear_act
from kernl.linear_act.reference import gated_linear_act_reference, linear_act_reference
from kernl.matmul import launch
from kernl_testing import ValueSpec, assert_matches_reference, float_dtypes, make_tensor, on_gpu


def test_prefetch_needs_programmatic_launch_a_weight_like_b_and_few_tiles(monkeypatch):
    monkeypatch.delenv("KERNL_PREFETCH", raising=False)
    sms = 132
    assert launch.prefetch_weights(True, True, 264, sms)
    assert not launch.prefetch_weights(True, True, 265, sms)  # over two tiles a multiprocessor
    assert not launch.prefetch_weights(False, True, 1, sms)  # no programmatic launch: nothing to overlap
    assert not launch.prefetch_weights(True, False, 1, sms)  # B not one K-contiguous matrix: not a weight
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv("KERNL_PREFETCH", off)
        assert not launch.prefetch_weights(True, True, 1, sms)


def _hopper() -> bool:
    return on_gpu() and torch.cuda.get_device_capability()[0] >= 9


def _decoder_like_chain(x, w_in, bias, w0, w1, w_out):
    """Four dependent GEMMs, as in a transformer layer: each one's input is the previous one's output."""
    h = linear_act(x, w_in, bias, activation="gelu")
    g = gated_linear_act(h, w0, w1, "gelu_tanh")
    return linear_act(g, w_out, residual=h), h, g


@pytest.mark.skipif(not _hopper(), reason="the prefetch runs with programmatic launch: Hopper GPUs only")
@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize("m", [1, 13, 256])  # pointer kernel with split-K, and a few-tile TMA problem
def test_prefetched_launches_give_the_same_bits(m, dtype, monkeypatch):
    k, n, f = 768, 512, 1536
    x = make_tensor((m, k), dtype, ValueSpec(1, 1.0, 0.0))
    w_in = make_tensor((n, k), dtype, ValueSpec(2, k**-0.5, 0.0))
    bias = make_tensor((n,), dtype, ValueSpec(3, 1.0, 0.0))
    w0 = make_tensor((f, n), dtype, ValueSpec(4, n**-0.5, 0.0))
    w1 = make_tensor((f, n), dtype, ValueSpec(5, n**-0.5, 0.0))
    w_out = make_tensor((n, f), dtype, ValueSpec(6, f**-0.5, 0.0))
    monkeypatch.delenv("KERNL_PREFETCH", raising=False)
    monkeypatch.setenv("KERNL_AUTOTUNE", "0")  # one launch a GEMM (no candidates timed)
    decisions = []  # every launch's choice: the chain must have prefetched somewhere to test anything
    rule = launch.prefetch_weights
    monkeypatch.setattr(
        launch, "prefetch_weights", lambda *args: decisions.append(rule(*args)) or decisions[-1]
    )
    out, h, g = _decoder_like_chain(x, w_in, bias, w0, w1, w_out)
    assert len(decisions) == 3 and all(decisions)
    monkeypatch.setenv("KERNL_PREFETCH", "0")
    expected, _, _ = _decoder_like_chain(x, w_in, bias, w0, w1, w_out)
    assert torch.equal(out, expected)
    # and each step is right on its own input
    wide = torch.float64
    h_ref = linear_act_reference(x.to(wide), w_in.to(wide), bias.to(wide), "gelu")
    assert_matches_reference(h, h_ref, None, scale=k**0.5 / 4)  # rounding error grows like sqrt(K)
    g_ref = gated_linear_act_reference(h.to(wide), w0.to(wide), w1.to(wide), "gelu_tanh")
    assert_matches_reference(g, g_ref, None, scale=n**0.5 / 4)
    out_ref = linear_act_reference(g.to(wide), w_out.to(wide), residual=h.to(wide))
    assert_matches_reference(out, out_ref, None, scale=f**0.5 / 4)
