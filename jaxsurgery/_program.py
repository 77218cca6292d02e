"""The flat program: one jaxpr with nested calls inlined, and its dataflow index.

``js.trace`` produces a closed jaxpr whose ``jit`` calls nest other jaxprs. A
:class:`Program` inlines those calls (they carry no rule of their own), strips the
identity ``name`` equations of ``js.tag``/``checkpoint_name`` (remembering the
names), and indexes the result: every var gets an integer, every equation the
integers it reads and writes. Slicing and evaluation are liveness walks over those
integers, in the manner of ``jax._src.interpreters.partial_eval._dce_jaxpr``.

The jaxpr is the source of truth; the integer tables are derived from it once.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from . import _compat as C
from . import _eager
from ._control_flow import (
    BRANCH_PRIMITIVES,
    LOOP_PRIMITIVES,
    ControlFlow,
    Folded,
    deciding_operands,
    input_reads,
)
from ._eager import last_uses, lasting_op, op_key, run_eqns
from ._errors import short_list
from ._gc import gc_paused
from ._structured import Site, Step, eval_equations, locate, row_value, unlifted
from ._tag import MARK_PREFIX


class Program:
    """A flat jaxpr (no inlinable calls) plus integer dataflow tables.

    Attributes:
        jaxpr: the flat ``Jaxpr``; its ``constvars`` hold captured constants.
        consts: values of ``jaxpr.constvars``.
        num_inputs / num_consts: how many vars are inputs, then constants.
        vars: jaxpr vars in index order: inputs, constants, equation outputs.
        producer: per var, the index of the equation that writes it, or -1.
        primitives: per var, its producing primitive, ``"input"`` or ``"const"``.
        eqn_in / eqn_out: per equation, the var indices it reads / writes.
        outputs: var indices of the program outputs.
        tags: ``(var index, name)`` of ``js.tag``/``checkpoint_name`` in program order
            (``name@t`` in iteration ``t`` of a loop).
        regions: the inlined calls (``jit``, ``custom_jvp``, ``remat``, ...) as
            :class:`Region` s, outermost first.
    """

    def __init__(
        self,
        closed: C.ClosedJaxpr,
        flat_args: Sequence[Any] | None = None,
        fold: bool | int = True,
    ):
        """``fold``: keep every scan one equation (True), unroll every loop (False), or
        keep those that would unroll past that many equations (an int)."""
        inliner = _Inliner(flat_args, fold)
        self.closed = closed
        self._index(inliner, *inliner.run(closed))
        self._top: set[C.Var] | None = None

    def site(self, i: int) -> Site | None:
        """Where var ``i`` lives in the nested program (None: made by the inliner).

        See :mod:`jaxsurgery._structured`.
        """
        found = self.found(i)
        return None if found is None else locate(self.closed, *found)

    def unlifted_site(self, i: int) -> Site | None:
        """Where var ``i``'s equation is in the nested program, not lifted out of the
        calls returning it (None: made by the inliner)."""
        found = self.found(i)
        return None if found is None else unlifted(self.closed, *found)

    def found(self, i: int) -> tuple[tuple[Step, ...], C.Var] | None:
        """``(steps, nested var)`` of var ``i`` before lifting (None: made by the inliner)."""
        v = self.vars[i]
        found = self.locations.get(v)
        if found is None:
            if self._top is None:
                jaxpr = self.closed.jaxpr
                self._top = {*jaxpr.invars, *jaxpr.constvars}
                self._top.update(o for e in jaxpr.eqns for o in e.outvars)
            if v not in self._top:
                return None
            found = ((), v)
        return found

    def template_locate(self, var: Any) -> list[tuple[int, int, tuple[int, ...]]]:
        """Where a var of a folded loop's body lies: ``[(loop, template var, iterations)]``."""
        return [(k, i, its) for k, f in enumerate(self.folded) for i, its in f.template.locate(var)]

    def _shard_map_bodies(self, jaxpr: C.Jaxpr) -> None:
        """Note the ``js.tag`` s of the ``shard_map`` bodies among the flat program's
        equations, which the index does not enter (:attr:`sharded_tags`)."""
        stack = [
            inner
            for e in jaxpr.eqns
            if e.primitive.name == "shard_map"
            for inner in C.inner_jaxprs(e)
        ]
        tags: dict[str, None] = {}
        while stack:
            for eqn in stack.pop().eqns:
                if eqn.primitive.name == C.TAG_PRIMITIVE and not C.tag_name(eqn).startswith(
                    MARK_PREFIX
                ):
                    tags[C.tag_name(eqn)] = None
                stack.extend(C.inner_jaxprs(eqn))
        self.sharded_tags = list(tags)
        if tags:
            one = len(tags) == 1
            self.notes.append(
                f"{short_list([repr(n) for n in tags])} {'tags' if one else 'each tag'} "
                + IN_SHARD_MAP
            )

    def _index(self, inliner: _Inliner, jaxpr: C.Jaxpr, consts: list[Any]) -> None:
        """Build the integer tables of a flat jaxpr the inliner produced."""
        self.jaxpr, self.consts = jaxpr, consts
        # from the inliner, not the jaxpr: newer JAX lists unvalued constvars as invars
        self.num_inputs, self.num_consts = len(inliner._invars), len(inliner.constvars)
        self.vars: list[C.Var] = [*inliner._invars, *inliner.constvars]
        self.producer: list[int] = [-1] * len(self.vars)
        self.primitives: list[str] = ["input"] * self.num_inputs + ["const"] * self.num_consts
        self.eqn_in: list[tuple[int, ...]] = []
        self.eqn_out: list[tuple[int, ...]] = []
        index = {v: i for i, v in enumerate(self.vars)}
        Literal, DropVar = C.Literal, C.DropVar
        for e, eqn in enumerate(jaxpr.eqns):
            self.eqn_in.append(tuple([index[a] for a in eqn.invars if type(a) is not Literal]))
            outs = []
            for v in eqn.outvars:
                if type(v) is DropVar:
                    continue
                index[v] = len(self.vars)
                self.vars.append(v)
                self.producer.append(e)
                self.primitives.append(eqn.primitive.name)
                outs.append(index[v])
            self.eqn_out.append(tuple(outs))
        self.index = index
        self._users: list[list[int]] | None = None
        self._ops: dict[int, Any] = {}  # per equation run by evaluate: its compiled op
        self.outputs = [index[v] for v in jaxpr.outvars]
        tags = [(index[v], name, its) for v, name, its in inliner.tags]
        #: the copies of each value a mark named under a transform, by its token, in
        #: program order (see ``_instrument.Recorder._named``)
        self.marked: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
        for i, name, its in tags:
            if name.startswith(MARK_PREFIX):
                self.marked.setdefault(name, []).append((i, its))
        if self.marked:
            tags = [t for t in tags if not t[1].startswith(MARK_PREFIX)]
        #: ``(var index, name without the iterations of the loops around it, iterations)``
        self.tag_iterations = tags
        self.tags = [(i, _at(name, its)) for i, name, its in tags]
        self._origin: dict[int, list[tuple[int, tuple[int, ...]]]] = {
            k: [(index[v], ts) for v, ts in vs if v in index] for k, vs in inliner.origin.items()
        }
        self.notes = inliner.notes
        #: the names of the js.tags in shard_map bodies (per shard: no var has them)
        self.sharded_tags: list[str] = []
        if "shard_map" in self.primitives:  # (a scan of a C list: the common case)
            self._shard_map_bodies(jaxpr)
        self.locations, self.while_trips = inliner.locations, inliner.while_trips
        self.opaque_loops, self.invariant_ids = inliner.opaque_loops, inliner.invariant_ids
        self.folded = inliner.folded  # long scans kept as one equation (_loop_index)
        # calls that produced equations, outermost first (by start, then by size)
        self.regions = sorted(
            (r for r in inliner.regions if r.end > r.start), key=lambda r: (r.start, -r.end)
        )
        self._starts: list[int] | None = None  # the regions' starts (see enclosing)
        self._parents: list[int] = []  # per region, the one around it (or -1)
        # control dependencies: what decides a cond or a while's trip count is read by
        # every equation inside it (for windows, context and connectivity)
        for r in self.regions:
            deciders = tuple(index[a] for a in r.deciders if a in index)
            if deciders:
                for e in range(r.start, r.end):
                    self.eqn_in[e] += deciders
            if r.trip_starts:  # an unrolled while: each trip is decided by the carry
                self._trip_dependencies(r)
            if r.primitive in BRANCH_PRIMITIVES or r.primitive == "while":
                # and its results (the identity equations at its end, see
                # ControlFlow._written) read every operand: another branch, or trips the
                # traced arguments did not run, may read what the traced path does not
                operands = tuple(index[a] for a in r.ins if type(a) is not Literal and a in index)
                for e in range(r.end - len(r.outs), r.end):
                    self.eqn_in[e] += operands

    def _trip_dependencies(self, r: Region) -> None:
        """Control dependencies of an unrolled while's trips: what its condition reads
        of the carry entering trip ``t`` is read by trip t's equations, and what it
        reads after the last trip by the loop's results (a value in trip 2 decides
        whether trip 3 runs, so the trip count's dependents depend on it)."""
        p = r.eqn.params
        used = input_reads(p["cond_jaxpr"].jaxpr, range(1))
        consts = r.ins[: p["cond_nconsts"]]
        index, Literal = self.index, C.Literal
        ends = [*r.trip_starts[1:], r.end - len(r.outs)]
        deciders: tuple[int, ...] = ()
        for t, carry in enumerate(r.boundaries):
            found = tuple(
                index[a]
                for k, a in enumerate([*consts, *carry])
                if k in used and type(a) is not Literal and a in index
            )
            deciders = found or deciders  # a literal flag: decided where it was set
            span = range(r.trip_starts[t], ends[t]) if t < len(r.trip_starts) else ()
            for e in span or range(r.end - len(r.outs), r.end):
                self.eqn_in[e] += deciders

    def source(self, i: int) -> str | None:
        """``"file.py:12"`` of the user code that made var ``i``, or None. A value made
        inside a library's jitted function (``jax.nn.relu``), whose traceback JAX cuts
        at the jit, has its call's line."""
        e = self.producer[i]
        if e < 0:
            return None
        frame = C.user_frame(self.jaxpr.eqns[e].source_info)
        for region in self.enclosing(e) if frame is None else ():
            frame = C.user_frame(region.source_info)
            if frame is not None:
                break
        return None if frame is None else f"{frame[0]}:{frame[1]}"

    def enclosing(self, e: int) -> Iterator[Region]:
        """The inlined calls around equation ``e``, innermost first."""
        if self._starts is None:  # regions come outermost first by start: a stack
            self._starts, self._parents, open_ = [], [], []
            for k, r in enumerate(self.regions):
                while open_ and self.regions[open_[-1]].end < r.end:
                    open_.pop()
                self._starts.append(r.start)
                self._parents.append(open_[-1] if open_ else -1)
                open_.append(k)
        k = bisect.bisect_right(self._starts, e) - 1
        while k >= 0:  # the last region starting before e, then the regions around it
            if self.regions[k].end > e:
                yield self.regions[k]
            k = self._parents[k]

    @functools.cached_property
    def retraced(self) -> bool:
        """Whether an equation, or one in a body, is a ``shard_map`` or a Pallas kernel,
        which JAX traces again when it runs them (see ``C.compile_time_eval``)."""
        return C.retraced(self.jaxpr.eqns)

    @property
    def users(self) -> list[list[int]]:
        """Per var, the equations that read it, in program order (built when first used)."""
        if self._users is None:
            users: list[list[int]] = [[] for _ in self.vars]
            for e, ins in enumerate(self.eqn_in):
                for i in dict.fromkeys(ins):
                    users[i].append(e)
            self._users = users
        return self._users

    def var_edges(self) -> list[tuple[int, int]]:
        """Dataflow between vars: ``(read, made)`` for every equation, in program order."""
        return [(i, o) for ins, outs in zip(self.eqn_in, self.eqn_out) for i in ins for o in outs]

    def locate(self, var: Any) -> list[tuple[int, tuple[int, ...]]]:
        """Where a var of the traced (nested) jaxpr ended up: ``[(index, iterations)]``.

        A var of a loop body has one entry per iteration, with the iteration numbers of
        the enclosing unrolled loops; a var of a call traced once and called k times
        has k entries; a top-level var kept as it is, one entry. A mark's token (a
        ``str``) lists the copies of the value it tagged.
        """
        if type(var) is str:
            return self.marked.get(var, [])
        found = self._origin.get(id(var))
        if found is not None:
            return found
        i = self.index.get(var) if isinstance(var, C.Var) else None
        return [] if i is None else [(i, ())]

    def ancestor_eqns(
        self,
        targets: Iterable[int],
        through: Callable[[int], bool] | None = None,
        into: set[int] | None = None,
    ) -> set[int]:
        """Equations needed to compute ``targets`` (a backward liveness walk).

        Args:
            through: walk only through vars for which it is true (all by default);
                the others are taken as given.
            into: a set of equations already found, to add to (and not walk again).
        """
        needed = set() if into is None else into
        stack = [t for t in targets if through is None or through(t)]
        seen = set(stack)
        producer, eqn_in = self.producer, self.eqn_in
        while stack:
            e = producer[stack.pop()]
            if e < 0 or e in needed:
                continue
            needed.add(e)
            for i in eqn_in[e]:
                if i not in seen and (through is None or through(i)):
                    seen.add(i)
                    stack.append(i)
        return needed

    def sub_jaxpr(
        self,
        eqns: Sequence[int],
        invars: Sequence[int],
        outvars: Sequence[int],
        constvars: Sequence[int] = (),
    ) -> C.Jaxpr:
        """A jaxpr of the given equations (in program order) between given vars."""
        return C.new_jaxpr(
            [self.vars[i] for i in constvars],
            [self.vars[i] for i in invars],
            [self.vars[i] for i in outvars],
            [self.jaxpr.eqns[e] for e in eqns],
        )

    def _window_key(
        self, eqns: Sequence[int], ins: Sequence[int], outs: Sequence[int], signatures: list
    ) -> Any:
        """What ``sub_jaxpr(eqns, ins, outs)`` computes, up to the names of its vars
        (``signatures``: each equation's :func:`_signature`): two windows of one key are
        one function (the layers of a model); None where a parameter or literal does not
        hash."""
        place = {v: ("in", k) for k, v in enumerate(ins)}
        parts: list[Any] = []
        Literal = C.Literal
        for k, e in enumerate(eqns):
            eqn = self.jaxpr.eqns[e]
            try:
                operands = tuple(
                    _literal_key(a) if type(a) is Literal else place[self.index[a]]
                    for a in eqn.invars
                )
            except (TypeError, ValueError):  # a literal NumPy cannot hold (a key's)
                return None
            if signatures[k] is None:  # (parameters that do not hash)
                return None
            parts.append((signatures[k], operands))
            for j, i in enumerate(self.eqn_out[e]):
                place[i] = (k, j)
        key = (tuple(parts), tuple(place[i] for i in outs))
        try:
            hash(key)
        except TypeError:
            return None
        return key

    @gc_paused  # it allocates per equation run: collections would rescan the whole graph
    def evaluate(
        self,
        targets: Sequence[int],
        flat_args: Sequence[Any],
        known: dict[int, Any],
        check: Callable[[list[int]], Any] | None = None,
    ) -> dict[int, Any]:
        """Values of ``targets`` for the given flat inputs, computing only ancestors and
        starting from the ``known`` values of vars (earlier requests); ``check`` is
        given the inputs they read, before anything runs (the graph checks that those
        arguments are alive).

        Also returns checkpoints: the values of about every √n-th of the n equations
        run, so that a later request re-runs at most about √n equations of this prefix
        (memory: √n values more).
        """
        needed = sorted(self.ancestor_eqns(targets, through=lambda i: i not in known))
        vars_, top, n = self.vars, self.num_inputs + self.num_consts, self.num_inputs
        # (the inputs and constants these equations read: not all of a 4 000-layer
        # model's at each request)
        read = {i for e in needed for i in self.eqn_in[e] if i < top}
        read.update(i for i in targets if i < top)
        if check is not None:
            check(sorted(i for i in read if i < n))
        every = max(1, math.isqrt(len(needed)))
        checkpoints = [self.eqn_out[e][0] for e in needed[every - 1 :: every] if self.eqn_out[e]]
        outs = list(dict.fromkeys([*targets, *checkpoints]))
        made = {i for e in needed for i in self.eqn_out[e]}
        given = list(
            dict.fromkeys(
                i
                for e in needed
                for i in self.eqn_in[e]
                if i >= top and i not in made and i in known
            )
        )
        given_values = [row_value(known[i]) for i in given]
        eqns = [self.jaxpr.eqns[e] for e in needed]
        if len(eqns) <= COMPILE_WHOLE:
            # a short prefix of ops not run before (a real model's first value): one
            # compiled function costs less than compiling its ops one by one; and a
            # window like one compiled before (the next layer's) runs that function
            # (its inputs in the order of first use: layer k's window reads h@k-1 and
            # w_k as layer k+1's reads h@k and w_k+1)
            reads = [i for e in needed for i in self.eqn_in[e] if i < top or i not in made]
            ins = list(dict.fromkeys([*reads, *(i for i in outs if i not in made)]))
            signatures = [_signature(eqn) for eqn in eqns]
            key = self._window_key(needed, ins, outs, signatures)
            run = _WINDOWS.get(key) if key is not None else None
            if run is not None or _mostly_new(signatures):
                if run is None:
                    jaxpr = self.sub_jaxpr(needed, ins, outs)
                    run = jax.jit(functools.partial(C.eval_jaxpr, jaxpr, ()))
                    if key is not None:
                        if len(_WINDOWS) >= 64:
                            _WINDOWS.clear()
                        _WINDOWS[key] = run
                values = {i: x for i, x in zip(given, given_values)}
                args = [
                    values[i]
                    if i >= top
                    else flat_args[i]
                    if i < self.num_inputs
                    else self.consts[i - self.num_inputs]
                    for i in ins
                ]
                with C.staged_where_retraced(args, eqns):
                    return dict(zip(outs, run(*args)))
            if len(_RAN) > 65536:  # (run op by op below; a long run's ops are in _eager.OPS)
                _RAN.clear()
            _RAN.update(signatures)
        env: dict[Any, Any] = {
            vars_[i]: flat_args[i] if i < n else self.consts[i - n] for i in sorted(read)
        }
        env.update(zip((vars_[i] for i in given), given_values))
        ops = self._ops
        for e in needed:
            if e not in ops:
                ops[e] = lasting_op(self.jaxpr.eqns[e])
        run_eqns(eqns, [ops[e] for e in needed], env, last_uses(eqns, {vars_[i] for i in outs}))
        return {i: env[vars_[i]] for i in outs}


