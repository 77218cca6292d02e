"""The group tree of a graph: which box each var goes in when a picture is collapsed.

A group is a **contiguous run of equations** (in program order) with a label:

* a *scope instance* (``Transformer/Block_0/Dense_0``, ``eqx.nn.LayerNorm#4``,
  Haiku's ``res_net50/block_group_0``): the runs :mod:`jaxsurgery._scopes` names;
* a *call* of the user's Python code or of a layer (``layer#3``, ``model/block#2``,
  ``Model/layers[1]``, ``model/body.sublayers[1]``): values named inside a call are
  qualified by it, and a call runs its equations one after another; the equations
  just before a call's first named value that carry no name of their own belong to it;
* a *jit call* the flat program inlined (``graph._program.regions``), when nothing
  better covers it;
* a *segment*: past :data:`MAX_CHILDREN` children (a 100k-equation chain, 1000 calls
  of one layer, the iterations of an unrolled loop), consecutive children are
  grouped, ``x#0 … x#2499``, so repeated calls and iterations fold into a few boxes.

Runs that nest make the tree; a run that crosses another is dropped (a call and a scope
that cover the same equations are one group, named by the call). Each var goes in the
deepest group holding its producing equation. Inputs that are leaves of a larger
argument (parameters, state) go in the group whose equations read them (the deepest
one holding every reader); an argument that is one array (``x``) stays an input box.

Because every group is a run of program order and every edge goes forward in it,
collapsing any set of groups gives an acyclic picture: the visible nodes cut program
order into runs. (:func:`acyclic` still checks it with networkx, and expands a group
on a cycle if ever there were one.)

The *depth* of a group is its distance from the root; ``depth=d`` shows groups at
depth ``d`` collapsed (everything above expanded). :func:`default_depth` is the first
level with several groups: a 6-block transformer shows ``Block_0`` … ``Block_5``.

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> from jaxsurgery._hierarchy import default_depth, expanded_to, hierarchy, visible
    >>> def f(x):
    ...     for k in range(3):
    ...         with jax.named_scope(f"layer_{k}"):
    ...             x = jnp.tanh(jnp.sin(x) * 2.0)
    ...     return x
    >>> g = js.trace(f, jnp.ones(2))
    >>> root = hierarchy(g)
    >>> [c.label for c in root.children], default_depth(root)
    (['layer_0', 'layer_1', 'layer_2'], 1)
    >>> sorted(set(visible(root, expanded_to(root, 1)).values()))
    ['g1', 'g2', 'g3', 'v0']
"""

from __future__ import annotations

import collections
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ._names import is_generated

if TYPE_CHECKING:
    from ._graph import Graph

#: A group with more children than this has them folded into segments.
MAX_CHILDREN = 40
#: Priority of a kind of run when two cover the same equations (lower wins).
_PRIORITY = {"call": 0, "scope": 1, "jit": 2}


@dataclass(eq=False)
class Group:
    """A box of the picture: a run of equations, its subgroups and its own vars.

    Attributes:
        key: unique id in its tree (``"g3"``; the root is ``"g0"``).
        label: short label (the last component: ``Block_0``, ``layer#3``).
        path: the full path (``Transformer/Block_0``); a segment's is its parent's.
        kind: ``"root"``, ``"scope"``, ``"call"``, ``"jit"``, ``"segment"`` or ``"inputs"``.
        children: subgroups, in program order.
        vars: indices of the vars directly in this group (not in a subgroup).
        start / end: first and last equation of the run (-1 for inputs only).
        also: other names of the same run (the scope a call made, say).
        depth: distance from the root.
    """

    key: str
    label: str
    path: str
    kind: str
    start: int
    end: int
    children: list[Group] = field(default_factory=list)
    vars: list[int] = field(default_factory=list)
    also: list[str] = field(default_factory=list)
    depth: int = 0
    size: int = 0

    def walk(self) -> Iterator[Group]:
        """This group and every group below it, parents first."""
        yield self
        for c in self.children:
            yield from c.walk()

    def all_vars(self) -> Iterator[int]:
        """Every var inside (in subgroups too)."""
        yield from self.vars
        for c in self.children:
            yield from c.all_vars()

    def __repr__(self) -> str:
        return f"Group({self.key} {self.path or '<root>'!r}, {self.kind}, {self.size} vars)"


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hierarchy(graph: Graph) -> Group:
    """The group tree of ``graph`` (built once per graph)."""
    root = _cache.get(graph)
    if root is None:
        root = _cache[graph] = _Builder(graph).build()
    return root


