"""The source rewriter: a copy of a user function whose assignments and calls report
themselves to the running :class:`~jaxsurgery._instrument.Recorder`.

``z1 = f2(x)`` becomes ``z1 = __js_mark__("z1", __js_call__("f2", f2)(x))``: the mark
records which traced value a name holds, the call wrapper opens a frame
(:mod:`jaxsurgery._instrument`). The copy is compiled from the function's source, found
in its file (or notebook cell) by its code object's first line; a lambda is found by its
line and parameters, several alike on one line by their bytecode. Before it runs, the
source is checked against the code object (normalized bytecode, :func:`_signature`): a
file edited since it was imported runs as loaded, unnamed. The copy is compiled inside a
factory taking the original's free variables (their cells are passed on), with the
original's ``from __future__`` flags, and inside its class where it reads private names
or uses ``super()``.

What is marked: the parameters (binding ``#0`` of their names; ``self`` and ``cls``
excepted), ``name = ...``, tuple/list targets (``a, (b, *c) = ...``), annotated and
augmented assignments, ``for`` loop, ``with ... as`` and walrus (``(b := ...)``)
targets, and item targets of a name by a constant or a name (``acts[name] = h`` marks
``h`` as ``acts['enc']``, by the key as it is once the value is computed: a string key
that reads as a name or path part, or a non-negative int; not an argument's leaf updated
in place, which keeps the argument's name). Attribute targets (``self.h = ...``) are not.
A function defined inside the traced function is rewritten when it is called (a call
of anything is), not with its definer; a transform decorating it (``@jax.vmap``)
applies to the rewritten copy, as a call of the transform does. When the source cannot
be found or rewritten (a builtin, a lambda made by ``exec``, a changed file), the
function runs as it is and the graph has no Python variable names: ``Graph.notes``
says why.

Sharp edges:
    * The copy shares the original's globals, defaults and closure cells, so it sees
      the same world; it has a different code object, so a ``jax.jit`` cache keyed on
      the original function is not reused by ``js.trace`` (the twin's own cache is,
      from one ``js.trace`` to the next).
    * A value held by a name is recorded when the assignment runs; a value built in
      an expression and never assigned keeps its fallback ``%i`` name.
    * A callee that inspects its caller's frame (``sys._getframe(1)``) sees the call
      wrapper's frame; ``super()``, ``locals()``, ``vars()``, ``eval`` and ``exec`` calls
      are left as they are.
"""

from __future__ import annotations
import __future__

import ast
import copy
import dis
import functools
import inspect
import operator
import types
from collections.abc import Callable
from typing import Any

MARK = "__js_mark__"
CALL = "__js_call__"
#: Calls that must stay where they are: they read the calling frame.
_FRAME_SENSITIVE = frozenset(
    {"super", "locals", "globals", "vars", "eval", "exec", "dir", "breakpoint"}
)


#: Transforms of a function in JAX (and in Equinox and Flax NNX, by the same names), by
#: what they return: the same function, batched or rematerialised (its value is the
#: function's); a derivative (its value is not); or the transform runs the function at
#: once (``jax.jvp(f, primals, tangents)``)
_SAME, _DERIVATIVE, _RUNS = "same", "derivative", "runs"
_TRANSFORM_KINDS = {
    _SAME: (
        *("vmap", "checkpoint", "remat", "named_call", "filter_vmap", "filter_checkpoint"),
        "scan",  # NNX's (jax.lax.scan is control flow: its body runs in a frame)
    ),
    _DERIVATIVE: (
        *("grad", "value_and_grad", "jacfwd", "jacrev", "hessian"),
        *("filter_grad", "filter_value_and_grad", "filter_jacfwd", "filter_jacrev"),
        "filter_hessian",
        "checkify",  # (not a derivative, but neither is its result the function's value)
    ),
    _RUNS: ("jvp", "vjp", "linearize", "filter_jvp", "filter_vjp"),
}


#: the names of those transforms (a decorator that mentions one is applied by ``_call``)
_TRANSFORM_NAMES = frozenset(n for names in _TRANSFORM_KINDS.values() for n in names)


def _plain_partial(fn: Any) -> bool:
    """A ``functools.partial`` (or a subclass) that calls its function as partial does."""
    return isinstance(fn, functools.partial) and (
        type(fn).__call__ is functools.partial.__call__  # noqa: B004 (the class attribute)
    )