#: the longest prefix ``Program.evaluate`` may compile whole (XLA's compile time grows
#: faster than the program: a 1000-equation chain compiles in 0.6 s, 10 000 in 100 s)
COMPILE_WHOLE = 2000
#: functions of short windows compiled whole, by what they compute (``_window_key``)
_WINDOWS: dict[Any, Any] = {}
#: ops run op by op so far in short runs, by primitive, parameters and operand types
_RAN: set[Any] = set()


def _signature(eqn: C.JaxprEqn) -> Any:
    """What one compiled op of ``eqn`` is kept by (None: parameters that do not hash):
    its primitive, parameters and context (see :func:`_eager.compiled_op`), and its operands' types."""
    key = (*op_key(eqn), tuple(a.aval for a in eqn.invars))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _literal_key(a: Any) -> tuple:
    """A literal, as a key: its dtype, shape and bytes (``-0.0`` is not ``0.0``, as
    Python's ``==`` has it; an array literal has no Python value)."""
    value = np.asarray(a.val)
    return ("literal", str(value.dtype), value.shape, value.tobytes(), a.aval)


def _mostly_new(signatures: Sequence[Any]) -> bool:
    """Whether running equations of these :func:`_signature` s op by op would compile
    many ops: at about 10 ms an op against about 1 ms an equation compiled whole (and
    0.1 s at least), more than one in ten of them and more than 16. An op seen in a
    short run (:data:`_RAN`), or whose compiled function a long run made (in
    :data:`_eager.OPS`, by primitive, parameters and context: a later layer's, of the same
    types), is not new."""
    new = sum(
        1 for k in set(signatures) if k is None or (k not in _RAN and k[:3] not in _eager.OPS)
    )
    return new > 16 and 10 * new > len(signatures)


