"""Padding a call's per-token inputs to a bucket length, and cutting the padded positions off its outputs."""

import torch

from kernl.integration.trees import holds_objects, map_tensors, tensors_in

# Per-token inputs the wrapper pads (input_ids with the pad token, the others with zeros).
PADDED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
# 2-D ModelOutput fields with one value per token, cut back like 3-D hidden states: by field name, and by
# output class for fields whose name does not tell (ELECTRA's discriminator logits are (B, S)).
_PER_TOKEN_2D = ("start_logits", "end_logits")
_PER_TOKEN_2D_BY_OUTPUT = {"ElectraForPreTrainingOutput": ("logits",)}
# 2-D ModelOutput fields with one value per sequence (a pooler output as wide as a bucket is not cut).
_PER_SEQUENCE_2D = ("pooler_output",)


def one_sequence_a_row(arguments: dict) -> bool:
    """Whether every tensor argument is a per-token input of one ``(B, S)`` layout (``inputs_embeds``
    ``(B, S, H)``) and no argument is an object (a cache of earlier positions): the calls bucketing pads."""
    tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
    if any(k not in PADDED_INPUTS for k in tensors) or holds_objects(arguments):
        return False
    shapes = {
        tuple(t.shape[:2]) if k == "inputs_embeds" and t.dim() == 3 else tuple(t.shape)
        for k, t in tensors.items()
    }
    return len(shapes) == 1 and len(next(iter(shapes))) == 2


def pad_arguments(arguments: dict, token_input: torch.Tensor, extra: int, pad_id: int) -> dict:
    """``arguments`` with every per-token input right-padded by ``extra`` positions (a mask of ones for
    the real tokens of ``token_input``, ``(B, S[, H])``, is made when there is none: the padding is
    masked out)."""
    padded = dict(arguments)
    if padded.get("attention_mask") is None:
        padded["attention_mask"] = torch.ones(
            token_input.shape[:2], dtype=torch.long, device=token_input.device
        )
    for name in PADDED_INPUTS:
        value = padded.get(name)
        if value is None:
            continue
        fill = pad_id if name == "input_ids" else 0
        pad = (0, 0, 0, extra) if name == "inputs_embeds" else (0, extra)
        padded[name] = torch.nn.functional.pad(value, pad, value=fill)
    return padded


def _cut(t: torch.Tensor, length: int, padded: int) -> torch.Tensor:
    """Cut padded positions off a per-token output: dim 1 of a 3-D tensor, the last two of a 4-D map."""
    if t.dim() == 3 and t.shape[1] == padded:
        return t[:, :length].contiguous()
    if t.dim() == 4 and t.shape[-1] == padded and t.shape[-2] == padded:
        return t[..., :length, :length].contiguous()
    return t


def cut_outputs(output, length: int, padded: int):
    """``output`` with the padded positions cut off, or ``None`` when that cannot be done safely.

    A 2-D output ``(B, padded)`` may hold one value per token (question answering's ``start_logits``)
    or per sequence (a pooler output or classification logits as wide as the bucket): in a ModelOutput
    the field name, or the output class, tells for the fields of :data:`_PER_TOKEN_2D`,
    :data:`_PER_TOKEN_2D_BY_OUTPUT` and :data:`_PER_SEQUENCE_2D`; for any other field as wide as the
    bucket, and in a plain tuple, nothing does, so ``None``."""
    if holds_objects(output):  # a returned key/value cache: as long as the padded input, cannot be cut
        return None
    if isinstance(output, dict):
        per_token_fields = _PER_TOKEN_2D + _PER_TOKEN_2D_BY_OUTPUT.get(type(output).__name__, ())
        cut = type(output).__new__(type(output))
        for key, item in output.items():
            flat = isinstance(item, torch.Tensor) and item.dim() == 2 and key not in _PER_SEQUENCE_2D
            if flat and key in per_token_fields:
                cut[key] = item[:, :length].contiguous()
            elif flat and item.shape[-1] == padded:
                return None
            else:
                cut[key] = map_tensors(lambda t: _cut(t, length, padded), item)
        return cut
    if any(t.dim() == 2 and t.shape[-1] == padded for t in tensors_in(output)):
        return None
    return map_tensors(lambda t: _cut(t, length, padded), output)
