"""A forward that returns a key/value cache it made (a decoder-only model's prefill), replayed from CUDA graphs.

A CUDA graph hands out the same memory at every replay, so a cache object among its outputs would be
shared by every call, its tensors overwritten by the next one. :class:`ReturnedCache` splits the
cache off: the captured call returns the cache's tensors, layer by layer, and the number of a template
(the cache object the capture made); after each replay those tensors are cloned like any output and
:meth:`ReturnedCache.rebuild` puts a fresh copy of the template around them.
"""

import copy

import torch

# Where a ModelOutput keeps the cache it returns (5.17, 5.25).
_RETURNED_CACHE_FIELD = "past_key_values"


def _layer_tensors(layer) -> dict[str, torch.Tensor]:
    return {name: t for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}


def _layer_state(layer) -> tuple:
    """What tells layers apart besides their tensors (type and plain attributes: a sliding window's length)."""
    return (
        type(layer),
        tuple((n, repr(v)) for n, v in vars(layer).items() if not isinstance(v, torch.Tensor)),
    )


def _without_tensors(cache):
    """A shallow copy of ``cache`` whose layers hold None for each tensor (a template keeps no memory)."""
    template = copy.copy(cache)
    template.layers = []
    for layer in cache.layers:
        bare = copy.copy(layer)
        for name in _layer_tensors(layer):
            setattr(bare, name, None)
        template.layers.append(bare)
    return template


class ReturnedCache:
    """``split(**kwargs)``: ``forward(**kwargs)`` with its returned cache replaced by
    ``{"layers": [{name: tensor}], "template": int}`` (plain values a CUDA graph can hand out);
    ``rebuild(output)``: the output with a fresh cache of the template's kind around those tensors."""

    def __init__(self, forward):
        self.forward = forward
        self.templates: list = []
        self.numbers: dict[tuple, int] = {}

    def split(self, **kwargs):
        """The forward, its cache split into tensors (see the class docstring)."""
        output = self.forward(**kwargs)
        cache = output.get(_RETURNED_CACHE_FIELD) if isinstance(output, dict) else None
        if cache is None or not hasattr(cache, "layers"):
            return output
        state = (type(cache), tuple(_layer_state(layer) for layer in cache.layers))
        if state not in self.numbers:  # one template per kind of cache: bounded by the captures' keys
            self.numbers[state] = len(self.templates)
            self.templates.append(_without_tensors(cache))
        split = type(output).__new__(type(output))
        for key, item in output.items():
            split[key] = item
        split[_RETURNED_CACHE_FIELD] = {
            "layers": [_layer_tensors(layer) for layer in cache.layers],
            "template": self.numbers[state],
        }
        return split

    def rebuild(self, output):
        """``output`` (from :meth:`split`) with its cache object back, around the tensors it holds."""
        parts = output.get(_RETURNED_CACHE_FIELD) if isinstance(output, dict) else None
        if not isinstance(parts, dict) or "template" not in parts:
            return output
        template = self.templates[parts["template"]]
        cache = copy.copy(template)
        cache.layers = []
        for layer, tensors in zip(template.layers, parts["layers"], strict=True):
            fresh = copy.copy(layer)
            for name, tensor in tensors.items():
                setattr(fresh, name, tensor)
            cache.layers.append(fresh)
        output[_RETURNED_CACHE_FIELD] = cache
        return output
