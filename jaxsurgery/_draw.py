"""Static pictures of a graph or a slice: Graphviz DOT text, and SVG for notebooks.

``g.to_dot(highlight=...)`` writes DOT; ``g.draw(highlight=...)`` renders SVG, with
Graphviz's ``dot`` program when it is on the PATH (the best layout) and otherwise with a
small built-in layered layout, so pictures work on a bare ``pip install`` (Graphviz is
a system program that pip cannot install).

``highlight`` is a :class:`~jaxsurgery.Slice` (its inputs green, outputs orange, window
blue, context grey and dashed; other vars fade) or anything ``g.select`` accepts (a
name, a glob, an index, a Var, a Selection: those vars purple). A legend says so.

Graphs with more than ``max_nodes`` vars are drawn collapsed, along the group tree of
:mod:`jaxsurgery._hierarchy`: each group at ``depth`` is one box (``depth=None``: the
first level with several groups, ``Block_0`` … ``Block_5`` of a transformer), parameters
inside the box that reads them. A highlighted group takes the strongest role of its
vars; ``expand=True`` opens the groups holding the highlight's inputs and outputs.

Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     z1 = jnp.tanh(x)
    ...     z2 = jnp.sin(z1)
    ...     return z2
    >>> g = js.trace(f, jnp.ones(3))
    >>> print(g.to_dot(highlight=g.slice("z1", "z2")).splitlines()[0])
    digraph jaxsurgery {
    >>> g.draw(highlight="z*").svg.startswith("<svg")
    True
"""

from __future__ import annotations

import html
import numbers
import operator
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import SelectionError
from ._hierarchy import (
    Group,
    acyclic,
    clip_keys,
    clip_left,
    default_depth,
    expanded_to,
    hierarchy,
    min_width_apart,
    split_path,
    touching,
    visible,
)
from ._progress import progress
from ._table import html_id, slice_roles

if TYPE_CHECKING:
    from ._graph import Graph

STYLES = {  # role -> (fill, stroke, dashed)
    "input": ("#d7f5dd", "#1e8e3e", False),
    "output": ("#fde2c8", "#e8710a", False),
    "window": ("#d2e3fc", "#1a73e8", False),
    "context": ("#f1f3f4", "#80868b", True),
    "selected": ("#f3e8fd", "#9334e6", False),
    "plain": ("#ffffff", "#bdc1c6", False),
    "faded": ("#ffffff", "#e0e0e0", False),
}
#: What each role means, for legends (in this order: the strongest role first).
ROLES = {
    "input": "slice input",
    "output": "slice output",
    "window": "computed by the slice",
    "context": "context (fixed values)",
    "selected": "selected",
    "plain": "other",
    "faded": "not highlighted",
}
_ORDER = list(ROLES)
#: Characters of a box's label (clipped from the left: the tail of a path says most).
LABEL_WIDTH = 26


@dataclass
class Node:
    key: str
    label: str
    detail: str
    role: str
    title: str = ""
    group: bool = False


def roles(graph: Graph, highlight: Any) -> dict[int, str]:
    """Per var index, its role in ``highlight`` (a Slice, or a selector: ``selected``).

    A value inside a folded loop (``step/h@5``) is drawn on its loop: the loop's
    results take its role; a value before a patch (``h.unpatched``), where the patched
    one is.
    """
    from ._patch_graph import Unpatched

    found = _flat_roles(graph, highlight)
    n = len(graph._program.vars)
    # a flat var's own role stays (a slice's output), the window's aside: a loop holding
    # the input is drawn as it, though the slice computes its results
    own = {i for i, r in found.items() if i < n and r != "window"}
    pushed: dict[int, str] = {}
    for i in [i for i in found if i >= n]:
        role = found.pop(i)
        v = graph._var(i)
        v = v.of if isinstance(v, Unpatched) else v
        at = (v.index,) if v.index < n else ()
        if not at:
            loop = v._loop
            at = graph._program.eqn_out[loop.flat_eqn] if loop.flat_eqn >= 0 else ()
            if own.intersection(at):  # the loop is drawn by a result of a role of its own
                continue  # (a slice from inside it to its result): the rest stay faded
        for j in at:
            if j not in own:  # a loop holding a slice's input and output: its output
                pushed[j] = min(role, pushed.get(j, role), key=_PUSHED.index)
    found.update(pushed)
    return found


