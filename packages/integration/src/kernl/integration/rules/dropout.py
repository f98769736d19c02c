"""Rule: remove dropout that is a no-op (eval mode, ``training=False``, or ``p == 0``)."""

import torch
from torch import fx

from kernl.integration.rules import Rule
from kernl.integration.rules._fx import arg, is_function

DROPOUT_TARGETS = (torch.nn.functional.dropout, torch.dropout)


def _is_identity(node: fx.Node) -> bool:
    if node.target is torch.dropout:  # torch.dropout(input, p, train)
        p, training = arg(node, 1, "p"), arg(node, 2, "train")
    else:  # F.dropout(input, p=0.5, training=True, inplace=False)
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    return training is False or p == 0


def rewrite(gm: fx.GraphModule) -> int:
    """Replace every no-op dropout by its input; return how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if is_function(node, DROPOUT_TARGETS) and _is_identity(node):
            node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
            gm.graph.erase_node(node)
            removed += 1
    return removed


RULE = Rule(
    name="dropout",
    matches="F.dropout / torch.dropout with training=False or p=0 (eval mode)",
    replacement="its input (the node is removed)",
    rewrite=rewrite,
)
