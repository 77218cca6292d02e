"""Structural pattern matching and rewriting: ``g.match`` and ``g.rewrite``.

A pattern is a small function, traced like any other. It matches where the graph has
the same dataflow and primitives, names aside (in the manner of torch.fx's
``subgraph_rewriter``): each pattern equation maps to a graph equation with the same
primitive and structural params, operands map to operands (either order for
commutative primitives such as ``add`` and ``mul``), each pattern input binds one graph
value (not a literal: ``max(a, b)`` does not match relu's ``max(x, 0.0)``), and pattern
literals and captured arrays equal the graph's literals and constants.

Matches are found from the pattern's output backwards, tried at graph equations in
program order, and kept greedily when they share no equation with an earlier match,
so the result is deterministic and non-overlapping. A match's internal values (not
its outputs) must not be read outside it, so every match can be cut out or rewritten.

Sharp edge: params that carry shapes (``broadcast_in_dim``'s ``shape``, ``reshape``'s
``new_sizes``) must agree, so trace the pattern with arrays shaped like the target's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _compat as C
from ._errors import SliceError, short_list
from ._patch import Edit, replacement_jaxpr

if TYPE_CHECKING:
    from ._graph import Graph, Var
    from ._program import Program

#: Primitives whose two operands may be swapped.
COMMUTATIVE = frozenset({"add", "add_any", "mul", "max", "min", "and", "or", "xor", "eq", "ne"})
#: Params that do not change what an equation computes structurally.
INCIDENTAL_PARAMS = frozenset(
    {"precision", "preferred_element_type", "out_sharding", "sharding", "accuracy"}
)


@dataclass(frozen=True)
class Match:
    """One occurrence of a pattern.

    Attributes:
        inputs: the graph vars bound to the pattern's inputs, in the pattern's order.
        outputs: the graph vars that correspond to the pattern's outputs.
        vars: every graph var the matched equations write, in program order.
    """

    inputs: tuple[Var, ...]
    outputs: tuple[Var, ...]
    vars: tuple[Var, ...]

    def __repr__(self) -> str:
        ins = ", ".join(v.name for v in self.inputs)
        outs = ", ".join(v.name for v in self.outputs)
        return f"Match({ins} ↦ {outs}: {len(self.vars)} vars)"


def match(graph: Graph, pattern_fn: Callable[..., Any], *args: Any) -> tuple[Match, ...]:
    """See :meth:`Graph.match`; warns of occurrences where the index lists no value
    (:func:`find`)."""
    found, unreached = find(graph, pattern_fn, *args)
    if unreached:  # the user's call, through Graph.match and its traceback filter
        warnings.warn(unreached, stacklevel=4)
    return found


def find(
    graph: Graph, pattern_fn: Callable[..., Any], *args: Any
) -> tuple[tuple[Match, ...], str | None]:
    """The pattern's matches, and what is said of occurrences the index lists no value
    of (None if there are none): inside loops it keeps folded (per iteration) and in
    ``cond`` branches the traced arguments do not take. Those are not matches."""
    pattern = traced_pattern(pattern_fn, *args)
    found = tuple(_as_match(graph, pattern, state) for state in _find(pattern, graph._program))
    inside = unlisted(graph, pattern)
    if not inside:
        return found, None
    outside = "1 occurrence" if len(found) == 1 else f"{len(found)} occurrences"
    return found, (
        f"the pattern {getattr(pattern_fn, '__name__', pattern_fn)!r} occurs where the index "
        f"lists no value, at {short_list(inside, 4)}: g.match does not list these and "
        "g.rewrite does not change them (they run as they are; "
        f"{outside} elsewhere matched); a value inside a folded loop (per iteration, name@*) "
        "is patched with g.replace(name, fn), fn of its old value (one edit of the loop's body)"
    )


def _find(pattern: Program, target: Program) -> list[_State]:
    """The pattern's non-overlapping occurrences in a flat program, in program order."""
    anchor = pattern.jaxpr.eqns[pattern.producer[pattern.outputs[0]]].primitive
    found: list[_State] = []
    used: set[int] = set()
    for e, eqn in enumerate(target.jaxpr.eqns):
        if eqn.primitive != anchor:
            continue
        state = _Matcher(pattern, target).run(e)
        if state is None or used & set(state.eqn_map.values()):
            continue
        if any(isinstance(state.binding.get(pv), tuple) for pv in range(pattern.num_inputs)):
            continue  # an input bound to a literal (relu's max(x, 0.0) for max(a, b))
        used.update(state.eqn_map.values())
        found.append(state)
    return found


def traced_pattern(pattern_fn: Callable[..., Any], *args: Any) -> Program:
    """The pattern's flat program, checked to be one a match can grow back from its
    first output."""
    from ._trace import trace

    pattern = trace(pattern_fn, *args)._program
    if not pattern.jaxpr.eqns:
        raise SliceError("the pattern computes nothing: it has no equations to match")
    first = pattern.ancestor_eqns([pattern.outputs[0]])
    apart = [k for k, o in enumerate(pattern.outputs) if pattern.producer[o] not in first]
    if apart:  # matches grow back from the first output: the others must be on the way
        raise SliceError(
            f"the pattern's output {apart[0]} is not computed on the way to its output 0; "
            "a pattern is matched from its first output back, so every other output must "
            "be one of the values it computes; match independent parts (q = x @ wq, "
            "k = x @ wk) with one pattern each"
        )
    return pattern