#: the role a loop's results take when it holds values of several (one colour a box)
_PUSHED = ("output", "input", "context", "window", "selected")


def _flat_roles(graph: Graph, highlight: Any) -> dict[int, str]:
    """:func:`roles`, virtual vars (folded loop values) still among them."""
    from ._slice import Slice

    if highlight is None:
        return {}
    if isinstance(highlight, Slice):
        if highlight.graph is not graph:
            raise SelectionError(
                f"highlight={_short(highlight)} is a slice of another graph; cut it from this "
                "graph (g.slice(...)) or draw it with s.draw()"
            )
        # one colour a box: an output that is also an input (an identity slice) is drawn
        # as an output
        precedence = ("output", "input", "context", "window")
        return {
            v.index: next(r for r in precedence if r in listed.split(", "))
            for v, listed in slice_roles(highlight).items()
        }
    try:
        selection = graph.select(highlight)
    except SelectionError as e:
        raise SelectionError(
            f"highlight={_short(highlight)}: {e.args[0]}; highlight takes a Slice or anything "
            "g.select accepts"
        ) from None
    return {v.index: "selected" for v in selection}


def _short(highlight: Any) -> str:
    """A highlight as an error message shows it: one line (a Selection's repr is a
    table of its vars)."""
    text = repr(highlight)
    line = text.splitlines()[0] if text else text
    return line if len(line) <= 80 and "\n" not in text else f"{line[:77]}..."


def _strongest(a: str, b: str) -> str:
    return a if _ORDER.index(a) <= _ORDER.index(b) else b


#: the most characters a box's label widens to (names alike up to their last few
#: characters stay alike beyond it: the tooltip has the whole name)
MAX_LABEL = 40


def check_depth(depth: Any) -> int | None:
    """``depth`` as an int, or None; a SelectionError unless it is None or a whole
    number >= 1 (a NumPy integer too, not a bool) (``g.draw``, ``g.view``)."""
    if depth is None:
        return None
    try:
        whole = operator.index(depth)
    except TypeError:
        whole = 0
    if isinstance(depth, bool) or whole < 1:
        raise SelectionError(f"depth={depth!r} is not a depth: pass an int >= 1, or None")
    return whole


def check_max_nodes(max_nodes: Any) -> float:
    """``max_nodes``; a SelectionError unless it is a number >= 1 (``float("inf")``:
    never collapse)."""
    number = not isinstance(max_nodes, bool) and isinstance(max_nodes, numbers.Real)
    if not (number and max_nodes >= 1):  # (NaN too)
        raise SelectionError(
            f"max_nodes={max_nodes!r} is not a number of nodes: pass an int >= 1 (past it, "
            "groups are drawn as boxes), or float('inf')"
        )
    return max_nodes


