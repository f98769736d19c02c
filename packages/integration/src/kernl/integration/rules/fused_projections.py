"""Rule: plain projections of one input (attention's Q, K and V) become one wider ``linear_act`` call.

Runs after the ``linear_act`` rule. Two or more of its calls that read the same ``x`` with no activation
or residual, and whose weights (and biases, all present or all absent) are graph inputs of one dtype and
input width, become one call on the weights stacked by rows; each original result is a column slice of
the wide output (a view: attention reads it with its strides). One launch instead of three fills the GPU
better and, at small batch, saves two launches per layer.

A group whose results reach an ``as_strided`` call is left alone: its strides were taken from the
unfused layout while tracing (Longformer's sliding-window chunks), and would read the wrong elements of
a slice of the wide output. So is a group where a ``view`` of a result would not fit a column slice
(``q(x).view(-1)`` merges the columns with the rows: a slice's rows are not back to back): the views
and reshapes taken of each result are replayed on the slice's layout (meta tensors) to check.

Stacking costs nothing per call: when the backend compiles the graph, :func:`lay_out_stacked_weights`
puts each group's weights back to back in one buffer (the parameters keep their values and identity;
only their storage moves), after which :func:`stacked_rows` is a view. Running the graph moves
nothing, so a CUDA graph captured of it has no side effects. Tensors that are not parameters (or are
parameters created under ``inference_mode``, or weights moved since) are concatenated on each call.
"""

import torch
from torch import fx

from kernl.integration.rules import Rule
from kernl.integration.rules._fx import example, is_function, is_method
from kernl.integration.rules.linear_act import LinearActArgs, linear_act_call


def _adjacent(tensors) -> bool:
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        if t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def lay_out(*tensors: torch.Tensor) -> None:
    """Move parameters ``tensors`` (weights ``(N_i, K)`` or biases ``(N_i,)``) back to back into one new
    storage, in order (same values, same objects); leaves them alone when they are already, or when one
    is not a parameter or was created under inference_mode (its storage cannot be replaced)."""
    if _adjacent(tensors) or not all(
        isinstance(t, torch.nn.Parameter) and not t.is_inference() for t in tensors
    ):
        return
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, even under inference_mode
        buffer, offset = torch.cat(tensors), 0
        for t in tensors:
            t.data = buffer[offset : offset + t.shape[0]]
            offset += t.shape[0]


def stacked_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """``torch.cat(tensors)`` (weights ``(N_i, K)`` or biases ``(N_i,)``): a view of their storage when they
    lie back to back in it (see :func:`lay_out`), else a new tensor. Moves nothing."""
    if not _adjacent(tensors):
        return torch.cat(tensors)
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _reaches_as_strided(nodes: list[fx.Node]) -> bool:
    """Whether a node computed from ``nodes`` is ``as_strided`` (strides fixed while tracing)."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        for user in stack.pop().users:
            if is_function(user, (torch.as_strided,)) or is_method(user, ("as_strided",)):
                return True
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return False


# Ops whose result can be a view of their input (method or function spelling): replayed by
# :func:`_views_fit` on the layout of a column slice of the wide output.
_VIEW_OPS = frozenset(
    "view view_as reshape reshape_as transpose permute unsqueeze squeeze expand expand_as narrow select t "
    "unflatten flatten movedim split chunk unbind contiguous getitem".split()
)


class _Unknown(Exception):
    """An argument the replay cannot stand in for."""


def _replay_value(node, values: dict):
    if not isinstance(node, fx.Node):
        return node
    if node in values:
        return values[node]
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if value is None or isinstance(value, int | float | bool):
        return value
    raise _Unknown


def _views_fit(nodes: list[fx.Node], limit: int = 256) -> bool:
    """Whether the views taken of each result (and of those views...) still work when the result is a
    column slice of the wide output: they are replayed on meta tensors with the slice's strides."""
    examples = [example(node) for node in nodes]
    if any(e is None or e.dim() == 0 for e in examples):
        return False
    wide = torch.empty(
        (*examples[0].shape[:-1], sum(e.shape[-1] for e in examples)), dtype=examples[0].dtype, device="meta"
    )
    values, stack, start = {}, [], 0
    for node, value in zip(nodes, examples, strict=True):
        values[node] = wide.narrow(-1, start, value.shape[-1])
        stack.append(node)
        start += value.shape[-1]
    while stack and len(values) < limit:
        for user in stack.pop().users:
            if user in values or user.op not in ("call_function", "call_method"):
                continue
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", None)
            if name not in _VIEW_OPS:
                continue  # a new tensor, laid out by the op
            try:
                args = fx.node.map_arg(user.args, lambda n: _replay_value(n, values))
                kwargs = fx.node.map_arg(user.kwargs, lambda n: _replay_value(n, values))
            except _Unknown:
                continue
            try:
                if user.op == "call_method":
                    values[user] = getattr(args[0], user.target)(*args[1:], **kwargs)
                else:
                    values[user] = user.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a view the slice's strides do not allow
                return False
            stack.append(user)
    return True


