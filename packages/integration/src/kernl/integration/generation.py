"""``generate()`` on kernl for encoder-decoder models (T5, BART), and for decoder-only models through
:mod:`kernl.integration.decoder_only` (no prompt padding; every step captured whole): the decoder
compiled by kernl's backend over a static key/value cache and replayed from CUDA graphs.

The model's ``forward`` is routed: a call whose cache argument is a static cache with its buffers allocated (every step of ``generate()``,
the first one included once a cache is reused) runs the ``torch.compile``d forward (TorchDynamo,
:class:`~kernl.integration.backend.KernlBackend`: the FX rules, then a CUDA graph per graph that
updates the cache in place, :mod:`kernl.integration.step_graphs`); any other call runs as before.
Once the prefill has filled the cross-attention cache, a step changes nothing but tensors, so from a
signature's second step on the whole call (TorchDynamo's guards and the Python of ``forward``
included) is captured and replayed as one CUDA graph (:class:`~kernl.integration.forward_graphs.ForwardGraphs`,
keyed by the cache and where its tensors live). The static cache becomes the default and
transformers' own compilation of the decoder step is turned off (kernl's takes its place). Three things
keep the number of compiled graphs and captures bounded: the prompt is padded to the encoder's bucket
lengths (masked, so the tokens do not change; the cross-attention cache has the bucket's length); a
static cache is reset and reused by the next call of the same batch size and lengths (transformers
allocates a new one each call, and new addresses would mean a new capture; at most :data:`KEPT_CACHES`
are kept, and a new size's cache has its buffers allocated up front, like those of the caches before it,
so that its prefill runs compiled in its first call); and beam search's reordering of a static cache the
decoder runs on writes the reordered rows back where they were (transformers replaces the tensors), so
that every step of a beam search replays the same capture. The transformers internals this relies
on are in :mod:`kernl.integration.hf_compat`.

Greedy, sampled and beam-search calls then run kernl's own decode loop over the same compiled decoder step
(:mod:`kernl.integration.decode`: several steps per CUDA graph launch, no host read per token); the
other calls run transformers' loop over the steps above.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernl.integration.backend import KernlBackend
from kernl.integration.compile_state import limit_guarded, own_code
from kernl.integration.copies import copies_unoptimized
from kernl.integration.cuda_graphs import FIRST_CALL
from kernl.integration.decode.loop import EXTRA_CACHE_POSITIONS, DecodeLoop
from kernl.integration.decode.route import routed_generate
from kernl.integration.decode.step_arguments import step_arguments
from kernl.integration.forward_graphs import ForwardGraphs, signature
from kernl.integration.hf_compat import (
    CACHE_ARGUMENT_NAMES,
    CACHE_NAME,
    allocate_layer,
    cache_argument,
    cache_layers,
    cache_parts,
    cross_attention_filled,
    layer_tensors,
    previous_max_cache_length,
    ready_static_cache,
    set_previous_max_cache_length,
    static_cache_factory,
    turn_off_generate_compilation,
)
from kernl.integration.report import OptimizationReport
from kernl.integration.user_warnings import warn

KEPT_CACHES = 4


def optimize_generation(model, report: OptimizationReport, bucket, cuda_graphs: bool = True) -> None:
    """Run ``model.generate()``'s decoder steps on kernl (see the module docstring), in place.

    ``bucket(length) -> padded length``: the encoder's bucketing, applied to the prompt (None: prompts run at
    their own length, as a decoder-only model's must); ``cuda_graphs``: replay the steps from CUDA graphs
    (on a GPU).
    """
    backend = KernlBackend(report, [*model.parameters(), *model.buffers()], "decoder", cuda_graphs)
    original = model.forward
    compiled = torch.compile(own_code(original), backend=backend, dynamic=False)
    compiled = limit_guarded(compiled, original, report, "decoder step")
    steps = compiled
    if cuda_graphs and model.device.type == "cuda":
        # a step updates the cache in place: it runs once a call, and its first call is its warm-up
        steps = ForwardGraphs(compiled, model, report, _step_signature, FIRST_CALL, KEPT_CACHES)
        model.kernl_decoder_graphs = steps

    @functools.wraps(original)  # transformers validates generate()'s kwargs against this signature
    def forward(*args, **kwargs):
        cache = cache_argument(kwargs)[1]
        if not ready_static_cache(cache):
            return original(*args, **kwargs)
        _ensure_reorder_in_place(cache)  # once per cache, before any beam step
        return steps(*args, **kwargs) if _changes_only_tensors(cache) else compiled(*args, **kwargs)

    model.forward = forward
    config = model.generation_config
    turn_off_generate_compilation(config)
    report.notes.append(
        f"generate(): decoder on kernl with the '{config.cache_implementation or 'static'}' cache "
        "(by default, in calls that name no cache; with a dynamic cache it runs as PyTorch)"
        + ("; prompts padded to the encoder's buckets" if bucket is not None else "")
    )
    factory = static_cache_factory(model)
    if factory is not None:
        model._prepare_static_cache = _reusing_static_cache(model, factory)
    else:
        report.notes.append("static caches are not reused across generate() calls (unknown transformers API)")
    model.kernl_original_generate = model.generate
    arguments = step_arguments(model)
    loop = DecodeLoop(
        model, compiled, arguments, report, cuda_graphs, _ensure_reorder_in_place
    )  # kernl's own
    model.kernl_decode_loop = loop
    routed = routed_generate(model, model.generate, loop, report)
    model.generate = _bucketed_generate(model, routed, bucket, report)
    copies_unoptimized(model)


def _changes_only_tensors(cache) -> bool:
    """Whether a step over ``cache`` changes nothing but tensors, so that it can be captured whole: a
    decoder-only model's static cache always, an encoder-decoder's once the prefill filled its
    cross-attention cache."""
    return len(cache_parts(cache)) == 1 or cross_attention_filled(cache)


def _step_signature(args: tuple, kwargs: dict) -> tuple | None:
    """The capture key of a whole decoder step: the other arguments as :func:`signature` sees them,
    the cache object, and where its tensors live."""
    cache_name, cache = cache_argument(kwargs)
    key = signature(args, {name: v for name, v in kwargs.items() if name != cache_name})
    if key is None:
        return None
    tensors = [t for layer in cache_layers(cache) for t in layer_tensors(layer)]
    return (*key, id(cache), tuple(t.data_ptr() for t in tensors))


def _reusing_static_cache(model, create):
    """``model._prepare_static_cache`` that resets and returns a kept cache of the same sizes when it has one."""
    kept = {}

    def prepare(cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):
        max_cache_len += EXTRA_CACHE_POSITIONS  # the steps kernl's loop runs past max_length
        length = max(max_cache_len, previous_max_cache_length(model))
        encoder_outputs = model_kwargs.get("encoder_outputs")
        encoder_length = None if encoder_outputs is None else encoder_outputs[0].shape[1]
        # a kept cache is only reused, or copied in shape, by calls whose tensors it matches
        state = (model.dtype, model.device, torch.is_inference_mode_enabled())
        key = (cache_implementation, batch_size, length, encoder_length, prefill_chunk_size, state)
        cache = kept.pop(key, None)
        if cache is None:
            cache = create(cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs)
            like = (c for k, c in kept.items() if k[-1] == state and ready_static_cache(c))
            _allocate_like(cache, next(like, None), batch_size)
            cache.kernl_kept = True  # reset and reused by a later call: see _bucketed_generate
        else:
            cache.reset()
            set_previous_max_cache_length(model, length)
        kept[key] = cache
        while len(kept) > KEPT_CACHES:
            kept.pop(next(iter(kept)))
        return cache

    return prepare


def _allocate_like(cache, template, batch_size: int) -> None:
    """Allocate the buffers of a fresh ``cache`` now, shaped as those of ``template`` (an allocated cache of
    the same model: heads, head sizes, dtype, device) for ``batch_size`` rows, so that its first step, the
    prefill, runs compiled in the first call of a new size (left to itself, a cache allocates them in its
    first update, which cannot be traced). Nothing is done when the two caches differ in structure."""
    if template is None:
        return
    parts, template_parts = cache_parts(cache), cache_parts(template)
    pairs = [
        (layer, like)
        for part, template_part in zip(parts, template_parts, strict=False)
        for layer, like in zip(part.layers, template_part.layers, strict=False)
    ]
    if len(parts) != len(template_parts) or len(pairs) != sum(len(part.layers) for part in parts):
        return
    if not all(
        type(layer) is type(like) and isinstance(getattr(like, "keys", None), torch.Tensor)
        for layer, like in pairs
    ):
        return
    for layer, like in pairs:  # what a layer's first update would pass, without the tokens
        keys, values = (
            t.new_empty((batch_size, t.shape[1], 0, t.shape[-1])) for t in (like.keys, like.values)
        )
        allocate_layer(layer, keys, values)


def _ensure_reorder_in_place(cache) -> None:
    """:func:`_reorder_in_place` unless ``cache`` reorders in place already."""
    if not isinstance(cache.reorder_cache, _InPlaceReorder):
        _reorder_in_place(cache)


def _reorder_in_place(cache) -> None:
    """Make beam search's ``cache.reorder_cache(beam_idx)`` keep the cache's tensors where they are:
    transformers' layers replace them by reordered copies, and the captured step reads the old ones."""
    cache.reorder_cache = _InPlaceReorder(cache_layers(cache))


