"""Command line view: ``python -m jaxsurgery show path/to/file.py:fn --arg f32[4,3] ...``.

Traces ``fn`` from the file with abstract arguments and prints the var table; ``--dot
FILE`` also writes the graph as Graphviz DOT and ``--svg FILE`` as SVG, and ``--slice IN
OUT`` highlights the slice ``g.slice(IN, OUT)`` in them (and prints it;
``--allow-unconnected`` passes ``allow_unconnected=True``).

Arguments, in order (each one positional argument of ``fn``):

* ``--arg SPEC``: an abstract array ``dtype[shape]``, written as you would write it:
  ``f32[4,3]``, ``float32[4,3]``, ``jnp.float32[3]``, ``i32[]`` (a scalar), ``bf16[2,2]``,
  ``bool[5]`` (short names ``f16 bf16 f32 f64 c64 c128 i8 i16 i32 i64 u8 u32``, or any
  NumPy dtype name); nested in tuples ``"(f32[4,3], f32[4])"``, lists ``"[i32[], f32[2]]"``
  and dicts ``"{'params': {'w': f32[4,3], 'b': f32[4]}}"``; ``None``, numbers and strings
  are passed as they are.
* ``--args-from FILE.py:fn`` (or ``module:fn``, or ``:fn`` in the target's file): ``fn()``
  returns real arguments, a tuple of them (any other value is one argument). A Flax or
  Haiku model's parameters come from its ``init`` this way. They come before ``--arg``\\ s.

``fn`` may be an attribute path (``model.py:model.apply``). Every error is one line (a
missing function says what is close; ``--traceback`` shows the whole traceback).

Example (the README's example file)::

    python -m jaxsurgery show examples/issue_12782.py:f --arg f32[3] \\
        --arg "(f32[4,3],f32[4])" --arg "(f32[5,4],f32[5])" --arg "(f32[2,5],f32[2])" \\
        --slice z1 z2 --dot f.dot
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import importlib
import os
import re
import runpy
import sys
from typing import Any

DTYPES = {
    "f16": "float16",
    "bf16": "bfloat16",
    "f32": "float32",
    "f64": "float64",
    "c64": "complex64",
    "c128": "complex128",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "u8": "uint8",
    "u16": "uint16",
    "u32": "uint32",
    "u64": "uint64",
    "bool": "bool",
}
_SPELLING = (
    "write dtype[shape] like f32[4,3], float32[3] or i32[], nested in tuples "
    "'(f32[4,3], f32[4])', lists or dicts \"{'w': f32[4,3]}\""
)


_MISSING = object()


class UsageError(Exception):
    """A bad command line; printed as one line."""


def parse_dtype(name: str) -> Any:
    """The NumPy dtype of ``f32``, ``float32``, ``jnp.float32``, ``np.int8``, ``bfloat16``."""
    import jax
    import jax.numpy as jnp

    short = name.rsplit(".", 1)[-1]
    try:
        dtype = jnp.dtype(DTYPES.get(short, short))
    except TypeError:
        known = [*DTYPES, *DTYPES.values()]
        close = difflib.get_close_matches(short, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown dtype {name!r}: {hint}(e.g. {', '.join(DTYPES)})") from None
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:  # JAX would trace another silently
        raise UsageError(
            f"{name} needs JAX's 64-bit mode, which is off (JAX would trace it as "
            f"{jax.dtypes.canonicalize_dtype(dtype)}): run with JAX_ENABLE_X64=1"
        )
    return dtype


#: a string literal (kept as it is), or the empty brackets right after a dtype's name
_SCALAR = re.compile(r"""('[^']*'|"[^"]*")|(?<=[\w.])\[\s*\]""")


