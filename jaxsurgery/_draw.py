"""Pictures of a graph or a slice: Graphviz DOT text, and SVG for notebooks.

``g.to_dot(highlight=s)`` writes DOT; ``g.draw(highlight=s)`` renders SVG, with
Graphviz's ``dot`` program when it is on the PATH (the best layout) and otherwise with a
small built-in layered layout, so pictures work on a bare ``pip install`` (Graphviz is
a system program that pip cannot install). Highlighting a slice colours its inputs
(green), outputs (orange), window (blue) and context (grey, dashed); other vars fade.

Graphs with more than ``max_nodes`` vars are collapsed: the vars of each top-level
scope or call (``MLP``, ``layer#3``) become one box, so a 10k-var model draws as its
blocks.

Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     z1 = jnp.tanh(x)
    ...     z2 = jnp.sin(z1)
    ...     return z2
    >>> g = js.trace(f, jnp.ones(3))
    >>> print(g.to_dot(highlight=g.slice("z1", "z2")).splitlines()[0])
    digraph jaxsurgery {
    >>> g.draw().svg.startswith("<svg")
    True
"""

from __future__ import annotations

import html
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _compat as C
from ._table import clip

if TYPE_CHECKING:
    from ._graph import Graph
    from ._slice import Slice

STYLES = {  # role -> (fill, stroke, dashed)
    "input": ("#d7f5dd", "#1e8e3e", False),
    "output": ("#fde2c8", "#e8710a", False),
    "window": ("#d2e3fc", "#1a73e8", False),
    "context": ("#f1f3f4", "#80868b", True),
    "plain": ("#ffffff", "#bdc1c6", False),
    "faded": ("#ffffff", "#e0e0e0", False),
}


@dataclass
class Node:
    key: str
    label: str
    detail: str
    role: str


def _roles(graph: Graph, highlight: Slice | None) -> dict[int, str]:
    if highlight is None:
        return {}
    roles: dict[int, str] = {}
    for v in highlight.window_vars:
        roles[v.index] = "window"
    for v in highlight.context_vars:
        roles[v.index] = "context"
    for v in highlight.in_vars:
        roles[v.index] = "input"
    for v in highlight.out_vars:
        roles[v.index] = "output"
    return roles


def _groups(graph: Graph) -> dict[int, str]:
    """Per var, the box it goes in when collapsed: its outermost call, top scope, or itself."""
    program = graph._program
    call_of: dict[int, str] = {}  # equation -> label of its outermost call
    end = -1
    for region in program.regions:
        if region.start < end:
            continue  # nested in the call already labelled
        end = region.end
        outs = [program.index[a] for a in region.outs if isinstance(a, C.Var)]
        label = graph.vars[outs[0]].name if outs else region.name
        for e in range(region.start, region.end):
            call_of[e] = label
    groups = {}
    for v in graph.vars:
        e = program.producer[v.index]
        if e in call_of:
            groups[v.index] = call_of[e]
        elif v.scope:
            groups[v.index] = v.scope.split("/")[0]
        else:
            head, sep, _ = v.name.partition("/")
            groups[v.index] = head if sep else v.name
    return groups


def layout_graph(
    graph: Graph, highlight: Slice | None = None, max_nodes: int = 150
) -> tuple[list[Node], list[tuple[str, str]]]:
    """Nodes and edges to draw (collapsed by scope past ``max_nodes`` vars)."""
    roles = _roles(graph, highlight)
    program = graph._program
    collapse = len(graph.vars) > max_nodes
    groups = _groups(graph) if collapse else {}
    group_key: dict[str, str] = {}
    key_of: dict[int, str] = {}
    nodes: dict[str, Node] = {}
    order = ["input", "output", "window", "context", "plain", "faded"]
    for v in graph.vars:
        role = roles.get(v.index, "faded" if highlight is not None else "plain")
        if collapse:
            key = group_key.setdefault(groups[v.index], f"g{len(group_key)}")
            node = nodes.get(key)
            if node is None:
                nodes[key] = Node(key, groups[v.index], "1 var", role)
            else:
                count = int(node.detail.split()[0]) + 1
                node.detail = f"{count} vars"
                if order.index(role) < order.index(node.role):
                    node.role = role
        else:
            key = f"v{v.index}"
            from ._graph import short_type

            nodes[key] = Node(key, v.name, f"{short_type(v.aval)} {v.primitive}", role)
        key_of[v.index] = key
    edges = []
    seen = set()
    for ins, outs in zip(program.eqn_in, program.eqn_out):
        for i in ins:
            for o in outs:
                edge = (key_of[i], key_of[o])
                if edge[0] != edge[1] and edge not in seen:
                    seen.add(edge)
                    edges.append(edge)
    return list(nodes.values()), edges


