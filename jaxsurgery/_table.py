"""Tables of vars: text for terminals, HTML for notebooks (``_repr_html_``).

Long tables show their first and last rows. The HTML table of a long graph keeps the
other rows in a collapsed section, up to :data:`HTML_ALL_ROWS` rows, with a filter box
(a few lines of script; where a notebook front end does not run scripts, filter with
``g.select(...)``, whose Selection shows its own table).
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._names import is_generated

if TYPE_CHECKING:
    from ._graph import Graph, Var

#: Rows shown from each end of a long table.
HEAD, TAIL = 30, 10
#: Past this many vars the HTML table lists only the first and last rows.
HTML_ALL_ROWS = 2000
COLUMNS = ("index", "name", "type", "primitive", "reads", "scope", "source")
_ids = itertools.count()


def _shown_aliases(v: Var) -> list[str]:
    return [a for a in v.aliases if not is_generated(a)]


def _row(v: Var) -> tuple[str, ...]:
    reads = ", ".join(p.name for p in v.producers)
    aliases = _shown_aliases(v)
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
        cells = [clip(r[c], widths[c]).ljust(widths[c]) for c in keep]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def graph_table(graph: Graph) -> str:
    return var_table(list(graph.vars), graph_title(graph))


HTML_COLUMNS = ("index", "name", "aliases", "shape", "dtype", "primitive", "scope", "source")


def _html_row(v: Var) -> str:
    aliases = ", ".join(_shown_aliases(v))
    cells = (
        str(v.index),
        v.name,
        aliases,
        str(list(v.shape)),
        str(v.dtype),
        v.primitive,
        v.scope,
        (v.source or "").rsplit("/", 1)[-1],
    )
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def var_table_html(vars_: Sequence[Var], title: str, note: str = "") -> str:
    """An HTML table of vars for notebooks; long ones collapse their middle rows."""
    uid = f"js{next(_ids)}"
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in HTML_COLUMNS) + "</tr>"
    style = (
        f"<style>#{uid} table{{border-collapse:collapse;font-size:12px}}"
        f"#{uid} td,#{uid} th{{padding:1px 8px;text-align:left;white-space:nowrap}}"
        f"#{uid} tr:nth-child(even){{background:#f6f8fa}}</style>"
    )
    parts = [f'<div id="{uid}">{style}<b>{html.escape(title)}</b>']
    if note:
        parts.append(f"<div>{html.escape(note)}</div>")
    if len(vars_) <= HEAD + TAIL:
        parts.append(f"<table>{head}{''.join(_html_row(v) for v in vars_)}</table></div>")
        return "".join(parts)
    middle = vars_[HEAD:-TAIL]
    parts.append(f"<table>{head}{''.join(_html_row(v) for v in vars_[:HEAD])}</table>")
    if len(vars_) <= HTML_ALL_ROWS:
        parts.append(
            f"<details><summary>{len(middle)} more rows (filter: "
            f'<input placeholder="name, primitive or scope" oninput="'
            f"for(const r of this.closest('details').querySelectorAll('tr'))"
            f"r.style.display=r.textContent.includes(this.value)?'':'none'\">)</summary>"
            f"<table>{''.join(_html_row(v) for v in middle)}</table></details>"
        )
    else:
        parts.append(f"<div>... {len(middle)} more rows: select them with g.select(...)</div>")
    parts.append(f"<table>{''.join(_html_row(v) for v in vars_[-TAIL:])}</table></div>")
    return "".join(parts)


def graph_title(graph: Graph) -> str:
    p = graph._program
    return (
        f"Graph {graph._title}: {len(graph.vars)} vars, {len(p.jaxpr.eqns)} equations, "
        f"outputs {', '.join(v.name for v in graph.outputs)}"
    )