def instrument(fn: Callable[..., Any]) -> tuple[Callable[..., Any], str | None]:
    """A copy of ``fn`` whose assignments call the active :class:`Recorder`.

    Returns ``(function, None)``, or ``(fn, reason)`` when ``fn`` cannot be rewritten.
    """
    if isinstance(fn, types.MethodType):
        inner, reason = instrument(fn.__func__)
        return types.MethodType(inner, fn.__self__), reason
    if _plain_partial(fn):
        inner, reason = instrument(fn.func)
        return functools.partial(inner, *fn.args, **fn.keywords), reason
    if not isinstance(fn, types.FunctionType):
        return fn, f"{type(fn).__name__} objects have no Python source to read names from"
    try:
        code = _instrumented_code(fn.__code__, fn.__code__.co_filename, fn.__code__.co_firstlineno)
        cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
        closure = tuple(cells[name] for name in code.co_freevars)
    except (OSError, TypeError, SyntaxError, LookupError, ValueError) as e:
        return fn, f"the source of {fn.__qualname__} could not be rewritten ({e})"
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    # what a decorator reads of the function it wraps (its own attributes, a registry's
    # `fn.scale = 3.0`; annotations; 3.12's type parameters); its identity differs
    new.__dict__.update(fn.__dict__)
    new.__annotations__ = fn.__annotations__
    if hasattr(fn, "__type_params__"):
        new.__type_params__ = fn.__type_params__
    return new, None


@functools.lru_cache(maxsize=256)
def _instrumented_code(code: types.CodeType, filename: str, line: int) -> types.CodeType:
    """The code object of the rewritten function, cached per original code object and
    place: code objects compare equal without their file and line, so the same function
    in two notebook cells would otherwise show the first cell as its source.

    The source is checked against the code object first: a file edited since it was
    imported (a notebook's module not reloaded) would otherwise run its new text.
    """
    funcdef = _lambda_def(code) if code.co_name == "<lambda>" else _def_of(code)
    funcdef.decorator_list = []
    funcdef.name = _FUNCTION  # a call of itself (recursion) reads the name as it did
    if _signature(_factory_code(copy.deepcopy(funcdef), code)) != _signature(code):
        raise ValueError("its source is not the code that runs (edited since it was loaded?)")
    args = funcdef.args
    params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    params = [p for p in params if p not in ("self", "cls")]
    if code.co_name == "<lambda>":  # a lambda's parameters name nothing in its caller
        params = []
    body = _MarkAssignments().visit_body(funcdef.body)
    docstring = body[:1] if body and _is_docstring(body[0]) else []
    funcdef.body = docstring + _marks(params, funcdef) + body[len(docstring) :]
    names = {"co_name": code.co_name}
    if hasattr(code, "co_qualname"):
        names["co_qualname"] = code.co_qualname
    return _factory_code(funcdef, code).replace(**names)


_FUNCTION = "__js_function__"
#: the compiler flags of ``from __future__`` imports (a rewritten function keeps its own)
_FUTURE_FLAGS = functools.reduce(
    operator.or_, (getattr(__future__, f).compiler_flag for f in __future__.all_feature_names)
)


def _def_of(code: types.CodeType) -> ast.FunctionDef:
    """The ``def`` of a function's code object, from its file, at its place (an
    indented one parsed where it is, so that no string literal in it changes)."""
    lines, _ = inspect.findsource(code)
    text = "".join(inspect.getblock(lines[code.co_firstlineno - 1 :]))
    indented = text[:1].isspace()
    tree = ast.parse(f"if 1:\n{text}" if indented else text)
    ast.increment_lineno(tree, code.co_firstlineno - 1 - indented)
    funcdef = tree.body[0].body[0] if indented else tree.body[0]
    if not isinstance(funcdef, ast.FunctionDef) or funcdef.name != code.co_name:
        raise ValueError(f"the source at line {code.co_firstlineno} is not `def {code.co_name}`")
    return funcdef


