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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _compat as C
from ._errors import SliceError, short_list, warn
from ._patch import Edit, replacement_jaxpr
from ._promotion import dtype_kind

if TYPE_CHECKING:
    from ._graph import Graph, Var
    from ._program import Program
    from ._structured import Edit as StructuredEdit
    from ._structured import Site

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
    """See :meth:`Graph.match`; warns of occurrences it does not list (:func:`find`)."""
    found = find(graph, pattern_fn, *args)
    said = found.unlisted()
    if said:  # the user's call, through Graph.match and its traceback filter
        warn(said)
    return found.matches


@dataclass
class Found:
    """What :func:`find` found of a pattern in a graph."""

    #: the occurrences the index lists values of
    matches: tuple[Match, ...]
    pattern: Program
    label: str  # the pattern's name, for messages
    #: occurrences in the bodies of loops the index keeps folded, one value per
    #: iteration: ``(loop, state, name@*, place)`` (see :func:`body_place`); g.rewrite
    #: rewrites them at every iteration
    in_bodies: list[tuple[int, _State, str, tuple]]
    #: where else it occurs, with no value in the index (not rewritten)
    elsewhere: list[str]
    #: where it occurs nowhere: its deepest equation met with other parameters (see
    #: ``_Matcher.near``), or None
    near: tuple[int, str, dict] | None = None
    #: occurrences in folded loops' bodies this graph rewrote already (``name@*``): the
    #: replacement runs there, which the index (the body as traced) does not show
    rewritten: list[str] = field(default_factory=list)
    #: whether the graph patched a folded loop's body (its index shows it as traced)
    patched_bodies: bool = False
    #: occurrences whose output this graph patched (``h.unpatched``: g.rewrite or
    #: g.replace there), which the program no longer reads: not matched
    replaced: list[str] = field(default_factory=list)
    #: where it occurs whole but one of its inner values is read outside it:
    #: ``(its output, that value, what reads it)`` by name (see ``_Matcher.open``)
    open: tuple[str, str, str] | None = None

    def missed(self) -> str | None:
        """Why a pattern occurring nowhere may have been expected to (None: no clue):
        it occurs, but a value inside it is read outside it (a BatchNorm's batch mean,
        which its moving average reads too); or its equations are there, with
        parameters that depend on the example arguments (a softmax's axes, traced with
        a matrix, in a model of rank-3 activations)."""
        if self.open is not None:
            out, inner, by = self.open
            return (
                f"the pattern {self.label!r} occurs at {out}, but its value {inner} is "
                f"also read outside it ({by}), so it is no match there: a match's inner "
                "values are read by the match only, so that it can be cut out or "
                f"rewritten; make {inner} an output of the pattern too (return it as well)"
                ", or end the pattern before it"
            )
        if self.near is None:
            return None
        depth, primitive, diff = self.near
        said = ", ".join(
            f"{k}={_short_param(t)} where the pattern has {k}={_short_param(p)}"
            for k, (p, t) in list(diff.items())[:2]
        )
        shapes = (
            " (a broadcast, reshape or reduction holds shapes and axes), so trace it with "
            "example arguments of the shapes of the values it should match; if they have "
            "those shapes, the graph computes it otherwise than the pattern (a library "
            "broadcasting a bias to the whole output, not as + does): write the pattern "
            "as the library computes it, or with the library's own layer"
            if any(k in _SHAPE_PARAMS for k in diff)
            else ""
        )
        return (
            f"the pattern {self.label!r} matches nothing in this graph, which has the "
            f"pattern's {primitive} with other parameters ({said}), after {depth} of its "
            f"equations matched: a pattern matches parameters as traced{shapes}"
        )

    def patched(self) -> str | None:
        """What a graph whose loop bodies hold patches says of them (None: none)."""
        said = []
        if self.replaced:
            said.append(
                f"the pattern {self.label!r} occurred at {short_list(self.replaced, 4)}, "
                "the value before a patch of this graph (g.rewrite, g.replace), which the "
                "program no longer reads: it is not matched again"
            )
        if self.rewritten:
            said.append(
                f"the pattern {self.label!r} occurred at {short_list(self.rewritten, 4)}, in "
                "the body of a loop the index keeps folded, which this graph rewrote there "
                "already: the replacement runs there, so it is not matched again"
            )
        if self.patched_bodies and not (self.matches or self.in_bodies or self.rewritten):
            said.append(
                "this graph patched the body of a loop the index keeps folded (g.rewrite, "
                "g.replace of name@*), which the index lists as traced: what a patch "
                "computes there is matched by no pattern"
            )
        return "; ".join(said) or None

    def unlisted(self) -> str | None:
        """What g.match says of the occurrences it does not list (None: there are none)."""
        said = [] if self.matches else [m for m in [self.missed()] if m]
        if self.patched():
            said.append(self.patched())
        if self.in_bodies:
            names = short_list(dict.fromkeys(n for _, _, n, _ in self.in_bodies), 4)
            said.append(
                f"the pattern {self.label!r} occurs in the body of a loop the index keeps "
                f"folded, at {names}: one value per iteration, so g.match does not list them "
                "(g.rewrite rewrites them at every iteration)"
            )
        if self.elsewhere:
            said.append(self.unchanged())
        return "; ".join(said) or None

    def unchanged(self) -> str | None:
        """What g.rewrite says of the occurrences it does not change (None: none)."""
        if not self.elsewhere:
            return None
        outside = len(self.matches) + len(self.in_bodies)
        listed = (
            "the index lists no occurrence to change"
            if not outside
            else f"the {outside} occurrence{'s' if outside != 1 else ''} the index lists "
            f"{'are' if outside != 1 else 'is'} changed"
        )
        loops = any(" scan" in p or "while_loop" in p for p in self.elsewhere)
        return (
            f"the pattern {self.label!r} occurs where the index lists no value, at "
            f"{short_list(self.elsewhere, 4)}: g.match does not list these and g.rewrite "
            f"does not change them (they run as they are; {listed})"
        ) + (
            "; a value inside a folded loop (per iteration, name@*) is patched with "
            "g.replace(name, fn), fn of its old value (one edit of the loop's body)"
            if loops
            else ""
        )


