"""Selection: from selectors (index, name, glob, regex, Var, filters) to vars.

A selector is an ``int`` (negative counts from the end), a ``str`` (an exact name
first; only when nothing has that exact name and it has a wildcard, a glob over
every name and alias; a name or glob that matches nothing as written matches with
call and scope numbers at any level, ``layer/h`` every ``layer#k/h``), a compiled ``re.Pattern`` (``fullmatch`` against every name
and alias), a :class:`Var`, a :class:`Selection`, or a list/tuple/dict of these.
Where one var is needed (``g[...]``, a leaf of a slice's inputs), a name or pattern
matching several vars is an error; a glob, regex or Selection leaf stands for the
tuple of everything it matched.

Globs know that names are paths (``block#2/attn/q``, ``params['dense']['kernel']``):

* ``*`` matches within one level of a path: any run of characters except ``/``
  (a ``/`` inside a bracketed key such as ``['mlp/~/linear_0']`` does not end a
  level); ``**`` matches across levels, and ``**/`` also matches no level at all;
* ``@*`` matches loop iterations (``h@*``: ``h@0``, ``h@1``, ...; of nested loops,
  ``h@1@0``), one var per iteration, not the value before a patch there
  (``h@3.unpatched``; ``h@*.unpatched`` selects those); a glob that matches a
  patched value's name (``w*``: ``w``) does not also select the value before the
  patch (``w.unpatched``);
* ``?`` matches one character other than ``/``;
* brackets are pytree keys, matched literally, when they hold a quote
  (``['params']``, ``['Block_*']``: ``*`` and ``?`` inside still match within the
  key) or only digits and wildcards (``[*]``, ``[1?]``); a bracket of digits only,
  ``[12]``, matches either the key ``[12]`` or one of the characters, so both
  ``params_2[0]*`` and ``z[23]`` work; any other bracket (``[a-c]``, ``[!0]``) is a
  character class, as in :mod:`fnmatch`.

A var found through an alias keeps the name that matched: ``Selection.matched``
lists, per var, the first of its names (canonical name first) that the selector
matched, while ``Selection.names`` are the canonical names.

A pattern matching nothing is a SelectionError ``no var matches the pattern ...``
suggesting ``**`` when ``*`` stopped at a ``/``, else names close to it. Filters
fail loudly too: a ``primitive=`` no var of the graph is made by, or a ``scope=``
no var is in, is a typo, not an empty selection.
"""

from __future__ import annotations

import fnmatch
import functools
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import jax
import numpy as np

from . import _compat as C
from ._control_flow import BRANCH_PRIMITIVES
from ._copying import refuse_pickle
from ._errors import (
    SelectionError,
    SliceError,
    close_matches,
    did_you_mean,
    short_list,
    type_of,
)
from ._names import is_generated

if TYPE_CHECKING:
    from ._graph import Graph, Var


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
        >>> g.select("sin:*").names, g.select("sin:*").matched   # found by an alias
        (('a',), ('sin:1',))
    """

    # no __slots__: an instance keeps the names its vars were matched by
    _matched: tuple[str, ...] | None = None
    #: the globs it was selected by (``@*``, every iteration: a patch of a
    #: ``while_loop`` value patches every trip, see ``_patch_graph``)
    _every: tuple[str, ...] = ()

    @classmethod
    def _of(
        cls, vars_: Iterable[Var], matched: Iterable[str], every: tuple[str, ...] = ()
    ) -> Selection:
        sel = cls(vars_)
        sel._matched, sel._every = tuple(matched), every
        return sel

    def __add__(self, other: Any) -> Any:
        """Both selections, as one (``g.select("a@*") + g.select("b@*")``: what they
        were selected by is kept, as ``g.select("a@*", "b@*")`` keeps it)."""
        if not isinstance(other, Selection):
            return tuple.__add__(self, other)
        return Selection._of(
            (*self, *other), (*self.matched, *other.matched), (*self._every, *other._every)
        )

    def __copy__(self) -> Selection:
        return self  # (immutable, as its vars are)

    def __deepcopy__(self, memo: dict) -> Selection:
        return self

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        refuse_pickle(self)  # (not its first Var's error)

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical names of the vars."""
        return tuple(v.name for v in self)

    @property
    def matched(self) -> tuple[str, ...]:
        """Per var, the name the selector matched (an alias, or the canonical name)."""
        return self.names if self._matched is None else self._matched

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
        if not callable(predicate):
            raise SelectionError(
                f"where={predicate!r} is not a function: pass a predicate such as "
                "lambda v: v.ndim == 2"
            )
        kept = [(v, m) for v, m in zip(self, self.matched) if predicate(v)]
        return Selection._of((v for v, _ in kept), (m for _, m in kept), self._every)

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
    selector = _plain_int(selector)
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
        hits, pattern = _string_hits(graph, selector)
        return _exactly_one(graph, repr(selector), hits, selector, pattern)
    if isinstance(selector, re.Pattern):
        label = f"re.compile({selector.pattern!r})"
        return _exactly_one(graph, label, _regex(graph, selector), None, selector)
    raise SelectionError(
        f"{selector!r} is not a selector of one var: use an int, a name, a glob, a "
        "re.Pattern or a Var (g.select(...) takes several)"
    )


