"""The interactive view: a graph you can pan, zoom, open group by group and search.

``g.view()`` returns a :class:`View`; a notebook shows it (``_repr_html_``), and
``view.save("g.html")`` writes a standalone page. Groups are those of
:mod:`jaxsurgery._hierarchy`, opened to the same default depth as ``g.draw()``: click a
box to open it, the header of an open group to close it; hover or click a var for a card
with its full name, aliases, type, scope, ``file:line`` and a selector to copy; the
search box (case-insensitive words, over names, aliases, scopes and primitives) counts
the matches, marks them, and opens the groups of the first ones.

The layout runs in the browser with dagre (``jaxsurgery/static/dagre.min.js``, MIT,
vendored): the page inlines it and the data, so it works offline and in CI.

Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     h = jnp.tanh(x)
    ...     return jnp.sin(h)
    >>> view = js.trace(f, jnp.ones(3)).view(highlight="h")
    >>> [v["role"] for v in view.data()["vars"]]
    ['faded', 'selected', 'faded']
    >>> "dagre" in view._repr_html_()
    True
"""

from __future__ import annotations

import functools
import html
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from ._copying import Shared
from ._draw import STYLES, check_depth, roles
from ._hierarchy import acyclic, default_depth, expanded_to, hierarchy
from ._names import is_generated
from ._progress import progress
from ._table import html_id, source_label

if TYPE_CHECKING:
    from ._graph import Graph


@functools.cache
def _static(name: str) -> str:
    return resources.files("jaxsurgery").joinpath("static", name).read_text(encoding="utf-8")


