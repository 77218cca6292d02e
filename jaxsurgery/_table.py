"""Tables of vars: text for terminals, HTML for notebooks (``_repr_html_``).

Long tables show their first :data:`HEAD` and last :data:`TAIL` rows. The HTML table is one
table (its columns line up from the first row to the last) with a filter box above it:

* the filter is case-insensitive, its words must all appear in a row (``"Dense tanh"``),
  and it searches every row of the table, the folded middle too; a count says how many
  rows match;
* the middle rows of a long table are folded behind a "show" row, which works without
  scripts (a CSS checkbox); filtering needs the few lines of inline script, which every
  trusted notebook runs (elsewhere, filter with ``g.select(...)``, whose Selection shows
  its own table);
* past :data:`HTML_ALL_ROWS` vars only the first and last rows are in the table;
* colours are translucent greys and the page's own text colour, so the table reads in
  light and dark notebook themes alike;
* sources name notebook cells as IPython does (``Cell In[3], line 5``), not by their
  temporary file (``/tmp/ipykernel_123/2851.py``).

A Slice's table has a ``role`` column: input, window, output or context.

Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     h = jnp.sin(x)
    ...     return h * 2.0
    >>> g = js.trace(f, jnp.ones(3))
    >>> print(g)  # doctest: +NORMALIZE_WHITESPACE
    Graph f: 3 vars, 2 equations, outputs out
    index  name  type    primitive  reads  source
    0      x     f32[3]  input
    1      h     f32[3]  sin        x      <doctest jaxsurgery._table[1]>:2
    2      out   f32[3]  mul        h      <doctest jaxsurgery._table[1]>:3
    >>> 'role' in g.slice("h", "out")._repr_html_()
    True
"""

from __future__ import annotations

import html
import itertools
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ._errors import short_list
from ._hierarchy import clip_keys, min_width_apart
from ._names import is_generated

if TYPE_CHECKING:
    from ._graph import Graph, Var

#: Rows shown from each end of a long table.
HEAD, TAIL = 30, 10
#: Past this many vars the HTML table lists only the first and last rows.
HTML_ALL_ROWS = 2000
COLUMNS = ("index", "name", "type", "primitive", "reads", "scope", "source")
HTML_COLUMNS = ("index", "name", "aliases", "shape", "dtype", "primitive", "scope", "source")
#: Roles of a slice's vars, in the order a var that has several lists them.
ROLES = ("input", "window", "output", "context")
#: Colours of the roles (those of ``g.draw(highlight=s)``), as translucent cell backgrounds.
ROLE_COLOURS = {
    "input": "30,142,62",
    "window": "26,115,232",
    "output": "232,113,10",
    "context": "128,128,128",
}
_ids = itertools.count()
#: this process's part of every HTML id: outputs of two kernels (a notebook re-run in
#: part after a restart, two notebooks in one JupyterLab page) share one document
_SESSION = secrets.token_hex(4)


def html_id(prefix: str) -> str:
    """An id for an HTML output that no other output in the page has: ``js3f9a0c1b-0``."""
    return f"{prefix}{_SESSION}-{next(_ids)}"


# /tmp/ipykernel_1234/2851436257.py: how ipykernel names the file of a cell
_KERNEL_FILE = re.compile(r"ipykernel_\d+[/\\]\d+\.py$")


def source_label(source: str | None) -> str:
    """``"file.py:12"`` for a var's source; a notebook cell as ``"Cell In[3], line 12"``.

    The cell number comes from the running IPython (as its tracebacks show it); a cell
    file from another kernel session is ``"cell, line 12"``.
    """
    if not source:
        return ""
    file, _, line = source.rpartition(":")
    if not file or not line.isdigit():
        return source.rsplit("/", 1)[-1]
    cell = _cell_name(file)
    if cell is not None:
        return f"{cell}, line {line}"
    if _KERNEL_FILE.search(file) or file.startswith("<ipython-input-"):
        return f"cell, line {line}"
    return f"{file.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}"


