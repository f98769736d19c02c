"""Packed execution for Bert-family encoders: the real tokens of all rows run as one sequence.

A call ``(B, S)`` with an ``attention_mask`` becomes one or more packed calls ``(1, T)``: the real
tokens (mask != 0) of consecutive rows, end to end, padded to a token bucket ``T``
(:mod:`kernl.integration.token_buckets`). Each token keeps the position id and token type it has in
the caller's layout, attention stays within each row (varlen attention over row offsets,
:mod:`kernl.integration.rules.packed_attention`), and the outputs are scattered back to ``(B, S, ...)``.
TorchDynamo traces the packed forward once, ``T`` symbolic (:mod:`kernl.integration.dynamic_tokens`);
CUDA graphs are captured per ``T`` alone, so their number grows with the log of the largest token
count, not with the mix of batch sizes and lengths.

Row offsets reach the graphs as static buffers (:class:`RowOffsets`), one pair per (device, bucket),
filled before each run: a CUDA graph captured once reads whatever split of rows the next call has.
They hold :func:`row_capacity` rows, not one per token: varlen attention launches (and scans) work
for every row the offsets can hold, and per-row outputs (a pooler) are computed for each, so a packed
call takes at most :data:`ROWS_PER_PACKED_CALL` rows and a larger batch is split into several calls.

Host work per call: with a mask, one device-to-host copy of the rows' real-token counts and
first-column flags (``2 x B`` integers: the token bucket, hence the graph, is chosen on the host), and
per packed call one non-blocking host-to-device copy of its row offsets, when they differ from those
its bucket's buffers hold. The gather index of the real tokens is
computed on the device (``nonzero_static``, sized by the bucket), never copied.

A call whose rows are all real tokens (no mask, or a mask of ones) and fit one packed call needs no
gather and no scatter: its rows end to end are the packed sequence, so the caller's tensors go in as
they are (flattened, padded to the bucket) and the outputs come back as views of the packed ones.

Outputs: per-token outputs hold zeros at the caller's masked (padded) positions; per-row outputs (a
pooler, a sequence classification head) come from each row's first token, which is column 0 of the
caller's layout. A call whose graph reads first tokens while a row's column 0 is masked (left padding,
an all-masked row) runs unpacked, as does any call packing does not cover (see :func:`packable_call`).
"""

import inspect
from dataclasses import dataclass

import torch

from kernl.integration.arguments import argument_namer, input_wants_gradients
from kernl.integration.backend import KernlBackend
from kernl.integration.buckets import bucket
from kernl.integration.compile_state import RecompileLimitReached, limit_guarded, own_code
from kernl.integration.dynamic_tokens import tokens_marked
from kernl.integration.forward_graphs import ForwardGraphs
from kernl.integration.report import OptimizationReport
from kernl.integration.rules.packed_attention import PackingUnsupported
from kernl.integration.token_buckets import token_bucket
from kernl.integration.trees import holds_objects, map_tensors, tensors_in
from kernl.integration.user_warnings import warn

# Model types whose positions mix only through attention and whose position ids are absolute: the
# column index (``arange(S)``) unless ``position_ids`` are given.
COLUMN_POSITIONS = frozenset({"bert", "electra", "albert", "ernie", "megatron-bert", "rembert", "distilbert"})
# RoBERTa-style: ``padding_idx + 1 + (number of non-pad tokens before)``, pad tokens at ``padding_idx``.
PADDING_IDX_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "mpnet"}
)
# Also a position bias by column distance (kernl.integration.position_tables): the packed distance is the
# caller's only when each row's real tokens are consecutive columns; other masks run unpacked.
DISTANCE_BIAS = frozenset({"mpnet"})
_PADDING_IDX = {"mpnet": 1}  # MPNetEmbeddings' padding_idx, whatever the config's pad_token_id
PACKED_MODEL_TYPES = COLUMN_POSITIONS | PADDING_IDX_POSITIONS
# Why the other bucketed families keep the unpacked path.
_NOT_PACKED = {
    "deberta": "its disentangled relative positions are computed over the whole (packed) sequence",
    "deberta-v2": "its disentangled relative positions are computed over the whole (packed) sequence",
    "roformer": "its rotary table is sized by max_position_embeddings, shorter than a packed sequence",
    "xmod": "its language adapters take per-row lang_ids",
    "modernbert": "its local attention layers need a sliding-window mask, which varlen attention does not take",
}
# Rows one packed call holds: bounds the varlen grid's spare programs and the per-row head work per
# bucket (batches of sentence-transformers' encode, the stream benchmark's 1-32 rows fit in one call).
ROWS_PER_PACKED_CALL = 64
_PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_FLAGS = ("return_dict", "output_hidden_states")  # plain arguments a packed call passes through


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run packed (None when it can)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        why = _NOT_PACKED.get(model_type, "its family is not known to mix positions only through attention")
        return f"model type {model_type!r} is not packed: {why}"
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no position_ids: rows cannot keep their positions"
    if getattr(model.config, "is_decoder", False):
        return "a decoder configuration (causal attention, a cache) is not packed"
    return None


