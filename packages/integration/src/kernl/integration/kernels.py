"""Where the rules find the kernels: the public functions of the kernl kernel packages.

A kernel package that is not installed, or does not expose its function yet, makes :func:`find` return
None; the rule that needs it then leaves the graph as it was and the report says so.
"""

import importlib

KERNELS = {
    "linear_act": ("kernl.linear_act", "linear_act"),
    "attention": ("kernl.flash_attention", "attention"),
    "layer_norm": ("kernl.layernorm", "layer_norm"),
    "rms_norm": ("kernl.layernorm", "rms_norm"),
    "overflow_clamp": ("kernl.layernorm", "overflow_clamp"),
    "gated_linear_act": ("kernl.linear_act", "gated_linear_act"),
}


def find(name: str):
    """The kernel function called ``name`` (a key of ``KERNELS``), or None when it is not available."""
    module_name, attribute = KERNELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, attribute, None)


def qualified_name(name: str) -> str:
    """``module.function`` of kernel ``name``, for messages."""
    module_name, attribute = KERNELS[name]
    return f"{module_name}.{attribute}"