def layout_graph(
    graph: Graph,
    highlight: Any = None,
    max_nodes: int = 150,
    depth: int | None = None,
    expand: bool = False,
) -> tuple[list[Node], list[tuple[str, str]]]:
    """Nodes and edges to draw: every var, or the groups of the tree collapsed."""
    from ._graph import short_type

    depth, max_nodes = check_depth(depth), check_max_nodes(max_nodes)
    if not isinstance(expand, (bool, np.bool_)):  # ("no" is true)
        raise SelectionError(f"expand must be True or False, got {expand!r}")
    role_of = roles(graph, highlight)
    base = "faded" if role_of else "plain"
    edges_v = graph._program.var_edges()
    groups: dict[str, Group] = {}
    if depth is None and len(graph.vars) <= max_nodes:
        node_of = {v.index: f"v{v.index}" for v in graph.vars}
    else:
        root = hierarchy(graph)
        groups = {g.key: g for g in root.walk()}
        if depth is None:
            depth = default_depth(root)
            while (
                depth > 1 and len(set(visible(root, expanded_to(root, depth)).values())) > max_nodes
            ):
                depth -= 1
        opened = expanded_to(root, depth)
        if expand and role_of:
            ends = {i for i, r in role_of.items() if r in ("input", "output", "selected")}
            opened |= touching(root, ends)
        _, node_of = acyclic(root, opened, edges_v)
    nodes: dict[str, Node] = {}
    for v in graph.vars:
        key = node_of[v.index]
        role = role_of.get(v.index, base)
        node = nodes.get(key)
        if node is not None:
            node.role = _strongest(role, node.role)
        elif key in groups:
            g = groups[key]
            title = g.path + (f" (also {', '.join(g.also)})" if g.also else "")
            label = g.label if g.kind != "inputs" else f"{g.label} (inputs)"
            detail = f"{g.size} var{'s' if g.size != 1 else ''}"
            nodes[key] = Node(key, label, detail, role, title or g.label, group=True)
        else:
            detail = f"{short_type(v.aval)} {v.primitive}"
            nodes[key] = Node(key, v.name, detail, role, v.name)
    _labels_apart([n for n in nodes.values() if n.group], groups)
    edges: dict[tuple[str, str], None] = {}
    for a, b in edges_v:
        edge = (node_of[a], node_of[b])
        if edge[0] != edge[1]:
            edges[edge] = None
    return list(nodes.values()), list(edges)


def _labels_apart(boxes: list[Node], groups: dict[str, Group]) -> None:
    """Boxes of groups whose labels read alike (``block_0`` under each of four block
    groups, their parents not drawn) labelled by as much of their paths' tails as
    tells them apart (``block_group_1/block_0``)."""
    alike: dict[str, list[Node]] = {}
    for n in boxes:
        alike.setdefault(n.label, []).append(n)
    for same in alike.values():
        paths = [split_path(groups[n.key].path) for n in same]
        if len(same) < 2 or any(not p for p in paths) or len({tuple(p) for p in paths}) < len(same):
            continue
        inputs = [n.label.endswith(" (inputs)") for n in same]
        tails = ["/".join(p) for p in paths]  # (whole, where no shorter tail will do)
        for k in range(2, max(len(p) for p in paths) + 1):
            tails = ["/".join(p[-k:]) for p in paths]
            if len(set(tails)) == len(tails):
                break
        for n, tail, marked in zip(same, tails, inputs):
            n.label = f"{tail} (inputs)" if marked else tail


def _legend(nodes: list[Node]) -> list[str]:
    """The roles shown, strongest first (none when nothing is highlighted)."""
    present = {n.role for n in nodes}
    if present <= {"plain"}:
        return []
    return [r for r in _ORDER if r in present]