def row_capacity(bucket: int) -> int:
    """Rows the offsets of a ``bucket``-token packed call hold: every row has a real token, so never more
    than ``bucket``, and at most :data:`ROWS_PER_PACKED_CALL`."""
    return min(bucket, ROWS_PER_PACKED_CALL)


class RowOffsets:
    """The row offsets packed graphs read, as static buffers per (device, bucket).

    :meth:`use` fills the buffers of one bucket and makes them current; the graph nodes the packed pass
    inserts call :meth:`cu_seqlens` and :meth:`row_starts`, which return the current buffers, so a CUDA
    graph captured with them reads the offsets filled before each replay. Both are sized by
    :func:`row_capacity` of the bucket.
    """

    def __init__(self):
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filled: dict[tuple, list[int]] = {}  # the offsets each bucket's buffers hold
        self.current: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bucket: int | None = None
        self.reads_first_token = False  # set when a packed graph reads per-row first tokens

    def use(self, device: torch.device, bucket: int, cu_seqlens: list[int]) -> None:
        """Fill the buffers of ``bucket`` with ``cu_seqlens`` (``R + 1`` offsets, ``R <= row_capacity(bucket)``):
        one host-to-device copy, without a host synchronisation on a GPU (a pinned staging tensor), or
        none when they hold these offsets already (calls of one shape repeated)."""
        rows = row_capacity(bucket)
        if not 1 <= len(cu_seqlens) <= rows + 1:
            raise ValueError(
                f"cu_seqlens must hold 1 to {rows + 1} offsets for bucket {bucket}, got {len(cu_seqlens)}"
            )
        key = (device, bucket)
        if self.filled.get(key) == cu_seqlens:
            self.current, self.bucket = self.buffers[key], bucket
            return
        if key not in self.buffers:
            self.buffers[key] = (
                torch.zeros(rows + 1, dtype=torch.int32, device=device),
                torch.zeros(rows, dtype=torch.int64, device=device),
            )
        cu, starts = self.buffers[key]
        offsets = torch.tensor(cu_seqlens, dtype=torch.int64)
        spare = rows + 1 - len(cu_seqlens)
        host = torch.cat(
            [
                offsets,
                offsets[-1:].expand(spare),  # empty rows after the last one
                offsets[:-1],  # each row's first packed token
                offsets.new_zeros(spare),
            ]
        )
        staged = host.pin_memory() if device.type == "cuda" else host
        on_device = staged.to(device, non_blocking=True)
        cu.copy_(on_device[: rows + 1])
        starts.copy_(on_device[rows + 1 :])
        self.filled[key] = list(cu_seqlens)
        self.current, self.bucket = self.buffers[key], bucket

    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``(rows + 1,)``: the current call's row offsets, padded with empty rows."""
        return self.current[0]

    def row_starts(self) -> torch.Tensor:
        """int64 ``(rows,)``: the packed index of each row's first token (0 past the last row)."""
        return self.current[1]


