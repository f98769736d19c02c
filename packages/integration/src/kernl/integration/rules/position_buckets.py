"""Rule: an embedding lookup whose integer index the graph computes from constants alone, or from
constants and one position offset (a one-element integer input) entering as relative positions (key
positions minus offset query positions), reads that index from a table made when the graph is compiled.

T5 computes which relative-position bucket each (query, key) pair falls in with about twenty
elementwise ops (``arange``, differences, ``log``, ``min``, ``where``...) before its
``relative_attention_bias`` lookup: in the encoder from the sequence length alone, in a decoder step
from the number of tokens already in the cache as well. Those ops are evaluated here, with the graph's
own nodes: once for an index of constants (a buffer of the compiled graph, no kernel left), and once per
offset ``0 .. K - Q`` for an index ``(Q, K)`` read at an offset (one ``index_select`` left per call).
The offset range is that of queries lying among the keys (positions ``0 .. K - 1``, as in a static
cache of ``K`` positions); an offset outside it fails the ``index_select`` as it fails the cache write,
instead of reading a wrong bucket.

An input mutated in place anywhere in the graph is read through a ``clone`` taken before the mutation
(T5's ``past_seen_tokens``), which stays where it is: the lookup reads that snapshot.
"""

import operator

import torch
from torch import fx

from kernl.integration.rules import Rule
from kernl.integration.rules._fx import arg, constant_buffer, example, is_add, is_function, is_op

EMBEDDING_TARGETS = (torch.nn.functional.embedding,)
MAX_TABLE = 1 << 21  # entries: 16 MB of int64, far above T5's (K - Q + 1) * Q * K at K = 512, Q = 1
# ops whose result is not a function of their arguments' values
_NOT_A_FUNCTION = frozenset(
    "empty empty_like empty_strided new_empty rand rand_like randn randn_like randint randint_like "
    "randperm bernoulli multinomial normal normal_ uniform_ dropout".split()
)