def to_dot(
    graph: Graph,
    highlight: Any = None,
    max_nodes: int = 150,
    depth: int | None = None,
    expand: bool = False,
) -> str:
    """Graphviz DOT text (see the module docstring)."""
    nodes, edges = layout_graph(graph, highlight, max_nodes, depth, expand)
    lines = [
        "digraph jaxsurgery {",
        '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
    ]
    # labels cut alike where two would read the same (a block index lost)
    width = min_width_apart([n.label for n in nodes], LABEL_WIDTH)
    for n in nodes:
        fill, stroke, dashed = STYLES[n.role]
        style = '"rounded,filled,dashed"' if dashed else '"rounded,filled"'
        label = f"{_dot_escape(clip_keys(n.label, width))}\\n{_dot_escape(n.detail)}"
        extra = ", penwidth=2, peripheries=2" if n.group else ""
        lines.append(
            f'  {n.key} [label="{label}", tooltip="{_dot_escape(n.title)}", '
            f'fillcolor="{fill}", color="{stroke}", style={style}{extra}];'
        )
    for a, b in edges:
        lines.append(f"  {a} -> {b};")
    legend = _legend(nodes)
    if legend:
        lines.append(
            '  subgraph cluster_legend { label="legend"; fontname="Helvetica"; fontsize=10;'
        )
        for r in legend:
            fill, stroke, dashed = STYLES[r]
            style = '"rounded,filled,dashed"' if dashed else '"rounded,filled"'
            lines.append(
                f'    legend_{r} [label="{ROLES[r]}", fillcolor="{fill}", color="{stroke}", '
                f"style={style}];"
            )
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class Drawing:
    """An SVG picture; shows itself in notebooks (``_repr_svg_``)."""

    def __init__(self, svg: str):
        self.svg = svg

    def __repr__(self) -> str:  # (a terminal, and a notebook's plain-text output)
        size = re.search(r'<svg[^>]* width="([\d.]+)(\w*)" height="([\d.]+)(\w*)"', self.svg)
        shown = f"{size[1]} x {size[3]} {size[2] or 'px'}, " if size else ""
        return (
            f"<Drawing: SVG, {shown}{len(self.svg) // 1024} KB; shows in a notebook; "
            ".save('f.svg') writes it>"
        )

    def _repr_svg_(self) -> str:
        return self.svg

    def save(self, path: str) -> None:
        """Write the SVG to ``path``, its arrowhead's id fixed (``arrow``: unique in a
        notebook page, it is random; a file of its own keeps one, the same every time)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(re.sub(r"jsarrow[0-9a-f]+-\d+", "arrow", self.svg))


def draw(
    graph: Graph,
    highlight: Any = None,
    max_nodes: int = 150,
    engine: str = "auto",
    depth: int | None = None,
    expand: bool = False,
) -> Drawing:
    """Render SVG with Graphviz (``engine="dot"``), the built-in layout, or the best present."""
    if engine not in ("auto", "dot", "builtin"):
        raise SelectionError(f"unknown engine {engine!r}: use 'auto', 'dot' or 'builtin'")
    with progress(f"drawing {len(graph.vars)} vars"):
        return _draw(graph, highlight, max_nodes, engine, depth, expand)


def _draw(
    graph: Graph, highlight: Any, max_nodes: int, engine: str, depth: int | None, expand: bool
) -> Drawing:
    dot = shutil.which("dot")
    if engine == "dot" and dot is None:
        raise FileNotFoundError("Graphviz's `dot` is not on the PATH; use engine='builtin'")
    if dot is not None and engine != "builtin":
        out = subprocess.run(
            [dot, "-Tsvg"],
            input=to_dot(graph, highlight, max_nodes, depth, expand),
            capture_output=True,
            text=True,
            check=True,
        )
        return Drawing(out.stdout[out.stdout.index("<svg") :])
    return Drawing(_builtin_svg(*layout_graph(graph, highlight, max_nodes, depth, expand)))


def _layers(nodes: list[Node], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layering; a source sits just above its first user."""
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(n.key for n in nodes)
    dag.add_edges_from(edges)
    layer: dict[str, int] = {}
    for key in nx.topological_sort(dag):
        layer[key] = max((layer[p] + 1 for p in dag.predecessors(key)), default=0)
    for key in dag:
        if dag.in_degree(key) == 0 and dag.out_degree(key) > 0:
            layer[key] = min(layer[s] for s in dag.successors(key)) - 1
    low = min(layer.values(), default=0)
    return {k: v - low for k, v in layer.items()}


