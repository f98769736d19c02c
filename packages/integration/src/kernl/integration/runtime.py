"""Where kernels run: a CUDA GPU, or the CPU through Triton's interpreter when no GPU is there."""

import os


def select_device() -> str:
    """``"cuda"`` when a GPU kernl can use is visible (compute capability 8.0 or newer), else ``"cpu"``
    with ``TRITON_INTERPRET=1`` set.

    Must run before anything imports triton, which reads the interpreter flag at import time.
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"  # a user's 0 would leave the CPU with no way to run a kernel
    return "cpu"