def every_trip(
    graph: Graph, edits: Sequence[Edit], targets: dict[int, frozenset[int]] | None = None
) -> tuple[list[Edit], list[tuple[str, StructuredEdit]], list[str]]:
    """Rewrite edits in the trips of ``while_loop`` s the index unrolls (or, given
    ``targets``, the edits of those vars, in any ``while_loop`` trip: ``g.replace`` of
    ``body/h@*``, each with the loops, counted from the innermost, whose every trip it
    edits), made edits of every trip: one edit of the loop's body, which
    applies in each trip the loop runs for any arguments (an edit per traced trip left
    the trips more arguments run unchanged). Returns the other edits, those made, and
    the names of edits in such trips that could not be made so (warned: they change
    the traced trips only)."""
    from ._patch_graph import _structured_edit
    from ._structured import Edit as StructuredEdit
    from ._structured import Site

    program = graph._program
    loops = [(r.start, r.end) for r in program.regions if r.primitive == "while"]
    kept, made, left = [], {}, []
    for edit in edits:
        if targets is not None:
            inside = edit.target in targets
        else:
            inside = any(a <= program.producer[edit.target] < b for a, b in loops)
        if not inside:
            kept.append(edit)
            continue
        name = graph._var(edit.target).name
        try:
            site = _structured_edit(graph, edit)
        except SliceError:  # reads another trip's value: per traced trip, as it is
            kept.append(edit)
            left.append(name)
            continue
        # (a replace of ``outer/body/h@1@*``: every trip of the loop its ``@*`` counts,
        # in outer trip 1 only; a rewrite: every trip of every loop around it)
        steps, bound = _every_trip(site.site, None if targets is None else targets[edit.target])
        key = (steps, site.site.vars, site.reads)
        if key not in made:
            every = Site(steps, site.site.vars, bound)
            made[key] = (name, StructuredEdit(every, "apply", site.fn, site.reads))
    return kept, list(made.values()), left


