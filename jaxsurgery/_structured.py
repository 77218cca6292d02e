"""The structured program: the traced, nested jaxpr, with edits, is what runs.

The flat program (:mod:`jaxsurgery._program`) is an *index*: it names every value,
per loop iteration and per call, and finds slice windows. Whatever must hold for
arguments other than the traced ones (``as_function``, ``replace``, ``grads_fn``, a
slice's context under ``bind``) runs the nested jaxpr that ``make_jaxpr`` produced,
with *edits* applied only where the user cut or patched:

* a flat var maps to a :class:`Site`: the equations on the way to its jaxpr (a call,
  the ``t``-th iteration of a loop, the ``k``-th branch of a ``cond``) and the nested
  vars that hold it there;
* an :class:`Edit` at a site replaces the value (``new = fn(*reads)``, reads being
  values at the same site level or extra inputs), exposes it as an extra result, or
  reports whether the run reached it (a *hit*, for path guards);
* :func:`run` interprets the nested jaxpr with JAX itself (traceable, jittable):
  equations without an edit inside are evaluated as they are (a ``jit``, a
  ``custom_jvp``/``custom_vjp`` call keeps its rule; a loop stays a loop; a ``cond``
  decides again), and an equation with an edit inside is rebuilt around it: a call's
  body is run inline (a custom rule is then bypassed: :attr:`Structured.notes` says
  so), a ``scan`` gets per-iteration masks and stacked values as extra ``xs`` (edits at
  many iterations of one value merge into one input), a ``while_loop`` runs the few
  trips holding edits one by one between two plain loops (a slice inside a trip holds
  no loop, so reverse mode works on it) or, for edits far apart, carries an iteration
  counter, a ``cond`` gets its branch rebuilt and stays a ``cond``.

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def f(p, y):
    ...     return jax.lax.cond(p > 0, jnp.sin, jnp.cos, y)
    >>> g = js.trace(f, 1.0, 0.0)       # traced on the sin branch
    >>> float(g.as_function()(-1.0, 0.0))   # decides again: cos(0)
    1.0

Sharp edges:
    * An edit reads values of its own site level (same call, same iteration) or extra
      inputs; a patch reading values of another iteration is refused.
    * A value made inside a ``cond`` branch or a ``while_loop`` iteration exists only
      on that path: exposing or cutting it for arguments that take another path is an
      error (:class:`~jaxsurgery.SliceError` eagerly; under ``jit`` the run fails with
      the same message through a ``jax.debug.callback``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from ._eager import eval_jaxpr, per_jaxpr, run_eqns
from ._errors import SliceError

#: a scan's values put in at no more than this many iterations (a slice's inputs) run
#: those iterations one by one, as they are, plain scans between them (masked, the value
#: an input replaces would still be computed there: see _Interpreter._spans)
_FEW_ITERATIONS = 16

#: edits of a ``while_loop`` spanning fewer trips than this run those trips one by one
#: (see ``_Interpreter._few_trips``); more run inside one loop that counts its trips
FEW_TRIPS = 4


@dataclass(frozen=True)
class Step:
    """One level down the nested program: equation ``eqn`` of the current jaxpr, into
    its body (a call), its ``iteration``-th trip (a loop) or its ``branch`` (a cond).

    ``iteration`` may be a ``range`` of a scan's iterations: the same edit at each of
    them, one edit for every step of a 10k-step loop rather than 10k edits merged
    again. An ``"apply"`` edit then reads its extra inputs stacked by iteration; an
    ``"expose"`` edit gives the stacked values (a ``while_loop`` takes ``"apply"``
    ranges only). Into a ``while_loop``, ``None`` is every trip it runs (``g.rewrite``
    of its body), however many the arguments make.
    """

    eqn: int
    branch: int | None = None
    iteration: int | range | None = None


@dataclass(frozen=True)
class Site:
    """Where a value lives in the nested program: the steps to its jaxpr and the vars
    of that jaxpr that hold it (several when a call returns one value twice)."""

    steps: tuple[Step, ...]
    vars: tuple[Any, ...]
    #: steps into a cond branch or a while_loop trip: the value exists on that path only
    path_bound: tuple[int, ...] = ()
    #: the value before the program's patches there from the ``before``-th on (0:
    #: before every patch; ``<name>.unpatched``), None: after all of them. Edits here
    #: run just before that patch (see ``_in_patch_order``)
    before: int | None = None

    def at(self, before: int | None) -> Site:
        """The same place, holding its value before the ``before``-th patch there
        (None: after every patch, the value the program reads)."""
        return dataclasses.replace(self, before=before)


@dataclass(frozen=True)
class Extra:
    """The k-th extra input of an edited program (appended after the arguments), or
    its ``row`` (edits at many iterations of one value read the rows of one input)."""

    k: int
    row: int | None = None


@dataclass(frozen=True)
class Row:
    """Row ``row`` of an extra input, taken only where needed: a loop that merges the
    edits reading rows 0..n-1 of one input in order stacks that input itself."""

    array: Any
    row: int

    def value(self) -> Any:
        return self.array[self.row]


def _value(x: Any) -> Any:
    return x.value() if isinstance(x, Row) else x


class _Exposed(dict):
    """Exposed values by edit; a loop's exposures are rows of one stacked result,
    taken when read (asking for one of 10 000 iterations takes one row)."""

    def __getitem__(self, key: Any) -> Any:
        return _value(super().__getitem__(key))

    def raw(self, key: Any) -> Any:
        """The value, or the row of a stacked result that holds it (see row_value)."""
        return super().__getitem__(key)


def row_value(x: Any) -> Any:
    """A value from :meth:`_Exposed.raw`: the row taken, or the value as it is."""
    return _value(x)


def gathered(values: Sequence[Any]) -> list[Any]:
    """Values from :meth:`_Exposed.raw`, the rows of one stacked result taken at once
    (the trips checked reached of a while_loop's 4 000 values: one check, not 4 000)."""
    out, rows = [], {}
    for x in values:
        if isinstance(x, Row):
            rows.setdefault(id(x.array), (x.array, []))[1].append(x.row)
        else:
            out.append(x)
    return out + [a[np.asarray(r)] for a, r in rows.values()]


def iteration_run(sites: Sequence[Site]) -> Site | None:
    """One site for the iterations ``t, t+1, ...`` of one loop value, in order (so that
    the edit's cost does not grow with their number), or None. Values before patches
    (``h@*.unpatched``) stay a site per iteration, each read before its iteration's
    patch (the running loop still makes them one edit of its body)."""
    if len(sites) < 2 or any(
        s is None or not s.steps or s.path_bound or s.before is not None for s in sites
    ):
        return None
    first = sites[0].steps[-1]
    if not isinstance(first.iteration, int) or any(
        s.steps[:-1] != sites[0].steps[:-1]
        or (s.steps[-1].eqn, s.steps[-1].branch) != (first.eqn, first.branch)
        or s.vars != sites[0].vars
        for s in sites
    ):
        return None  # not the iterations of one loop value
    its = [s.steps[-1].iteration for s in sites]
    if its != list(range(first.iteration, first.iteration + len(sites))):
        return None
    step = Step(first.eqn, first.branch, range(its[0], its[-1] + 1))
    return Site((*sites[0].steps[:-1], step), sites[0].vars, before=sites[0].before)


def loop_value(site: Site) -> tuple | None:
    """What the iterations of one loop value have in common (None: not in a loop)."""
    if not site.steps or site.steps[-1].iteration is None:
        return None
    last = site.steps[-1]
    # the value before a patch there (``name@t.unpatched``) is another value
    return (*site.steps[:-1], Step(last.eqn, last.branch)), site.vars, site.before


def stack_rows(vals: Sequence[Any]) -> Any:
    """``jnp.stack(vals)``, each run of rows ``r, r+1, ...`` of one input taken as one
    slice of it (the input itself when it is all of it): one op per run whatever its
    length (stacking the rows of a 10k-step input one by one is what made compile time
    grow with T; a loop's last value can be its result, not a row)."""
    runs: list[list[Any]] = []  # [input, first row, end] or [value, None, None]
    for v in vals:
        last = runs[-1] if runs else None
        if isinstance(v, Row) and last and last[0] is v.array and last[2] == v.row:
            last[2] += 1
        else:
            runs.append([v.array, v.row, v.row + 1] if isinstance(v, Row) else [v, None, None])
    parts: list[Any] = []
    singles: list[Any] = []  # values one after another: stacked as one op
    for v, a, b in runs:
        if a is None:
            singles.append(v)
            continue
        if singles:
            parts.append(_stacked(singles))
            singles = []
        parts.append(v if (a, b) == (0, v.shape[0]) else jax.lax.slice_in_dim(v, a, b))
    if singles:
        parts.append(_stacked(singles))
    if len(parts) == 1:
        return parts[0]
    return jnp.concatenate(parts)


def _stacked(vals: list[Any]) -> Any:
    """``jnp.stack(vals)``; on concrete arrays one compiled call (an eager ``jnp.stack``
    dispatches an op per value: the values of 100 layers took 5x the function)."""
    if any(isinstance(v, jax.core.Tracer) for v in vals):
        return jnp.stack(vals)
    return _STACK(vals)


_STACK = jax.jit(jnp.stack)


@dataclass(eq=False)
class Edit:
    """A change at a site: ``kind`` is ``"apply"`` (the value becomes ``fn(*reads)``;
    reads are nested vars of the site's jaxpr or :class:`Extra` inputs), ``"expose"``
    (the value is returned, keyed by this edit) or ``"hit"`` (whether the run got
    there is returned)."""

    site: Site
    kind: str
    fn: Any = None  # a closed jaxpr, for "apply"
    reads: tuple[Any, ...] = ()
    aval: Any = None  # of the exposed value
    #: an "apply" that changes no value where it is differentiated (``v + eps`` at
    #: ``eps = 0``): inside a custom_jvp/custom_vjp call the call keeps its rule
    perturbation: bool = False

    def __post_init__(self) -> None:
        if self.kind == "hit":
            self.aval = jax.ShapeDtypeStruct((), jnp.bool_)
        elif self.aval is None and self.site.vars:
            self.aval = self.site.vars[0].aval


@dataclass(eq=False)
class _Pending:
    """An edit as one level of the interpreter sees it."""

    steps: tuple[Step, ...]
    edit: Edit
    extras: list[Any]  # values of the edit's Extra reads, in this frame
    active: Any = None  # a traced bool (a masked loop iteration), or None: always
    key: Any = None  # where exposures go (the edit, or a merged group)

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = self.edit


@dataclass
class Structured:
    """The nested program with edits: ``run(flat_args, extras) -> (outputs, exposed)``."""

    closed: Any
    edits: tuple[Edit, ...] = ()
    notes: list[str] = field(default_factory=list)
    #: traced trip count of each unrolled while_loop, by its steps (iteration None)
    while_trips: dict = field(default_factory=dict)

    def with_edits(self, *edits: Edit, under: Sequence[Edit] = ()) -> Structured:
        """The same program with more edits after these (edits at a site's value
        before a patch run before that patch: see :attr:`Site.before`). Each of
        ``under`` (a rewrite of a loop's body value at every iteration, which
        recomputes it) goes before the first patch of that value at any iteration, so
        the patch stays on top, as it does on a value the index lists."""
        placed = list(self.edits)
        for e in under:
            at = next((i for i, x in enumerate(placed) if patch_of(x, e)), len(placed))
            placed.insert(at, e)
        return Structured(self.closed, (*placed, *edits), list(self.notes), self.while_trips)

    def run(
        self,
        flat_args: Sequence[Any],
        extras: Sequence[Any] = (),
        outputs: bool = True,
        callbacks: bool = True,
    ) -> tuple[list, dict]:
        """Outputs of the (edited) program and the exposed values by edit.

        With ``outputs=False`` only the exposed values are computed: top-level
        equations that none of them needs do not run (and no outputs are returned),
        except effects: with ``callbacks=False`` (values asked for, as ``g.value``)
        also host callbacks none of them reads do not run.
        """
        exposed: dict[Any, Any] = _Exposed()
        pending = [
            _Pending(
                e.site.steps,
                e,
                [
                    extras[r.k] if r.row is None else Row(extras[r.k], r.row)
                    for r in e.reads
                    if isinstance(r, Extra)
                ],
            )
            for e in _in_patch_order(self.edits)
        ]
        notes: list[str] = []
        # (values put in, not computed from the values they replace: a slice's inputs)
        lone = sum(_put_in(e) for e in self.edits) <= 1
        outs = _Interpreter(notes, callbacks, lone).run(
            self.closed.jaxpr, self.closed.consts, flat_args, pending, exposed, outputs
        )
        for n in notes:
            if n not in self.notes:
                self.notes.append(n)
        # a constant output (a Literal) comes out as the Python or numpy value it holds;
        # the function (and jax.jit of it) returns an array
        return [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in outs], exposed


def _in_patch_order(edits: Sequence[Edit]) -> list[Edit]:
    """``edits`` in the order they apply: an edit at a value before the ``k``-th patch of
    its site (``Site.before``) just before that ``"apply"`` edit of the same site. The
    program's own patches come first in ``edits``, so they are the first applies of a
    site; a later apply there (a slice input, a perturbation) reads the latest value."""
    early = [e for e in edits if e.site.before is not None]
    if not early:
        return list(edits)
    waiting: dict[tuple[Site, int], list[Edit]] = {}
    for e in early:
        waiting.setdefault((e.site.at(None), e.site.before), []).append(e)
    applies: dict[Site, int] = {}
    ordered = []
    for e in edits:
        if e.site.before is not None:
            continue
        if e.kind == "apply":
            k = applies.get(e.site, 0)
            applies[e.site] = k + 1
            ordered += waiting.pop((e.site, k), ())
        ordered.append(e)
    for rest in waiting.values():  # (a value past the last patch: the latest one)
        ordered += rest
    return ordered


def check_hits(hits: Sequence[tuple[Any, bool, str]]) -> None:
    """Raise a SliceError when a hit is not as expected (``(value, expected, message)``).

    Concrete values are checked now; traced ones when the program runs (a
    ``jax.debug.callback`` raising the same message). JAX runs callbacks on a CPU
    device: where the platforms in use leave the CPU out (``JAX_PLATFORMS=cuda``), a
    traced check is a SliceError now, saying so (JAX's own error came at run time).
    """
    for value, expected, message in hits:
        if isinstance(value, jax.core.Tracer):
            if not _callbacks_run():
                raise SliceError(
                    "this function keeps values made on the traced path of a cond or "
                    "while_loop, and under a transform checks each call's path with a "
                    "jax.debug.callback, which JAX runs on a CPU device; the platforms in "
                    "use (JAX_PLATFORMS, jax_platforms) leave the CPU out: list it too "
                    "(JAX_PLATFORMS=cuda,cpu), or call the function outside jit and vmap"
                )
            jax.debug.callback(_raise_unless, value, expected, message)
        elif bool(np.asarray(value).all()) != expected:
            raise SliceError(message)


@functools.cache
def _callbacks_run() -> bool:
    """Whether JAX has a CPU device to run host callbacks on."""
    try:
        jax.devices("cpu")
    except RuntimeError:
        return False
    return True


def _raise_unless(value: Any, expected: bool, message: str) -> None:
    if bool(np.asarray(value).all()) != expected:
        raise SliceError(message)


class _Interpreter:
    """Runs a nested jaxpr with pending edits, rebuilding what holds an edit."""

    def __init__(self, notes: list[str], callbacks: bool = True, lone: bool = False):
        self.notes = notes
        self.callbacks = callbacks  # whether host callbacks no exposed value reads run
        #: whether at most one value is put in (see _scan): then nothing a value put in
        #: replaces is computed from another one
        self.lone = lone

    def run(
        self,
        jaxpr: Any,
        consts: Sequence[Any],
        args: Sequence[Any],
        pending: list[_Pending],
        exposed: dict,
        outputs: bool = True,
    ) -> list[Any]:
        if not pending:
            return eval_jaxpr(jaxpr, consts, *args) if outputs else []
        env: dict[Any, Any] = {}
        for v, x in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args]):
            env[v] = x
        here = [p for p in pending if not p.steps]
        below: dict[int, list[_Pending]] = {}
        for p in pending:
            if p.steps:
                below.setdefault(p.steps[0].eqn, []).append(p)
        made = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
        triggers: dict[int, list[_Pending]] = {}
        roots: set[Any] = set()
        for p in here:
            deps = [*p.edit.site.vars, *(r for r in p.edit.reads if not isinstance(r, Extra))]
            roots.update(deps)
            triggers.setdefault(max((made.get(v, -1) for v in deps), default=-1), []).append(p)
        # an equation holding only patches (no value to expose, no path to check) runs
        # only where something asked for reads what it makes
        exposing = {i for i, ps in below.items() if any(p.edit.kind != "apply" for p in ps)}
        live, wanted = (
            _live(jaxpr, roots, exposing, self.callbacks) if not outputs else (None, None)
        )

        def read(a: Any) -> Any:
            return a.val if isinstance(a, C.Literal) else env[a]

        batch: list[int] = []  # (positions: the same run again reuses its jaxpr)

        def flush() -> None:
            if batch:
                eqns = jaxpr.eqns
                eval_equations([eqns[k] for k in batch], env, (jaxpr, tuple(batch)))
                batch.clear()

        self._apply(triggers.get(-1, ()), env, exposed)
        for i, eqn in enumerate(jaxpr.eqns):
            if live is not None and not live[i]:
                continue
            if i in below:
                flush()
                # values asked for (outputs=False): a loop whose results nothing needs
                # stops after its last edited iteration (its callbacks, its cost)
                tail = wanted is None or wanted[i] or _has_effects(eqn, self.callbacks)
                invals = [read(a) for a in eqn.invars]
                # (a scan's rows that nothing reads: see _scan)
                rows = eqn.primitive.name != "scan" or _rows_read(eqn, jaxpr)
                outs = self._rebuild(eqn, invals, below[i], exposed, tail, rows)
                for v, x in zip(eqn.outvars, outs):
                    if not isinstance(v, C.DropVar):
                        env[v] = x
            else:
                batch.append(i)
            if i in triggers:
                flush()
                self._apply(triggers[i], env, exposed)
        flush()
        return [read(a) for a in jaxpr.outvars] if outputs else []

    @staticmethod
    def _apply(pending: Sequence[_Pending], env: dict, exposed: dict) -> None:
        for p in pending:
            edit = p.edit
            if edit.kind == "hit":
                exposed[p.key] = jnp.asarray(True) if p.active is None else p.active
            elif edit.kind == "expose":
                exposed[p.key] = env[edit.site.vars[0]]
            else:
                extras = iter(p.extras)
                args = [
                    _value(next(extras)) if isinstance(r, Extra) else env[r] for r in edit.reads
                ]
                fn = functools.partial(_closed_eval, edit.fn)
                if p.active is None:
                    new = fn(*args)[0]
                elif _selectable(edit):  # (a select: no cond to run at every iteration)
                    new = jnp.where(p.active, fn(*args)[0], env[edit.site.vars[0]])
                else:  # a masked iteration: the patch runs only where it is active (a
                    # where would differentiate it everywhere: sqrt at a negative value
                    # makes a NaN gradient, even times the zero cotangent)
                    old = env[edit.site.vars[0]]
                    new = jax.lax.cond(
                        p.active, lambda a, fn=fn: fn(*a)[0], lambda a, old=old: old, args
                    )
                for v in edit.site.vars:
                    env[v] = new

    # -- equations holding an edit --------------------------------------------------------
    def _rebuild(
        self,
        eqn: Any,
        invals: list[Any],
        pending: list[_Pending],
        exposed: dict,
        tail: bool,
        rows: bool = True,
    ) -> list[Any]:
        """The results of ``eqn`` holding edits; ``tail=False``: only the exposed
        values are needed (no results: what runs after the last edit is left out);
        ``rows=False``: a scan's stacked results are not read."""
        name = eqn.primitive.name
        if name in C.CALL_PRIMITIVES:
            if name in C.CUSTOM_RULE_PRIMITIVES and all(
                p.edit.perturbation for p in pending if p.edit.kind == "apply"
            ):
                if eqn.effects:  # (inline, the rule would go for every gradient)
                    self.notes.append(
                        f"the {name} call {C.call_name(eqn)!r} has effects (a print, a "
                        "callback) and runs more than once here: once with its rule, "
                        "once for what is perturbed or read inside it"
                    )
                return self._perturbed_call(eqn, invals, pending, exposed)
            if name in C.CUSTOM_RULE_PRIMITIVES:
                self.notes.append(
                    f"an edit inside the {name} call {C.call_name(eqn)!r} bypasses its "
                    "custom derivative rule: its primal body is differentiated"
                )
            body = C.called_jaxpr(eqn)
            inner = [_descend(p) for p in pending]
            return self.run(body.jaxpr, body.consts, invals, inner, exposed, tail)
        if name == "cond":
            return self._cond(eqn, invals, pending, exposed)
        if name == "scan":
            return self._scan(eqn, invals, pending, exposed, tail, rows)
        if name == "while":
            return self._while(eqn, invals, pending, exposed, tail)
        raise SliceError(f"cannot edit inside a {name} equation")  # pragma: no cover

    def _perturbed_call(
        self, eqn: Any, invals: list[Any], pending: list[_Pending], exposed: dict
    ) -> list[Any]:
        """A custom_jvp/custom_vjp call holding perturbations (``v + eps``, which change
        no value at ``eps = 0``) and values read out of it, but no patch: its results
        are the call's, with its rule, plus what the perturbed body adds,
        ``b - stop_gradient(b)`` (zero), whose derivative in the ``eps`` is the body's.
        So ``eps``'s gradient is what the body gives, and everything else keeps the
        rule (a value before the call is differentiated through the rule, a value
        after it through later rules). A value read out of the call (an ``out`` of
        ``g.grads`` inside it) comes from the body run on the call's operands: its
        derivative is the body's, the only one it has."""
        env = {a: x for a, x in zip(eqn.invars, invals) if isinstance(a, C.Var)}
        eval_equations([eqn], env)
        body = C.called_jaxpr(eqn)
        applies = [_descend(p) for p in pending if p.edit.kind == "apply"]
        if len(applies) < len(pending):  # values read out: the body, differentiated
            inner = [_descend(p) for p in pending]
            self.run(body.jaxpr, body.consts, invals, inner, exposed, outputs=False)
        out = [env[v] if not isinstance(v, C.DropVar) else None for v in eqn.outvars]
        if not applies:
            return out
        fixed = [jax.lax.stop_gradient(x) for x in invals]
        moved = self.run(body.jaxpr, body.consts, fixed, applies, {})
        for k, b in enumerate(moved):
            if out[k] is None:
                out[k] = b
            elif jnp.issubdtype(jnp.result_type(b), jnp.inexact):
                out[k] = out[k] + (b - jax.lax.stop_gradient(b))
        return out

    def _cond(self, eqn: Any, invals: list[Any], pending: list[_Pending], exposed: dict):
        branches = eqn.params["branches"]
        by_branch: dict[int, list[_Pending]] = {}
        for p in pending:
            by_branch.setdefault(p.steps[0].branch, []).append(_descend(p))
        keys = [(p.key, p.edit.aval) for p in pending if p.edit.kind != "apply"]

        def branch_fn(k: int, closed: Any) -> Callable[..., Any]:
            def fn(*ops: Any) -> Any:
                sub: dict[Any, Any] = {}
                outs = self.run(closed.jaxpr, closed.consts, ops, by_branch.get(k, []), sub)
                return outs, [
                    _value(sub[key]) if key in sub else _zeros(aval) for key, aval in keys
                ]

            return fn

        fns = [branch_fn(k, closed) for k, closed in enumerate(branches)]
        outs, found = jax.lax.switch(invals[0], fns, *invals[1:])
        exposed.update({key: x for (key, _), x in zip(keys, found)})
        return outs

    def _scan(
        self,
        eqn: Any,
        invals: list[Any],
        pending: list[_Pending],
        exposed: dict,
        tail: bool,
        rows: bool,
    ):
        """A scan holding edits: the iterations before the first edited one and after
        the last run as plain scans (the context and the rest of a slice); only the
        edited span runs masked. Without ``tail``, the iterations after it do not run.

        Where one value is put in (a slice's input), or only perturbations, and its
        stacked results are read (``rows``), the edited span and the rest run as one
        scan, selecting the values at their iterations: run alone, the rest's rows would
        be concatenated with the span's (a copy of every row), for one iteration more.
        Values put in at a few iterations run those iterations as they are (see
        :meth:`_spans`)."""
        params = eqn.params
        length = params["length"]
        n_consts, n_carry = C.scan_layout(eqn)
        consts = invals[:n_consts]
        carry, xs = invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
        body = params["jaxpr"].jaxpr
        entries = set(body.invars[n_consts : n_consts + n_carry])
        spans = self._spans(length, params["reverse"], pending, tail, rows, entries)
        ys: dict[int, list[Any]] = {}
        for a, b, edits in spans:
            if a == b:
                continue
            part = [x[a:b] for x in xs] if (a, b) != (0, length) else xs
            if edits is None:
                outs = eqn.primitive.bind(*consts, *carry, *part, **{**params, "length": b - a})
            elif b - a == 1:  # one edited iteration: its body, as it is
                body = params["jaxpr"]
                inner = [_descend(p) for p in edits]
                x_t = [x[a] for x in xs]
                outs = self.run(body.jaxpr, body.consts, [*consts, *carry, *x_t], inner, exposed)
                outs = [*outs[:n_carry], *(y[None] for y in outs[n_carry:])]
            else:
                shifted = [_shift(p, -a) for p in edits]
                outs = self._masked_scan(params, b - a, consts, carry, part, shifted, exposed)
            carry, ys[a] = list(outs[:n_carry]), list(outs[n_carry:])
        parts = [ys[a] for a in sorted(ys)]
        stacked = (
            [p[0] if len(parts) == 1 else jnp.concatenate(p) for p in zip(*parts)]
            if parts and parts[0]
            else []
        )
        return [*carry, *stacked] if tail else []

    def _spans(
        self,
        length: int,
        reverse: bool,
        pending: list[_Pending],
        tail: bool,
        rows: bool,
        entries: set[Any],
    ) -> list[tuple[int, int, list[_Pending] | None]]:
        """``[(first, end, edits or None)]``, the iterations of a scan holding edits in
        the order they run: plain scans (None), an iteration run as it is (with its
        edits), or a masked span (see :meth:`_scan`). ``entries``: the body's carry
        parameters."""
        spans = [_span(p) for p in pending]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        single = all(_one_iteration(p) for p in pending)
        put_in = [p for p in pending if _put_in(p.edit)]
        if (
            tail
            and rows
            and single
            and (hi - lo > 1 or len(pending) == 1)
            and all(_selectable(p.edit) for p in pending)
            and (self.lone or not put_in)
        ):
            # (several at one iteration run it as it is: one may shield another, which
            # a select would read: see LoopSlice's notes. A value put in while another
            # is too: the value it replaces, still computed at its iteration, may be
            # computed from the other, and differentiated there with a zero cotangent:
            # NaN where its derivative is infinite, sqrt(0); run as it is, it is not)
            found = [(0, lo, None), (lo, length, pending)]
            return [(hi, length, None), (0, hi, pending)] if reverse else found
        found = self._around_inputs(length, reverse, pending, entries) if put_in else None
        if found is None:
            found = [(0, lo, None), (lo, hi, pending), (hi, length, None)]
        found = found[::-1] if reverse else found
        return found if tail else found[:-1]

    @staticmethod
    def _around_inputs(
        length: int, reverse: bool, pending: list[_Pending], entries: set[Any]
    ) -> list[tuple[int, int, list[_Pending] | None]] | None:
        """Spans (in iteration order) running the iterations values are put in at as
        they are, with their edits, and so the iteration before one put in as the carry
        entering it: the value put in replaces is not computed (masked, it would be, from
        what the iteration reads, maybe another input: a zero cotangent times an
        infinite derivative there, sqrt(0), makes that input's gradient NaN). Between
        them: plain scans, or the span of the other edits there, masked. None where
        that cannot be: values put in at many iterations, or over a range of them, or
        another edit spanning one of those iterations (every iteration's patch).

        The iterations of a few patches that compute their value without the old one
        (a constant) run as they are too: what such a patch cuts off from the inputs (a
        carry) is then known after it, so a slice to a value inside the loop after it
        says it depends on no input, as a flat cut does (masked with the iterations after
        it, the loop carried the inputs on). A patch of the old value (``v * 0.9``) cuts
        nothing: it runs masked, and costs no copy of the body."""
        put_in = [p for p in pending if _put_in(p.edit)]
        at = {p.steps[0].iteration for p in put_in}
        if not all(map(_one_iteration, put_in)) or len(at) > _FEW_ITERATIONS:
            return None
        at |= {
            t
            for p in put_in
            if len(p.steps) == 1 and all(v in entries for v in p.edit.site.vars)
            for t in (p.steps[0].iteration + (1 if reverse else -1),)
            if 0 <= t < length
        }
        patched = {
            p.steps[0].iteration
            for p in pending
            if _one_iteration(p) and not _put_in(p.edit) and _replaces(p.edit)
        }
        if len(at | patched) <= _FEW_ITERATIONS:
            at |= patched
        found: list[tuple[int, int, list[_Pending] | None]] = []
        placed, start = 0, 0
        for t in [*sorted(at), length]:
            between = [p for p in pending if start <= _span(p)[0] and _span(p)[1] <= t]
            if between:
                a, b = min(_span(p)[0] for p in between), max(_span(p)[1] for p in between)
                found += [(start, a, None), (a, b, between), (b, t, None)]
            else:
                found.append((start, t, None))
            if t < length:
                here = [p for p in pending if _span(p) == (t, t + 1)]
                found.append((t, t + 1, here))
                placed += len(here)
            placed += len(between)
            start = t + 1
        return found if placed == len(pending) else None

    def _masked_scan(
        self,
        params: dict,
        length: int,
        consts: list[Any],
        init: list[Any],
        xs: list[Any],
        pending: list[_Pending],
        exposed: dict,
    ) -> list[Any]:
        body = params["jaxpr"]
        n_carry = len(init)
        groups = _merge(pending)
        masks, stacked = [], []
        #: per group put in at one iteration: that iteration (its inputs are not
        #: stacked: the step compares the iteration with it), else None
        single: list[int | None] = []
        for its, members in groups:
            everywhere = sorted(its) == list(range(length))
            one = len(its) == 1 and _one_iteration(members[0])
            single.append(its[0] if one else None)
            masks.append(None if everywhere or one else np.isin(np.arange(length), its))
            rows = (
                members[0].extras  # a ranged edit's inputs: already stacked by iteration
                if isinstance(members[0].steps[0].iteration, range)
                else [stack_rows(vals) for vals in zip(*(m.extras for m in members))]
            )
            stacked.append([] if one else [_scatter(length, its, x) for x in rows])
        exposing = [(i, g) for i, g in enumerate(groups) if g[1][0].edit.kind != "apply"]
        counted = any(t is not None for t in single)

        def step(carry: list, x: tuple) -> tuple:
            x_t, mask_t, extras_t, t = x
            sub: dict[Any, Any] = {}
            inner = []
            for i, (_, members) in enumerate(groups):
                first = members[0]
                mask = mask_t[i] if single[i] is None else t == single[i]
                extras = extras_t[i] if single[i] is None else first.extras
                active = first.active if mask is None else _and(mask, first.active)
                inner.append(_Pending(first.steps[1:], first.edit, list(extras), active, key=i))
            outs = self.run(body.jaxpr, body.consts, [*consts, *carry, *x_t], inner, sub)
            return outs[:n_carry], (outs[n_carry:], [_value(sub[i]) for i, _ in exposing])

        carry, (ys, found) = jax.lax.scan(
            step,
            list(init),
            (
                list(xs),
                [None if m is None else jnp.asarray(m) for m in masks],
                stacked,
                jnp.arange(length, dtype=jnp.int32) if counted else None,
            ),
            length=length,
            reverse=params["reverse"],
        )
        for (_, (its, members)), values in zip(exposing, found):
            if isinstance(members[0].steps[0].iteration, range):  # the rows themselves
                whole = len(its) == length
                exposed[members[0].key] = (
                    values if whole else jax.lax.slice_in_dim(values, its[0], its[-1] + 1)
                )
                continue
            for t, m in zip(its, members):
                exposed[m.key] = Row(values, t)  # taken when read
        return [*carry, *ys]

    def _while(
        self, eqn: Any, invals: list[Any], pending: list[_Pending], exposed: dict, tail: bool
    ):
        """A while_loop holding edits (see :meth:`_scan` for ``tail``)."""
        params = eqn.params
        cond, body = params["cond_jaxpr"], params["body_jaxpr"]
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts = invals[:n_cond], invals[n_cond : n_cond + n_body]
        init = invals[n_cond + n_body :]
        # an edit of every trip (its step names no trip: g.rewrite in the body) applies
        # in each trip the loop runs, however many the arguments make
        every = [_descend(p) for p in pending if p.steps[0].iteration is None]
        pending = [p for p in pending if p.steps[0].iteration is not None]
        ranged = {p.key for p in pending if not _one_iteration(p)}
        if not tail:  # a patch after the last trip a value is asked at changes none of them
            last = max((_span(p)[1] for p in pending if p.edit.kind != "apply"), default=0)
            pending = [p for p in pending if p.edit.kind != "apply" or _span(p)[0] < last]
        groups = _merge([q for p in pending for q in _each_iteration(p)])
        at = {t for its, _ in groups for t in its}
        if not tail and not at:
            return []  # edits of every trip, whose results nothing needs
        if (
            not every
            and max(at) - min(at) < FEW_TRIPS
            and not any(isinstance(p.steps[0].iteration, range) for p in pending)
        ):
            return self._few_trips(eqn, invals, groups, exposed, tail)
        # each group's trips in order, its members' rows in that order (a trip's row is
        # found by a search, written in place: writing every row each trip made a loop
        # exposing all its 4 000 trips quadratic)
        orders = [np.argsort(its, kind="stable") for its, _ in groups]
        trips = [np.asarray(its)[order] for (its, _), order in zip(groups, orders)]
        stacked = [
            [stack_rows([vals[j] for j in order]) for vals in zip(*(m.extras for m in members))]
            for (_, members), order in zip(groups, orders)
        ]
        exposing = [(i, g) for i, g in enumerate(groups) if g[1][0].edit.kind != "apply"]
        slots = [C.zeros_of(m[0].edit.aval, stacked=len(its)) for _, (its, m) in exposing]

        last = max(at, default=0)  # read only without tail, where some trip is edited
        lanes = _lanes_apart(cond, groups)

        def cond_fn(state: tuple) -> Any:
            counter, carry, _, _ = state
            going = goes_on(cond, cond_consts, carry)
            return going if tail else going & (counter <= last)

        def body_fn(state: tuple) -> tuple:
            counter, carry, found, alone = state
            alone = _alone(lanes, alone, cond, cond_consts, carry)
            sub: dict[Any, Any] = {}
            inner = []
            hits = []
            for i, (_, members) in enumerate(groups):
                k, hit = _row_of(trips[i], counter)
                hits.append((k, hit))
                extras = [s[k] for s in stacked[i]]
                active = _hit_active(members[0].edit, _and(hit, members[0].active), alone)
                inner.append(_Pending(members[0].steps[1:], members[0].edit, extras, active, key=i))
            inner = [*every, *inner]  # the program's edits before what a request exposes
            carry = self.run(body.jaxpr, body.consts, [*body_consts, *carry], inner, sub)
            found = [
                jax.lax.dynamic_update_index_in_dim(
                    slot, jnp.where(hits[i][1], _value(sub[i]), slot[hits[i][0]]), hits[i][0], 0
                )
                for (i, _), slot in zip(exposing, found)
            ]
            return counter + 1, carry, found, alone

        alone = jnp.asarray(True) if lanes else None  # (each lane's own trips: _lanes_apart)
        _, carry, found, _ = jax.lax.while_loop(
            cond_fn, body_fn, (jnp.asarray(0), list(init), slots, alone)
        )
        for (i, (_, members)), values in zip(exposing, found):
            if members[0].key in ranged:  # a value at every trip: the rows themselves
                exposed[members[0].key] = values
                continue
            rows = np.empty(len(members), int)
            rows[orders[i]] = np.arange(len(members))  # (member j's row: its trip's rank)
            for m, row in zip(members, rows.tolist()):
                exposed[m.key] = Row(values, row)
        return carry if tail else []

    def _few_trips(
        self, eqn: Any, invals: list[Any], groups: list, exposed: dict, tail: bool
    ) -> list[Any]:
        """A ``while_loop`` whose edits are all in trips ``a..b`` (a few): the loop for
        up to ``a`` trips, each of trips ``a..b`` with its edits (a ``cond`` on whether
        the loop gets there), then the rest of the loop. What runs before and after the
        edited trips are plain loops, so a slice inside them holds no loop (JAX's
        reverse mode, which no ``while_loop`` has, works on it), and a value there costs
        ``a`` plain trips."""
        params = eqn.params
        cond, body = params["cond_jaxpr"], params["body_jaxpr"]
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts = invals[:n_cond], invals[n_cond : n_cond + n_body]
        at = sorted({t for its, _ in groups for t in its})

        def going(carry: Sequence[Any]) -> Any:
            return goes_on(cond, cond_consts, carry)

        def going_if(flag: Any, carry: Sequence[Any]) -> Any:
            """``flag & going(carry)``; with callbacks in the condition (a print), the
            condition runs only where ``flag`` holds, once per trip as in the loop."""
            if not cond.jaxpr.effects:
                return flag & going(carry)
            return jax.lax.cond(flag, going, lambda c: jnp.asarray(False), list(carry))

        def step(carry: Sequence[Any]) -> list[Any]:
            return C.jaxpr_as_fun(body)(*body_consts, *carry)

        lanes = _lanes_apart(cond, groups)
        trips, carry, alone = jax.lax.while_loop(
            lambda s: going_if(s[0] < at[0], s[1]),
            lambda s: (s[0] + 1, step(s[1]), _alone(lanes, s[2], cond, cond_consts, s[1])),
            (jnp.asarray(0), list(invals[n_cond + n_body :]), jnp.asarray(True) if lanes else None),
        )
        reached = trips == at[0]
        for t in range(at[0], at[-1] + 1):
            here = [m for its, members in groups for i, m in zip(its, members) if i == t]
            shown = [m for m in here if m.edit.kind != "apply"]
            alone = _alone(lanes, alone, cond, cond_consts, carry)

            def edited(
                carry: list[Any], here: list = here, alone: Any = alone
            ) -> tuple[list[Any], list[Any]]:
                sub: dict[Any, Any] = {}
                inner = [
                    _Pending(
                        m.steps[1:], m.edit, m.extras, _hit_active(m.edit, m.active, alone), key=n
                    )
                    for n, m in enumerate(here)
                ]
                out = self.run(body.jaxpr, body.consts, [*body_consts, *carry], inner, sub)
                found = [_value(sub[n]) for n, m in enumerate(here) if m.edit.kind != "apply"]
                return list(out), found

            def skipped(carry: list[Any], shown: list = shown) -> tuple[list[Any], list[Any]]:
                return list(carry), [_zeros(m.edit.aval) for m in shown]  # never got there

            reached = going_if(reached, carry)
            carry, found = jax.lax.cond(reached, edited, skipped, list(carry))
            for m, value in zip(shown, found):
                exposed[m.key] = value
        return jax.lax.while_loop(going, step, carry) if tail else []


