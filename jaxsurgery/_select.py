"""Selection: from selectors (index, name, glob, regex, Var, filters) to vars.

A selector is an ``int`` (negative counts from the end), a ``str`` (an exact name
first; only when nothing has that exact name and it contains ``*``, ``?`` or ``[``,
a glob over every name and alias), a compiled ``re.Pattern`` (``fullmatch`` against
every name and alias), a :class:`Var`, a :class:`Selection`, or a list/tuple/dict of
these. Where one var is needed (``g[...]``, a leaf of a slice's inputs), an exact
name matching several vars is an error; a glob, regex or Selection leaf stands for
the tuple of everything it matched.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jax

from ._errors import SelectionError, SliceError, did_you_mean, short_list
from ._names import is_generated

if TYPE_CHECKING:
    from ._graph import Graph, Var

_GLOB_CHARS = frozenset("*?[")


class Selection(tuple):
    """An immutable, ordered tuple of :class:`Var` with helpers that fail loudly.

    Example:
        >>> import jax.numpy as jnp, jaxsurgery as js
        >>> def f(x):
        ...     a = jnp.sin(x)
        ...     b = jnp.cos(a)
        ...     return a * b
        >>> g = js.trace(f, jnp.ones(2))
        >>> sel = g.select(primitive=("sin", "cos"))
        >>> sel.names
        ('a', 'b')
        >>> sel.where(lambda v: v.primitive == "cos").one().name
        'b'
    """

    __slots__ = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self)

    def one(self) -> Var:
        """The single var; a SelectionError unless exactly one matched."""
        if len(self) != 1:
            raise SelectionError(
                f"expected exactly one var, but the selection has {len(self)}"
                f"{': ' + short_list(self.names) if self else ''}; use .one() only when "
                "exactly one matched (narrow it with .where(...) or a more precise name)"
            )
        return self[0]

    def where(self, predicate: Callable[[Var], bool]) -> Selection:
        """The vars for which ``predicate(var)`` is true."""
        return Selection(v for v in self if predicate(v))

    def assert_count_is(self, n: int) -> Selection:
        """Self, after checking it holds ``n`` vars."""
        if len(self) != n:
            raise SelectionError(
                f"expected {n} vars, the selection has {len(self)}: {short_list(self.names)}"
            )
        return self

    def __repr__(self) -> str:
        from ._table import var_table

        return var_table(list(self), title=f"Selection of {len(self)} vars")

    def _repr_html_(self) -> str:
        from ._table import var_table_html

        return var_table_html(list(self), f"Selection of {len(self)} vars")


def one(graph: Graph, selector: Any) -> Var:
    """The one var ``selector`` names, or a SelectionError saying why not."""
    from ._graph import Var

    if isinstance(selector, Var):
        return _own(graph, selector)
    if isinstance(selector, Selection):
        return selector.one() if not selector else _own(graph, selector.one())
    if isinstance(selector, int) and not isinstance(selector, bool):
        n = len(graph.vars)
        if not -n <= selector < n:
            raise SelectionError(
                f"index {selector} is out of range: the graph has {n} vars "
                f"(0..{n - 1}, or -{n}..-1 from the end)"
            )
        return graph.vars[selector]
    if isinstance(selector, str):
        names = graph._names
        if selector in names.by_canonical:
            return graph.vars[names.by_canonical[selector]]
        hits = names.lookup.get(selector)
        if hits is None:
            hits = _fallback(graph, selector)
        if hits is None and _GLOB_CHARS & set(selector):
            hits = _glob(graph, selector)
        return _exactly_one(graph, repr(selector), hits, selector)
    if isinstance(selector, re.Pattern):
        return _exactly_one(
            graph, f"re.compile({selector.pattern!r})", _regex(graph, selector), None
        )
    raise SelectionError(
        f"{selector!r} is not a selector of one var: use an int, a name, a glob, a "
        "re.Pattern or a Var (g.select(...) takes several)"
    )


def select(
    graph: Graph,
    selectors: Sequence[Any],
    *,
    primitive: str | Iterable[str] | None = None,
    scope: str | None = None,
    where: Callable[[Var], bool] | None = None,
) -> Selection:
    """Vars matching any selector (every var if there are none), then every filter."""
    if selectors:
        found: set[int] = set()
        for sel in selectors:
            found.update(_many(graph, sel))
        vars_ = [graph.vars[i] for i in sorted(found)]
    else:
        vars_ = list(graph.vars)
    if primitive is not None:
        wanted = {primitive} if isinstance(primitive, str) else set(primitive)
        vars_ = [v for v in vars_ if v.primitive in wanted]
    if scope is not None:
        scope = scope.strip("/")
        vars_ = [v for v in vars_ if v.scope == scope or v.scope.startswith(scope + "/")]
    if where is not None:
        vars_ = [v for v in vars_ if where(v)]
    return Selection(vars_)


def tree(graph: Graph, selector: Any) -> tuple[Any, list[Var]]:
    """Resolve a pytree of selectors: ``(treedef, flat vars)``.

    A leaf that is a glob, regex or Selection stands for a tuple of the vars it matched.
    """
    resolved = _resolve_tree(graph, selector)
    flat, treedef = jax.tree_util.tree_flatten(resolved)
    return treedef, flat


def unflatten(treedef: Any, values: Sequence[Any]) -> Any:
    return jax.tree_util.tree_unflatten(treedef, list(values))


def _resolve_tree(graph: Graph, selector: Any) -> Any:
    if isinstance(selector, Selection):
        return tuple(_own(graph, v) for v in selector)
    if isinstance(selector, dict):
        return {k: _resolve_tree(graph, v) for k, v in selector.items()}
    if isinstance(selector, (list, tuple)):
        return type(selector)(_resolve_tree(graph, s) for s in selector)
    if isinstance(selector, re.Pattern) or (
        isinstance(selector, str)
        and selector not in graph._names.lookup
        and _GLOB_CHARS & set(selector)
        and graph._names.parse_fallback(selector) is None
    ):
        return tuple(graph.vars[i] for i in sorted(_many(graph, selector)))
    return one(graph, selector)


def _many(graph: Graph, selector: Any) -> list[int]:
    """Indices of every var a selector matches; a SelectionError if none."""
    from ._graph import Var

    if isinstance(selector, (Var, int)) and not isinstance(selector, bool):
        return [one(graph, selector).index]
    if isinstance(selector, str):
        hits = graph._names.lookup.get(selector)
        if hits is None:
            hits = _fallback(graph, selector)
        if hits is None and _GLOB_CHARS & set(selector):
            hits = _glob(graph, selector)
        if not hits:
            raise _no_match(graph, repr(selector), selector)
        return hits
    if isinstance(selector, re.Pattern):
        hits = _regex(graph, selector)
        if not hits:
            raise _no_match(graph, f"re.compile({selector.pattern!r})", None)
        return hits
    if isinstance(selector, (Selection, list, tuple)):
        return [i for s in selector for i in _many(graph, s)]
    raise SelectionError(
        f"{selector!r} is not a selector: use an int, a name, a glob, a re.Pattern, a "
        "Var, a Selection, or a list of these"
    )


def _own(graph: Graph, var: Var) -> Var:
    if var.graph is not graph:
        raise SelectionError(
            f"{var!r} belongs to another graph; select it from this graph by name: g[{var.name!r}]"
        )
    return var


def _glob(graph: Graph, pattern: str) -> list[int]:
    return _regex(graph, re.compile(fnmatch.translate(pattern)))


def _regex(graph: Graph, pattern: re.Pattern) -> list[int]:
    names = graph._names
    hits: set[int] = set()
    for name, idxs in names.lookup.items():
        if pattern.fullmatch(name):
            hits.update(idxs)
    for i in range(len(names.canonical)):
        if any(pattern.fullmatch(n) for n in names.fallbacks(i)):
            hits.add(i)
    return sorted(hits)


def _fallback(graph: Graph, name: str) -> list[int] | None:
    i = graph._names.parse_fallback(name)
    return None if i is None else [i]


def _exactly_one(graph: Graph, label: str, hits: list[int] | None, word: str | None) -> Var:
    if not hits:
        raise _no_match(graph, label, word)
    if len(set(hits)) > 1:
        names = [graph.vars[i].name for i in sorted(set(hits))]
        raise SelectionError(f"{label} is ambiguous: it matches {short_list(names)}; pick one")
    return graph.vars[hits[0]]


def _no_match(graph: Graph, label: str, word: str | None) -> SelectionError:
    if word is not None and "@" in word and graph._program.opaque_loops:
        raise SliceError(
            f"{label} names a value inside a loop iteration, but the graph's while_loop "
            "could not be unrolled: its trip count depends on values and the graph was "
            "traced with abstract arguments (jax.ShapeDtypeStruct); trace with concrete "
            "arrays, or use lax.fori_loop/lax.scan with a static trip count"
        )
    if word is not None and "@" not in word:
        iterations = sorted(
            (
                n
                for n in graph._names.lookup
                if n.startswith(word + "@") and n[len(word) + 1 :].isdigit()
            ),
            key=lambda n: int(n[len(word) + 1 :]),
        )
        if iterations:
            return SelectionError(
                f"{label} is inside a loop: add the iteration, {iterations[0]!r} .. "
                f"{iterations[-1]!r}, or {word + '@*'!r} for all"
            )
    hint = ""
    if word is not None:
        fallback = word.startswith("%") or ":" in word  # only suggest %i names for %i words
        names = graph._names
        candidates = (
            names.all_names() if fallback else [n for n in names.lookup if not is_generated(n)]
        )
        hint = did_you_mean(word, candidates)
    return SelectionError(f"no var named {label}{hint} (g.names() lists all)")
