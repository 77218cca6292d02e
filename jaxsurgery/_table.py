"""Text views: the var table printed for a Graph or a Selection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._graph import Graph, Var

#: Rows shown from each end of a long table.
HEAD, TAIL = 30, 10
COLUMNS = ("index", "name", "type", "primitive", "reads", "scope", "source")


def _row(v: Var) -> tuple[str, ...]:
    reads = ", ".join(p.name for p in v.producers)
    aliases = [a for a in v.aliases if "%" not in a and ":" not in a]
    name = v.name + (f" ({', '.join(aliases)})" if aliases else "")
    source = v.source or ""
    if source:
        source = source.rsplit("/", 1)[-1]
    from ._graph import short_type

    return (str(v.index), name, short_type(v.aval), v.primitive, reads, v.scope, source)


def var_table(vars_: Sequence[Var], title: str) -> str:
    """A fixed-width table of vars; long ones show the first and last rows."""
    shown: list[Var | None]
    if len(vars_) > HEAD + TAIL:
        shown = [*vars_[:HEAD], None, *vars_[-TAIL:]]
    else:
        shown = list(vars_)
    rows = [COLUMNS] + [
        _row(v)
        if v is not None
        else ("...", f"({len(vars_) - HEAD - TAIL} more)", "", "", "", "", "")
        for v in shown
    ]
    keep = [c for c in range(len(COLUMNS)) if any(r[c] for r in rows[1:])] or [0]
    widths = {c: min(40, max(len(r[c]) for r in rows)) for c in keep}
    lines = [title]
    for r in rows:
        cells = [_clip(r[c], widths[c]).ljust(widths[c]) for c in keep]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def graph_table(graph: Graph) -> str:
    p = graph._program
    title = (
        f"Graph {graph._title}: {len(graph.vars)} vars, {len(p.jaxpr.eqns)} equations, "
        f"outputs {', '.join(v.name for v in graph.outputs)}"
    )
    return var_table(list(graph.vars), title)