def patch_of(x: Edit, body: Edit) -> bool:
    """Whether ``x`` patches the value a loop-body edit ``body`` (every iteration) edits,
    at some iterations: an earlier edit of every iteration (a rewrite) is not one."""
    return x.kind == "apply" and at_some_iterations(x.site, body.site)


def at_some_iterations(site: Site, every: Site) -> bool:
    """Whether ``site`` is the value at ``every`` (a site at every iteration of a loop)
    at some iterations only."""
    if site.vars != every.vars:
        return False
    steps, ours = site.steps, every.steps
    return (
        len(steps) == len(ours)
        and all((s.eqn, s.branch) == (o.eqn, o.branch) for s, o in zip(steps, ours))
        and any(s.iteration != o.iteration for s, o in zip(steps, ours))
    )


def goes_on(cond: Any, consts: Sequence[Any], carry: Sequence[Any]) -> Any:
    """Whether a ``while_loop`` runs another trip: its condition of the carry (a
    scalar; a loop whose condition is per lane stays whole, see ``per_lane``)."""
    return C.jaxpr_as_fun(cond)(*consts, *carry)[0]


def goes_on_alone(cond: Any, consts: Sequence[Any], carry: Sequence[Any]) -> Any:
    """:func:`goes_on` for a check: per lane under ``jax.vmap`` also where the condition
    says "any lane goes on" (Equinox's ``unvmap_any``, in the loops of optimistix and
    diffrax, whose bodies then leave finished lanes as they are): whether a trip exists
    for that lane alone, as ``vmap(h)(xs)[i]`` is ``h(xs[i])`` (a lane that stopped
    after one trip got a number for its fourth). Not for a loop that runs: there the
    condition is the program's, every lane going on while one does (a body that does
    not leave finished lanes as they are computes on)."""
    eqns = cond.jaxpr.eqns
    ops = [_ACROSS_LANES.get(e.primitive.name) for e in eqns]
    if not any(ops):
        return goes_on(cond, consts, carry)
    env = dict(zip(cond.jaxpr.constvars, cond.consts))
    env.update(zip(cond.jaxpr.invars, [*consts, *carry]))
    run_eqns(eqns, ops, env, [[] for _ in eqns])  # (those ops as outside vmap)
    a = cond.jaxpr.outvars[0]
    return a.val if type(a) is C.Literal else env[a]


