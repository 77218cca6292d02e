"""Python names: rewrite the traced function so assignments and calls report themselves.

``js.trace`` runs a copy of the user's function whose assignments are followed by a
call ``__js_mark__("z1", z1)``, and whose calls ``f2(x)`` become
``__js_call__("f2", f2)(x)``. A mark records which traced value a name holds; a call
wrapper opens a *frame* (so names inside are qualified, ``f2/h``), runs a rewritten
copy of the callee when it is user code, and records what the call returned. Neither
adds an **equation** to the program, so tracing costs the same as ``jax.make_jaxpr``
plus a few Python calls per statement.

Which calls open a frame: calls of anything that is not JAX itself, numpy or a
builtin: user functions, methods (``self.l1(x)`` is the call ``l1``), callable
objects (``nn.Dense(4)(x)`` is ``Dense``), library modules. Only *user code* (a
function whose file is not in site-packages or the standard library) is rewritten,
so names reach inside user functions, ``jax.jit``-ed user functions (jitted again around
the rewritten body with the same options) and user ``custom_jvp``/``custom_vjp``
functions (rebuilt around the rewritten body with the same rules). Library code
(Flax, Haiku, Equinox internals) runs untouched inside its frame; its values are
named by scopes instead.

Why not equation source lines? The source span of an equation cannot tell loop
iterations apart (``x = jnp.sin(x)`` in a loop has the same traceback every time) and
misses plain aliases (``a = h`` makes no equation). A marked assignment sees both.

What is marked: the parameters (binding ``#0`` of their names; ``self`` and ``cls``
excepted), ``name = ...``, tuple/list targets (``a, (b, *c) = ...``), annotated and
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
    * A callee that inspects its caller's frame (``sys._getframe(1)``) sees the call
      wrapper's frame; ``super()``, ``locals()``, ``vars()``, ``eval`` and ``exec`` calls
      are left as they are.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import sysconfig
import textwrap
import threading
import types
from collections.abc import Callable
from typing import Any

import jax

from . import _compat as C
from ._frameworks import submodule_paths

MARK = "__js_mark__"
CALL = "__js_call__"
#: Calls that must stay where they are: they read the calling frame.
_FRAME_SENSITIVE = frozenset(
    {"super", "locals", "globals", "vars", "eval", "exec", "dir", "breakpoint"}
)

_state = threading.local()


class Recorder:
    """Collects what one trace's marks and call wrappers report.

    Attributes:
        frames: ``(label, parent frame or -1)`` per call, in call order.
        bindings: ``(frame, name, atom)`` per assignment, in the order they ran
            (frame -1 is the traced function itself).
        returns: ``(frame, key path, atom)`` per traced value a call returned.
    """

    def __init__(self) -> None:
        self.frames: list[tuple[str, int]] = []
        self.callees: list[Any] = []  # per frame: what was called
        self._paths: dict[int, dict[int, str] | None] = {}
        self.bindings: list[tuple[int, str, Any]] = []
        self.returns: list[tuple[int, str, Any]] = []
        self._stack: list[int] = []

    def __enter__(self) -> Recorder:
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _state.stack.pop()

    @property
    def frame(self) -> int:
        return self._stack[-1] if self._stack else -1

    def record(self, name: str, value: Any) -> None:
        frame = self.frame
        for path, atom in _atoms(value):
            self.bindings.append((frame, name + path, atom))

    def label(self, label: str | None, fn: Any) -> str:
        """A call's name: its call-site label, or a submodule path, or its own name."""
        if label is not None and not label.isidentifier():
            return label  # an attribute or subscript: already a path
        if self._stack:
            parent = self.callees[self._stack[-1]]
            if id(parent) not in self._paths:
                self._paths[id(parent)] = submodule_paths(parent)
            path = (self._paths[id(parent)] or {}).get(id(fn))
            if path:
                return path
        return label or _callable_name(fn)

    def enter(self, label: str, fn: Any = None) -> int:
        self.callees.append(fn)
        self.frames.append((label, self.frame))
        self._stack.append(len(self.frames) - 1)
        return self._stack[-1]

    def qualified(self, alive: Callable[[Any], bool]) -> list[tuple[str, Any]]:
        """``(name, atom)`` pairs, call-qualified, in naming priority order.

        Names bound in the traced function come first, then what calls returned
        (outer calls first), then names bound inside calls (outer first). A call made
        more than once under the same parent is ``label#k``, k in call order, counting
        only calls that left a value in the program (``alive(atom)``): a body JAX
        traced twice, or a call that returned no array, takes no number.
        """
        live = [False] * len(self.frames)
        for frame, _, atom in (*self.bindings, *self.returns):
            while frame >= 0 and not live[frame] and alive(atom):
                live[frame] = True
                frame = self.frames[frame][1]
        counts: dict[tuple[int, str], int] = {}
        for (label, parent), ok in zip(self.frames, live):
            if ok:
                counts[parent, label] = counts.get((parent, label), 0) + 1
        seen: dict[tuple[int, str], int] = {}
        paths: list[str] = []
        depths: list[int] = []
        for (label, parent), ok in zip(self.frames, live):
            k = seen[parent, label] = seen.get((parent, label), -1) + ok
            own = label if counts.get((parent, label), 0) <= 1 else f"{label}#{k}"
            paths.append(own if parent < 0 else f"{paths[parent]}/{own}")
            depths.append(0 if parent < 0 else depths[parent] + 1)
        top = [(name, atom) for frame, name, atom in self.bindings if frame < 0]
        returns = sorted(
            ((depths[f], paths[f] + path, atom) for f, path, atom in self.returns),
            key=lambda t: t[0],
        )
        inner = sorted(
            ((depths[f], f"{paths[f]}/{name}", atom) for f, name, atom in self.bindings if f >= 0),
            key=lambda t: t[0],
        )
        return top + [(n, a) for _, n, a in returns] + [(n, a) for _, n, a in inner]

    def leave(self, frame: int, value: Any) -> None:
        self._stack.pop()
        for path, atom in _atoms(value):
            self.returns.append((frame, path, atom))