def _order(rows: dict[int, list[Node]], edges: list[tuple[str, str]]) -> None:
    """Sort each row by the mean position of its neighbours (barycentres, both ways)."""
    preds: dict[str, list[str]] = {}
    succs: dict[str, list[str]] = {}
    for a, b in edges:
        preds.setdefault(b, []).append(a)
        succs.setdefault(a, []).append(b)
    depths = sorted(rows)
    for sweep in (depths, depths[::-1], depths):
        rank = {n.key: i for row in rows.values() for i, n in enumerate(row)}
        for depth in sweep:
            row = rows[depth]

            def centre(n: Node, rank: dict = rank) -> float:
                near = preds.get(n.key, []) + succs.get(n.key, [])
                return sum(rank[k] for k in near) / len(near) if near else rank[n.key]

            row.sort(key=centre)


def _builtin_svg(nodes: list[Node], edges: list[tuple[str, str]]) -> str:
    layer = _layers(nodes, edges)
    rows: dict[int, list[Node]] = {}
    for n in nodes:
        rows.setdefault(layer[n.key], []).append(n)
    _order(rows, edges)
    legend = _legend(nodes)
    # labels cut to at least 22 characters, more where that would make two read alike
    # (params['enc']…['kernel'] and params['dec']…['kernel']); boxes as wide as they need
    labels = [n.label for n in nodes]
    chars = min(min_width_apart(labels, 22), MAX_LABEL)
    # still alike at the cap (variables['batch_stats']…['mean'] for each block's), the
    # tails, where they tell more apart (…['ResNetBlock_1']['BatchNorm_0']['mean'])
    cut = min(
        (clip_keys, clip_left), key=lambda c: len(labels) - len({c(t, chars) for t in labels})
    )
    box_w, box_h, gap_x, gap_y, pad = max(150, round(chars * 6.8)), 38, 24, 34, 16
    top = pad + (22 if legend else 0)
    width = pad * 2 + max(len(r) for r in rows.values()) * (box_w + gap_x) - gap_x
    width = max(width, pad * 2 + 150 * len(legend))
    height = top + pad + (max(rows) + 1) * (box_h + gap_y) - gap_y
    pos: dict[str, tuple[float, float]] = {}
    for depth, row in rows.items():
        row_w = len(row) * (box_w + gap_x) - gap_x
        x0 = (width - row_w) / 2
        for k, n in enumerate(row):
            pos[n.key] = (x0 + k * (box_w + gap_x), top + depth * (box_h + gap_y))
    arrow = html_id("jsarrow")  # (one page holds every drawing of a notebook)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
        f'<defs><marker id="{arrow}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#9aa0a6"/></marker></defs>',
    ]
    for k, r in enumerate(legend):
        fill, stroke, dashed = STYLES[r]
        dash = ' stroke-dasharray="4,3"' if dashed else ""
        x = pad + 150 * k
        parts.append(
            f'<g class="legend"><rect x="{x}" y="{pad - 4}" width="14" height="14" rx="3" '
            f'fill="{fill}" stroke="{stroke}"{dash}/><text x="{x + 19}" y="{pad + 7}" '
            f'font-size="11" fill="#5f6368">{html.escape(ROLES[r])}</text></g>'
        )
    for a, b in edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        x1, y1, x2, y2 = xa + box_w / 2, ya + box_h, xb + box_w / 2, yb
        mid = (y1 + y2) / 2
        parts.append(
            f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}" '
            f'fill="none" stroke="#9aa0a6" marker-end="url(#{arrow})"/>'
        )
    for n in nodes:
        x, y = pos[n.key]
        fill, stroke, dashed = STYLES[n.role]
        dash = ' stroke-dasharray="4,3"' if dashed else ""
        width_px = 3 if n.group else 1.5
        text_color = "#bdc1c6" if n.role == "faded" else "#202124"
        parts.append(
            f"<g><title>{html.escape(n.title)}: {html.escape(n.detail)}</title>"
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{width_px}"{dash}/>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 16:.1f}" font-size="12" text-anchor="middle" '
            f'fill="{text_color}">{html.escape(cut(n.label, chars))}</text>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 30:.1f}" font-size="10" text-anchor="middle" '
            f'fill="{text_color}">{html.escape(clip_left(n.detail, 26))}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
