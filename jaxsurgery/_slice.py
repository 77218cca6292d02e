"""``Slice``: the sub-computation between chosen vars, as a JAX function.

For inputs I and outputs O the slice runs the equations that are descendants of I
and ancestors of O (the *window*). Every other value those equations read is
*context*, held fixed at its value in the traced (or bound) computation: the
partial-derivative semantics of the zero-tangent trick. Effectful equations (e.g.
``jax.debug.print``) that read values inside the window are kept, in order.

The window is found by two walks that never leave it: forward from I over the users
of each var (stopping at the last equation that writes an output), then backward from
O through the vars the forward walk reached. Its cost grows with the window and its
side branches, not with the graph.

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def f(x, w):
    ...     z1 = jnp.tanh(x @ w)
    ...     z2 = jnp.tanh(z1 @ w) + z1      # a residual connection
    ...     return z2.sum()
    >>> g = js.trace(f, jnp.ones((1, 2)), jnp.eye(2))
    >>> s = g.slice("z1", "z2")
    >>> s
    Slice(z1 ↦ z2: 3 equations, context: w)
    >>> jnp.allclose(s(g.value("z1")), g.value("z2"))
    Array(True, dtype=bool)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from . import _select
from ._control_flow import input_reads
from ._eager import eval_jaxpr
from ._errors import SliceError, short_list, type_of
from ._gc import gc_paused
from ._made import Made, var_keys
from ._promotion import alive, as_traced, deleted, held, holds, out_of_range, returned
from ._rules import dropped_derivatives
from ._structured import check_hits, goes_on_alone

if TYPE_CHECKING:
    from ._graph import Graph, Var


#: the note of a slice that keeps an io_callback (it reads a window value)
IO_CALLBACK_NOTE = (
    "the slice keeps an io_callback that reads its values (effects that read the window "
    "run with it, in order), and JAX differentiates no io_callback: jax.jvp, jax.grad "
    "and g.jvp of this slice fail; log with jax.debug.callback (which derivatives pass "
    "through), or slice where no io_callback reads what the slice computes"
)


class Window:
    """The equations and context of a slice, found by liveness walks (integers only).

    Effects: an effectful equation (``jax.debug.print``, a callback) that reads a
    window value, i.e. an input, an output or a value computed from the inputs before
    the last output, is kept, also when it comes after the last output; what else it
    reads is computed from the inputs too where it depends on them.
    """

    def __init__(self, program: Any, ins: Sequence[int], outs: Sequence[int]):
        inputs = frozenset(ins)
        producer, eqn_in = program.producer, program.eqn_in
        eqns = program.jaxpr.eqns
        limit = max((producer[o] for o in outs), default=-1)
        # Forward: descendants of the inputs, up to the last output's equation; effects
        # after it that read a reached value are noted on the way.
        reached: set[int] = set(inputs)
        forward: set[int] = set()
        late: set[int] = set()
        self._walk(program, list(inputs), inputs, reached, forward, limit, late)
        effects = sorted(
            {e for e in forward if eqns[e].effects} | {e for e in late if eqns[e].effects}
        )
        if effects and effects[-1] > limit:
            # what the late effects read: descendants of the inputs up to the last one
            # (found from the reached vars; those before the limit are done)
            self._walk(program, list(reached), inputs, reached, forward, effects[-1], None)
        self.program, self.inputs, self.reached = program, inputs, reached
        self.eqn_set: set[int] = set(effects)
        # Backward: ancestors of the outputs (and of effects) among reached vars.
        roots = [o for o in outs if o in reached and o not in inputs]
        self.grow([*roots, *(i for e in effects for i in eqn_in[e])])
        read = {i for e in self.eqn_set for i in eqn_in[e]}
        self.used_inputs = (read & inputs) | (inputs & set(outs))
        self.shielded = {
            i for i in inputs - self.used_inputs if _reaches(program, i, set(outs), limit)
        }

    @staticmethod
    def _walk(
        program: Any,
        stack: list[int],
        inputs: frozenset[int],
        reached: set[int],
        forward: set[int],
        limit: int,
        late: set[int] | None,
    ) -> None:
        """Grow ``reached``/``forward`` along users up to equation ``limit``; equations
        past it that read a reached var go to ``late`` (if given)."""
        users, eqn_out = program.users, program.eqn_out
        while stack:
            for e in users[stack.pop()]:
                if e > limit:
                    if late is not None:
                        late.add(e)
                    continue
                if e in forward:
                    continue
                forward.add(e)
                for o in eqn_out[e]:
                    if o not in inputs and o not in reached:
                        reached.add(o)
                        stack.append(o)

    @property
    def eqns(self) -> list[int]:
        return sorted(self.eqn_set)

    def grow(self, roots: Sequence[int]) -> None:
        """Add the equations computing ``roots`` from the inputs (within reached vars)."""
        reached, inputs = self.reached, self.inputs
        self.program.ancestor_eqns(
            roots, through=lambda i: i in reached and i not in inputs, into=self.eqn_set
        )


def _reaches(program: Any, start: int, targets: set[int], limit: int) -> bool:
    """Whether ``start`` is an ancestor of a target (crossing every var, inputs too)."""
    seen, stack = {start}, [start]
    while stack:
        for e in program.users[stack.pop()]:
            if e > limit:
                continue
            for o in program.eqn_out[e]:
                if o in targets:
                    return True
                if o not in seen:
                    seen.add(o)
                    stack.append(o)
    return False


def assemble(program: Any, window: Window, ins: Sequence[int], outs: Sequence[int]):
    """The window's equations with every call it does not cut through folded back.

    A call (``jit``, ``custom_jvp``, ``remat``, a loop, a ``cond``) is cut when a slice
    input or output is a value made inside it; then its body stays inlined and a note
    says what that means (a custom rule bypassed, a traced trip count or branch fixed).
    Otherwise its equations in the window are replaced by the original equation, so
    its rule survives and a loop stays a loop. A folded equation reads all its
    operands, so the window grows to compute those that depend on the inputs (a
    ``cond``'s predicate, say) before the fold is final.

    Returns ``(equations, context var indices, notes, cut regions)``.
    """
    while True:
        result, context, notes, dead, cut = _fold(program, window.eqn_set, ins, outs)
        missing = [i for i in context if i in window.reached]
        if not missing:
            window.eqn_set.difference_update(dead)
            return result, context, notes, cut
        window.grow(missing)


def _reads_apart(program: Any, region: Any, inputs: set[int], inside: set[int]) -> bool:
    """Whether the region's equations read a slice input that the call does not take as
    an operand: a constant its body closes over (``%1``, a jitted layer's captured
    array). Folded back, the call reads its operands only, and the slice ignored the
    input, silently."""
    operands = {program.index.get(a) for a in region.ins if isinstance(a, C.Var)}
    return any(
        i in inputs and i not in operands and i not in inside
        for e in range(region.start, region.end)
        for i in program.eqn_in[e]
    )


def _towards(program: Any, eqns: set[int], outs: Sequence[int]) -> set[int]:
    """Those of ``eqns`` that the outputs are computed from (not only effects)."""
    found, stack = set(), [program.producer[o] for o in outs]
    while stack:
        e = stack.pop()
        if e in eqns and e not in found:
            found.add(e)
            stack.extend(program.producer[i] for i in program.eqn_in[e])
    return found


def _fold(program: Any, eqns: set[int], ins: Sequence[int], outs: Sequence[int]):
    chosen = set(eqns)
    boundary = set(ins) | set(outs)
    folded: dict[int, Any] = {}  # start equation -> folded call equation
    notes: list[str] = []
    cut: list[Any] = []
    skip_until = -1
    towards = _towards(program, chosen, outs)
    inputs = set(ins)
    for region in program.regions:
        if region.start < skip_until:
            continue  # inside a call already folded
        window = [e for e in range(region.start, region.end) if e in chosen]
        if not window:
            continue
        region_outs = {i for i in region.made_outs(program) if i is not None}
        inside = {o for e in range(region.start, region.end) for o in program.eqn_out[e]}
        if (
            (inside - region_outs) & boundary
            or (region_outs & inputs)
            or _reads_apart(program, region, inputs, inside)
        ):
            if region.primitive in C.CUSTOM_RULE_PRIMITIVES and any(
                e in towards for e in window
            ):  # (only a print in the body, of what the call returns: no rule bypassed)
                notes.append(
                    f"the slice cuts inside the {region.primitive} call {region.name!r}: its "
                    "custom derivative rule is bypassed and its primal body is differentiated"
                )
            elif region.cut_note:
                notes.append(f"the slice cuts inside a {region.primitive}: {region.cut_note}")
            cut.append(region)
            continue
        chosen.difference_update(window)
        folded[region.start] = region.folded(program)
        skip_until = region.end
    # Equations the window holds only as control dependencies of a branch or trip that
    # the slice cuts inside (the predicate of a cond whose traced branch it keeps) are
    # dead once that branch is inlined: keep what the outputs and effects need.
    index = program.index
    live, result, dead = set(outs), [], []
    for e in sorted([*chosen, *folded], reverse=True):
        eqn = folded[e] if e in folded else program.jaxpr.eqns[e]
        if eqn.effects or any(
            not isinstance(v, C.DropVar) and index[v] in live for v in eqn.outvars
        ):
            result.append(eqn)
            live.update(index[a] for a in eqn.invars if isinstance(a, C.Var))
        elif e not in folded:
            dead.append(e)
    result.reverse()
    written = {index[v] for eqn in result for v in eqn.outvars if not isinstance(v, C.DropVar)}
    read = dict.fromkeys(index[a] for eqn in result for a in eqn.invars if isinstance(a, C.Var))
    context = [i for i in read if i not in written and i not in inputs]
    return result, context, notes, dead, cut


class Slice(Made):
    """A JAX function ``inputs ↦ outputs`` cut out of a :class:`Graph`.

    Call it with the input values (a tuple selector means positional arguments; any
    other selector one argument of that structure). ``jax.jit``, ``jax.jvp``,
    ``jax.vjp``, ``jax.jacfwd``, ``jax.vmap`` and ``jax.grad`` run on it unchanged.

    Attributes:
        graph: the Graph it was cut from.
        inputs / outputs: the selected vars, in the selectors' structure.
        in_vars / out_vars: the same, flat.
        jaxpr: the window as a ``Jaxpr``: ``constvars`` are the context,
            ``invars`` the inputs, ``outvars`` the outputs.
        notes: remarks about the cut (empty when there is nothing to say).
        window_vars: the vars its equations compute (inside folded calls too).
    """

    _kind = "slice"
    window_vars: tuple[Var, ...] = ()
    #: the checks of the path the window keeps, where the inputs decide it (a cond's
    #: branch, a while's trips); what they read are extra results of ``jaxpr``
    _decisions: tuple[Decision, ...] = ()
    #: an exported copy's: its decisions are not checked (see :meth:`export`)
    _unchecked: bool = False

    def __init__(
        self,
        graph: Graph,
        in_tree: Any,
        in_vars: tuple[Var, ...],
        out_tree: Any,
        out_vars: tuple[Var, ...],
        jaxpr: C.Jaxpr,
        context_vars: tuple[Var, ...],
        flat_args: Sequence[Any] | None,
        notes: tuple[str, ...] = (),
        context_values: Sequence[Any] | None = None,
    ):
        self.graph = graph
        self._in_tree = in_tree
        self.in_vars = in_vars
        self._out_tree = out_tree
        self.out_vars = out_vars
        self.jaxpr = jaxpr
        self.context_vars = context_vars
        self._flat_args = flat_args
        self._context_values = None if context_values is None else list(context_values)
        self.notes = notes

    @classmethod
    @gc_paused
    def _build(cls, graph: Graph, inputs: Any, outputs: Any, *, allow_unconnected: bool) -> Slice:
        from ._patch_graph import read_by_derivative

        in_tree, in_vars = _select.tree(graph, inputs)
        out_tree, out_vars = _select.tree(graph, outputs)
        if not in_vars:
            raise SliceError(f"the slice has no inputs: {inputs!r} selected no var")
        if not out_vars:
            raise SliceError(f"the slice has no outputs: {outputs!r} selected no var")
        dup = [v.name for v in in_vars if in_vars.count(v) > 1]
        if dup:
            raise SliceError(f"{dup[0]!r} is selected twice as an input; select each input once")
        # the same slice asked again is the same object (see _made.one): jax.jit of it
        # in a loop compiles once
        key = ("slice", in_tree, var_keys(in_vars), out_tree, var_keys(out_vars), allow_unconnected)
        try:
            known = graph._made.get(key)
        except TypeError:  # a structure that cannot be hashed
            known, key = None, None
        if known is not None:
            return known
        if graph._edited_apart or any(graph._virtual(v.index) for v in (*in_vars, *out_vars)):
            # a value inside a folded loop, or a graph patched in its running program only
            from ._loop_slice import LoopSlice

            cut = LoopSlice._cut(graph, in_tree, in_vars, out_tree, out_vars, allow_unconnected)
            return cut if key is None else graph._made.setdefault(key, cut)
        program = graph._program
        ins = [v.index for v in in_vars]
        outs = [v.index for v in out_vars]
        window = Window(program, ins, outs)
        unconnected = [v for v in out_vars if v.index not in window.reached]
        unused = [
            v
            for v in in_vars
            if v.index not in window.used_inputs and v.index not in window.shielded
        ]
        eqns, context, cut_notes, cut = assemble(program, window, ins, outs)
        # a cond's branch or a while's trips the window keeps, decided by the inputs:
        # what decides it becomes extra results, checked on every call (see __call__)
        decisions = _decisions(program, window, cut)
        extra = [i for vars_, _ in decisions for i in vars_]
        if decisions:
            window.grow(extra)
            eqns, context, cut_notes, _ = assemble(program, window, ins, [*outs, *extra])
            # what a check reads that the inputs do not reach (a carry the loop passes
            # on from before the cut) is context
            made = {*ins, *context, *(program.index.get(o) for e in eqns for o in e.outvars)}
            context += [i for i in dict.fromkeys(extra) if i not in made]
        notes = tuple(shielded_note(v) for v in in_vars if v.index in window.shielded)
        notes += tuple(cut_notes)
        if not allow_unconnected:
            _check_connected(graph, unconnected, unused, in_vars, out_vars)
        context += [v.index for v in unconnected if v.index not in context]
        jaxpr = C.new_jaxpr(
            [program.vars[i] for i in context],
            [program.vars[i] for i in ins],
            [program.vars[i] for i in (*outs, *extra)],
            eqns,
            "slice",
        )
        notes += tuple(dropped_derivatives(jaxpr, jaxpr.invars))
        notes += tuple(read_by_derivative(graph, in_vars, out_vars))
        # (one at the top reads a perturbed value: the window keeps it for that; one
        # inside a call kept whole may not, and JAX refuses only those that do)
        if any(e.primitive.name == "io_callback" for e in eqns):
            notes += (IO_CALLBACK_NOTE,)
        s = cls(
            graph,
            in_tree,
            tuple(in_vars),
            out_tree,
            tuple(out_vars),
            jaxpr,
            tuple(graph.vars[i] for i in context),
            graph._flat_args,
            notes,
        )
        s.window_vars = tuple(graph.vars[o] for e in window.eqns for o in program.eqn_out[e])
        s._decisions = tuple(d for _, d in decisions)
        return s if key is None else graph._made.setdefault(key, s)

    # -- structure ----------------------------------------------------------------------
    @property
    def inputs(self) -> Any:
        return _select.unflatten(self._in_tree, self.in_vars)

    @property
    def outputs(self) -> Any:
        return _select.unflatten(self._out_tree, self.out_vars)

    @property
    def _positional(self) -> bool:
        return isinstance(self.inputs, tuple)

    def _as_args(self, value: Any) -> tuple[Any, ...]:
        """Input-structured ``value`` as the tuple of positional arguments."""
        return tuple(value) if self._positional else (value,)

    def _from_args(self, args: Sequence[Any]) -> Any:
        """The inverse of :meth:`_as_args`."""
        return tuple(args) if self._positional else args[0]

    def _from_args_tree(self, result: Any) -> Any:
        return self._from_args(result) if isinstance(result, tuple) else result

    def input_values(self) -> tuple[Any, ...]:
        """The traced (or bound) values of the inputs, as positional arguments."""
        args = self._require_args(f"its input{'s' if len(self.in_vars) > 1 else ''}", True)
        flat = _evaluate_vars(self.graph, self.in_vars, args)
        return self._as_args(_select.unflatten(self._in_tree, flat))

    # -- context ------------------------------------------------------------------------
    @property
    def context(self) -> dict[str, Any]:
        """Context values by var name (JAX arrays: see ``returned``)."""
        with jax.ensure_compile_time_eval():
            return {v.name: returned(x) for v, x in zip(self.context_vars, self._context())}

    def _require_args(self, needing: str = "its context", valued: bool = False) -> Sequence[Any]:
        """The arguments the slice computes from, checked to be alive (donated ones are a
        SliceError naming them); ``valued``: computed by the graph's values, which check
        those they read (the traced arguments: not every argument is named)."""
        if self._flat_args is None:
            raise SliceError(
                f"{self!r} is unbound: its graph was traced with abstract arguments, so "
                f"{needing} has no values; call s.bind(*args, **kwargs) with the "
                "function's arguments first"
            )
        if valued and self._flat_args is self.graph._converted_args:
            return self._flat_args
        return alive(self._flat_args, self.graph.inputs)

    def _context(self) -> list[Any]:
        """The context values, computed once (not kept when computed under a transform,
        from its tracers: they are that trace's)."""
        found = self._context_values
        if found is not None and not any(map(deleted, found)):
            return found
        # (arguments among them donated since: computed again, which checks them)
        found = self._computed_context()
        if not C.holds_tracer(found):
            self._context_values = found
        return found

    def _computed_context(self) -> list[Any]:
        found = self._argument_free_context()
        if found is None:
            found = _evaluate_vars(self.graph, self.context_vars, self._require_args(valued=True))
            # (the graph's values check the arguments they compute from; one that is
            # context itself comes back as it is: checked here, by its name)
            alive(found, self.context_vars)
        return found

    def _argument_free_context(self) -> list[Any] | None:
        """The context when it needs no arguments (none, or only the program's constants),
        so that a slice of an abstract trace runs unbound; else None."""
        if self._flat_args is not None:
            return None
        program = self.graph._program
        first, end = program.num_inputs, program.num_inputs + program.num_consts
        if any(not first <= v.index < end for v in self.context_vars):
            return None
        if self.context_vars and self.graph._structure.edits:
            return None  # a patched graph: its constants may not be the program's
        return [program.consts[v.index - first] for v in self.context_vars]

    def bind(self, *args: Any, **kwargs: Any) -> Slice:
        """The same slice with its context recomputed for new arguments of the function.

        Traceable: inside ``jax.jit`` the arguments may be tracers.

        Example:
            >>> import jax, jax.numpy as jnp, jaxsurgery as js
            >>> def f(x, w):
            ...     z = jnp.tanh(x * w)
            ...     return jnp.sin(z) * w
            >>> g = js.trace(f, 1.0, 2.0)
            >>> s = g.slice("z", "out")
            >>> float(s.bind(1.0, 3.0)(0.5))      # context w = 3.0 now
            1.438...
        """
        flat = self.graph._flatten_args(*args, **kwargs)
        flat = [held(_coerce(x, v), v.dtype) for x, v in zip(flat, self.graph.inputs, strict=True)]
        values = None
        path, what = self._path_guards()
        if any(isinstance(x, jax.core.Tracer) for x in flat) or path:
            values = _evaluate_vars(self.graph, self.context_vars, flat, path, what)
        bound = copy.copy(self)
        bound._flat_args, bound._context_values = flat, values
        return bound

    def _path_guards(self) -> tuple[list[tuple[Any, bool]], list[Var]]:
        """What new arguments must do for this window to be theirs: ``(hits, vars)``.

        A window that keeps equations of a cond branch or of unrolled while trips
        (it cuts inside them) is specialised to the traced path: the branch must be
        taken again (a hit there is True) and the loop must run as many trips (a hit
        at the last traced trip is True, at the next one False). ``vars`` are the
        window vars that need it, for messages.
        """
        from ._structured import Edit, Site, Step

        graph, program = self.graph, self.graph._program
        found = [v.index for v in (*self.in_vars, *self.out_vars)]
        found += [
            program.index[o]
            for e in self.jaxpr.eqns
            for o in e.outvars
            if not isinstance(o, C.DropVar)
        ]
        hits: dict[tuple, bool] = {}
        what = []
        trips = graph._structure.while_trips
        for i in dict.fromkeys(found):
            site = graph._site(i)
            if site is None or not site.path_bound:
                continue
            what.append(graph.vars[i])
            for d in site.path_bound:
                outer, step = site.steps[:d], site.steps[d]
                if step.branch is not None:
                    hits[(*outer, step)] = True
                    continue
                n = trips[(*outer, Step(step.eqn))]
                hits[(*outer, Step(step.eqn, iteration=n - 1))] = True
                hits[(*outer, Step(step.eqn, iteration=n))] = False
        return [(Edit(Site(steps, ()), "hit"), ok) for steps, ok in hits.items()], what

    # -- calling ------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise SliceError(
                f"{self!r} takes its inputs by position, got keyword "
                f"{short_list(kwargs)}; pass them in the order "
                f"({short_list(v.name for v in self.in_vars)})"
            )
        expected = len(self.inputs) if self._positional else 1
        if len(args) != expected:
            raise SliceError(
                f"{self!r} takes {expected} argument{'s' if expected != 1 else ''} "
                f"({short_list(v.name for v in self.in_vars)}), got {len(args)}"
            )
        structured = self._from_args(args)
        leaves, treedef = jax.tree_util.tree_flatten(structured)
        if treedef != self._in_tree:
            raise SliceError(
                f"{self!r} expects its inputs structured as {_tree_text(self._in_tree)}, "
                f"got {_tree_text(treedef)} (* is an array)"
            )
        flat = [_coerce(x, v) for x, v in zip(leaves, self.in_vars)]
        checks = bool(self._decisions) and not self._unchecked
        try:
            out = eval_jaxpr(self.jaxpr, self._context(), *flat)  # (eagerly: compiled ops)
        except Exception:
            # a library's own check in the window (optimistix's "maximum number of
            # steps") may fail first on inputs that take another path: that is the error
            if checks:
                self._check_path(self._decided(flat))
            raise
        out, decided = out[: len(self.out_vars)], out[len(self.out_vars) :]
        if checks:
            self._check_path(decided)
        return _select.unflatten(self._out_tree, out)

    def _check_path(self, decided: Sequence[Any]) -> None:
        """SliceError (under ``jit``, at run time) unless the decisions' values
        ``decided`` take the path the slice keeps."""
        hits = []
        for d in self._decisions:
            hits.append((d.holds(decided[: d.count]), True, self._path_message(d.what)))
            decided = decided[d.count :]
        check_hits(hits)

    def _decided(self, flat: Sequence[Any]) -> list[Any]:
        """The decisions' values for inputs ``flat``, from only the equations they need
        (not a library's error check elsewhere in the window)."""
        jaxpr, n = self.jaxpr, len(self.out_vars)
        need = {v for v in jaxpr.outvars[n:] if isinstance(v, C.Var)}
        kept = []
        for e in reversed(jaxpr.eqns):
            if any(o in need for o in e.outvars):
                kept.append(e)
                need.update(v for v in e.invars if isinstance(v, C.Var))
        only = C.new_jaxpr(jaxpr.constvars, jaxpr.invars, jaxpr.outvars[n:], kept[::-1])
        return C.eval_jaxpr(only, self._context(), *flat)

    def _path_message(self, what: str) -> str:
        return (
            f"{self!r} keeps {what}, but these inputs take another path; call it with "
            "inputs that take the traced one, or slice to or from values outside the "
            "cond or loop"
        )

    def export(self, *, platforms: Sequence[str] | None = None, check: bool = True) -> Any:
        """The slice as a ``jax.export.Exported`` (serialized StableHLO), context baked in.

        A slice that checks on every call that its inputs take the path it keeps (cut
        inside a ``cond`` branch or a ``while_loop`` trip) checks with a host callback,
        which ``jax.export`` cannot serialize: that is a SliceError, unless
        ``check=False`` exports it without the check (inputs that take another path
        then get the kept path's result).

        Example:
            >>> import jax, jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     h = jnp.sin(x)
            ...     return h * 2.0
            >>> s = js.trace(f, jnp.ones(3)).slice("h", "out")
            >>> blob = s.export().serialize()
            >>> jax.export.deserialize(blob).call(jnp.ones(3))
            Array([2., 2., 2.], dtype=float32)
        """
        specs = _select.unflatten(self._in_tree, [C.spec_of(v.aval) for v in self.in_vars])
        self._context()  # concrete context (or an unbound-slice error) before tracing
        run = self
        if self._decisions:
            if check:
                raise SliceError(
                    f"{self!r} checks on every call that its inputs take the path it keeps "
                    f"({self._decisions[0].what}); the check is a host callback, which "
                    "jax.export cannot serialize: slice to or from values outside the cond "
                    "or loop, or export(check=False) to export it without the check"
                )
            run = copy.copy(self)
            run._unchecked = True
        return jax.export.export(jax.jit(run), platforms=platforms)(*self._as_args(specs))

    def draw(self, engine: str = "auto", *, depth: int | None = None, expand: bool = False) -> Any:
        """An SVG picture of the slice's graph with the slice highlighted (``depth`` and
        ``expand`` as for ``Graph.draw``)."""
        return self.graph.draw(highlight=self, engine=engine, depth=depth, expand=expand)

    def _repr_html_(self) -> str:
        from ._table import slice_roles, var_table_html

        roles = slice_roles(self)
        return var_table_html(list(roles), repr(self), "; ".join(self.notes), roles)

    def __repr__(self) -> str:
        ins = ", ".join(v.name for v in self.in_vars)
        outs = ", ".join(v.name for v in self.out_vars)
        n = len(self.jaxpr.eqns)
        ctx = short_list([v.name for v in self.context_vars]) or "none"
        return f"Slice({ins} ↦ {outs}: {n} equation{'s' if n != 1 else ''}, context: {ctx})"


@dataclass(frozen=True)
class Decision:
    """A check a slice makes on every call, where its own inputs decide the path that
    its window keeps: ``holds`` of the ``count`` extra results of its jaxpr is True when
    they take the traced path (``what``, for the message)."""

    count: int
    holds: Callable[[Sequence[Any]], Any]
    what: str


def _decisions(
    program: Any, window: Window, cut: Sequence[Any]
) -> list[tuple[list[int], Decision]]:
    """``(extra results, Decision)`` for each cut ``cond`` whose branch index, and each
    cut ``while`` whose condition at a traced trip, depends on the slice inputs."""
    found = []
    for region in cut:
        if region.primitive == "cond" and region.taken is not None:
            n, taken = len(region.eqn.params["branches"]), region.taken
            what = f"branch {taken} of a cond (the traced branch)"
            for a in region.deciders:
                i = program.index.get(a)
                if i is not None and i in window.reached:
                    found.append(([i], Decision(1, functools.partial(_takes, n, taken), what)))
        elif region.primitive == "while" and region.boundaries:
            found += _trip_decisions(program, window, region)
    return found


def _takes(n: int, taken: int, values: Sequence[Any]) -> Any:
    return jnp.clip(values[0], 0, n - 1) == taken


def _trip_decisions(program: Any, window: Window, region: Any) -> list[tuple[list[int], Decision]]:
    """A cut while's condition, asked again of the carry at each traced trip that the
    inputs reach: it must go on before each traced trip and stop after the last."""
    p = region.eqn.params
    cond = p["cond_jaxpr"]
    used = input_reads(cond.jaxpr, range(1))
    consts = region.ins[: p["cond_nconsts"]]
    trips = len(region.boundaries) - 1
    what = f"the {trips} traced trips of a while_loop"
    found = []
    for t, carry in enumerate(region.boundaries):
        atoms = [*consts, *carry]
        at = [
            program.index.get(a) if k in used and type(a) is not C.Literal else None
            for k, a in enumerate(atoms)
        ]
        if not any(i is not None and i in window.reached for i in at):
            continue  # the traced arguments decide it: the same as traced
        extra = [i for i in at if i is not None]
        holds = functools.partial(_goes_on, cond, atoms, at, t < trips)
        found.append((extra, Decision(len(extra), holds, what)))
    return found


def _goes_on(
    cond: Any, atoms: list[Any], at: list[Any], expected: bool, values: Sequence[Any]
) -> Any:
    """Whether a while's condition, of the carry ``values`` (at the positions ``at``
    names; the others are literals or unread), says ``expected``."""
    given = iter(values)
    args = [
        next(given) if i is not None else a.val if type(a) is C.Literal else C.zeros_of(a.aval)
        for a, i in zip(atoms, at)
    ]
    return goes_on_alone(cond, (), args) == expected  # args: its consts, then the carry


def _evaluate_vars(
    graph: Graph,
    vars_: Sequence[Var],
    flat_args: Sequence[Any],
    path: Sequence[tuple[Any, bool]] = (),
    what: Sequence[Var] = (),
) -> list[Any]:
    """Values of ``vars_`` for flat function arguments (traceable; cached when traced).

    The traced arguments read the flat program (exact for them); new arguments run
    the structured program, which decides every cond and loop again and checks the
    ``path`` the slice's window is specialised to (see ``Slice._path_guards``).
    """
    concrete = not any(isinstance(x, jax.core.Tracer) for x in flat_args)
    if concrete and flat_args is graph._converted_args:  # (the traced ones, as _flat_args)
        return list(graph.value(list(vars_)))
    if concrete:
        with C.compile_time_eval(flat_args, graph._program.retraced):
            return graph._values_at(vars_, flat_args, path, what)
    return graph._values_at(vars_, flat_args, path, what)


def _coerce(x: Any, var: Var) -> Any:
    """``x`` as an array of ``var``'s type, or a SliceError naming the mismatch."""
    C.refuses_x64(x, var.dtype, f"input {var.name!r}")
    if isinstance(x, (bool, int, float, complex)):
        if var.shape == () and holds(var.dtype, x):  # (weakly typed where the var is)
            return as_traced(x, var.dtype) if var.aval.weak_type else jnp.asarray(x, var.dtype)
        outside = out_of_range(var.dtype, x)
        raise SliceError(
            f"input {var.name!r} expects {type_of(var)}, got a Python {type(x).__name__}"
            f"{'; ' + outside if outside else ''}; pass a value shaped like "
            f"g.value({var.name!r})"
        )
    if not hasattr(x, "dtype"):
        if isinstance(x, (list, tuple)) or not hasattr(x, "__array__"):
            raise SliceError(
                f"input {var.name!r} expects an array {type_of(var)}, got {type(x).__name__}"
            )
        x = np.asarray(x)
    shape = tuple(jnp.shape(x))
    weak = getattr(getattr(x, "aval", None), "weak_type", False)  # a Python number under jit
    if weak and shape == var.shape and x.dtype != var.dtype and holds(var.dtype, x):
        return jnp.asarray(x, var.dtype)
    if shape != var.shape or not _same_dtype(x.dtype, var.dtype):
        got = f"{jnp.dtype(x.dtype).name if _is_numpy_dtype(x.dtype) else x.dtype}{list(shape)}"
        raise SliceError(
            f"input {var.name!r} expects {type_of(var)}, got {got}; pass a value shaped "
            f"like g.value({var.name!r})"
        )
    return x


def _is_numpy_dtype(dtype: Any) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:
        return False
    return True


def _same_dtype(a: Any, b: Any) -> bool:
    if a == b:
        return True
    # numpy float64 input while x64 is off: JAX would canonicalize it anyway
    return _is_numpy_dtype(a) and jax.dtypes.canonicalize_dtype(a) == b


def shielded_note(v: Var) -> str:
    """The note of a slice input that other inputs shield from every output."""
    return f"input {v.name!r} reaches the outputs only through other inputs: its derivative is zero"


def _check_connected(
    graph: Graph,
    unconnected: Sequence[Var],
    unused: Sequence[Var],
    in_vars: Sequence[Var],
    out_vars: Sequence[Var],
) -> None:
    ins = short_list(v.name for v in in_vars)
    if unconnected:
        v = unconnected[0]
        raise SliceError(
            f"output {v.name!r} does not depend on any input ({ins}); pick an output "
            "downstream of the inputs, or pass allow_unconnected=True to hold it constant"
        )
    if unused:
        v = unused[0]
        after = all(graph._run_order(v.index) > graph._run_order(o.index) for o in out_vars)
        where = "is computed after every output" if after else "does not reach any output"
        outs = short_list(o.name for o in out_vars)
        raise SliceError(
            f"input {v.name!r} {where} ({outs}); pick an input upstream of the outputs, "
            "or pass allow_unconnected=True to ignore it"
        )


def _tree_text(treedef: Any) -> str:
    """``(*, {'b': *})`` for a ``PyTreeDef((*, {'b': *}))``."""
    text = str(treedef)
    return text[len("PyTreeDef(") : -1] if text.startswith("PyTreeDef(") else text