def _at(name: str, iterations: tuple[int, ...]) -> str:
    """``name@t`` for a value in iteration ``t`` of a loop (``@t@u`` nested)."""
    return name + "".join(f"@{t}" for t in iterations)


#: why a name of a value inside a shard_map's body selects nothing (after "'h' names")
IN_SHARD_MAP = (
    "a value inside a shard_map, which the graph keeps as one equation (its body runs once "
    "per shard): no var is that value; select what the shard_map returns, or trace the body "
    "on one shard's arrays"
)


def _inlinable(eqn: C.JaxprEqn) -> bool:
    """Whether a call's body can be inlined and folded back without losing its rule.

    A custom-rule call whose body returns one of its operands (or a constant) as is
    stays one opaque equation: inlined, that result would bypass the rule.
    """
    if eqn.primitive.name not in C.CUSTOM_RULE_PRIMITIVES:
        return True
    body = C.called_jaxpr(eqn).jaxpr
    outs = list(body.outvars)
    # (a literal, unhashable, is a constant it passes on: checked first)
    return not any(_passes_on(body, v) for v in outs) and len(set(outs)) == len(outs)


def _passes_on(jaxpr: C.Jaxpr, atom: Any) -> bool:
    """Whether ``atom`` of ``jaxpr`` is one of its inputs or a constant, also through
    tags (``js.tag``, a name mark under ``jax.vmap``) and calls that return one of
    theirs (``jax.jit(lambda v: v)``), which the inliner folds into their operands."""
    return _source(jaxpr, atom) is not None


