"""The transformers internals of kernl.integration.hf_compat exist, as named there, in the installed release
(5.17 on the GPU image, 5.25 on the CPU image): a release that changes one fails here, by name."""

import inspect
from types import SimpleNamespace

import torch
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration, cache_utils

from kernl.integration import hf_compat


def _static_pair(config, length: int = 8):
    return cache_utils.EncoderDecoderCache(
        cache_utils.StaticCache(config=config, max_cache_len=length),
        cache_utils.StaticCache(config=config, max_cache_len=length),
    )


def _config():
    return T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=50)


def test_the_forward_takes_the_cache_under_one_of_its_names():
    parameters = inspect.signature(T5ForConditionalGeneration.forward).parameters
    assert {*hf_compat.CACHE_ARGUMENT_NAMES} & parameters.keys()


def test_the_static_cache_factory_has_the_parameters_kernl_wraps():
    model = T5ForConditionalGeneration(_config())
    assert hf_compat.static_cache_factory(model) is not None
    assert (
        hf_compat.static_cache_factory(SimpleNamespace(_prepare_static_cache=lambda batch_size: None)) is None
    )


def test_a_static_cache_pair_is_ready_once_its_layers_are_allocated_and_filled_after_the_prefill():
    cache = _static_pair(_config())
    layers = hf_compat.cache_layers(cache)
    assert len(layers) == 4 and len(hf_compat.cache_parts(cache)) == 2
    assert not hf_compat.ready_static_cache(cache) and not hf_compat.cross_attention_filled(cache)
    for layer in layers:
        hf_compat.allocate_layer(layer, torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8))
        assert {t.shape for t in hf_compat.layer_tensors(layer)} >= {torch.Size([1, 2, 8, 8])}
    assert hf_compat.ready_static_cache(cache)
    cache.is_updated = dict.fromkeys(cache.is_updated, True)  # what the prefill's cross-attention does
    assert hf_compat.cross_attention_filled(cache)


def test_generation_settings_kernl_sets_exist():
    config = GenerationConfig()
    assert hasattr(config, "disable_compile")
    hf_compat.turn_off_generate_compilation(config)
    assert config.disable_compile is True
    model = SimpleNamespace()
    assert hf_compat.previous_max_cache_length(model) == -1
    hf_compat.set_previous_max_cache_length(model, 40)
    assert hf_compat.previous_max_cache_length(model) == 40
