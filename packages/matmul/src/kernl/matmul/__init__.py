"""kernl.matmul: an autotuned Triton GEMM (2-D, batched, broadcast batch) with a fused epilogue.

>>> from kernl.matmul import matmul
"""

from kernl.matmul.activations import ACTIVATIONS
from kernl.matmul.functional import SUPPORTED_DTYPES, matmul
from kernl.matmul.launch import gemm
from kernl.matmul.reference import matmul_reference
from kernl.matmul.tuning import Config

__all__ = ["ACTIVATIONS", "SUPPORTED_DTYPES", "Config", "gemm", "matmul", "matmul_reference"]