class ConstantInputs:
    """int64 ``(1, bucket)`` inputs that repeat between packed calls, made once and kept (at most
    :data:`KEPT` of each kind, the latest used): read-only, so one tensor serves every call."""

    KEPT = 64

    def __init__(self):
        self.kept: dict[tuple, torch.Tensor] = {}

    def _kept(self, key: tuple, make) -> torch.Tensor:
        value = self.kept.pop(key, None)
        if value is None:
            value = make()
            if sum(k[0] == key[0] for k in self.kept) >= self.KEPT:
                del self.kept[next(k for k in self.kept if k[0] == key[0])]  # the least recently used
        self.kept[key] = value
        return value

    def ones(self, device: torch.device, bucket: int) -> torch.Tensor:
        """Ones: the packed calls' ``attention_mask``."""
        return self._kept(
            ("ones", device, bucket), lambda: torch.ones(1, bucket, dtype=torch.long, device=device)
        )

    def zeros(self, device: torch.device, bucket: int) -> torch.Tensor:
        """Zeros: the token types of a call without ``token_type_ids``."""
        return self._kept(
            ("zeros", device, bucket), lambda: torch.zeros(1, bucket, dtype=torch.long, device=device)
        )

    def column_positions(self, device: torch.device, batch: int, columns: int, bucket: int) -> torch.Tensor:
        """The column index of each token of ``batch`` full rows of ``columns`` tokens laid end to end,
        then zeros to ``bucket``: the position ids of such a call packed (column-style positions)."""

        def make():
            positions = torch.zeros(1, bucket, dtype=torch.long, device=device)
            positions[0, : batch * columns] = torch.arange(columns, device=device).repeat(batch)
            return positions

        return self._kept(("positions", device, batch, columns, bucket), make)