def find(graph: Graph, pattern_fn: Callable[..., Any], *args: Any) -> Found:
    """The pattern's occurrences: matches in the index, in the bodies of folded loops,
    and where the index lists no value (``cond`` branches the traced arguments do not
    take; a loop or cond inside a folded body)."""
    pattern = traced_pattern(pattern_fn, *args)
    near: list = []
    opened: list = []
    states = _find(pattern, graph._program, near, opened)
    every = [_as_match(graph, pattern, state) for state in states]
    # an output a patch replaced that nothing reads any more (a constant's: the pattern
    # is gone; a function's patch reads it, and a rewrite there is refused)
    program = graph._program
    gone = [
        m
        for m in every
        if any(
            v.index in graph._unpatched
            and not program.users[v.index]
            and v.index not in program.outputs
            for v in m.outputs
        )
    ]
    found = tuple(m for m in every if m not in gone)
    in_bodies = in_folded_bodies(graph, pattern, near)
    elsewhere = _hidden(pattern, graph._program, top=True)
    label = getattr(pattern_fn, "__name__", repr(pattern_fn))
    # (the deepest near miss, of the index or of a folded loop's body)
    missed = max(near, key=lambda n: n[0]) if near and not in_bodies and not elsewhere else None
    # a folded loop's body a patch of this graph edits at every iteration: the index
    # shows it as traced, the patch runs (a rewrite there again would replace it)
    closed = graph._structure.closed
    patched = {
        e.site for e in graph._structure.edits if e.kind == "apply" and _in_body(closed, e.site)
    }
    rewritten, kept = [], []
    for k, state, name in in_bodies:
        place = body_place(graph, k, pattern, state)
        if place is None:  # (g.rewrite cannot edit it: said as g.rewrite says it)
            elsewhere.append(name)
        elif place[0] in patched:
            rewritten.append(name)
        else:
            kept.append((k, state, name, place))
    in_bodies = kept
    return Found(
        found,
        pattern,
        label,
        in_bodies,
        list(dict.fromkeys(elsewhere)),
        missed,
        rewritten,
        bool(patched),
        [v.name for m in gone for v in m.outputs],
        _open_names(graph, opened[0]) if opened and not in_bodies and not elsewhere else None,
    )


def _open_names(graph: Graph, found: tuple[int, int, int]) -> tuple[str, str, str]:
    """:attr:`Found.open` of ``_Matcher.open``: the vars by name."""
    out, inner, reader = found
    name = lambda i: graph._var(i).name  # noqa: E731
    by = {-1: "as an output of the graph", -2: "by an equation with effects"}
    return name(out), name(inner), by.get(reader) or f"by {name(reader)}"


def _in_body(closed: Any, site: Site) -> bool:
    """Whether an edit's site is in a loop's body at every iteration it runs (a range
    of a scan's, or every trip of a ``while_loop``)."""
    from ._structured import sub_jaxpr

    jaxpr = closed.jaxpr
    for s in site.steps:
        eqn = jaxpr.eqns[s.eqn]
        if isinstance(s.iteration, range) or (
            s.iteration is None and eqn.primitive.name == "while"
        ):
            return True
        jaxpr = sub_jaxpr(eqn, s).jaxpr
    return False


def _find(
    pattern: Program, target: Program, near: list | None = None, opened: list | None = None
) -> list[_State]:
    """The pattern's non-overlapping occurrences in a flat program, in program order;
    ``near`` gets the deepest near miss (see ``_Matcher.near``) where there are none,
    ``opened`` the first occurrence an outside read left open (``_Matcher.open``)."""
    anchor = pattern.jaxpr.eqns[pattern.producer[pattern.outputs[0]]].primitive
    found: list[_State] = []
    used: set[int] = set()
    matcher = _Matcher(pattern, target)
    for e, eqn in enumerate(target.jaxpr.eqns):
        if eqn.primitive != anchor:
            continue
        state = matcher.run(e)
        if state is None or used & set(state.eqn_map.values()):
            continue
        if any(isinstance(state.binding.get(pv), tuple) for pv in range(pattern.num_inputs)):
            continue  # an input bound to a literal (relu's max(x, 0.0) for max(a, b))
        if not _rules_kept(pattern, target, state):
            continue
        used.update(state.eqn_map.values())
        found.append(state)
    if near is not None and not found and matcher.near is not None:
        near.append(matcher.near)
    if opened is not None and not found and matcher.open is not None:
        opened.append(matcher.open)
    return found


