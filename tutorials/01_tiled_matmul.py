# %% [markdown]
# # 01. Tiled matmul: from a naive kernel to kernl's persistent TMA kernel
#
# `C = A @ B` with `A` (M, K) and `B` (K, N). Four kernels, each one idea more than the last:
#
# 1. **naive**: one program per output element, a dot product of a row and a column;
# 2. **tiles**: one program per `BLOCK_M x BLOCK_N` tile, `tl.dot` on tiles (tensor cores);
# 3. **L2 grouping**: the same tiles, visited in an order that keeps operands in L2;
# 4. **kernl**: `kernl.matmul`, whose Hopper path is a persistent kernel fed by TMA.
#
# Each is checked against the fp64 reference; on a GPU they are timed against `torch.matmul` and
# plotted (`tutorial_01_matmul.png` in the current directory). On a CPU the kernels run through
# Triton's interpreter at small sizes and the timing cells say they are skipped.

# %%
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
DEVICE = "cuda" if ON_GPU else "cpu"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernl.matmul import Config, gemm, matmul  # noqa: E402
from kernl_testing import assert_matches_reference  # noqa: E402

torch.manual_seed(0)


def operands(m, n, k, dtype=torch.float16):
    return torch.randn(m, k, device=DEVICE, dtype=dtype), torch.randn(k, n, device=DEVICE, dtype=dtype)


def check(name, c, a, b):
    """``c`` against ``a @ b`` in fp64, with torch's own fp16 result as the yardstick."""
    exact = a.double() @ b.double()
    assert_matches_reference(c, exact, torch.matmul(a, b), name=name, atol_scale=a.shape[1] ** 0.5)
    print(f"{name}: matches the fp64 reference")


# %% [markdown]
# ## 1. Naive: one program per element
#
# Program `(i, j)` walks K in chunks, multiplying a piece of row `i` of A by a piece of column `j` of
# B. Every element of A is read N times and every element of B M times, all from global memory, and
# the work never reaches the tensor cores: this is memory-bound from the first line.