class View(Shared):
    """An interactive picture of a graph (see the module docstring).

    Args:
        graph: the graph.
        highlight: a Slice, or anything ``graph.select`` accepts (shown as in ``g.draw``).
        depth: groups open above this depth (None: as ``g.draw()``).
    """

    def __init__(self, graph: Graph, highlight: Any = None, depth: int | None = None):
        self.graph = graph
        self._roles = roles(graph, highlight)
        self._depth = check_depth(depth)

    def data(self) -> dict[str, Any]:
        """What the page draws: groups, vars (with roles), var-level edges, open groups."""
        from ._graph import short_type

        graph = self.graph
        root = hierarchy(graph)
        edges = graph._program.var_edges()
        depth = self._depth or default_depth(root)
        opened, _ = acyclic(root, expanded_to(root, depth), edges)
        owner: dict[int, str] = {}
        group_rows = []
        for g in root.walk():
            for c in g.children:
                owner.setdefault(id(c), g.key)
            glob: str | list[str] = f"{g.path}/**" if g.kind in ("scope", "call") and g.path else ""
            if glob and g.kind == "call":
                under, elsewhere = _named_inside(graph, g)
                # its result (a name outside its path), the glob where something inside
                # has a name under its path, and values named otherwise (by a scope a
                # library opened: an einsum's, eqx.nn.Linear's), where few
                glob = [
                    *([g.path] if g.path in graph._names.lookup else []),
                    *([glob] if under else []),
                    *elsewhere,
                ]
                glob = glob[0] if len(glob) == 1 else glob if glob else ""
            group_rows.append(
                {
                    "key": g.key,
                    "label": g.label,
                    "path": g.path,
                    "kind": g.kind,
                    "also": g.also,
                    "size": g.size,
                    "depth": g.depth,
                    "parent": owner.get(id(g)),
                    "glob": glob,
                }
            )
            for i in g.vars:
                owner[-1 - i] = g.key
        base = "faded" if self._roles else "plain"
        var_rows = []
        for v in graph.vars:
            var_rows.append(
                {
                    "index": v.index,
                    "name": v.name,
                    "aliases": [a for a in v.aliases if not is_generated(a)],
                    "type": short_type(v.aval),
                    "primitive": v.primitive,
                    "scope": v.scope,
                    "source": source_label(v.source),
                    "group": owner[-1 - v.index],
                    "role": self._roles.get(v.index, base),
                }
            )
        return {
            "groups": group_rows,
            "vars": var_rows,
            "edges": sorted(set(edges)),
            "expanded": sorted(opened - {root.key}),
        }

    def packed(self) -> dict[str, Any]:
        """:meth:`data` as the page gets it: vars and groups as columns of indices into
        one table of strings (scopes, sources, types, group keys repeat) and the edges as
        one flat list: less than half the size (a 100k-var chain: 11 MB, not 25 MB)."""
        data = self.data()
        strings: dict[str, int] = {}

        def ref(text: str) -> int:
            return strings.setdefault(text, len(strings))

        rows = data["vars"]
        assert [v["index"] for v in rows] == list(range(len(rows)))  # unpacked by position
        columns: dict[str, Any] = {
            key: [ref(v[key]) for v in rows]
            for key in ("name", "type", "primitive", "scope", "source", "group", "role")
        }
        columns["aliases"] = {
            k: [ref(a) for a in v["aliases"]] for k, v in enumerate(rows) if v["aliases"]
        }
        groups = data["groups"]
        group_columns: dict[str, Any] = {
            key: [ref(g[key]) for g in groups] for key in ("key", "label", "path", "kind")
        }
        # a call's selector is a list (its result and the glob inside it): a list of refs
        group_columns["glob"] = [
            [ref(x) for x in g["glob"]] if isinstance(g["glob"], list) else ref(g["glob"])
            for g in groups
        ]
        group_columns["parent"] = [-1 if g["parent"] is None else ref(g["parent"]) for g in groups]
        group_columns["size"] = [g["size"] for g in groups]
        group_columns["depth"] = [g["depth"] for g in groups]
        group_columns["also"] = {
            k: [ref(a) for a in g["also"]] for k, g in enumerate(groups) if g["also"]
        }
        return {
            "groups": group_columns,
            "columns": columns,
            "strings": list(strings),
            "edges": [i for edge in data["edges"] for i in edge],
            "expanded": data["expanded"],
        }

    def html(self, standalone: bool = False) -> str:
        """The view as HTML: a fragment for notebooks, or a whole page."""
        box = html_id("jsv-")
        with progress(f"building the view of {len(self.graph.vars)} vars"):
            payload = json.dumps(self.packed(), separators=(",", ":"))
            # no "<", ">" or "&" in the script (a name holding "<!--<script" would
            # change how HTML reads the rest of it): JSON escapes of the same text
            for c, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
                payload = payload.replace(c, escaped)
        fragment = (
            f'<div class="jsv" id="{box}"><style>{_css(box)}</style>'
            '<div class="jsv-bar"><input class="jsv-search" type="search" '
            'placeholder="search names, scopes, primitives" aria-label="search">'
            '<span class="jsv-count"></span><button class="jsv-fit">fit</button>'
            '<button class="jsv-collapse">reset</button>'
            f'<span class="jsv-title">{html.escape(self.graph._title.split("(")[0])}: '
            f"{len(self.graph.vars)} vars; click a box to open it</span></div>"
            '<div class="jsv-body"><svg class="jsv-canvas" xmlns="http://www.w3.org/2000/svg">'
            f'<defs><marker id="{box}-arrow" viewBox="0 0 10 10" refX="10" refY="5" '
            'markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" '
            'fill="#9aa0a6"/></marker></defs><g class="jsv-scene"></g></svg>'
            '<div class="jsv-card">hover a box for its details</div></div>'
            f"<script>{_static('dagre.min.js')}\n{_static('view.js')}\n"
            f"jaxsurgeryView(document.getElementById({box!r}), {payload});</script></div>"
        )
        if not standalone:
            return fragment
        return (
            '<!DOCTYPE html><html><head><meta charset="utf-8"><title>jaxsurgery view</title>'
            f"</head><body>{fragment}</body></html>"
        )

    def _repr_html_(self) -> str:
        return self.html()

    def save(self, path: str) -> None:
        """Write a standalone HTML page (no network needed to open it)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.html(standalone=True))

    def __repr__(self) -> str:
        return f"View({self.graph._title.split('(')[0]}: {len(self.graph.vars)} vars)"


def _css(box: str) -> str:
    rules = [
        f"#{box}{{font-family:Helvetica,Arial,sans-serif;font-size:12px;color:inherit}}",
        f"#{box} .jsv-bar{{display:flex;gap:8px;align-items:center;margin:4px 0}}",
        f"#{box} .jsv-title{{opacity:.7}}",
        f"#{box} .jsv-body{{display:flex;gap:8px}}",
        f"#{box} .jsv-canvas{{flex:1;height:520px;border:1px solid rgba(128,128,128,.4);"
        "border-radius:6px;cursor:grab;background:transparent}",
        f"#{box} .jsv-card{{width:280px;max-height:520px;overflow:auto;word-break:break-all;"
        "border:1px solid rgba(128,128,128,.4);border-radius:6px;padding:6px}",
        f"#{box} .jsv-row{{margin:2px 0}}",
        f"#{box} .jsv-edge{{fill:none;stroke:#9aa0a6;stroke-width:1}}",
        f"#{box} .jsv-node{{cursor:pointer}}",
        f"#{box} .jsv-node text{{text-anchor:middle;fill:#202124}}",
        f"#{box} .jsv-label{{font-size:12px}} #{box} .jsv-detail{{font-size:10px}}",
        f"#{box} .jsv-cluster rect{{fill:rgba(128,128,128,.06);stroke:rgba(128,128,128,.5);"
        "stroke-dasharray:4,3}",
        f"#{box} .jsv-cluster text{{font-size:11px;fill:#5f6368;cursor:pointer}}",
    ]
    for role, (fill, stroke, dashed) in STYLES.items():
        dash = ";stroke-dasharray:4,3" if dashed else ""
        rules.append(
            f"#{box} .jsv-{role} rect{{fill:{fill};stroke:{stroke};stroke-width:1.5{dash}}}"
        )
    rules.append(f"#{box} .jsv-faded text{{fill:#bdc1c6}}")
    rules.append(f"#{box} .jsv-group rect{{stroke-width:3}}")
    rules.append(f"#{box} .jsv-hit rect{{stroke:#d93025;stroke-width:3}}")
    return "".join(rules)


#: the most values named otherwise than under a call's path that its card lists
NAMED_ELSEWHERE = 8


def _named_inside(graph: Graph, group: Any) -> tuple[bool, list[str]]:
    """For a call's group: whether a value inside it has a name under the call's path,
    so that its card's ``g.select("<path>/**")`` selects something (a scope's glob also
    selects the unnamed ones, which have ``<scope>/%k`` aliases); and the canonical
    names of the values inside named otherwise (a scope a library opened inside the
    call, not under its path), up to :data:`NAMED_ELSEWHERE` (none where more)."""
    prefix = group.path + "/"
    under, elsewhere = False, []
    names = graph._names
    for i in group.all_vars():
        var = graph.vars[i]
        every = (var.name, *var.aliases)
        if any(n.startswith(prefix) for n in every):
            under = True
        elif group.path not in every and names.parse_fallback(var.name) is None:
            if var.primitive not in ("input", "const"):
                elsewhere.append(var.name)
    return under, elsewhere if len(elsewhere) <= NAMED_ELSEWHERE else []