def _rules_kept(pattern: Program, target: Program, state: _State) -> bool:
    """Whether each call with a custom rule in the pattern (``jax.nn.relu``'s
    ``custom_jvp``) matched a whole call of the same kind: a pattern of ``nn.relu`` is
    the activation, not every ``max(x, 0.0)`` (LayerNorm's clamp of its variance)."""
    for region in pattern.regions:
        if region.primitive not in C.CUSTOM_RULE_PRIMITIVES:
            continue
        mapped = {state.eqn_map[e] for e in range(region.start, region.end) if e in state.eqn_map}
        if not mapped:
            continue
        if not any(
            r.primitive == region.primitive
            and r.end - r.start == region.end - region.start
            and all(r.start <= e < r.end for e in mapped)
            for r in target.regions
        ):
            return False
    return True


def traced_pattern(pattern_fn: Callable[..., Any], *args: Any) -> Program:
    """The pattern's flat program, checked to be one a match can grow back from its
    first output."""
    from ._trace import trace

    pattern = trace(pattern_fn, *args)._program
    if not pattern.jaxpr.eqns:
        raise SliceError("the pattern computes nothing: it has no equations to match")
    first = pattern.ancestor_eqns([pattern.outputs[0]])
    apart = [k for k, o in enumerate(pattern.outputs) if pattern.producer[o] not in first]
    inputs = [k for k, o in enumerate(pattern.outputs) if o < pattern.num_inputs]
    if inputs:  # (said "output 0 is not computed on the way to its output 0")
        raise SliceError(
            f"the pattern's output {inputs[0]} is one of its arguments as it is: a pattern "
            "returns values it computes (a match's inputs are its arguments already)"
        )
    if apart:  # matches grow back from the first output: the others must be on the way
        raise SliceError(
            f"the pattern's output {apart[0]} is not computed on the way to its output 0; "
            "a pattern is matched from its first output back, so every other output must "
            "be one of the values it computes; match independent parts (q = x @ wq, "
            "k = x @ wk) with one pattern each"
        )
    return pattern


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
    # a while_loop's condition runs in no trip's equations, unrolled or not
    whiles = [r.eqn for r in program.regions if r.primitive == "while"]
    whiles += [eqn for eqn in program.jaxpr.eqns if eqn.primitive.name == "while"]
    for eqn in whiles:
        direct, deeper = search(eqn.params["cond_jaxpr"])
        if direct:
            places.append(f"the condition of the while_loop{_at(eqn)}")
        places += deeper
    for e, eqn in enumerate(program.jaxpr.eqns):
        name = eqn.primitive.name
        if name in BRANCH_PRIMITIVES:
            others.append((eqn, None))
        elif name in LOOP_PRIMITIVES:
            loop = folded.get(e)
            if top and loop is not None:  # its body's own: in_folded_bodies
                places += _hidden(pattern, loop.template)
                continue
            body = loop.template if loop is not None else eqn.params[_BODY[name]]
            direct, deeper = search(body)
            if direct:
                places.append(f"the body of the {_LOOP_NAMES[name]}{_at(eqn)}")
            places += deeper
        else:  # a call kept as one equation: a shard_map (its body runs once per shard)
            for inner in C.inner_jaxprs(eqn):  # or a custom-rule call kept whole
                if inner.constvars:
                    continue  # (no such body in JAX's calls: their constants are operands)
                direct, deeper = search(C.ClosedJaxpr(inner, ()))
                if direct:
                    places.append(f"the body of the {name}{_at(eqn)}")
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


def in_folded_bodies(
    graph: Graph, pattern: Program, near: list | None = None
) -> list[tuple[int, _State, str]]:
    """The occurrences inside the bodies of loops the index keeps folded: ``(loop,
    state, name)``, the name (``step/h@*``) of the value the first output is; ``near``
    gets each body's near miss where it has none (see ``_find``)."""
    from ._loop_index import unnamed_base

    folded = graph._program.folded
    if not folded:
        return []
    named: dict[tuple[int, int], str] = {}  # a name selecting the body value alone
    for base, ts in graph._loop_index.names.items():
        if len({(t.loop, t.var) for t in ts}) == 1:  # not a bare `c` of c#0 and c#1
            named.setdefault((ts[0].loop, ts[0].var), base)
    places = []
    for k, loop in enumerate(folded):
        for state in _find(pattern, loop.template, near):
            ti = _output(pattern, loop.template, state)
            places.append((k, state, named.get((k, ti), unnamed_base(k, ti)) + "@*"))
    return places


