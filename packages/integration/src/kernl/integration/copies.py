"""Copies of an optimized model: ``copy.deepcopy`` gives a plain PyTorch model.

kernl's forward (and ``generate()``) are closures over the model they were installed on, and its CUDA
graphs read that model's weights in place. A deep copy would carry the same closures: the copy would
compute with the original's weights (change the copy's weights and its outputs would not follow). So
the copy is made without anything kernl installed, and a warning says to optimize it if wanted.
"""

import copy

import torch

from kernl.integration import position_tables
from kernl.integration.user_warnings import warn

# What kernl puts in a module's __dict__ (the hook below included).
INSTALLED = (
    "forward",
    "generate",
    "_prepare_static_cache",
    "kernl_report",
    "kernl_cuda_graphs",
    "kernl_packed_graphs",
    "kernl_decoder_graphs",
    "kernl_decode_loop",
    "kernl_original_forward",
    "kernl_original_generate",
    "__deepcopy__",
    *position_tables.INSTALLED_METHODS,
)


def copies_unoptimized(model: torch.nn.Module) -> None:
    """Make ``copy.deepcopy(model)`` return the model as it was before kernl (its weights and state
    copied, none of kernl's closures, graphs, reports or position tables), with a warning."""

    def deepcopy(memo: dict) -> torch.nn.Module:
        for module in model.modules():  # not copied: each stands for None in the copy, then is removed
            for name in INSTALLED:
                if name in module.__dict__:
                    memo[id(module.__dict__[name])] = None
        hook = model.__dict__.pop("__deepcopy__")
        try:
            copied = copy.deepcopy(model, memo)
        finally:
            model.__dict__["__deepcopy__"] = hook
        for module in copied.modules():
            for name in INSTALLED:
                module.__dict__.pop(name, None)
            module._buffers.pop(position_tables.TABLE, None)
        warn(
            "kernl: a copy of an optimized model is a plain PyTorch model; call optimize_model on it "
            "to run it on kernl",
        )
        return copied

    model.__dict__["__deepcopy__"] = deepcopy
