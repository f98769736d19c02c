"""What optimize_model accepts, and why it would leave a model unchanged."""

import os

import torch


def model_type(model: torch.nn.Module) -> str | None:
    """``model.config.model_type``; None for a module without a transformers config (a user's own
    module around a transformers model)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def check_module(model) -> None:
    """Raise ``TypeError`` when ``model`` is not a ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")


def check_model(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` for a model kernl cannot take: in training mode, or without parameters."""
    if model.training:
        raise ValueError("optimize_model is for inference: call model.eval() first")
    if next(model.parameters(), None) is None:
        raise ValueError(f"model ({type(model).__name__}) has no parameters: nothing for kernl to run")


def check_flag(name: str, value) -> None:
    """Raise ``TypeError`` naming ``name`` when ``value`` is not a bool (a switch of ``optimize_model``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def checked_buckets(buckets) -> tuple[int, ...]:
    """``buckets`` sorted, after checking they are positive integers."""
    try:
        values = tuple(buckets)
    except TypeError:
        raise TypeError(f"buckets must be a sequence of positive ints, got {buckets!r}") from None
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in values):
        raise ValueError(f"buckets must be a non-empty sequence of positive ints, got {buckets!r}")
    return tuple(sorted(values))


def unsupported_reason(device: torch.device) -> str | None:
    """Why kernl cannot run on ``device`` (a GPU below compute capability 8.0, a CPU without Triton's
    interpreter), or None."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"GPU compute capability {major}.{minor} < 8.0: kernl's kernels need Ampere or newer"
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"model is on {device.type}, not a CUDA GPU: kernl needs a GPU of compute capability >= 8.0 "
        "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU for debugging)"
    )


def unknown_model_reason(model: torch.nn.Module) -> str | None:
    """Why a module without a transformers config is left alone (None for a transformers model): nothing
    tells what its own forward does between the transformers calls (a branch on a tensor's value would
    be replayed as captured); the transformers models inside it can be optimized instead."""
    if model_type(model) is not None:
        return None
    inner = [name for name, module in model.named_modules() if name and model_type(module) is not None]
    outermost = [name for name in inner if not any(name.startswith(other + ".") for other in inner)]
    hint = (
        f"call optimize_model on the transformers model inside it ({', '.join(f'model.{n}' for n in outermost)})"
        if outermost
        else "it holds no transformers model"
    )
    return f"{type(model).__name__} is not a transformers model (no config.model_type): {hint}"
