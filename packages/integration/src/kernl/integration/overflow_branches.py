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

and installed on each layer instance (its class is left alone). The source is compiled inside a class of
the defining class's name, so private names are mangled as in the original. A forward is left as it is
when its source does not hold that statement exactly, when it closes over variables (``super()``), when
its source compiled now does not give the running code's names, constants and lines (the file changed
since the import), or when its decorators cannot be evaluated again from its module's globals.
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
    branchless (in the class it was defined in, as the original was: private names mangled alike; its
    decorators applied again, in its module's globals); None when it has no such clamp, or where its
    source cannot stand for the running function."""
    if cls not in _branchless:
        _branchless[cls] = _compile_branchless(cls.forward)
    return _branchless[cls]


def _compile_branchless(forward) -> types.FunctionType | None:
    function = inspect.unwrap(forward)
    code = getattr(function, "__code__", None)
    if code is None or code.co_freevars:  # a closure (super()'s __class__ cell) cannot be rebuilt
        return None
    try:
        lines, first = inspect.getsourcelines(forward)
        filename = inspect.getsourcefile(forward)
        tree, owner = _parsed(lines, function.__qualname__)
    except (OSError, TypeError, SyntaxError):  # no source at hand, or not a whole statement (a lambda)
        return None
    ast.increment_lineno(tree, first - 1 - (owner is not None))
    definition = tree.body[0].body[0] if owner is not None else tree.body[0]
    if not isinstance(definition, ast.FunctionDef) or definition.name != function.__name__:
        return None
    if not _same_code(_function_code(compile(tree, filename, "exec"), owner, definition.name), code):
        return None  # the file changed since the import: its source is not the code that runs
    replacer = _Replacer()
    tree = replacer.visit(tree)
    if replacer.replaced == 0:
        return None
    defined = {}
    try:
        exec(compile(tree, filename, "exec"), function.__globals__, defined)  # noqa: S102
    except Exception:  # noqa: BLE001 - a decorator the module alone cannot evaluate (a class-body name)
        return None
    return vars(defined[owner])[definition.name] if owner is not None else defined[definition.name]


def _parsed(lines: list[str], qualname: str) -> tuple[ast.Module, str | None]:
    """The function's source lines as a module: inside ``class <owner>:`` when it was defined in a class
    body (an indented ``def`` whose qualified name ends in ``<owner>.<name>``), else alone."""
    parts = qualname.split(".")
    if lines[0][:1] in (" ", "\t") and len(parts) > 1 and parts[-2] != "<locals>":
        return ast.parse(f"class {parts[-2]}:\n" + "".join(lines)), parts[-2]
    return ast.parse(textwrap.dedent("".join(lines))), None


def _function_code(module: types.CodeType, owner: str | None, name: str) -> types.CodeType | None:
    """The code object of function ``name`` (in class ``owner``'s body when given) in a compiled module."""
    if owner is not None:
        module = next(
            (c for c in module.co_consts if isinstance(c, types.CodeType) and c.co_name == owner), None
        )
    codes = [
        c for c in getattr(module, "co_consts", ()) if isinstance(c, types.CodeType) and c.co_name == name
    ]
    return codes[0] if len(codes) == 1 else None


_SAME = ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags", "co_firstlineno", "co_names",
         "co_varnames", "co_freevars", "co_cellvars")  # fmt: skip


def _same_code(rebuilt: types.CodeType | None, running: types.CodeType) -> bool:
    """Whether source compiled now gives the running function's code: the same names, variables,
    constants and lines, nested functions alike (bytecode itself may differ between compiler builds)."""
    if rebuilt is None or any(getattr(rebuilt, f) != getattr(running, f) for f in _SAME):
        return False
    if len(rebuilt.co_consts) != len(running.co_consts):
        return False
    return all(
        _same_code(a, b)
        if isinstance(a, types.CodeType) and isinstance(b, types.CodeType)
        else type(a) is type(b) and a == b
        for a, b in zip(rebuilt.co_consts, running.co_consts, strict=True)
    )


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
