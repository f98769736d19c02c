"""Relative-position tables computed once, outside the captured forward (MPNet, DeBERTa v1/v2/v3).

MPNet and DeBERTa compute, in every forward, which relative-position bucket each (query, key) pair
falls in. Some transformers releases do part of that on the CPU and copy the result to the GPU
(MPNet's ``rp_bucket.to(x.device)`` in 5.17; DeBERTa-v2's ``torch.tensor(mid - 1).type_as(...)``),
and a host-to-device copy cannot be captured in a CUDA graph ("Cannot copy between CPU and CUDA
tensors during CUDA graph capture"): the whole forward then ran kernel by kernel through Python.

The bucket table depends only on the distance between positions. It is computed once here, by the
model's own code on the model's device (so it holds exactly what that release computes), for the
longest sequence the model takes, and kept as a non-persistent buffer of the encoder (it moves with
``model.to()`` and is not in the state dict). The encoder's method is replaced, on that instance
only, by one that slices the table: the captured forward reads it in place. Calls the table does not
cover (explicit ``position_ids``, longer sequences, a cross-attention query) run the original method.
"""

import inspect

import torch

TABLE = "kernl_position_table"  # the encoder buffer holding the table
INSTALLED_METHODS = ("compute_position_bias", "get_rel_pos")  # instance attributes set here


def _encoder_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(MPNet encoder classes, DeBERTa encoder classes) of the installed transformers."""
    from transformers.models.deberta.modeling_deberta import DebertaEncoder
    from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    return (MPNetEncoder,), (DebertaEncoder, DebertaV2Encoder)


def _longest(model: torch.nn.Module) -> int:
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return longest if isinstance(longest, int) and longest > 0 else 512


def _probe(encoder: torch.nn.Module, length: int) -> torch.Tensor:
    """A stand-in for hidden states of ``length`` positions on the encoder's device (the position code
    reads only the batch size, the length and the device)."""
    device = next(encoder.parameters()).device
    return torch.empty(1, length, 0, device=device)


def _mpnet_table(encoder: torch.nn.Module, length: int) -> torch.Tensor:
    """int64 ``(length, length)``: the bucket of each (query, key) pair, as MPNet's own
    ``compute_position_bias`` hands it to ``relative_attention_bias``."""
    seen = []
    hook = encoder.relative_attention_bias.register_forward_pre_hook(
        lambda module, args: seen.append(args[0])
    )
    try:
        encoder.compute_position_bias(_probe(encoder, length))
    finally:
        hook.remove()
    return seen[0].reshape(length, length).clone()


def _install_mpnet(encoder: torch.nn.Module, length: int) -> None:
    original = encoder.compute_position_bias
    # the default MPNetEncoder.forward calls it with (the table is made with it too)
    default_buckets = inspect.signature(original).parameters["num_buckets"].default
    encoder.register_buffer(TABLE, _mpnet_table(encoder, length), persistent=False)

    def compute_position_bias(x, position_ids=None, num_buckets=default_buckets):
        table = getattr(encoder, TABLE)
        length = x.size(1)
        if position_ids is not None or num_buckets != default_buckets or length > table.shape[0]:
            return original(x, position_ids=position_ids, num_buckets=num_buckets)
        values = encoder.relative_attention_bias(table[:length, :length])
        values = values.permute([2, 0, 1]).unsqueeze(0)  # as transformers: (1, heads, length, length)
        return values.expand((x.size(0), -1, length, length)).contiguous()

    encoder.compute_position_bias = compute_position_bias


def _install_deberta(encoder: torch.nn.Module, length: int) -> None:
    original = encoder.get_rel_pos
    encoder.register_buffer(TABLE, original(_probe(encoder, length)).clone(), persistent=False)

    def get_rel_pos(hidden_states, query_states=None, relative_pos=None):
        table = getattr(encoder, TABLE)
        length = hidden_states.size(-2)
        if relative_pos is not None or query_states is not None or length > table.shape[-1]:
            return original(hidden_states, query_states, relative_pos)
        return table[:, :length, :length]

    encoder.get_rel_pos = get_rel_pos


def precompute_position_tables(model: torch.nn.Module) -> list[str]:
    """Install the tables on every MPNet and DeBERTa encoder inside ``model`` (see the module docstring);
    returns a line per encoder for the report (empty: nothing to do)."""
    mpnet, deberta = _encoder_classes()
    length = _longest(model)
    lines = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if TABLE in module._buffers:
                continue
            if isinstance(module, mpnet):
                _install_mpnet(module, length)
            elif isinstance(module, deberta) and module.relative_attention:
                _install_deberta(module, length)
            else:
                continue
            lines.append(
                f"relative-position buckets of {name or type(module).__name__} computed once ({length} x "
                f"{length} positions), outside the captured forward"
            )
    return lines
