"""Graphs derived by surgery: ``g.replace`` (activation patching) and its naming.

A derived graph carries the names of its parent: each old var keeps its names, a
patched var's names move to its new value, and the old value answers to
``<name>.unpatched``.

Two programs carry the edits: the flat index is spliced (:mod:`jaxsurgery._patch`),
so that names, values and slices at the traced arguments see the patch; and the
edits are added to the structured program (:mod:`jaxsurgery._structured`), which is
what ``as_function`` and ``grads_fn`` run for any arguments: a patch inside a cond
branch edits that branch and the cond decides again; a patch at ``h@t`` applies at
iteration ``t`` of a loop that stays a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from . import _compat as C
from . import _select
from ._errors import SliceError
from ._names import finalize
from ._patch import Edit, replacement_jaxpr, splice
from ._scopes import scope_names
from ._structured import Edit as StructuredEdit

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

    structured = graph._structure.with_edits(*(_structured_edit(graph, e) for e in edits))
    program, var_map, patched = splice(graph._program, edits, (), graph._flat_args)
    origin = {j: i for i, j in enumerate(var_map)}
    origin.update({j: i for i, j in patched.items()})
    unpatched = frozenset(var_map[i] for i in patched) | {var_map[i] for i in graph._unpatched}
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
        structured,
        lambda j: graph._site(origin[j]) if j in origin else None,
        frozenset(unpatched),
    )


def _structured_edit(graph: Graph, edit: Edit) -> StructuredEdit:
    """A flat edit as an edit of the structured program (reads at the target's level)."""
    target = graph.vars[edit.target]
    site = graph._site_of(target)
    reads = []
    for r in edit.reads:
        read = graph._site_of(graph.vars[r])
        if read.steps != site.steps:
            raise SliceError(
                f"the replacement for {target.name!r} reads {graph.vars[r].name!r}, which "
                "lives in another call, loop iteration or branch; patch values of one "
                "level together"
            )
        reads.append(read.vars[0])
    return StructuredEdit(site, "apply", edit.closed, tuple(reads))


def _patch_jaxpr(var: Var, value_or_fn: Any) -> C.ClosedJaxpr:
    """The jaxpr computing a var's new value from its old one, checked for its type."""
    if callable(value_or_fn):
        fn = value_or_fn
    else:
        value = value_or_fn
        fn = lambda old: jnp.broadcast_to(jnp.asarray(value, old.dtype), old.shape)  # noqa: E731
    return replacement_jaxpr(fn, [var], var, f"the replacement for {var.name!r}")
