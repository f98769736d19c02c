# %% [markdown]
# # 04. Writing an FX rule for a new model
#
# `optimize_model` does not know models by name. TorchDynamo turns the model's forward into an FX
# graph of calls (`F.linear`, `F.layer_norm`, `scaled_dot_product_attention`, ...) and kernl's rules
# (`packages/integration/src/kernl/integration/rules/`, one file each) replace the calls they
# recognise by kernl kernels. A model family whose layers call something no rule recognises runs
# those layers as PyTorch. This tutorial takes such a family, GPT-2, and adds the missing rule:
#
# 1. look at the graph TorchDynamo gives;
# 2. match by meaning: which calls compute something a kernl kernel computes;
# 3. replace, check the rewritten graph against the original;
# 4. register the rule and read `optimize_model`'s report.
#
# On a CPU the kernels run through Triton's interpreter, on a tiny GPT-2 with random weights; on a
# GPU a GPT-2-small-sized model is timed with and without the rule and plotted
# (`tutorial_04_fx_rule.png`).

# %%
import copy
import os
from collections import Counter

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
DEVICE, DTYPE = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)

import transformers  # noqa: E402
from torch import fx  # noqa: E402

from kernl.integration import optimize_model  # noqa: E402
from kernl.linear_act import linear_act  # noqa: E402
from kernl_testing import assert_matches_reference  # noqa: E402

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128)
model = transformers.GPT2Model(config).to(DEVICE, DTYPE).eval()
input_ids = torch.randint(0, 128, (2, 9), device=DEVICE)

# %% [markdown]
# ## 1. The graph TorchDynamo gives
#
# A backend is any function `(graph_module, example_inputs) -> callable`. This one keeps the graph
# and runs it unchanged. (Call with `use_cache=False`: this tutorial is about the encoder-style
# forward; a returned key/value cache would be a graph output too.)

# %%
captured = []


def keep_graph(gm: fx.GraphModule, example_inputs):
    captured.append(gm)
    return gm.forward


with torch.no_grad():
    torch.compile(model, backend=keep_graph)(input_ids, use_cache=False)
gm = captured[0]
calls = Counter(
    getattr(node.target, "__name__", str(node.target))
    for node in gm.graph.nodes
    if node.op in ("call_function", "call_method")
)
print("calls in the graph:", dict(calls.most_common(12)))
for node in gm.graph.nodes:
    if getattr(node.target, "__name__", "") == "addmm":
        print("first addmm:", node.format_node())
        break

# %% [markdown]
# Bert calls `F.linear(x, W, b)`: kernl's `linear_act` rule matches that. GPT-2's projections are
# `Conv1D` modules, which compute `torch.addmm(b, x.view(-1, K), W)` with `W` stored as `(K, N)`.
# Same meaning, another spelling. kernl now ships a rule for it (`rules/conv1d.py`, which also fuses
# the spelled-out `gelu_new` and the residual add); this tutorial takes it out of the list first, to
# write a simpler one of its own from scratch and compare. Without a rule, every projection of GPT-2
# runs as PyTorch: layer norms and attention are replaced, the projections are not (and the report's
# "kept as PyTorch: activation" is the `tanh` of GPT-2's spelled-out `gelu_new`).

# %%
from kernl.integration.rules import RULES  # noqa: E402

SHIPPED_INDEX = next(i for i, rule in enumerate(RULES) if rule.name == "conv1d")
SHIPPED_CONV1D = RULES.pop(SHIPPED_INDEX)
baseline = copy.deepcopy(model)
with torch.no_grad():
    reference = model(input_ids, use_cache=False).last_hidden_state
report = optimize_model(baseline)
with torch.no_grad():
    baseline(input_ids, use_cache=False)
print(report)
print("replacements without a rule for addmm:", {k: v for k, v in report.totals().items() if v})

# %% [markdown]
# ## 2. Match by meaning
#
# `torch.addmm(bias, x, W)` is `x @ W + bias`, which is `F.linear(x, W.T, bias)`, which is what
# `kernl.linear_act.linear_act(x, W.T, bias)` computes in one kernel. A rule matches the *call*
# (its target function) and checks what it needs from the values TorchDynamo recorded on each node
# (`node.meta["example_value"]`: shape, dtype, device), never names of modules or of variables. It
# reads arguments wherever they are (position or keyword) and leaves alone anything it is not sure
# of: an `addmm` with `beta`/`alpha`, a 3-D input, a bias that is not one value per output column.


# %%
def example(value):
    """The example tensor TorchDynamo recorded for a graph node (None for constants)."""
    return value.meta.get("example_value") if isinstance(value, fx.Node) else None


def match_addmm_linear(node: fx.Node):
    """``(x, W, bias)`` when ``node`` is ``torch.addmm(bias, x, W)`` computing a linear layer, else None."""
    if node.op != "call_function" or node.target is not torch.addmm or len(node.args) != 3 or node.kwargs:
        return None
    bias, x, weight = node.args
    b, xe, w = example(bias), example(x), example(weight)
    if b is None or xe is None or w is None or xe.dim() != 2 or w.dim() != 2:
        return None
    if b.shape != (w.shape[1],) or not (b.dtype == xe.dtype == w.dtype) or not xe.dtype.is_floating_point:
        return None
    return x, weight, bias


# %% [markdown]
# ## 3. Replace
#
# The replacement is a plain function that the rewritten graph calls: kernl's backend runs the
# graph as Python, so there is nothing to register with `torch.library` for this. The rewrite
# inserts the call before the matched node, hands it the node's users and erases the node.