def unlisted(graph: Graph, pattern: Program) -> list[str]:
    """Where else the pattern occurs with no value in the index: ``step/h@*`` in the
    body of a loop it keeps folded (:func:`in_folded_bodies`), ``branch 1 of the cond
    at model.py:12`` (a branch the traced arguments do not take, or a cond inside a
    folded body), ``the body of the while_loop at model.py:8`` (a loop kept whole)."""
    program = graph._program
    return [*in_folded_bodies(graph, pattern), *_hidden(pattern, program, top=True)]


def _hidden(pattern: Program, program: Program, top: bool = False) -> list[str]:
    """Occurrences in what ``program`` holds as whole equations (conds, loops, at any
    depth) and in the branches its inlined conds did not take; ``top``: the graph's own
    program, whose folded loops' bodies :func:`in_folded_bodies` names."""
    from ._control_flow import BRANCH_PRIMITIVES, LOOP_PRIMITIVES
    from ._program import Program

    folded = {f.flat_eqn: f for f in program.folded}
    places = []

    def search(closed_or_program: Any) -> tuple[bool, list[str]]:
        body = closed_or_program
        if not isinstance(body, Program):
            body = Program(body, None)
        return bool(_find(pattern, body)), _hidden(pattern, body)

    others = [(r.eqn, r.taken) for r in program.regions if r.primitive in BRANCH_PRIMITIVES]
    for e, eqn in enumerate(program.jaxpr.eqns):
        name = eqn.primitive.name
        if name in BRANCH_PRIMITIVES:
            others.append((eqn, None))
        elif name in LOOP_PRIMITIVES:
            loop = folded.get(e)
            body = loop.template if loop is not None else eqn.params[_BODY[name]]
            direct, deeper = search(body)
            if direct and not (top and loop is not None):
                places.append(f"the body of the {_LOOP_NAMES[name]}{_at(eqn)}")
            places += deeper
    for eqn, taken in others:
        for k, branch in enumerate(eqn.params["branches"]):
            if k != taken:
                direct, deeper = search(branch)
                if direct:
                    places.append(f"branch {k} of the {eqn.primitive.name}{_at(eqn)}")
                places += deeper
    return places


_BODY = {"scan": "jaxpr", "while": "body_jaxpr"}
_LOOP_NAMES = {"scan": "scan", "while": "while_loop"}


def _at(eqn: C.JaxprEqn) -> str:
    """`` at model.py:12``, where the user's code made ``eqn`` (or nothing)."""
    frame = C.user_frame(eqn.source_info)
    return f" at {os.path.basename(frame[0])}:{frame[1]}" if frame else ""


def in_folded_bodies(graph: Graph, pattern: Program) -> list[str]:
    """The names (``step/h@*``) of the values where the pattern's first output occurs
    inside the bodies of loops the index keeps folded."""
    from ._loop_index import unnamed_base

    folded = graph._program.folded
    if not folded:
        return []
    named: dict[tuple[int, int], str] = {}  # a name selecting the body value alone
    for base, ts in graph._loop_index.names.items():
        if len({(t.loop, t.var) for t in ts}) == 1:  # not a bare `c` of c#0 and c#1
            named.setdefault((ts[0].loop, ts[0].var), base)
    out0 = pattern.outputs[0]
    places = []
    for k, loop in enumerate(folded):
        body = loop.template
        for state in _find(pattern, body):
            pe = pattern.producer[out0]
            ti = body.eqn_out[state.eqn_map[pe]][pattern.eqn_out[pe].index(out0)]
            places.append(named.get((k, ti), unnamed_base(k, ti)) + "@*")
    return list(dict.fromkeys(places))


def rewrite_edits(
    graph: Graph, matches: tuple[Match, ...], replacement_fn: Callable[..., Any]
) -> list[Edit]:
    """Edits replacing each match's output by ``replacement_fn(*match.inputs)``."""
    edits = []
    for m in matches:
        if len(m.outputs) != 1:
            raise SliceError(
                f"rewrite replaces one output per match; {m!r} has {len(m.outputs)}: "
                "use a pattern with one output"
            )
        want = m.outputs[0]
        closed = replacement_jaxpr(
            replacement_fn, m.inputs, want, f"the replacement of the pattern's output {want.name!r}"
        )
        edits.append(Edit(want.index, closed, tuple(v.index for v in m.inputs)))
    return edits


class _State:
    __slots__ = ("binding", "eqn_map")

    def __init__(self, binding: dict[int, Any], eqn_map: dict[int, int]):
        self.binding, self.eqn_map = binding, eqn_map

    def copy(self) -> _State:
        return _State(dict(self.binding), dict(self.eqn_map))


