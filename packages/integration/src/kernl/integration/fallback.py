"""Per-call safety net: a kernel call that raises runs as PyTorch instead, and is remembered.

Failures are keyed by the kernel and its arguments' shapes, dtypes and devices, so a signature that
failed once goes straight to PyTorch afterwards (also during a CUDA-graph capture, where a raising
kernel would break the capture). :data:`FAILURES` feeds the report.
"""

import torch

from kernl.integration.user_warnings import warn

FAILURES: dict[tuple, str] = {}


def _signature(name: str, args) -> tuple:
    return (name,) + tuple(
        (tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else repr(a) for a in args
    )


def call(name: str, kernel, pytorch, *args, **kwargs):
    """``kernel(*args, **kwargs)``, or ``pytorch(*args, **kwargs)`` when the kernel raised for this signature
    (the arguments' shapes, dtypes and devices, and every other argument's value)."""
    key = _signature(name, (*args, *kwargs.values()))
    if key not in FAILURES:
        try:
            return kernel(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any kernel failure: fall back, say so
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            FAILURES[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            warn(f"kernl: {name} failed ({FAILURES[key]}); this call runs as PyTorch")
    return pytorch(*args, **kwargs)


def _readable(part) -> str:
    if isinstance(part, tuple):  # a tensor: (shape, dtype, device type)
        shape, dtype, device = part
        return f"{'x'.join(map(str, shape)) or 'scalar'} {str(dtype).removeprefix('torch.')} on {device}"
    return part


def summary() -> list[str]:
    """One line per failed kernel signature: the kernel, its arguments (tensors as shape, dtype and
    device), and the error."""
    return [f"{key[0]}({', '.join(map(_readable, key[1:]))}): {why}" for key, why in FAILURES.items()]