@dataclass
class PackedGroup:
    """The rows of the caller's batch that one packed call runs."""

    first: int  # the caller's rows [first, end) are this call's (rows without a real token included)
    end: int
    rows: list[int]  # the rows with at least one real token, in order
    cu_seqlens: list[int]  # R + 1 offsets of those rows in the packed sequence
    bucket: int

    @property
    def tokens(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def capacity(self) -> int:
        """Rows this call's offsets (and per-row outputs) hold."""
        return row_capacity(self.bucket)


def plan_groups(lengths: list[int], buckets: tuple[int, ...]) -> list[PackedGroup] | None:
    """Split rows of ``lengths`` real tokens each into consecutive groups that each fit the largest bucket
    and hold at most :data:`ROWS_PER_PACKED_CALL` rows with a real token; None when one row alone does not
    fit, or no row has a real token."""
    if max(lengths, default=0) > buckets[-1] or sum(lengths) == 0:
        return None
    groups, start = [], 0
    while start < len(lengths):
        end, tokens, taken = start, 0, 0
        while end < len(lengths) and tokens + lengths[end] <= buckets[-1]:
            if lengths[end] and taken == ROWS_PER_PACKED_CALL:
                break
            tokens += lengths[end]
            taken += lengths[end] > 0
            end += 1
        rows = [r for r in range(start, end) if lengths[r]]
        if rows:  # rows after the last real token form no group
            cu = [0]
            for r in rows:
                cu.append(cu[-1] + lengths[r])
            groups.append(PackedGroup(start, end, rows, cu, token_bucket(tokens, buckets)))
        start = end
    return groups


def packed_index(real: torch.Tensor, group: PackedGroup) -> torch.Tensor:
    """int64 ``(bucket,)`` on ``real``'s device: the flat position (row * S + column) of each real token of
    ``group``'s rows in the bool ``(B, S)`` mask ``real``, then the first row's column 0 for the bucket's
    padding slots (their outputs are never read; attention skips them). No host synchronisation."""
    columns = real.shape[1]
    flat = real[group.first : group.end].reshape(-1)
    index = torch.nonzero_static(flat, size=group.bucket, fill_value=0).squeeze(1)
    return index + group.first * columns


def caller_position_ids(arguments: dict, style: str, padding_idx: int) -> torch.Tensor:
    """The position ids Hugging Face gives each token of the caller's ``(B, S)`` layout: ``position_ids``
    when given; else the column index (``style == "column"``) or RoBERTa's count of non-pad tokens from
    ``padding_idx + 1`` (pad tokens at ``padding_idx``; ``inputs_embeds`` count every token)."""
    if arguments.get("position_ids") is not None:
        return arguments["position_ids"]
    ids = arguments.get("input_ids")
    token_input = ids if ids is not None else arguments["inputs_embeds"]
    batch, columns = token_input.shape[:2]
    device = token_input.device
    if style == "column":
        return torch.arange(columns, device=device).expand(batch, columns)
    if ids is None:
        return torch.arange(padding_idx + 1, columns + padding_idx + 1, device=device).expand(batch, columns)
    not_pad = ids.ne(padding_idx).long()
    return not_pad.cumsum(1) * not_pad + padding_idx


def _int64(value: torch.Tensor) -> torch.Tensor:
    """``value`` as int64, itself when it is (no dispatch: the packed inputs are int64 tensors)."""
    return value if value.dtype == torch.int64 else value.long()


class _Unscatterable(Exception):
    """An output that is neither per token ``(1, T, ...)`` nor per row ``(rows, ...)``."""


def _per_token(leaf: torch.Tensor, group: PackedGroup) -> bool:
    """Whether an output of ``group``'s packed call is per token ``(1, bucket, ...)`` (else per row
    ``(capacity, ...)``); raises :class:`_Unscatterable` for any other shape."""
    if leaf.dim() >= 2 and leaf.shape[0] == 1 and leaf.shape[1] == group.bucket:
        return True
    if leaf.dim() >= 1 and leaf.shape[0] == group.capacity:
        return False
    raise _Unscatterable(f"output of shape {tuple(leaf.shape)}")


def _as_full_rows(output, group: PackedGroup, batch: int, columns: int):
    """The outputs of a packed call of ``batch`` full rows of ``columns`` tokens (no padding) in the
    caller's layout, as views: per-token ``(1, bucket, ...)`` -> ``(B, S, ...)`` (the packed sequence is
    the caller's rows end to end; as it is for one row filling the bucket), per-row ``(capacity, ...)``
    -> its first ``B`` rows."""

    def caller_layout(leaf: torch.Tensor) -> torch.Tensor:
        if not _per_token(leaf, group):
            return leaf.narrow(0, 0, batch)
        tokens = leaf if group.tokens == group.bucket else leaf.narrow(1, 0, group.tokens)
        return tokens if batch == 1 else tokens.view(batch, columns, *leaf.shape[2:])

    return map_tensors(caller_layout, output)


def _scatter(output, group: PackedGroup, index, into: list | None, batch: int, columns: int) -> list:
    """Write the packed call's outputs into the caller-layout tensors ``into`` (made on the first call):
    per-token outputs into ``(B * S, ...)`` zeros at ``index`` (the real tokens' flat positions), per-row
    outputs into ``(B, ...)`` zeros."""
    leaves = tensors_in(output)
    if into is None:
        into = []
        for leaf in leaves:
            per_token = _per_token(leaf, group)
            shape = (batch * columns, *leaf.shape[2:]) if per_token else (batch, *leaf.shape[1:])
            into.append((per_token, leaf.new_zeros(shape)))
    if len(into) != len(leaves):
        raise _Unscatterable("outputs differ between packed calls")
    for (per_token, target), leaf in zip(into, leaves, strict=True):
        if per_token:
            target.index_copy_(0, index, leaf[0, : group.tokens])
        else:
            target[group.rows] = leaf[: len(group.rows)]
    return into


def _rebuilt(output, into: list, batch: int, columns: int):
    """``output``'s structure with its tensors replaced by the caller-layout ones."""
    targets = iter(
        target.view(batch, columns, *target.shape[1:]) if per_token else target for per_token, target in into
    )
    return map_tensors(lambda _: next(targets), output)


def packable_call(arguments: dict) -> bool:
    """Whether a call can run packed: per-token inputs of one ``(B, S)`` layout (``inputs_embeds``
    ``(B, S, H)``), ``return_dict`` / ``output_hidden_states`` flags, no other argument set."""
    for name, value in arguments.items():
        if value is None:
            continue
        if name in _FLAGS and isinstance(value, bool):
            continue
        if name not in _PER_TOKEN_INPUTS or not isinstance(value, torch.Tensor):
            return False
    tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
    if "input_ids" not in tensors and "inputs_embeds" not in tensors:
        return False
    if "input_ids" in tensors and "inputs_embeds" in tensors:
        return False  # the model raises its own error for this: let the unpacked path call it
    layouts = {tuple(t.shape[:2]) if k == "inputs_embeds" else tuple(t.shape) for k, t in tensors.items()}
    return not holds_objects(arguments) and len(layouts) == 1 and len(next(iter(layouts))) == 2


_KEEP_PYTORCH = object()  # what _packed returns for a signature the speed check gave to PyTorch


def _speed_key(arguments: dict, groups: list[PackedGroup]) -> tuple:
    """The signature a packed call's speed check is kept under: its inputs, flags and token buckets."""
    inputs = tuple(sorted(k for k, v in arguments.items() if isinstance(v, torch.Tensor)))
    settings = tuple(sorted((k, v) for k, v in arguments.items() if not isinstance(v, torch.Tensor)))
    return ("packed", inputs, settings, tuple(group.bucket for group in groups))


class PackedForward:
    """``forward(*args, **kwargs)`` running packed when it can, else ``unpacked(*args, **kwargs)``.

    ``compiled``: the model's forward compiled with a packing :class:`KernlBackend` (and under CUDA
    graphs on a GPU), called by keyword with ``(1, T)`` inputs; ``offsets``: the row offsets its
    graphs read; ``buckets``: the token buckets, sorted; ``longest``: the most positions the model's
    position table holds (None: no limit), beyond which a call runs unpacked, to get its error there;
    ``unpacked_buckets``: the unpacked path's length buckets. A call runs packed when its packed
    calls hold fewer tokens than the unpacked path would run (``B x`` its length bucket), or, for one
    row, as many while the unpacked path has no graph for it (``unpacked.has_graph``): see
    :meth:`_left_unpacked`.
    Full rows (no masked position, one packed call) run without a gather or a scatter
    (:meth:`_full_rows`).
    """

    def __init__(
        self,
        model,
        compiled,
        unpacked,
        offsets: RowOffsets,
        buckets,
        report,
        longest,
        unpacked_buckets,
        speed=None,
    ):
        self.model, self.compiled, self.unpacked, self.longest = model, compiled, unpacked, longest
        self.speed = speed  # never-slower check, per packed signature (see _speed_key)
        self.unpacked_buckets = unpacked_buckets
        self.name_arguments = argument_namer(inspect.signature(model.kernl_original_forward))
        self.offsets, self.buckets, self.report = offsets, buckets, report
        config = model.config
        self.style = "column" if config.model_type in COLUMN_POSITIONS else "padding_idx"
        self.padding_idx = _PADDING_IDX.get(config.model_type, getattr(config, "pad_token_id", None) or 0)
        self.consecutive_rows = config.model_type in DISTANCE_BIAS
        self.token_types = "token_type_ids" in inspect.signature(unpacked).parameters
        self.constants = ConstantInputs()
        # no CUDA graphs copying the packed inputs into their own buffers: the compiled call gets them
        self.compiled_directly = not isinstance(compiled, ForwardGraphs)
        self.unscatterable: set[tuple] = set()  # call kinds whose outputs cannot be scattered back
        self.disabled: str | None = None

    def __call__(self, *args, **kwargs):
        if self.disabled or self.model.training or self.name_arguments is None:
            return self.unpacked(*args, **kwargs)
        if input_wants_gradients(args, kwargs):
            return self.unpacked(*args, **kwargs)
        arguments = self.name_arguments(args, kwargs)
        kind = tuple(sorted((k, v) for k, v in arguments.items() if not isinstance(v, torch.Tensor)))
        dropped_types = not self.token_types and arguments.get("token_type_ids") is not None
        if kind in self.unscatterable or dropped_types or not packable_call(arguments):
            return self.unpacked(*args, **kwargs)
        try:
            speed_key, output = self._packed(arguments)
            if output is _KEEP_PYTORCH:  # a speed check found the original forward faster for this signature
                return self._original(args, kwargs)
            if output is not None and self.speed is not None and not self.speed.judged(speed_key):
                label = f"token bucket {'+'.join(map(str, speed_key[-1]))}"
                self.speed.judge(
                    speed_key,
                    label,
                    lambda: self._packed(arguments)[1],
                    lambda: self._original(args, kwargs),
                )
        except PackingUnsupported as reason:
            self.disabled = str(reason)
            self.report.notes.append(f"packed execution off: {reason}; calls run unpacked")
            warn(f"kernl: packed execution off ({reason}); calls run unpacked")
            output = None
        except RecompileLimitReached:
            output = None  # said once by limit_guarded; this call runs unpacked
        except _Unscatterable as reason:
            self.unscatterable.add(kind)
            self.report.notes.append(
                f"calls with {dict(kind)} run unpacked: {reason} is not per token or per row"
            )
            output = None
        return self.unpacked(*args, **kwargs) if output is None else output

    def _original(self, args: tuple, kwargs: dict):
        """The model's original forward on the caller's call (no gradients, as kernl's path)."""
        with torch.no_grad():
            return self.model.kernl_original_forward(*args, **kwargs)

    def _packed(self, arguments: dict):
        """``(speed_key, output)``: the call's signature for the speed check (None before it is planned, or
        without a check) and the call run packed, or None when this call must run unpacked (see the
        module docstring)."""
        ids = arguments.get("input_ids")
        token_input = ids if ids is not None else arguments["inputs_embeds"]
        batch, columns = token_input.shape[:2]
        if self.longest is not None and columns > self.longest and arguments.get("position_ids") is None:
            return None, None
        mask = arguments.get("attention_mask")
        if mask is None:
            lengths, first_column_real = [columns] * batch, True
        else:  # the one device-to-host copy: 2 x B integers (3 x B with the runs of real tokens)
            real = mask.ne(0)
            counts = [real.sum(1), real[:, 0].long()]
            if self.consecutive_rows:
                counts.append(real[:, 0].long() + (real[:, 1:] & ~real[:, :-1]).sum(1))
            lengths, first_real, *runs = torch.stack(counts).tolist()
            first_column_real = all(first_real)
            if runs and max(runs[0]) > 1:  # a row's real tokens with a gap: the distances would shrink
                return None, None
        groups = plan_groups(lengths, self.buckets)
        if groups is None or (self.offsets.reads_first_token and not first_column_real):
            return None, None
        if self._left_unpacked(arguments, groups, batch, columns):
            return None, None
        speed_key = None if self.speed is None else _speed_key(arguments, groups)
        if self.speed is not None and self.speed.keeps_pytorch(speed_key):
            return speed_key, _KEEP_PYTORCH
        flags = {k: v for k, v in arguments.items() if k in _FLAGS}
        if len(groups) == 1 and min(lengths) == columns:
            return speed_key, self._full_rows(arguments, token_input, groups[0], flags)
        if mask is None:
            real = torch.ones(batch, columns, dtype=torch.bool, device=token_input.device)
        names, table = self._token_table(arguments)
        embeds = arguments.get("inputs_embeds")
        embeds = None if embeds is None else embeds.reshape(batch * columns, -1)
        into = output = None
        for group in groups:
            self.offsets.use(token_input.device, group.bucket, group.cu_seqlens)
            index = packed_index(real, group)
            packed = dict(zip(names, table.index_select(1, index)[:, None].unbind(0), strict=True))
            if embeds is not None:
                packed["inputs_embeds"] = embeds.index_select(0, index)[None]
            packed["attention_mask"] = self.constants.ones(token_input.device, group.bucket)
            output = self._call(packed, flags)
            if self.offsets.reads_first_token and not first_column_real:  # learnt by this first compile
                return speed_key, None
            into = _scatter(output, group, index[: group.tokens], into, batch, columns)
        return speed_key, _rebuilt(output, into, batch, columns)

    def _left_unpacked(self, arguments: dict, groups: list[PackedGroup], batch: int, columns: int) -> bool:
        """Whether a plannable call runs unpacked all the same: when its packed calls would hold more tokens
        than the unpacked path runs (``B x`` its length bucket), or as many (a tie) with several rows, or
        with one row the unpacked path has a graph for already. A one-row tie otherwise runs packed: the
        packed trace serves it, where the unpacked path would trace, compile and capture a graph of its
        own. A tie of several rows (a full batch whose token count is a bucket) keeps the dense
        attention of the unpacked graph, whose speed at those shapes is the one measured."""
        packed_tokens = sum(group.bucket for group in groups)
        unpacked_tokens = batch * bucket(columns, self.unpacked_buckets)
        if packed_tokens != unpacked_tokens:
            return packed_tokens > unpacked_tokens
        return batch > 1 or self.unpacked.has_graph(arguments)

    def _full_rows(self, arguments: dict, token_input: torch.Tensor, group: PackedGroup, flags: dict):
        """``group`` (every row of the call, each all real tokens) run packed without a gather or a scatter:
        the packed sequence is the caller's rows end to end, so the caller's tensors are the packed inputs
        (flattened, and padded to the bucket when shorter; one row filling its bucket as it is), and the
        outputs are views of the packed ones (:func:`_as_full_rows`)."""
        batch, columns = token_input.shape[:2]
        device, size = token_input.device, group.bucket
        self.offsets.use(device, size, group.cu_seqlens)
        if arguments.get("position_ids") is not None or self.style != "column":
            positions = self._flat(_int64(caller_position_ids(arguments, self.style, self.padding_idx)), size)
        else:
            positions = self.constants.column_positions(device, batch, columns, size)
        packed = {"position_ids": positions}
        ids = arguments.get("input_ids")
        if ids is not None:
            packed["input_ids"] = self._flat(_int64(ids), size)
        if self.token_types:
            types = arguments.get("token_type_ids")
            packed["token_type_ids"] = (
                self.constants.zeros(device, size) if types is None else self._flat(_int64(types), size)
            )
        embeds = arguments.get("inputs_embeds")
        if embeds is not None:
            packed["inputs_embeds"] = self._flat(embeds, size)
        packed["attention_mask"] = self.constants.ones(device, size)
        output = self._call(packed, flags)
        return _as_full_rows(output, group, batch, columns)

    def _flat(self, value: torch.Tensor, size: int) -> torch.Tensor:
        """A per-token input ``(B, S, ...)`` as one packed sequence ``(1, size, ...)``: its rows end to end,
        padded with zeros; the caller's own tensor when it is one row of ``size`` tokens."""
        batch, columns = value.shape[:2]
        flat = value if batch == 1 else value.reshape(1, batch * columns, *value.shape[2:])
        if batch * columns < size:
            pad = [0, 0] * (value.dim() - 2) + [0, size - batch * columns]
            return torch.nn.functional.pad(flat, pad)
        return flat

    def _call(self, packed: dict, flags: dict):
        """The compiled forward on the packed inputs ``packed``. Where it gets them directly (no CUDA graphs
        copying them into their own buffers), it gets fresh copies: TorchDynamo guards on the strides and
        storage offsets of the tensors it is handed (the caller's own, views into one table) and marks
        them (a caller's tensor would carry the mark into its later uses)."""
        if self.compiled_directly:
            packed = {name: value.clone() for name, value in packed.items()}
        with torch.no_grad():
            return self.compiled(**packed, **flags)

    def _token_table(self, arguments: dict) -> tuple[list[str], torch.Tensor]:
        """The integer per-token inputs of the packed calls, in the caller's layout: their names and
        one int64 ``(inputs, B * S)`` table (gathered for a packed call in one launch)."""
        positions = caller_position_ids(arguments, self.style, self.padding_idx)
        inputs = {"position_ids": positions}
        if arguments.get("input_ids") is not None:
            inputs["input_ids"] = arguments["input_ids"]
        if self.token_types:
            types = arguments.get("token_type_ids")
            inputs["token_type_ids"] = torch.zeros_like(positions) if types is None else types
        table = torch.stack([value.reshape(-1).long() for value in inputs.values()])
        return list(inputs), table


def _unpacked_instead(*args, **kwargs):
    """A packed call TorchDynamo will not compile must not run uncompiled: its rows would mix."""
    raise RecompileLimitReached("the packed graph of this token bucket is not compiled")


def packed_forward(
    model,
    unpacked,
    report: OptimizationReport,
    static,
    part: str,
    graphs,
    buckets,
    longest,
    unpacked_buckets,
    speed=None,
):
    """``model``'s forward running packed (a :class:`PackedForward`) around ``unpacked``, or None with the
    reason in ``report`` when the model cannot run packed. ``static``: the model's parameters and
    buffers; ``graphs``: the unpacked path's :class:`ForwardGraphs` (None: no CUDA graphs), whose memory
    pool the packed captures share (one graph per token bucket); ``longest``, ``unpacked_buckets``: see
    :class:`PackedForward`; ``speed``: the never-slower check (:mod:`kernl.integration.speed_check`), which
    judges each token bucket's first packed call against the original forward on the caller's call."""
    reason = unsupported_reason(model)
    if reason is not None:
        report.notes.append(reason + "; calls run unpacked")
        return None
    offsets = RowOffsets()
    backend = KernlBackend(report, static, part or "packed", packing=offsets)
    compiled = torch.compile(own_code(model.kernl_original_forward), backend=backend, dynamic=False)
    compiled = tokens_marked(compiled)  # one trace serves every token bucket
    compiled = limit_guarded(compiled, _unpacked_instead, report, "packed")
    if graphs is not None:
        compiled = model.kernl_packed_graphs = ForwardGraphs(compiled, model, report)
        compiled.pool = graphs.pool  # every capture of the model shares one memory pool
    report.notes.append(
        f"packed execution: {len(buckets)} token buckets, {buckets[0]} to {buckets[-1]} tokens"
    )
    return PackedForward(
        model, compiled, unpacked, offsets, buckets, report, longest, unpacked_buckets, speed
    )
