"""Token buckets: the packed sequence lengths a packed call is padded to (one captured graph each).

A packed call holds the real tokens of all its rows, so its cost and its graph depend on the total
token count only. Buckets grow geometrically, so the number of graphs grows with the log of the
largest token count, whatever the mix of batch sizes and lengths.
"""


def token_buckets(smallest: int = 16, largest: int = 16384, growth: float = 1.4, multiple: int = 16):
    """Bucket sizes from ``smallest`` to ``largest`` (both included), each about ``growth`` times the
    last, rounded up to a multiple of ``multiple`` (GPU tiles): a sorted tuple of ints.

    Raises ``TypeError``/``ValueError`` naming the argument for non-int sizes, ``largest < smallest``,
    or ``growth <= 1``.
    """
    for name, value in (("smallest", smallest), ("largest", largest), ("multiple", multiple)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if largest < smallest:
        raise ValueError(f"largest ({largest}) must be >= smallest ({smallest})")
    if not isinstance(growth, int | float) or isinstance(growth, bool) or not growth > 1:
        raise ValueError(f"growth must be a number > 1, got {growth!r}")
    sizes, size = [], smallest
    while size < largest:
        rounded = -(-int(size) // multiple) * multiple
        if not sizes or rounded > sizes[-1]:
            sizes.append(min(rounded, largest))
        size = max(size * growth, size + 1)
    if sizes and largest <= sizes[-1] * (1 + (growth - 1) / 2):
        sizes.pop()  # a step to ``largest`` much smaller than ``growth`` would only add a graph
    sizes.append(largest)
    return tuple(sizes)


def token_bucket(tokens: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest of ``buckets`` (sorted) holding ``tokens``; None when none does."""
    return next((b for b in buckets if b >= tokens), None)


DEFAULT_TOKEN_BUCKETS = token_buckets()