def _lanes_apart(cond: Any, groups: Sequence[tuple[Any, list[_Pending]]]) -> bool:
    """Whether a ``while_loop`` holding these edits reports its hits (a trip reached,
    for a check) per lane, each lane's condition taken alone (:func:`goes_on_alone`):
    its condition reduces across vmap lanes (Equinox's ``unvmap_any``), so the loop runs
    while any lane goes on, and a lane that alone stops before a trip a slice's context
    or ``values_fn`` reads got that trip's number. The trips still run as the
    program's condition says. Not for a condition with effects (a print: it would run
    twice a trip)."""
    return (
        any(e.primitive.name in _ACROSS_LANES for e in cond.jaxpr.eqns)
        and not cond.jaxpr.effects
        and any(m.edit.kind == "hit" for _, members in groups for m in members)
    )


def _alone(lanes: bool, alone: Any, cond: Any, consts: Sequence[Any], carry: Sequence[Any]) -> Any:
    """``alone`` (per lane, whether each lane alone ran every trip so far) and whether it
    alone runs the trip from ``carry``; None where the loop needs no such flag
    (``lanes``: see :func:`_lanes_apart`)."""
    return alone & goes_on_alone(cond, consts, carry) if lanes else None


def _hit_active(edit: Edit, active: Any, alone: Any) -> Any:
    """The flag an edit in a trip runs under (``active``); a hit's also says whether each
    lane alone got there (``alone``, see :func:`_alone`)."""
    return active if alone is None or edit.kind != "hit" else _and(alone, active)


