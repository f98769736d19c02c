# %% [markdown]
# # 00. Debugging a Triton kernel
#
# A kernl kernel is a short Python function. When it computes the wrong thing, you can run it on
# CPU tensors through Triton's **interpreter**, print inside it, stop in it with `pdb`, and compare
# it against its PyTorch reference with the project's tolerance rule. This tutorial does each of
# those on kernl's layer norm, then plants an indexing bug in a copy of that kernel and finds it.
#
# Run it from the repository root after `source testing/gpu_env.sh`:
# `python tutorials/00_debugging_a_kernel.py` (a GPU is not needed: everything here runs on the CPU).

# %% [markdown]
# ## 1. Run any kernl kernel on CPU tensors
#
# `TRITON_INTERPRET=1` must be set **before** `triton` is imported: the `@triton.jit` decorator reads
# it. Each program of the grid then runs as plain Python over numpy arrays, one after the other.
# It is slow (a 128x256x192 matmul takes about a second) but every line of the kernel really runs.

# %%
import os

os.environ["TRITON_INTERPRET"] = "1"  # before importing triton (kernl imports it)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernl.layernorm import layer_norm, layer_norm_reference  # noqa: E402
from kernl_testing import assert_matches_reference  # noqa: E402

torch.manual_seed(0)
x = torch.randn(5, 48)
weight, bias = torch.randn(48), torch.randn(48)
y = layer_norm(x, weight, bias, eps=1e-5)  # a real Triton launch, interpreted
print("kernl layer_norm on", y.device, "max |error| vs F.layer_norm:",
      float((y - torch.nn.functional.layer_norm(x, (48,), weight, bias)).abs().max()))  # fmt: skip

# %% [markdown]
# ## 2. Check against the reference, the way the tests do
#
# Every kernl test holds a kernel to the tolerance rule in `testing/kernl_testing/tolerance.py`:
# an element passes when `|kernel - ref| <= 2 * |torch_same_dtype - ref| + atol + rtol * |ref|`, with
# the reference in fp64. So a kernel may be as far from the exact answer as twice what PyTorch
# itself gets in the same dtype, plus about one unit in the last place; NaN never passes.

# %%
for dtype in (torch.float32, torch.float16):
    xd, wd, bd = x.to(dtype), weight.to(dtype), bias.to(dtype)
    exact = layer_norm_reference(xd.double(), wd.double(), bd.double(), 1e-5)
    peer = torch.nn.functional.layer_norm(xd.float(), (48,), wd.float(), bd.float(), 1e-5).to(dtype)
    assert_matches_reference(layer_norm(xd, wd, bd, 1e-5), exact, peer, name=f"layer_norm {dtype}")
    print(dtype, "passes the tolerance rule")

# %% [markdown]
# ## 3. Print inside a kernel, and stop in it with pdb
#
# Under the interpreter a kernel's body is ordinary Python: `print(...)` shows each program's values
# (blocks are numpy arrays), and `tl.device_print` works too (it also works on the GPU, where plain
# `print` only runs at compile time). `breakpoint()` stops inside the program, where `p x` and `n`
# work as usual.
#
# Guard a breakpoint behind a `tl.constexpr` flag, so that it costs nothing when off, and turn the
# flag on from an environment variable: an unattended run (CI) never stops at a prompt.
# Try `TUTORIAL_PDB=1 python tutorials/00_debugging_a_kernel.py`, then `p rows`, `p x`, `c`.