def _output(pattern: Program, target: Program, state: _State) -> int:
    """The target var a match's first output is."""
    out0 = pattern.outputs[0]
    pe = pattern.producer[out0]
    return target.eqn_out[state.eqn_map[pe]][pattern.eqn_out[pe].index(out0)]


def rewrite(
    graph: Graph, pattern_fn: Callable[..., Any], replacement_fn: Callable[..., Any], *args: Any
) -> Graph:
    """See :meth:`Graph.rewrite`: matches in the index, in folded loops' bodies (every
    iteration) and in the trips of unrolled while_loops (every trip) rewritten; what it
    leaves unchanged warned and noted."""
    from ._patch_graph import derive, warn_if_differentiated

    found = find(graph, pattern_fn, *args)
    in_bodies, in_body_targets = body_edits(graph, found, replacement_fn)
    # what an earlier patch computes (a replacement's own tanh) has no place to edit
    inside = [m for m in found.matches if any(graph._site(v.index) is None for v in m.outputs)]
    matches = tuple(m for m in found.matches if m not in inside)
    in_patches = (
        f"the pattern {found.label!r} occurs at "
        f"{short_list([v.name for m in inside for v in m.outputs], 4)}, inside what a patch "
        "of this graph computes (g.rewrite, g.replace), which g.rewrite does not change"
        if inside
        else None
    )
    if not matches and not in_bodies:
        raise SliceError(
            "; ".join(m for m in (found.patched(), in_patches) if m)
            or found.unchanged()
            or found.missed()
            or f"the pattern {found.label!r} matches nothing in this graph; check it "
            "with g.match(...) first"
        )
    outputs = [*(v for m in matches for v in m.outputs), *in_body_targets]
    warn_if_differentiated(graph, outputs, "g.rewrite")
    edits, in_trips, per_trip = every_trip(graph, rewrite_edits(graph, matches, replacement_fn))
    unchanged = "; ".join(m for m in (found.unchanged(), in_patches) if m) or None
    if per_trip:
        unchanged = (f"{unchanged}; " if unchanged else "") + (
            f"{short_list(per_trip, 4)} are in the trips of a while_loop the index "
            "unrolls for the traced arguments and read another trip's values: g.rewrite "
            "changes those trips, and arguments that run more trips run the others as "
            "they are"
        )
    if unchanged:  # also in the rewritten graph's notes
        warn(unchanged)
    notes = [unchanged] if unchanged else []
    derived = derive(graph, edits, "rewrite", notes, [*in_bodies, *in_trips])
    derived._rewritten_away.update(rewritten_away(graph, matches, found))
    return derived


def rewritten_away(graph: Graph, matches: Sequence[Match], found: Found) -> dict[Any, str]:
    """The values inside the rewritten matches that only the match reads (its output
    computed from them): once rewritten, nothing reads them (their gradient is zero, a
    patch of them changes nothing), though their names stay (values_fn still computes
    them). Keyed by name in the index, by ``(loop, template var)`` in a folded loop's
    body, with the output's name."""
    away: dict[Any, str] = {}
    program = graph._program
    for m in matches:
        dead = _read_by_the_match_only(
            program, {v.index for v in m.vars}, {v.index for v in m.outputs}
        )
        away.update((graph._vars[i].name, m.outputs[0].name) for i in sorted(dead))
    for k, state, name, (_, _, _, out, _) in found.in_bodies:
        template = program.folded[k].template
        matched = {o for e in state.eqn_map.values() for o in template.eqn_out[e]}
        for ti in _read_by_the_match_only(template, matched, {out}):
            away[k, ti] = name
    return away


def _read_by_the_match_only(program: Any, matched: set[int], result: set[int]) -> set[int]:
    """The vars of ``matched`` (a match's, in ``program``) other than its ``result``
    that nothing outside the match reads, directly or through another such var."""
    users, outputs = program.users, set(program.outputs)
    eqns = {program.producer[i] for i in matched}
    dead = matched - result - outputs
    while True:  # a value read outside the match, or by a value that is, is live
        live = {
            i
            for i in dead
            if any(
                e not in eqns or any(o not in dead and o not in result for o in program.eqn_out[e])
                for e in users[i]
            )
        }
        if not live:
            return dead
        dead -= live


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