#: Equinox's primitives that reduce across a vmap's lanes (and the check that a value
#: is the same in every lane), as each is outside vmap
_ACROSS_LANES: dict[str, Callable[..., Any]] = {
    "unvmap_any": jnp.any,
    "unvmap_all": jnp.all,
    "unvmap_max": jnp.max,
    "nonbatchable": lambda x: x,
}


def per_lane(eqn: Any) -> bool:
    """Whether a ``while`` equation's condition is per lane (``bool[n]``: a
    ``while_loop`` under ``jax.vmap`` whose condition reads batched values). Its lanes
    stop at different trips, and its body computes every lane at every trip: JAX
    keeps a finished lane's carry only when it lowers the loop. Such a loop runs as
    one equation; nothing inside it is unrolled, folded or edited."""
    return bool(eqn.params["cond_jaxpr"].out_avals[0].shape)


def unprinted(jaxpr: C.Jaxpr) -> list[int]:
    """Identities of what a jaxpr's text does not show but its values depend on: the
    constants of the closed jaxprs its equations hold (a jitted helper closing over an
    array), array literals, and the functions they call (a pure_callback's, printed by
    address). A compiled function kept by them keeps the jaxpr, so these objects stay
    alive and no identity is reused while it is a key. A custom rule's own functions
    change no value."""
    found = []
    for eqn in jaxpr.eqns:
        # an array literal prints as [...] (jax_use_simplified_jaxpr_constants)
        found += [id(a) for a in eqn.invars if isinstance(a, C.Literal) and np.ndim(a.val)]
        params = eqn.params
        if eqn.primitive.name in C.CUSTOM_RULE_PRIMITIVES:
            params = {k: v for k, v in params.items() if isinstance(v, (C.Jaxpr, C.ClosedJaxpr))}
        for value in params.values():
            for x in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(x, C.ClosedJaxpr):
                    if x.consts:
                        found.append(id(x))
                    found += unprinted(x.jaxpr)
                elif isinstance(x, C.Jaxpr):
                    found += unprinted(x)
                elif callable(x) and not isinstance(x, type):
                    found.append(id(x))
    return found