def grouped(
    graph: Graph, selector: Any, what: str
) -> tuple[list[str], list[Var], list[list[int]], list[bool]]:
    """``(keys, vars, groups, stacked)``: as :func:`keyed`, or for a dict ``{key:
    selector}`` one key per entry, its vars (positions in ``vars``, program order)
    stacked on a new leading axis when the selector selects several (``"step/h@*"``:
    one row per iteration). ``what`` names the argument in errors (``wrt``)."""
    if not isinstance(selector, dict):
        keys, vars_ = keyed(graph, selector)
        return keys, vars_, [[j] for j in range(len(vars_))], [False] * len(vars_)
    keys, vars_, groups, stacked = [], [], [], []
    for key, item in selector.items():
        structure, found = tree(graph, item)
        if not found:
            raise SliceError(f"{what}[{key!r}] selects no var: give it a name or pattern that does")
        many = not (len(found) == 1 and is_leaf(structure))
        if many and len({(v.shape, v.dtype) for v in found}) > 1:
            raise SliceError(
                f"{what}[{key!r}] selects vars of different types "
                f"({', '.join(sorted({type_of(v) for v in found}))}); their values "
                "cannot be stacked: give each its own key"
            )
        keys.append(key)
        groups.append(list(range(len(vars_), len(vars_) + len(found))))
        stacked.append(many)
        vars_ += found
    return keys, vars_, groups, stacked


def keyed(graph: Graph, selector: Any) -> tuple[list[str], list[Var]]:
    """``(keys, vars)`` for results keyed by the selectors the caller wrote.

    A string naming one var is its own key; a glob or regex is keyed by the names it
    matched; a ``Var`` (or an int) by the var's name; a list or tuple is each of its
    items in order. Vars selected twice are kept once.
    """
    items = (
        selector
        if isinstance(selector, (list, tuple)) and not isinstance(selector, Selection)
        else [selector]
    )
    keys: list[str] = []
    vars_: list[Var] = []
    for item in items:
        if isinstance(item, (str, re.Pattern)):
            found = select(graph, [item])
            if (
                isinstance(item, str)
                and len(found) == 1
                # a name, or a path whose one numbered instance it selects ("row/h@1" is
                # "row#0/h@1"): keyed as written
                and (item in found.matched or compile_glob(item) is None)
            ):
                pairs = [(item, found[0])]
            elif len(set(found.matched)) == len(found):
                pairs = list(zip(found.matched, found))
            else:  # a bare name several vars share: each by its own name
                pairs = [(v.name, v) for v in found]
        elif isinstance(item, dict):  # its keys would be lost: keyed by var names
            raise SelectionError(
                f"a dict inside a list of selectors ({short_list([repr(k) for k in item], 3)}"
                "): results are keyed by a dict's keys only when it is the whole selector; "
                "pass one dict, {key: selector, ...}, with every entry in it"
            )
        else:
            _, flat = tree(graph, item)
            pairs = [(v.name, v) for v in flat]
        for key, v in pairs:
            if key not in keys:
                keys.append(key)
                vars_.append(v)
    return keys, vars_


def select(
    graph: Graph,
    selectors: Sequence[Any],
    *,
    primitive: str | Iterable[str] | None = None,
    scope: str | None = None,
    where: Callable[[Var], bool] | None = None,
) -> Selection:
    """Vars matching any selector (every var if there are none), then every filter.

    A filter that cannot match anything in this graph (a primitive no var is made by,
    a scope no var is in) is a SelectionError with suggestions, not an empty result.
    """
    wanted = None if primitive is None else _primitives(graph, primitive)
    if scope is not None and not isinstance(scope, str):
        raise SelectionError(
            f"scope={scope!r} is not a scope path: pass a str such as 'MLP/Dense_0'"
        )
    if where is not None and not callable(where):
        raise SelectionError(
            f"where={where!r} is not a function: pass a predicate such as lambda v: v.ndim == 2"
        )
    if selectors:
        found: dict[int, str] = {}
        for sel in selectors:
            for i, name in _many(graph, sel).items():
                found.setdefault(i, name)
        order = sorted(found, key=graph._order)
        vars_ = [graph._var(i) for i in order]
        matched = [found[i] for i in order]
    else:
        vars_ = list(graph.vars)
        matched = [v.name for v in vars_]
    keep = [True] * len(vars_)
    if wanted is not None:
        keep = [k and v.primitive in wanted for k, v in zip(keep, vars_)]
        if not selectors and not any(keep):  # made only inside folded loop bodies
            raise _only_in_loops(graph, wanted)
    if scope is not None:
        scope = scope.strip("/")
        keep = [
            k and _in_scope(v.scope, scope) and not _made_up(graph, v) for k, v in zip(keep, vars_)
        ]
        if not any(keep) and scope and not any(_in_scope(v.scope, scope) for v in graph.vars):
            raise _no_scope(graph, scope)
    if where is not None:
        keep = [k and bool(where(v)) for k, v in zip(keep, vars_)]
    every = tuple(s for s in selectors if isinstance(s, str) and compile_glob(s) is not None)
    return Selection._of(
        (v for v, k in zip(vars_, keep) if k), (m for m, k in zip(matched, keep) if k), every
    )


def _primitives(graph: Graph, primitive: Any) -> set[str]:
    """The primitive names a ``primitive=`` filter asks for, each one in the graph."""
    items = [primitive] if isinstance(primitive, str) else primitive
    try:
        wanted = list(items)
    except TypeError:
        wanted = [primitive]
    bad = [p for p in wanted if not isinstance(p, str)]
    if bad or not wanted:
        raise SelectionError(
            f"primitive={primitive!r} is not a primitive name: pass a str such as 'tanh' "
            "or a list of them (v.primitive gives a var's)"
        )
    present = set(graph._program.primitives)
    present.update(p for loop in graph._program.folded for p in loop.template.primitives)
    for p in wanted:
        if p not in present:
            raise SelectionError(
                f"no var is made by the primitive {p!r}{did_you_mean(p, sorted(present))} "
                f"(this graph's primitives: {short_list(sorted(present), 12)})"
            )
    return set(wanted)