def parse_arg(text: str) -> Any:
    """An argument spec as a pytree of ``jax.ShapeDtypeStruct``.

    Example:
        >>> parse_arg("{'w': f32[4,3], 'b': (float32[4], i32[])}")
        {'w': ShapeDtypeStruct(shape=(4, 3), dtype=float32), 'b': (ShapeDtypeStruct(shape=(4,), dtype=float32), ShapeDtypeStruct(shape=(), dtype=int32))}
    """
    # i32[]: a scalar (a dtype's empty brackets, not an empty list nor a string's)
    source = _SCALAR.sub(lambda m: m.group(1) or "[()]", text.strip())
    try:
        tree = ast.parse(source, mode="eval").body
        return _spec(tree)
    except (SyntaxError, ValueError) as e:
        reason = e.msg if isinstance(e, SyntaxError) else e
        raise UsageError(f"bad --arg {text!r}: {reason}; {_SPELLING}") from None
    except UsageError as e:
        raise UsageError(f"bad --arg {text!r}: {e}") from None


def _spec(node: ast.expr) -> Any:
    import jax

    if isinstance(node, ast.Tuple | ast.List):
        items = [_spec(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("no ** in a dict")
        bare = next((k for k in node.keys if not isinstance(k, ast.Constant)), None)
        if bare is not None:
            text = ast.unparse(bare)
            raise ValueError(f"a dict key must be quoted: {text!r}, not {text}")
        return {k.value: _spec(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Constant):
        return node.value
    if (  # a negative number: -0.5 is unary minus around 0.5
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float, complex)
    ):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, ast.Subscript):
        dtype = parse_dtype(ast.unparse(node.value))
        dims = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if not all(isinstance(d, ast.Constant) and type(d.value) is int for d in dims):
            raise ValueError(f"a shape is whole numbers, not {ast.unparse(node.slice)!r}")
        return jax.ShapeDtypeStruct(tuple(d.value for d in dims), dtype)
    if isinstance(node, ast.Name | ast.Attribute):  # a bare dtype: a scalar
        return jax.ShapeDtypeStruct((), parse_dtype(ast.unparse(node)))
    raise ValueError(f"cannot read {ast.unparse(node)!r}")


@functools.cache
def _namespace(path: str) -> dict[str, Any]:
    """The globals of a file (run once, so a target and its arguments share classes) or
    of an importable module."""
    try:
        if path.endswith(".py") or os.sep in path or "/" in path:
            # as `python path` would run it: its folder first on the import path (kept:
            # the traced function may import from there when it runs)
            argv, sys.argv = sys.argv, [path]
            folder = os.path.dirname(os.path.abspath(path))
            if folder not in sys.path:
                sys.path.insert(0, folder)
            try:
                return runpy.run_path(path, run_name="__jaxsurgery_show__")
            finally:
                sys.argv = argv
        return vars(importlib.import_module(path))
    except Exception as e:  # the file itself failed: say how, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"cannot load {path!r}: {type(e).__name__}: {first}") from None


def load(ref: str, what: str, default_path: str | None = None) -> Any:
    """The object ``path:name`` names (``name`` may be a dotted attribute path)."""
    path, sep, name = ref.rpartition(":")
    path = path or default_path or ""
    if not sep or not path or not name:
        raise UsageError(f"bad {what} {ref!r}: write path/to/file.py:function")
    obj: Any = _namespace(path)
    parts = name.split(".")
    for i, part in enumerate(parts):
        found = obj.get(part, _MISSING) if isinstance(obj, dict) else getattr(obj, part, _MISSING)
        if found is _MISSING:
            options = [k for k in (obj if isinstance(obj, dict) else dir(obj)) if k[:1] != "_"]
            close = difflib.get_close_matches(part, options, n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise UsageError(f"{'.'.join(parts[:i]) or path!r} has no {part!r}{hint}")
        obj = found
    if not callable(obj):
        raise UsageError(f"{what} {ref!r} is a {type(obj).__name__}, not a function")
    return obj


def _check_writable(path: str | None, flag: str) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not path.strip():
        raise UsageError(f"{flag} needs a file name")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {flag} {path!r}: it is a folder; name a file in it")
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {flag} {path!r}: no folder {folder!r}")


def _write(path: str, flag: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"cannot write {flag} {path!r}: {e.strerror or e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def run(args: argparse.Namespace) -> None:
    """``show``: trace, print, write the pictures; raises UsageError or SurgeryError."""
    import jaxsurgery as js

    _check_writable(args.dot, "--dot")
    _check_writable(args.svg, "--svg")
    if args.allow_unconnected and not args.slice:
        raise UsageError("--allow-unconnected is an option of --slice IN OUT; give the slice")
    fn = load(args.target, "target")
    given: list[Any] = []
    made = None
    if args.args_from:
        make = load(args.args_from, "--args-from", args.target.rpartition(":")[0])
        try:
            made = make()
        except Exception as e:  # the user's function: say which, in one line
            raise UsageError(f"--args-from {args.args_from} failed: {_first_line(e)}") from e
        given = list(made) if isinstance(made, tuple) else [made]
    given += [parse_arg(a) for a in args.arg]
    hint = (
        " (--args-from returned a list, which is one argument: return a tuple for several)"
        if isinstance(made, list)
        else ""
    )
    try:
        graph = js.trace(fn, *given)
    except js.SurgeryError as e:
        if hint and str(e).startswith("the arguments do not fit"):
            raise type(e)(f"{str(e).strip().splitlines()[0]}{hint}") from None
        raise
    except Exception as e:  # the user's function failed to trace with these arguments
        hint = hint if isinstance(e, TypeError) else ""
        raise UsageError(f"tracing {args.target} failed: {_first_line(e)}{hint}") from e
    try:
        highlight = (
            graph.slice(*args.slice, allow_unconnected=args.allow_unconnected)
            if args.slice
            else None
        )
    except (js.SliceError, js.SelectionError) as e:  # its fix, as this command line spells it
        said = str(e).replace("pass allow_unconnected=True", "pass --allow-unconnected")
        said = said.replace("g.names() lists all", "the table, without --slice, lists all")
        raise type(e)(said) from None
    print(graph)
    if highlight is not None:
        print(repr(highlight))
    if args.dot is not None:
        _write(args.dot, "--dot", graph.to_dot(highlight=highlight))
    if args.svg is not None:
        _write(args.svg, "--svg", graph.draw(highlight=highlight).svg)


def _attached(argv: list[str]) -> list[str]:
    """``--arg -1e-3`` as ``--arg=-1e-3``: argparse takes a value starting with "-" for
    an option unless it looks like ``-1`` or ``-0.5`` (not ``-1e-3`` nor ``-1j``)."""
    out: list[str] = []
    for word in argv:
        if out and out[-1] == "--arg" and word[:1] == "-" and word[:2] != "--":
            out[-1] = f"--arg={word}"
        else:
            out.append(word)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxsurgery", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the var table of a function")
    show.add_argument("target", help="path/to/file.py:function (or module:function)")
    show.add_argument(
        "--arg", action="append", default=[], help="an argument: f32[4,3], '(f32[3], i32[])', ..."
    )
    show.add_argument("--args-from", help="file.py:fn (or :fn): fn() returns the arguments")
    show.add_argument("--slice", nargs=2, metavar=("IN", "OUT"), help="highlight g.slice(IN, OUT)")
    show.add_argument(
        "--allow-unconnected",
        action="store_true",
        help="with --slice: g.slice(IN, OUT, allow_unconnected=True)",
    )
    show.add_argument("--dot", help="also write the graph as Graphviz DOT to this file")
    show.add_argument("--svg", help="also write the graph as SVG to this file")
    show.add_argument("--traceback", action="store_true", help="show errors' tracebacks")
    args = parser.parse_args(_attached(sys.argv[1:] if argv is None else argv))
    import jaxsurgery as js

    try:
        run(args)
    except (UsageError, js.SurgeryError) as e:
        if args.traceback:
            raise
        message = str(e).strip().replace("\n", " ")
        print(f"jaxsurgery show: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:  # drawing or writing failed: one line, unless asked for more
        if args.traceback:
            raise
        print(f"jaxsurgery show: error: {_first_line(e)} (--traceback for more)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