def default_depth(root: Group) -> int:
    """The first depth with several groups (1 when the root holds no group)."""
    node, depth = root, 1
    while True:
        inner = [c for c in node.children if c.kind != "inputs"]
        if len(inner) != 1 or not inner[0].children:
            return depth
        node, depth = inner[0], depth + 1


def expanded_to(root: Group, depth: int) -> set[str]:
    """Keys of the groups above ``depth`` (shown open); a group of unread inputs stays
    closed (open it by name: it is a list of leaves)."""
    return {g.key for g in root.walk() if g.depth < depth and g.kind != "inputs"}


def visible(root: Group, expanded: set[str]) -> dict[int, str]:
    """Per var, the node it shows as: ``"v<index>"`` or the key of its box.

    The root is always open; a group not in ``expanded`` is one box.
    """
    out: dict[int, str] = {}

    def place(group: Group) -> None:
        if group.depth > 0 and group.key not in expanded:
            for i in group.all_vars():
                out[i] = group.key
            return
        for i in group.vars:
            out[i] = f"v{i}"
        for c in group.children:
            place(c)

    place(root)
    return out


def touching(root: Group, vars_: set[int]) -> set[str]:
    """Keys of the groups holding any of ``vars_`` (what to open to show them)."""
    return {g.key for g in root.walk() if not vars_.isdisjoint(g.all_vars())}


def acyclic(
    root: Group, expanded: set[str], edges: list[tuple[int, int]]
) -> tuple[set[str], dict[int, str]]:
    """``expanded`` opened further until the collapsed picture has no cycle.

    The tree's groups are runs of program order, so this returns at once; it is the
    check that says so (and the repair, should a group ever not be a run).
    """
    import networkx as nx

    expanded = set(expanded)
    while True:
        nodes = visible(root, expanded)
        dag = nx.DiGraph((nodes[a], nodes[b]) for a, b in edges if nodes[a] != nodes[b])
        try:
            cycle = nx.find_cycle(dag)
        except nx.NetworkXNoCycle:
            return expanded, nodes
        groups = {n for edge in cycle for n in edge[:2] if n.startswith("g")}
        if not groups:  # a cycle of single vars cannot be: the program is a DAG
            raise AssertionError(f"the graph itself has a cycle: {cycle}")
        expanded |= groups


def split_path(name: str) -> list[str]:
    """Components of a name at ``/`` outside brackets and quotes.

    Example:
        >>> split_path("params['res_net50/~/conv']/x")
        ["params['res_net50/~/conv']", 'x']
    """
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(name):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "/" and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    parts.append(name[start:])
    return [p for p in parts if p]