def _only_in_loops(graph: Graph, wanted: set[str]) -> SelectionError:
    """No var of ``g.vars`` is made by these primitives: body values of folded loops
    are (``_primitives`` found them), which answer to names per iteration."""
    from ._loop_index import unnamed_base

    folded = graph._program.folded
    names = [
        name
        for name, templates in graph._loop_index.names.items()
        if any(folded[t.loop].template.primitives[t.var] in wanted for t in templates)
    ]
    if not names:
        names = [
            unnamed_base(k, ti)
            for k, loop in enumerate(folded)
            for ti, p in enumerate(loop.template.primitives)
            if p in wanted
        ]
    shown = short_list([n + "@*" for n in names], 4)
    return SelectionError(
        f"no var of g.vars is made by {short_list(sorted(wanted), 4)}: only values inside a "
        f"loop the index keeps folded are, which are per iteration; select them with their "
        f"names, {shown}"
    )


def _made_up(graph: Graph, v: Var) -> bool:
    """Whether a var is a value jaxsurgery made, not one of the program's: inside a
    patch (its equations carry the patched value's scope) or a helper of the index."""
    return v.primitive not in ("input", "const") and graph._site(v.index) is None


def _in_scope(var_scope: str, scope: str) -> bool:
    return var_scope == scope or var_scope.startswith(scope + "/")


def _no_scope(graph: Graph, scope: str) -> SelectionError:
    scopes: set[str] = set()
    for v in graph.vars:
        parts = v.scope.split("/") if v.scope else []
        scopes.update("/".join(parts[: k + 1]) for k in range(len(parts)))
    listed = f" (this graph's scopes: {short_list(sorted(scopes), 8)})" if scopes else ""
    for loop in graph._program.folded:  # a scope inside a loop the index keeps folded
        found = {loop.body_scope(e) for e in loop.template.jaxpr.eqns}
        if any(p == scope or p.startswith(scope + "/") for p in found):
            return SelectionError(
                f"the scope {scope!r} is inside a loop the index keeps folded, whose values "
                f"are per iteration: select its outputs with g.select({scope + '@*'!r}), or "
                f"at one iteration, g[{scope + '@3'!r}]"
            )
    lookup = graph._names.lookup
    call = (
        f"; {scope!r} is a path of names, not a scope (a name stack entry): the values "
        f"named under it are g.select({scope + '/**'!r})"
        + (f", the value it names g[{scope!r}]" if scope in lookup else "")
        if scope in lookup or any(n.startswith(scope + "/") for n in lookup)
        else ""
    )
    return SelectionError(
        f"no var is in the scope {scope!r}{did_you_mean(scope, scopes)}"
        f"{listed or ' (this graph has no scopes)'}{call}"
    )


def tree(graph: Graph, selector: Any) -> tuple[Any, list[Var]]:
    """Resolve a pytree of selectors: ``(treedef, flat vars)``.

    A leaf that is a glob, regex or Selection stands for a tuple of the vars it matched.
    """
    resolved = _resolve_tree(graph, selector)
    flat, treedef = jax.tree_util.tree_flatten(resolved)
    return treedef, flat


def is_leaf(treedef: Any) -> bool:
    """Whether a :func:`tree` structure is one var (not a tuple, list or dict of them)."""
    return jax.tree_util.treedef_is_leaf(treedef)


def unflatten(treedef: Any, values: Sequence[Any]) -> Any:
    if isinstance(treedef, OutputTree):
        return treedef.unflatten(values)
    return jax.tree_util.tree_unflatten(treedef, list(values))


class OutputTree:
    """A traced function's output structure whose leaves are not all arrays: the others
    (an Equinox module's activation function, returned with the updated model) are held
    static, at their places among the array leaves."""

    def __init__(self, treedef: Any, statics: dict[int, Any]):
        self.treedef, self.statics = treedef, statics

    def unflatten(self, arrays: Sequence[Any]) -> Any:
        leaves = list(arrays)
        for k in sorted(self.statics):
            leaves.insert(k, self.statics[k])
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _resolve_tree(graph: Graph, selector: Any) -> Any:
    if isinstance(selector, Selection):
        return tuple(_own(graph, v) for v in selector)
    if isinstance(selector, dict):
        return {k: _resolve_tree(graph, v) for k, v in selector.items()}
    if isinstance(selector, (list, tuple)):
        return type(selector)(_resolve_tree(graph, s) for s in selector)
    if isinstance(selector, str):
        hits, pattern = _string_hits(graph, selector)
        if pattern is None:
            return one(graph, selector)
        if not hits:
            raise _no_match(graph, repr(selector), selector, pattern)
        return tuple(graph._var(i) for i in sorted(hits, key=graph._order))
    if isinstance(selector, re.Pattern):
        return tuple(graph._var(i) for i in sorted(_many(graph, selector), key=graph._order))
    return one(graph, selector)