def body_edits(
    graph: Graph, found: Found, replacement_fn: Callable[..., Any]
) -> tuple[list[tuple[str, StructuredEdit]], list[Var]]:
    """Edits rewriting the occurrences in folded loops' bodies at every iteration, at
    their places (:func:`body_place`; :func:`find` leaves out those it cannot place):
    one edit of the running loop's body each (a scan's: an iteration range covering it;
    a ``while_loop``'s: a step naming no trip, every trip it runs), named ``step/h@*``;
    and the value each edit rewrites, at one iteration (for the warnings a patch there
    gets)."""
    from ._loop_index import Template, _inner
    from ._structured import Edit as StructuredEdit

    index = graph._loop_index
    edits, targets = [], []
    seen: set[tuple] = set()
    for k, _, name, (ranged, reads, t0, out, ins) in found.in_bodies:
        loop = graph._program.folded[k]
        template, around = loop.template, loop.iterations
        target = index.var(Template(k, out, _inner(template, out), around), t0)
        replacement = replacement_jaxpr(
            replacement_fn,
            [index.var(Template(k, i, _inner(template, i), around), t0) for i in ins],
            target,
            f"the replacement of the pattern's output {name!r}",
        )
        targets.append(target)
        key = (ranged.steps, ranged.vars, tuple(reads))
        if key in seen:  # the same scan in another trip of a while_loop: one edit for all
            continue
        seen.add(key)
        edits.append((name, StructuredEdit(ranged, "apply", replacement, tuple(reads))))
    return edits, targets


def body_place(graph: Graph, k: int, pattern: Program, state: _State) -> tuple | None:
    """Where an occurrence in folded loop ``k``'s body is rewritten at every iteration:
    ``(site, reads, t0, output template var, input template vars)``, the site an
    iteration range (a scan's) or every trip (a ``while_loop``'s); None where its inputs
    are not values of the body's level (a value passed into a call it is not passed
    into)."""
    from ._patch_graph import _common_level
    from ._structured import Site, Step, unlifted

    closed = graph._structure.closed
    loop = graph._program.folded[k]
    n = int(loop.eqn.params["length"]) if loop.is_scan else None
    t0 = n - 1 if loop.is_scan and loop.eqn.params["reverse"] else 0  # the first to run
    out = _output(pattern, loop.template, state)
    ins = [state.binding[pv] for pv in range(pattern.num_inputs)]

    def at(ti: int) -> Site | None:
        """Where template var ``ti`` is in the body at iteration t0, as it is there
        (not lifted out: a carry of the last iteration, or of the last step of a
        loop unrolled in the body, is a value of the body too)."""
        found = loop.template.found(ti)
        if found is None:
            return None
        steps = (*loop.steps, Step(loop.pos, iteration=t0), *found[0])
        return unlifted(closed, steps, found[1])

    # the deepest level where the output and every input have a var: the output's
    # call, or out of the jitted calls returning it and the inputs (a pattern over
    # the results of two calls of a jitted layer in a scan's body)
    deep = [at(out), *map(at, ins)]
    common = None if None in deep else _common_level(closed, deep[0], deep[1:])
    if common is None:
        return None
    site, reads = common
    depth = len(loop.steps)
    step = site.steps[depth]
    every = Step(step.eqn, step.branch, None if n is None else range(n))
    steps = _every_trip(site)[0]
    steps = (*steps[:depth], every, *steps[depth + 1 :])
    return Site(steps, site.vars), reads, t0, out, ins


def _every_trip(site: Site, levels: frozenset[int] | None = None) -> tuple[tuple, tuple[int, ...]]:
    """``(steps, path_bound)`` of ``site`` with each step into a while_loop's trip naming
    no trip (``levels``: of those loops only, counted from the innermost (0), the others
    keeping their trip): an edit there applies in every trip the loop runs (arguments
    that run more trips than were traced get it too); still bound to the cond branches
    it is in."""
    from ._structured import Step

    trips = {j for j in site.path_bound if site.steps[j].iteration is not None}
    if levels is not None:
        looped = [j for j, step in enumerate(site.steps) if step.iteration is not None]
        trips &= {looped[-1 - k] for k in levels if k < len(looped)}
    steps = tuple(
        Step(s.eqn, s.branch, None) if j in trips else s for j, s in enumerate(site.steps)
    )
    return steps, tuple(j for j in site.path_bound if j not in trips)


