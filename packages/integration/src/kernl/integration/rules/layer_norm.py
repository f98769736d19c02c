"""Rule: ``F.layer_norm`` over the last dimension, and ``a + b -> layer_norm``, become
``kernl.layernorm.layer_norm`` (the second with ``residual=``, fused in one pass).

When the sum also feeds other nodes, they take the kernel's second output (``a + b``).
"""

import torch
from torch import fx

from kernl.integration import fallback
from kernl.integration.rules import Rule
from kernl.integration.rules._fx import (
    arg,
    autocast_dtype,
    cast_all,
    example,
    is_add,
    is_function,
    replace_with_norm_call,
    same_layout,
)
from kernl.layernorm import layer_norm

LAYER_NORM_TARGETS = (torch.nn.functional.layer_norm, torch.layer_norm)


def layer_norm_call(x, weight, bias, eps, residual):
    """What the graph calls in place of the matched nodes. Autocast on CUDA runs layer_norm in fp32 (CPU
    autocast leaves it alone) but not the add feeding it: the sum is taken in the inputs' dtype first."""
    if x.device.type != "cpu" and autocast_dtype(x.device.type) is not None:
        if residual is not None:
            summed = x + residual
            return layer_norm_call(summed, weight, bias, eps, None), summed
        x, weight, bias = cast_all(torch.float32, x, weight, bias)
    return fallback.call("layer_norm", layer_norm, _pytorch, x, weight, bias, eps, residual)


def _pytorch(x, weight, bias, eps, residual):
    summed = x if residual is None else x + residual
    normed = torch.nn.functional.layer_norm(summed, (x.shape[-1],), weight, bias, eps)
    return normed if residual is None else (normed, summed)


def _match(node: fx.Node):
    x, shape = arg(node, 0, "input"), arg(node, 1, "normalized_shape")
    weight, bias, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)
    ex = example(x)
    if ex is None or ex.dim() == 0 or not isinstance(shape, (tuple, list)) or list(shape) != [ex.shape[-1]]:
        return None
    if not isinstance(eps, float | int):
        return None
    residual = None
    later = all(u is node or u > node for u in x.users)  # the fused call stands where the norm is
    if is_add(x) and same_layout(*x.args) and same_layout(x.args[0], x) and later:
        x, residual = x.args
    return x, weight, bias, float(eps), residual


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each layer norm (with its residual add where there is one); return how many."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_function(node, LAYER_NORM_TARGETS) or (match := _match(node)) is None:
            continue
        source = arg(node, 0, "input") if match[-1] is not None else None
        replace_with_norm_call(gm, node, layer_norm_call, match, [node], source)
        replaced += 1
    return replaced


RULE = Rule(
    name="layer_norm",
    matches="F.layer_norm over the last dimension, optionally fed by a + b of one shape and dtype",
    replacement="kernl.layernorm.layer_norm(x, w, b, eps[, residual=]) (fused add + norm)",
    rewrite=rewrite,
)