def _many(graph: Graph, selector: Any) -> dict[int, str]:
    """Every var a selector matches, with the name it matched; a SelectionError if none."""
    from ._graph import Var

    selector = _plain_int(selector)
    if isinstance(selector, (Var, int)) and not isinstance(selector, bool):
        v = one(graph, selector)
        return {v.index: v.name}
    if isinstance(selector, str):
        hits, pattern = _string_hits(graph, selector)
        if not hits:
            raise _no_match(graph, repr(selector), selector, pattern)
        return hits
    if isinstance(selector, re.Pattern):
        hits = _regex(graph, selector)
        if not hits:
            raise _no_match(graph, f"re.compile({selector.pattern!r})", None, selector)
        return hits
    if isinstance(selector, Selection):
        return {_own(graph, v).index: m for v, m in zip(selector, selector.matched)}
    if isinstance(selector, (list, tuple, dict)):  # (a dict: its values, as a slice's)
        found: dict[int, str] = {}
        for s in selector.values() if isinstance(selector, dict) else selector:
            for i, name in _many(graph, s).items():
                found.setdefault(i, name)
        return found
    raise SelectionError(
        f"{selector!r} is not a selector: use an int, a name, a glob, a re.Pattern, a "
        "Var, a Selection, or a list, tuple or dict of these"
    )


def _plain_int(selector: Any) -> Any:
    """A NumPy integer (``np.argmax``'s), or an integer array of no axis (``jnp.argmax``'s),
    as the index it is; anything else as it is."""
    if isinstance(selector, numbers.Integral) and not isinstance(selector, (bool, int)):
        return int(selector)
    if (
        isinstance(selector, (np.ndarray, jax.Array))
        and selector.shape == ()
        and isinstance(selector.dtype, np.dtype)  # (not a PRNG key's)
        and np.issubdtype(selector.dtype, np.integer)
        and not isinstance(selector, jax.core.Tracer)
    ):
        return int(selector)
    return selector


def _own(graph: Graph, var: Var) -> Var:
    if var.graph is not graph:
        raise SelectionError(
            f"{var!r} belongs to another graph; select it from this graph by name: g[{var.name!r}]"
        )
    return var


def _string_hits(graph: Graph, selector: str) -> tuple[dict[int, str], re.Pattern | None]:
    """``(hits, glob)``: an exact name or fallback first, else a glob (None if not one)."""
    names = graph._names
    idxs = names.lookup.get(selector)
    if idxs is not None:
        return dict.fromkeys(idxs, selector), None
    i = names.parse_fallback(selector)
    if i is not None:
        return {i: selector}, None
    # a body value of a loop the index keeps folded (_loop_index), by its exact name
    # (``body[1]@5`` too, before its brackets make it a glob)
    virtual = graph._loop_index.lookup(selector)
    if virtual:
        return {v.index: selector for v in virtual}, None
    from ._patch_graph import unpatched  # (a graph patched in its running program)

    before = unpatched(graph, selector)
    if before is not None:
        return {before.index: selector}, None
    pattern = compile_glob(selector)
    hits = {} if pattern is None else _regex(graph, pattern)
    if not hits:  # a path without (some of) its call numbers (``layer/h``, ``qk``):
        # every numbered call or scope instance, as a bare name selects every binding
        hits = _regex(graph, _any_instance(selector))
    return hits, pattern


# '*': a run within one level; a bracketed key (['mlp/~/linear_0']) may hold a '/'
_LEVEL = r"(?:\[[^\]]*\]|[^/\[])*"
#: the suffix naming a value before a patch (g.replace)
UNPATCHED = ".unpatched"
# '@*': an iteration number, or several of nested loops (7, 7@2), so that 'h@*' stacks
# one row per iteration: not 'h@7.unpatched' ('h@*.unpatched' selects those)
_ITERATIONS = r"(?:0|[1-9][0-9]*)(?:@(?:0|[1-9][0-9]*))*"


@functools.lru_cache(maxsize=512)
def _selects(graph: Graph, word: str) -> bool:
    """Whether a glob, or a name (a glob without a wildcard), selects a var."""
    pattern = compile_glob(word)
    if pattern is not None:
        return bool(_regex(graph, pattern))
    try:
        graph[word]
    except SelectionError:
        return False
    return True


#: where a path level ends, in a name given to :func:`_any_instance` (a character no
#: name holds, kept literally by :func:`compile_glob`)
_LEVEL_END = "\x00"


def _any_instance(word: str) -> re.Pattern | None:
    """The regex of ``word``, a name or glob, whose every level may also carry a call or
    scope number: ``layer/h`` matches ``layer#0/h`` and ``layer#1/h``, ``qk`` every
    ``qk#k``, ``block/attn/*`` the insides of every ``block#i/attn#j``; so may a call
    before the path into what it returned: ``lstm[1].cell`` matches ``lstm#2[1].cell``."""
    marked, depth, at = [], 0, len(word)
    for i, c in enumerate(word):
        if depth == 0 and c in "[." and marked[-1:] not in ([], ["/"], ["*"], [_LEVEL_END]):
            marked.append(_LEVEL_END)  # (a number before a result's path)
        if c == "[":
            depth += 1
        elif c == "]":
            depth = max(depth - 1, 0)
        elif depth == 0 and c == "@":  # the iterations end the whole name
            at = i
            break
        elif depth == 0 and c == "/" and marked[-1:] != ["*"]:  # ('*' takes '#k' already,
            marked.append(_LEVEL_END)  # and '**/' stays a glob's any levels or none)
        marked.append(c)
    if marked[-1:] != ["*"]:
        marked.append(_LEVEL_END)
    text = "".join(marked) + word[at:]
    regex = compile_glob(text)
    source = re.escape(text) if regex is None else regex.pattern
    return re.compile(source.replace(re.escape(_LEVEL_END), r"(?:#\d+)?"), re.DOTALL)


