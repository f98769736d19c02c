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
only, by one that reads the table: the captured forward reads it in place. Calls the table does not
cover (explicit ``position_ids``, other bucket counts, DeBERTa's longer sequences or cross-attention
query) run the original method.

MPNet's table holds one bucket per distance ``key - query`` (its ``(L, L)`` table is constant along
diagonals: checked when it is made), out to where the buckets stop growing. Its bias is handed on as
one :func:`relative_position_bias` node: a per-head table by distance, which dense attention expands
to ``(1, H, L, L)`` and packed attention (:mod:`kernl.integration.rules.packed_attention`) reads per
block inside the kernel, within each packed row.
"""

import inspect

import torch

from kernl.flash_attention import expand_relative_bias


@torch.library.custom_op("kernl::relative_position_bias", mutates_args=())
def relative_position_bias(by_distance: torch.Tensor, length: int) -> torch.Tensor:
    """The dense bias ``(1, H, length, length)`` of a per-head table by distance ``(H, 2R + 1)``: entry
    ``(h, i, j)`` is ``by_distance[h, clamp(j - i, -R, R) + R]`` (:func:`expand_relative_bias`). One opaque
    graph node, so that packed attention can take the table instead of the dense tensor."""
    return expand_relative_bias(by_distance, length)[None]


@relative_position_bias.register_fake
def _(by_distance, length):
    return by_distance.new_empty((1, by_distance.shape[0], length, length))


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


def mpnet_probe_length(encoder: torch.nn.Module, length: int) -> int:
    """Positions MPNet's table is probed over: the longest sequence, and at least 4x the distance past
    which its buckets stop growing (``max_distance``, 128), so that longer distances share the last
    entry (the log bucket there is far above the top bucket, which caps it)."""
    max_distance = inspect.signature(encoder.relative_position_bucket).parameters["max_distance"].default
    return max(length, 4 * max_distance + 1)


def _mpnet_table(encoder: torch.nn.Module, length: int) -> torch.Tensor | None:
    """int64 ``(2P - 1,)``: the bucket of each distance ``key - query`` in ``[1 - P, P - 1]`` (index
    ``distance + P - 1``, ``P`` = :func:`mpnet_probe_length`), as MPNet's own ``compute_position_bias``
    hands it to ``relative_attention_bias``; None when its ``(P, P)`` buckets are not one per distance."""
    positions = mpnet_probe_length(encoder, length)
    seen = []
    hook = encoder.relative_attention_bias.register_forward_pre_hook(
        lambda module, args: seen.append(args[0])
    )
    try:
        encoder.compute_position_bias(_probe(encoder, positions))
    finally:
        hook.remove()
    square = seen[0].reshape(positions, positions)
    by_distance = torch.cat([square[1:, 0].flip(0), square[0]])  # column 0: -i, row 0: +j
    index = torch.arange(positions, device=square.device)
    diagonals = by_distance[index[None, :] - index[:, None] + positions - 1]
    return by_distance.clone() if torch.equal(diagonals, square) else None


def _install_mpnet(encoder: torch.nn.Module, length: int) -> bool:
    original = encoder.compute_position_bias
    # the default MPNetEncoder.forward calls it with (the table is made with it too)
    default_buckets = inspect.signature(original).parameters["num_buckets"].default
    table = _mpnet_table(encoder, length)
    if table is None:
        return False
    encoder.register_buffer(TABLE, table, persistent=False)

    def compute_position_bias(x, position_ids=None, num_buckets=default_buckets):
        if position_ids is not None or num_buckets != default_buckets:
            return original(x, position_ids=position_ids, num_buckets=num_buckets)
        by_distance = encoder.relative_attention_bias(getattr(encoder, TABLE)).t().contiguous()  # (H, 2P - 1)
        values = torch.ops.kernl.relative_position_bias(by_distance, x.size(1))
        return values.expand((x.size(0), -1, x.size(1), x.size(1))).contiguous()  # as transformers

    encoder.compute_position_bias = compute_position_bias
    return True


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
            if isinstance(module, mpnet) and _install_mpnet(module, length):
                extent = f"one per distance up to {mpnet_probe_length(module, length) - 1}"
            elif isinstance(module, deberta) and module.relative_attention:
                _install_deberta(module, length)
                extent = f"{length} x {length} positions"
            else:
                continue
            lines.append(
                f"relative-position buckets of {name or type(module).__name__} computed once ({extent}), "
                "outside the captured forward"
            )
    return lines