# %%
@triton.jit
def matmul_naive(A, B, C, M, N, K, BLOCK_K: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        a = tl.load(A + i * K + ks, mask=ks < K, other=0.0)
        b = tl.load(B + ks * N + j, mask=ks < K, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    tl.store(C + i * N + j, tl.sum(acc, axis=0).to(C.dtype.element_ty))


def run_naive(a, b):
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty(m, n, device=a.device, dtype=a.dtype)
    matmul_naive[(m, n)](a, b, c, m, n, k, BLOCK_K=64)
    return c


a, b = operands(24, 20, 72)
check("naive", run_naive(a, b), a, b)

# %% [markdown]
# ## 2. Tiles
#
# A program now owns a `BLOCK_M x BLOCK_N` tile of C. Per step of K it loads a `BLOCK_M x BLOCK_K`
# tile of A and a `BLOCK_K x BLOCK_N` tile of B and multiplies them with `tl.dot` (tensor cores),
# accumulating in fp32. Each loaded element now serves `BLOCK_N` (or `BLOCK_M`) multiply-adds instead
# of one: the arithmetic intensity grows with the tile, and the kernel becomes compute-bound.
#
# `GROUP_M` is the next section's idea; with `GROUP_M=1` the tiles are visited row by row.


# %%
@triton.jit
def matmul_tiled(A, B, C, M, N, K, stride_am, stride_bk, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles are walked column by column (GROUP_M = 1: plain row-major order)
    width = GROUP_M * grid_n
    group_id = pid // width
    group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
    pid_m = group_id * GROUP_M + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        a = tl.load(
            A + rm[:, None] * stride_am + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0
        )
        b = tl.load(
            B + rk[:, None] * stride_bk + rn[None, :], mask=(rk < K)[:, None] & (rn < N)[None, :], other=0.0
        )
        acc = tl.dot(a, b, acc)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=mask)


def run_tiled(a, b, group_m=1, block=(64, 64, 32)):
    (m, k), n = a.shape, b.shape[1]
    block_m, block_n, block_k = block
    c = torch.empty(m, n, device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    matmul_tiled[grid](a, b, c, m, n, k, a.stride(0), b.stride(0), c.stride(0),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m)  # fmt: skip
    return c


small_blocks = (128, 128, 64) if ON_GPU else (32, 32, 32)
a, b = operands(96, 80, 100)
check("tiled", run_tiled(a, b, block=small_blocks), a, b)

# %% [markdown]
# ## 3. L2 grouping
#
# Programs run in waves (about one per SM at a time). In row-major order the first wave covers a
# few rows of tiles but *every* column: all of B is pulled through L2 while only a strip of A is
# reused. Grouping walks `GROUP_M` row-tiles column by column, so a wave touches a square-ish block of
# C: fewer distinct A and B tiles per wave, more of them hit in L2. The map shows which program
# computes which tile of an 8 x 8 grid of tiles; below it, how many tile rows of A and tile columns of
# B the first wave reads for a 4096^3 problem in 128 x 128 tiles (32 x 32 tiles) on an H100 (132 SMs):


# %%
def tile_order(grid_m, grid_n, group_m):
    """``order[i, j]``: the program that computes tile (i, j) (the kernel's arithmetic, in Python)."""
    order = torch.empty(grid_m, grid_n, dtype=torch.int64)
    for pid in range(grid_m * grid_n):
        width = group_m * grid_n
        group_id = pid // width
        group_size = min(grid_m - group_id * group_m, group_m)
        order[group_id * group_m + (pid % width) % group_size, (pid % width) // group_size] = pid
    return order


print("GROUP_M=4 on an 8 x 8 grid of tiles:\n", tile_order(8, 8, 4))
for group_m in (1, 8):
    wave = (tile_order(32, 32, group_m) < 132).nonzero()
    rows, cols = len(set(wave[:, 0].tolist())), len(set(wave[:, 1].tolist()))
    print(
        f"GROUP_M={group_m}: the first 132 programs read {rows} tile rows of A and {cols} tile columns of B"
    )

a, b = operands(96, 80, 100)
check("tiled, grouped", run_tiled(a, b, group_m=4, block=small_blocks), a, b)

# %% [markdown]
# ## 4. kernl's kernels
#
# `kernl.matmul.matmul` is the grouped tiled kernel grown up (`packages/matmul/src/kernl/matmul/
# kernel.py`): any strides, an fp32 epilogue (bias, activation, residual) and split-K for skinny
# problems, with tile sizes chosen by timing a short candidate list once per shape. On Hopper, half
# precision problems with aligned rows go to a second kernel (`kernel_tma.py`):
#
# - **persistent**: one program per SM walks many tiles (`tl.range(start, tiles, NUM_PROGRAMS)`), so
#   there is no per-tile launch cost and no tail of half-empty waves;
# - **TMA**: tiles arrive through tensor descriptors: the copy engine moves a whole 2-D tile per
#   instruction, zero-filled past the edges (no masks), freeing registers and threads for the math;
# - **flattened loops**: `flatten=True` merges the tile loop with the K loop, so the software pipeline
#   already loads the next tile's operands while this tile's epilogue stores its result.
#
# `kernl.matmul.gemm(..., config=Config(..., kernel="tma"))` runs the TMA kernel with a config of your
# choice (the interpreter runs it too, on the CPU).

# %%
a, b = operands(96, 80, 64)
check("kernl.matmul.matmul", matmul(a, b), a, b)
tma_config = Config(block_m=128 if ON_GPU else 32, block_n=128 if ON_GPU else 32, block_k=64 if ON_GPU else 32,
                    kernel="tma", num_stages=3)  # fmt: skip
if not ON_GPU or torch.cuda.get_device_capability()[0] >= 9:
    check("kernl TMA kernel", gemm(a[None], b[None], config=tma_config)[0], a, b)
else:
    print("kernl TMA kernel: skipped, it needs Hopper (compute capability 9.0) or the interpreter")

# %% [markdown]
# ## 5. Timings against torch.matmul (GPU only)
#
# TFLOP/s (`2 * M * N * K / time`) for square fp16 problems, the median of
# `triton.testing.do_bench_cudagraph`: each call is replayed from a CUDA graph, as `optimize_model` runs
# it, so small problems show the kernels' speed rather than the host's cost of launching them (Python
# argument checks and Triton's launcher, which `triton.testing.do_bench` would include).
# The naive kernel stops at 1024: it is far too slow beyond.

# %%
if not ON_GPU:
    print(
        "No GPU (or TRITON_INTERPRET=1): timing and plot skipped; the kernels above were checked on the CPU."
    )
else:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = {
        "naive": run_naive,
        "tiles": lambda a, b: run_tiled(a, b, group_m=1, block=(128, 128, 64)),
        "tiles + L2 grouping": lambda a, b: run_tiled(a, b, group_m=8, block=(128, 128, 64)),
        "kernl.matmul": matmul,
        "torch.matmul": torch.matmul,
    }
    sizes = [512, 1024, 2048, 4096, 8192]
    tflops = {name: [] for name in engines}
    for size in sizes:
        a, b = operands(size, size, size)
        for name, fn in engines.items():
            if name == "naive" and size > 1024:
                tflops[name].append(float("nan"))
                continue
            ms = triton.testing.do_bench_cudagraph(lambda fn=fn, a=a, b=b: fn(a, b))
            tflops[name].append(2 * size**3 / ms * 1e-9)
        print(f"{size}^3: " + ", ".join(f"{n} {t[-1]:.0f}" for n, t in tflops.items()) + " TFLOP/s")
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, values in tflops.items():
        axis.plot(sizes, values, marker="o", label=name)
    axis.set(xscale="log", yscale="log", xlabel="M = N = K", ylabel="TFLOP/s (fp16)",
             title=f"matmul on {torch.cuda.get_device_name()}")  # fmt: skip
    axis.legend()
    figure.savefig("tutorial_01_matmul.png", dpi=120, bbox_inches="tight")
    print("plot saved to tutorial_01_matmul.png")

# %% [markdown]
# What to expect on an H100: the naive kernel is hundreds of times slower (no tensor cores, no
# reuse); tiles get most of the way; grouping pays at the sizes whose operands no longer fit in L2;
# kernl's persistent TMA kernel closes most of the gap to cuBLAS (`torch.matmul`).
