"""fp16 overflow clamps that read nothing back to the host (BART's encoder layers and their copies).

BART's encoder layer ends with (``modeling_bart.py`` line 304 in transformers 5.17 and 5.25; the same
statement is copied into Marian, PLBart, BlenderbotSmall, MVP, LED, BigBirdPegasus, NLLB-MoE, ...)::

    if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
        clamp_value = torch.finfo(hidden_states.dtype).max - 1000
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)

In fp16 the condition reads a tensor on the host. TorchDynamo breaks the graph there, and as the branch
sits inside the encoder's loop over its layers it skips the encoder's frame: the encoder runs its layers
from Python, each compiled in pieces; and the host read cannot be captured, so the encoder's CUDA graph
capture failed (``cudaErrorStreamCaptureInvalidated``) and the encoder ran kernel by kernel.

Here the layer's ``forward`` is compiled again from its own source with only that statement changed, to
the same values without a branch on data::

    if hidden_states.dtype == torch.float16:
        clamp_value = torch.finfo(hidden_states.dtype).max - 1000
        hidden_states = torch.where(
            torch.isfinite(hidden_states).all(), hidden_states, torch.clamp(hidden_states, ...)
        )

and installed on each layer instance (its class is left alone). A forward whose source does not hold
that statement exactly, or that closes over variables (``super()``), is left as it is.
"""

import ast
import copy
import inspect
import textwrap
import types

import torch

_BRANCH = """
if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
    clamp_value = torch.finfo(hidden_states.dtype).max - 1000
    hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
"""
_BRANCHLESS = """
if hidden_states.dtype == torch.float16:
    clamp_value = torch.finfo(hidden_states.dtype).max - 1000
    hidden_states = torch.where(
        torch.isfinite(hidden_states).all(),
        hidden_states,
        torch.clamp(hidden_states, min=-clamp_value, max=clamp_value),
    )
"""


def _statement(source: str) -> ast.stmt:
    return ast.parse(textwrap.dedent(source)).body[0]


_BRANCH_TREE, _BRANCHLESS_TREE = _statement(_BRANCH), _statement(_BRANCHLESS)


class _Replacer(ast.NodeTransformer):
    """Replaces each statement equal to :data:`_BRANCH` (positions aside) by :data:`_BRANCHLESS`, at its
    line (tracebacks point at the statement it stands for)."""

    def __init__(self):
        self.replaced = 0

    def visit_If(self, node: ast.If) -> ast.AST:
        if ast.dump(node) != ast.dump(_BRANCH_TREE):
            return self.generic_visit(node)
        self.replaced += 1
        new = copy.deepcopy(_BRANCHLESS_TREE)
        for part in ast.walk(new):
            if "lineno" in part._attributes:
                part.lineno, part.end_lineno = node.lineno, node.end_lineno
                part.col_offset, part.end_col_offset = node.col_offset, node.end_col_offset
        return new


_branchless: dict[type, types.FunctionType | None] = {}


def branchless_forward(cls: type) -> types.FunctionType | None:
    """``cls.forward`` compiled again from its source with the overflow clamp of the module docstring made
    branchless (its decorators applied again, in its module's globals); None when it has no such clamp."""
    if cls not in _branchless:
        _branchless[cls] = _compile_branchless(cls.forward)
    return _branchless[cls]


def _compile_branchless(forward) -> types.FunctionType | None:
    code = getattr(inspect.unwrap(forward), "__code__", None)
    if code is None or code.co_freevars:  # a closure (super()'s __class__ cell) cannot be rebuilt
        return None
    try:
        lines, first = inspect.getsourcelines(forward)
        filename = inspect.getsourcefile(forward)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):  # no source at hand, or not a whole statement (a lambda)
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    replacer = _Replacer()
    tree = replacer.visit(tree)
    if replacer.replaced == 0:
        return None
    ast.increment_lineno(tree, first - 1)
    defined = {}
    exec(compile(tree, filename, "exec"), inspect.unwrap(forward).__globals__, defined)  # noqa: S102
    return defined[tree.body[0].name]


def _outside_training(branchless, own):
    """A forward running ``branchless`` in eval mode and the class's ``own`` forward in training mode
    (some releases wrap the class's forward for gradient checkpointing, which the rebuilt one lacks)."""

    def forward(self, *args, **kwargs):
        return (own if self.training else branchless)(self, *args, **kwargs)

    return forward


def make_overflow_clamps_branchless(model: torch.nn.Module) -> list[str]:
    """Install :func:`branchless_forward` on every submodule of ``model`` whose class has the clamp, as
    its instance ``forward`` (in eval mode; training runs the class's). Returns the report's note (empty
    when no module has one)."""
    installed: dict[str, int] = {}
    for module in model.modules():
        forward = branchless_forward(type(module))
        if forward is not None and "forward" not in module.__dict__:
            module.forward = types.MethodType(_outside_training(forward, type(module).forward), module)
            installed[type(module).__name__] = installed.get(type(module).__name__, 0) + 1
    if not installed:
        return []
    layers = ", ".join(f"{count} {name}" for name, count in installed.items())
    return [f"fp16 overflow clamp made branchless (no host read, one graph): {layers}"]
