"""Small helpers the rules share: read a call's arguments by position or name, inspect example values.

Dynamo keeps each call as transformers wrote it (positional or keyword), so a rule never assumes one
spelling: :func:`arg` reads an argument wherever it is.
"""

import operator

import torch
from torch import fx

ADD_TARGETS = (operator.add, torch.add)


def arg(node: fx.Node, index: int, name: str, default=None):
    """The call's argument ``name`` (position ``index``), or ``default`` when not given."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def replace_with_call(
    gm: fx.GraphModule, last: fx.Node, function, args: tuple, dead: list[fx.Node]
) -> fx.Node:
    """Insert ``function(*args)`` before ``last``, route ``last``'s users to it, erase ``dead``
    (the matched nodes, in graph order, ``last`` included) and return the new node."""
    with gm.graph.inserting_before(last):
        call = gm.graph.call_function(function, args)
    call.meta = dict(last.meta)
    last.replace_all_uses_with(call)
    for node in reversed(dead):
        gm.graph.erase_node(node)
    return call


def replace_with_norm_call(
    gm: fx.GraphModule, last: fx.Node, function, args: tuple, dead: list[fx.Node], summed_source=None
) -> None:
    """Insert the norm call ``function(*args)`` before ``last`` and erase ``dead`` (graph order, ``last``
    included). With ``summed_source`` (the ``a + b`` node whose sum the call fuses as its residual) the
    call returns ``(normed, a + b)``: ``last``'s users take the first, ``summed_source``'s the second."""
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_function(function, args)
        normed = fused if summed_source is None else gm.graph.call_function(operator.getitem, (fused, 0))
    normed.meta = dict(last.meta)
    last.replace_all_uses_with(normed)
    for node in reversed(dead):
        gm.graph.erase_node(node)
    if summed_source is not None:
        with gm.graph.inserting_after(normed):
            summed = gm.graph.call_function(operator.getitem, (fused, 1))
        summed.meta = dict(summed_source.meta)
        summed_source.replace_all_uses_with(summed)
        gm.graph.erase_node(summed_source)


KEPT_REASON = "kernl_kept"  # node.meta key: why a rule left the node as PyTorch (shown in the report)


def constant_buffer(gm: fx.GraphModule, before: fx.Node, stem: str, value: torch.Tensor) -> fx.Node:
    """A ``get_attr`` node, inserted before ``before``, reading ``value`` (kept as a non-persistent buffer of
    ``gm`` under the first free name starting with ``stem``): a tensor computed once, at compile time."""
    name = stem
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def example(node) -> torch.Tensor | None:
    """The fake tensor dynamo recorded for ``node`` (shape, dtype, device), or None."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def is_function(node, targets) -> bool:
    """True when ``node`` calls one of the functions ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node, names) -> bool:
    """True when ``node`` calls a tensor method named in ``names``."""
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_op(node, functions, method: str) -> bool:
    """True when ``node`` calls one of ``functions`` or the tensor method ``method`` (both spellings)."""
    return is_function(node, functions) or is_method(node, (method,))


def is_add(node) -> bool:
    """``a + b`` spelled as operator, ``torch.add`` or ``Tensor.add`` (no ``alpha``)."""
    if not is_op(node, ADD_TARGETS, "add"):
        return False
    return len(node.args) == 2 and "alpha" not in node.kwargs and not node.kwargs.get("out")


def only_user(node: fx.Node) -> fx.Node | None:
    """The single node that uses ``node``, or None when there are zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def same_layout(a, b) -> bool:
    """Both nodes have example values of one shape and dtype."""
    ea, eb = example(a), example(b)
    return ea is not None and eb is not None and ea.shape == eb.shape and ea.dtype == eb.dtype


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The low-precision dtype autocast applies on ``device_type`` right now, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_all(dtype: torch.dtype | None, *tensors):
    """``tensors`` cast to ``dtype`` (None entries and a None dtype pass through), as autocast would:
    floating tensors only, and never float64 ones."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if _autocast_eligible(t) else t for t in tensors)


def _autocast_eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