def _cell_name(file: str) -> str | None:
    """``"Cell In[3]"`` when the running IPython compiled ``file`` from a cell."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    compiler = getattr(shell, "compile", None)
    try:
        label = compiler.format_code_name(file) if compiler is not None else None
    except Exception:  # an IPython without it, or another compiler: fall back to the file
        return None
    return f"{label[0]} {label[1]}" if label else None


def _shown_aliases(v: Var) -> list[str]:
    return [a for a in v.aliases if not is_generated(a)]


def _row(v: Var) -> tuple[str, ...]:
    from ._graph import short_type

    reads = ", ".join(p.name for p in v.producers)
    aliases = _shown_aliases(v)
    name = v.name + (f" ({', '.join(aliases)})" if aliases else "")
    return (
        str(v.index),
        name,
        short_type(v.aval),
        v.primitive,
        reads,
        v.scope,
        source_label(v.source),
    )


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
    if 1 in widths:  # wider where two names cut would read the same
        names = [r[1] for r in rows[1:]]
        widths[1] = min_width_apart(names, widths[1], lambda t, w: _head(_clip_name(t, w)), _head)
    lines = [title]
    for r in rows:
        cells = [(_clip_name if c == 1 else clip)(r[c], widths[c]).ljust(widths[c]) for c in keep]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _head(text: str) -> str:
    """The name of a name cell (``name (aliases)``)."""
    return text.split(" (", 1)[0]


def _clip_name(text: str, width: int) -> str:
    """A name cell (``name (aliases)``) cut to ``width``: the aliases first; a long name
    in its middle (its block and its leaf tell rows apart)."""
    name = _head(text)
    return clip_keys(name, width) if len(name) > width - 4 else clip(text, width)


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def graph_table(graph: Graph) -> str:
    return var_table(list(graph.vars), graph_title(graph))


def graph_title(graph: Graph) -> str:
    """``Graph f: 12 vars, 9 equations, outputs z3``: the function's name, not its signature
    (a Flax ``apply``'s annotations would fill five lines)."""
    p = graph._program
    name = graph._title.split("(", 1)[0]
    outs = short_list([v.name for v in graph.outputs], limit=4)
    return f"Graph {name}: {len(graph.vars)} vars, {len(p.jaxpr.eqns)} equations, outputs {outs}"


def slice_roles(s: object) -> dict[Var, str]:
    """Each var of slice ``s`` (inputs, window, outputs, context) with its role(s), in
    index order: ``"input"``, ``"window"``, ``"output"``, ``"context"`` or several
    (``"input, output"`` for an identity slice)."""
    shown = getattr(s, "shown_roles", None)  # a slice cut from a running loop
    window, context = shown() if shown is not None else (s.window_vars, s.context_vars)
    groups = {"input": s.in_vars, "window": window, "output": s.out_vars, "context": context}
    found: dict[Var, list[str]] = {}
    for role in ROLES:
        for v in groups[role]:
            found.setdefault(v, []).append(role)
    for roles in found.values():  # an output is computed by the window: say output only
        if "window" in roles and len(roles) > 1:
            roles.remove("window")
    return {v: ", ".join(found[v]) for v in sorted(found, key=lambda v: v.index)}


def _html_cells(v: Var) -> tuple[str, ...]:
    return (
        str(v.index),
        v.name,
        ", ".join(_shown_aliases(v)),
        str(list(v.shape)),
        str(v.dtype),
        v.primitive,
        v.scope,
        source_label(v.source),
    )


def _html_row(v: Var, role: str | None) -> str:
    cells = [f"<td>{html.escape(c)}</td>" for c in _html_cells(v)]
    if role is not None:
        colour = ROLE_COLOURS[role.split(",")[0]]
        cells.insert(1, f'<td style="background:rgba({colour},.25)">{html.escape(role)}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


# the filter box's script: every word (case-insensitive) in a row; a count of the matches
_FILTER_JS = (
    "const t=this.closest('.jst'),q=this.value.toLowerCase().split(/\\s+/).filter(Boolean);"
    "let n=0;t.classList.toggle('jst-filtering',q.length>0);"
    "for(const r of t.querySelectorAll('tbody.jst-rows tr')){"
    "const m=q.every(w=>r.textContent.toLowerCase().includes(w));r.hidden=!m;n+=m}"
    "const c=t.querySelector('.jst-count');"
    "c.textContent=q.length?n+' of '+c.dataset.rows+' rows match':c.dataset.rows+' rows'"
)


def _style(uid: str) -> str:
    s = f"#{uid}"
    grey = "rgba(127,127,127,{})"
    return (
        f"<style>{s}{{font-size:12px;color:inherit}}"
        f"{s} table{{border-collapse:collapse;background:transparent;color:inherit}}"
        f"{s} td,{s} th{{padding:1px 8px;text-align:left;white-space:nowrap;"
        f"background:transparent;color:inherit}}"
        f"{s} th{{border-bottom:1px solid {grey.format(0.6)}}}"
        f"{s} tbody tr:nth-child(even){{background:{grey.format(0.12)}}}"
        f"{s}.jst-filtering tbody tr:nth-child(even){{background:transparent}}"
        f"{s} tbody tr:hover{{background:{grey.format(0.25)}}}"
        f"{s} td:first-child{{text-align:right;font-variant-numeric:tabular-nums}}"
        f"{s} input.jst-q{{width:22em;color:inherit;background:transparent;"
        f"border:1px solid {grey.format(0.6)};border-radius:3px;padding:1px 4px}}"
        f"{s} .jst-count{{margin-left:8px;opacity:.75}}"
        f"{s} .jst-more td{{text-align:left}}"
        f"{s} .jst-more label{{cursor:pointer;opacity:.75;font-style:italic}}"
        f"{s} tbody.jst-middle{{display:none}}"
        f"{s} .jst-toggle:checked~table tbody.jst-middle,"
        f"{s}.jst-filtering tbody.jst-middle{{display:table-row-group}}"
        f"{s}.jst-filtering tbody.jst-more{{display:none}}"
        f"{s} .jst-toggle{{display:none}}</style>"
    )


def var_table_html(
    vars_: Sequence[Var],
    title: str,
    note: str = "",
    roles: Mapping[Var, str] | None = None,
) -> str:
    """One HTML table of vars for notebooks, with a filter box above it; long tables fold
    their middle rows. ``roles`` adds a role column (a slice's table)."""
    uid = html_id("js")
    columns = list(HTML_COLUMNS)
    if roles is not None:
        columns.insert(1, "role")

    def rows(part: Sequence[Var]) -> str:
        return "".join(_html_row(v, None if roles is None else roles[v]) for v in part)

    n = len(vars_)
    long = n > HEAD + TAIL
    listed = n if not long or n <= HTML_ALL_ROWS else HEAD + TAIL
    count = f"{n} rows" if listed == n else f"{n} rows ({listed} in this table)"
    parts = [
        f'<div class="jst" id="{uid}">{_style(uid)}<div><b>{html.escape(title)}</b></div>',
        f"<div>{html.escape(note)}</div>" if note else "",
        f'<div><input class="jst-q" type="search" placeholder="filter: name, primitive, '
        f'scope, source…" oninput="{html.escape(_FILTER_JS)}">'
        f'<span class="jst-count" data-rows="{listed}">{count}</span></div>',
    ]
    if long:
        parts.append(f'<input type="checkbox" class="jst-toggle" id="{uid}-more">')
    head = "".join(f"<th>{c}</th>" for c in columns)
    parts.append(f"<table><thead><tr>{head}</tr></thead>")
    if not long:
        parts.append(f'<tbody class="jst-rows">{rows(vars_)}</tbody></table></div>')
        return "".join(parts)
    middle = vars_[HEAD:-TAIL]
    if n <= HTML_ALL_ROWS:
        more = f'<label for="{uid}-more">… {len(middle)} more rows (click to show or hide)</label>'
        folded = f'<tbody class="jst-rows jst-middle">{rows(middle)}</tbody>'
    else:
        more = f"… {len(middle)} more rows: select them with g.select(...)"
        folded = ""
    parts.append(
        f'<tbody class="jst-rows">{rows(vars_[:HEAD])}</tbody>'
        f'<tbody class="jst-more"><tr><td colspan="{len(columns)}">{more}</td></tr></tbody>'
        f'{folded}<tbody class="jst-rows">{rows(vars_[-TAIL:])}</tbody></table></div>'
    )
    return "".join(parts)
