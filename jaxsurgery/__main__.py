"""Command line view: ``python -m jaxsurgery show path/to/file.py:fn --arg f32[4,3] ...``.

Traces ``fn`` from the file with abstract arguments and prints the var table; ``--dot
FILE`` also writes the graph as Graphviz DOT and ``--svg FILE`` as SVG. An argument is
``dtype[shape]`` (``f32[4,3]``, ``i32[]``, ``bf16[8]``) or a tuple of them in
parentheses (``"(f32[4,3], f32[4])"``) for a parameter that is a pair of arrays.

Example (the README's example file)::

    python -m jaxsurgery show examples/issue_12782.py:f --arg f32[3] \\
        --arg "(f32[4,3],f32[4])" --arg "(f32[5,4],f32[5])" --arg "(f32[2,5],f32[2])"
"""

from __future__ import annotations

import argparse
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
    "u32": "uint32",
    "bool": "bool",
}
_SPEC = re.compile(r"\s*([a-z]+[0-9]*)\[([0-9,\s]*)\]\s*")


class UsageError(Exception):
    """A bad command line; printed as one line."""


def parse_arg(text: str) -> Any:
    """``"f32[4,3]"`` -> ``ShapeDtypeStruct``; ``"(a, b)"`` -> a tuple of them."""
    import jax

    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        inner = text[1:-1]
        parts = [p for p in re.split(r",\s*(?![^\[]*\])", inner) if p.strip()]
        return tuple(parse_arg(p) for p in parts)
    m = _SPEC.fullmatch(text)
    if m is None or m.group(1) not in DTYPES:
        raise UsageError(
            f"bad --arg {text!r}: write dtype[shape] like f32[4,3] or i32[] "
            f"(dtypes: {', '.join(DTYPES)}), or a tuple like '(f32[4,3],f32[4])'"
        )
    shape = tuple(int(d) for d in m.group(2).split(",") if d.strip())
    return jax.ShapeDtypeStruct(shape, DTYPES[m.group(1)])


def load_function(target: str) -> Any:
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"bad target {target!r}: write path/to/file.py:function")
    try:
        namespace = runpy.run_path(path, run_name="__jaxsurgery_show__")
    except (OSError, SyntaxError) as e:
        raise UsageError(f"cannot load {path!r}: {e}") from None
    if name not in namespace or not callable(namespace[name]):
        raise UsageError(f"{path!r} has no function {name!r}")
    return namespace[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxsurgery", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the var table of a function")
    show.add_argument("target", help="path/to/file.py:function")
    show.add_argument("--arg", action="append", default=[], help="an argument's dtype[shape]")
    show.add_argument("--dot", help="also write the graph as Graphviz DOT to this file")
    show.add_argument("--svg", help="also write the graph as SVG to this file")
    args = parser.parse_args(argv)
    import jaxsurgery as js

    try:
        fn = load_function(args.target)
        specs = [parse_arg(a) for a in args.arg]
        graph = js.trace(fn, *specs)
    except (UsageError, js.SurgeryError) as e:
        print(f"jaxsurgery show: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the user's function failed to trace with these arguments
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"jaxsurgery show: error: tracing {args.target} failed: {first}", file=sys.stderr)
        return 2
    print(graph)
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as f:
            f.write(graph.to_dot())
    if args.svg:
        graph.draw().save(args.svg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
