"""Control flow in the flat program: loops unrolled per iteration, the taken branch inlined.

So that values inside ``scan``/``fori_loop``/``while_loop`` bodies and ``cond`` branches
are vars like any other (named ``body/h@3`` for iteration 3, see
:mod:`jaxsurgery._names`), the flat program inlines them:

* ``scan`` (and ``fori_loop`` with static bounds, which is a scan): the body once per
  iteration, with ``xs[t]`` sliced and the ``ys`` stacked by small helper jaxprs;
* ``while_loop``: the body once per trip, the trip count found by running the loop on
  the traced concrete values (with abstract inputs the loop stays one equation);
* ``cond``/``switch``: the branch taken for the traced concrete values.

Each stays a :class:`~jaxsurgery._program.Region`: a slice that takes the whole loop or
conditional as a unit folds it back into the original equation (it stays a loop, and
works for any trip count or predicate); a slice that cuts inside keeps only the
iterations it needs, and its ``notes`` say it is valid for the traced trip count or
branch.

Sharp edges:
    * a ``while_loop`` whose trips would unroll past :data:`SMALL_UNROLL` equations
      (:data:`EAGER_UNROLL` for a body past :data:`SMALL_BODY`) stays folded, as a
      scan does; unrolling every loop (``fold=False``), one whose unrolled size passes
      :data:`UNROLL_LIMIT`, or of more than :data:`MAX_TRIPS` trips, stays one
      equation, and ``Graph.notes`` says so;
    * finding a ``while_loop``'s trip count or a ``cond``'s branch evaluates the
      program up to it once, at trace time.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from ._eager import per_jaxpr
from ._scopes import scope_path
from ._structured import Site, Step, argument_types, goes_on, locate, per_lane, unprinted

if TYPE_CHECKING:
    from ._program import Program

#: A while_loop larger than this many unrolled equations stays one equation.
UNROLL_LIMIT = 200_000
#: A while_loop whose body (calls, loops and branches inside counted) passes this many
#: equations stays one equation in the index without counting its trips (counting runs
#: the body op by op at trace time: a diffrax solve); its body is indexed lazily.
WHILE_FOLD_LIMIT = 200
#: A while_loop whose body passes SMALL_BODY equations stays folded too once its trips
#: pass EAGER_UNROLL unrolled equations (its trips then counted by one compiled loop when
#: first needed): an optimistix BFGS solve's 80 trips of 180 equations took 0.5 s to count
#: op by op. A small body costs little a trip and is unrolled up to SMALL_UNROLL
#: equations: slices across its trips are plain code, which reverse mode takes. Past
#: that it is folded too (counting and indexing cost about 7 us an unrolled equation: a
#: fori_loop of 10 000 trips of a traced bound took 0.5 s, 470x make_jaxpr).
EAGER_UNROLL = 2_000
SMALL_BODY = 50
SMALL_UNROLL = 5_000
#: A while_loop running more trips than this stays one equation.
MAX_TRIPS = 10_000
#: Inside the body of a folded loop, a scan unrolled into at most this many equations is
#: unrolled in the body's template, so that its values are named too: ``outer/h@2@3`` is
#: ``h`` at iteration 3 of the inner scan in iteration 2 of the outer one. A longer one
#: stays one equation of the template (its values are not named). Tracing indexes and
#: names the template, about 7 µs an equation: this bounds what it adds per loop (1.4 ms).
INNER_UNROLL_LIMIT = 200

_UNDECIDED = (
    "a cond stays one equation: the index has no value to decide it by (inside a "
    "folded loop's body, traced with abstract arguments, or inside a transform: js.trace "
    "under jax.jit), so the values inside its branches are not named; tag the value you "
    "need outside the cond (js.tag), or trace with concrete arrays outside transforms"
)
_AFTER_LOOP = (
    "{what} stays one equation: what decides it comes out of a loop the index keeps "
    "whole, which tracing does not run; values inside it are not listed"
)
_AFTER_EFFECT = (
    "{what} stays one equation: what decides it comes out of {effect}, whose effect "
    "tracing does not run (the host would see an extra call); values inside it are not "
    "listed"
)

LOOP_PRIMITIVES = frozenset({"scan", "while"})
BRANCH_PRIMITIVES = frozenset({"cond"})


@C.cached_per_mesh(4096)
def _index_jaxpr(shape: tuple[int, ...], dtype: Any, t: int) -> C.ClosedJaxpr:
    spec = jax.ShapeDtypeStruct(shape, dtype)
    return C.make_jaxpr(lambda a: jax.lax.index_in_dim(a, t, 0, keepdims=False), spec)


@C.cached_per_mesh(1024)
def _stack_jaxpr(shape: tuple[int, ...], dtype: Any, n: int) -> C.ClosedJaxpr:
    spec = jax.ShapeDtypeStruct(shape, dtype)
    return C.make_jaxpr(lambda *a: jnp.stack(a), *([spec] * n))


@dataclass(eq=False)
class Folded:
    """A loop the flat index keeps as one equation (see :mod:`jaxsurgery._loop_index`).

    ``steps`` lead to the jaxpr holding it, ``pos`` is its place there, and
    ``iterations`` are those of the unrolled loops around it. ``operands`` are the
    flat atoms it reads (a ``while_loop``'s trip count is found from their values).
    """

    eqn: C.JaxprEqn
    steps: tuple[Step, ...]
    pos: int
    iterations: tuple[int, ...]
    operands: list[Any] = field(default_factory=list, repr=False)
    _template: Program | None = field(default=None, repr=False)
    #: a located site per template var, copied for other iterations (see ``site``)
    _sites: dict = field(default_factory=dict, repr=False)
    #: the name scope it runs in (``Net``: a Flax ``nn.scan`` inside module ``Net``);
    #: its body's scopes are relative to it
    scope: str = ""
    #: its equation's index in the flat program (whose copy has the flat results)
    flat_eqn: int = -1
    #: whether it runs in a derivative's backward pass (a checkpointed body's
    #: recomputation, whose values the forward loop's names name: not named again)
    backward: bool = False

    @functools.cached_property
    def key(self) -> tuple:
        """The loop's place in the nested program, iterations aside: the copies of one
        loop in the iterations of an unrolled loop around it share it."""
        return (tuple((s.eqn, s.branch) for s in self.steps), self.pos)

    def body_scope(self, eqn: C.JaxprEqn | None) -> str:
        """The scope path of an equation of its body template, the loop's scope first."""
        inner = "" if eqn is None else C.scope_of(eqn.source_info)
        outer = self.scope
        return scope_path(f"{outer}/{inner}" if outer and inner else outer or inner)

    @property
    def is_scan(self) -> bool:
        return self.eqn.primitive.name == "scan"

    @property
    def body(self) -> C.ClosedJaxpr:
        return self.eqn.params["jaxpr" if self.is_scan else "body_jaxpr"]

    def carry_layout(self) -> tuple[int, int]:
        """``(body inputs before the carry, carry count)``; the carry outputs come first."""
        if self.is_scan:
            return C.scan_layout(self.eqn)
        return self.eqn.params["body_nconsts"], len(self.eqn.outvars)

    @property
    def template(self) -> Program:
        """The body as a flat program of its own (made once)."""
        if self._template is None:
            from ._program import Program

            self._template = Program(self.body, None, fold=INNER_UNROLL_LIMIT)
        return self._template

    def site(self, ti: int, t: int, closed: Any, while_trips: dict) -> Site | None:
        """The site of template var ``ti`` at iteration ``t`` in the whole program, or
        None for a value the template's own index made (a row of an inner loop it
        unrolls: no value of the nested program).

        Sites of one body value differ only in the iteration, except at the last one
        (where a carry is the loop's result): one is located, the others are copies.
        """
        depth = len(self.steps)
        known = self._sites.get(ti)
        if known is not None and t != known[1] and not self._last(t, while_trips):
            site = known[0]
            steps = (*site.steps[:depth], Step(self.pos, iteration=t), *site.steps[depth + 1 :])
            return Site(steps, site.vars, site.path_bound)
        found = self.template.found(ti)
        if found is None:
            return None
        tsteps, nested = found
        steps = (*self.steps, Step(self.pos, iteration=t), *tsteps)
        site = locate(closed, steps, nested)
        inside = len(site.steps) > depth and site.steps[depth] == steps[depth]
        if inside and not self._last(t, while_trips):
            self._sites[ti] = (site, t)
        return site

    def _last(self, t: int, while_trips: dict) -> bool:
        """Whether ``t`` may be the loop's last iteration (its carry: the result)."""
        if not self.is_scan:
            return True  # trips not known here: never copied
        return t == (0 if self.eqn.params["reverse"] else self.eqn.params["length"] - 1)


class ControlFlow:
    """The control-flow part of the inliner (mixed into ``_program._Inliner``).

    Uses from its host: ``fold``, ``folded``, ``eqns``, ``regions``, ``notes``, ``opaque_loops``,
    ``iteration`` (the stack of enclosing iteration numbers), ``path`` and
    ``while_trips`` (see ``_Inliner``), ``position`` (the
    equation's index in its jaxpr), ``_inline(closed, atoms, source_info, step)`` and
    ``_values(atoms)`` (concrete values, or None when the trace is abstract or they
    come out of a folded loop: then ``after_loop`` is set) and ``constant_values(atoms)``
    (those that constants alone compute).
    """

    def _control_flow(
        self, eqn: C.JaxprEqn, invars: list[Any], source_info: Any
    ) -> list[Any] | None:
        """Flat atoms of the results, or None to keep the equation as it is.

        Each handler decides to keep the equation before it copies anything.
        """
        from ._program import Region

        name = eqn.primitive.name
        pos = self.position  # the equation's place in its jaxpr (``Step.eqn``)
        region = Region(len(self.eqns), eqn, invars, source_info)
        self.regions.append(region)
        if name == "scan":
            outs = self._scan(eqn, invars, source_info, pos)
        elif name == "while":
            outs = self._while(eqn, invars, source_info, pos)
        else:
            outs = self._cond(eqn, invars, source_info, pos)
        if outs is None:
            self.regions.pop()
            return None
        if name != "scan":
            outs = self._written(outs, region.start, source_info)
        region.outs, region.end = outs, len(self.eqns)
        return outs

    def _written(self, outs: list[Any], start: int, source_info: Any) -> list[Any]:
        """The results of a ``cond`` or ``while_loop`` region, each a var of its own,
        written by an identity equation at the region's end.

        The traced branch's value (or the last trip's) is not the result: at arguments
        that take another branch or trip count, ``s1/w1`` or ``body/nv@3`` is not (or
        no longer) what the region returns, and a value, patch or slice of it must not
        act on the result. A result that is an operand or a constant (a branch that
        passes its input on, as a Metropolis accept/reject does; a loop that runs no
        trip) would otherwise be that operand in the index, whatever the predicate: no
        control dependency.
        """
        written: list[Any] = []
        for a in outs:
            copy = C.Var(a.aval)
            self.eqns.append(C.identity_eqn(a, copy, source_info))
            self._made_by_helper.add(copy)  # located where the result lies (_alias)
            written.append(copy)
        return written

    def _scan(
        self, eqn: C.JaxprEqn, invars: list[Any], source_info: Any, pos: int
    ) -> list[Any] | None:
        p = eqn.params
        body, length = p["jaxpr"], p["length"]
        n_consts, n_carry = C.scan_layout(eqn)
        if length == 0:
            return None
        unrolled = length * max(1, len(body.jaxpr.eqns))
        if self.fold is True or (self.fold is not False and unrolled > self.fold):
            # every scan (in a loop's template: a long one): its body values are
            # indexed lazily (Folded)
            self._fold(eqn, pos, invars, source_info)
            return None
        if unrolled > UNROLL_LIMIT:
            self.notes.append(
                f"a scan of length {length} stays one equation (unrolled it would pass "
                f"{UNROLL_LIMIT} equations); its body values are not listed"
            )
            return None
        consts, carry = invars[:n_consts], invars[n_consts : n_consts + n_carry]
        xs = invars[n_consts + n_carry :]
        ys: list[list[Any]] = []
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        with self.loop_constants(consts):
            for t in order:
                x_t = [self._index(x, t, source_info) for x in xs]
                self.iteration.append(t)
                step = Step(pos, iteration=t)
                outs = self._inline(body, [*consts, *carry, *x_t], source_info, step)
                self.iteration.pop()
                carry, y = outs[:n_carry], outs[n_carry:]
                ys.append(y)
        if p["reverse"]:
            ys.reverse()
        stacked = [
            self._stack([y[i] for y in ys], v.aval, source_info)
            for i, v in enumerate(eqn.outvars[n_carry:])
        ]
        return [*carry, *stacked]

    def _fold(self, eqn: C.JaxprEqn, pos: int, invars: list[Any], source_info: Any) -> None:
        """Keep a long loop as one equation; its body is indexed on demand."""
        scope = C.scope_of(source_info)
        self.folded.append(
            Folded(
                eqn,
                tuple(self.path),
                pos,
                tuple(self.iteration),
                invars,
                scope=scope,
                flat_eqn=len(self.eqns),  # the copy of ``eqn`` comes next
                backward=C.in_backward_pass(source_info),
            )
        )

    def _while(
        self, eqn: C.JaxprEqn, invars: list[Any], source_info: Any, pos: int
    ) -> list[Any] | None:
        p = eqn.params
        cond, body = p["cond_jaxpr"], p["body_jaxpr"]
        n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts = invars[:n_cond], invars[n_cond : n_cond + n_body]
        carry = invars[n_cond + n_body :]
        if per_lane(eqn):
            self.notes.append(
                "a while_loop under jax.vmap whose condition is per lane stays one equation "
                "(its lanes stop at different trips), so the values inside it are not named; "
                "tag the value you need outside the loop (js.tag), or trace one example and "
                "jax.vmap what you build from it"
            )
            self.opaque_loops.append(eqn)
            return None
        size = _size(body.jaxpr)
        if self.fold and (size > WHILE_FOLD_LIMIT or C.calls_back(eqn.effects)):
            # not run op by op to count its trips (nor its callbacks run while tracing)
            self._fold(eqn, pos, invars, source_info)
            return None
        values = self._values([*cond_consts, *body_consts, *carry])
        if values is None and (self.after_loop or self.after_effect) and self.fold:
            # what it reads comes out of a folded loop (or an io_callback), which tracing
            # does not run: it is folded too, its trips counted when a value inside is
            # first asked for
            self._fold(eqn, pos, invars, source_info)
            return None
        if values is None and (self.after_loop or self.after_effect):
            self.notes.append(self._undecided("a while_loop"))
            return None
        static = None if values is not None else self._static_trips(eqn, invars, size)
        if static == -1:
            self.notes.append(
                "a while_loop stays one equation: constants decide its trip count, but it "
                f"would unroll past {EAGER_UNROLL} equations, so the values inside it are "
                "not named; tag the value you need outside the loop (js.tag)"
            )
            self.opaque_loops.append(eqn)
            return None
        if static is not None:  # its count is decided by constants (a stage counter)
            values, carries = [], [None] * (static + 1)
        if values is None:
            self.notes.append(
                "a while_loop stays one equation: its trip count depends on values the "
                "index does not have (inside a folded loop's body, traced with abstract "
                "arguments, or inside a transform: js.trace under jax.jit), so the values "
                "inside it are not named; tag the value you need outside the loop (js.tag), "
                "or trace with concrete arrays outside transforms"
            )
            self.opaque_loops.append(eqn)
            return None
        if static is None:
            carries = _trip_carries(
                cond,
                body,
                values[:n_cond],
                values[n_cond : n_cond + n_body],
                values[n_cond + n_body :],
                max(1, (EAGER_UNROLL if size > SMALL_BODY else SMALL_UNROLL) // size)
                if self.fold
                else MAX_TRIPS,
            )
        if carries is None and self.fold:  # folded: counted compiled when first needed
            self._fold(eqn, pos, invars, source_info)
            return None
        trips = None if carries is None else len(carries) - 1
        if trips is None or trips * max(1, len(body.jaxpr.eqns)) > UNROLL_LIMIT:
            self.notes.append(
                f"a while_loop stays one equation: it runs more than {MAX_TRIPS} trips or "
                f"would unroll past {UNROLL_LIMIT} equations"
            )
            return None
        self.while_trips[(*self.path, Step(pos))] = trips
        region = self.regions[-1]  # before the body's calls add theirs
        region.boundaries = [carry]
        with self.loop_constants(body_consts):
            for t in range(trips):
                region.trip_starts.append(len(self.eqns))
                self.iteration.append(t)
                step = Step(pos, iteration=t)
                carry = self._inline(body, [*body_consts, *carry], source_info, step)
                if carries[t + 1] is not None:
                    self.known(carry, carries[t + 1])
                region.boundaries.append(carry)
                self.iteration.pop()
        region.cut_note = (
            f"it holds for the loop's {trips} traced trips (arguments or inputs that give "
            "another count are a SliceError)"
        )
        return carry

    def _static_trips(self, eqn: C.JaxprEqn, invars: list[Any], size: int) -> int | None:
        """The trip count of a while_loop whose count constants decide (what its
        condition reads, and what the body computes that from: a counter starting at
        a literal, as the stages of a diffrax Runge-Kutta step inside the solver's loop),
        when it unrolls to at most :data:`EAGER_UNROLL` equations (-1 when it would unroll
        past them); else None."""
        deciding = deciding_operands(eqn)
        known = self.constant_values([invars[k] for k in deciding])
        if known is None:
            return None
        p = eqn.params
        n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
        operands: list[Any] = [None] * len(invars)
        for k, x in zip(deciding, known):
            operands[k] = x
        carried = [k - n_cond - n_body for k in deciding if k >= n_cond + n_body]
        goes = _computing(p["cond_jaxpr"], [0])
        step = _computing(p["body_jaxpr"], carried)
        if goes is None or step is None:
            return None
        cond_consts = operands[:n_cond]
        body_consts = operands[n_cond : n_cond + n_body]
        carry = operands[n_cond + n_body :]
        most = EAGER_UNROLL // max(1, size)
        bodies = [*p["cond_jaxpr"].jaxpr.eqns, *p["body_jaxpr"].jaxpr.eqns]
        try:
            with C.compile_time_eval(operands, C.retraced(bodies)):
                for trips in range(most + 1):
                    if not bool(goes(*cond_consts, *carry)[0]):
                        return trips
                    for k, x in zip(carried, step(*body_consts, *carry)):
                        carry[k] = x
        except Exception:  # noqa: BLE001 (it reads what it was not given: not static)
            return None
        return -1

    def _cond(
        self, eqn: C.JaxprEqn, invars: list[Any], source_info: Any, pos: int
    ) -> list[Any] | None:
        branches = eqn.params["branches"]
        values = self._values(invars[:1])
        if values is None:
            if self.after_loop or self.after_effect:
                self.notes.append(self._undecided("a cond"))
            else:  # abstract values: a loop body's template, or an abstract trace
                self.notes.append(_UNDECIDED)
            return None
        taken = int(np.clip(np.asarray(values[0]), 0, len(branches) - 1))
        region = self.regions[-1]
        region.taken = taken
        step = Step(pos, branch=taken)
        outs = self._inline(branches[taken], invars[1:], source_info, step)
        region.cut_note = (
            f"it holds for branch {taken}, the one taken when traced (arguments or inputs "
            "that take another are a SliceError)"
        )
        return outs

    def _undecided(self, what: str) -> str:
        """The note for ``what`` kept whole because what decides it comes out of a folded
        loop or an effect (see ``_values``)."""
        if self.after_effect:
            return _AFTER_EFFECT.format(what=what, effect=f"an {self.after_effect}")
        return _AFTER_LOOP.format(what=what)

    def _index(self, x: Any, t: int, source_info: Any) -> Any:
        shape = tuple(x.aval.shape)
        return self._inline(_index_jaxpr(shape, x.aval.dtype, t), [x], source_info)[0]

    def _stack(self, atoms: Sequence[Any], aval: Any, source_info: Any) -> Any:
        shape = tuple(aval.shape[1:])
        return self._inline(_stack_jaxpr(shape, aval.dtype, len(atoms)), list(atoms), source_info)[
            0
        ]


def _size(jaxpr: C.Jaxpr) -> int:
    """Equations of a jaxpr, those of the jaxprs its equations hold included."""
    return len(jaxpr.eqns) + sum(_size(j) for e in jaxpr.eqns for j in C.inner_jaxprs(e))


def _trip_carries(
    cond: Any, body: Any, cond_consts: list, body_consts: list, carry: list, most: int
) -> list[list[Any] | None] | None:
    """The carries a while_loop enters each trip with, then its results, from concrete
    values (one more than the trips it runs; None past ``most`` trips).

    A loop without effects runs compiled, cached by the text of its condition and body
    (a fresh trace of the same model makes equal jaxprs): only its trip count and
    results come back, the carries between are None (a cond inside a trip computes
    what it needs). Op by op, every trip's ops ran again at every trace: an optimistix
    Newton solve traced in 24× make_jaxpr. With effects (a callback in the body), op
    by op.
    """
    if not (cond.jaxpr.effects or body.jaxpr.effects):
        counted = _counted(cond, body, cond_consts, body_consts, carry, most)
        if counted is not None:
            trips, last = counted
            if trips > most:
                return None
            return [carry] if trips == 0 else [carry, *[None] * (trips - 1), last]
    body_fn = C.jaxpr_as_fun(body)
    carries = [carry]
    values, bodies = (cond_consts, body_consts, carry), [*cond.jaxpr.eqns, *body.jaxpr.eqns]
    with C.compile_time_eval(values, C.retraced(bodies)):
        for _ in range(most + 1):
            if not bool(goes_on(cond, cond_consts, carry)):
                return carries
            carry = body_fn(*body_consts, *carry)
            carries.append(carry)
    return None


def _counted(
    cond: Any, body: Any, cond_consts: list, body_consts: list, carry: list, most: int
) -> tuple[int, list[Any]] | None:
    """``(trips, results)`` of a while_loop run by one compiled loop that stops after
    ``most + 1`` trips (None if it cannot compile)."""
    args = (cond.consts, body.consts, cond_consts, body_consts, carry)
    try:
        hidden = (*unprinted(cond.jaxpr), *unprinted(body.jaxpr))
        key = (str(cond.jaxpr), str(body.jaxpr), hidden, most, argument_types(args))
        run = _COUNTED.get(key)
        if run is None:
            if len(_COUNTED) > 256:
                _COUNTED.clear()
            run = _COUNTED[key] = jax.jit(
                functools.partial(_count_and_run, cond.jaxpr, body.jaxpr, most)
            )
        trips, last = run(*args)
        return int(trips), list(last)
    except Exception:  # noqa: BLE001 (op by op says what fails, as it did before)
        return None


#: compiled trip counters, by the text of the loop's jaxprs and its argument types
_COUNTED: dict[tuple, Any] = {}


def _count_and_run(
    cond: C.Jaxpr,
    body: C.Jaxpr,
    most: int,
    cond_closed: list,
    body_closed: list,
    cond_consts: list,
    body_consts: list,
    carry: list,
) -> tuple[Any, list[Any]]:
    return _counting_loop(
        lambda c: C.eval_jaxpr(cond, cond_closed, *cond_consts, *c)[0],
        lambda c: C.eval_jaxpr(body, body_closed, *body_consts, *c),
        carry,
        most,
    )


def _counting_loop(
    goes_on: Callable[[list], Any], step: Callable[[list], list], carry: list, most: int
) -> tuple[Any, list[Any]]:
    """``(trips, results)`` of a ``while_loop`` of ``goes_on`` and ``step`` that stops
    after ``most + 1`` trips (traceable: compiled by its caller)."""

    def more(state: tuple) -> Any:
        n, carry = state
        return (n <= most) & goes_on(carry)

    def next_trip(state: tuple) -> tuple:
        n, carry = state
        return n + 1, step(carry)

    return jax.lax.while_loop(more, next_trip, (0, list(carry)))


def count_trips_compiled(
    cond: Any, body: Any, cond_consts: list, body_consts: list, carry: list
) -> int | None:
    """:func:`_trip_carries`, counted by one compiled loop (for a large body: run op by op, a
    diffrax step costs about a second a trip). The loop computes only what its condition
    reads: no host callback of the body or of the condition runs (selecting a value in
    the loop printed every trip of it; a print in the condition showed the counter it
    does not read as 0 at every trip), nor work the trip count does not need."""
    if C.holds_tracer((cond_consts, body_consts, carry)):
        return None  # values of a transform's trace (a closed-over tracer): not counted
    count = _counter(cond, body, len(cond_consts), len(body_consts), len(carry))
    bodies = [*cond.jaxpr.eqns, *body.jaxpr.eqns]
    # (also when first asked under jax.jit)
    with C.compile_time_eval((cond_consts, body_consts, carry), C.retraced(bodies)):
        trips = int(count(cond_consts, body_consts, carry))
    return None if trips > MAX_TRIPS else trips


_COUNTERS: dict[int, tuple[Any, Any]] = {}


def _counter(cond: Any, body: Any, n_cond: int, n_body: int, n_carry: int) -> Any:
    """The compiled trip counter of :func:`count_trips_compiled` for a loop's ``cond``
    and ``body``, kept while the body lives: each graph a patch makes counts its loops'
    trips again, and a counter made anew compiled again (100 ms a ``g.replace``)."""
    per_cond = per_jaxpr(_COUNTERS, body.jaxpr, dict)
    found = per_cond.get(id(cond))
    if found is not None and found[0]() is cond.jaxpr:
        return found[1]
    deciding = sorted(_deciding(cond.jaxpr, body.jaxpr, n_cond, n_body)[2])
    pruned = _computing(body, deciding)
    body_fn, at = (pruned, deciding) if pruned else (C.jaxpr_as_fun(body), range(n_carry))
    test = _computing(cond, [0]) or C.jaxpr_as_fun(cond)

    def count(cond_consts: list, body_consts: list, carry: list) -> Any:
        def step(carry: list) -> list:
            new = list(carry)
            for i, x in zip(at, body_fn(*body_consts, *carry)):
                new[i] = x
            return new

        return _counting_loop(lambda c: test(*cond_consts, *c)[0], step, carry, MAX_TRIPS)[0]

    counter = jax.jit(count)
    per_cond[id(cond)] = (weakref.ref(cond.jaxpr), counter)
    return counter


def _computing(closed: Any, outs: Sequence[int]) -> Callable[..., Any] | None:
    """A function of ``closed``'s inputs computing only its outputs at ``outs``, from the
    equations they need (None where an equation they do not need has an effect other
    than a host callback: a write a later read sees)."""
    jaxpr = closed.jaxpr
    live = {a for i in outs if isinstance(a := jaxpr.outvars[i], C.Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(a for a in eqn.invars if isinstance(a, C.Var))
        elif eqn.effects and not C.callbacks_only(eqn.effects):
            return None
    pruned = C.new_jaxpr(
        jaxpr.constvars, jaxpr.invars, [jaxpr.outvars[i] for i in outs], kept[::-1]
    )
    return C.jaxpr_as_fun(C.ClosedJaxpr(pruned, closed.consts))


def _deciding(
    cond: C.Jaxpr, body: C.Jaxpr, n_cond: int, n_body: int
) -> tuple[set[int], set[int], set[int]]:
    """The condition's constants, the body's constants and the carries (positions in
    each) that a while_loop's trip count depends on (see :func:`deciding_operands`)."""
    reads = input_reads(cond, range(1))
    cond_consts = {i for i in reads if i < n_cond}
    carry = {i - n_cond for i in reads if i >= n_cond}
    body_consts: set[int] = set()
    todo = set(carry)
    while todo:  # the carry those depend on through the body, to a fixed point
        found = input_reads(body, todo)
        body_consts.update(i for i in found if i < n_body)
        todo = {i - n_body for i in found if i >= n_body} - carry
        carry |= todo
    return cond_consts, body_consts, carry


def deciding_operands(eqn: C.JaxprEqn) -> list[int]:
    """Positions of the operands that decide which way a ``cond``/``while`` goes.

    For a ``cond`` its branch index; for a ``while`` the operands its trip count depends
    on: those the loop's condition reads, then, until nothing changes, those the body
    computes them from (``fori_loop(0, n, ...)``: the counter and ``n``). These are the
    control dependencies of every value computed inside the conditional or loop.
    """
    name = eqn.primitive.name
    if name == "cond":
        return [0]
    if name != "while":
        return []
    p = eqn.params
    n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = _deciding(
        p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr, n_cond, n_body
    )
    return sorted(
        [*cond_consts, *(n_cond + i for i in body_consts), *(n_cond + n_body + i for i in carry)]
    )


def input_reads(jaxpr: C.Jaxpr, outs: Iterable[int]) -> set[int]:
    """Positions of the inputs that the outputs at ``outs`` depend on (a liveness walk)."""
    live = {v for i in outs if isinstance(v := jaxpr.outvars[i], C.Var)}  # not a Literal
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars if not isinstance(v, C.DropVar)):
            live.update(a for a in eqn.invars if isinstance(a, C.Var))
    return {i for i, v in enumerate(jaxpr.invars) if v in live}
