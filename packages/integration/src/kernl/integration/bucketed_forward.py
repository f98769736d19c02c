"""The forward ``optimize_model`` installs: pad the sequence to a bucket length (padding is masked out),
call the compiled forward by keyword, and cut the outputs back to the caller's length. A kind of call
whose outputs cannot be cut back runs at the caller's length from then on. The forward remembers which
padded calls it has compiled (``forward.has_graph``), so that the packed path can leave it a call it
already has a graph for."""

import functools
import inspect

import torch

from kernl.integration.arguments import argument_namer, call_kind, default_dropper, input_wants_gradients
from kernl.integration.buckets import bucket
from kernl.integration.forward_graphs import Unkeyable, describe, signature
from kernl.integration.padding import cut_outputs, one_sequence_a_row, pad_arguments
from kernl.integration.speed_check import SpeedCheck


def _describe_signature(named: dict) -> str:
    """E.g. ``batch 8 x length bucket 128``: what the call's graph serves, for the speed check's record."""
    token_input = named.get("input_ids")
    token_input = named.get("inputs_embeds") if token_input is None else token_input
    if token_input is None or token_input.dim() < 2:
        return "inputs " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in named.items() if hasattr(v, "shape"))
    return f"batch {token_input.shape[0]} x length bucket {token_input.shape[1]}"


def bucket_key(arguments: dict, token_input: torch.Tensor, runs_at: int) -> tuple | None:
    """What the compiled call of a one-sequence-a-row call (``arguments`` named, ``token_input`` its
    ``input_ids`` or ``inputs_embeds``) run at ``runs_at`` positions depends on, as
    :func:`~kernl.integration.forward_graphs.signature` of the padded call would say it: the autocast and
    inference-mode state, ``runs_at``, each tensor's name, batch, trailing sizes, dtype and device (the
    mask of ones padding makes when there is none included), every other argument's value. Calls with
    equal keys run one compiled graph and one capture. None for an argument the capture key cannot
    describe either (an arbitrary object: such a call runs uncaptured)."""
    parts = [
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        torch.is_inference_mode_enabled(),
        runs_at,
    ]
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            parts.append((name, value.shape[0], value.shape[2:], value.dtype, value.device))
        else:  # containers item by item, as the capture key: a list argument is not hashable
            try:
                parts.append((name, describe(value)))
            except Unkeyable:
                return None
    if runs_at != token_input.shape[1] and arguments.get("attention_mask") is None:  # see pad_arguments
        parts.append(("attention_mask", token_input.shape[0], (), torch.long, token_input.device))
    return tuple(parts)


def bucketed_forward(
    model,
    compiled,
    original,
    buckets,
    pad_id: int,
    longest: int | None = None,
    speed: SpeedCheck | None = None,
):
    """The forward kernl installs: ``compiled`` called by keyword on the arguments padded to a bucket
    length (see the module docstring), ``original`` in training mode or for a call that wants gradients.

    ``buckets``: sorted bucket lengths (empty: no padding); ``pad_id``: the token that pads ``input_ids``;
    ``longest``: the positions of the model's position table (None: no table). A longer input without
    ``position_ids`` raises ``ValueError`` naming it (compiling it would fail deep inside TorchDynamo).
    ``speed``: the never-slower check (:mod:`kernl.integration.speed_check`; None: none), judging each
    input signature of ``compiled`` against ``original`` on the same (padded) arguments.

    ``forward.has_graph(arguments)``: whether a call of ``arguments`` (named as ``original``'s parameters;
    one sequence a row, see :func:`~kernl.integration.padding.one_sequence_a_row`) would run a graph this
    forward has compiled already (its :func:`bucket_key` was recorded by an earlier call).
    """
    name_arguments = argument_namer(inspect.signature(original))
    drop_defaults = default_dropper(inspect.signature(original), getattr(model, "config", None))
    unpadded_only = set()  # kinds of call (see call_kind) whose outputs cannot be cut back
    compiled_keys: dict[tuple, set] = {}  # (batch, positions run at) -> bucket_key of each such call compiled

    def remember(arguments: dict, token_input: torch.Tensor, runs_at: int) -> None:
        shape = (token_input.shape[0], runs_at)
        key = bucket_key(arguments, token_input, runs_at)
        if key is not None:
            compiled_keys.setdefault(shape, set()).add(key)

    def call(named: dict):  # by keyword: positional and keyword calls share a capture
        with torch.no_grad():
            if speed is None:
                return compiled(**named)
            return speed.run(
                signature((), named),
                _describe_signature(named),
                lambda: compiled(**named),
                lambda: original(**named),
            )

    @functools.wraps(original)  # inspect.signature(model.forward) still tells the model's arguments
    def forward(*args, **kwargs):
        if model.training or input_wants_gradients(args, kwargs):  # dropout or gradients: plain PyTorch
            return original(*args, **kwargs)
        if name_arguments is None:
            with torch.no_grad():
                return compiled(*args, **kwargs)
        arguments = drop_defaults(name_arguments(args, kwargs))
        ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        token_input = ids if ids is not None else embeds
        if token_input is None or not one_sequence_a_row(arguments):
            return call(arguments)  # multiple choice (B, choices, S), a 4-D mask, a cache: run as called
        length = token_input.shape[1]
        if longest is not None and length > longest and arguments.get("position_ids") is None:
            name = "input_ids" if ids is not None else "inputs_embeds"
            raise ValueError(
                f"{name} has {length} positions, more than the {longest} of this model's position table "
                "(config.max_position_embeddings)"
            )
        padded = bucket(length, buckets)
        if padded == length:
            remember(arguments, token_input, padded)
            return call(arguments)
        kind = (padded, call_kind(arguments))
        if kind not in unpadded_only:
            remember(arguments, token_input, padded)
            cut = cut_outputs(
                call(pad_arguments(arguments, token_input, padded - length, pad_id)), length, padded
            )
            if cut is not None:
                return cut
            unpadded_only.add(kind)  # outputs such a call cannot cut: run it as called from now on
        remember(arguments, token_input, length)
        return call(arguments)

    def has_graph(arguments: dict) -> bool:
        ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        token_input = ids if ids is not None else embeds
        runs_at = bucket(token_input.shape[1], buckets)
        keys = compiled_keys.get((token_input.shape[0], runs_at))  # most calls end here: none of that shape
        return keys is not None and bucket_key(drop_defaults(arguments), token_input, runs_at) in keys

    forward.has_graph = has_graph
    return forward
