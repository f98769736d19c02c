"""The tolerance rule every kernel test uses, written once.

An element passes when ``|kernel - ref| <= 2 * |torch_same_dtype - ref| + atol + rtol * |ref|``,
with ``ref`` computed in fp64 (or fp32) and ``torch_same_dtype`` what plain PyTorch gives in the
kernel's own dtype. ``atol``/``rtol`` scale with the dtype (about one unit in the last place).
NaN never passes unless the reference is NaN at that element; infinities must match exactly.
"""

import torch

_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def tolerance_for(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for results stored in ``dtype``."""
    if dtype not in _TOLERANCES:
        raise ValueError(f"no tolerance defined for dtype {dtype}")
    return _TOLERANCES[dtype]


def reduction_scale(x: torch.Tensor, k: int) -> float:
    """``atol_scale`` for a K-long dot product over ``x``: its rounding error grows like sqrt(K) times the
    size of the terms (the summation order differs from torch's), which matters where the sum cancels.
    An absolute allowance: as a factor on rtol too it would grow with the data and let percent-level
    errors through in fp16 when x is large."""
    return max(1.0, k**0.5 / 4) * max(1.0, float(x.abs().float().mean()))


def assert_matches_reference(
    actual: torch.Tensor,
    reference: torch.Tensor,
    torch_same_dtype: torch.Tensor | None,
    name: str = "output",
    scale: float = 1.0,
    atol_scale: float = 1.0,
) -> None:
    """Assert ``actual`` meets the rule above; ``scale`` widens atol and rtol (errors compounded over many
    ops, e.g. whole models); ``atol_scale`` widens atol only, for an error that grows with the size of
    the summed terms rather than with the result (a long dot product that cancels): widening rtol there
    would scale the allowance with the data and let a percent-level error through."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    atol, rtol = tolerance_for(actual.dtype)
    got = actual.detach().to("cpu", torch.float64)
    ref = reference.detach().to("cpu", torch.float64)
    ref_nan = torch.isnan(ref)
    got_nan = torch.isnan(got)
    assert torch.equal(got_nan, ref_nan), (
        f"{name}: NaN pattern differs ({int(got_nan.sum())} NaN in kernel output, {int(ref_nan.sum())} in reference)"
    )
    ref_inf = torch.isinf(ref)
    assert torch.equal(got[ref_inf], ref[ref_inf]), f"{name}: infinities differ from the reference"
    finite = ~(ref_nan | ref_inf)
    error = (got - ref).abs()[finite]
    bound = atol * scale * atol_scale + rtol * scale * ref.abs()[finite]
    if torch_same_dtype is not None:
        peer = torch_same_dtype.detach().to("cpu", torch.float64)
        peer_error = (peer - ref).abs()[finite]
        bound = bound + 2 * torch.where(torch.isfinite(peer_error), peer_error, torch.zeros_like(peer_error))
    if actual.dtype.is_floating_point and actual.dtype != torch.float64:
        beyond = ref.abs()[finite] > torch.finfo(actual.dtype).max  # the right answer overflows the dtype
        overflowed = (got[finite] * ref[finite].sign() >= torch.finfo(actual.dtype).max) & beyond
        bound = torch.where(overflowed, torch.full_like(bound, float("inf")), bound)
    bad = ~(error <= bound)
    if bool(bad.any()):
        worst = int(torch.argmax(torch.where(bad, error - bound, torch.zeros_like(error))))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{error.numel()} elements out of tolerance ({actual.dtype}); "
            f"worst error {float(error[worst]):.3g} > bound {float(bound[worst]):.3g} "
            f"(kernel {float(got[finite][worst]):.6g}, reference {float(ref[finite][worst]):.6g})"
        )