def argument_types(args: Any) -> tuple:
    """Shape, dtype and weak type of each leaf (what a compiled function is made for)."""
    return tuple(
        (np.shape(x), str(x.dtype), bool(getattr(x, "weak_type", False)), type(x).__name__)
        if hasattr(x, "dtype")
        else (type(x).__name__, x)  # a Python scalar: compiled in (as a jaxpr literal)
        for x in jax.tree_util.tree_leaves(args)
    )


def _closed_eval(closed: Any, *args: Any) -> list[Any]:
    """``jaxpr_as_fun(closed)(*args)``, op by op with compiled ops where it runs eagerly
    (see ``_eager.eval_jaxpr``)."""
    return eval_jaxpr(closed.jaxpr, closed.consts, *args)


def eval_equations(
    eqns: Sequence[Any], env: dict, where: tuple[Any, tuple[int, ...]] | None = None
) -> None:
    """Evaluate straight-line equations (traceable): read what they need from ``env``,
    write what they make into it. One jaxpr for all of them, evaluated by JAX.

    Op by op, as an eager call of the function runs them: compiled whole, XLA rewrites
    ``a / exp(b)`` as ``a * exp(-b)``, and a cond decided at its threshold took another
    branch than the function and the graph's own values.

    ``where``: ``(jaxpr, positions)`` of the equations in a program run again and again
    (a function a graph made, called eagerly in a loop): the jaxpr made of them is kept
    for it, and with it what ``eval_jaxpr`` works out once per jaxpr (each call made and
    planned it anew: most of an eager call of a small model's ``values_fn``).
    """
    if where is None:
        one, ins, outs = _batch(eqns)
    else:
        program, positions = where
        kept = per_jaxpr(_BATCHES, program, dict)
        found = kept.get(positions)
        if found is None:
            if len(kept) > 1024:  # (a values_fn of every layer: a run between each)
                kept.clear()
            found = kept[positions] = _batch(eqns)
        one, ins, outs = found
    # a shard_map's or Pallas kernel's body is traced again when it runs: staged as JAX
    # stages it, also under ensure_compile_time_eval (see C.evaluated_staged)
    args = [env[a] for a in ins]
    with C.staged_where_retraced(args, eqns):
        values = eval_jaxpr(one, [], *args, once=True)
    env.update(zip(outs, values))