def rows_at(table: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``table[offset]`` for a one-element integer ``offset`` (any shape): the index computed for it."""
    return table.index_select(0, offset.reshape(1)).squeeze(0)


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def _in_place(node: fx.Node) -> bool:
    name = _name(node)
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _static(node: fx.Node) -> bool:
    """Whether ``node``'s value is a tensor of concrete shape, or a plain number, or nothing."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor):
        return all(isinstance(size, int) for size in value.shape)
    return value is None or isinstance(value, int | float | bool)


def _offset_input(node: fx.Node) -> bool:
    """A one-element integer graph input never mutated in place, or a ``clone`` of any such input."""
    source = node.args[0] if node.op == "call_method" and node.target == "clone" and node.args else node
    ex = example(source)
    if not isinstance(source, fx.Node) or source.op != "placeholder" or ex is None:
        return False
    if ex.numel() != 1 or ex.dtype not in (torch.int32, torch.int64):
        return False
    return node is not source or not any(_in_place(user) for user in source.users)


def _ancestors(index: fx.Node):
    """``(the nodes computing index in graph order, the offset node or None)``, or None when index depends
    on anything but constants and one offset input, or on an op that is not a function of its inputs."""
    nodes, offsets, stack, seen = [], set(), [index], {index}
    while stack:
        node = stack.pop()
        if node.op == "placeholder" or _offset_input(node):
            if not _offset_input(node):
                return None
            offsets.add(node)
            continue
        if node.op not in ("call_function", "call_method", "get_attr") or not _static(node):
            return None
        if node.op != "get_attr" and (node.is_impure() or _in_place(node) or _name(node) in _NOT_A_FUNCTION):
            return None
        nodes.append(node)
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    if len(offsets) > 1:
        return None
    order = {node: i for i, node in enumerate(index.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), next(iter(offsets), None)


# ops that only reshape, cast or copy a tensor: the offset may pass through them on its way to positions
_SHAPE_ONLY = frozenset("getitem view reshape unsqueeze squeeze expand to clone contiguous".split())


def _relative_to_offset(offset: fx.Node, nodes: list[fx.Node]) -> bool:
    """Whether the offset enters the index only as query positions (``arange`` plus the offset, or the
    offset itself, maybe reshaped) subtracted from or by key positions (another ``arange``): a relative
    position ``(Q, K)``, as in ``arange(K)[None, :] - (arange(Q)[:, None] + offset)``. What tells it
    from absolute positions (``arange(Q) + offset``, whose range is the position table's, not K's) and
    from a token id of a one-token batch."""
    inside, stack, index = set(nodes), [offset], nodes[-1]
    while stack:
        node = stack.pop()
        if node is index:  # the offset reaches the index without a difference of positions
            return False
        for user in (u for u in node.users if u in inside):
            others = [a for a in user.args if a is not node]
            if _name(user) in _SHAPE_ONLY or (
                is_add(user) and len(others) == 1 and _from_arange(others[0], inside)
            ):
                stack.append(user)  # still query positions
            elif not is_op(user, (operator.sub, torch.sub), "sub") or len(user.args) != 2 or len(others) != 1:
                return False
            elif not _from_arange(others[0], inside) or _depends_on(others[0], offset, inside):
                return False
    return True


def _depends_on(node, source: fx.Node, inside: set) -> bool:
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is source:
            return True
        if isinstance(current, fx.Node) and current not in seen and current in inside:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def _from_arange(node, inside: set) -> bool:
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, fx.Node) or current in seen or current not in inside:
            continue
        if is_function(current, (torch.arange,)):
            return True
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def _evaluator(gm: fx.GraphModule, nodes: list[fx.Node], index: fx.Node, offset: fx.Node | None):
    """A graph module computing ``index`` from the offset (or from nothing) with a copy of ``nodes``."""
    graph, copies = fx.Graph(), {}
    if offset is not None:
        copies[offset] = graph.placeholder("offset")
    for node in nodes:
        copies[node] = graph.node_copy(node, copies.__getitem__)
    graph.output(copies[index])
    return fx.GraphModule(gm, graph)


def _table(gm: fx.GraphModule, index: fx.Node):
    """``(table, offset node or None)`` for the index at ``index``, or None."""
    found = _ancestors(index)
    ex = example(index)
    if found is None or ex is None or ex.dtype not in (torch.int32, torch.int64) or not found[0]:
        return None
    nodes, offset = found
    if all(node.op == "get_attr" for node in nodes):
        return None  # read as it is: nothing to compute
    if offset is not None and not _relative_to_offset(offset, nodes):
        return None
    evaluate = _evaluator(gm, nodes, index, offset)
    # normal tensors, even when the graph compiles under inference_mode: the table serves every later call
    with torch.inference_mode(False), torch.no_grad():
        if offset is None:
            return evaluate(), None
        if (
            ex.dim() < 2
            or ex.shape[-1] < ex.shape[-2]
            or (ex.shape[-1] - ex.shape[-2] + 1) * ex.numel() > MAX_TABLE
        ):
            return None
        o = example(offset)
        values = range(ex.shape[-1] - ex.shape[-2] + 1)  # queries among the keys: offsets 0 .. K - Q
        rows = [evaluate(torch.full(o.shape, v, dtype=o.dtype, device=o.device)) for v in values]
        return torch.stack(rows), offset


def rewrite(gm: fx.GraphModule) -> int:
    """Read each computed embedding index from a table; return how many were replaced."""
    replaced = 0
    for lookup in list(gm.graph.nodes):
        index = arg(lookup, 0, "input")
        if not is_function(lookup, EMBEDDING_TARGETS) or not isinstance(index, fx.Node):
            continue
        if (found := _table(gm, index)) is None:
            continue
        table, offset = found
        value = constant_buffer(gm, lookup, f"kernl_index_table_{replaced}", table.contiguous())
        if offset is not None:
            with gm.graph.inserting_before(lookup):
                value = gm.graph.call_function(rows_at, (value, offset))
        value.meta = dict(index.meta)
        lookup.replace_input_with(index, value)
        replaced += 1
    return replaced


RULE = Rule(
    name="position_buckets",
    matches="F.embedding(index, w) with index computed from constants, or from constants and one "
    "one-element integer input (T5's relative-position buckets)",
    replacement="the index read from a table computed at compile time (index_select at the offset)",
    rewrite=rewrite,
)
