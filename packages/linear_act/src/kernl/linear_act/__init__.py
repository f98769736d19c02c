"""kernl.linear_act: fused ``act(x @ W.T + b) [+ residual]`` and the T5 v1.1 gated FFN, one kernel each.

>>> from kernl.linear_act import linear_act, gated_linear_act
"""

from kernl.linear_act.functional import ALIASES, gated_linear_act, linear_act
from kernl.linear_act.reference import TORCH_ACTIVATIONS, gated_linear_act_reference, linear_act_reference
from kernl.matmul import ACTIVATIONS

__all__ = [
    "ACTIVATIONS",
    "ALIASES",
    "TORCH_ACTIVATIONS",
    "gated_linear_act",
    "gated_linear_act_reference",
    "linear_act",
    "linear_act_reference",
]