def _factory_code(funcdef: ast.FunctionDef, code: types.CodeType) -> types.CodeType:
    """The code object of ``funcdef`` compiled as the original was: inside a factory
    taking the original's free variables (whose cells it is given), with the
    original's ``from __future__`` flags."""
    factory = ast.FunctionDef(
        name="__js_factory__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=a) for a in code.co_freevars],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=[funcdef, ast.Return(value=ast.Name(id=funcdef.name, ctx=ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    ast.copy_location(factory, funcdef)
    compiled = _compiled_in_class(factory, code)
    return _const_code(_const_code(compiled, "__js_factory__"), funcdef.name)


def _compiled_in_class(node: ast.stmt, code: types.CodeType) -> types.CodeType:
    """``node`` compiled as a module, inside a class of the name of the one ``code`` is
    defined in when it reads private names (``self.__w``), which Python mangles by
    that name (``self._Scaler__w``), or calls ``super()``; the code object holding
    ``node``'s."""
    cls = _enclosing_class(code)
    private = cls is not None and (
        "__class__" in code.co_freevars
        or any(
            n.startswith("__") and not n.endswith("__")
            for n in (
                getattr(x, "id", None) or getattr(x, "attr", None) or getattr(x, "arg", None) or ""
                for x in ast.walk(node)
            )
        )
    )
    if private:
        node = ast.copy_location(
            ast.ClassDef(name=cls, bases=[], keywords=[], body=[node], decorator_list=[]), node
        )
    module = ast.fix_missing_locations(ast.Module(body=[node], type_ignores=[]))
    flags = code.co_flags & _FUTURE_FLAGS
    compiled = compile(module, code.co_filename, "exec", flags=flags, dont_inherit=True)
    return _const_code(compiled, cls) if private else compiled


def _enclosing_class(code: types.CodeType) -> str | None:
    """The class a function is defined in, from its qualified name
    (``Scaler.__init__.<locals>.<lambda>``: ``Scaler``), or None."""
    parts = getattr(code, "co_qualname", code.co_name).split(".")
    classes = [
        p for k, p in enumerate(parts[:-1]) if p != "<locals>" and parts[k + 1] != "<locals>"
    ]
    return classes[-1] if classes else None


_LAMBDA = "__js_lambda__"


def _lambda_def(code: types.CodeType) -> ast.FunctionDef:
    """A lambda as ``def __js_lambda__(args): return body`` (its calls are then
    rewritten, so ``js.trace(lambda x: model(params, x), x)`` names ``model``'s values),
    found in its file's syntax tree by line and parameters, and among several alike on
    one line by the code it compiles to (columns shift where a function is rewritten)."""
    lines, _ = inspect.findsource(code)
    tree = ast.parse("".join(lines))
    params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    params += code.co_varnames[len(params) : len(params) + _star_args(code)]
    found = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Lambda)
        and node.lineno == code.co_firstlineno
        and tuple(
            a.arg
            for a in (
                *node.args.posonlyargs,
                *node.args.args,
                *node.args.kwonlyargs,
                *filter(None, (node.args.vararg, node.args.kwarg)),
            )
        )
        == params
    ]
    if len(found) > 1:  # several alike on one line: the one compiling to the same code
        want = _signature(code)
        found = [n for n in found if _signature(_lambda_code(n, code)) == want]
    if len({ast.dump(n) for n in found}) != 1:  # a copy is as good as the original
        raise ValueError(f"{len(found)} lambdas like it at line {code.co_firstlineno}")
    node = found[0]
    funcdef = ast.FunctionDef(
        name=_LAMBDA,
        args=node.args,
        body=[ast.copy_location(ast.Return(value=node.body), node.body)],
        decorator_list=[],
        returns=None,
    )
    return ast.copy_location(funcdef, node)


def _lambda_code(node: ast.Lambda, code: types.CodeType) -> types.CodeType:
    """The code object a lambda of the syntax tree compiles to (where ``code``'s was)."""
    holder = ast.copy_location(
        ast.Assign(targets=[ast.Name(id=_LAMBDA, ctx=ast.Store())], value=node), node
    )
    compiled = _compiled_in_class(holder, code)
    return next(c for c in compiled.co_consts if inspect.iscode(c) and c.co_name == "<lambda>")


