"""The bucket policy: sequence lengths padded up to a few lengths, so that a stream of many lengths
compiles and captures a bounded number of graphs."""

import torch

from kernl.integration.validation import model_type

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 384, 512)
# Models whose real tokens never see padding that attention masks out (positions mix only through
# attention): padding them to a bucket leaves their outputs unchanged. Others (ConvBERT's span
# convolution, Nystromformer's value convolution mix neighbouring positions) run at the caller's length.
BUCKETED_MODEL_TYPES = frozenset(
    {
        "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "albert", "distilbert",
        "ernie", "data2vec-text", "xmod", "mpnet", "megatron-bert", "rembert", "roformer", "deberta",
        "deberta-v2", "t5", "mt5", "umt5", "bart", "mbart",
    }
)  # fmt: skip


def bucket(length: int, buckets) -> int:
    """The first of ``buckets`` (sorted) at least ``length`` long, or ``length`` beyond them all."""
    return next((b for b in buckets if b >= length), length)


def _position_limit(model: torch.nn.Module) -> tuple[int | None, bool]:
    """``(longest input, whether a position table was found)``: ``config.max_position_embeddings``, less
    the offset of a position table indexed from ``padding_idx + 1`` (RoBERTa); ``(None, False)`` without
    that setting (T5)."""
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(longest, int):
        return None, False
    for name, module in model.named_modules():  # the position table (not word embeddings of that size)
        if "position" in name and isinstance(module, torch.nn.Embedding) and module.num_embeddings == longest:
            return longest - (0 if module.padding_idx is None else module.padding_idx + 1), True
    return longest, False


def position_table_length(model: torch.nn.Module) -> int | None:
    """The most positions the model's learned position table holds (an input longer than that, without
    ``position_ids`` of its own, indexes past it), or None without such a table."""
    longest, found = _position_limit(model)
    return longest if found else None


def usable_buckets(model: torch.nn.Module, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets no longer than the longest input the model takes (a prompt padded past its position
    table would index out of it; see :func:`_position_limit`). All of them without such a limit (T5)."""
    longest = _position_limit(model)[0]
    return buckets if longest is None else tuple(b for b in buckets if b <= longest)


def safe_buckets(model: torch.nn.Module, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """``buckets``, or none for a model type not in :data:`BUCKETED_MODEL_TYPES` (or no model type)."""
    return buckets if model_type(model) in BUCKETED_MODEL_TYPES else ()