#: the iterations that end a name (``@3@0``)
_SUFFIX = re.compile(r"(?:@(?:0|[1-9][0-9]*))+$")


def free_iterations(selector: str, name: str) -> frozenset[int]:
    """The iterations of ``name``, counted from the innermost (0), that ``selector``, a
    glob matching it, leaves free: any other number there matches too (``h@*@1``
    frees 1 of ``h@0@1``; ``h@*``, whose ``*`` spans nested loops, both of ``h@0@1``).

    Example:
        >>> sorted(free_iterations("body/h2@*@1", "body/h2@0@1"))
        [1]
        >>> sorted(free_iterations("**/h2@*", "obody/ibody/h2@2@0"))
        [0, 1]
    """
    return iterations_matched(selector, name)[0]


def loose_iterations(selector: str, name: str) -> frozenset[int]:
    """The iterations of ``name`` (counted as :func:`free_iterations` does) where
    ``selector`` matches some other numbers but not every one (``h@?@1``: the
    iterations 0 to 9 of the outer loop).

    Example:
        >>> sorted(loose_iterations("body/h2@?@1", "body/h2@0@1"))
        [1]
    """
    return iterations_matched(selector, name)[1]


def iterations_matched(selector: str, name: str) -> tuple[frozenset[int], frozenset[int]]:
    """``(free, loose)`` iterations of ``name`` under the glob ``selector``: see
    :func:`free_iterations` and :func:`loose_iterations`."""
    suffix = _SUFFIX.search(name)
    pattern = compile_glob(selector)
    if suffix is None or pattern is None:
        return frozenset(), frozenset()
    if not pattern.fullmatch(name):
        pattern = _any_instance(selector)  # (a path without its call numbers)
        if not pattern.fullmatch(name):
            return frozenset(), frozenset()
    stem, its = name[: suffix.start()], suffix.group().split("@")[1:]

    def matches(k: int, other: int) -> bool:
        at = "".join(f"@{other if j == k else t}" for j, t in enumerate(its))
        return bool(pattern.fullmatch(stem + at))

    free, loose = set(), set()
    for k, t in enumerate(its):
        n = int(t)
        others = [n + 1, 987654321, *(o for o in (n - 1, 0, 1, 10) if o >= 0 and o != n)]
        hits = [matches(k, o) for o in others]
        if hits[0] and hits[1]:
            free.add(len(its) - 1 - k)
        elif any(hits):
            loose.add(len(its) - 1 - k)
    return frozenset(free), frozenset(loose)


@functools.lru_cache(maxsize=512)
def compile_glob(pattern: str) -> re.Pattern | None:
    """The regex of a path-aware glob (see the module docstring), or None if it has no
    wildcard (then it is a plain name)."""
    out: list[str] = []
    wild = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i) and (i == 2 or pattern[i - 3] == "/"):
                    out.append("(?:.*/)?")  # '**/' at a level start: any levels, or none
                    i += 1
                else:
                    out.append(".*")
            else:  # '@*': every iteration (not the value before a patch there)
                out.append(_ITERATIONS if i and pattern[i - 1] == "@" else _LEVEL)
                i += 1
            wild = True
            continue
        if c == "?":
            out.append("[^/]")
            wild = True
            i += 1
            continue
        if c == "[":
            end, regex, is_wild = _bracket(pattern, i)
            if end > i:
                out.append(regex)
                wild = wild or is_wild
                i = end
                continue
        out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL) if wild else None


def _bracket(pattern: str, i: int) -> tuple[int, str, bool]:
    """``(end, regex, wild)`` of the bracket at ``pattern[i]``; end == i if unclosed."""
    quote = pattern[i + 1 : i + 2]
    if quote in ("'", '"'):
        close = pattern.find(quote + "]", i + 2)
        end = -1 if close < 0 else close + 2
    else:
        close = pattern.find("]", i + 1)
        end = -1 if close < 0 else close + 1
    if end < 0:
        return i, "", False
    content = pattern[i + 1 : end - 1]
    if not content:
        return end, re.escape("[]"), False
    if "'" in content or '"' in content or all(ch in "0123456789*?" for ch in content):
        if content.isdigit():  # [12]: the key [12], or one of the characters 1, 2
            return end, f"(?:{re.escape('[' + content + ']')}|[{content}])", True
        key = "".join(
            "[^\\]]*" if ch == "*" else "[^\\]]" if ch == "?" else re.escape(ch) for ch in content
        )
        return end, f"\\[{key}\\]", "*" in content or "?" in content
    negate = content[0] == "!"
    body = content[1:] if negate else content
    body = body.replace("\\", "\\\\")
    if body[:1] in ("^", "["):
        body = "\\" + body
    return end, f"[^/{body}]" if negate else f"[{body}]", True


def _regex(graph: Graph, pattern: re.Pattern) -> dict[int, str]:
    """Every var with a name ``pattern`` fully matches, and the first such name.

    A value before a patch (``h#2.unpatched``) is matched only by a pattern that does
    not match the patched value's own name (``h#*.unpatched``, ``h#2.*``): ``h#*`` is
    the values the program reads, one per binding.
    """
    names = graph._names
    hits: set[int] = set()
    for name, idxs in names.lookup.items():
        if pattern.fullmatch(name) and not _stem_matches(pattern, name):
            hits.update(idxs)
    for i in range(len(names.canonical)):
        if any(pattern.fullmatch(n) for n in names.fallbacks(i)):
            hits.add(i)
    found = {i: _matched_name(names, i, pattern) for i in sorted(hits)}
    found.update((v.index, name) for v, name in graph._loop_index.matching(pattern))
    from ._patch_graph import unpatched, unpatched_names  # (patched in the running program)

    for name in unpatched_names(graph):
        if pattern.fullmatch(name) and not _stem_matches(pattern, name):
            found[unpatched(graph, name).index] = name
    return found


