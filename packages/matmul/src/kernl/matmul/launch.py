"""Launching the GEMM core on validated inputs: strides, split-K bookkeeping, config choice.

:func:`gemm` is the entry point shared by :mod:`kernl.matmul` and :mod:`kernl.linear_act`.
"""

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from kernl.common.launch import capability, float_errors_ignored, programmatic_launch
from kernl.matmul import tuning
from kernl.matmul.activations import ACTIVATIONS
from kernl.matmul.config_cache import launchable
from kernl.matmul.kernel import gemm_kernel
from kernl.matmul.kernel_tma import gemm_tma_kernel
from kernl.matmul.precompile import launch_kernel
from kernl.matmul.torch_path import gemm_torch
from kernl.matmul.tuning import Config, Problem

_locks: dict[torch.device, torch.Tensor] = {}


def _tile_locks(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 counter per output tile, kept per device (each split-K launch leaves it zeroed)."""
    locks = _locks.get(device)
    if locks is None or locks.numel() < n:
        locks = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _locks[device] = locks
    return locks


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function on recent Triton: slow from Python


def effective_split(k: int, block_k: int, split_k: int) -> int:
    """The split count that leaves no program with an empty share of K (each gets whole BLOCK_K steps)."""
    steps = _cdiv(k, block_k)
    if steps <= 1:
        return 1
    per_split = _cdiv(steps, max(1, min(split_k, steps)))
    return _cdiv(steps, per_split)


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot``'s input precision: exact fp32 unless TF32 is allowed; irrelevant for half types."""
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def prefetch_weights(pdl: bool, b_like_weight: bool, tiles: int, sms: int) -> bool:
    """Whether a launch prefetches its rows of B into L2 before waiting for the previous kernel
    (:mod:`kernl.matmul.prefetch`): with programmatic launch, for a B laid out like an ``nn.Linear``
    weight (one matrix for the whole batch, contiguous along K: not the previous kernel's output), when
    the output has at most two tiles per multiprocessor. With more, each program's first tile is a
    small part of its work and the rest of B streams in during the main loop anyway.
    ``sms``: the GPU's multiprocessors. ``KERNL_PREFETCH=0`` (or ``false``/``off``/``no``) turns it off."""
    return pdl and b_like_weight and tiles <= 2 * sms and not tuning.switched_off("KERNL_PREFETCH")


def _prefetches(pdl: bool, b_like_weight: bool, tiles: int, device: torch.device) -> bool:
    """:func:`prefetch_weights` for a launch on ``device``, whose SM count is asked only with programmatic
    launch (never off a GPU)."""
    return pdl and prefetch_weights(pdl, b_like_weight, tiles, tuning.sm_count(device.index or 0))


MAX_SPAN = 2**31  # the kernels index within one batch entry in 32 bits
MAX_GRID_Z = 65535  # CUDA's limit on grid axis z, the pointer kernel's batch axis: larger batches go in parts


def check_spans(operands: dict[str, torch.Tensor | None], m: int, n: int) -> None:
    """ValueError unless every operand (a matrix, or a 1-D bias), and the ``(M, N)`` output, spans fewer
    than 2**31 elements within one batch entry (what the kernels' 32-bit index arithmetic reaches)."""
    spans = {"output (M x N)": m * n}
    for name, t in operands.items():
        if t is not None and t.numel():
            spans[name] = 1 + sum(
                (size - 1) * abs(stride) for size, stride in zip(t.shape[-2:], t.stride()[-2:], strict=True)
            )
    for name, span in spans.items():
        if span >= MAX_SPAN:
            raise ValueError(f"{name} spans {span} elements in one batch entry; kernl's GEMM indexes in 32 bits "
                             "(under 2**31 elements): split the problem, e.g. along M")  # fmt: skip


def _tma_ready(t: torch.Tensor) -> bool:
    """An operand a tensor descriptor can describe: unit inner stride, 16-byte aligned base and outer
    strides, none of them 0 (an expanded operand: a descriptor steps through memory, it cannot
    broadcast; the pointer kernel reads such views as they are)."""
    size = t.element_size()
    outer = t.stride()[:-1]
    return t.stride(-1) == 1 and all(s > 0 and (s * size) % 16 == 0 for s in outer) and t.data_ptr() % 16 == 0


def _tma_operands(a: torch.Tensor, b: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The views the descriptors describe: ``a`` as (M, K) or (B, M, K); ``b`` K-major as (.., N, K)."""
    b_view = b.transpose(1, 2) if b.stride(1) == 1 else b
    return (a, b_view) if batch > 1 else (a[0], b_view[0])


def tma_eligible(a: torch.Tensor, b: torch.Tensor, b2: torch.Tensor | None, batch: int) -> bool:
    """Whether the persistent TMA kernel can run this problem (Hopper or newer, or the interpreter)."""
    if b2 is not None or a.dtype == torch.float32 or (b.shape[2] * a.element_size()) % 16:
        return False
    if a.shape[2] == 0:  # a descriptor cannot describe an empty dimension (K = 0: the epilogue of zeros)
        return False
    if batch > 1 and (a.shape[0] != batch or b.shape[0] != batch):
        return False
    if a.device.type == "cuda" and capability(a.device.index or 0)[0] < 9:
        return False
    return all(_tma_ready(t) for t in _tma_operands(a, b, batch))


def _launch_tma(a, b, c, bias, residual, activation, cfg: Config, pdl: bool, weight_like: bool) -> None:
    batch, m, k = a.shape
    n = b.shape[2]
    b_k_major = b.stride(1) == 1
    a_op, b_op = _tma_operands(a, b, batch)
    lead = [1] if batch > 1 else []
    a_desc = TensorDescriptor.from_tensor(a_op, lead + [cfg.block_m, cfg.block_k])
    b_block = [cfg.block_n, cfg.block_k] if b_k_major else [cfg.block_k, cfg.block_n]
    b_desc = TensorDescriptor.from_tensor(b_op, lead + b_block)
    c_block = [cfg.block_m, cfg.block_n // cfg.epilogue_parts]
    c_desc = TensorDescriptor.from_tensor(c if batch > 1 else c[0], lead + c_block)
    tiles = batch * _cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n)
    programs = (
        tuning.sm_count(c.device.index or 0) * cfg.occupancy if c.device.type == "cuda" else min(tiles, 4)
    )
    prefetch = _prefetches(pdl, weight_like, tiles, c.device)
    bias_t = bias if bias is not None else c
    res_t = residual if residual is not None else c[0]
    launch_kernel(
        gemm_tma_kernel, (programs,),
        a_desc, b_desc, c_desc, b_op, c, bias_t, res_t,
        batch, m, n, k,
        b_op.stride(0) if batch > 1 else 0, b_op.stride(-2), bias_t.stride(-1), res_t.stride(0), res_t.stride(1),
        ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        B_K_MAJOR=b_k_major, BATCHED=batch > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, NUM_PROGRAMS=programs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, USE_PDL=pdl, PREFETCH_B=prefetch, EPILOGUE_PARTS=cfg.epilogue_parts, launch_pdl=pdl,
    )  # fmt: skip


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    b2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    allow_tf32: bool = False,
    config: Config | None = None,
) -> torch.Tensor:
    """``act(a @ b + bias) [* (a @ b2)] [+ residual]``, output in ``a.dtype``: one Triton launch, or
    PyTorch's ops where the tuner found them faster (``Config(kernel="torch")``, float16/bfloat16).

    a: ``(Ba, M, K)``, b: ``(Bb, K, N)`` with ``Ba``/``Bb`` equal or 1 (broadcast), any strides.
    b2 (gate, ``(K, N)``), bias (``(N,)``) and residual (``(M, N)``) apply to every batch entry.
    Returns a contiguous ``(B, M, N)`` tensor, ``B`` the broadcast batch. ``config`` bypasses the tuner.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if config is not None and not (isinstance(config, Config) and launchable(config)):
        raise ValueError(f"config must be a launchable kernl.matmul.Config, got {config!r}")
    batch = 0 if 0 in (a.shape[0], b.shape[0]) else max(a.shape[0], b.shape[0])  # broadcast, as torch
    m, k = a.shape[1], a.shape[2]
    n = b.shape[2]
    operands = {"a (linear_act's x)": a, "b (the weight)": b, "b2": b2, "bias": bias, "residual": residual}
    check_spans(operands, m, n)
    if batch * m * n == 0:
        return torch.empty((batch, m, n), dtype=a.dtype, device=a.device)
    precision = input_precision(a.dtype, allow_tf32)
    problem = Problem(
        batch=batch,
        m=m,
        n=n,
        k=k,
        dtype=a.dtype,
        precision=precision,
        a_k_contiguous=a.stride(2) == 1,
        b_k_contiguous=b.stride(1) == 1,
        gated=b2 is not None,
        tma=tma_eligible(a, b, b2, batch),
        activation=activation,
        residual=residual is not None,
        bias=bias is not None,
    )
    stride_ab = a.stride(0) if a.shape[0] > 1 else 0
    stride_bb = b.stride(0) if b.shape[0] > 1 else 0
    g = b2 if b2 is not None else b[0]
    pdl = programmatic_launch(a.device)
    weight_like = b.shape[0] == 1 and b.stride(1) == 1 and g.stride(0) == 1  # B (and B2) as nn.Linear weights

    def launch(cfg: Config) -> torch.Tensor:
        if cfg.kernel == "torch":
            return gemm_torch(a, b, b2, bias, residual, activation)
        c = torch.empty((batch, m, n), dtype=a.dtype, device=a.device)
        if cfg.kernel == "tma":
            if not problem.tma:
                raise ValueError(f"config {cfg} needs the TMA kernel, which cannot run this problem")
            _launch_tma(a, b, c, bias, residual, activation, cfg, pdl, weight_like)
            return c
        bias_t = bias if bias is not None else c
        res_t = residual if residual is not None else c
        split = effective_split(k, cfg.block_k, cfg.split_k)
        grid_m, grid_n = _cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n)
        for first in range(0, batch, MAX_GRID_Z):
            part = slice(first, first + MAX_GRID_Z)
            a_z, b_z, c_z = (t[part] if t.shape[0] > 1 else t for t in (a, b, c))
            tiles = c_z.shape[0] * grid_m * grid_n
            if split > 1:
                parts = 2 if b2 is not None else 1
                ws = torch.empty(
                    split * tiles * parts * cfg.block_m * cfg.block_n, dtype=torch.float32, device=c.device
                )
                locks = _tile_locks(c.device, tiles)
            else:
                ws = locks = c
            prefetch = _prefetches(pdl, weight_like, tiles, c.device)
            launch_kernel(
                gemm_kernel, (grid_m * grid_n, split, c_z.shape[0]),
                a_z, b_z, g, c_z, bias_t, res_t, ws, locks,
                m, n, k, split,
                stride_ab, a.stride(1), a.stride(2),
                stride_bb, b.stride(1), b.stride(2),
                g.stride(0), g.stride(1),
                c.stride(0), c.stride(1), c.stride(2),
                bias_t.stride(-1), res_t.stride(-2), res_t.stride(-1),
                ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_GATE=b2 is not None,
                HAS_RESIDUAL=residual is not None, INPUT_PRECISION=precision, EVEN_K=k % cfg.block_k == 0,
                USE_SPLIT=split > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages, USE_PDL=pdl,
                PREFETCH_B=prefetch, launch_pdl=pdl,
            )  # fmt: skip
        return c

    # Triton launches on the current device. A result past the fp16 range is stored as inf, as torch's
    # matmul gives it: no numpy warning about that cast under the interpreter.
    with torch.cuda.device(a.device.index if a.is_cuda else -1), float_errors_ignored(a.device):
        return launch(config or tuning.choose(problem, a.device, launch))
