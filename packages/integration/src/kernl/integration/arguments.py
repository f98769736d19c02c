"""Naming a call's arguments as the forward's signature would, and what about a call decides its outputs."""

import inspect

import torch

from kernl.integration.hf_compat import CONFIG_FLAGS


def argument_namer(signature: inspect.Signature):
    """``name(args, kwargs) -> {name: value}``, as ``signature.bind`` would name them but
    several times faster (it runs on every call): positional arguments take the names of the leading
    parameters. ``None`` for a signature with
    positional-only parameters or ``*args`` (no Hugging Face model has them): such a forward is called
    as it was, without bucketing."""
    kinds = [p.kind for p in signature.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.POSITIONAL_ONLY in kinds:
        return None
    leading = [
        p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]

    def name(args: tuple, kwargs: dict) -> dict:
        if not args:
            return dict(kwargs)
        if len(args) > len(leading):
            signature.bind(*args, **kwargs)  # raises the TypeError a plain call would
        arguments = dict(zip(leading, args, strict=False))
        for key, value in kwargs.items():
            if key in arguments:
                raise TypeError(f"forward() got multiple values for argument '{key}'")
            arguments[key] = value
        return arguments

    return name


def call_kind(arguments: dict) -> tuple:
    """What decides a call's output structure: the argument names, and the plain values (flags)."""
    plain = (bool, int, float, str, type(None))
    return tuple((k, v if isinstance(v, plain) else type(v).__name__) for k, v in arguments.items())


def input_wants_gradients(args: tuple, kwargs: dict) -> bool:
    """Whether, under grad mode, a tensor argument requires grad (``inputs_embeds`` for attributions):
    kernl's kernels have no backward, so such a call runs the original forward."""
    values = (*args, *kwargs.values())
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def default_dropper(signature: inspect.Signature, config):
    """``drop(arguments) -> arguments`` without those that change nothing: ``None`` for a parameter whose
    default is ``None``, and an output flag (:data:`~kernl.integration.hf_compat.CONFIG_FLAGS`) equal to
    ``config``'s, which the forward would read anyway, or ``None`` while ``config``'s is false (transformers'
    output capture takes a ``None`` flag as false, a forward with the flag as a parameter reads ``config``'s).
    Calls that differ only there (``generate()`` passes ``output_attentions=False``, or ``None`` from a
    generation config that does not set it, a model's own forward ``inputs_embeds=None``) then share one
    compiled graph and one capture."""
    none_by_default = {p.name for p in signature.parameters.values() if p.default is None}
    unset = object()

    def unchanged_flag(name: str, value) -> bool:
        if name not in CONFIG_FLAGS:
            return False
        configured = getattr(config, name, unset)
        # return_dict=None is not "the config's": transformers' output capture then returns a tuple
        return value is configured or (value is None and name != "return_dict" and configured is False)

    def drop(arguments: dict) -> dict:
        return {
            name: value
            for name, value in arguments.items()
            if not (value is None and name in none_by_default) and not unchanged_flag(name, value)
        }

    return drop
