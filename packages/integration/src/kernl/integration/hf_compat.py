"""Every transformers internal kernl's ``generate()`` relies on, in one place.

Each one is tested on transformers 5.17 (the GPU image) and 5.25 (the CPU image); the tests of
``test_generation.py``, ``test_t5.py`` and ``test_decoder_loop.py`` exercise all of them. A release that changes one of them
should fail here, by name, rather than somewhere in the generation code.
"""

import inspect

import torch
import transformers

# The key/value cache argument of a model's forward: ``past_key_values`` up to 5.23, ``cache`` from 5.24
# (5.25 still accepts ``past_key_values``, with a FutureWarning).
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")

# A decoder-only model's arguments that ``_update_model_kwargs_for_generation`` grows after every forward
# (5.17, 5.25): ``attention_mask`` by a column of ones, ``position_ids`` by the column
# ``position_ids[..., -1:] + 1``. ``prepare_inputs_for_generation`` then feeds the positions' last column,
# and turns the mask into a 4-D one over the static cache's length (a shorter mask padded with zeros, the
# columns past the query's position, the cache's device-side length, hidden by the causal mask).
DECODER_ONLY_GROWN_ARGUMENTS = ("attention_mask", "position_ids")
# Its arguments that stay as they are: ``logits_to_keep`` (set to 1 by generate() for models that take it)
# and ``use_cache`` (5.17, 5.25).
DECODER_ONLY_STEADY_ARGUMENTS = ("logits_to_keep", "use_cache")

# ``GenerationMixin._prepare_static_cache``'s parameters (5.17, 5.25): kernl wraps it to reuse caches.
STATIC_CACHE_FACTORY_PARAMETERS = [
    "cache_implementation",
    "batch_size",
    "max_cache_len",
    "prefill_chunk_size",
    "model_kwargs",
]


# The name generate() and a model's forward take the key/value cache under: ``cache`` from 5.24 on
# (``past_key_values`` is deprecated there, with a FutureWarning), ``past_key_values`` before.
_RELEASE = tuple(int(part) for part in transformers.__version__.split(".")[:2])
CACHE_NAME = "cache" if _RELEASE >= (5, 24) else "past_key_values"

# Output flags a model's forward reads from its config when a call does not give them (5.17, 5.25).
CONFIG_FLAGS = ("output_attentions", "output_hidden_states", "return_dict")


def cache_argument(kwargs: dict) -> tuple:
    """``(name, cache)`` of the key/value cache argument of a forward call (either of
    :data:`CACHE_ARGUMENT_NAMES`), ``(None, None)`` without one."""
    for name in CACHE_ARGUMENT_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def cache_parts(cache) -> list:
    """The caches inside ``cache``: an ``EncoderDecoderCache``'s ``self_attention_cache`` and
    ``cross_attention_cache`` (5.17, 5.25), or ``cache`` itself."""
    if hasattr(cache, "cross_attention_cache"):
        return [cache.self_attention_cache, cache.cross_attention_cache]
    return [cache]


def cache_layers(cache) -> list:
    """Every layer of ``cache`` (``Cache.layers``, 5.17, 5.25), self-attention parts first."""
    return [layer for part in cache_parts(cache) for layer in part.layers]


def ready_static_cache(cache) -> bool:
    """A static cache (or an encoder-decoder pair of them) whose buffers exist: the decoder can be compiled
    over it (a fresh cache allocates its buffers in its first update, which must not be traced).
    Reads ``Cache.is_compileable`` and ``layer.is_initialized`` (5.17, 5.25)."""
    if cache is None:
        return False
    return all(
        getattr(part, "is_compileable", False)
        and all(getattr(layer, "is_initialized", False) for layer in part.layers)
        for part in cache_parts(cache)
    )


def cross_attention_filled(cache) -> bool:
    """After the prefill: every layer's cross-attention cache is filled, so a step changes only tensors.
    Reads ``EncoderDecoderCache.is_updated``, a dict by layer (5.17, 5.25)."""
    filled = getattr(cache, "is_updated", None)
    return isinstance(filled, dict) and bool(filled) and all(filled.values())


def layer_tensors(layer) -> list[torch.Tensor]:
    """The tensors a cache layer holds as attributes (a static layer's ``keys``, ``values``, ...)."""
    return [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]