class _State:
    __slots__ = ("binding", "eqn_map")

    def __init__(self, binding: dict[int, Any], eqn_map: dict[int, int]):
        self.binding, self.eqn_map = binding, eqn_map

    def copy(self) -> _State:
        return _State(dict(self.binding), dict(self.eqn_map))


#: the most other operand orders of commutative equations a match tries from one anchor
BACKTRACKS = 64


class _Matcher:
    def __init__(self, pattern: Program, target: Program):
        self.p, self.t = pattern, target
        self._budget = BACKTRACKS
        #: the deepest equation the pattern met with other parameters: ``(equations
        #: matched before it, its primitive, {param: (pattern's, target's)})``
        self.near: tuple[int, str, dict] | None = None
        #: the first occurrence that unified whole but is open: ``(its output, an inner
        #: value read outside it, the var its reader writes or -1 for a graph output)``
        self.open: tuple[int, int, int] | None = None

    def run(self, anchor_eqn: int) -> _State | None:
        p, t = self.p, self.t
        out0 = p.outputs[0]
        pos = p.eqn_out[p.producer[out0]].index(out0)
        outs = t.eqn_out[anchor_eqn]
        if pos >= len(outs):
            return None
        # every way the pattern unifies, in turn (commutative operands in either order,
        # undone where a later operand fails), until one is a match: at most
        # BACKTRACKS other orders tried (a tree of adds failing late tried them all)
        self._budget = BACKTRACKS
        for state in self._var(out0, outs[pos], _State({}, {})):
            # (an output not computed along the first one's ancestry: none)
            if all(p.producer[o] in state.eqn_map for o in p.outputs[1:]):
                escape = self._escape(state)
                if escape is None:
                    return state
                if self.open is None:
                    self.open = (outs[pos], *escape)
        return None

    def _var(self, pv: int, tv: Any, state: _State) -> Iterator[_State]:
        """The ways pattern var ``pv`` unifies with target atom ``tv`` (a var index or
        Literal) from ``state``: states extending it, which may be ``state`` itself
        (changed) where there is one way; a state to try again is copied first."""
        p, t = self.p, self.t
        pe = p.producer[pv]
        if pe < 0 and pv >= p.num_inputs:  # a pattern constant (a captured array)
            if _same_constant(p.consts[pv - p.num_inputs], t, tv):
                yield state
            return
        if pe < 0:  # a pattern input: binds any one target value
            key = tv if not isinstance(tv, C.Literal) else ("literal", id(tv))
            if pv in state.binding:
                if state.binding[pv] == key:
                    yield state
                return
            state.binding[pv] = key
            yield state
            return
        if isinstance(tv, C.Literal):
            return
        te = t.producer[tv]
        if te < 0:
            return
        if p.eqn_out[pe].index(pv) != t.eqn_out[te].index(tv):
            return
        if pe in state.eqn_map:
            if state.eqn_map[pe] == te:
                yield state
            return
        if te in state.eqn_map.values():
            return
        peqn, teqn = p.jaxpr.eqns[pe], t.jaxpr.eqns[te]
        if peqn.primitive != teqn.primitive:
            return
        if not _same_params(peqn.params, teqn.params):
            depth = len(state.eqn_map)  # (at 0, only the last primitive is shared: no clue)
            if depth and (self.near is None or depth > self.near[0]):
                diff = _param_diff(peqn.params, teqn.params)
                self.near = (depth, peqn.primitive.name, diff)
            return
        if len(peqn.invars) != len(teqn.invars):
            return
        state.eqn_map[pe] = te
        if peqn.primitive.name not in COMMUTATIVE or len(teqn.invars) != 2:
            yield from self._operands(list(peqn.invars), list(teqn.invars), state)
            return
        base = state.copy()  # (before anything downstream changes it)
        yield from self._operands(list(peqn.invars), list(teqn.invars), base.copy())
        if self._budget > 0:
            self._budget -= 1
            yield from self._operands(list(peqn.invars), list(reversed(teqn.invars)), base)

    def _operands(self, pattern_atoms: list, target_atoms: list, state: _State) -> Iterator[_State]:
        if not pattern_atoms:
            yield state
            return
        pa, ta = pattern_atoms[0], target_atoms[0]
        if isinstance(pa, C.Literal):
            if isinstance(ta, C.Literal) and _same_literal(pa, ta):
                yield from self._operands(pattern_atoms[1:], target_atoms[1:], state)
            return
        target = ta if isinstance(ta, C.Literal) else self.t.index[ta]
        for found in self._var(self.p.index[pa], target, state):
            yield from self._operands(pattern_atoms[1:], target_atoms[1:], found)

    def _escape(self, state: _State) -> tuple[int, int] | None:
        """An internal value of the match read outside it, and the first var its reader
        writes (-1: it is a graph output; -2: its reader writes none, a callback), or
        None where there is none (the match is closed)."""
        t, p = self.t, self.p
        matched = set(state.eqn_map.values())
        outputs = {
            t.eqn_out[state.eqn_map[p.producer[o]]][p.eqn_out[p.producer[o]].index(o)]
            for o in p.outputs
        }
        graph_outputs = set(t.outputs)

        def dead(u: int) -> bool:  # what nothing reads (logsumexp's `_ = sign s`)
            return not t.jaxpr.eqns[u].effects and not any(
                t.users[o] or o in graph_outputs for o in t.eqn_out[u]
            )

        for te in sorted(matched):
            for v in t.eqn_out[te]:
                if v in outputs:
                    continue
                if v in graph_outputs:
                    return v, -1
                reader = next((u for u in t.users[v] if u not in matched and not dead(u)), None)
                if reader is not None:
                    outs = t.eqn_out[reader]
                    return v, outs[0] if outs else -2
        return None