def to_dot(graph: Graph, highlight: Slice | None = None, max_nodes: int = 150) -> str:
    nodes, edges = layout_graph(graph, highlight, max_nodes)
    lines = [
        "digraph jaxsurgery {",
        '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
    ]
    for n in nodes:
        fill, stroke, dashed = STYLES[n.role]
        style = '"rounded,filled,dashed"' if dashed else '"rounded,filled"'
        label = _dot_escape(f"{n.label}\\n{n.detail}")
        lines.append(
            f'  {n.key} [label="{label}", fillcolor="{fill}", color="{stroke}", style={style}];'
        )
    for a, b in edges:
        lines.append(f"  {a} -> {b};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace('"', '\\"')


class Drawing:
    """An SVG picture; shows itself in notebooks (``_repr_svg_``)."""

    def __init__(self, svg: str):
        self.svg = svg

    def _repr_svg_(self) -> str:
        return self.svg

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.svg)


def draw(
    graph: Graph,
    highlight: Slice | None = None,
    max_nodes: int = 150,
    engine: str = "auto",
) -> Drawing:
    """Render SVG with Graphviz (``engine="dot"``), the built-in layout, or the best present."""
    if engine not in ("auto", "dot", "builtin"):
        raise ValueError(f"unknown engine {engine!r}; use 'auto', 'dot' or 'builtin'")
    dot = shutil.which("dot")
    if engine == "dot" and dot is None:
        raise FileNotFoundError("Graphviz's `dot` is not on the PATH; use engine='builtin'")
    if dot is not None and engine != "builtin":
        out = subprocess.run(
            [dot, "-Tsvg"],
            input=to_dot(graph, highlight, max_nodes),
            capture_output=True,
            text=True,
            check=True,
        )
        return Drawing(out.stdout[out.stdout.index("<svg") :])
    return Drawing(_builtin_svg(*layout_graph(graph, highlight, max_nodes)))


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
    box_w, box_h, gap_x, gap_y, pad = 150, 38, 24, 34, 16
    width = pad * 2 + max(len(r) for r in rows.values()) * (box_w + gap_x) - gap_x
    height = pad * 2 + (max(rows) + 1) * (box_h + gap_y) - gap_y
    pos: dict[str, tuple[float, float]] = {}
    for depth, row in rows.items():
        row_w = len(row) * (box_w + gap_x) - gap_x
        x0 = (width - row_w) / 2
        for k, n in enumerate(row):
            pos[n.key] = (x0 + k * (box_w + gap_x), pad + depth * (box_h + gap_y))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#9aa0a6"/></marker></defs>',
    ]
    for a, b in edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        x1, y1, x2, y2 = xa + box_w / 2, ya + box_h, xb + box_w / 2, yb
        mid = (y1 + y2) / 2
        parts.append(
            f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}" '
            'fill="none" stroke="#9aa0a6" stroke-width="1" marker-end="url(#arrow)"/>'
        )
    for n in nodes:
        x, y = pos[n.key]
        fill, stroke, dashed = STYLES[n.role]
        dash = ' stroke-dasharray="4,3"' if dashed else ""
        text_color = "#bdc1c6" if n.role == "faded" else "#202124"
        parts.append(
            f"<g><title>{html.escape(n.label)}: {html.escape(n.detail)}</title>"
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 16:.1f}" font-size="12" text-anchor="middle" '
            f'fill="{text_color}">{html.escape(clip(n.label, 22))}</text>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 30:.1f}" font-size="10" text-anchor="middle" '
            f'fill="{text_color}">{html.escape(clip(n.detail, 26))}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
