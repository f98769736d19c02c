"""The nested values models take and return: tensors inside tuples, lists, dicts and ModelOutputs.

Written by hand rather than with ``torch.utils._pytree``: these walks run on every call of an optimized
model, and a ModelOutput is rebuilt here item by item without running its dataclass ``__init__``.
"""

import torch

PLAIN = (bool, int, float, str, type(None))


def map_tensors(fn, value):
    """``value`` with ``fn`` applied to every tensor inside (tuples, lists, dicts, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        # Filled item by item: a transformers ModelOutput (an OrderedDict subclass) keeps its attributes
        # in step through __setitem__, without its dataclass __init__.
        mapped = type(value).__new__(type(value))
        for key, item in value.items():
            mapped[key] = map_tensors(fn, item)
        return mapped
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    return value


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor inside ``value``, in a fixed order."""
    found = []
    map_tensors(found.append, value)
    return found


def objects_in(value) -> list:
    """What ``value`` holds beyond tensors, plain values and containers of them (a Cache, for one)."""
    if isinstance(value, dict):
        return [found for item in value.values() for found in objects_in(item)]
    if isinstance(value, (tuple, list)):
        return [found for item in value for found in objects_in(item)]
    return [] if isinstance(value, (torch.Tensor, *PLAIN)) else [value]


def holds_objects(value) -> bool:
    """True when ``value`` holds anything beyond tensors, plain values and containers of them."""
    if isinstance(value, dict):
        return any(holds_objects(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return any(holds_objects(item) for item in value)
    return not isinstance(value, (torch.Tensor, *PLAIN))