def allocate_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Allocate a cache layer's buffers as its first update of ``keys``/``values`` would:
    ``layer.lazy_initialization(keys, values)`` (5.17, 5.25)."""
    layer.lazy_initialization(keys, values)


def static_cache_factory(model):
    """``model._prepare_static_cache`` when its parameters are :data:`STATIC_CACHE_FACTORY_PARAMETERS`,
    else None (an unknown release: caches are then not reused)."""
    factory = getattr(model, "_prepare_static_cache", None)
    if factory is None or [*inspect.signature(factory).parameters] != STATIC_CACHE_FACTORY_PARAMETERS:
        return None
    return factory


def previous_max_cache_length(model) -> int:
    """The longest cache ``generate()`` made for ``model`` so far (``model._previous_max_cache_length``,
    5.17, 5.25; -1 before any); a static cache is made at least that long."""
    return getattr(model, "_previous_max_cache_length", -1)


def set_previous_max_cache_length(model, length: int) -> None:
    """Record ``length`` as :func:`previous_max_cache_length`, as ``_prepare_static_cache`` does."""
    model._previous_max_cache_length = length


def turn_off_generate_compilation(generation_config) -> None:
    """Stop ``generate()`` compiling the decoder step itself (``GenerationConfig.disable_compile``,
    5.17, 5.25): kernl's compilation takes its place."""
    generation_config.disable_compile = True


# The decoding method generate() runs per generation mode (``GENERATION_MODES_MAPPING``, 5.17, 5.25):
# kernl's loop, given to generate() as ``custom_generate``, hands back to it the calls it does not take.
def transformers_decoding(generation_config):
    """transformers' decoding method for ``generation_config``'s mode (``GenerationMixin._sample``, ...),
    called as ``method(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)``."""
    from transformers.generation.utils import GENERATION_MODES_MAPPING, GenerationMixin

    return getattr(GenerationMixin, GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])


def prefill(model, input_ids: torch.Tensor, generation_config, model_kwargs: dict):
    """The first forward of a generation, as ``_sample`` runs it (``model._prefill``, 5.17, 5.25), and the
    model arguments for the next steps (``model._update_model_kwargs_for_generation``): ``(outputs,
    model_kwargs)``."""
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    model_kwargs = model._update_model_kwargs_for_generation(
        outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
    )
    return outputs, model_kwargs


def step_inputs(model, token: torch.Tensor, model_kwargs: dict) -> dict:
    """A decoder step's forward arguments for the last tokens ``token`` (int64 ``(batch, 1)``), as
    ``_sample`` builds them (``model.prepare_inputs_for_generation(ids, next_sequence_length=1, ...)``,
    5.17, 5.25; over a static cache the query's position in the cache comes from the cache's own
    device-side length, a decoder-only model's position ids from ``model_kwargs``)."""
    return model.prepare_inputs_for_generation(token, next_sequence_length=1, **model_kwargs)


def self_attention_room(cache) -> int:
    """How many positions the self-attention part of a static ``cache`` holds (``layer.max_cache_len``,
    5.17, 5.25); 0 when a layer does not say."""
    layers = cache_parts(cache)[0].layers
    return min((getattr(layer, "max_cache_len", 0) or 0 for layer in layers), default=0)


def has_sliding_layers(cache) -> bool:
    """Whether ``cache`` has sliding-window layers (``layer.is_sliding``, 5.17, 5.25): such a static layer
    keeps its length in a Python int that changes every step."""
    return any(getattr(layer, "is_sliding", False) for layer in cache_layers(cache))


def generate_output(model, sequences: torch.Tensor, cache, beam_indices: torch.Tensor | None = None):
    """What ``generate(..., return_dict_in_generate=True)`` returns for ``sequences`` and ``cache`` without
    scores, attentions or hidden states (``GenerateEncoderDecoderOutput``/``GenerateDecoderOnlyOutput``;
    with ``beam_indices``, a beam search's: ``GenerateBeamEncoderDecoderOutput``/
    ``GenerateBeamDecoderOnlyOutput``; the cache field is ``past_key_values`` up to 5.23, ``cache`` from
    5.24)."""
    from transformers.generation import utils

    encoder_decoder = model.config.is_encoder_decoder
    if beam_indices is not None:
        kind = (
            utils.GenerateBeamEncoderDecoderOutput if encoder_decoder else utils.GenerateBeamDecoderOnlyOutput
        )
        return kind(sequences=sequences, beam_indices=beam_indices, **{CACHE_NAME: cache})
    kind = utils.GenerateEncoderDecoderOutput if encoder_decoder else utils.GenerateDecoderOnlyOutput
    return kind(sequences=sequences, **{CACHE_NAME: cache})