def _atoms(value: Any) -> list[tuple[str, Any]]:
    """``(key path, jaxpr atom)`` of each traced leaf of ``value``."""
    atom = C.tracer_atom(value)
    if atom is not None:  # the common case: one array
        return [("", atom)]
    if isinstance(value, (int, float, complex, bool, str, type(None))):
        return []
    leaves, _ = jax.tree_util.tree_flatten_with_path(value)
    out = []
    for path, leaf in leaves:
        atom = C.tracer_atom(leaf)
        if atom is not None:
            out.append((jax.tree_util.keystr(path), atom))
    return out


def _current() -> Recorder | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


def _mark(name: str, value: Any) -> None:
    recorder = _current()
    if recorder is not None:
        recorder.record(name, value)


def _call(label: str | None, fn: Any) -> Any:
    """``fn``, or a wrapper that runs it (rewritten if user code) inside a frame."""
    recorder = _current()
    if recorder is None:
        return fn
    bodies = _control_flow_bodies().get(id(fn))
    if bodies is not None:
        return _with_named_bodies(fn, bodies)
    if _is_jax_or_builtin(fn):
        return fn
    target, _ = rewritten(fn)
    name = recorder.label(label, fn)

    def run(*args: Any, **kwargs: Any) -> Any:
        frame = recorder.enter(name, fn)
        out = None
        try:
            out = target(*args, **kwargs)
        finally:
            recorder.leave(frame, out)
        return out

    return run


@functools.cache
def _control_flow_bodies() -> dict[int, tuple[tuple[int, str], ...]]:
    """``lax`` control-flow functions and their function arguments (position, name)."""
    lax = jax.lax
    return {
        id(lax.scan): ((0, "f"),),
        id(lax.map): ((0, "f"),),
        id(lax.fori_loop): ((2, "body_fun"),),
        id(lax.while_loop): ((0, "cond_fun"), (1, "body_fun")),
        id(lax.cond): ((1, "true_fun"), (2, "false_fun")),
        id(lax.switch): ((1, "branches"),),
    }


