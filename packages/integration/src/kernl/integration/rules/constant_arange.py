"""Rule: ``torch.arange`` of literal bounds, read only by arithmetic and comparisons, becomes a buffer of
the compiled graph: a kernel less per call.

Transformers' static cache computes each layer's write positions as ``arange(Q) + cumulative_length``
in every decoder step (one ``arange`` a layer); the range is the same in every call. The buffer is made
once, when the graph is compiled. Only readers that make a new tensor of it are allowed (``+``, ``-``,
``*``, comparisons, out of place): a view or an in-place op could hand the shared buffer to the caller
or change it.
"""

import operator

import torch
from torch import fx

from kernl.integration.rules import Rule
from kernl.integration.rules._fx import constant_buffer, example, is_function

# readers whose result is a new tensor and which leave their arguments as they are
_READERS = (
    operator.add, operator.sub, operator.mul, operator.lt, operator.le, operator.gt, operator.ge,
    operator.eq, operator.ne, torch.add, torch.sub, torch.mul, torch.lt, torch.le, torch.gt, torch.ge,
    torch.eq, torch.ne,
)  # fmt: skip
_READER_METHODS = ("add", "sub", "mul", "lt", "le", "gt", "ge", "eq", "ne")


def _literal(value) -> bool:
    return value is None or isinstance(value, int | float | bool | torch.dtype | torch.device | str)


def _only_read(node: fx.Node) -> bool:
    """Every user of ``node`` is a reader of :data:`_READERS` (function or method spelling)."""
    for user in node.users:
        if is_function(user, _READERS) and not user.kwargs.get("out"):
            continue
        if user.op == "call_method" and user.target in _READER_METHODS and not user.kwargs.get("out"):
            continue
        return False
    return bool(node.users)


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each such ``arange`` by a buffer; return how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_function(node, (torch.arange,)) or not all(
            map(_literal, (*node.args, *node.kwargs.values()))
        ):
            continue
        ex = example(node)
        if ex is None or not all(isinstance(size, int) for size in ex.shape) or not _only_read(node):
            continue
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: it serves every later call
            value = torch.arange(*node.args, **node.kwargs)
        buffer = constant_buffer(gm, node, f"kernl_arange_{replaced}", value)
        buffer.meta = dict(node.meta)
        node.replace_all_uses_with(buffer)
        gm.graph.erase_node(node)
        replaced += 1
    return replaced


RULE = Rule(
    name="constant_arange",
    matches="torch.arange(literal bounds) read only by out-of-place arithmetic or comparisons",
    replacement="a buffer of the compiled graph holding the range",
    rewrite=rewrite,
)