class _Matcher:
    def __init__(self, pattern: Program, target: Program):
        self.p, self.t = pattern, target

    def run(self, anchor_eqn: int) -> _State | None:
        p, t = self.p, self.t
        out0 = p.outputs[0]
        pos = p.eqn_out[p.producer[out0]].index(out0)
        outs = t.eqn_out[anchor_eqn]
        if pos >= len(outs):
            return None
        state = self._var(out0, outs[pos], _State({}, {}))
        if state is None:
            return None
        for o in p.outputs[1:]:
            pe = p.producer[o]
            if pe not in state.eqn_map:
                return None  # an output not computed along the first one's ancestry
        if not self._closed(state):
            return None
        return state

    def _var(self, pv: int, tv: Any, state: _State) -> _State | None:
        """Unify pattern var ``pv`` with target atom ``tv`` (a var index or Literal)."""
        p, t = self.p, self.t
        pe = p.producer[pv]
        if pe < 0 and pv >= p.num_inputs:  # a pattern constant (a captured array)
            return state if _same_constant(p.consts[pv - p.num_inputs], t, tv) else None
        if pe < 0:  # a pattern input: binds any one target value
            key = tv if not isinstance(tv, C.Literal) else ("literal", id(tv))
            if pv in state.binding:
                return state if state.binding[pv] == key else None
            state.binding[pv] = key
            return state
        if isinstance(tv, C.Literal):
            return None
        te = t.producer[tv]
        if te < 0:
            return None
        if p.eqn_out[pe].index(pv) != t.eqn_out[te].index(tv):
            return None
        if pe in state.eqn_map:
            return state if state.eqn_map[pe] == te else None
        if te in state.eqn_map.values():
            return None
        peqn, teqn = p.jaxpr.eqns[pe], t.jaxpr.eqns[te]
        if peqn.primitive != teqn.primitive or not _same_params(peqn.params, teqn.params):
            return None
        if len(peqn.invars) != len(teqn.invars):
            return None
        state.eqn_map[pe] = te
        orders = [list(teqn.invars)]
        if peqn.primitive.name in COMMUTATIVE and len(teqn.invars) == 2:
            orders.append(list(reversed(teqn.invars)))
        for order in orders:
            trial = state.copy() if len(orders) > 1 else state
            trial = self._operands(list(peqn.invars), order, trial)
            if trial is not None:
                return trial
        return None

    def _operands(self, pattern_atoms: list, target_atoms: list, state: _State) -> _State | None:
        for pa, ta in zip(pattern_atoms, target_atoms):
            if isinstance(pa, C.Literal):
                if not (isinstance(ta, C.Literal) and _same_literal(pa, ta)):
                    return None
                continue
            target = ta if isinstance(ta, C.Literal) else self.t.index[ta]
            state = self._var(self.p.index[pa], target, state)
            if state is None:
                return None
        return state

    def _closed(self, state: _State) -> bool:
        """No internal value of the match is read outside it (or is a graph output)."""
        t, p = self.t, self.p
        matched = set(state.eqn_map.values())
        outputs = {
            t.eqn_out[state.eqn_map[p.producer[o]]][p.eqn_out[p.producer[o]].index(o)]
            for o in p.outputs
        }
        graph_outputs = set(t.outputs)
        for te in matched:
            for v in t.eqn_out[te]:
                if v in outputs:
                    continue
                if v in graph_outputs or any(u not in matched for u in t.users[v]):
                    return False
        return True


def _same_params(a: dict, b: dict) -> bool:
    keys = (set(a) | set(b)) - INCIDENTAL_PARAMS
    try:
        return all(a.get(k) == b.get(k) for k in keys)
    except (TypeError, ValueError):  # arrays in params: compare as arrays
        return all(np.array_equal(np.asarray(a.get(k)), np.asarray(b.get(k))) for k in keys)


def _same_constant(value: Any, target: Program, atom: Any) -> bool:
    """Whether a target atom is a literal or constant equal to a pattern's constant."""
    if isinstance(atom, C.Literal):
        other = atom.val
    elif target.num_inputs <= atom < target.num_inputs + target.num_consts:
        other = target.consts[atom - target.num_inputs]
    else:
        return False
    return _equal(value, other)


def _same_literal(a: C.Literal, b: C.Literal) -> bool:
    return _equal(a.val, b.val)


def _equal(a: Any, b: Any) -> bool:
    """Whether two constants are the same value: dtype, shape and elements."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and np.array_equal(a, b)


def _as_match(graph: Graph, pattern: Program, state: _State) -> Match:
    t = graph._program
    inputs = []
    for pv in range(pattern.num_inputs):
        bound = state.binding.get(pv)
        if bound is None:
            raise SliceError(
                f"pattern input {pv} is not used by the pattern's outputs; every pattern "
                "input must feed the pattern's result"
            )
        inputs.append(graph.vars[bound])
    outputs = []
    for o in pattern.outputs:
        pe = pattern.producer[o]
        outputs.append(graph.vars[t.eqn_out[state.eqn_map[pe]][pattern.eqn_out[pe].index(o)]])
    written = sorted(v for te in state.eqn_map.values() for v in t.eqn_out[te])
    return Match(tuple(inputs), tuple(outputs), tuple(graph.vars[v] for v in written))