# %%
def addmm_as_linear(x, weight, bias):
    """``torch.addmm(bias, x, weight)`` on kernl: x (M, K), weight (K, N) (``Conv1D``'s layout), bias (N,)."""
    return linear_act(x, weight.t(), bias)


def rewrite_addmm(gm: fx.GraphModule) -> int:
    """Replace every matched ``addmm`` by :func:`addmm_as_linear`; return how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if (match := match_addmm_linear(node)) is None:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(addmm_as_linear, match)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        replaced += 1
    gm.recompile()
    return replaced


# %% [markdown]
# Check the rule on its own, before any registration: rewrite a copy of the captured graph and run
# both on the same inputs.


# %%
def run_captured(graph_module):
    """The model's output when TorchDynamo's graph is swapped for ``graph_module``."""
    torch._dynamo.reset()  # compile again, so that this backend runs
    with torch.no_grad():
        compiled = torch.compile(model, backend=lambda gm, example_inputs: graph_module.forward)
        return compiled(input_ids, use_cache=False).last_hidden_state


rewritten = fx.GraphModule(gm, copy.deepcopy(gm.graph))
print("addmm calls replaced:", rewrite_addmm(rewritten))
assert not any(node.target is torch.addmm for node in rewritten.graph.nodes)
exact = transformers.GPT2Model(config).eval()
exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
with torch.no_grad():
    exact_out = exact.to(DEVICE, torch.float64)(input_ids, use_cache=False).last_hidden_state
assert_matches_reference(run_captured(rewritten), exact_out, reference, name="rewritten graph", scale=4)
print("rewritten graph matches the model")

# %% [markdown]
# ## 4. Register the rule and read the report
#
# kernl's rules are the `Rule` records in the list `kernl.integration.rules.RULES`, applied in order
# to every graph (see `rules/__init__.py`). `matches` and `replacement` are what `kernl rules` prints;
# `rewrite` does the work and returns how many places it replaced. Putting the rule first lets it run
# before the others.
# (`Rule` and `RULES` are the only parts of kernl's integration internals this tutorial touches.)

# %%
from kernl.integration.rules import RULES, Rule  # noqa: E402

ADDMM_RULE = Rule(
    name="addmm_linear",
    matches="torch.addmm(bias, x, W) with a 2-D x and a (N,) bias (GPT-2's Conv1D)",
    replacement="kernl.linear_act.linear_act(x, W.T, bias)",
    rewrite=rewrite_addmm,
)
RULES.insert(0, ADDMM_RULE)
torch._dynamo.reset()
optimized = copy.deepcopy(model)
report = optimize_model(optimized)
with torch.no_grad():
    out = optimized(input_ids, use_cache=False).last_hidden_state
print(report)
print("replacements with the rule:", {k: v for k, v in report.totals().items() if v})
assert report.totals().get("addmm_linear") == 4 * config.n_layer  # qkv, attention out, MLP in and out
assert_matches_reference(out, exact_out, reference, name="GPT-2 on kernl", scale=4)
print("GPT-2 with the new rule matches Hugging Face")

# %% [markdown]
# Next steps for a real rule: fuse the activation too (GPT-2's `gelu_new` is spelled out as
# `0.5 * x * (1 + tanh(...))` after a `view`: match that chain by meaning, as `rules/gated_ffn.py`
# does by probing what a chain of ops computes), put it in its own file under `rules/`, add it to
# `RULES`, and test it against the unrewritten graph (`packages/integration/tests/`).

# %% [markdown]
# ## 5. Timings (GPU only)
#
# A GPT-2-small-sized model (random weights, fp16, batch 8 x 128 tokens, `use_cache=False`):
# Hugging Face, kernl without the rule, kernl with it.

# %%
if not ON_GPU:
    print("No GPU (or TRITON_INTERPRET=1): timing and plot skipped; the rule was checked on the CPU.")
else:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import triton

    small = transformers.GPT2Model(transformers.GPT2Config()).to(DEVICE, DTYPE).eval()
    ids = torch.randint(0, 50257, (8, 128), device=DEVICE)
    timings = {}
    with torch.no_grad():
        timings["Hugging Face"] = triton.testing.do_bench(lambda: small(ids, use_cache=False))
        for label, with_rule in (("kernl, no addmm rule", False), ("kernl + addmm rule", True)):
            if not with_rule:
                RULES.remove(ADDMM_RULE)
            else:
                RULES.insert(0, ADDMM_RULE)
            torch._dynamo.reset()
            candidate = copy.deepcopy(small)
            optimize_model(candidate)
            candidate(ids, use_cache=False)  # compile, tune, capture
            timings[label] = triton.testing.do_bench(lambda c=candidate: c(ids, use_cache=False))
    print(", ".join(f"{name} {ms:.3f} ms" for name, ms in timings.items()))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(list(timings), list(timings.values()), color=["grey", "tab:orange", "tab:green"])
    axis.set(ylabel="ms per forward", title=f"GPT-2 small, fp16, 8 x 128, {torch.cuda.get_device_name()}")
    figure.savefig("tutorial_04_fx_rule.png", dpi=120, bbox_inches="tight")
    print("plot saved to tutorial_04_fx_rule.png")

RULES.remove(ADDMM_RULE)  # leave kernl's rule list as it was
RULES.insert(SHIPPED_INDEX, SHIPPED_CONV1D)