def _batch(eqns: Sequence[Any]) -> tuple[Any, list[Any], list[Any]]:
    """``(jaxpr, inputs, outputs)`` of straight-line equations: what they read from
    outside them, what they make."""
    inside = {v for e in eqns for v in e.outvars}
    ins = list(
        dict.fromkeys(a for e in eqns for a in e.invars if isinstance(a, C.Var) and a not in inside)
    )
    outs = [v for e in eqns for v in e.outvars if not isinstance(v, C.DropVar)]
    return C.new_jaxpr([], ins, outs, list(eqns)), ins, outs


#: per program jaxpr (while it lives), the jaxprs of its runs of equations, by positions
_BATCHES: dict[int, tuple[Any, Any]] = {}


def _live(
    jaxpr: Any, roots: set[Any], edited: set[int], callbacks: bool
) -> tuple[list[bool], list[bool]]:
    """Which equations compute ``roots``, hold an ``edited`` edit (a value exposed, a
    path checked), or have effects (liveness), and which of them make a value a live
    one reads (the rest run for their edits alone).

    Without ``callbacks`` (values asked for: computed from their ancestors only) a
    ``jax.debug.print`` or ``io_callback`` that none of them reads does not run; other
    effects do (a write to a ref changes what a later read gives).
    """
    needed, live = set(roots), [False] * len(jaxpr.eqns)
    wanted = [False] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        wanted[i] = any(v in needed for v in eqn.outvars)
        if i in edited or wanted[i] or _has_effects(eqn, callbacks):
            live[i] = True
            needed.update(a for a in eqn.invars if not isinstance(a, C.Literal))
    return live, wanted


