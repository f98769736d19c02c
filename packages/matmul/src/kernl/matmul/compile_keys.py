"""Which Triton kernel specialisation a launch needs: the part of a launch that costs a compilation.

A Triton kernel is compiled once per set of constexpr arguments, ``num_warps`` and ``num_stages``
(and per class of its other arguments: dtypes, alignment, integers equal to 1). :func:`compile_key`
names that set for a :class:`~kernl.matmul.config_cache.Config` launched on a
:class:`~kernl.matmul.tuning.Problem`, mirroring what :mod:`kernl.matmul.launch` passes. Two configs
with one key share a compiled kernel: the split-K factor, for one, is a run-time argument (only
whether K is split is a constexpr). The argument classes are summed up by the operand dtype and the
problem's layout; K and N multiples of 16 (every transformer projection) keep the other classes the
same for every M. PyTorch's candidate (``kernel="torch"``) compiles nothing: its key is None.
"""

from dataclasses import dataclass

import triton

from kernl.matmul import launch, tuning
from kernl.matmul.config_cache import Config


@dataclass(frozen=True, kw_only=True)
class CompileKey:
    """One compiled Triton kernel: the kernel's name, its constexprs and launch options, by name."""

    kernel: str
    dtype: str
    constants: tuple[tuple[str, object], ...]


def compile_key(p, c: Config, sms: int, *, pdl: bool = True, weight_like: bool = True) -> CompileKey | None:
    """The kernel specialisation ``c`` compiles for problem ``p`` (a :class:`kernl.matmul.tuning.Problem`)
    on a GPU of ``sms`` multiprocessors; None for PyTorch's candidate. ``pdl``: programmatic dependent
    launch (Hopper and newer); ``weight_like``: B is one ``nn.Linear``-like weight for the whole batch.
    Whether K is split and whether B is prefetched come from :mod:`kernl.matmul.launch`'s own rules."""
    if c.kernel == "torch":
        return None
    tiles = p.batch * triton.cdiv(p.m, c.block_m) * triton.cdiv(p.n, c.block_n)
    common = dict(
        ACTIVATION=p.activation,
        HAS_BIAS=p.bias,
        HAS_RESIDUAL=p.residual,
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        GROUP_M=c.group_m,
        USE_PDL=pdl,
        PREFETCH_B=launch.prefetch_weights(pdl, weight_like, tiles, sms),
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    if c.kernel == "tma":
        constants = dict(
            common,
            B_K_MAJOR=p.b_k_contiguous,
            BATCHED=p.batch > 1,
            NUM_PROGRAMS=sms * c.occupancy,
            EPILOGUE_PARTS=c.epilogue_parts,
        )
        name = "gemm_tma_kernel"
    else:
        constants = dict(
            common,
            HAS_GATE=p.gated,
            INPUT_PRECISION=p.precision,
            EVEN_K=p.k % c.block_k == 0,
            USE_SPLIT=launch.effective_split(p.k, c.block_k, c.split_k) > 1,
            A_K_CONTIGUOUS=p.a_k_contiguous,  # a unit stride is an argument class of its own
            B_K_CONTIGUOUS=p.b_k_contiguous,
        )
        name = "gemm_kernel"
    dtype = str(p.dtype).removeprefix("torch.")
    return CompileKey(kernel=name, dtype=dtype, constants=tuple(sorted(constants.items())))


def in_guess_order(problem, configs: list[Config]) -> list[Config]:
    """A stand-in ranking for :func:`tuned_compile_keys` off the GPU: the Triton candidates in the order
    the tuner lists them (best guesses first)."""
    return [c for c in configs if c.kernel != "torch"]


def tuned_compile_keys(problems, sms: int, rank=in_guess_order, **launch) -> list[set[CompileKey]]:
    """The kernels a cold process compiles to tune ``problems`` (each a :class:`~kernl.matmul.tuning.Problem`,
    in call order) on a GPU of ``sms`` multiprocessors: per problem, the compile keys of the candidates
    its tuning times (empty when its M class was tuned before), neighbour reuse included
    (:func:`kernl.matmul.tuning.neighbour_ranking`). ``rank(problem, candidates)``: the Triton configs
    fastest first (what the timing would find); ``launch``: :func:`compile_key`'s keywords.
    The chosen config, launched at another M of its class, may need one more kernel (its
    ``PREFETCH_B``): not counted."""
    rankings: dict[str, list[Config]] = {}
    compiled = []
    for p in problems:
        key = tuning.cache_key(p, "simulated")
        if key in rankings:
            compiled.append(set())
            continue
        neighbour = tuning.neighbour_ranking(p, "simulated", rankings)
        configs = tuning.candidates(p, sms, neighbour)
        rankings[key] = rank(p, configs)
        compiled.append({compile_key(p, c, sms, **launch) for c in configs if c.kernel != "torch"})
    return compiled
