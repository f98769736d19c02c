"""Rule: ``linear`` [-> activation] [-> + residual] becomes one ``kernl.linear_act.linear_act`` call.

Matches ``torch._C._nn.linear`` (= ``F.linear``) nodes; when the linear's only user is a supported
activation (gelu, gelu(approximate="tanh"), relu, tanh, silu; function or method spelling) it is fused,
and when the result's only user is ``+`` with a tensor of the same shape and dtype, that residual add
is fused into the kernel's epilogue too.
"""

from typing import NamedTuple

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
    is_method,
    only_user,
    replace_with_call,
    same_layout,
)
from kernl.linear_act import linear_act

F = torch.nn.functional
LINEAR_TARGETS = (F.linear,)
_FUNCTION_ACTIVATIONS = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.silu: "silu",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "tanh": "tanh"}


# What each activation computes in PyTorch (the fallback; gated_ffn's probes).
TORCH_ACTIVATIONS = {
    None: lambda t: t,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
}


class LinearActArgs(NamedTuple):
    """The arguments of :func:`linear_act_call`, in its order: graph nodes (tensors) or constants."""

    x: object
    weight: object
    bias: object
    activation: str | None  # a kernel activation name (see TORCH_ACTIVATIONS), None: none
    residual: object


def _pytorch(x, weight, bias, activation, residual):
    out = TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
    return out if residual is None else out + residual


def linear_act_call(x, weight, bias, activation, residual):
    """What the graph calls in place of the matched nodes.

    Under autocast the matmul runs in the autocast dtype; a residual kept in fp32 (as autocast keeps
    the residual stream) is then added outside the kernel, in fp32, as PyTorch would.
    """
    dtype = autocast_dtype(x.device.type)
    x, weight, bias = cast_all(dtype, x, weight, bias)
    if residual is not None and residual.dtype != x.dtype:
        return fallback.call("linear_act", linear_act, _pytorch, x, weight, bias, activation, None) + residual
    return fallback.call("linear_act", linear_act, _pytorch, x, weight, bias, activation, residual)


def _activation(node: fx.Node, source: fx.Node) -> str | None:
    """The kernel's name for the activation ``node`` applies to ``source``, or None."""
    if node.args[:1] != (source,) and node.kwargs.get("input") is not source:
        return None
    if is_function(node, (F.gelu,)):
        approximate = arg(node, 1, "approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if is_function(node, tuple(_FUNCTION_ACTIVATIONS)):
        return None if arg(node, 1, "inplace", False) else _FUNCTION_ACTIVATIONS[node.target]
    if is_method(node, tuple(_METHOD_ACTIVATIONS)) and len(node.args) == 1 and not node.kwargs:
        return _METHOD_ACTIVATIONS[node.target]
    return None


def _match(node: fx.Node):
    x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    w, ex = example(weight), example(x)
    # x and the weight may differ in dtype only under autocast (fp16 activations, fp32 weights):
    # the call casts both to the autocast dtype, as F.linear does there
    if w is None or ex is None or w.dim() != 2 or ex.dim() < 2:
        return None
    if not (ex.dtype.is_floating_point and w.dtype.is_floating_point):
        return None
    if bias is not None and example(bias) is None:
        return None
    absorbed, last, activation, residual = [node], node, None, None
    user = only_user(last)
    if user is not None and (name := _activation(user, last)) is not None:
        absorbed, last, activation = absorbed + [user], user, name
    user = only_user(last)
    if user is not None and is_add(user):
        other = user.args[1] if user.args[0] is last else user.args[0]
        if other is not last and isinstance(other, fx.Node) and same_layout(other, last):
            absorbed, last, residual = absorbed + [user], user, other
    return LinearActArgs(x, weight, bias, activation, residual), absorbed


def rewrite(gm: fx.GraphModule) -> int:
    """Replace each matched linear chain by one kernel call; return how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_function(node, LINEAR_TARGETS):  # absorbed nodes are never linears
            continue
        match = _match(node)
        if match is None:
            continue
        call_args, absorbed = match
        replace_with_call(gm, absorbed[-1], linear_act_call, tuple(call_args), absorbed)
        replaced += 1
    return replaced


RULE = Rule(
    name="linear_act",
    matches="F.linear [-> gelu | gelu_tanh | relu | tanh | silu] [-> + residual of the same shape]",
    replacement="kernl.linear_act.linear_act(x, W, b, activation=..., residual=...)",
    rewrite=rewrite,
)