class _InPlaceReorder:
    """``reorder_cache(beam_idx)`` over ``layers`` that writes the reordered rows back in place.

    The first call runs each layer's own reorder and copies every tensor it replaced back into the old
    one, noting the tensors whose new value was ``old.index_select(0, beam_idx)`` (a static layer's keys
    and values). Later calls select those rows for every layer at once: no host synchronisation
    (transformers' reorder reads each layer's length on the host) and two launches a tensor. A layer
    whose reorder did anything else keeps running its own, followed by the copy back.
    """

    def __init__(self, layers: list):
        self.layers, self.selected, self.own = layers, None, []

    def __call__(self, beam_idx: torch.Tensor) -> None:
        if self.selected is None:
            self.selected = []
            for layer in self.layers:
                names = _copy_back(layer, layer.reorder_cache, beam_idx)
                if names:
                    self.selected += [(layer, name) for name in names]
                else:
                    self.own.append(layer)
            return
        for layer in self.own:
            _copy_back(layer, layer.reorder_cache, beam_idx)
        tensors = [getattr(layer, name) for layer, name in self.selected]
        if tensors:
            index = beam_idx.to(tensors[0].device)
            torch._foreach_copy_(tensors, [t.index_select(0, index) for t in tensors])


def _copy_back(layer, reorder, beam_idx: torch.Tensor) -> list[str] | None:
    """Run ``reorder(beam_idx)``, then copy each tensor attribute of ``layer`` it replaced (same shape and
    dtype) back into the old tensor. Returns the names of those tensors when every one of them was
    the old one's rows ``beam_idx``, else None."""
    before = {name: t for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}
    reorder(beam_idx)
    names, selected_rows = [], True
    for name, old in before.items():
        new = getattr(layer, name, None)
        if new is old:
            continue
        if not isinstance(new, torch.Tensor) or (new.shape, new.dtype) != (old.shape, old.dtype):
            selected_rows = False
            continue
        selected_rows = (
            selected_rows
            and old.shape[:1] == beam_idx.shape
            and torch.equal(new, old.index_select(0, beam_idx.to(old.device)))
        )
        old.copy_(new)
        setattr(layer, name, old)
        names.append(name)
    return names if selected_rows else None


