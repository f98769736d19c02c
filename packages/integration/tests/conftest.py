"""Fixtures for the integration tests: tiny Bert-family models and the reference comparison."""

import copy
from types import SimpleNamespace

import pytest
import torch

from kernl.integration import optimize_model
from kernl_testing import assert_matches_reference, on_gpu

DEVICE = "cuda" if on_gpu() else "cpu"


@pytest.fixture(autouse=True)
def kernl_path_always(monkeypatch):
    """Tests check kernl's own outputs: the never-slower check (which may hand a signature to PyTorch on a
    GPU) is off, except in test_speed_check.py, which tests it."""
    monkeypatch.setenv("KERNL_CHECK_SPEED", "0")


def tiny_config(config_class, **overrides):
    """2 layers, hidden 64, 4 heads (head_dim 16): the CPU interpreter runs a forward in seconds."""
    settings = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=120,
        max_position_embeddings=128,
    )
    return config_class(**{**settings, **overrides})


def padded_batch(batch: int, length: int, lengths, vocab: int, seed: int = 0):
    """``input_ids`` and an ``attention_mask`` with each row's real length from ``lengths`` (right padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
    return ids, mask


def build(model_class, config, attn_implementation="sdpa"):
    """A randomly initialised model in eval mode (CPU, fp32), seeded."""
    torch.manual_seed(0)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


def real_tokens(inputs: dict) -> torch.Tensor | None:
    """bool ``(B, S)``: the tokens the call's ``attention_mask`` keeps (None without a 2-D mask)."""
    mask = inputs.get("attention_mask")
    return None if mask is None or mask.dim() != 2 else mask.cpu() != 0


def _real_positions(output: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """A per-token output ``(B, S, ...)`` at the real tokens only (masked positions hold no defined value:
    Hugging Face computes something there, packed execution zeros); any other output as it is."""
    if real is None or output.dim() < 2 or tuple(output.shape[:2]) != tuple(real.shape):
        return output
    return output[real.to(output.device)]


def compare_with_reference(model, dtype, calls, fields, scale=1.0, aggregate_fields=(), packed=True):
    """Optimize a copy of ``model`` in ``dtype`` on the test device and check every call's ``fields``.

    Reference: the same model in fp64 on CPU; peer: plain HF in ``dtype`` on the device. Each call is a
    dict of inputs (CPU tensors). Returns the optimization report. ``scale`` > 1 widens the per-element
    tolerance for outputs that compound many layers' rounding; then the mean error must also be no
    worse than 1.25x the peer's, so the looser bound cannot hide a systematic error.
    ``aggregate_fields`` (e.g. logits, whose near-zero entries carry the absolute error of a long sum)
    are held to the peer in mean (1.25x) and maximum (2x) error only. Per-token outputs are compared at
    the real tokens of the call's ``attention_mask``.
    """
    reference = copy.deepcopy(model).double()
    peer = copy.deepcopy(model).to(DEVICE, dtype)
    optimized = copy.deepcopy(model).to(DEVICE, dtype)
    report = optimize_model(optimized, packed=packed)
    for inputs in calls:
        on_device = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.inference_mode():
            expected = reference(**inputs)
            same_dtype = peer(**on_device)
            actual = optimized(**on_device)
        real = real_tokens(inputs)

        def pick(output, field, real=real):
            return _real_positions(output[field], real)

        for field in fields:
            assert_matches_reference(
                pick(actual, field), pick(expected, field), pick(same_dtype, field), name=field, scale=scale
            )
        for field in (list(fields) if scale > 1 else []) + list(aggregate_fields):
            ours, hf = (
                (pick(t, field).detach().cpu().double() - pick(expected, field)).abs()
                for t in (actual, same_dtype)
            )
            assert ours.mean() <= 1.25 * hf.mean() + 1e-7, (
                f"{field}: mean error {ours.mean():.3g}, HF's {hf.mean():.3g}"
            )
            if field in aggregate_fields:
                # a few fp32 ulps at the output's scale: every kernel accumulates in fp32, and in an fp32
                # model HF's own maximum error over the real tokens can be that small
                slack = 8 * torch.finfo(torch.float32).eps * pick(expected, field).abs().max().item()
                assert ours.max() <= 2 * hf.max() + slack, (
                    f"{field}: max error {ours.max():.3g}, HF's {hf.max():.3g}"
                )
    return report


@pytest.fixture
def kit():
    """The helpers above, for test modules (pytest's importlib mode cannot import a conftest)."""
    return SimpleNamespace(
        device=DEVICE,
        tiny_config=tiny_config,
        padded_batch=padded_batch,
        build=build,
        compare_with_reference=compare_with_reference,
        real_tokens=real_tokens,
    )