# %%
@triton.jit
def scale_rows(X, Y, M, N, stride_m, factor, BLOCK_N: tl.constexpr, SHOW: tl.constexpr, PDB: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(X + row * stride_m + cols, mask=cols < N, other=0.0)
    if SHOW:
        print("program", row, "loaded", x)  # the interpreter's own print: numpy values
        tl.device_print("row sum", tl.sum(x, axis=0))
    if PDB:
        breakpoint()  # noqa: T100 - only when TUTORIAL_PDB=1
    tl.store(Y + row * N + cols, x * factor, mask=cols < N)


small = torch.arange(6.0).reshape(2, 3)
out = torch.empty_like(small)
scale_rows[(2,)](small, out, 2, 3, small.stride(0), 10.0, BLOCK_N=4, SHOW=True,
                 PDB=os.environ.get("TUTORIAL_PDB") == "1")  # fmt: skip
assert torch.equal(out, small * 10)

# %% [markdown]
# ## 4. A worked example: an indexing bug
#
# Below is a copy of the heart of kernl's layer norm kernel (`packages/layernorm/src/kernl/layernorm/
# kernel.py`, trimmed to LayerNorm without residual), with one bug planted behind `PLANTED_BUG`: the
# load computes the row offset as `row * N` instead of `row * stride_xm`. That is right whenever the
# rows lie end to end in memory, which is what most hand-written tests feed it.


# %%
@triton.jit
def layer_norm_copy(X, W, B, Y, M, N, stride_xm, eps, BLOCK_N: tl.constexpr, PLANTED_BUG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    if PLANTED_BUG:
        x = tl.load(X + row * N + cols, mask=ok, other=0.0)  # assumes contiguous rows
    else:
        x = tl.load(X + row * stride_xm + cols, mask=ok, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(ok, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=0) / N
    h = centred * tl.rsqrt(variance + eps)
    h = h * tl.load(W + cols, mask=ok, other=0.0) + tl.load(B + cols, mask=ok, other=0.0)
    tl.store(Y + row * N + cols, h.to(Y.dtype.element_ty), mask=ok)


def run_copy(x, w, b, eps=1e-5, planted_bug=True):
    """Launch the copy on a 2-D ``x`` (M, N) with unit column stride; returns a contiguous (M, N)."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype)
    layer_norm_copy[(m,)](x, w, b, y, m, n, x.stride(0), eps,
                          BLOCK_N=triton.next_power_of_2(n), PLANTED_BUG=planted_bug)  # fmt: skip
    return y


def check(x, planted_bug):
    w, b = torch.randn(x.shape[1]), torch.randn(x.shape[1])
    exact = layer_norm_reference(x.double(), w.double(), b.double(), 1e-5)
    assert_matches_reference(run_copy(x, w, b, planted_bug=planted_bug), exact, None, name="layer_norm_copy")


# %% [markdown]
# A test with a contiguous input passes: the bug is invisible there.

# %%
check(torch.randn(7, 40), planted_bug=True)
print("contiguous input: passes, bug and all")

# %% [markdown]
# kernl's tests also draw **layouts** (`kernl_testing.make_tensor`: contiguous, rows padded in memory,
# transposed views). With rows padded in memory (a slice of a wider tensor: stride 43, not 40) the
# tolerance rule catches it:

# %%
from kernl_testing import ValueSpec, make_tensor  # noqa: E402

padded = make_tensor((7, 40), torch.float32, ValueSpec(seed=1, scale=1.0, offset=0.0), "padded_rows", "cpu")
print("shape", tuple(padded.shape), "strides", padded.stride())
try:
    check(padded, planted_bug=True)
    raise RuntimeError("the planted bug went unnoticed")
except AssertionError as failure:
    print("caught:", failure)

# %% [markdown]
# ### Finding it
#
# The tolerance message says how many elements are off and by how much; the first question is
# *which* ones. Compare row by row: a pattern in the bad rows points at the indexing.

# %%
w, b = torch.ones(40), torch.zeros(40)
got = run_copy(padded, w, b, planted_bug=True)
want = layer_norm_reference(padded.double(), w.double(), b.double(), 1e-5)
bad_rows = [row for row in range(7) if not torch.allclose(got[row].double(), want[row], atol=1e-4)]
print("rows that are wrong:", bad_rows)  # row 0 is right, every later row is wrong

# %% [markdown]
# Row 0 right and every later row wrong means the kernel reads the right row start only for row 0: a
# row offset. The load reads `X + row * N + cols`; the tensor's rows are `stride(0) = 43` elements
# apart. Look at what each address holds in the underlying storage (in the kernel, a `print` of `x`
# in the program for row 1 shows the same values):

# %%
storage = padded.as_strided((padded.numel() + 3 * 7,), (1,))
print("row 1 should start with", padded[1, :3].tolist())
print("row 1 * N lands on     ", storage[40:43].tolist(), "(inside row 0's padding, then row 1 shifted)")
print("row 1 * stride lands on", storage[43:46].tolist())
assert torch.equal(storage[43:46], padded[1, :3])

# %% [markdown]
# The fix is the stride (`PLANTED_BUG=False`): the copy now passes for every layout.

# %%
for layout in ("contiguous", "padded_rows"):
    check(make_tensor((7, 40), torch.float32, ValueSpec(2, 1.0, -20.0), layout, "cpu"), planted_bug=False)
print("fixed: passes contiguous and padded rows")

# %% [markdown]
# ## 5. Common failure messages and what they mean
#
# | message | meaning |
# |---|---|
# | `arange's range must be a power of 2` | `tl.arange(0, n)` with `n` not a power of two: round the block up with `triton.next_power_of_2` and mask |
# | `Cannot access data pointer of Tensor (FakeTensor)` | a Triton launch inside `torch.compile` tracing: call the registered `torch.ops.kernl.*` op (what `functional.py` does) |
# | `'numpy.ndarray' object has no attribute 'type'` (interpreter) | a kernel argument is not a torch tensor (numpy array, list) |
# | `Pointer argument cannot be accessed from Triton (cpu tensor?)` | a CPU tensor given to a compiled kernel: put it on the GPU, or set `TRITON_INTERPRET=1` before importing triton |
# | `an illegal memory access was encountered` | (GPU) a load/store outside the tensor: a missing mask or a wrong stride. The interpreter often reads garbage silently instead: check with padded layouts, as above |
# | `misaligned address` | (GPU) a pointer hint (`tl.multiple_of`) or a TMA descriptor assumes 16-byte alignment a sliced tensor does not have |
# | `out of resource: shared memory` | (GPU) the tiles and `num_stages` need more shared memory than the SM has: smaller blocks or fewer stages |
# | `Input shapes should have M >= 16, N >= 16 and K >= 16` | (GPU) `tl.dot` on blocks under 16: the interpreter accepts them, the compiler does not |
# | `only 0-dimensional arrays can be converted to Python scalars` | triton 3.6's interpreter with numpy >= 2.3 in a `range()` loop: use numpy < 2.3 |
# | `NaN pattern differs` (tolerance rule) | the kernel left output elements unwritten (the tests poison `torch.empty` with NaN) or produced NaN where the reference has none |
# | `N/M elements out of tolerance ... worst error` | a real numerical difference: find which elements (rows, columns, blocks) as above |
#
# Two of them, live:

# %%
try:
    scale_rows[(1,)](small, out, 2, 3, small.stride(0), 1.0, BLOCK_N=3, SHOW=False, PDB=False)
except Exception as error:  # noqa: BLE001 - the tutorial shows the message
    print(type(error).__name__, ":", error)
try:
    scale_rows[(1,)](small.numpy(), out, 2, 3, 3, 1.0, BLOCK_N=4, SHOW=False, PDB=False)
except Exception as error:  # noqa: BLE001
    print(type(error).__name__, ":", error)

# %% [markdown]
# bf16 is a special case: the interpreter computes bf16 `tl.dot` wrongly and truncates fp32 -> bf16
# stores, so kernl tests bf16 on the GPU only (`kernl_testing.float_dtypes`).
