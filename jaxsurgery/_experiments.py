"""Experiments at scale: capture, patching and attribution as functions of new arguments.

Each function here is built once from a graph and is traceable: ``jax.jit``,
``jax.vmap`` and ``jax.grad`` run on it, with new arguments of the traced function
every call. What runs is the structured program (the traced, nested jaxpr) with
edits where the selected values are read or replaced:

* :func:`values_fn` exposes the selected values and runs only what they need;
* :func:`patch_fn` puts given values in place of the selected ones; the values are
  arguments, so ``jax.vmap`` over them runs a whole sweep as one compiled call;
* :func:`attribution_fn` is attribution patching: ``(a_clean − a_corrupt) ·
  ∂sum(out)/∂a`` at the corrupted run, for many ``a`` from one backward pass.

Results are keyed by the selector strings passed (one that selects several vars, a
glob, a regex or a scope: by the names it matched; a ``Var``: its name).

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def f(x, w):
    ...     h = jnp.tanh(x @ w)
    ...     return (h ** 2).sum()
    >>> g = js.trace(f, jnp.ones(3), jnp.eye(3))
    >>> capture = jax.jit(g.values_fn("h"))
    >>> capture(jnp.zeros(3), jnp.eye(3))["h"]
    Array([0., 0., 0.], dtype=float32)
    >>> patched = g.patch_fn("h")
    >>> float(patched({"h": jnp.ones(3)}, jnp.zeros(3), jnp.eye(3)))
    3.0
    >>> sweep = jax.vmap(lambda v: patched({"h": v}, jnp.zeros(3), jnp.eye(3)))
    >>> sweep(jnp.eye(3)).tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from . import _compat as C
from . import _select
from ._errors import SelectionError, SliceError, short_list
from ._made import Made, TakesArguments, selection_key
from ._promotion import is_key, not_a_key, refuse_wrapping, returned
from ._structured import Edit, Extra, iteration_run, row_value, stack_rows

if TYPE_CHECKING:
    from ._graph import Graph, Var
    from ._select import Selector


class ValuesFunction(TakesArguments):
    """``f(*args, **kwargs) -> {key: value}``: see :meth:`Graph.values_fn`."""

    _kind = "values"

    def __init__(self, graph: Graph, selector: Selector):
        self.graph = graph
        self.keys, self.vars, self._groups, self._stacked = _select.grouped(
            graph, selector, "selector"
        )
        self._key = selection_key(self.keys, self.vars, self._groups, self._stacked)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        flat = self.graph._flatten_args(*args, **kwargs)
        # a loop's values stay rows of its stacked result: every iteration in order is
        # that result, not T row picks stacked again (a program growing with T)
        values = self.graph._values_at(self.vars, flat, rows=True)
        return {  # (an argument selected: a JAX array, not the caller's, see returned)
            key: stack_rows([values[j] for j in group])
            if many
            else returned(row_value(values[group[0]]))
            for key, group, many in zip(self.keys, self._groups, self._stacked)
        }


class PatchFunction(TakesArguments):
    """``p(patches, *args, **kwargs) -> outputs``: see :meth:`Graph.patch_fn`."""

    _kind = "patched"
    _patches_first = True

    def __init__(self, graph: Graph, selector: Selector):
        from ._loop_slice import _given
        from ._patch_graph import warn_if_differentiated, warn_if_patched_away

        self.graph = graph
        self.keys, self.vars, self._groups, self._stacked = _select.grouped(
            graph, selector, "patch_fn's selector"
        )
        self._key = selection_key(self.keys, self.vars, self._groups, self._stacked)
        warn_if_differentiated(graph, self.vars, "g.patch_fn")
        warn_if_patched_away(graph, self.vars, "g.patch_fn")
        self._sites = graph._sites_of(self.vars)
        self._fns = [_given(v.shape, v.dtype) for v in self.vars]

    def __call__(self, patches: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        graph = self.graph
        if not isinstance(patches, dict):
            got = (
                f"an array ({patches.aval.str_short()}, traced)"  # (under jit: a tracer's type)
                if isinstance(patches, jax.core.Tracer)
                else type(patches).__name__
            )
            raise SliceError(
                f"patches must be a dict {{selector: value}}, got {got}; "
                f"keys: {', '.join(map(repr, self.keys))}"
            )
        unknown = [k for k in patches if k not in self.keys]
        if unknown:
            key = unknown[0]
            glob = isinstance(key, str) and any(fnmatch.fnmatchcase(k, key) for k in self.keys)
            fix = (
                f"a glob given alone keys each var it matches by its name; to patch them "
                f"with one stacked value, key it in a dict: g.patch_fn({{'name': {key!r}}})"
                if glob
                else "select it in g.patch_fn(...)"
            )
            raise SelectionError(
                f"cannot patch {key!r}: this patch function patches "
                f"{short_list([repr(k) for k in self.keys])}; {fix}"
            )
        values, keyed_by = [], {}
        edits = []
        for key, group, many in zip(self.keys, self._groups, self._stacked):
            if key not in patches:
                continue
            given = patches[key]
            if many:  # one row per var the key selects, as values_fn stacks them
                given = _array(given, key, f"leading axis {len(group)}, a row per var")
                if given.shape[:1] != (len(group),):
                    raise SliceError(
                        f"the patch for {key!r} is stacked over the {len(group)} vars it "
                        f"selects: give an array of leading axis {len(group)}, got shape "
                        f"{given.shape}"
                    )
            for j in group:
                other = keyed_by.setdefault(self.vars[j].index, key)
                if other != key:  # keys may overlap; a call patches a value once
                    raise SelectionError(
                        f"the patches for {other!r} and {key!r} both patch "
                        f"{self.vars[j].name!r}: a value is patched once, give one of them"
                    )
            ranged = iteration_run([self._sites[j] for j in group]) if many else None
            if ranged is not None:  # iterations t..u of one loop value: one edit, the
                # patch whole as the loop's rows (an edit per iteration grew with T)
                v = self.vars[group[0]]
                edits.append(Edit(ranged, "apply", self._fns[group[0]], (Extra(len(values)),)))
                values.append(_patch_value(given, key, v, rows=len(group)))
                continue
            for k, j in enumerate(group):
                # a patch inside a cond branch or a while trip applies when that path
                # runs, as g.replace's does (arguments that take another leave it unused)
                edits.append(Edit(self._sites[j], "apply", self._fns[j], (Extra(len(values)),)))
                values.append(_patch_value(given[k] if many else given, key, self.vars[j]))
        flat = graph._flatten_args(*args, **kwargs)
        outs, _ = graph._structure.with_edits(*edits).run(flat, values)
        return _select.unflatten(graph._out_tree, outs)


class AttributionFunction(Made):
    """``a(clean_args, corrupt_args, **kwargs) -> {key: attribution}``: see
    :meth:`Graph.attribution_fn`."""

    _kind = "attribution"

    def __init__(self, graph: Graph, out: Selector, wrt: Selector):
        from ._grads import GradsFunction

        self.graph = graph
        self.values = ValuesFunction(graph, wrt)
        # the corrupted run's values and gradients from one forward pass (two runs of a
        # scan are two while loops, which XLA does not merge: 1.3x the hand-written)
        self.grads = GradsFunction(graph, out, wrt, with_values=True)
        self._key = (self.values._key, self.grads._key)

    def __call__(self, clean_args: tuple, corrupt_args: tuple, **kwargs: Any) -> dict[str, Any]:
        for what, given in (("clean_args", clean_args), ("corrupt_args", corrupt_args)):
            if not isinstance(given, tuple):
                raise SliceError(
                    f"{what} must be a tuple of the traced function's arguments, got "
                    f"{type(given).__name__}; write ({what[:-5]}_x,) for one argument"
                )
        clean = self.values(*clean_args, **kwargs)
        corrupt, grads = self.grads.values_and_grads(*corrupt_args, **kwargs)
        # at a complex value, JAX's gradient (∂f/∂x − i·∂f/∂y) times a change is a
        # first-order change of the real output in its real part only
        return {key: _real((clean[key] - corrupt[key]) * grads[key]) for key in clean}


def _real(x: Any) -> Any:
    return jnp.real(x) if jnp.iscomplexobj(x) else x


def _array(x: Any, key: str, wanted: str) -> Any:
    """The patch ``x`` for ``key`` as an array; a SliceError asking for ``wanted``."""
    try:
        return jnp.asarray(x)
    except OverflowError:  # a Python int past int32 (x64 off): JAX's bare error
        what = f"is the Python int {x}" if isinstance(x, int) else f"({x}) holds a Python int"
        raise SliceError(
            f"the patch for {key!r} {what}, which JAX takes as an int32 and which that does "
            f"not hold; give it as an array of {wanted}"
        ) from None
    except (TypeError, ValueError):  # None, a string, an object JAX takes no array of
        raise SliceError(
            f"the patch for {key!r} is {type(x).__name__}, not an array: give one of {wanted}"
        ) from None


def _patch_value(x: Any, key: str, v: Var, rows: int = 0) -> Any:
    """``x`` as a value of var ``v`` (``rows`` values of it stacked): its shape, its
    dtype (a float patch of an integer var, or a complex one of a real var, is an error
    rather than a silent cast)."""
    C.refuses_x64(x, v.dtype, f"the patch for {key!r}")
    refuse_wrapping(f"the patch for {key!r} ({v.dtype})", v.dtype, x)
    x = _array(x, key, f"the var's shape {v.shape} and dtype {v.dtype}")
    if x.shape != ((rows,) if rows else ()) + v.shape:
        wanted = f"a row per var, shape {(rows, *v.shape)}" if rows else "the var's shape"
        raise SliceError(
            f"the patch for {key!r} has shape {x.shape}, the var has shape {v.shape}; "
            f"give a value of {wanted} (vmap over patches to sweep many)"
        )
    if x.dtype == v.dtype:  # (also a typed PRNG key, which has no astype)
        return C.resharded_like(x, v.aval, stacked=bool(rows))
    if is_key(v.dtype) or is_key(x.dtype):  # no cast makes a key of a value, or back
        fix = "give a key of the var's kind" if is_key(v.dtype) else not_a_key(v.dtype)
    elif jnp.can_cast(x.dtype, v.dtype, casting="same_kind"):
        return C.resharded_like(x.astype(v.dtype), v.aval, stacked=bool(rows))
    else:
        fix = "cast the patch"
    raise SliceError(f"the patch for {key!r} is {x.dtype}, the var is {v.dtype}; {fix}")