def _source(jaxpr: C.Jaxpr, atom: Any) -> int | None:
    """The input position ``atom`` of ``jaxpr`` passes on (through tags and calls that
    pass theirs on), -1 for a literal or constant, None for a value it computes."""
    if not isinstance(atom, C.Var):
        return -1
    if atom in jaxpr.invars:
        return jaxpr.invars.index(atom)
    for e in reversed(jaxpr.eqns):
        if atom not in e.outvars:
            continue
        name = e.primitive.name
        if name == C.TAG_PRIMITIVE:
            return _source(jaxpr, e.invars[0])
        if name in C.CALL_PRIMITIVES and name not in C.CUSTOM_RULE_PRIMITIVES:
            body = C.called_jaxpr(e).jaxpr
            inner = _source(body, body.outvars[e.outvars.index(atom)])
            if inner is None or inner < 0:
                return inner
            return _source(jaxpr, e.invars[inner])
        return None
    return -1  # a constant of the jaxpr


class Region:
    """An inlined call: flat equations ``[start, end)`` that were one call equation.

    ``ins`` and ``outs`` are the call's operands and results as flat atoms; ``eqn`` is
    the original call equation (its params still hold the body and any custom rule).
    """

    __slots__ = (
        *("start", "end", "eqn", "ins", "outs", "source_info", "cut_note", "taken"),
        *("boundaries", "trip_starts"),
    )

    def __init__(self, start: int, eqn: C.JaxprEqn, ins: list[Any], source_info: Any):
        self.start, self.end, self.eqn, self.ins = start, start, eqn, ins
        self.outs: list[Any] = []
        self.source_info = source_info
        self.cut_note: str | None = None  # what a slice cutting inside must be told
        self.taken: int | None = None  # a cond: the branch inlined (the traced one)
        #: an unrolled while: its carry (flat atoms) entering each traced trip, then after
        #: the last one (what its condition was asked about)
        self.boundaries: list[list[Any]] = []
        self.trip_starts: list[int] = []  # and the equation each trip starts at

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name

    @property
    def name(self) -> str:
        """The called function's name; a ``cond`` or ``while`` region is its primitive's."""
        if self.primitive not in C.CALL_PRIMITIVES:
            return self.primitive
        return C.call_name(self.eqn)

    @property
    def deciders(self) -> list[Any]:
        """The operands that decide a ``cond``/``while`` (its control dependencies)."""
        return [self.ins[i] for i in deciding_operands(self.eqn) if isinstance(self.ins[i], C.Var)]

    def made_outs(self, program: Program) -> list[int | None]:
        """Per result, its var index if the region's equations write it, else None.

        A result the call forwards (one of its operands, a constant, a ``Literal``, a
        result already listed) is not written by the folded equation.
        """
        made: list[int | None] = []
        for a in self.outs:
            i = program.index.get(a) if isinstance(a, C.Var) else None
            written = i is not None and self.start <= program.producer[i] < self.end
            made.append(i if written and i not in made else None)
        return made

    def folded(self, program: Program) -> C.JaxprEqn:
        """The call as one equation over flat atoms (results it forwards are dropped)."""
        made = self.made_outs(program)
        outvars = [a if i is not None else C.DropVar(a.aval) for a, i in zip(self.outs, made)]
        eqn = self.eqn
        return C.new_jaxpr_eqn(
            self.ins, outvars, eqn.primitive, eqn.params, eqn.effects, self.source_info
        )