def _stem_matches(pattern: re.Pattern, name: str) -> bool:
    """Whether ``name`` names a value before a patch (``h#2.unpatched``) whose patched
    value's name (``h#2``) ``pattern`` matches too."""
    stem, k = unpatched_stem(name)
    return k > 0 and pattern.fullmatch(stem) is not None


def unpatched_stem(name: str) -> tuple[str, int]:
    """``(stem, k)`` of ``<stem>.unpatched`` (the suffix k times; k = 0: not one)."""
    k = 0
    while name.endswith(UNPATCHED):
        name, k = name[: -len(UNPATCHED)], k + 1
    return name, k


def _matched_name(names: Any, i: int, pattern: re.Pattern) -> str:
    """The var's first name (canonical first, then its aliases) that ``pattern`` matches."""
    if pattern.fullmatch(names.canonical[i]):
        return names.canonical[i]
    return next((n for n in names.aliases_of(i) if pattern.fullmatch(n)), names.canonical[i])


def _exactly_one(
    graph: Graph, label: str, hits: dict[int, str], word: str | None, pattern: Any
) -> Var:
    if not hits:
        raise _no_match(graph, label, word, pattern)
    if len(hits) > 1:
        found = [_as_matched(graph, i, label, m, pattern) for i, m in sorted(hits.items())]
        # a name two of them answer to alike (the outputs of one scope instance, "a#1"
        # on y and z) tells nothing apart: their canonical names alone
        other = [o for _, o in found if o is not None]
        alike = len(set(other)) < len(other)
        shown = [
            n if o is None or alike else f"{n} (as {o})" if pattern is not None else f"{o} (= {n})"
            for n, o in found
        ]
        raise SelectionError(f"{label} is ambiguous: it matches {short_list(shown)}; pick one")
    return graph._var(next(iter(hits)))


def _leaves_under(graph: Graph, word: str) -> list[str]:
    """The names of the leaves of a pytree named ``word`` (an argument ``params`` whose
    leaves are ``params['w']`` ..., an output ``out[0]``), canonical first; [] if none."""
    prefixes, lookup = (word + "[", word + "."), graph._names.lookup
    found = [n for n in lookup if n.startswith(prefixes) and not is_generated(n)]
    return sorted(found, key=lambda n: lookup[n][0])[:50]


def _as_matched(
    graph: Graph, i: int, label: str, matched: str, pattern: Any
) -> tuple[str, str | None]:
    """Var ``i`` in an ambiguity message: its canonical name, and the name that matched
    where that differs (``x`` answers to ``h`` as ``h#0``, a parameter rebound as
    ``h``), else None."""
    name = graph._var(i).name
    if pattern is not None:
        return name, None if matched == name else matched
    stem = label.strip("'\"")
    numbered = _any_instance(stem)  # h#k; layer#i/h#k for a path without its numbers
    if name == stem or numbered.fullmatch(name):
        return name, None
    found = next((a for a in graph._var(i).aliases if numbered.fullmatch(a)), None)
    return name, found


def _tagged_in_whole_loop(graph: Graph, name: str) -> str | None:
    """The ``js.tag`` that ``name`` (its last level, a glob too) names, where it is inside
    a loop that a folded loop's body keeps whole (its values have no names), or None."""
    last = name.rsplit("/", 1)[-1]
    stack = [
        jaxpr
        for loop in graph._program.folded
        for eqn in loop.template.opaque_loops
        for jaxpr in C.inner_jaxprs(eqn)
    ]
    while stack:
        for eqn in stack.pop().eqns:
            if eqn.primitive.name == C.TAG_PRIMITIVE:
                tag = C.tag_name(eqn)
                if fnmatch.fnmatchcase(tag.rsplit("/", 1)[-1], last):
                    return tag
            stack.extend(C.inner_jaxprs(eqn))
    return None


def _in_whole_loop(label: str, tag: str, what: str = "") -> SelectionError:
    """``label`` names the ``tag`` (``what``: of which iteration) inside a while_loop that
    a folded loop's body keeps whole."""
    return SelectionError(
        f"{label} names {what}the tag {tag!r}, which "
        "is inside a while_loop kept whole in a folded loop's body (g.notes says why: "
        "a trip count that depends on the loop's values, as the stages of diffrax's "
        "Tsit5 and Dopri5, which reuse their first stage after an accepted step; or "
        "too many trips to unroll), so the values inside it are not named; tag the "
        "value where it leaves that loop (with diffrax, a solver with a fixed number "
        "of stages, Heun or Midpoint, names them)"
    )


