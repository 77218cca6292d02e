"""Python variable names: rewrite the traced function so assignments report themselves.

``js.trace`` runs a copy of the user's function whose assignments are followed by a
call ``__js_mark__("z1", z1)``. The call records which traced value the name holds
and returns nothing; it adds **no equation** to the program, so tracing costs the
same as ``jax.make_jaxpr`` plus one Python call per assignment.

Why not equation source lines? The source span of an equation cannot tell loop
iterations apart (``x = jnp.sin(x)`` in a loop has the same traceback every time) and
misses plain aliases (``a = h`` makes no equation). A marked assignment sees both.

What is marked: ``name = ...``, tuple/list targets (``a, (b, *c) = ...``), annotated and
augmented assignments, and ``for`` loop targets. Attribute and subscript targets
(``self.h = ...``, ``d["k"] = ...``) and walrus expressions are not. Functions defined
inside the traced function are not rewritten. When the source cannot be found or
rewritten (a builtin, a lambda made by ``exec``, a changed file), the function runs
as it is and the graph has no Python variable names: ``Graph.notes`` says why.

Sharp edges:
    * The copy shares the original's globals, defaults and closure cells, so it sees
      the same world; it has a different code object, so a ``jax.jit`` cache keyed on
      the original function is not reused by ``js.trace``.
    * A value held by a name is recorded when the assignment runs; a value built in
      an expression and never assigned keeps its fallback ``%i`` name.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import threading
import types
from collections.abc import Callable
from typing import Any

import jax

from . import _compat as C

MARK = "__js_mark__"

_state = threading.local()


class Recorder:
    """Collects ``(name, atom)`` bindings, in the order the assignments ran."""

    def __init__(self) -> None:
        self.bindings: list[tuple[str, Any]] = []

    def __enter__(self) -> Recorder:
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _state.stack.pop()

    def record(self, name: str, value: Any) -> None:
        atom = C.tracer_atom(value)
        if atom is not None:  # the common case: one array
            self.bindings.append((name, atom))
            return
        if isinstance(value, (int, float, complex, bool, str, type(None))):
            return
        leaves, _ = jax.tree_util.tree_flatten_with_path(value)
        for path, leaf in leaves:
            atom = C.tracer_atom(leaf)
            if atom is not None:
                self.bindings.append((name + jax.tree_util.keystr(path), atom))


def _mark(name: str, value: Any) -> None:
    stack = getattr(_state, "stack", None)
    if stack:
        stack[-1].record(name, value)


def instrument(fn: Callable[..., Any]) -> tuple[Callable[..., Any], str | None]:
    """A copy of ``fn`` whose assignments call the active :class:`Recorder`.

    Returns ``(function, None)``, or ``(fn, reason)`` when ``fn`` cannot be rewritten.
    """
    if isinstance(fn, types.MethodType):
        inner, reason = instrument(fn.__func__)
        return types.MethodType(inner, fn.__self__), reason
    if isinstance(fn, functools.partial):
        inner, reason = instrument(fn.func)
        return functools.partial(inner, *fn.args, **fn.keywords), reason
    if not isinstance(fn, types.FunctionType):
        return fn, f"{type(fn).__name__} objects have no Python source to read names from"
    try:
        code = _instrumented_code(fn.__code__)
        cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
        cells[MARK] = types.CellType(_mark)
        closure = tuple(cells[name] for name in code.co_freevars)
    except (OSError, TypeError, SyntaxError, LookupError, ValueError) as e:
        return fn, f"the source of {fn.__qualname__} could not be rewritten ({e})"
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    return new, None


@functools.lru_cache(maxsize=256)
def _instrumented_code(code: types.CodeType) -> types.CodeType:
    """The code object of the rewritten function (cached per original code object)."""
    if code.co_name == "<lambda>":
        raise ValueError("a lambda has no assignments to name")
    lines, start = inspect.findsource(code)
    block = inspect.getblock(lines[code.co_firstlineno - 1 :])
    tree = ast.parse(textwrap.dedent("".join(block)))
    ast.increment_lineno(tree, code.co_firstlineno - 1)
    funcdef = tree.body[0]
    if not isinstance(funcdef, ast.FunctionDef) or funcdef.name != code.co_name:
        raise ValueError(f"the source at line {code.co_firstlineno} is not `def {code.co_name}`")
    funcdef.decorator_list = []
    funcdef.body = _MarkAssignments().visit_body(funcdef.body)
    factory = ast.FunctionDef(
        name="__js_factory__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=a) for a in (MARK, *code.co_freevars)],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=[funcdef, ast.Return(value=ast.Name(id=funcdef.name, ctx=ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    ast.copy_location(factory, funcdef)
    module = ast.fix_missing_locations(ast.Module(body=[factory], type_ignores=[]))
    compiled = compile(module, code.co_filename, "exec")
    factory_code = _const_code(compiled, "__js_factory__")
    return _const_code(factory_code, code.co_name)


def _const_code(code: types.CodeType, name: str) -> types.CodeType:
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == name:
            return const
    raise LookupError(f"no code object {name!r}")


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _target_names(elt)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []


def _marks(names: list[str], where: ast.AST) -> list[ast.stmt]:
    stmts = []
    for name in dict.fromkeys(names):
        call = ast.Call(
            func=ast.Name(id=MARK, ctx=ast.Load()),
            args=[ast.Constant(value=name), ast.Name(id=name, ctx=ast.Load())],
            keywords=[],
        )
        stmts.append(ast.copy_location(ast.Expr(value=call), where))
    return stmts


class _MarkAssignments(ast.NodeTransformer):
    """Follows each assignment of the function body with marks of its target names."""

    def visit_body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            new = self.visit(stmt)
            out.extend(new if isinstance(new, list) else [new])
        return out

    # Nested scopes keep their own names (the issue on calls names them).
    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> list[ast.stmt]:
        names = [n for t in node.targets for n in _target_names(t)]
        return [node, *_marks(names, node)]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> list[ast.stmt]:
        return [node, *_marks(_target_names(node.target) if node.value else [], node)]

    def visit_AugAssign(self, node: ast.AugAssign) -> list[ast.stmt]:
        return [node, *_marks(_target_names(node.target), node)]

    def visit_For(self, node: ast.For) -> ast.For:
        self.generic_visit(node)
        node.body = _marks(_target_names(node.target), node) + node.body
        return node