def clip_keys(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters in its middle, between whole keys and path
    parts, the last and the first first (``params['block_0']…['bias']``: the index that
    tells siblings apart is near the head, the leaf at the tail); :func:`clip_left`
    when there are not three parts to cut between.

    Example:
        >>> clip_keys("params['block_2']['attention']['query']['bias']", 26)
        "params['block_2']…['bias']"
    """
    if len(text) <= width:
        return text
    if " … " in text:  # a segment's label: both ends, each cut
        head, tail = text.split(" … ", 1)
        half = (width - 3) // 2
        return f"{clip_keys(head, half)} … {clip_keys(tail, width - 3 - half)}"
    parts = _KEYS.findall(text)
    if len(parts) < 3 or "".join(parts) != text or len(parts[0]) + len(parts[-1]) >= width:
        return clip_left(text, width)
    head, tail = 1, len(parts) - 1  # parts[:head] and parts[tail:] are kept
    room = width - 1 - len(parts[0]) - len(parts[-1])
    grow_tail = False
    while head < tail:
        k = tail - 1 if grow_tail else head
        if len(parts[k]) > room:
            break
        room -= len(parts[k])
        tail, head = (tail - 1, head) if grow_tail else (tail, head + 1)
        grow_tail = not grow_tail
    if head == 1 and tail == len(parts) - 1:  # nothing between fits: the tail says more
        return clip_left(text, width)
    return "".join(parts[:head]) + "…" + "".join(parts[tail:])


#: the parts of a name: a head, pytree keys (``['w']``, ``[0]``, ``.attr``), ``/part``
_KEYS = re.compile(r"\[(?:'[^']*'|\"[^\"]*\"|[^\]]*)\]|\.[^./\[]+|/[^/\[]+|^[^./\[]+")


def min_width_apart(
    texts: Sequence[str],
    width: int,
    cut: Callable[[str, int], str] = clip_keys,
    key: Callable[[str], str] = lambda text: text,
) -> int:
    """The least width from ``width`` up at which texts that differ (by ``key``) stay
    apart once ``cut`` (``params['block_0']…['bias']`` and ``…['block_1']…`` alike
    would need more than that): at most the longest text, which nothing cuts.

    Example:
        >>> names = ["params['block_0']['attn']['query']['b']", "params['block_0']['mlp']['query']['b']"]
        >>> [clip_keys(n, 26) for n in names]  # alike
        ["params['block_0']…['b']", "params['block_0']…['b']"]
        >>> width = min_width_apart(names, 26)
        >>> [clip_keys(n, width) for n in names]  # apart
        ["params['block_0']…['query']['b']", "params['block_0']['mlp']['query']['b']"]
    """
    longest = max((len(t) for t in texts), default=width)
    while width < longest:
        seen: dict[str, str] = {}
        if all(seen.setdefault(cut(t, width), key(t)) == key(t) for t in texts):
            break
        width = min(width + 4, longest)
    return width


def clip_left(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters from the left (``…ock_3/Dense_0``): the
    tail of a path says more than its head.

    Example:
        >>> clip_left("Transformer/Block_3/Dense_0", 12)
        '…k_3/Dense_0'
    """
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


# -- building -------------------------------------------------------------------------------
@dataclass
class _Run:
    path: str
    kind: str
    start: int
    end: int
    also: list[str] = field(default_factory=list)


class _Builder:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.program = graph._program
        self.names = graph._names
        self.n = len(self.program.vars)
        self.keys = 0

    def build(self) -> Group:
        producer = self.program.producer
        scopes = self._scopes()
        runs = scopes + self._calls({r.path for r in scopes}) + self._jits()
        root = self._tree(runs)
        owner = self._owners(root)
        for i in range(self.n):
            e = producer[i]
            if e >= 0:
                owner[e].vars.append(i)
        self._place_inputs(root, owner)
        root = self._tidy(root)
        self._number(root, 0, [0])
        return root

    def _new(self, label: str, path: str, kind: str, start: int, end: int) -> Group:
        return Group(f"g{self.keys}", label, path, kind, start, end)

    # the runs
    def _scopes(self) -> list[_Run]:
        """Scope instances, from the ``X/%i`` names every var made inside ``X`` has."""
        spans: dict[str, list[int]] = {}
        producer = self.program.producer
        for i in range(self.n):
            e = producer[i]
            if e < 0:
                continue
            tail = f"/%{self.names.number(i)}"
            for a in self.names.aliases[i]:
                if a.endswith(tail):
                    span = spans.setdefault(a[: -len(tail)], [e, e])
                    span[0], span[1] = min(span[0], e), max(span[1], e)
        return [_Run(p, "scope", s, t) for p, (s, t) in spans.items()]

    def _calls(self, scopes: set[str]) -> list[_Run]:
        """Calls, from names qualified by them (``layer#1/h``) and what they return."""
        producer, canonical, aliases = (
            self.program.producer,
            self.names.canonical,
            self.names.aliases,
        )
        known: set[str] = set()  # call paths: proper prefixes of names
        for i in range(self.n):
            for name in (canonical[i], *aliases[i]):
                if "/" in name and not is_generated(name):
                    parts = split_path(name)
                    for k in range(1, len(parts)):
                        known.add("/".join(parts[:k]))
        known -= scopes
        spans: dict[str, list[int]] = {}

        def note(path: str, e: int) -> None:
            span = spans.setdefault(path, [e, e])
            span[0], span[1] = min(span[0], e), max(span[1], e)

        for i in range(self.n):
            e = producer[i]
            if e < 0:
                continue
            name = canonical[i]
            if not is_generated(name) and name not in scopes:
                parts = split_path(name)
                for k in range(1, len(parts) + 1):
                    prefix = "/".join(parts[:k])
                    if prefix in scopes:
                        break
                    if len(parts) > 1 or prefix in known:  # a call and what it returned
                        note(prefix, e)
            for a in aliases[i]:
                if a in known:  # what a call returned
                    note(a, e)
        generated = self._unnamed_eqns(scopes)
        runs = []
        for path, (s, t) in spans.items():
            while s > 0 and generated[s - 1]:
                s -= 1  # the unnamed work a call did before its first named value
            runs.append(_Run(path, "call", s, t))
        return runs

    def _unnamed_eqns(self, scopes: set[str]) -> np.ndarray:
        """Per equation: whether its outputs have no name but made-up or scope ones."""
        canonical = self.names.canonical
        out = np.ones(len(self.program.eqn_out), dtype=bool)
        for e, outs in enumerate(self.program.eqn_out):
            out[e] = all(is_generated(canonical[o]) or canonical[o] in scopes for o in outs)
        return out

    def _jits(self) -> list[_Run]:
        return [
            _Run(r.name, "jit", r.start, r.end - 1)
            for r in self.program.regions
            if r.end - r.start >= 2
        ]

    def _tree(self, runs: list[_Run]) -> Group:
        """Nest the runs; a run crossing one already placed is dropped, one equal to it merged."""
        neqns = len(self.program.eqn_out)
        root = self._new("", "", "root", 0, neqns - 1)
        self.keys += 1
        runs.sort(key=lambda r: (r.start, -r.end, _PRIORITY[r.kind], r.path.count("/")))
        stack: list[Group] = [root]
        for run in runs:
            while stack[-1] is not root and stack[-1].end < run.start:
                stack.pop()
            top = stack[-1]
            if run.end > top.end:
                continue  # crosses `top`
            if (run.start, run.end) == (top.start, top.end) and top is not root:
                top.also.append(run.path)
                continue
            parent_path = top.path
            parts = split_path(run.path)
            if parent_path and run.path.startswith(parent_path + "/"):
                label = "/".join(split_path(run.path[len(parent_path) + 1 :]))
            else:
                label = parts[-1] if parts else run.path
            group = self._new(label, run.path, run.kind, run.start, run.end)
            self.keys += 1
            top.children.append(group)
            stack.append(group)
        return root

    def _owners(self, root: Group) -> list[Group]:
        owner = [root] * len(self.program.eqn_out)
        for g in root.walk():
            if g is not root:
                owner[g.start : g.end + 1] = [g] * (g.end - g.start + 1)
        return owner

    def _place_inputs(self, root: Group, owner: list[Group]) -> None:
        """Leaves of a larger argument go where they are read; whole arguments stay."""
        program, names = self.program, self.names
        leaves = range(program.num_inputs + program.num_consts)
        # by argument paths: an alias a binding gives an input (``pair[0]`` of ``pair =
        # (x, y)``) is no argument of the function, nor a label a library gives it
        paths = names.arguments or names.canonical
        arguments = [_argument(paths[i] if i < len(paths) else names.canonical[i]) for i in leaves]
        count = collections.Counter(arguments)
        parent: dict[int, Group | None] = {id(root): None}
        for g in root.walk():
            for c in g.children:
                parent[id(c)] = g
        users = program.users
        unread: dict[str, list[int]] = {}  # per argument: its leaves no group reads
        for i in leaves:
            readers = users[i]
            if i < program.num_inputs and count[arguments[i]] == 1:
                root.vars.append(i)  # a whole argument: an input box of its own
            elif not readers:
                unread.setdefault(_argument(names.canonical[i]), []).append(i)
            else:
                home = owner[readers[0]]
                for e in readers[1:]:
                    home = _common(home, owner[e], parent)
                home.vars.append(i)
        for key, members in unread.items():
            if len(members) == 1:
                root.vars.extend(members)
                continue
            group = self._new(key, key, "inputs", -1, -1)
            self.keys += 1
            group.vars = members
            root.children.append(group)

    def _tidy(self, group: Group) -> Group:
        """Fold long child lists into segments, merge single-child chains, dissolve
        one-var groups; children and vars in program order."""
        producer = self.program.producer
        children = [self._tidy(c) for c in group.children]
        group.children = []
        items: list[Group | int] = []
        for c in children:
            if c.kind != "segment" and not c.children and len(c.vars) == 1:
                items.append(c.vars[0])  # a box of one var is the var
            elif not c.children and not c.vars:
                continue
            else:
                items.append(c)
        items.extend(group.vars)
        items.sort(key=lambda it: (producer[it], it) if isinstance(it, int) else (it.start, -1))
        items = self._segments(items, group.path)
        group.children = [it for it in items if isinstance(it, Group)]
        group.vars = [it for it in items if isinstance(it, int)]
        if group.kind != "root" and not group.vars and len(group.children) == 1:
            (child,) = group.children
            if child.kind != "segment":
                child.also.append(group.path)
                child.label = f"{group.label}/{child.label}"
                child.kind = group.kind if group.kind == "call" else child.kind
                return child
        return group

    def _segments(self, items: list[Group | int], path: str) -> list[Group | int]:
        """At most MAX_CHILDREN items: runs of consecutive ones folded into segments
        (themselves of at most MAX_CHILDREN items). Scopes and calls stay boxes of
        their own where they leave room: the runs of loose values between them are
        folded (an optimizer's updates around a model, which stays ``MLP``)."""
        if len(items) <= MAX_CHILDREN:
            return items
        runs: list[list[Group | int]] = []
        for it in items:
            if isinstance(it, int) and runs and isinstance(runs[-1][-1], int):
                runs[-1].append(it)
            else:
                runs.append([it])
        if 1 < len(runs) <= MAX_CHILDREN:  # (groups among them: else it folds nothing)
            return [run[0] if len(run) == 1 else self._segment(run, path) for run in runs]
        # (three at least: a segment of two is hardly fewer boxes, and a label as long)
        per = max(-(-len(items) // MAX_CHILDREN), 3)
        chunks = [items[k : k + per] for k in range(0, len(items), per)]
        return [chunk[0] if len(chunk) == 1 else self._segment(chunk, path) for chunk in chunks]

    def _segment(self, chunk: list[Group | int], path: str) -> Group:
        """A segment holding ``chunk`` (consecutive items), its own split as needed."""
        producer = self.program.producer
        first, last = chunk[0], chunk[-1]
        start = producer[first] if isinstance(first, int) else first.start
        end = producer[last] if isinstance(last, int) else last.end
        head = self._named(chunk)
        tail = self._named(chunk[::-1], other_than=head) or self._item_label(last)
        if tail == head:  # calls of one function (diffrax's prevbefore): read apart by
            # where they end, else every segment of them read "prevbefore …"
            tail = self.names.canonical[self._last_var(last)]
        label = f"{head} … {tail}" if tail != head else f"{head} …"
        seg = self._new(label, path, "segment", start, end)
        self.keys += 1
        inner = self._segments(chunk, path)
        seg.children = [it for it in inner if isinstance(it, Group)]
        seg.vars = [it for it in inner if isinstance(it, int)]
        return seg

    def _named(self, items: list[Group | int], other_than: str | None = None) -> str:
        """The label of the first item with a name of its own (else the first's);
        ``other_than``: of the first such item labelled otherwise (else '')."""
        labels = (self._item_label(it) for it in items)
        if other_than is not None:
            return next((b for b in labels if not is_generated(b) and b != other_than), "")
        first = self._item_label(items[0])
        return next((lab for lab in labels if not is_generated(lab)), first)

    def _last_var(self, item: Group | int) -> int:
        """The var an item makes last (by the equation making it)."""
        if isinstance(item, int):
            return item
        producer = self.program.producer
        inner = [*item.vars, *(self._last_var(c) for c in item.children)]
        return max(inner, key=lambda v: (producer[v], v))

    def _item_label(self, item: Group | int) -> str:
        if isinstance(item, Group):
            return item.label.split(" … ")[0] if item.kind == "segment" else item.label
        return self.names.canonical[item]

    def _number(self, group: Group, depth: int, counter: list[int]) -> int:
        """Keys in walk order (``g0`` the root), depths and sizes; returns the size."""
        group.key, counter[0] = f"g{counter[0]}", counter[0] + 1
        group.depth = depth
        inside = sum(self._number(c, depth + 1, counter) for c in group.children)
        group.size = len(group.vars) + inside
        return group.size


def _argument(name: str) -> str:
    """The argument a leaf's name belongs to: ``params`` of ``params['w']``,
    ``args[0]`` of ``args[0]['w']``."""
    cut = min((k for k in (name.find("["), name.find(".")) if k >= 0), default=len(name))
    head = name[:cut]
    if head in ("args", "kwargs") and cut < len(name) and name[cut] == "[":
        close = name.find("]", cut)
        return name[: close + 1]
    return head


def _common(a: Group, b: Group, parent: dict[int, Group | None]) -> Group:
    """The deepest group holding both."""
    seen = set()
    node: Group | None = a
    while node is not None:
        seen.add(id(node))
        node = parent[id(node)]
    node = b
    while id(node) not in seen:
        node = parent[id(node)]
        assert node is not None
    return node