def _weight(call: fx.Node) -> fx.Node:
    return LinearActArgs(*call.args).weight


def _bias(call: fx.Node) -> fx.Node | None:
    return LinearActArgs(*call.args).bias


def _groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Plain projection calls grouped by (input, weight dtype and width, bias present)."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not linear_act_call:
            continue
        x, weight, bias, activation, residual = LinearActArgs(*node.args)
        w = example(weight)
        if activation is not None or residual is not None or w is None or weight.op != "placeholder":
            continue
        if bias is not None and getattr(bias, "op", None) != "placeholder":
            continue
        group = groups.setdefault((x, w.dtype, w.shape[1], bias is None), [])
        if weight not in (_weight(n) for n in group):  # a weight twice in one stack: the repeat stays apart
            group.append(node)
    # A weight can live in one buffer only: groups that would stack it with different neighbours
    # (weights shared across inputs in another combination) are left alone.
    stacks: dict[fx.Node, tuple] = {}
    merged = []
    candidates = (nodes for nodes in groups.values() if len(nodes) > 1 and not _reaches_as_strided(nodes))
    for nodes in (nodes for nodes in candidates if _views_fit(nodes)):
        stack = tuple(map(_weight, nodes)) + tuple(_bias(n) for n in nodes if _bias(n) is not None)
        if all(stacks.get(t, stack) == stack for t in stack):
            stacks.update(dict.fromkeys(stack, stack))
            merged.append(nodes)
    return merged


def rewrite(gm: fx.GraphModule) -> int:
    """Merge each group of projections into one call; return how many groups were merged."""
    groups = _groups(gm)
    for nodes in groups:
        first = LinearActArgs(*nodes[0].args)
        with gm.graph.inserting_before(nodes[0]):
            weight = gm.graph.call_function(stacked_rows, tuple(map(_weight, nodes)))
            bias = None if first.bias is None else gm.graph.call_function(
                stacked_rows, tuple(map(_bias, nodes))
            )  # fmt: skip
            wide_args = LinearActArgs(first.x, weight, bias, activation=None, residual=None)
            wide = gm.graph.call_function(linear_act_call, tuple(wide_args))
            parts, start = [], 0
            for node in nodes:
                width = example(_weight(node)).shape[0]
                parts.append(gm.graph.call_function(torch.narrow, (wide, -1, start, width)))
                start += width
        for node, part in zip(nodes, parts, strict=True):  # erased after the inserts: nodes[0] anchors them
            part.meta = dict(node.meta)
            node.replace_all_uses_with(part)
            gm.graph.erase_node(node)
    return len(groups)


def lay_out_stacked_weights(gm: fx.GraphModule, example_inputs) -> None:
    """Lay out (:func:`lay_out`) the weights and biases of every :func:`stacked_rows` call of ``gm``, whose
    arguments are graph inputs; ``example_inputs``: the tensors the backend compiles ``gm`` for, one per
    placeholder in order (the model's parameters among them)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs, strict=False))
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is stacked_rows and all(a in values for a in node.args):
            lay_out(*(values[arg] for arg in node.args))


RULE = Rule(
    name="fused_projections",
    matches="several kernl linear_act calls on one input without activation or residual (Q, K, V)",
    replacement="one linear_act call on the row-stacked weights, sliced back per projection",
    rewrite=rewrite,
)
