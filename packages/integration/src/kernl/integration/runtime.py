"""Where kernels run: a CUDA GPU, or the CPU through Triton's interpreter when no GPU is there."""

import os


def select_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"`` with ``TRITON_INTERPRET=1`` set.

    Must run before anything imports triton, which reads the interpreter flag at import time.
    """
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"
