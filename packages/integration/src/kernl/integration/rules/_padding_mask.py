"""Recover a key padding mask ``[B, K]`` from the dense ``[B, 1, Q, K]`` mask a graph builds.

Transformers builds its attention mask from the ``attention_mask`` input through code that changes
between releases (``.to(bool)``, fancy indexing with aranges, ``&`` with a causal term, ``where`` into
an additive float mask...). Rather than match that spelling, :func:`key_padding_source` checks the
mask's meaning: the nodes that compute it must depend on exactly one graph input, a ``[B, K]`` tensor,
and running those nodes on test masks must give "attend to key k of row b iff input[b, k] != 0" for
every query and head. Then the kernel can take ``input != 0`` instead of the dense mask. A mask that
depends on no graph input and lets everything through (:func:`attends_everywhere`) is dropped.
"""

import torch
from torch import fx

from kernl.integration.rules._fx import example

ADDITIVE_MASKED = -1e4  # an additive mask entry at or below this blocks the key


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return [n for n in node.graph.nodes if n in seen]


def _test_masks(batch: int, keys: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ones = torch.ones(batch, keys)
    right = ones.clone()
    right[:, keys // 2 + 1 :] = 0
    left = ones.clone()
    left[:, : keys // 2] = 0
    random = (torch.rand(batch, keys, generator=generator) < 0.5).float()
    random[:, -1] = 1
    return [m.to(device=device, dtype=dtype) for m in (ones, right, left, random)]


def _means_key_padding(mask: torch.Tensor, source: torch.Tensor, additive: bool, heads: int, queries: int):
    if mask.dim() != 4 or mask.shape[1] not in (1, heads) or mask.shape[2] not in (1, queries):
        return False
    attend = (source != 0)[:, None, None, :].expand(mask.shape[0], mask.shape[1], mask.shape[2], -1)
    if mask.shape[0] != source.shape[0] or mask.shape[3] != source.shape[1]:
        return False
    if not additive:
        return mask.dtype == torch.bool and torch.equal(mask, attend)
    return bool((mask[attend] == 0).all()) and bool((mask[~attend] <= ADDITIVE_MASKED).all())


def _size_input(node: fx.Node) -> int | None:
    """The size a graph input stands for when it is one (a symbolic token count, recorded as the traced
    call's size: :func:`kernl.integration.dynamic_tokens.concrete_examples`), else None."""
    if node.op != "placeholder":
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _program(mask: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]] | None:
    """The nodes computing ``mask`` as a standalone program, and its tensor graph inputs (None: not
    replayable). A size input is replayed as the traced call's size, the one the tensor examples have."""
    ancestors = _ancestors(mask)
    if any(n.op not in ("placeholder", "call_function", "call_method") for n in ancestors):
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node | int] = {}
    for node in [*ancestors, mask]:
        size = _size_input(node)
        env[node] = size if size is not None else graph.node_copy(node, lambda n: env[n])
    graph.output(env[mask])
    inputs = [n for n in ancestors if n.op == "placeholder" and _size_input(n) is None]
    return fx.GraphModule(torch.nn.Module(), graph), inputs


def constant_value(node) -> torch.Tensor | None:
    """The value of ``node`` when it depends on no graph input (its nodes replayed here), else None."""
    found = _program(node) if isinstance(node, fx.Node) else None
    if found is None or found[1]:
        return None
    try:
        value = found[0]()
    except Exception:  # an op we cannot replay here: not a constant we know
        return None
    return value if isinstance(value, torch.Tensor) else None


def attends_everywhere(mask: fx.Node, additive: bool) -> bool:
    """True when ``mask`` depends on no graph input and lets every query attend every key.

    Transformers releases that cannot skip the mask while tracing (5.17) build such a mask, all True,
    from ``arange`` when no ``attention_mask`` is given: the kernel is better off without it.
    """
    value = constant_value(mask)  # None: it reads an input, or an op we cannot replay here: keep the mask
    if value is None:
        return False
    if additive:
        return bool((value == 0).all())
    return value.dtype == torch.bool and bool(value.all())


def key_padding_source(mask: fx.Node, heads: int, queries: int, additive: bool) -> fx.Node | None:
    """The graph input ``[B, K]`` whose ``!= 0`` is exactly what ``mask`` lets attend, else None.

    ``additive``: ``mask`` is a float mask added to the scores (0 = attend, very negative = blocked);
    otherwise a bool mask (True = attend). The check runs the mask's nodes on the input's device.
    """
    found = _program(mask)
    if found is None or len(found[1]) != 1:
        return None
    program, (source_node,) = found
    source = example(source_node)
    if source is None or source.dim() != 2:
        return None
    try:
        for test in _test_masks(*source.shape, source.dtype, source.device):
            if not _means_key_padding(program(test), test, additive, heads, queries):
                return None
    except Exception:  # an op we cannot replay here: fall back to the dense mask
        return None
    return source_node


def key_padding_node(gm: fx.GraphModule, source: fx.Node) -> fx.Node:
    """A node computing ``source != 0`` (bool ``[B, K]``), shared by every attention of the graph."""
    for user in source.users:
        if user.meta.get("kernl_key_padding"):
            return user
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first_op):
        node = gm.graph.call_function(torch.ne, (source, 0))
    node.meta["kernl_key_padding"] = True
    return node