@dataclass(frozen=True)
class _GenerateCall:
    """A ``generate()`` call as the prompt bucketing sees it."""

    ids: object  # the prompt (positional, ``inputs`` or ``input_ids``)
    mask: object  # ``attention_mask``
    kwargs: dict
    setting: Callable  # name -> the call's value, else the generation config's


def _assisted(call: _GenerateCall) -> str | None:
    names = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
    if any(call.setting(name) for name in names):
        return "assisted generation (transformers refuses static caches there)"
    return None


def _not_token_ids(call: _GenerateCall) -> str | None:
    ids = call.ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return "the prompt is not a 2-D tensor of token ids"
    return None


def _callers_encoder_state(call: _GenerateCall) -> str | None:
    given = sorted({"inputs_embeds", "encoder_outputs", "past_key_values", "cache"} & call.kwargs.keys())
    return f"the call passes {', '.join(given)}" if given else None


def _mask_of_another_shape(call: _GenerateCall) -> str | None:
    mask = call.mask
    if mask is None or (isinstance(mask, torch.Tensor) and mask.shape == call.ids.shape):
        return None
    return "attention_mask is not a tensor of the prompt's shape"


def _pad_tokens_without_mask(call: _GenerateCall) -> str | None:
    # whether pad tokens in a prompt without a mask are attended depends on the transformers release:
    # left to generate() itself
    pad = call.setting("pad_token_id")
    if call.mask is None and pad is not None and bool((call.ids == pad).any()):
        return "pad tokens in a prompt without attention_mask"
    return None