def _no_match(
    graph: Graph, label: str, word: str | None, pattern: re.Pattern | None = None
) -> SelectionError:
    hidden = graph._names.hidden.get(word) if word is not None else None
    if hidden is not None:
        return SelectionError(f"{label} names {hidden}")
    outside = word is not None and graph._names.lookup.get(word.partition("@")[0])
    if word is not None and "@" in word and graph._program.opaque_loops and not outside:
        from ._structured import per_lane

        if all(per_lane(e) for e in graph._program.opaque_loops):
            raise SliceError(
                f"{label} names a value inside a loop iteration, but the graph's while_loop "
                "runs under jax.vmap with a condition per lane (its lanes stop at different "
                "trips), so it stays one equation; tag the value you need outside the loop "
                "(js.tag), or trace one example and jax.vmap what you build from it"
            )
        raise SliceError(
            f"{label} names a value inside a loop iteration, but the graph's while_loop "
            "could not be unrolled: its trip count depends on values and the graph was "
            "traced with abstract arguments (jax.ShapeDtypeStruct, or a transform's tracers: "
            "js.trace under jax.jit); trace with concrete arrays outside transforms, or use "
            "lax.fori_loop/lax.scan with a static trip count"
        )
    hidden = (
        None
        if word is None or "@" not in word
        else _tagged_in_whole_loop(graph, word.partition("@")[0])
    )
    if hidden is not None:
        return _in_whole_loop(label, hidden, "a value per iteration of ")
    if pattern is not None and (word is None or "*" in word or "?" in word):
        return _no_pattern_match(graph, label, word, pattern)
    # (a name with brackets, "solve/body[1]@5", is tried as a glob too: told as a name)
    from ._patch_graph import UNPATCHED

    if word is not None and word.endswith(UNPATCHED):
        stem = word.removesuffix(UNPATCHED)
        return SelectionError(
            f"no var named {label}: '.unpatched' names a value before a patch (g.replace); "
            f"{stem!r} names no var patched that many times in this graph"
        )
    if word is not None and "@" in word:
        base, _, iterations = word.partition("@")
        spelt = "@".join(str(int(t)) if t.isdigit() else t for t in iterations.split("@"))
        if spelt != iterations:
            return SelectionError(
                f"no var named {label}: iterations have no leading zeros, {base + '@' + spelt!r}"
            )
        # (a body value nothing names answers to loop<k>%<i>@t)
        tmpls = graph._loop_index.names.get(base, ()) or graph._loop_index._unnamed(base)
        for tmpl in tmpls[:1]:
            n = graph._loop_index.length(graph._program.folded[tmpl.loop], need=True) or 0
            given = iterations.split("@")
            inner = sorted({t.inner for t in tmpls if t.loop == tmpl.loop})
            if given[0].isdigit() and int(given[0]) < n and len(inner) > 1:
                # the folded loop's iteration is fine: those of the loops inside it are not
                first, last = (
                    f"{base}@{given[0]}" + "".join(f"@{u}" for u in its)
                    for its in (inner[0], inner[-1])
                )
                return SelectionError(
                    f"no var named {label}: in iteration {given[0]} of its folded loop, "
                    f"{base!r} is {first!r} .. {last!r} (the loops inside it)"
                )
            first, last = _name_range(graph, base, tmpls)
            around = " in each iteration of the loops around it" if tmpl.outer else ""
            return SelectionError(
                f"no var named {label}: {base!r} is inside a loop of {n} iterations"
                f"{around}, 0 .. {n - 1} ({first!r} .. {last!r})"
            )
        # a loop the index unrolled (a short while_loop): the iterations it ran
        outer, _, last_it = word.rpartition("@")
        if last_it.isdigit():
            present = sorted(
                int(n[len(outer) + 1 :])
                for n in graph._names.lookup
                if n.startswith(outer + "@") and n[len(outer) + 1 :].isdigit()
            )
            if present and not present[0] <= int(last_it) <= present[-1]:
                first, last = (f"{outer}@{t}" for t in (present[0], present[-1]))
                return SelectionError(
                    f"no var named {label}: {outer!r} is named at iterations "
                    f"{present[0]} .. {present[-1]} of its loop, those it ran when traced "
                    f"({first!r} .. {last!r})"
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
        tmpls = graph._loop_index.names.get(word, ())
        if tmpls:
            iterations = list(_name_range(graph, word, tmpls))
        if iterations:
            return SelectionError(
                f"{label} is inside a loop: add the iteration, {iterations[0]!r} .. "
                f"{iterations[-1]!r}, or {word + '@*'!r} for all"
            )
        hidden = _tagged_in_whole_loop(graph, word)
        if hidden is not None:
            return _in_whole_loop(label, hidden)
    leaves = [] if word is None else _leaves_under(graph, word)
    if leaves:  # an argument or output that is a pytree: its leaves have the names
        brackets = all(n.startswith(word + "[") for n in leaves)
        glob = word + ("[*]*" if brackets else ".*" if "[" not in word else "*")
        return SelectionError(
            f"{label} is a pytree of several values, not one: its leaves are "
            f"{short_list([repr(n) for n in leaves], 4)}; select them all with {glob!r} "
            "(one value each), or one of them"
        )
    hint = ""
    if word is not None:
        fallback = word.startswith("%") or ":" in word  # only suggest %i names for %i words
        names = graph._names
        candidates = (
            names.all_names() if fallback else [n for n in names.lookup if not is_generated(n)]
        )
        if "@" in word:  # a body value of a folded loop: its names at the iterations
            # asked for (the last one past the loop's end), each a name that selects
            its = [int(t) if t.isdigit() else 0 for t in word[word.index("@") + 1 :].split("@")]
            candidates += _iteration_names(graph, tuple(its))
        hint = did_you_mean(word, candidates)
    listed = "g.names() lists all"
    if graph._program.folded:
        listed += "; g.notes says how to name values inside loops"
    if "cond" in graph._program.primitives:
        listed += (
            "; the graph keeps a cond as one equation (nothing decided its branch while "
            "tracing: abstract arguments, a transform's tracers, or a predicate a loop kept "
            "whole computes): the values inside its branches have no names"
        )
    if any(r.primitive in BRANCH_PRIMITIVES for r in graph._program.regions):
        listed += (
            "; the graph holds the branch of each cond the traced arguments took: the "
            "values of its other branches have no names (trace with arguments that take "
            "the branch you want)"
        )
    if "shard_map" in graph._program.primitives:
        listed += (
            "; the graph keeps each shard_map as one equation: the values inside its body "
            "have no names, select what it returns"
        )
    return SelectionError(f"no var named {label}{hint} ({listed})")


def _name_range(graph: Graph, base: str, tmpls: Sequence[Any]) -> tuple[str, str]:
    """The first and the last name of a folded loop's body value (``base``, named by
    ``tmpls``), over its iterations and those of the loops around and inside it."""
    index, folded = graph._loop_index, graph._program.folded
    first = min(tmpls, key=lambda t: (t.outer, t.inner))
    last = max(tmpls, key=lambda t: (t.outer, t.inner))
    n = index.length(folded[last.loop], need=True) or 1
    return first.name(base, 0), last.name(base, n - 1)


def _iteration_names(graph: Graph, asked: tuple[int, ...]) -> list[str]:
    """The names of folded loops' body values at the iterations ``asked`` (those of the
    loops around the loop, the loop's own, capped at its last, then those of the loops
    inside the body), for suggestions: each one selects a value."""
    index, folded = graph._loop_index, graph._program.folded
    found = []
    for base, tmpls in index.names.items():
        if is_generated(base):
            continue

        def fits(u: Any) -> bool:  # the iterations asked are those around, one, inside
            o = len(u.outer)
            return asked[:o] == u.outer and asked[o + 1 :] == u.inner

        tmpl = next((u for u in tmpls if fits(u)), tmpls[0])
        t = asked[len(tmpl.outer)] if len(asked) > len(tmpl.outer) else 0
        n = index.length(folded[tmpl.loop])
        name = tmpl.name(base, t if n is None else min(t, n - 1))
        if index.lookup(name):
            found.append(name)
    return found


def _glob_part_fixed(graph: Graph, word: str) -> list[str]:
    """Globs that select something, ``word`` with one literal part of its path (no
    wildcard in it) spelt as a name's part close to it (``model/*/atn``: ``model/*/attn``)."""
    parts = word.split("/")
    found: list[str] = []
    for k, part in enumerate(parts):
        if not part or any(c in part for c in "*?["):
            continue
        head = "/".join([*parts[:k], "*"] if k else ["*"])
        # the names' parts at this level, under a head the glob's parts before it match
        seen = {
            n.split("/")[k]
            for n in graph._names.lookup
            if n.count("/") >= k and fnmatch.fnmatchcase("/".join(n.split("/")[: k + 1]), head)
        }
        for close in close_matches(part, sorted(seen))[:3]:
            alt = "/".join([*parts[:k], close, *parts[k + 1 :]])
            if _regex(graph, compile_glob(alt)):
                found.append(alt)
    return found


def _no_pattern_match(
    graph: Graph, label: str, word: str | None, pattern: re.Pattern
) -> SelectionError:
    """No var matches a glob or regex: suggest ``**`` when ``*`` stopped at a ``/``,
    else names close to the pattern's literal text."""
    hint = ""
    if word is not None and "*" in word:
        deeper = re.sub(r"\*+", "**", word)
        found = _regex(graph, compile_glob(deeper)) if deeper != word else {}
        if found:
            hint = (
                f"; '*' stops at '/' (one level of a path): did you mean {deeper!r}, "
                f"which matches {len(found)} var{'s' if len(found) != 1 else ''}?"
            )
    if not hint and word is not None and "/" in word:  # params/* for params[*]
        head, _, rest = word.rpartition("/")
        # (unquoted, only an index is a key: [atn] is a glob's class of three letters)
        keys = [f"{head}[{rest}]"] if re.fullmatch(r"[\d*?]+", rest) else []
        for alt in (*keys, f"{head}[{rest!r}]", f"{head}.{rest}"):
            if _regex(graph, compile_glob(alt)):
                hint = f"; a pytree key is not a call or scope: did you mean {alt!r}?"
                break
    if not hint and word is not None and "/" in word:  # one part misspelt: model/*/atn
        fixed = _glob_part_fixed(graph, word)
        if fixed:
            hint = f"; did you mean {short_list(repr(f) for f in fixed)}?"
    if not hint:
        if word is not None:
            literal = re.sub(r"[*?]", "", word)
        else:
            literal = re.sub(r"\\.|[\[\](){}*+?|^$.]", "", pattern.pattern)
        names = [n for n in graph._names.lookup if not is_generated(n)]
        close = close_matches(literal, names) if literal else []
        if word is not None and "@" in word and not close:  # values of folded loops
            base, _, rest = word.partition("@")
            bases = [b for b in graph._loop_index.names if not is_generated(b)]
            stem = re.sub(r"[*?]", "", base)
            found = close_matches(stem, bases) or [b for b in bases if b.endswith(f"/{stem}")]
            close = [  # each one a pattern (or a name: stpe/*@3) that selects something
                n for b in found if (n := f"{b}@{rest}") != word and _selects(graph, n)
            ]
        if close:
            hint = f"; names close to it: {short_list(repr(n) for n in close)}"
    kind = "the pattern" if word is not None else "the regex"
    return SelectionError(f"no var matches {kind} {label}{hint} (g.names() lists all)")