#: instructions that differ between code compiled where it is and in a factory (or
#: alone): how a name is reached (a local, a closure cell, a global), the frame's set-up
_SCOPING = frozenset(
    {"RESUME", "COPY_FREE_VARS", "MAKE_CELL", "NOP", "CACHE", "PUSH_NULL", "EXTENDED_ARG"}
)
_LOADS = frozenset(
    {
        *("LOAD_FAST", "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_CLOSURE"),
        *("LOAD_FAST_CHECK", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"),
    }
)
_JUMPS = frozenset({*dis.hasjrel, *dis.hasjabs})
#: instructions the compiler picks by context for one operation (3.11: an attribute
#: call's LOAD_METHOD, or LOAD_ATTR where the line was compiled before)
_SAME_OP = {"LOAD_METHOD": "LOAD_ATTR"}


def _signature(code: types.CodeType) -> tuple:
    """What a code object computes, its names' scopes aside: its instructions and their
    arguments (nested code objects by their own signature)."""
    out = []
    for ins in dis.get_instructions(code):
        if ins.opname in _SCOPING:
            continue
        arg = ins.argval
        if ins.opcode in _JUMPS:  # offsets shift with the set-up
            arg = None
        elif inspect.iscode(arg):
            arg = _signature(arg)
        elif isinstance(arg, str) and "<locals>." in arg:  # a class's qualified name
            arg = arg.rsplit("<locals>.", 1)[1]
        elif not isinstance(arg, (str, int, float, complex, bytes, tuple, frozenset, type(None))):
            arg = repr(arg)
        op = "LOAD" if ins.opname in _LOADS else _SAME_OP.get(ins.opname, ins.opname)
        out.append((op, arg))
    return tuple(out)


def _star_args(code: types.CodeType) -> int:
    """How many of ``*args``, ``**kwargs`` a code object takes."""
    return bool(code.co_flags & inspect.CO_VARARGS) + bool(code.co_flags & inspect.CO_VARKEYWORDS)


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def _const_code(code: types.CodeType, name: str) -> types.CodeType:
    """The code object of the function or class ``name`` that ``code`` defines (a
    generic one, ``def f[T]``, inside the scope of its type parameters)."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name:
                return const
            if const.co_name == f"<generic parameters of {name}>":
                return _const_code(const, name)
    raise LookupError(f"no code object {name!r}")


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _target_names(elt)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []


def _item_key(target: ast.Subscript) -> ast.expr | None:
    """The key of an item target ``d[k]`` (``d`` a name, ``k`` a constant or a name),
    as an expression; None for any other. A name is read
    by a lambda, which the mark calls after the value is computed, as Python reads the
    target after the value (``d[k] = (k := 'z')`` stores under ``'z'``)."""
    if not isinstance(target.value, ast.Name):
        return None
    key = target.slice
    if isinstance(key, ast.Constant):
        return ast.copy_location(copy.copy(key), key)
    if isinstance(key, ast.Name):
        args = ast.arguments(
            posonlyargs=[],
            args=[],
            vararg=None,
            kwonlyargs=[],
            kw_defaults=[],
            kwarg=None,
            defaults=[],
        )
        return ast.Lambda(args=args, body=ast.Name(id=key.id, ctx=ast.Load()))
    return None


def _marks(names: list[str], where: ast.AST) -> list[ast.stmt]:
    """``name = __js_mark__("name", name)`` per name: the mark returns the value itself,
    or under a transform a tagged twin (:meth:`Recorder._named`)."""
    stmts = []
    for name in dict.fromkeys(names):
        call = ast.Call(
            func=ast.Name(id=MARK, ctx=ast.Load()),
            args=[ast.Constant(value=name), ast.Name(id=name, ctx=ast.Load())],
            keywords=[],
        )
        assign = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=call)
        stmts.append(ast.copy_location(assign, where))
    return stmts


class _MarkAssignments(ast.NodeTransformer):
    """Follows each assignment of the function body with marks of its target names."""

    def visit_body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            new = self.visit(stmt)
            out.extend(new if isinstance(new, list) else [new])
        return out

    # Nested scopes keep their own names (their calls rewrite them: ``_call``).
    def visit_ClassDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        """A nested function keeps its body; a transform decorating it (``@jax.vmap``,
        ``@functools.partial(jax.vmap, in_axes=0)``, ``@nnx.vmap(in_axes=0)``,
        ``@jax.grad``) is applied as a call of it would be, to the rewritten function."""
        node.decorator_list = [self._decorator(d) for d in node.decorator_list]
        return node

    def _decorator(self, decorator: ast.expr) -> ast.expr:
        words = {
            n.attr if isinstance(n, ast.Attribute) else n.id
            for n in ast.walk(decorator)
            if isinstance(n, (ast.Attribute, ast.Name))
        }
        if not words & _TRANSFORM_NAMES:
            return decorator
        decorator = self.visit(decorator)  # a factory's call: nnx.vmap(in_axes=0)
        wrapper = ast.Call(
            func=ast.Name(id=CALL, ctx=ast.Load()),
            args=[ast.Constant(value=None), decorator],
            keywords=[],
        )
        return ast.copy_location(wrapper, decorator)

    def visit_Assign(self, node: ast.Assign) -> list[ast.stmt]:
        self.generic_visit(node)
        names = [n for t in node.targets for n in _target_names(t)]
        item = node.targets[0] if len(node.targets) == 1 else None
        if isinstance(item, ast.Subscript) and _item_key(item) is not None:
            # ``d[k] = v``: ``v`` marked as ``d['k']`` (the key as the running code has it)
            key = ast.Tuple(
                elts=[ast.Constant(value=item.value.id), _item_key(item)], ctx=ast.Load()
            )
            node.value = ast.copy_location(
                ast.Call(
                    func=ast.Name(id=MARK, ctx=ast.Load()), args=[key, node.value], keywords=[]
                ),
                node.value,
            )
        return [node, *_marks(names, node)]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> list[ast.stmt]:
        self.generic_visit(node)
        return [node, *_marks(_target_names(node.target) if node.value else [], node)]

    def visit_AugAssign(self, node: ast.AugAssign) -> list[ast.stmt]:
        self.generic_visit(node)
        return [node, *_marks(_target_names(node.target), node)]

    def visit_NamedExpr(self, node: ast.NamedExpr) -> ast.NamedExpr:
        """``(b := value)`` marks ``value`` as ``b`` where it is bound."""
        self.generic_visit(node)
        node.value = ast.copy_location(
            ast.Call(
                func=ast.Name(id=MARK, ctx=ast.Load()),
                args=[ast.Constant(value=node.target.id), node.value],
                keywords=[],
            ),
            node.value,
        )
        return node

    def visit_For(self, node: ast.For) -> ast.For:
        self.generic_visit(node)
        node.body = _marks(_target_names(node.target), node) + node.body
        return node

    def visit_With(self, node: ast.With) -> ast.With:
        """``with cm as v:`` marks ``v`` first thing in its body."""
        self.generic_visit(node)
        names = [
            n
            for item in node.items
            if item.optional_vars
            for n in _target_names(item.optional_vars)
        ]
        node.body = _marks(names, node) + node.body
        return node

    visit_AsyncWith = visit_With

    def visit_match_case(self, node: ast.match_case) -> ast.match_case:
        """``case [s, c]:`` marks what the pattern captures first thing in its body."""
        self.generic_visit(node)
        names = [
            n.name if isinstance(n, (ast.MatchAs, ast.MatchStar)) else n.rest
            for n in ast.walk(node.pattern)
            if isinstance(n, (ast.MatchAs, ast.MatchStar, ast.MatchMapping))
        ]
        node.body = _marks([n for n in names if n], node.body[0]) + node.body
        return node

    def visit_Call(self, node: ast.Call) -> ast.Call:
        label = _call_label(node.func)  # before the callee's own calls are wrapped
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FRAME_SENSITIVE | {MARK, CALL}:
            return node
        wrapper = ast.Call(
            func=ast.Name(id=CALL, ctx=ast.Load()),
            args=[ast.Constant(value=label), func],
            keywords=[],
        )
        node.func = ast.copy_location(wrapper, func)
        return node


#: Transforms that return the same function, batched, rematerialised or compiled: a
#: call of ``jax.vmap(self.ln1)`` is named after what it wraps (``ln1``).
_SAME_FUNCTION = frozenset(
    {
        "vmap",
        "pmap",
        "partial",
        "checkpoint",
        "remat",
        "jit",
        "named_call",
        "filter_vmap",
        "filter_pmap",
        "filter_checkpoint",
        "filter_jit",
    }
)


def _call_label(func: ast.expr) -> str | None:
    """The call's name from its callee expression (``self.`` dropped), or None.

    Only plain paths name a call: names, attributes, and subscripts by constants
    (``self.layers[2]``), also wrapped by a transform that keeps the function
    (``jax.vmap(self.ln1)`` is ``ln1``; not ``jax.grad``, which makes another one).
    Anything else (``super().f``, ``self.layers[i]``) is named at run time, by
    submodule path or the function's own name.
    """
    if isinstance(func, ast.Call) and func.args:
        callee = func.func
        name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
        return _call_label(func.args[0]) if name in _SAME_FUNCTION else None
    node = func
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Constant):
            return None
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    text = ast.unparse(func)
    return text[len("self.") :] if text.startswith("self.") else text