def _returns_encoder_outputs(call: _GenerateCall) -> str | None:
    if any(call.setting(name) for name in ("output_hidden_states", "output_attentions")):
        return "encoder hidden states or attentions are returned at the prompt's length"
    return None


def _reads_the_prompt(call: _GenerateCall) -> str | None:
    # processors built from the prompt itself would count the padding as prompt tokens
    if (call.setting("encoder_no_repeat_ngram_size") or 0) > 0 or call.setting(
        "encoder_repetition_penalty"
    ) not in (None, 1.0):
        return "encoder_no_repeat_ngram_size or encoder_repetition_penalty reads the prompt"
    return None


# Why a prompt is left at its own length, checked in this order (token ids first: the later checks read them).
_UNBUCKETED = (
    _not_token_ids,
    _callers_encoder_state,
    _mask_of_another_shape,
    _pad_tokens_without_mask,
    _returns_encoder_outputs,
    _reads_the_prompt,
)


def _names_no_cache(call: _GenerateCall, config) -> bool:
    """Whether the call leaves the cache to kernl: it names none, and neither does the model's config;
    not without a cache at all (transformers would warn the setting is unused), nor when the decoder's
    attention maps are returned (over a static cache they would span the whole cache)."""
    named = {"past_key_values", "cache", "cache_implementation"} & call.kwargs.keys()
    return not (
        named
        or config.cache_implementation
        or call.setting("use_cache") is False
        or call.setting("output_attentions")
    )


def _bucketed_generate(model, generate, bucket, report: OptimizationReport):
    """``generate`` with ``input_ids`` and ``attention_mask`` right-padded to ``bucket(length)``; a call
    left at its own length adds the reason to ``report``'s notes (once per reason)."""

    def unbucketed(reason: str):
        note = f"generate(): a prompt ran at its own length: {reason}"
        if note not in report.notes:
            report.notes.append(note)

    def padded_generate(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        for old in set(CACHE_ARGUMENT_NAMES) - {CACHE_NAME}:
            if old in kwargs and CACHE_NAME not in kwargs:
                # transformers' own deprecation warning would point at this wrapper: renamed here, and
                # the warning points at the caller
                warn(
                    f"{old} is deprecated by this transformers release: pass {CACHE_NAME}= instead",
                    FutureWarning,
                )
                kwargs[CACHE_NAME] = kwargs.pop(old)
        if getattr(cache_argument(kwargs)[1], "kernl_kept", False):
            raise ValueError(
                "past_key_values is a static cache kernl's generate() made for an earlier call: sized for "
                "that call and reset by the next call of its size, it cannot be continued. To continue a "
                "generation from its cache, make the first call with cache_implementation='dynamic'"
            )
        place = 0 if args else "inputs" if "inputs" in kwargs else "input_ids"
        call = _GenerateCall(
            ids=args[0] if args else kwargs.get(place),
            mask=kwargs.get("attention_mask"),
            kwargs=kwargs,
            setting=lambda name: kwargs.get(name, getattr(config, name, None)),
        )
        if (reason := _assisted(call)) is not None:
            unbucketed(reason)
            return generate(*args, **kwargs)
        if _names_no_cache(call, config):
            kwargs["cache_implementation"] = "static"  # kernl's decoder steps run over a static cache
        if bucket is None:
            return generate(*args, **kwargs)
        reason = next((r for check in _UNBUCKETED if (r := check(call)) is not None), None)
        if reason is not None:
            unbucketed(reason)
            return generate(*args, **kwargs)
        ids, mask, pad = call.ids, call.mask, call.setting("pad_token_id")
        extra = bucket(ids.shape[1]) - ids.shape[1]
        if extra == 0:
            return generate(*args, **kwargs)
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.long)
        ids = torch.nn.functional.pad(ids, (0, extra), value=0 if pad is None else pad)
        kwargs["attention_mask"] = torch.nn.functional.pad(mask, (0, extra), value=0)
        if args:
            args = (ids, *args[1:])
        else:
            kwargs[place] = ids
        return generate(*args, **kwargs)

    return padded_generate
