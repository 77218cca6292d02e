"""Graphs derived by surgery: ``g.replace`` (activation patching) and its naming.

A derived graph carries the names of its parent: each old var keeps its names, a
patched var's names move to its new value, and the old value answers to
``<name>.unpatched``.

The edits always go to the structured program (:mod:`jaxsurgery._structured`), which
is what ``as_function``, ``grads_fn`` and values run for any arguments: a patch inside
a cond branch edits that branch and the cond decides again; a patch at ``h@t``
applies at iteration ``t`` of a loop that stays a loop. The index follows one of two
ways:

* a graph without folded loops has its flat index spliced (:mod:`jaxsurgery._patch`):
  the patched value is a var of its own, after the old one, so slices are cut from
  the spliced program as from any other;
* a graph whose index keeps loops folded (:mod:`jaxsurgery._loop_index`) keeps its
  parent's index as it is, unrolling nothing (a patch at ``step/h@9000`` costs what a
  patch at ``h`` does): the patched sites are recorded, values come from the edited
  running program, and every slice is cut from it (:mod:`jaxsurgery._loop_slice`).
  A patched var keeps its var; ``<name>.unpatched`` is an :class:`Unpatched` var, made
  when first named, whose edits run before the patch.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from . import _select
from ._errors import SelectionError, SliceError, short_list, short_repr, type_of, warn
from ._graph import Var
from ._names import finalize
from ._patch import Edit, replacement_jaxpr, splice
from ._promotion import a_or_an, holds, is_key, not_a_key, refuse_wrapping
from ._scopes import scope_names
from ._structured import Edit as StructuredEdit
from ._structured import Site, Step, at_some_iterations, patch_of, rules_entered, sub_jaxpr

if TYPE_CHECKING:
    from ._graph import Graph

UNPATCHED = _select.UNPATCHED


def differentiated(graph: Graph, var: Var) -> bool:
    """Whether JAX differentiates ``var`` inside the traced function: the equation that
    makes it (or, in a folded loop, the loop's) is marked by a derivative transform
    (``jax.grad``, ``jax.jvp``, ``jacfwd``...)."""
    program = graph._program
    if graph._virtual(var.index):
        site = graph._site(var.index)
        if site is None or not site.steps:
            return False
        eqn = graph._structure.closed.jaxpr.eqns[site.steps[0].eqn]  # the loop's, say
    else:
        e = program.producer[var.index]
        if e < 0:
            return False
        eqn = program.jaxpr.eqns[e]
    return C.under_derivative(eqn)


def read_by_derivative(graph: Graph, wrt: Sequence[Var], outs: Sequence[Var]) -> list[str]:
    """A note when a value JAX differentiates inside the traced function is perturbed
    (a ``grads`` target, a slice input) for outputs a backward pass computes (gradients,
    parameters updated with them): the derivative's own equations read that value too,
    so its perturbation is not the zero perturbation added in the function's code."""
    found = [v for v in wrt if differentiated(graph, v)]
    if not found:
        return []
    program = graph._program
    roots = [v.index for v in outs if not graph._virtual(v.index)]
    eqns = program.jaxpr.eqns
    between = program.ancestor_eqns(roots)
    if not any(graph._virtual(v.index) for v in found):  # (a loop's value: the loop whole)
        between = _downstream(program, [v.index for v in found], between)
    if not any(C.in_backward_pass(eqns[e].source_info) for e in between):
        # forward values (the loss), or outputs the value reaches through forward
        # equations only (value_and_grad's value): a perturbation there is the trick's
        return []
    return [
        f"{found[0].name!r} is a value JAX differentiates inside the traced function, and "
        "these outputs come from its backward pass, whose equations read the value as "
        "they were traced: a derivative rule that reads its primitive's result (tanh, "
        "exp, sigmoid) reads the perturbed value, and a checkpoint's recomputation does "
        "not see it. So these are derivatives of the traced program, not of the "
        "function with a perturbation added where the value is written; for those, trace "
        "the function before its derivative (the loss) and differentiate what you build "
        "from it"
    ]


def _downstream(program: Any, starts: Sequence[int], within: set[int]) -> set[int]:
    """The equations of ``within`` that read the vars ``starts``, or what they make."""
    found: set[int] = set()
    stack, users, eqn_out = list(starts), program.users, program.eqn_out
    while stack:
        for e in users[stack.pop()]:
            if e in within and e not in found:
                found.add(e)
                stack.extend(eqn_out[e])
    return found


def warn_if_differentiated(graph: Graph, targets: Sequence[Var], what: str) -> None:
    """Warn that a patch of a value JAX differentiates inside the traced function is
    not differentiated: the derivatives traced with it read the new value as they read
    the old, so the patched function's gradients are not those of the function with
    the patch (a patch made where the function is written would be)."""
    found = [v.name for v in targets if differentiated(graph, v)]
    if found:
        warn(
            f"{what}: {found[0]!r} is a value JAX differentiates inside the traced function "
            "(under jax.grad, value_and_grad, jvp, ...). The derivatives it traced read the "
            "patched value as they read the old one but do not differentiate the patch, so "
            "the gradients this patched function computes are not those of the function "
            "with the patch. To differentiate through a patch, trace the function before "
            "its derivative (the loss), patch that, and differentiate it: "
            "jax.grad(g.replace(...).as_function())"
        )


def rewritten_away_note(graph: Graph, targets: Sequence[Var], effect: str) -> str | None:
    """What to say of ``targets`` that lie inside a match an earlier ``g.rewrite``
    replaced: the replacement computes the match's output from its inputs, so nothing
    reads them (``effect``: what that means for the caller: a zero gradient, a patch
    that changes nothing), or None."""
    from ._loop_index import VirtualVar

    away = graph._rewritten_away
    if not away:
        return None
    found = [
        (v.name, away[key])
        for v in targets
        if (key := (v.template.loop, v.template.var) if isinstance(v, VirtualVar) else v.name)
        in away
    ]
    if not found:
        return None
    name, output = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return (
        f"{name!r}{more} is inside a match g.rewrite replaced: {output!r} is the "
        f"replacement's value now, computed from the match's inputs, and nothing reads "
        f"{name!r}, so {effect}; use the match's output or its inputs"
    )


def warn_if_patched_away(graph: Graph, targets: Sequence[Var], what: str) -> None:
    """Warn, as :func:`warn_if_differentiated` does, that a patch of values inside a
    match an earlier ``g.rewrite`` replaced changes nothing (see
    :func:`rewritten_away_note`)."""
    away = rewritten_away_note(graph, targets, "a patch of it changes no output")
    if away:
        warn(f"{what}: {away}")


def replace(graph: Graph, selector: Any, value_or_fn: Any) -> Graph:
    """See :meth:`Graph.replace`."""
    _, targets = _select.tree(graph, selector)
    targets = _once_each(targets)  # (a value two names select is patched once)
    warn_if_differentiated(graph, targets, "g.replace")
    warn_if_patched_away(graph, targets, "g.replace")
    # one replacement per type of var: the vars of a loop value at every iteration
    # (``step/h@*``) then share it, and the running loop applies it as one masked edit
    # (one traced copy per iteration made a body of T copies: minutes of compiling)
    by_type: dict[Any, C.ClosedJaxpr] = {}
    edits = []
    for v in targets:
        kind = (v.aval.shape, v.aval.dtype, getattr(v.aval, "weak_type", False))
        if kind not in by_type:
            by_type[kind] = _patch_jaxpr(v, value_or_fn)
        edits.append(Edit(v.index, by_type[kind], (v.index,)))
    from ._match import every_trip

    flat, in_trips, _ = every_trip(graph, edits, _every_trip(graph, selector))
    patched = [e for e in graph._structure.edits if e.kind == "apply"]
    if any(patch_of(x, e) for _, e in in_trips for x in patched):
        # a trip patched before: an edit of every trip runs before the trip's own
        # patches, so the traced trips keep their edits in order, and only they change
        warn(
            f"{short_list([n.rsplit('@', 1)[0] + '@*' for n, _ in in_trips], 4)} are "
            "patched at some trips already: this patch applies at the traced trips only "
            "(arguments that run more trips run the others unpatched); patch every trip "
            "first to patch them all"
        )
        flat, in_trips = edits, []
    return derive(graph, flat, f"replace({_names_of(targets)})", patches=in_trips)


def _names_of(targets: Sequence[Var], limit: int = 3) -> str:
    """The first names of ``targets`` (a graph's title: naming the 10 000 iterations of
    ``step/h@*`` took a third of the patch's time)."""
    head = ", ".join(v.name for v in targets[:limit])
    return head + (f", ... (+{len(targets) - limit} more)" if len(targets) > limit else "")


def _every_trip(graph: Graph, selector: Any) -> dict[int, frozenset[int]]:
    """The vars a glob selects in a ``while_loop``'s trips by a wildcard for their
    trip (``body/h@*``; given as it is, or as all that ``g.select`` of it holds), when
    their last iteration is the trip: the value at every trip the loop runs, for any
    arguments, not only the trips traced (a patch of ``body/h@*`` patches the trips a
    larger trip count adds too). A scan's ``@*`` inside a while trip is the scan's
    iterations, as it is. Each with the loops, counted from the innermost (0), whose
    iterations the glob leaves free (``outer/body/h@*@*`` and ``outer/body/h@*``: every
    trip of both loops; ``outer/body/h@1@*``: of the inner one in outer trip 1;
    ``outer/body/h@*@1``: inner trip 1 in every outer trip). Names whose trips overlap
    with other freed loops (``h@*@1`` and ``h@1@*`` both hold trip (1, 1)) are patched
    at the traced trips, once each, and warned."""
    from ._loop_index import VirtualVar

    every: dict[int, frozenset[int]] = {}
    carried: list[str] = []  # names of carries entering trips: patched per traced trip
    partial: list[str] = []  # names of other values patched per traced trip
    for leaf in jax.tree_util.tree_leaves(
        selector, is_leaf=lambda x: isinstance(x, _select.Selection)
    ):
        if isinstance(leaf, _select.Selection):  # g.select("body/h@*"): the same, whole
            held = {v.index for v in leaf}
            named = [(name, graph.select(name)) for name in leaf._every]
            chosen = [(name, sel) for name, sel in named if all(v.index in held for v in sel)]
        elif isinstance(leaf, str) and _select.compile_glob(leaf) is not None:
            chosen = [(leaf, graph.select(leaf))]
        else:
            continue
        for given, sel in chosen:
            for v, name in zip(sel, sel.matched):
                if isinstance(v, VirtualVar) and v._loop.is_scan and not v.template.outer:
                    continue  # (a scan's iterations, in no while's trip: as they are)
                levels, loose = _select.iterations_matched(given, name)
                if _in_loose_trips(graph, v, loose):  # (h2@?@*: trips 0 to 9)
                    partial.append(given)
                if not levels:
                    continue
                n = name.count("@")
                if isinstance(v, VirtualVar):
                    # (the value made in the trip named: not the carry entering it,
                    # ``body/h@t``, which is what trip t - 1 made: patched in every
                    # trip, the last one's, the loop's result, was patched too)
                    last = name.rsplit("@", 1)[-1]
                    if v._loop.is_scan or v.template.inner:
                        # (every trip of a while named by a *: its trips around a folded
                        # scan, or the folded while's own around a loop unrolled in it)
                        outer = len(v.template.outer)
                        trips = range(outer) if v._loop.is_scan else [outer]
                        if any(n - 1 - k in levels for k in trips):
                            partial.append(given)
                    elif last == str(v.iteration):
                        every[v.index] = levels
                    elif last == str(v.iteration + 1):
                        carried.append(given)
                    continue
                site = graph._site(v.index)
                if _a_trip_named(site, name):
                    every[v.index] = levels
                elif _a_trip_named(site, name, entering=True):
                    carried.append(given)
                elif site is not None:  # (a scan's value in a while's trip named by *)
                    looped = [j for j, step in enumerate(site.steps) if step.iteration is not None]
                    if any(
                        n - 1 - k in levels for k, j in enumerate(looped) if j in site.path_bound
                    ):
                        partial.append(given)
    overlapping = _overlapping(graph, every)
    if carried:
        warn(
            f"g.replace: {carried[0]!r} names the carry entering each trip of a "
            "while_loop (its @t is what trip t - 1 made): it is patched at the traced "
            "trips only, and arguments that run another trip count get those patches "
            "at other values (with fewer trips, the loop's result); patch the value the "
            "body makes (its name at the trip it is made) to patch every trip"
        )
    elif partial:
        warn(
            f"g.replace: {partial[0]!r} selects values in every trip of a while_loop (or "
            "in a range of its trips, h@?) that are patched at the traced trips only (a "
            "scan's iterations in a trip, a loop unrolled in a folded trip, a range of "
            "trips): they hold for the traced trip count, and arguments that run another "
            "leave trips unpatched or patch other values"
        )
    elif overlapping:
        warn(
            f"g.replace: {short_list([graph._var(i).name for i in overlapping], 3)} are "
            "selected by names whose trips overlap (each frees other loops: h@*@1 and "
            "h@1@*): they are patched at the traced trips only, once each; select every "
            "trip of one value by one name to patch the trips other arguments run"
        )
    return {i: levels for i, levels in every.items() if i not in overlapping}


def _in_loose_trips(graph: Graph, var: Var, loose: frozenset[int]) -> bool:
    """Whether a glob selects ``var`` among some of the trips of a ``while_loop``
    (``h@?@1``: trips 0 to 9; ``loose``, see :func:`_select.loose_iterations`), patched
    at the traced trips only."""
    site = graph._site(var.index) if loose else None
    if site is None:
        return False
    looped = [j for j, step in enumerate(site.steps) if step.iteration is not None]
    return any(len(looped) - 1 - k in loose for k, j in enumerate(looped) if j in site.path_bound)


def _once_each(targets: Sequence[Var]) -> list[Var]:
    """``targets`` without repeats (a loop's value by its template and iteration: a
    virtual var is made anew at each selection)."""
    from ._loop_index import VirtualVar

    return list(
        {
            (v.template, v.iteration) if isinstance(v, VirtualVar) else v.index: v for v in targets
        }.values()
    )


def _overlapping(graph: Graph, every: dict[int, frozenset[int]]) -> set[int]:
    """The vars of ``every`` whose edits of every trip would patch a trip twice: a
    value of one body whose trips, the freed loops any trip, overlap another's."""
    patterns: dict[tuple, dict[tuple, list[int]]] = {}  # body value -> trips -> vars
    for i, levels in every.items():
        site = graph._site(i)
        if site is None:
            continue
        looped = [j for j, step in enumerate(site.steps) if step.iteration is not None]
        trips = tuple(
            None
            if len(looped) - 1 - k in levels and j in site.path_bound
            else site.steps[j].iteration
            for k, j in enumerate(looped)
        )
        body = (tuple((s.eqn, s.branch) for s in site.steps), site.vars)
        patterns.setdefault(body, {}).setdefault(trips, []).append(i)
    found: set[int] = set()
    for by_trips in patterns.values():
        # trips of one set of freed loops never overlap (they differ where fixed): pairs
        # of sets meet where they agree on the loops both fix (per iteration of a scan
        # around a while, thousands of trips of one set: not compared pairwise)
        by_free: dict[tuple, list[tuple]] = {}
        for trips in by_trips:
            by_free.setdefault(tuple(t is None for t in trips), []).append(trips)
        frees = list(by_free)
        for a, free_a in enumerate(frees):
            for free_b in frees[a + 1 :]:
                both = [k for k, (x, y) in enumerate(zip(free_a, free_b)) if not x and not y]
                seen: dict[tuple, list[tuple]] = {}
                for trips in by_free[free_a]:
                    seen.setdefault(tuple(trips[k] for k in both), []).append(trips)
                for trips in by_free[free_b]:
                    for met in seen.get(tuple(trips[k] for k in both), ()):
                        found.update(by_trips[met] + by_trips[trips])
    return found


def _a_trip_named(site: Site | None, name: str, entering: bool = False) -> bool:
    """Whether ``name`` (matched by a name ending in ``@*``) names the value at ``site``
    by its ``while_loop`` trip: the innermost loop there is a trip (a step into one
    is path-bound; a scan's iteration is not), the one its last ``@t`` counts (not a
    scan's last carry, ``v@4``, made in trip 1); ``entering``: by the trip after it,
    as the carry entering that trip."""
    if site is None:
        return False
    looped = [j for j, step in enumerate(site.steps) if step.iteration is not None]
    if not looped or looped[-1] not in site.path_bound:
        return False
    iterations = name.split("@")[1:]
    if len(iterations) != len(looped):  # (a scan's result in a trip: h2@j@K-1, whose
        return False  # last @ is the scan's iteration, not the trip)
    last = iterations[-1]
    return last.isdigit() and int(last) == site.steps[looped[-1]].iteration + entering


def _bypassed_rules(graph: Graph, patched: Sequence[tuple[str | int, StructuredEdit]]) -> list[str]:
    """Notes (also warned) for patches inside ``custom_jvp``/``custom_vjp`` calls: the
    patched function runs such a call's primal body, whose derivatives replace the
    rule's (an identity patch inside ``safe_norm`` makes its gradient at 0 NaN).
    ``patched``: ``(name, edit)`` of each patch (a var's index for its name, named
    only where it says so)."""
    notes = []
    for name, structured in patched:
        for call, _ in rules_entered(graph._structure.closed, structured.site.steps):
            name = graph._var(name).name if isinstance(name, int) else name
            notes.append(
                f"the patch of {name!r} is inside the call "
                f"{call!r}, which has a custom derivative rule (custom_jvp/custom_vjp): the "
                "patched function runs the call's body, so its derivatives there are the "
                "body's, not the rule's (a while_loop there, as in diffrax's solver loop, "
                "then has no reverse mode: jax.grad of it fails); patch the call's result "
                "to keep the rule"
            )
    notes = list(dict.fromkeys(notes))
    for note in notes:
        warn(note)
    return notes


def _reaches_a_decision(program: Any, targets: Sequence[int]) -> bool:
    """Whether values computed from ``targets`` decide a ``cond`` or ``while`` the flat
    ``program`` inlined (its predicate, index or trip count)."""
    deciders = {
        program.index[a]
        for region in program.regions
        if region.primitive in ("cond", "while")
        for a in region.deciders
    }
    if not deciders:
        return False
    seen, stack, users = set(targets), list(targets), program.users
    while stack:
        i = stack.pop()
        if i in deciders:
            return True
        for e in users[i]:
            for o in program.eqn_out[e]:
                if o not in seen:
                    seen.add(o)
                    stack.append(o)
    return False


def derive(
    graph: Graph,
    edits: Sequence[Edit],
    what: str,
    notes: Sequence[str] = (),
    in_bodies: Sequence[tuple[str, StructuredEdit]] = (),
    patches: Sequence[tuple[str, StructuredEdit]] = (),
) -> Graph:
    """The graph with ``edits`` applied, names carried over (module docstring);
    ``notes`` the new graph adds to its own; ``in_bodies``: ``(name, edit)`` of edits of the
    running program at every iteration of a folded loop's body value (``step/h@*``),
    which go under the patches there (a rewrite); ``patches``: such edits that go on
    top, as patches (``g.replace`` at every trip of a ``while_loop``)."""
    from ._graph import Graph

    moved = [_structured_edit(graph, e) for e in edits]
    structured = graph._structure.with_edits(
        *moved, *(e for _, e in patches), under=[e for _, e in in_bodies]
    )
    named = [(e.target, m) for e, m in zip(edits, moved)]
    in_bodies = [*in_bodies, *patches]
    bypassed = [*_bypassed_rules(graph, [*named, *in_bodies]), *notes]
    # the index stays as it is and the running program is edited where the index keeps
    # loops folded, or where a patch is inside a cond branch or a while trip (a spliced
    # index would lose the region, and with it the decision for other arguments)
    # (also where a patch reaches what decides an inlined cond or an unrolled while:
    # the index holds the traced branch and trips only, which the patch may change)
    if (
        graph._program.folded
        or in_bodies
        or graph._edited_apart
        or any(m.site.path_bound for m in moved)
        or _reaches_a_decision(graph._program, [e.target for e in edits])
    ):
        derived = Graph(
            graph._program,
            graph._names,
            graph._flatten_args,
            graph._flat_args,
            f"{graph._title}.{what}",
            (*graph._given_notes, *bypassed),
            graph._out_tree,
            structured,
            graph._flat_site,
            graph._unpatched,
            graph._loop_index.names,
            {
                # (a var, named when asked: naming 10 000 iterations took a third of
                # g.replace("step/h@*"))
                **{graph._site_of(v): v for v in map(graph._var, (e.target for e in edits))},
                **graph._patched_sites,  # (a site patched before keeps its first name)
            },
            edited_apart=True,
        )
        derived._rewritten_away = dict(graph._rewritten_away)
        return derived
    program, var_map, patched = splice(graph._program, edits, (), graph._flat_args)
    origin = {j: i for i, j in enumerate(var_map)}
    origin.update({j: i for i, j in patched.items()})
    # the old values: of the targets, before this patch; earlier ones as they were
    unpatched = {var_map[i]: before for i, before in graph._unpatched.items()}
    unpatched.update(
        (var_map[i], graph._patches_at(graph._site(i)))
        for i in patched
        if var_map[i] != patched[i]  # (patched to itself: the value after the patch too)
    )
    sites = {graph._site(i) for i in patched}
    old = graph._names
    candidates: list[list[str]] = [[] for _ in program.vars]
    # the fallback numbers (%k) of g's values stay theirs, the patched value's too (p's
    # "%7" is g's "%7", patched); new values (a patch's constants and ops, the value
    # before the patch) take numbers after every number g has
    numbers: list[int | None] = [None] * len(program.vars)
    extras: list[list[str]] = [[] for _ in program.vars]
    for i, j in enumerate(var_map):
        if i not in patched:
            numbers[j] = old.number(i)
    for i, j in enumerate(var_map):
        names = list(old.candidates[i])
        if i in graph._unpatched and _latest(graph._site(i)) in sites:  # one patch older
            names = [f"{n}{UNPATCHED}" for n in names]
        if i in patched:
            now = patched[i]
            candidates[now].extend(names)
            if numbers[now] is None:
                numbers[now] = old.number(i)
            else:  # a replacement returning a value of g (an identity rewrite): it keeps
                extras[now].append(f"%{old.number(i)}")  # its number, and answers to this
            if now == j and not names:  # an unnamed value patched to itself: still %k
                extras[j].append(f"%{old.number(i)}{UNPATCHED}")
                continue
            names = [f"{n}{UNPATCHED}" for n in names] or [f"%{old.number(i)}{UNPATCHED}"]
        candidates[j].extend(names)
    fresh = itertools.count(max((old.number(i) for i in range(len(var_map))), default=-1) + 1)
    numbered = [next(fresh) if k is None else k for k in numbers]

    def steps(j: int) -> tuple | None:  # where g's values are (the patch's: nowhere)
        site = _deep(graph, origin[j]) if j in origin else None
        return None if site is None else site.steps

    for var, name in scope_names(program, numbers=numbered, steps=steps)[1]:
        if var in origin:  # not the patch's own values: a scope's glob selects g's values
            extras[var].append(name)
    names = finalize(candidates, extras, program.primitives, old.protected, numbered)
    names.arguments = old.arguments  # the same inputs, first
    names.hidden = old.hidden
    derived = Graph(
        program,
        names,
        graph._flatten_args,
        graph._flat_args,
        f"{graph._title}.{what}",
        (*graph.notes, *program.notes[len(graph._program.notes) :], *bypassed),
        graph._out_tree,
        structured,
        lambda j: _latest(graph._site(origin[j])) if j in origin else None,
        unpatched,
        unlifted_site=lambda j: _latest(_deep(graph, origin[j])) if j in origin else None,
    )
    derived._rewritten_away = dict(graph._rewritten_away)
    return derived


def _structured_edit(graph: Graph, edit: Edit) -> StructuredEdit:
    """A flat edit as an edit of the structured program (reads at the target's level)."""
    target = graph._var(edit.target)
    site = graph._site_of(target)
    if site.before is not None:
        raise SliceError(
            f"{target.name!r} is the value before a patch; patches apply to the value the "
            "program reads: patch that one, or make this patch on the graph before "
            "the other"
        )
    closed = graph._structure.closed
    reads = [graph._site_of(graph._var(r)) for r in edit.reads]
    found = [_read_at(closed, [read], site.steps) for read in reads]
    if any(r is None for r in found):
        # a rewrite's pattern inside a call that returns its output (tanh ending a jitted
        # layer): the edit goes inside the call, where the pattern's inputs are
        deep = [_deep(graph, r) for r in (edit.target, *edit.reads)]
        common = None if None in deep else _common_level(closed, deep[0], deep[1:])
        if common is not None:
            site, found = common
    for r, var in zip(edit.reads, found):
        if var is None:
            raise SliceError(
                f"the replacement for {target.name!r} reads {graph._var(r).name!r}, which "
                "lives in another call, loop iteration or branch; patch values of one "
                "level together"
            )
    return StructuredEdit(site, "apply", edit.closed, tuple(found))


def _deep(graph: Graph, i: int) -> Site | None:
    """Var ``i``'s site where its equation is, not lifted out of the calls returning it."""
    return graph._unlifted_site(i) if i < len(graph._program.vars) else None


def _common_level(
    closed: Any, target: Site, reads: Sequence[Site]
) -> tuple[Site, list[Any]] | None:
    """The outermost place of ``target`` (out of the calls that return it and do not
    read it, else as deep as its equation) where every read has a var, and those vars:
    a pattern that is a whole call (``nn.relu``, a ``custom_jvp``) replaces its result
    and keeps the call's rule, one ending a jitted layer edits inside the layer."""
    for site in reversed(_lifted(closed, target, reading=False)):
        found = [_read_at(closed, _lifted(closed, r, reading=True), site.steps) for r in reads]
        if all(f is not None for f in found):
            return site, found
    return None


def _lifted(closed: Any, site: Site, reading: bool) -> list[Site]:
    """``site``, then the same value out of each call returning it (``jit``,
    ``checkpoint``...), outermost last; ``reading=False``: only out of calls that do not
    read it themselves (a patch there leaves their readers inside as they were)."""
    levels = [closed.jaxpr]
    for step in site.steps:
        levels.append(sub_jaxpr(levels[-1].eqns[step.eqn], step).jaxpr)
    out, steps, held = [site], site.steps, site.vars
    while steps:
        eqn, inner = levels[-2].eqns[steps[-1].eqn], levels[-1]
        # every result the call returns the value as (a cell returning (h, h)), as
        # _structured.locate keeps them: an edit there edits each
        outer = tuple(
            eqn.outvars[k]
            for k, o in enumerate(inner.outvars)
            if o in held and not isinstance(eqn.outvars[k], C.DropVar)
        )
        if (
            eqn.primitive.name not in C.CALL_PRIMITIVES
            or not outer
            or (not reading and any(a in held for e in inner.eqns for a in e.invars))
        ):
            break
        steps, held = steps[:-1], outer
        levels.pop()
        out.append(Site(steps, held, tuple(d for d in site.path_bound if d < len(steps))))
    return out


def _read_at(closed: Any, sites: Sequence[Site], steps: tuple) -> Any:
    """The var at ``steps`` holding the value of the first of ``sites`` (one value at
    several levels) that is there or is passed into the calls leading there, or None."""
    for site in sites:
        if site.steps == steps:
            return site.vars[0]
        inner = _passed_in(closed, site, steps)
        if inner is None:
            inner = _carried_in(closed, site, steps)
        if inner is not None:
            return inner
    return None


def _carried_in(closed: Any, read: Site, steps: tuple) -> Any:
    """The var at ``steps``, inside trip t of a while_loop, holding ``read``'s value when
    that is a carry entering trip t: what trip t - 1 returns, or for trip 0 the loop's
    operand (not also one of its constants). It is the body's carry input, the same var
    in every trip (a rewrite of ``sin(h)``, h the carry, edits every trip). None else."""
    jaxpr = closed.jaxpr
    for d, step in enumerate(steps):
        eqn = jaxpr.eqns[step.eqn]
        if read.steps[:d] != steps[:d]:
            return None
        if eqn.primitive.name == "while" and step.iteration is not None:
            n_cond, n_body = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            body = sub_jaxpr(eqn, step).jaxpr
            var, t = read.vars[0], step.iteration
            if len(read.steps) == d + 1 and t > 0 and read.steps[d] == Step(step.eqn, None, t - 1):
                at = [k for k, o in enumerate(body.outvars) if o is var]
            elif len(read.steps) == d and t == 0:
                where = [k for k, a in enumerate(eqn.invars) if a is var]
                at = [k - n_cond - n_body for k in where if k >= n_cond + n_body]
                at = at if len(at) == len(where) else []  # also a constant: not only a carry
            else:
                at = []
            if at:
                inner = Site((*steps[: d + 1],), (body.invars[n_body + at[0]],))
                return inner.vars[0] if len(steps) == d + 1 else _passed_in(closed, inner, steps)
        jaxpr = sub_jaxpr(eqn, step).jaxpr
    return None


def _passed_in(closed: Any, read: Site, steps: tuple) -> Any:
    """The var of the jaxpr at ``steps`` that is ``read``'s value passed into the calls
    (``jit``, ``checkpoint``...) that lead there from ``read``'s level, or None."""
    if (
        read.before is not None
        or len(read.steps) >= len(steps)
        or read.steps != steps[: len(read.steps)]
    ):
        return None
    jaxpr = closed.jaxpr
    for step in read.steps:
        jaxpr = sub_jaxpr(jaxpr.eqns[step.eqn], step).jaxpr
    var = read.vars[0]
    for step in steps[len(read.steps) :]:
        eqn = jaxpr.eqns[step.eqn]
        at = _body_input(eqn, [k for k, a in enumerate(eqn.invars) if a is var])
        if at is None:
            return None
        jaxpr = sub_jaxpr(eqn, step).jaxpr
        var = jaxpr.invars[at]
    return var


def _body_input(eqn: Any, positions: Sequence[int]) -> int | None:
    """The input of the body that operands at ``positions`` (one value) are in every
    iteration or call: a call's operand, a cond's operand in the branch it enters (where
    the branch runs), or a loop's constant (weights a while_loop's or a scan's body closes
    over); None for a carry (another value each trip: also where the constant is the
    carry's start, the same var in the first trip) or only a cond's branch index."""
    name = eqn.primitive.name
    if not positions:
        return None
    if name in C.CALL_PRIMITIVES:
        return positions[0]
    if name == "cond":  # operands after the index, the branches' inputs
        operands = [k - 1 for k in positions if k >= 1]
        return operands[0] if operands else None
    if name == "while":
        n_cond, n_body = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        if any(k >= n_cond + n_body for k in positions):
            return None
        consts = [k - n_cond for k in positions if k >= n_cond]
        return consts[0] if consts else None
    if name == "scan":
        n_consts = C.scan_layout(eqn)[0]
        return positions[0] if all(k < n_consts for k in positions) else None
    return None


def _patch_jaxpr(var: Var, value_or_fn: Any) -> C.ClosedJaxpr:
    """The jaxpr computing a var's new value from its old one, checked for its type."""
    if callable(value_or_fn):
        fn = value_or_fn
    else:
        value = value_or_fn
        if isinstance(value, (list, tuple)) or (
            hasattr(value, "__array__") and not hasattr(value, "dtype")
        ):  # [1.0, 2.0], an object NumPy reads: the array NumPy makes of it
            value = _numbers(var, value)
        given = getattr(value, "dtype", None)
        if given is None and not isinstance(value, (numbers.Number, np.generic)):
            raise SliceError(
                f"the replacement for {var.name!r} ({type_of(var)}) is "
                f"{a_or_an(type(value).__name__)}, neither a value nor a function; give an "
                "array, a number, or a function of the old value (lambda h: ...)"
            )
        if is_key(var.dtype) or is_key(given):  # a PRNG key on either side: no NumPy value
            if given != var.dtype:
                fix = (
                    f"give a key of its kind ({var.dtype}: jax.random.key(...), or "
                    "wrap_key_data of its data)"
                    if is_key(var.dtype)
                    else not_a_key(var.dtype)
                )
                raise SliceError(
                    f"the replacement for {var.name!r} ({type_of(var)}) is "
                    f"{type(value).__name__ if given is None else given}; {fix}"
                )
            _check_shape(var, value)
            fn = lambda old: jnp.broadcast_to(value, old.shape)  # noqa: E731
            return replacement_jaxpr(fn, [var], var, f"the replacement for {var.name!r}")
        _check_shape(var, value)
        refuse_wrapping(f"the replacement for {var.name!r} ({type_of(var)})", var.dtype, value)
        if not holds(var.dtype, value):  # 2.7 for an int var would run as 2
            kind = getattr(value, "dtype", type(value).__name__)
            raise SliceError(
                f"the replacement for {var.name!r} ({type_of(var)}) is {a_or_an(str(kind))} value, which "
                f"{var.dtype} does not hold: it would be truncated; give a value of its kind "
                "(cast it yourself if a cast is what you mean)"
            )
        fn = lambda old: jnp.broadcast_to(jnp.asarray(value, old.dtype), old.shape)  # noqa: E731
    return replacement_jaxpr(fn, [var], var, f"the replacement for {var.name!r}")


def _numbers(var: Var, value: Any) -> np.ndarray:
    """A list (or an object NumPy reads) given to replace ``var``, as an array of numbers
    (a SliceError for anything else: strings, None, ragged lists)."""
    try:
        array = np.asarray(value)
    except Exception as e:  # (a ragged list)
        raise SliceError(
            f"the replacement for {var.name!r} ({type_of(var)}) is {short_repr(value)}, which "
            f"is no array ({type(e).__name__}: {e}); give an array of its shape"
        ) from None
    if array.dtype.kind not in "biufc":
        raise SliceError(
            f"the replacement for {var.name!r} ({type_of(var)}) is {short_repr(value)}, which "
            "holds no numbers; give an array of numbers, or a function of the old value"
        )
    if array.dtype == np.float64 and jnp.issubdtype(var.dtype, jnp.floating):
        # (checked first: the cast makes a float past the var's range inf)
        refuse_wrapping(f"the replacement for {var.name!r} ({type_of(var)})", var.dtype, array)
        array = array.astype(var.dtype)  # (Python floats: as a float does, not a float64)
    return array


def _check_shape(var: Var, value: Any) -> None:
    """A constant replacing a var is a scalar (one value for every element) or of its shape."""
    shape = tuple(np.shape(value))
    if shape not in ((), tuple(var.shape)):  # broadcasting (3,) to (2, 3) hides mistakes
        raise SliceError(
            f"the replacement for {var.name!r} ({type_of(var)}) has shape {shape}; give "
            f"one value for every element (a scalar) or an array of shape "
            f"{tuple(var.shape)} (jnp.broadcast_to(value, {tuple(var.shape)}) if "
            "broadcasting is what you mean)"
        )


def _latest(site: Site | None) -> Site | None:
    return None if site is None else site.at(None)


def unpatched_names(graph: Graph) -> list[str]:
    """The ``.unpatched`` names of a graph patched in its running program only: per
    patched var, one for each patch made there (see :func:`unpatched`)."""
    sites = graph._patched_sites
    for site, name in sites.items():  # (vars kept by derive: named once, now)
        if not isinstance(name, str):
            sites[site] = name.name
    return [
        name + UNPATCHED * k
        for site, name in sites.items()
        for k in range(1, graph._patches_at(site) + 1)
    ]


def unpatched(graph: Graph, name: str) -> Var | None:
    """The var ``name`` selects in a graph patched in its running program only, when it
    is ``<stem>.unpatched`` (``.unpatched`` k times): the value of the var ``<stem>``
    names before its last k patches, or None."""
    stem, k = _select.unpatched_stem(name)
    if not graph._edited_apart or not k:
        return None
    try:
        var = _select.one(graph, stem)
    except SelectionError:
        return None
    site = graph._site(var.index)
    n = graph._patches_at(site) if site in graph._patched_sites else 0
    if k > n:
        if site is not None and any(_every_trip_patch(site, e) for e in graph._structure.edits):
            raise SelectionError(
                f"{stem!r} is patched at every trip of its while_loop (a name ending in "
                "'@*'), and the value before such a patch is not kept: select it in the "
                "graph the patch was made from, or patch the traced trips by name, one by "
                "one, to keep their '.unpatched' values"
            )
        return None
    return graph._loop_index.extra(
        (var.index, n - k), lambda index: Unpatched(graph, index, var, n - k, k)
    )


def _every_trip_patch(site: Site, edit: StructuredEdit) -> bool:
    """Whether ``edit`` patches the value at ``site`` at every trip of a ``while_loop``
    (a step naming no trip where ``site`` names one; not a scan body's rewrite, whose
    steps name a range of iterations)."""
    return (
        edit.kind == "apply"
        and at_some_iterations(site, edit.site)
        and any(
            o.iteration is None and s.iteration is not None
            for s, o in zip(site.steps, edit.site.steps)
        )
    )


class Unpatched(Var):
    """The value a patched var held before the patch (``<name>.unpatched``) in a graph
    patched in its running program only (module docstring): a :class:`~jaxsurgery.Var`
    for values, slices, gradients and experiments, whose edits run before the patch."""

    __slots__ = ("of", "before", "_suffix")

    def __init__(self, graph: Graph, index: int, of: Var, before: int, older: int):
        super().__init__(graph, index)
        self.of = of
        self.before = before  # its value: before the site's patches from this one on
        self._suffix = UNPATCHED * older  # (the last ``older`` of them)

    @property
    def name(self) -> str:
        return self.of.name + self._suffix

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(a + self._suffix for a in self.of.aliases)

    @property
    def aval(self) -> Any:
        return self.of.aval

    @property
    def primitive(self) -> str:
        return self.of.primitive

    @property
    def scope(self) -> str:
        return self.of.scope

    @property
    def source(self) -> str | None:
        return self.of.source

    @property
    def producers(self) -> tuple[Var, ...]:
        return self.of.producers

    @property
    def users(self) -> tuple[Var, ...]:
        return ()  # the patch reads it; nothing of the program does

    def site(self) -> Site:
        return self._graph._site_of(self.of).at(self.before)

    def order(self, run: bool = False) -> tuple[int, ...]:
        """Sorts where the patched value does (see ``Graph._order``)."""
        graph = self._graph
        return graph._run_order(self.of.index) if run else graph._order(self.of.index)
