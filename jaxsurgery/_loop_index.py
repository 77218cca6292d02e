"""Loops in the index: a loop kept as one equation, its body values found on demand.

Unrolling a loop into the flat index costs time and memory per iteration: a
10 000-step RNN is 100 000 equations before anything is asked, and a ``while_loop``'s
trip count is only known by running its body op by op (a diffrax solve). So every
scan, and a ``while_loop`` whose body passes
:data:`~jaxsurgery._control_flow.WHILE_FOLD_LIMIT` equations (or
:data:`~jaxsurgery._control_flow.SMALL_BODY` equations, with trips that would unroll past
:data:`~jaxsurgery._control_flow.EAGER_UNROLL`), stay one equation in the flat
program (slices, values and gradients around them treat them as loops), and the body
is indexed once, as a *template*: a flat program of the body alone, named like any
body (``step/h``). A name with an iteration, ``step/h@990``, then resolves to a
:class:`VirtualVar` without unrolling anything:

* its value comes from one run of the nested program, which exposes that body value
  at every iteration as one stacked result (later iterations are lookups);
* ``g.grads`` / ``g.grads_fn`` perturb it in the running loop (a stacked ``eps`` when
  many iterations are asked);
* a slice (and ``g.jvp``/``g.vjp``/``g.jacobian``) at it is cut from the running
  program (:mod:`jaxsurgery._loop_slice`);
* ``g.replace`` at it (or anywhere in such a graph) edits the running program and
  keeps this index as it is (:mod:`jaxsurgery._patch_graph`): nothing is unrolled.

A ``while_loop``'s trip count is found when first needed (a glob over its trips, a
value in a trip it may not reach), as one compiled run of the loop, also for a loop
inside calls (diffrax's solver loop); a trip the traced arguments do not reach is a
SelectionError saying how many times the loop runs.
A ``cond`` or small ``while_loop`` decided by a folded loop's results stays one
equation too (tracing would have to run the loop to pick its branch).

Virtual vars are not listed in ``g.vars`` (nor in tables or drawings); ``g.notes``
says which loops are indexed this way and how to name their values. What one reads and
what reads it (``v.producers``, ``v.users``, the ``reads`` column of a table of them)
come from the body: values of the same iteration, the loop's operands, the next
iteration for a carry, the loop's results. A body value nothing names is
``loop<k>%<i>@t`` (value ``i`` of the body of folded loop ``k``), as an unnamed var of
the flat index is ``%<i>``. A short scan inside the body
(:data:`~jaxsurgery._control_flow.INNER_UNROLL_LIMIT`) is unrolled in the template, and
its values take one more iteration: ``block/cell/h@2@3``.

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def rnn(h, xs):
    ...     def step(h, x):
    ...         h = js.tag(jnp.tanh(h + x), "state")
    ...         return h, h
    ...     return jax.lax.scan(step, h, xs)[0]
    >>> g = js.trace(rnn, jnp.zeros(2), jnp.ones((3000, 2)))
    >>> v = g["state@2990"]
    >>> v.name, v.shape, type(v).__name__
    ('state@2990', (2,), 'VirtualVar')
    >>> bool(jnp.allclose(g.value(v), g.value("out")))  # a fixed point by then
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _compat as C
from ._control_flow import MAX_TRIPS, Folded
from ._errors import SelectionError
from ._graph import Var, short_type
from ._names import is_generated
from ._scopes import backward_prefix, scope_names, scope_parts
from ._structured import Site, iterations

if TYPE_CHECKING:
    from ._graph import Graph
    from ._program import Program


@dataclass(frozen=True)
class Template:
    """One name of a body value of a folded loop: ``base@t`` for ``t`` in the loop."""

    loop: int  # index into Program.folded
    var: int  # index into that loop's template program
    inner: tuple[int, ...]  # iterations of loops unrolled inside the body
    #: iterations of the loops unrolled around the folded loop (a scan in a trip of an
    #: unrolled while_loop: ``body/step/h@2@5`` is step 5 of trip 2's scan)
    outer: tuple[int, ...] = ()

    def name(self, base: str, t: int) -> str:
        return "".join(
            (base, *(f"@{u}" for u in self.outer), f"@{t}", *(f"@{u}" for u in self.inner))
        )


def template_names(
    bindings: list[tuple[str, Template, Any]], scopes: list[tuple[str, Template, Any]] = ()
) -> dict[str, list[Template]]:
    """Per base name, the template vars it names: ``(name, Template, value)`` triples,
    ``value`` saying which value of the body a template var is a copy of (the copies
    of one value in the iterations of a loop unrolled inside the body are one value,
    told apart by the iteration). A name of several values takes ``#k`` forms:
    ``h#1@2@3`` is the second value named ``h``, at iteration 3 of the inner loop in
    iteration 2 of the folded one. A scope's name (``scopes``) is numbered by instance
    already (``blk#1``, as in the flat index), and one of several outputs names them
    all: ``blk@2`` selects both of ``blk``'s outputs at iteration 2."""
    by_name: dict[str, dict[Any, dict[Template, None]]] = {}
    for name, tmpl, value in bindings:
        by_name.setdefault(name, {}).setdefault(value, {})[tmpl] = None
    names: dict[str, list[Template]] = {}
    for name, values in by_name.items():
        if len(values) == 1:
            names.setdefault(name, []).extend(*values.values())
            continue
        for k, tmpls in enumerate(values.values()):
            names.setdefault(f"{name}#{k}", []).extend(tmpls)
            names.setdefault(name, []).extend(tmpls)
    for name, tmpl, _ in scopes:  # ranked after the others, as in the flat index
        if name not in by_name:
            names.setdefault(name, []).append(tmpl)
    return names


def body_value(loop: Folded, k: int, ti: int) -> Any:
    """Which value of folded loop ``k``'s body template var ``ti`` is a copy of: the
    nested var and where it is, iterations aside (see :func:`template_names`), also
    those of unrolled loops around the loop (its copy in each of their iterations)."""
    found = loop.template.found(ti)
    if found is None:
        return (k, ti)  # made by the inliner: a value of its own
    steps, nested = found
    return (loop.key, tuple((s.eqn, s.branch) for s in steps), nested)


def index_templates(
    program: Program, state: Callable[[Program], frozenset[int]] = lambda template: frozenset()
) -> tuple[list, list]:
    """``(name, Template, value)`` of folded loop bodies from the index itself (see
    :func:`template_names`): the ``js.tag``/``checkpoint_name`` tags, and the scopes
    of the body (Flax, Haiku, Equinox modules called in it), as two lists: names rank
    as in the flat index, tags first, then Python names, then scopes.

    A scope names its outputs (``blk``) and, as in the flat index, everything made
    inside it (``blk/loop0%12``: ``"blk/*@3"`` selects what ``blk`` holds in
    iteration 3); the scopes the loop runs in hold every value its body makes.
    ``state(template)``: the template vars a library stored as module state
    (``Recorder.state_vars``), which are not outputs of their scopes (see
    :func:`~jaxsurgery._scopes.scope_names`).
    """
    tags, scopes = [], []
    for k, loop in enumerate(program.folded):
        template = loop.template
        tags += [
            (name, Template(k, ti, its, loop.iterations), body_value(loop, k, ti))
            for ti, name, its in template.tag_iterations
        ]
        outputs, inside = scope_names(template, False, _residuals(program, loop), state(template))
        named = [
            *outputs,
            *((ti, f"{name.rpartition('/%')[0]}/{unnamed_base(k, ti)}") for ti, name in inside),
        ]
        for ti, name in named:
            at = (
                Template(k, ti, _inner(template, ti), loop.iterations),
                body_value(loop, k, ti),
            )
            scopes += [(full, *at) for full in _in_body(name, loop)]
        scopes += _inside_loop_scopes(k, loop)
    return tags, scopes


def _in_body(name: str, loop: Folded) -> list[str]:
    """The names of a scope of a loop's body (a scope's path in the body, ``blk``, or
    a value inside it, ``blk/loop0%12``): by its whole path, the loop's scope first
    (``Net/ScanCell_0/Dense_0``, as outside the loop), and by its path in the body. A
    loop ``jax.grad`` transposed runs the backward pass of its body's scopes
    (``grad(cell)``)."""
    prefix, backward = backward_prefix(loop.scope)
    if backward:
        head, slash, rest = name.partition("/")
        name = f"grad({head}){slash}{rest}"
    return [f"{prefix}/{name}", name] if prefix else [name]


def _inside_loop_scopes(k: int, loop: Folded) -> list[tuple[str, Template, Any]]:
    """``(name, Template, value)`` putting every value the body of folded loop ``k``
    makes inside the scopes the loop runs in: ``Net/ScanCell_0/loop0%12`` (so that
    ``"Net/ScanCell_0/*@3"`` selects the cell's values in iteration 3, as in an
    unrolled loop)."""
    parts = scope_parts(loop.scope)
    if not parts:
        return []
    template = loop.template
    return [
        (
            f"{'/'.join(parts[: d + 1])}/{unnamed_base(k, ti)}",
            Template(k, ti, _inner(template, ti), loop.iterations),
            value,
        )
        for outs in template.eqn_out
        for ti in outs
        for value in (body_value(loop, k, ti),)
        for d in range(len(parts))
    ]


def _residuals(program: Program, loop: Folded) -> frozenset[int]:
    """The template outputs of a folded scan that only a backward pass reads (what the
    forward scan of ``jax.grad`` stacks for the transposed one)."""
    if not loop.is_scan or loop.flat_eqn < 0:
        return frozenset()
    template, n_carry = loop.template, C.scan_layout(loop.eqn)[1]
    outvars = program.jaxpr.eqns[loop.flat_eqn].outvars
    found = []
    for ti, out in zip(template.outputs[n_carry:], outvars[n_carry:]):
        i = program.index.get(out)
        users = () if i is None else program.users[i]
        if users and all(C.in_backward_pass(program.jaxpr.eqns[u].source_info) for u in users):
            found.append(ti)
    return frozenset(found)


def _nbytes(aval: Any) -> float:
    """Bytes of a value of ``aval`` (infinite for symbolic dimensions)."""
    if not all(isinstance(d, int) for d in aval.shape):
        return float("inf")
    return math.prod(aval.shape) * getattr(aval.dtype, "itemsize", 8)


def _reverse(loop: Folded) -> bool:
    return loop.is_scan and loop.eqn.params["reverse"]


#: the most bytes of a body value's values at every iteration of a loop that one
#: ``g.value`` keeps (see :meth:`LoopIndex.kept_iterations`)
KEPT_TRIPS_BYTES = 1 << 28
#: the most bytes of such values a graph keeps in all (three 114 MB values of a scanned
#: model kept 342 MB beside what was asked)
KEPT_ROWS_BYTES = 1 << 30

_ITERATION = re.compile(r"^(.*?)((?:@(?:0|[1-9]\d*))+)$")  # @7, not @07
_UNNAMED = re.compile(r"^loop(\d+)%(\d+)$")


def _literal_prefix(pattern: re.Pattern) -> str:
    """The text every string ``pattern`` fully matches starts with (``"blk/"`` for the
    glob ``blk/*@3``; ``""`` when it cannot tell): a cheap test before a match."""
    text = pattern.pattern
    if _alternates(text) or pattern.flags & (re.IGNORECASE | re.VERBOSE):
        return ""
    out, i = [], 0
    while i < len(text):
        escaped = text[i] == "\\" and i + 1 < len(text) and not text[i + 1].isalnum()
        if not escaped and text[i] in _REGEX_SPECIAL:
            break
        step = 2 if escaped else 1
        if text[i + step : i + step + 1] in ("*", "?", "{"):
            break  # a repeat that may leave it out
        out.append(text[i + step - 1])
        i += step
    return "".join(out)


def _alternates(text: str) -> bool:
    """Whether a regex has an alternation outside its groups (``a|b@3``), which a
    literal start or end of it does not bind."""
    depth, i, klass = 0, 0, -1  # klass: where the open character class began
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if klass >= 0:  # a ']' right after '[' or '[^' is a literal one
            klass = -1 if c == "]" and i > klass + 1 + (text[klass + 1] == "^") else klass
        elif c == "[":
            klass = i
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            return True
        i += 1
    return False


_REGEX_SPECIAL = frozenset(".^$*+?{}[]|()\\")
_ASKED = re.compile(r"(?:@(?:0|[1-9]\d*))+$")


def _asked_iterations(pattern: re.Pattern) -> tuple[int, ...] | None:
    """The iterations a pattern ends with (``blk/*@3``: ``(3,)``), which end every
    name it matches; None when it does not say (``h@*``, an alternation)."""
    m = _ASKED.search(pattern.pattern)
    if m is None or _alternates(pattern.pattern) or pattern.flags & re.VERBOSE:
        return None
    return tuple(int(t) for t in m.group()[1:].split("@"))


def _candidates(tmpl: Template, n: int, asked: tuple[int, ...] | None) -> range | tuple[int, ...]:
    """The iterations of a loop of ``n`` at which ``tmpl``'s names can end with the
    iterations ``asked`` (see :func:`_asked_iterations`; None: every iteration)."""
    inner, k = tmpl.inner, len(tmpl.inner)
    if asked is None:
        return range(n)
    if len(asked) <= k:  # only the inner loops' iterations are asked
        return range(n) if inner[k - len(asked) :] == asked else ()
    t, around = asked[len(asked) - k - 1], asked[: len(asked) - k - 1]
    if around and tmpl.outer[len(tmpl.outer) - len(around) :] != around:
        return ()  # (also where more are asked than there are loops around)
    return (t,) if asked[len(asked) - k :] == inner and t < n else ()


def unnamed_base(loop: int, var: int) -> str:
    """The base name of template var ``var`` of folded loop ``loop`` that nothing names
    (``loop<k>%<i>``, as an unnamed var of the flat index is ``%<i>``)."""
    return f"loop{loop}%{var}"


def _inner(template: Program, ti: int) -> tuple[int, ...]:
    """The iterations of the loops unrolled inside a body that template var ``ti`` is in."""
    found = template.found(ti)
    return () if found is None else iterations(found[0])


class LoopIndex:
    """The virtual vars of a graph's folded loops (see the module docstring)."""

    def __init__(self, graph: Graph, names: dict[str, list[Template]]):
        self.graph = graph
        self.names = names
        self.vars: list[Var] = []  # virtual vars, then extra ones, by index
        self._by_key: dict[tuple[Template, int], VirtualVar] = {}
        #: per (loop, template var): the templates naming it (see _same_value)
        self._by_var: dict[tuple[int, int], dict[Template, None]] | None = None
        self._shared_names: set[str] | None = None
        #: per flat var that is a folded loop's last carry: its order (result_order)
        self._results: dict[int, tuple[int, ...]] | None = None
        self._twin: Graph | None = None
        #: other vars outside the flat index, by what they stand for (see extra)
        self._extras: dict[Any, Var] = {}
        #: a while_loop's trip count for this graph's arguments, once found (see length)
        self._trips: dict[int, int | None] = {}
        #: bytes of the values kept at every iteration, per template (kept_iterations)
        self._kept: dict[Template, float] = {}

    def note(self) -> str | None:
        """What ``g.notes`` says of the folded loops."""
        program = self.graph._program
        if not program.folded:
            return None
        kinds = [
            f"a scan of length {f.eqn.params['length']}" if f.is_scan else "a while_loop"
            for f in program.folded[:3]
        ]
        shown = [  # names of one value in each iteration (of the loops around it and
            # inside it, diffrax's stages: dy@0@1), not of two (a name bound twice)
            n
            for n, ts in self.names.items()
            if len({(t.outer, t.inner) for t in ts}) == len(ts) and not is_generated(n)
        ][:3]
        symbolic = any(
            f.is_scan and not isinstance(f.eqn.params["length"], int) for f in program.folded
        )
        if symbolic:
            shown = []  # (no iteration has a name)
        named = (
            f"; name one iteration, e.g. {self.names[shown[0]][0].name(shown[0], 0)!r}, or all with "
            f"{shown[0] + '@*'!r} (names: {', '.join(shown)}{', ...' if len(self.names) > 3 else ''})"
            if shown
            else ""
        )
        answer = (
            f"answer to name@iteration{named}"
            if self.names
            else "have no names from the code (code jaxsurgery does not rewrite: a "
            "library's, JAX's own as in lax.custom_root, or code whose source it cannot "
            "read): they answer to loop<k>%<i>@iteration (g.select('loop0%*@0') lists "
            "the first loop's at iteration 0)"
        )
        return (
            f"{', '.join(kinds)}{', ...' if len(program.folded) > 3 else ''} "
            f"stay{'s' if len(program.folded) == 1 else ''} one equation in the index: "
            f"body values are not listed in g.vars but {answer}"
            + ("; a symbolic length's iterations have no names" if symbolic else "")
        )

    def length(self, loop: Folded, need: bool = False) -> int | None:
        """Iterations of a folded loop: a scan's length; a while_loop's traced trip
        count, found when first needed (None if unknown: abstract arguments)."""
        if loop.is_scan:
            length = loop.eqn.params["length"]
            if not isinstance(length, int):  # jax.export's symbolic "t"
                raise SelectionError(
                    f"a scan of the graph has the symbolic length {length} (traced with "
                    "jax.export.symbolic_shape): its iterations are not known until it "
                    "runs, so they have no names; select what the scan returns (its "
                    "stacked results), or trace with a concrete length"
                )
            return length
        # kept per graph: a patched graph shares the loop, not its trips (g.replace("n", 5))
        # (an unknown count is kept too: past MAX_TRIPS each name looked up counted the
        # trips again, three compiled runs of the loop)
        if id(loop) not in self._trips and need:
            self._trips[id(loop)] = self._count_trips(loop)
        return self._trips.get(id(loop))

    def _count_trips(self, loop: Folded) -> int | None:
        from ._control_flow import count_trips_compiled

        graph, program = self.graph, self.graph._program
        if graph._flat_args is None or any(
            isinstance(a, C.Var) and a not in program.index for a in loop.operands
        ):
            return None  # abstract, or operands the flat index does not hold
        held = [graph.vars[program.index[a]] for a in loop.operands if isinstance(a, C.Var)]
        found = iter(graph.value(held))  # one run for all of them, not one run each
        values = [a.val if isinstance(a, C.Literal) else next(found) for a in loop.operands]
        p = loop.eqn.params
        n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
        return count_trips_compiled(
            p["cond_jaxpr"],
            p["body_jaxpr"],
            values[:n_cond],
            values[n_cond : n_cond + n_body],
            values[n_cond + n_body :],
        )

    def _within(self, loop: Folded, t: int) -> bool:
        # a while_loop's trips are counted now (one compiled run of the loop): a name
        # past them selects nothing, before a value is asked for as after
        n = self.length(loop, need=True)
        return 0 <= t and (n is None or t < n)

    def lookup(self, name: str) -> list[VirtualVar]:
        """The virtual vars an exact ``base@t`` name selects (empty if none)."""
        m = _ITERATION.match(name)
        if m is None or not self.graph._program.folded:
            return []
        base, suffix = m.group(1), [int(t) for t in m.group(2)[1:].split("@")]
        found = []
        for tmpl in self.names.get(base) or self._unnamed(base):
            o = len(tmpl.outer)
            if len(suffix) <= o or tuple(suffix[:o]) != tmpl.outer:
                continue
            t, inner = suffix[o], tuple(suffix[o + 1 :])
            loop = self.graph._program.folded[tmpl.loop]
            if inner == tmpl.inner and self._within(loop, t):
                found.append(self.var(tmpl, t, base))
        return found

    def matching(self, pattern: re.Pattern) -> list[tuple[VirtualVar, str]]:
        """Virtual vars with a name ``pattern`` fully matches (every iteration tried)."""
        found = []
        prefix, asked = _literal_prefix(pattern), _asked_iterations(pattern)

        def add(base: str, tmpl: Template, n: int) -> None:
            for t in _candidates(tmpl, n, asked):
                name = tmpl.name(base, t)
                if pattern.fullmatch(name):
                    found.append((self.var(tmpl, t, base), name))

        for base, tmpls in self.names.items():
            if (base + "@").startswith(prefix[: len(base) + 1]):
                for tmpl in tmpls:  # (cheap: a body value has a name per scope it is in)
                    add(base, tmpl, self._known_length(tmpl, base))
        if pattern.pattern.startswith("loop"):  # body values by place, loop<k>%<i>
            for k, loop in enumerate(self.graph._program.folded):
                # a while_loop's trips counted (a run of it); where they cannot be (an
                # abstract graph), a glob naming the loop (loop0%3@*) says so, one that
                # may mean a tag (loop?, loop*) matches none of its values
                n = self.length(loop, need=True)
                named = prefix.startswith(f"loop{k}%")
                template = loop.template
                for ti in range(len(template.vars)):
                    base = unnamed_base(k, ti)
                    if (base + "@").startswith(prefix[: len(base) + 1]):
                        tmpl = Template(k, ti, _inner(template, ti), loop.iterations)
                        add(base, tmpl, self._known_length(tmpl, base) if named else n or 0)
        return found

    def _known_length(self, tmpl: Template, base: str) -> int:
        """How many times the loop holding ``tmpl`` runs (a while_loop's trips found by
        running it, the first time), or a SelectionError saying why that is not known."""
        n = self.length(self.graph._program.folded[tmpl.loop], need=True)
        if n is None:
            why = (
                "the graph was traced with abstract arguments"
                if self.graph._flat_args is None
                else f"it runs more than {MAX_TRIPS} times or reads values the index does not hold"
            )
            raise SelectionError(
                f"the selector would match every iteration of the while_loop holding "
                f"{base!r}, whose trip count is not known ({why}); name one iteration, e.g. "
                f"{tmpl.name(base, 0)!r}"
            )
        return n

    def var(self, tmpl: Template, t: int, base: str | None = None) -> Var:
        """The var holding template var ``tmpl`` at iteration ``t``.

        One value, one var, as in an unrolled index: the carry entering iteration
        ``t`` is the one iteration ``t - 1`` returned (``step/h@5`` is
        ``step/h_new@4``; at the first iteration it is the loop's operand, ``h0``), and
        the carry the last iteration returns is the loop's result, a var of the flat
        index.
        """
        tmpl = self._canonical(tmpl)
        found = self._by_key.get((tmpl, t))
        if found is None:
            found = self._carried(tmpl, t)
            if found is None:
                graph = self.graph
                virtual = VirtualVar(graph, len(graph._program.vars) + len(self.vars), tmpl, t)
                loop = graph._program.folded[tmpl.loop]
                last = (
                    t == (0 if _reverse(loop) else self.length(loop) - 1) if loop.is_scan else False
                )
                found = self._flat(virtual) if last else None  # only a last carry leaves the loop
                if found is None:
                    self.vars.append(virtual)
                    found = virtual
            self._by_key[tmpl, t] = found
        return found

    def _carried(self, tmpl: Template, t: int) -> Var | None:
        """The var a carry input at iteration ``t`` is: the previous iteration's output,
        or at the first iteration the loop's operand (``step/h@0`` is ``h0``), when the
        index holds it."""
        loop = self.graph._program.folded[tmpl.loop]
        n_consts, n_carry = loop.carry_layout()
        if tmpl.inner or not n_consts <= tmpl.var < n_consts + n_carry:
            return None  # template inputs are the body's, in order
        previous = t + 1 if _reverse(loop) else t - 1
        if not self._within(loop, previous):
            return self._operand(loop, tmpl.var, t)
        out = loop.template.outputs[tmpl.var - n_consts]
        return self.var(Template(tmpl.loop, out, (), tmpl.outer), previous)

    def _flat(self, v: VirtualVar) -> Var | None:
        """The flat var holding the same value (a loop result), or None."""
        site = v.site()
        program = self.graph._program
        if site is None or len(site.steps) > len(v._loop.steps):
            return None  # still inside the loop (or made by the index)
        found = [j for j, _ in program.locate(site.vars[0]) if program.site(j) == site]
        return self.graph.vars[found[0]] if len(found) == 1 else None

    def names_of(self, v: VirtualVar) -> list[str]:
        """Every name of ``v``, its canonical one first: a name of its own value, else one
        of the carry input holding it at the next iteration (``step/i@3`` for the
        ``i + 1`` iteration 2 returns, as an unrolled index names it), else
        ``loop<k>%<i>@t``."""
        own, carried = self.full_names(v), self.carried_in(v)
        fallback = v.template.name(unnamed_base(v.template.loop, v.template.var), v.iteration)
        return [*carried, *own] if carried and own[0] == fallback else [*own, *carried]

    def carried_in(self, v: VirtualVar) -> list[str]:
        """Names of the carry inputs holding ``v`` (``step/h@5`` for ``step/h_new@4``)."""
        loop = v._loop
        n_consts, n_carry = loop.carry_layout()
        following = v.iteration - 1 if _reverse(loop) else v.iteration + 1
        if v.template.inner or not self._within(loop, following):
            return []
        outputs = loop.template.outputs[:n_carry]
        outer = v.template.outer
        return [
            Template(v.template.loop, n_consts + c, (), outer).name(base, following)
            for c, out in enumerate(outputs)
            if out == v.template.var
            for base in self.base_names(Template(v.template.loop, n_consts + c, (), outer))
        ]

    def other_iterations(self, v: VirtualVar) -> list[Var]:
        """``v`` at every iteration of its loop (one run of the loop exposes them all;
        see :meth:`kept_iterations`), or ``v`` alone."""
        n = self.kept_iterations(v, keep=True)
        return [v] if n is None else [self.var(v.template, t) for t in range(n)]

    def kept_iterations(self, v: VirtualVar, keep: bool = False) -> int | None:
        """The iterations at which one run of ``v``'s loop exposes ``v`` for a value
        asked at one of them: a scan's every iteration, a while_loop's traced trips
        where they are counted, where their values take no more than
        :data:`KEPT_TRIPS_BYTES`, with those of the graph's other values kept so no more
        than :data:`KEPT_ROWS_BYTES`, and the loop has no effects; else None, ``v`` alone
        (the loop runs up to it, its callbacks no further; a scanned transformer's 48
        layers of 256 MB activations are not all kept for one of them). Asked for one
        by one, each trip's value of a 4 000-trip while_loop ran the loop again (100 ms
        each). ``keep``: they are kept now, counted from then on (not where asked whether
        they would be: a value that then kept none took the budget of later ones)."""
        loop = v._loop
        n = self.length(loop)
        if n is None or loop.eqn.effects:
            return None
        if v.template not in self._kept:
            size = n * _nbytes(v.aval)
            if size > KEPT_TRIPS_BYTES or sum(self._kept.values()) + size > KEPT_ROWS_BYTES:
                return None
            if keep:
                self._kept[v.template] = size
        return n

    def forget_kept(self, template: Template) -> None:
        """``template``'s values, kept at every iteration, are dropped: uncount them."""
        self._kept.pop(template, None)

    def order(self, tmpl: Template, t: int, run: bool = False) -> tuple[int, ...]:
        """Where template var ``tmpl`` at iteration ``t`` sorts in program order (see
        ``Graph._order``): before its loop's first result, by iteration; ``run``: by
        when it is computed (see ``Graph._run_order``; the template's own order holds
        the iterations of loops unrolled inside the body)."""
        program = self.graph._program
        loop = program.folded[tmpl.loop]
        outs = program.eqn_out[loop.flat_eqn] if loop.flat_eqn >= 0 else ()
        first = outs[0] if outs else len(program.vars)
        if run:
            n = self.length(loop)
            return (first, -1, tmpl.loop, n - 1 - t if _reverse(loop) and n else t, tmpl.var)
        return (first, -1, tmpl.loop, t, *tmpl.inner, tmpl.var)

    def result_order(self, i: int) -> tuple[int, ...] | None:
        """:meth:`order` of flat var ``i`` if it is a folded loop's last carry (a known
        last iteration), or a reverse scan's initial carry (the input of its last
        iteration, which runs first: after the iterations), else None."""
        if self._results is None:
            self._results = {}
            program = self.graph._program
            for k, loop in enumerate(program.folded):
                n = self.length(loop)
                if loop.flat_eqn < 0 or not n:
                    continue
                last = 0 if _reverse(loop) else n - 1
                before, carries = loop.carry_layout()
                for c in range(carries):
                    result = self._result(loop, c)
                    if result is not None:
                        tmpl = Template(k, loop.template.outputs[c], (), loop.iterations)
                        self._results[result.index] = self.order(tmpl, last)
                    if _reverse(loop):
                        # the initial carry is the input of the last iteration, which
                        # sorts as iteration t + 1's result is the input of iteration t
                        init = self._flat_atom(program.jaxpr.eqns[loop.flat_eqn].invars[before + c])
                        if init is not None and init.index not in self._results:
                            self._results[init.index] = self.order(
                                Template(k, -1, (), loop.iterations), n
                            )
        return self._results.get(i)

    def _canonical(self, tmpl: Template) -> Template:
        """``tmpl`` with the iterations of the inner loops where its value is made.

        A value named inside a loop unrolled in the body may be one made in an earlier
        iteration of that loop (the inner carry: ``h#0@2@3``, the parameter at step 3,
        is ``h#1@2@2``): one value, one var.
        """
        inner = _inner(self.graph._program.folded[tmpl.loop].template, tmpl.var)
        return tmpl if inner == tmpl.inner else Template(tmpl.loop, tmpl.var, inner, tmpl.outer)

    def full_names(self, v: VirtualVar) -> list[str]:
        """Every name of ``v`` at its iteration, its canonical name first (names of
        its own template var first, plain names before ``#k`` forms)."""
        found, shared = [], []
        for tmpl in self._same_value(v.template):
            for base in self._bases(tmpl):
                never = base in self._shared() or is_generated(base)
                (shared if never else found).append(tmpl.name(base, v.iteration))
        # a name of several values (a scope's outputs) selects them all, and is never
        # canonical (as in the flat index), nor is a scope's inside one
        # (``blk/loop0%12``): then the var's own ``loop<k>%<i>`` is
        fallback = v.template.name(unnamed_base(v.template.loop, v.template.var), v.iteration)
        return [*found, *shared] if found else [fallback, *shared]

    def _shared(self) -> set[str]:
        """Base names of several body values (a scope's outputs: one name for all)."""
        if self._shared_names is None:
            folded = self.graph._program.folded
            self._shared_names = {
                name
                for name, ts in self.names.items()
                if len({body_value(folded[t.loop], t.loop, t.var) for t in ts}) > 1
            }
        return self._shared_names

    def _same_value(self, tmpl: Template) -> list[Template]:
        """The templates naming the template var of ``tmpl`` (a canonical one), it first."""
        if self._by_var is None:
            self._by_var = {}
            for ts in self.names.values():
                for t in ts:
                    self._by_var.setdefault((t.loop, t.var), {})[t] = None
        others = self._by_var.get((tmpl.loop, tmpl.var), {})
        return [tmpl, *(t for t in others if t != tmpl)]

    def _bases(self, tmpl: Template) -> list[str]:
        """The base names naming ``tmpl`` exactly, in ranking order (what the body binds,
        ``#k`` forms included, before what calls return, as in an unrolled loop), a
        name of several values last."""
        found = [n for n, ts in self.names.items() if tmpl in ts]
        return sorted(found, key=lambda n: "#" not in n and len(self.names[n]) > 1)

    def base_names(self, tmpl: Template) -> list[str]:
        """The base names of a template var, plain names first; a body value nothing
        names is ``loop<k>%<i>`` (template var ``i`` of folded loop ``k``), as an
        unnamed var of the flat index is ``%<i>``."""
        return self._bases(tmpl) or [unnamed_base(tmpl.loop, tmpl.var)]

    def _unnamed(self, base: str) -> list[Template]:
        """The template var a ``loop<k>%<i>`` base names (see :meth:`base_names`)."""
        m = _UNNAMED.match(base)
        folded = self.graph._program.folded
        if m is None or int(m.group(1)) >= len(folded):
            return []
        k, ti = int(m.group(1)), int(m.group(2))
        template = folded[k].template
        if ti >= len(template.vars):
            return []
        return [Template(k, ti, _inner(template, ti), folded[k].iterations)]

    # -- dataflow around a body value, read from the template ----------------------------
    def producers(self, v: VirtualVar) -> tuple[Var, ...]:
        """The vars the equation making ``v`` reads: body values at its iteration, and
        what the loop reads from outside (its operands). Nothing is unrolled.

        A body input is made outside the body: ``x@t`` of a scan's ``xs`` reads ``xs``;
        an operand the body reads as it is, that operand's producers. The body's own
        constants are not vars of the graph and are left out.
        """
        loop, template, j = v._loop, v._loop.template, v.template.var
        e = template.producer[j]
        if e >= 0:
            found = [self._holding(v, i, v.iteration) for i in template.eqn_in[e]]
            return tuple(dict.fromkeys(f for f in found if f is not None))
        outer = self._operand(loop, j, v.iteration)
        if outer is not None:  # the body reads the operand itself: it is that value
            return outer.producers
        n_consts, n_carry = loop.carry_layout()
        if loop.is_scan and j >= n_consts + n_carry:  # x@t: a row of xs
            xs = self._operand(loop, j, None)
            return () if xs is None else (xs,)
        return ()

    def users(self, v: VirtualVar) -> tuple[Var, ...]:
        """The vars made by equations that read ``v``: in its iteration, in the next
        one (a carry), and the loop's stacked result (a ``ys`` row of a scan)."""
        loop, template, j, t = v._loop, v._loop.template, v.template.var, v.iteration
        found = self._made_by_users(v, j, t)
        n_consts, n_carry = loop.carry_layout()
        following = t - 1 if _reverse(loop) else t + 1
        for c, out in enumerate(template.outputs):
            if out != j:
                continue
            if c < n_carry and self._within(loop, following):
                found += self._made_by_users(v, n_consts + c, following)
            else:  # the loop's result: the last carry, or a scan's ys stacking every row
                result = self._result(loop, c)
                found += [] if result is None else [result]
        return tuple(dict.fromkeys(found))

    def _made_by_users(self, v: VirtualVar, j: int, t: int) -> list[Var]:
        """What the template equations reading template var ``j`` make, at iteration ``t``."""
        template = v._loop.template
        made = (self._holding(v, o, t) for e in template.users[j] for o in template.eqn_out[e])
        return [m for m in made if m is not None]

    def _holding(self, v: VirtualVar, j: int, t: int) -> Var | None:
        """The var holding template var ``j`` of ``v``'s loop at iteration ``t`` (None
        for the body's own constants, which the graph does not hold)."""
        loop, template = v._loop, v._loop.template
        if template.num_inputs <= j < template.num_inputs + template.num_consts:
            return None
        if j < template.num_inputs:
            outer = self._operand(loop, j, t)
            if outer is not None:
                return outer
            return self.var(Template(v.template.loop, j, (), v.template.outer), t)
        return self.var(Template(v.template.loop, j, _inner(template, j), v.template.outer), t)

    def _operand(self, loop: Folded, j: int, t: int | None) -> Var | None:
        """The graph var body input ``j`` is at iteration ``t``, when it is an operand of
        the loop as it is: a constant the body reads, or the carry's initial value at the
        first iteration (``t`` None: any input, a scan's ``xs`` included)."""
        n_consts, n_carry = loop.carry_layout()
        first = (self.length(loop) - 1 if _reverse(loop) else 0) if loop.is_scan else 0
        if t is not None and not (j < n_consts or (j < n_consts + n_carry and t == first)):
            return None
        offset = 0 if loop.is_scan else loop.eqn.params["cond_nconsts"]
        return self._flat_atom(loop.operands[offset + j])

    def _result(self, loop: Folded, c: int) -> Var | None:
        """The graph var of a folded loop's ``c``-th result (None: dropped)."""
        if loop.flat_eqn < 0:
            return None
        return self._flat_atom(self.graph._program.jaxpr.eqns[loop.flat_eqn].outvars[c])

    def _flat_atom(self, atom: Any) -> Var | None:
        """The graph var of a flat atom (None for a literal or one the index lacks)."""
        program = self.graph._program
        i = program.index.get(atom) if isinstance(atom, C.Var) else None
        return None if i is None else self.graph.vars[i]

    def extra(self, key: Any, make: Any) -> Var:
        """A var outside the flat index that is not a body value (the value before a
        patch: ``_patch_graph.Unpatched``), made once per ``key`` as ``make(index)``;
        like virtual vars, its index follows the flat ones."""
        found = self._extras.get(key)
        if found is None:
            found = self._extras[key] = make(len(self.graph._program.vars) + len(self.vars))
            self.vars.append(found)
        return found

    # -- the unrolled twin ---------------------------------------------------------------
    def twin(self) -> Graph:
        """The same traced function indexed with every loop unrolled (made once): the
        reference the folded index is checked against (tests/test_loop_index.py)."""
        if self._twin is None:
            self._twin = self.graph._rebuild(fold=False)
        return self._twin

    def in_twin(self, v: Any) -> Any:
        """The twin's var holding the same value as ``v`` (a var of this graph)."""
        from ._errors import SliceError

        twin = self.twin()
        program = twin._program
        if isinstance(v, VirtualVar):  # the twin's copy of its body var at its iteration
            loop = v._loop
            nested = loop.template.found(v.template.var)[1]
            want = (*loop.iterations, v.iteration, *v.template.inner)
            copies = [j for j, its in program.locate(nested) if its == want]
            if len(copies) == 1:
                return twin.vars[copies[0]]
        found = None if isinstance(v, VirtualVar) else self.graph._program.found(v.index)
        if found is not None:  # the twin's copy of the same var at the same iterations
            its = iterations(found[0])
            copies = [j for j, c in program.locate(found[1]) if c == its]
            if len(copies) > 1:
                copies = [j for j in copies if program.found(j) == found]
            if len(copies) == 1:
                return twin.vars[copies[0]]
        site = self.graph._site_of(v)
        for nested in site.vars:
            for j, _ in program.locate(nested):
                if twin._site(j) == site:
                    return twin.vars[j]
        raise SliceError(
            f"{v.name!r} has no place in the unrolled index of this graph; select the "
            "value it was made from"
        )


class VirtualVar(Var):
    """A body value of a folded loop at one iteration (see the module docstring).

    A :class:`~jaxsurgery.Var` for names, shapes, values, gradients, slices (cut from
    the running program) and patches.
    """

    __slots__ = ("template", "iteration", "_cached_site")

    def __init__(self, graph: Graph, index: int, template: Template, iteration: int):
        super().__init__(graph, index)
        self.template = template
        self.iteration = iteration
        self._cached_site: Site | None = None

    @property
    def _loop(self) -> Folded:
        return self._graph._program.folded[self.template.loop]

    @property
    def _tvar(self) -> Any:
        return self._loop.template.vars[self.template.var]

    @property
    def name(self) -> str:
        return self._graph._loop_index.names_of(self)[0]

    def __repr__(self) -> str:
        # no index: it is given in the order values are asked for, and g[i] takes the
        # flat index's
        return f"Var({self.name}: {short_type(self.aval)} = {self.primitive}, in a folded loop)"

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(self._graph._loop_index.names_of(self)[1:])

    @property
    def aval(self) -> Any:
        return self._tvar.aval

    @property
    def primitive(self) -> str:
        return self._loop.template.primitives[self.template.var]

    @property
    def scope(self) -> str:
        """Its scope path, the loop's scope first (as :func:`index_templates` names it)."""
        return self._loop.body_scope(self._eqn())

    @property
    def source(self) -> str | None:
        return self._loop.template.source(self.template.var)

    @property
    def producers(self) -> tuple[Any, ...]:
        return self._graph._loop_index.producers(self)

    @property
    def users(self) -> tuple[Any, ...]:
        return self._graph._loop_index.users(self)

    def site(self) -> Site | None:
        """Where it lives in the nested program (None: a value the index made)."""
        if self._cached_site is None:
            program = self._graph._program
            self._cached_site = self._loop.site(
                self.template.var, self.iteration, program.closed, program.while_trips
            )
        return self._cached_site

    def order(self, run: bool = False) -> tuple[int, ...]:
        """Where it sorts in program order (see ``Graph._order``, ``Graph._run_order``)."""
        return self._graph._loop_index.order(self.template, self.iteration, run)

    def _eqn(self) -> C.JaxprEqn | None:
        template = self._loop.template
        e = template.producer[self.template.var]
        return None if e < 0 else template.jaxpr.eqns[e]