#: Primitives the inliner never copies as they are.
_SPECIAL = frozenset({*C.CALL_PRIMITIVES, *LOOP_PRIMITIVES, *BRANCH_PRIMITIVES, C.TAG_PRIMITIVE})


class _Inliner(ControlFlow):
    """Copies a closed jaxpr into one flat jaxpr, inlining calls and control flow."""

    def __init__(self, flat_args: Sequence[Any] | None = None, fold: bool | int = True) -> None:
        self.flat_args = flat_args
        self.fold = fold  # keep scans as one equation (see Program and _loop_index)
        self.folded: list[Folded] = []
        self.notes: list[str] = []
        self.iteration: list[int] = []
        #: whether a top-level var was mapped to another atom (then a top-level
        #: equation is reused only after checking what it reads)
        self.rewired = False
        self.opaque_loops: list[C.JaxprEqn] = []
        self.eqns: list[C.JaxprEqn] = []
        self.constvars: list[C.Var] = []
        self.consts: list[Any] = []
        self.tags: list[tuple[C.Var, str, tuple[int, ...]]] = []
        self.origin: dict[int, list[tuple[C.Var, tuple[int, ...]]]] = {}
        self.regions: list[Region] = []
        #: where each copied flat var lives in the nested program: ``(steps, nested
        #: var)`` (top-level vars kept as they are need no entry); see ``_structured``
        self.locations: dict[C.Var, tuple[tuple[Step, ...], C.Var]] = {}
        self.path: list[Step | None] = []  # None: inside a helper jaxpr (xs[t], stack)
        self.position = 0  # the index of the equation being copied in its jaxpr
        self._made_by_helper: set[C.Var] = set()
        #: flat atoms that the unrolled loops being inlined take as constants (a carry
        #: JAX found passed on unchanged is one): the same value in every iteration,
        #: so a name inside the body names no iteration of it (see _alias)
        self.invariant: dict[C.Var, int] = {}
        #: ids of nested vars that stand for such a constant (their names are dropped)
        self.invariant_ids: set[int] = set()
        # concrete values found so far (for conds and while_loops), see _values
        self._concrete: dict[C.Var, Any] = {}
        self._made: dict[C.Var, int] = {}
        self._made_upto = 0
        #: whether the last _values call gave up because a folded loop decides it
        self.after_loop = False
        #: the effectful primitive (an io_callback) the last _values call gave up at
        self.after_effect = ""
        #: traced trip count of each unrolled while_loop, by its steps (iteration None)
        self.while_trips: dict[tuple[Step, ...], int] = {}
        #: how many checkpoints that recompute forward values are being inlined
        self.recomputing = 0

    def run(self, closed: C.ClosedJaxpr) -> tuple[C.Jaxpr, list[Any]]:
        jaxpr = closed.jaxpr
        env: dict[Any, Any] = {}
        invars = self.keep_top_level(jaxpr.invars, jaxpr.constvars, closed.consts, env)
        self._copy(jaxpr, env, None)
        outvars = []
        for a in jaxpr.outvars:
            a = self._read(a, env)
            if isinstance(a, C.Literal):  # a constant output becomes a constant var
                a = self._new_const(np.asarray(a.val, a.aval.dtype), a.aval)
            outvars.append(a)
        return C.new_jaxpr(self.constvars, invars, outvars, self.eqns, "program"), self.consts

    def _fresh(self, v: C.Var, env: dict) -> C.Var:
        new = C.Var(v.aval)
        env[v] = new
        self.origin.setdefault(id(v), []).append((new, tuple(self.iteration)))
        self._locate(new, v)
        return new

    def _locate(self, flat: C.Var, nested: C.Var) -> None:
        """Record where a flat var lives in the nested program (the first place wins)."""
        if None in self.path:
            # made by a helper of the inliner's own (or a call inside one: a patch's
            # replacement calling jnp.clip): located when a body input or result aliases it
            self._made_by_helper.add(flat)
        elif flat not in self.locations:
            self.locations[flat] = (tuple(self.path), nested)

    def keep_top_level(
        self, invars: Sequence[C.Var], constvars: Sequence[C.Var], consts: Sequence[Any], env: dict
    ) -> list[C.Var]:
        """Take a program's inputs and constants as they are (they need no copy).

        Given as lists, not read from a jaxpr: newer JAX lists a jaxpr's constvars
        among its invars once it is built (a flat program's jaxpr, spliced again).
        """
        for v in invars:
            env[v] = v
        for v, value in zip(constvars, consts, strict=True):
            self.constvars.append(v)
            self.consts.append(value)
            env[v] = v
        self._invars = list(invars)
        return self._invars

    @contextlib.contextmanager
    def loop_constants(self, atoms: Sequence[Any]) -> Iterator[None]:
        """While an unrolled loop's iterations are inlined: its constant operands."""
        added = [a for a in atoms if isinstance(a, C.Var)]
        for a in added:
            self.invariant[a] = self.invariant.get(a, 0) + 1
        try:
            yield
        finally:
            for a in added:
                self.invariant[a] -= 1
                if not self.invariant[a]:
                    del self.invariant[a]

    def _inline(
        self,
        closed: C.ClosedJaxpr,
        atoms: Sequence[Any],
        source_info: Any,
        step: Step | None = None,
    ) -> list[Any]:
        """Copy a closed jaxpr's equations reading ``atoms``; its results as flat atoms.

        ``step`` says where the jaxpr sits in the nested program (None: a helper
        jaxpr of the inliner's own, whose values have no nested location).
        """
        self.path.append(step)
        inner_env: dict[Any, Any] = {}
        for v, a in zip(closed.jaxpr.invars, atoms):
            self._alias(v, a, inner_env)
        self._bind_consts(closed.jaxpr.constvars, closed.consts, inner_env)
        self._copy(closed.jaxpr, inner_env, source_info)
        self.path.pop()
        return [self._read(a, inner_env) for a in closed.jaxpr.outvars]

    def _values(self, atoms: Sequence[Any]) -> list[Any] | None:
        """Concrete values of flat atoms from the traced arguments (None if abstract).

        Each equation is evaluated at most once over the whole inlining (values are
        kept for later conds and loops), and only where a requested value needs it.
        Values that need a loop the index keeps whole are not computed (None): running
        it would cost what folding it saved.
        """
        self.after_loop, self.after_effect = False, ""
        if self.flat_args is None:
            return None
        env = self._concrete
        if not env:
            env.update(zip(self._invars, self.flat_args))
        env.update((v, x) for v, x in zip(self.constvars, self.consts) if v not in env)
        needed = self._ancestors(atoms, env)
        assert needed is not None  # (every input is in env)
        if any(self.eqns[k].primitive.name in LOOP_PRIMITIVES for k in needed):
            self.after_loop = True  # a loop kept whole (folded): not run at trace time
            return None
        effectful = next((self.eqns[k] for k in sorted(needed) if self.eqns[k].effects), None)
        if effectful is not None:  # an io_callback: tracing runs none of the host's effects
            self.after_effect = effectful.primitive.name
            return None
        return self._computed(atoms, env, needed)

    def _ancestors(
        self, atoms: Sequence[Any], env: dict, most: int | None = None
    ) -> set[int] | None:
        """The copied equations that compute ``atoms`` from what ``env`` holds (None
        where one reads a var no equation writes and env lacks, or past ``most``)."""
        made = self._made_so_far()
        needed: set[int] = set()
        stack = [a for a in atoms if isinstance(a, C.Var) and a not in env]
        while stack:
            k = made.get(stack.pop())
            if k is None or (most is not None and len(needed) > most):
                return None
            if k in needed:
                continue
            needed.add(k)
            stack.extend(a for a in self.eqns[k].invars if isinstance(a, C.Var) and a not in env)
        return needed

    def _computed(self, atoms: Sequence[Any], env: dict, needed: set[int]) -> list[Any] | None:
        """The values of ``atoms``, running the ``needed`` equations into ``env`` (None
        where one holds a tracer: from a tracer the function closes over, traced inside a
        transform, whose values decide nothing while tracing, as an abstract trace's)."""
        if needed:
            with jax.ensure_compile_time_eval():
                eval_equations([self.eqns[k] for k in sorted(needed)], env)
        found = [a.val if isinstance(a, C.Literal) else env[a] for a in atoms]
        return None if C.holds_tracer(found) else found

    def _made_so_far(self) -> dict[C.Var, int]:
        """The equation writing each flat var copied so far (kept up to date as it grows)."""
        made = self._made
        for k in range(self._made_upto, len(self.eqns)):
            for v in self.eqns[k].outvars:
                made[v] = k
        self._made_upto = len(self.eqns)
        return made

    def constant_values(self, atoms: Sequence[Any]) -> list[Any] | None:
        """Values of flat atoms that literals and constants alone compute (no input, no
        loop, no effect: a stage counter starting at 0 in a loop's body), or None."""
        env = {v: x for v, x in zip(self.constvars, self.consts)}
        needed = self._ancestors(atoms, env, most=64)  # (None: an input, what a loop passes in)
        if needed is None or any(
            self.eqns[k].effects or self.eqns[k].primitive.name in LOOP_PRIMITIVES for k in needed
        ):
            return None
        try:
            return self._computed(atoms, env, needed)
        except Exception:  # noqa: BLE001 (nothing to decide by: the loop stays whole)
            return None

    def known(self, atoms: Sequence[Any], values: Sequence[Any]) -> None:
        """Note concrete values of flat atoms found another way (an unrolled while's
        carries, found when counting its trips): a cond inside a later trip then runs
        its trip's ops only, not every trip before it again."""
        if self.flat_args is not None:
            for a, x in zip(atoms, values, strict=True):
                if isinstance(a, C.Var):
                    self._concrete.setdefault(a, x)

    def _alias(self, v: C.Var, atom: Any, env: dict) -> None:
        env[v] = atom
        if isinstance(atom, C.Var):
            if atom in self.invariant:  # a loop constant: no value per iteration
                self.invariant_ids.add(id(v))
                return
            self.origin.setdefault(id(v), []).append((atom, tuple(self.iteration)))
            # xs[t] is a body input; stacked ys, results (not a call's result inside a
            # helper: a patch's replacement calling jnp.clip)
            if atom in self._made_by_helper and None not in self.path:
                self._made_by_helper.discard(atom)
                self.locations[atom] = (tuple(self.path), v)

    def _new_const(self, value: Any, aval: Any) -> C.Var:
        var = C.Var(aval)
        self.constvars.append(var)
        self.consts.append(value)
        return var

    def _call_constant(self, literal: C.Literal, result: C.Var, source_info: Any) -> C.Var:
        """A var for a literal a call returns, written by an identity equation at the
        end of the call's region and located at the call's ``result`` (where it is in the
        nested program): as a value the call makes, a slice from it cuts the call (and a
        ``cond`` around it), which it would not from a constant (the call folded back
        reads no input: the slice ignored it)."""
        var = C.Var(literal.aval)
        self.eqns.append(C.identity_eqn(literal, var, source_info))
        self._locate(var, result)
        return var

    def _bind_consts(self, constvars: Sequence[C.Var], values: Sequence[Any], env: dict) -> None:
        for v, value in zip(constvars, values):
            env[v] = self._new_const(value, v.aval)
            self.origin.setdefault(id(v), []).append((env[v], tuple(self.iteration)))
            self._locate(env[v], v)

    @staticmethod
    def _read(a: Any, env: dict) -> Any:
        return a if isinstance(a, C.Literal) else env[a]

    def _copy(self, jaxpr: C.Jaxpr, env: dict, outer: C.SourceInfo | None) -> None:
        for position, eqn in enumerate(jaxpr.eqns):
            self.position = position
            self._copy_eqn(eqn, env, outer)

    def _copy_eqn(self, eqn: C.JaxprEqn, env: dict, outer: C.SourceInfo | None) -> None:
        """Copy one equation, inlining it when it is a call, loop or conditional."""
        name = eqn.primitive.name
        special = name in _SPECIAL
        if (
            outer is None
            and not self.iteration
            and not special
            and (
                not self.rewired
                or all(env.get(a, a) is a for a in eqn.invars if type(a) is not C.Literal)
            )
        ):  # a top-level equation reading unchanged vars: reuse it as it is
            for v in eqn.outvars:
                env[v] = v
            self.eqns.append(eqn)
            return
        source_info = (
            eqn.source_info if outer is None else C.nest_source_info(outer, eqn.source_info)
        )
        Literal = C.Literal
        invars = [a if type(a) is Literal else env[a] for a in eqn.invars]
        self.rewired = self.rewired or outer is None
        if special:
            outs = None
            if name in C.CALL_PRIMITIVES and _inlinable(eqn):
                region = Region(len(self.eqns), eqn, invars, source_info)
                self.regions.append(region)
                step = Step(self.position)
                again = C.recomputes(eqn)
                self.recomputing += again
                outs = self._inline(C.called_jaxpr(eqn), invars, source_info, step)
                # a constant the call returns (``return x * 2, 1.0``) is a value the
                # call writes, which the caller's name (`b`) selects (see _call_constant)
                outs = region.outs = [
                    self._call_constant(a, out, source_info)
                    if type(a) is Literal and type(out) is not C.DropVar
                    else a
                    for a, out in zip(outs, eqn.outvars)
                ]
                self.recomputing -= again
                region.end = len(self.eqns)
            elif name in LOOP_PRIMITIVES or name in BRANCH_PRIMITIVES:
                outs = self._control_flow(eqn, invars, source_info)
            elif name == C.TAG_PRIMITIVE and type(invars[0]) is not Literal:
                self._alias(eqn.outvars[0], invars[0], env)
                tag = C.tag_name(eqn)
                # a tag (a mark's token, js.tag, checkpoint_name) names the forward
                # value, not the copy a checkpoint recomputes in the backward pass (a
                # tag in a custom_vjp's backward rule names what the rule computes)
                if not (
                    (C.in_backward_pass(source_info) and tag.startswith(MARK_PREFIX))
                    or C.recomputed(source_info)  # also in a backward scan's body
                    or self.recomputing  # jax.linearize's linear function recomputes
                ):
                    self.tags.append((invars[0], tag, tuple(self.iteration)))
                return
            if outs is not None:
                for out, a in zip(eqn.outvars, outs):
                    if type(out) is not C.DropVar:
                        self._alias(out, a, env)
                return
        DropVar = C.DropVar
        outvars = [v if type(v) is DropVar else self._fresh(v, env) for v in eqn.outvars]
        self.eqns.append(C.copy_eqn(eqn, invars, outvars, source_info))