def _has_effects(eqn: Any, callbacks: bool) -> bool:
    """Whether ``eqn`` must run for its effects (host callbacks only with ``callbacks``)."""
    return bool(eqn.effects) and (callbacks or not C.callbacks_only(eqn.effects))


def _rows_read(eqn: Any, jaxpr: Any) -> bool:
    """Whether a scan equation's stacked results are read in ``jaxpr`` (or returned)."""
    n_carry = C.scan_layout(eqn)[1]
    read = _read_vars(jaxpr)
    return any(o in read for o in eqn.outvars[n_carry:] if not isinstance(o, C.DropVar))


def _selectable(edit: Edit) -> bool:
    """Whether a masked iteration may apply ``edit`` with a select (``where``): its new
    value is one it reads (a slice's input) or the old one perturbed (``v + eps``),
    which computes nothing where it is not active; other patches run in a ``cond``,
    only where active (sqrt at a negative value makes a NaN gradient, even times zero)."""
    return edit.kind == "apply" and (edit.perturbation or _put_in(edit))


def _put_in(edit: Edit) -> bool:
    """Whether ``edit`` puts a value in (a slice's input: the new value is one it reads)."""
    return edit.kind == "apply" and not edit.perturbation and not edit.fn.jaxpr.eqns


def _replaces(edit: Edit) -> bool:
    """Whether ``edit`` is a patch computing its new value without the old one (a
    constant, or a function of other values): what the old one was computed from
    does not reach past it."""
    if edit.kind != "apply" or edit.perturbation:
        return False
    jaxpr = edit.fn.jaxpr
    read = {a for e in jaxpr.eqns for a in e.invars if isinstance(a, C.Var)}
    read.update(a for a in jaxpr.outvars if isinstance(a, C.Var))
    return not any(r in edit.site.vars and v in read for r, v in zip(edit.reads, jaxpr.invars))


def _one_iteration(p: _Pending) -> bool:
    """Whether a pending edit at a loop's iteration is at one iteration (not a range)."""
    return not isinstance(p.steps[0].iteration, range)


def _descend(p: _Pending) -> _Pending:
    return _Pending(p.steps[1:], p.edit, p.extras, p.active, p.key)


def _shift(p: _Pending, by: int) -> _Pending:
    """``p`` with its loop iteration moved by ``by`` (a span of the loop runs alone)."""
    first = p.steps[0]
    t = first.iteration
    moved = range(t.start + by, t.stop + by) if isinstance(t, range) else t + by
    step = Step(first.eqn, first.branch, moved)
    return _Pending((step, *p.steps[1:]), p.edit, p.extras, p.active, p.key)


def _span(p: _Pending) -> tuple[int, int]:
    """The iterations ``[a, b)`` of its loop that a pending edit touches."""
    t = p.steps[0].iteration
    return (t.start, t.stop) if isinstance(t, range) else (t, t + 1)


def _each_iteration(p: _Pending) -> list[_Pending]:
    """A ranged edit as one edit per iteration (reading its rows of the stacked inputs)."""
    first = p.steps[0]
    if not isinstance(first.iteration, range):
        return [p]
    return [
        _Pending(
            (Step(first.eqn, first.branch, t), *p.steps[1:]),
            p.edit,
            [Row(x, row) for x in p.extras],
            p.active,
            p.key,
        )
        for row, t in enumerate(first.iteration)
    ]


def _merge(pending: Sequence[_Pending]) -> list[tuple[list[int], list[_Pending]]]:
    """Edits at several iterations of one loop that do the same thing, grouped:
    ``[(iterations, members)]``, one iteration per member, in the order they apply.

    An edit joins the latest group of edits like it only when that group comes after
    every group that edits its value at its iteration already: the value before a
    patch at ``h@3`` is read before the patch of ``h@*`` there (a group of its own,
    then the patches from iteration 3 on), and the values before it at every
    iteration are one group before the patches' one."""
    groups: list[tuple[list[int], list[_Pending]]] = []
    latest: dict[Any, int] = {}  # per kind of edit: its latest group
    fns: dict[int, Any] = {}  # per patch function: what it computes
    seen: dict[int, set[int]] = {}  # per group: its iterations
    last: dict[Any, int] = {}  # per value edited and iteration: the last group there
    for p in pending:
        e = p.edit
        reads = tuple(Extra if isinstance(r, Extra) else r for r in e.reads)
        if id(e.fn) not in fns:
            fns[id(e.fn)] = _computes(e.fn)
        what = (e.kind, e.perturbation, fns[id(e.fn)], reads)
        key = (p.steps[1:], e.site.vars, e.site.before, what, id(p.active))
        target = (p.steps[1:], e.site.vars)
        t = p.steps[0].iteration
        its = list(t) if isinstance(t, range) else [t]
        at = latest.get(key, -1)
        joins = (
            not isinstance(t, range)  # (a ranged edit is a group already)
            and at >= 0
            and t not in seen[at]
            and all(last.get((target, u), -1) < at for u in its)
        )
        if not joins:
            at = len(groups)
            groups.append(([], []))
            seen[at] = set()
            if not isinstance(t, range):
                latest[key] = at
        groups[at][0].extend(its)
        groups[at][1].append(p)
        seen[at].update(its)
        for u in its:
            last[(target, u)] = at
    return groups


def _computes(fn: Any) -> Any:
    """What a patch's function (a closed jaxpr, or None) computes, as a key: its
    program's text, the constants and literals of it and of the programs inside it
    (see :func:`_const_key`), and its equations' parameters, by value where they hash
    (what the text leaves out: a custom rule, a host callback; by identity where they
    do not). Each ``g.replace``
    traces its function anew: patches of one function at 200 trips of a while_loop were
    200 groups, 200 branches in its body (4 s to compile), where one group takes them
    all; two jitted steering vectors, or two custom rules, printed alike (the regression
    hunt: one patch's ran at both iterations)."""
    if fn is None:
        return None
    held: list[Any] = []
    programs = [fn]
    while programs:
        program = programs.pop()
        held += map(_const_key, getattr(program, "consts", ()))
        for eqn in getattr(program, "jaxpr", program).eqns:
            # (a literal prints as its value: every NaN alike, whatever its sign or bits)
            held += [_const_key(a.val) for a in eqn.invars if isinstance(a, C.Literal)]
            for param in eqn.params.values():
                for p in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(p, (C.Jaxpr, C.ClosedJaxpr)):
                        programs.append(p)
                    else:
                        held.append(_by_value(p))
    return str(fn.jaxpr), tuple(held)


def _const_key(x: Any) -> Any:
    """A constant of a patch as a key: a NumPy array or scalar by its type and bytes (a
    patch's copy, or a value in its program, which do not change: a NumPy steering
    vector a patch closes over is copied at every trace), anything else by identity."""
    if isinstance(x, (np.ndarray, np.generic, int, float, complex, bool)):
        a = np.asarray(x)
        return (a.dtype.str, a.shape, a.tobytes())
    return ("id", id(x))


def _by_value(x: Any) -> Any:
    """``x`` itself where it hashes (compared by value), else its identity."""
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))
    return x


def _scatter(length: int, its: Sequence[int], rows: Any) -> Any:
    """A ``(length, ...)`` array with ``rows`` at iterations ``its``, zeros elsewhere."""
    if list(its) == list(range(length)):
        return rows
    # (of the rows' own type: on an Explicit mesh their sharding is part of it, which
    # the scatter is told: it cannot tell it from its operands)
    zeros = jnp.repeat(jnp.zeros_like(rows[:1]), length, axis=0)
    sharding = C.explicit_sharding(jax.typeof(zeros))
    at = zeros.at[np.asarray(its)]
    return at.set(rows) if sharding is None else at.set(rows, out_sharding=sharding)


def _row_of(trips: np.ndarray, counter: Any) -> tuple[Any, Any]:
    """``(k, hit)``: the row of trip ``counter`` among the sorted ``trips`` (a row in
    range where it is none of them) and whether it is one of them."""
    n = len(trips)
    if trips[-1] - trips[0] == n - 1:  # consecutive trips (all of them: every trip's value)
        k = jnp.clip(counter - int(trips[0]), 0, n - 1)
    else:
        k = jnp.clip(jnp.searchsorted(jnp.asarray(trips), counter), 0, n - 1)
    return k, jnp.asarray(trips)[k] == counter


def _and(a: Any, b: Any) -> Any:
    return a if b is None else jnp.logical_and(a, b)


