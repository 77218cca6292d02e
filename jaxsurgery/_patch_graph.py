"""Graphs derived by surgery: ``g.replace`` (activation patching) and its naming.

A derived graph carries the names of its parent: each old var keeps its names, a
patched var's names move to its new value, and the old value answers to
``<name>.unpatched``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from . import _compat as C
from . import _select
from ._names import finalize
from ._patch import Edit, replacement_jaxpr, splice
from ._scopes import scope_names

if TYPE_CHECKING:
    from ._graph import Graph, Var


def replace(graph: Graph, selector: Any, value_or_fn: Any) -> Graph:
    """See :meth:`Graph.replace`."""
    _, targets = _select.tree(graph, selector)
    edits = [Edit(v.index, _patch_jaxpr(v, value_or_fn), (v.index,)) for v in targets]
    return derive(graph, edits, f"replace({', '.join(v.name for v in targets)})")


def derive(graph: Graph, edits: Sequence[Edit], what: str) -> Graph:
    """The graph with ``edits`` spliced in, names carried over."""
    from ._graph import Graph

    program, var_map, patched = splice(graph._program, edits, (), graph._flat_args)
    old = graph._names
    candidates: list[list[str]] = [[] for _ in program.vars]
    for i, j in enumerate(var_map):
        names = list(old.candidates[i])
        if i in patched:
            candidates[patched[i]].extend(names)
            names = [f"{n}.unpatched" for n in names] or [f"%{i}.unpatched"]
        candidates[j].extend(names)
    extras: list[list[str]] = [[] for _ in program.vars]
    for var, name in scope_names(program)[1]:
        extras[var].append(name)
    names = finalize(candidates, extras, program.primitives, old.protected)
    return Graph(
        program,
        names,
        graph._flatten_args,
        graph._flat_args,
        f"{graph._title}.{what}",
        (*graph.notes, *program.notes[len(graph._program.notes) :]),
        graph._out_tree,
    )


def _patch_jaxpr(var: Var, value_or_fn: Any) -> C.ClosedJaxpr:
    """The jaxpr computing a var's new value from its old one, checked for its type."""
    if callable(value_or_fn):
        fn = value_or_fn
    else:
        value = value_or_fn
        fn = lambda old: jnp.broadcast_to(jnp.asarray(value, old.dtype), old.shape)  # noqa: E731
    return replacement_jaxpr(fn, [var], var, f"the replacement for {var.name!r}")