def _with_named_bodies(fn: Any, bodies: tuple[tuple[int, str], ...]) -> Any:
    """``fn`` (a lax loop or conditional) with its function arguments run in frames."""

    def frame(body: Any) -> Any:
        if isinstance(body, (list, tuple)):  # switch's branches
            return type(body)(frame(b) for b in body)
        return _call(None, body) if callable(body) else body

    def run(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        for pos, name in bodies:
            if pos < len(args):
                args[pos] = frame(args[pos])
            elif name in kwargs:
                kwargs[name] = frame(kwargs[name])
        return fn(*args, **kwargs)

    return run


_SKIP_MODULES = ("jax", "jaxlib", "numpy", "jaxsurgery", "builtins", "functools", "operator")


def _module_of(fn: Any) -> str:
    inner = getattr(fn, "__func__", fn)
    for candidate in (getattr(inner, "fun", None), getattr(inner, "__wrapped__", None)):
        if candidate is not None and _is_user_function(candidate):
            return getattr(candidate, "__module__", "") or ""
    module = getattr(inner, "__module__", None)
    if module is None or not isinstance(module, str):
        module = type(fn).__module__
    return module


def _is_jax_or_builtin(fn: Any) -> bool:
    if isinstance(fn, (type, types.BuiltinFunctionType, types.BuiltinMethodType)):
        return True  # constructing an object, or a C function: no frame
    module = _module_of(fn)
    return module.split(".", 1)[0] in _SKIP_MODULES


@functools.lru_cache(maxsize=1024)
def _is_user_file(filename: str) -> bool:
    if filename.startswith("<frozen") or not filename:
        return False
    library = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return not any(filename.startswith(p + os.sep) for p in library)


def _is_user_function(fn: Any) -> bool:
    return (
        isinstance(fn, types.FunctionType)
        and not hasattr(fn, "__wrapped__")
        and _is_user_file(fn.__code__.co_filename)
    )


def rewritten(fn: Any) -> tuple[Any, str | None]:
    """The callable to run in place of ``fn``: a rewritten copy when it is user code.

    Returns ``(callable, None)``, or ``(fn, reason)`` when nothing was rewritten.
    """
    if isinstance(fn, functools.partial):
        inner, reason = rewritten(fn.func)
        return functools.partial(inner, *fn.args, **fn.keywords), reason
    if _is_user_function(fn) or (
        isinstance(fn, types.MethodType) and _is_user_function(fn.__func__)
    ):
        return instrument(fn)
    wrapped = getattr(fn, "__wrapped__", None)
    if hasattr(fn, "lower") and _is_user_function(wrapped):  # a jax.jit-ed user function
        body, reason = instrument(wrapped)
        return C.rejit(fn, body), reason
    if _is_user_function(getattr(fn, "fun", None)):  # a user custom_jvp / custom_vjp
        body, reason = instrument(fn.fun)
        return C.rebuild_custom_rule(fn, body), reason
    call = getattr(type(fn), "__call__", None)  # noqa: B004 (the class attribute)
    if not isinstance(fn, (types.FunctionType, types.MethodType)) and _is_user_function(call):
        body, reason = instrument(call)
        return types.MethodType(body, fn), reason
    return fn, f"{_callable_name(fn)} is not user code (or is wrapped), so it runs as it is"


def _callable_name(fn: Any) -> str:
    """The function's name, or the class name of a callable object (``Dense``)."""
    if isinstance(fn, (types.FunctionType, types.MethodType)) or hasattr(fn, "__wrapped__"):
        name = getattr(getattr(fn, "__func__", fn), "__name__", None)
        if isinstance(name, str):
            return name
    return type(fn).__name__


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
        cells[CALL] = types.CellType(_call)
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
    args = funcdef.args
    params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    params = [p for p in params if p not in ("self", "cls")]
    body = _MarkAssignments().visit_body(funcdef.body)
    docstring = body[:1] if body and _is_docstring(body[0]) else []
    funcdef.body = docstring + _marks(params, funcdef) + body[len(docstring) :]
    factory = ast.FunctionDef(
        name="__js_factory__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=a) for a in (MARK, CALL, *code.co_freevars)],
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


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


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
        self.generic_visit(node)
        names = [n for t in node.targets for n in _target_names(t)]
        return [node, *_marks(names, node)]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> list[ast.stmt]:
        self.generic_visit(node)
        return [node, *_marks(_target_names(node.target) if node.value else [], node)]

    def visit_AugAssign(self, node: ast.AugAssign) -> list[ast.stmt]:
        self.generic_visit(node)
        return [node, *_marks(_target_names(node.target), node)]

    def visit_For(self, node: ast.For) -> ast.For:
        self.generic_visit(node)
        node.body = _marks(_target_names(node.target), node) + node.body
        return node

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FRAME_SENSITIVE | {MARK, CALL}:
            return node
        label = _call_label(func)
        wrapper = ast.Call(
            func=ast.Name(id=CALL, ctx=ast.Load()),
            args=[ast.Constant(value=label), func],
            keywords=[],
        )
        node.func = ast.copy_location(wrapper, func)
        return node


def _call_label(func: ast.expr) -> str | None:
    """The call's name from its callee expression (``self.`` dropped), or None.

    Only plain paths name a call: names, attributes, and subscripts by constants
    (``self.layers[2]``). Anything else (``super().f``, ``self.layers[i]``) is named at
    run time, by submodule path or the function's own name.
    """
    node = func
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Constant):
            return None
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    text = ast.unparse(func)
    return text[len("self.") :] if text.startswith("self.") else text