def _zeros(aval: Any) -> Any:
    """Zeros of ``aval`` (of its sharding on an Explicit mesh, which is part of its type:
    a cond's other branch, a trip not run, must give the same types)."""
    return C.zeros_of(aval)


def iterations(steps: Sequence[Step]) -> tuple[int, ...]:
    """The loop iterations along a path of steps (``Step.iteration`` of each loop)."""
    return tuple(s.iteration for s in steps if s.iteration is not None)


def unlifted(closed: Any, steps: tuple[Step, ...], var: Any) -> Site:
    """The site of a nested var reached by ``steps``, where its equation is (not lifted
    out of the calls returning it, as :func:`locate` does)."""
    jaxpr, eqns = closed.jaxpr, []
    for step in steps:
        eqns.append(jaxpr.eqns[step.eqn])
        jaxpr = sub_jaxpr(eqns[-1], step).jaxpr
    return Site(steps, (var,), _path_bound(steps, eqns))


def _path_bound(steps: Sequence[Step], eqns: Sequence[Any]) -> tuple[int, ...]:
    """The depths of ``steps`` into a cond branch or a while_loop trip (``Site.path_bound``)."""
    return tuple(
        d
        for d, (s, e) in enumerate(zip(steps, eqns))
        if s.branch is not None or (s.iteration is not None and e.primitive.name == "while")
    )


def locate(closed: Any, steps: tuple[Step, ...], var: Any) -> Site:
    """The site of a nested var reached by ``steps``, lifted out of calls.

    A value that a call returns and does not read itself is the same value as the
    call's result: its site is the outer one, so an edit there leaves the call whole
    (its custom rule kept). Likewise the carry a scan's last iteration returns is the
    scan's result. Not so for a ``cond`` branch or a ``while_loop`` trip: at arguments
    that take another branch or trip count, the value the traced branch (or the last
    traced trip) returns is not the result, so it keeps its site inside (bound to the
    traced path); the region's result has a var and a site of its own (see
    ``ControlFlow._written``).
    """
    levels, eqns = [closed.jaxpr], []
    for s in steps:
        eqn = levels[-1].eqns[s.eqn]
        eqns.append(eqn)
        levels.append(sub_jaxpr(eqn, s).jaxpr)
    held = (var,)
    while steps:
        eqn, inner = eqns[-1], levels[-1]
        at = [k for k, o in enumerate(inner.outvars) if o in held]
        last = _last_iteration(eqn)
        if last is not None:  # a loop: its result if this is the last iteration's carry
            # (a ys of the last iteration is not the result; one nothing reads is moot)
            read = _read_vars(levels[-2])
            at = [k for k in at if k < last[1] or eqn.outvars[k] in read]
            carried = steps[-1].iteration == last[0] and all(k < last[1] for k in at)
            at = at if carried else []
        elif eqn.primitive.name not in C.CALL_PRIMITIVES:
            break
        outer = tuple(eqn.outvars[k] for k in at if not isinstance(eqn.outvars[k], C.DropVar))
        if not outer or any(a in held for e in inner.eqns for a in e.invars):
            break
        held, steps = outer, steps[:-1]
        eqns.pop()
        levels.pop()
    return Site(steps, held, _path_bound(steps, eqns))


def into_last_iteration(closed: Any, site: Site) -> Site | None:
    """For a scan's result that :func:`locate` lifted out of the loop (the carry its last
    iteration returns), where that iteration makes it: the same value, so an edit there
    is the same edit, and with edits at the loop's other iterations the scan runs once
    for all of them (a patch, perturbation or exposure of ``step/h@*`` split it before
    its last iteration). None for any other site."""
    if site.before is not None or len(site.vars) != 1:
        return None
    jaxpr = closed.jaxpr
    for s in site.steps:
        jaxpr = sub_jaxpr(jaxpr.eqns[s.eqn], s).jaxpr
    e = _producers(jaxpr).get(site.vars[0])
    if e is None or jaxpr.eqns[e].primitive.name != "scan":
        return None
    eqn = jaxpr.eqns[e]
    _, n_carry = C.scan_layout(eqn)
    k = eqn.outvars.index(site.vars[0])
    body = eqn.params["jaxpr"].jaxpr
    inner = body.outvars[k]
    if k >= n_carry or not isinstance(inner, C.Var) or inner in body.invars:
        return None
    if any(inner in q.invars for q in body.eqns):  # read again in its iteration
        return None
    if any(
        o is inner and not isinstance(eqn.outvars[j], C.DropVar)
        for j, o in enumerate(body.outvars)
        if j != k
    ):  # also a ys row or another carry (asked for, if not read): not the result alone
        return None
    last = _last_iteration(eqn)
    assert last is not None
    step = Step(e, iteration=last[0])
    return Site((*site.steps, step), (inner,), site.path_bound)


def _producers(jaxpr: Any) -> dict[Any, int]:
    """The equation making each var of a jaxpr (kept per jaxpr, see :func:`_eager.per_jaxpr`)."""
    return per_jaxpr(
        _PRODUCERS, jaxpr, lambda: {o: e for e, q in enumerate(jaxpr.eqns) for o in q.outvars}
    )


def _read_vars(jaxpr: Any) -> set[Any]:
    """The vars a jaxpr's equations read or it returns (kept per jaxpr)."""

    def read() -> set[Any]:
        found = {a for e in jaxpr.eqns for a in e.invars if not isinstance(a, C.Literal)}
        found.update(a for a in jaxpr.outvars if not isinstance(a, C.Literal))
        return found

    return per_jaxpr(_READ, jaxpr, read)


_READ: dict[int, tuple[Any, Any]] = {}
_PRODUCERS: dict[int, tuple[Any, Any]] = {}


def carry_entry(closed: Any, site: Site) -> Site:
    """``site``, or the carry entering the next iteration of its scan when the value is
    only a carry its iteration returns (no equation of the body reads it, no ``ys``
    holds it): the same value, and an edit there leaves its iteration out of a slice."""
    steps = site.steps
    if not steps or steps[-1].iteration is None or site.before is not None:
        return site  # (the value before a patch there is not the carry passed on)
    jaxpr = closed.jaxpr
    for s in steps[:-1]:
        jaxpr = sub_jaxpr(jaxpr.eqns[s.eqn], s).jaxpr
    eqn = jaxpr.eqns[steps[-1].eqn]
    if eqn.primitive.name != "scan":
        return site
    body = eqn.params["jaxpr"].jaxpr
    n_consts, n_carry = C.scan_layout(eqn)
    at = [k for k, o in enumerate(body.outvars) if o in site.vars]
    if not at or any(k >= n_carry for k in at):
        return site
    if any(a in site.vars for e in body.eqns for a in e.invars):
        return site
    t = steps[-1].iteration + (-1 if eqn.params["reverse"] else 1)
    if not 0 <= t < eqn.params["length"]:
        return site
    entry = Step(steps[-1].eqn, iteration=t)
    return Site((*steps[:-1], entry), tuple(body.invars[n_consts + k] for k in at), site.path_bound)


def _last_iteration(eqn: Any) -> tuple[int, int] | None:
    """``(last iteration, number of carry results)`` of a scan step, or None."""
    if eqn.primitive.name == "scan":
        length = eqn.params["length"]
        return (0 if eqn.params["reverse"] else length - 1), C.scan_layout(eqn)[1]
    return None


def rules_entered(closed: Any, steps: Sequence[Step]) -> list[tuple[str, tuple[Step, ...]]]:
    """The ``custom_jvp``/``custom_vjp`` calls a path of steps enters (an edit there runs
    the call's primal body in place of its rule: see ``_rebuild``): each one's name and
    the steps to it."""
    found, jaxpr = [], closed.jaxpr
    for k, step in enumerate(steps):
        eqn = jaxpr.eqns[step.eqn]
        if eqn.primitive.name in C.CUSTOM_RULE_PRIMITIVES:
            found.append((C.call_name(eqn), tuple(steps[: k + 1])))
        jaxpr = sub_jaxpr(eqn, step).jaxpr
    return found


def sub_jaxpr(eqn: Any, step: Step) -> Any:
    """The closed jaxpr a step enters."""
    name = eqn.primitive.name
    if name == "cond":
        return eqn.params["branches"][step.branch]
    if name == "scan":
        return eqn.params["jaxpr"]
    if name == "while":
        return eqn.params["body_jaxpr"]
    return C.called_jaxpr(eqn)