#: parameters that the shapes of a pattern's example arguments decide
_SHAPE_PARAMS = frozenset(
    {
        "shape",
        "axes",
        "axis",
        "dimensions",
        "broadcast_dimensions",
        "new_sizes",
        "permutation",
        "dimension_numbers",
        "start_indices",
        "limit_indices",
        "slice_sizes",
        "sizes",
    }
)


def _short_param(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _param_diff(a: dict, b: dict) -> dict[str, tuple[Any, Any]]:
    """The parameters two equations hold differently: ``{name: (a's, b's)}``."""
    diff = {}
    for k in sorted((set(a) | set(b)) - INCIDENTAL_PARAMS):
        if not _same_params({k: a.get(k)}, {k: b.get(k)}):
            diff[k] = (a.get(k), b.get(k))
    return diff


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


def _equal(pattern: Any, target: Any) -> bool:
    """Whether a pattern's constant is the program's: shape, kind of dtype and value.

    As a pattern's inputs match values of any dtype (a pattern traced in float32 matches
    a bfloat16 program), its constants match one of another width: ``n * 2 + 1`` traced
    with a strongly typed int32 ``n`` (its 2 an int32) matches it for a Python int (a
    weakly typed one, whose 2 JAX holds as an int64); integers by their values (256 is
    not a uint8's 0, -1 not its 255); a pattern's float rounded to the program's dtype
    (float32's 0.1 is bfloat16's 0.1; bfloat16's 0.1 is not float32's), never the
    program's rounded to the pattern's. A float never matches an int."""
    a, b = np.asarray(pattern), np.asarray(target)
    kind = dtype_kind(a.dtype)  # 0 bool, 1 integer, 2 floating, 3 complex
    if a.shape != b.shape or kind != dtype_kind(b.dtype):
        return False
    nan = kind in (2, 3)  # (a NaN constant is the same NaN)
    if a.dtype == b.dtype:
        return bool(np.array_equal(a, b, equal_nan=nan))
    if kind != 2 and kind != 3:  # exact values, past any width (integers; None: no cast)
        return kind == 1 and bool(np.array_equal(a.astype(object), b.astype(object)))
        return bool(np.array_equal(a.astype(object), b.astype(object)))
    with np.errstate(over="ignore"):
        cast = a.astype(b.dtype)
    if np.any(np.isinf(cast) & ~np.isinf(a)):  # past the program's range: not its inf
        return False
    return bool(np.array_equal(cast, b, equal_nan=True))


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
