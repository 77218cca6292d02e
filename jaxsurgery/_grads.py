"""One-pass gradients of many intermediates: ``g.grads`` and ``g.grads_fn``.

The structured program (:mod:`jaxsurgery._structured`) is edited so that each chosen
var ``v`` is replaced by ``v + eps_v`` for extra inputs ``eps_v``; one ``jax.grad`` with
respect to all ``eps`` at zero gives every ``d(sum of out)/dv`` in a single backward
pass: the zero-perturbation trick, applied to all vars at once. Since the nested
program runs, calls keep their custom rules, conds decide again and loops stay
loops (a perturbation at ``h@t`` for many ``t`` is one stacked input of the scan).
A var inside a cond branch or a while trip exists only on that path: arguments
that take another path raise a SliceError. A var inside a ``custom_jvp``/``custom_vjp``
call is perturbed in the call's body, which then runs in place of its rule (the
notes and ``g.grads`` say so); the perturbations that enter no such call, or other
ones, run apart (a forward run each, still one ``jax.grad``), so their gradients keep
the rules.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from . import _compat as C
from . import _select
from ._errors import SliceError, no_reverse_through_while, warn
from ._structured import (
    Edit,
    Extra,
    Row,
    Site,
    Step,
    check_hits,
    iteration_run,
    rules_entered,
    stack_rows,
)

if TYPE_CHECKING:
    from ._graph import Graph


def _loop_value(site: Site) -> tuple | None:
    """What the iterations of one loop value have in common (None: not in a loop)."""
    if not site.steps or site.steps[-1].iteration is None:
        return None
    last = site.steps[-1]
    # the value before a patch there (``name@t.unpatched``) is another value
    return (*site.steps[:-1], Step(last.eqn, last.branch)), site.vars, site.before


@functools.lru_cache(maxsize=256)
def _add_jaxpr(aval: tuple[tuple[int, ...], Any]) -> C.ClosedJaxpr:
    spec = jax.ShapeDtypeStruct(*aval)
    return C.make_jaxpr(lambda v, eps: v + eps, spec, spec)


@dataclasses.dataclass
class _Part:
    """The program perturbed at some of the inputs: its runs, the positions of its
    inputs among all, its exposed outputs and its path guards."""

    structured: Any
    inputs: list[int]
    outs: list[Edit]
    guards: list[Edit]


class GradsFunction:
    """``fn(*args, **kwargs) -> {name: d(sum of out)/d(var)}``, traceable and jittable."""

    def __init__(self, graph: Graph, out: Any, wrt: Any):
        self.graph = graph
        _, out_vars = _select.tree(graph, out)
        if not out_vars:
            raise SliceError(
                f"no output to differentiate: {out!r} selected no var; name the value "
                'whose sum the gradients are of ("out", a loss)'
            )
        # per key, the positions in wrt_vars of the vars whose gradients it holds, and
        # whether they are stacked (a dict entry selecting several vars)
        keys, wrt_vars, groups, stacked = _select.grouped(graph, wrt, "wrt")
        self._groups, self._stacked = groups, stacked
        for v in [*out_vars, *wrt_vars]:
            if not jnp.issubdtype(v.dtype, jnp.inexact):
                raise SliceError(
                    f"cannot differentiate {v.name!r} ({v.dtype}): gradients need "
                    "floating-point vars; pick a float var or cast it in your function"
                )
        for v in out_vars:
            if jnp.issubdtype(v.dtype, jnp.complexfloating):
                raise SliceError(
                    f"cannot take the gradient of {v.name!r} ({v.dtype}): the sum of a "
                    "complex output is not a real loss; return its real part, abs or "
                    "squared magnitude in your function and take the gradient of that"
                )
        self.keys = keys
        sites = [graph._site_of(v) for v in wrt_vars]
        # one perturbation input per value; the iterations of one loop value share one
        # stacked input (its rows), so the scan takes it whole as xs
        inputs: dict[Any, list[int]] = {}
        for j, site in enumerate(sites):
            inputs.setdefault(_loop_value(site) or j, []).append(j)
        self._inputs = list(inputs.values())
        self._avals = [v.aval for v in wrt_vars]
        # a perturbation inside a custom_jvp/custom_vjp call runs the call's body in place
        # of its rule (nothing else can take it in); the perturbations that enter other
        # calls (or none) run apart, so that their gradients keep those rules
        closed = graph._structure.closed
        parts: dict[tuple, list[int]] = {}
        for k, members in enumerate(self._inputs):
            entered = tuple(steps for _, steps in rules_entered(closed, sites[members[0]].steps))
            parts.setdefault(entered, []).append(k)
        self._parts = [
            self._part(graph, out_vars, [sites[j] for j in wrt_vars_of], inputs_of)
            for inputs_of in parts.values()
            for wrt_vars_of in ([j for k in inputs_of for j in self._inputs[k]],)
        ]
        self._message = graph._path_message([*wrt_vars, *out_vars])
        self._warned = False
        from ._patch_graph import read_by_derivative

        self._read_by_derivative = read_by_derivative(graph, wrt_vars, out_vars)

    def _part(
        self, graph: Graph, out_vars: Sequence[Any], sites: Sequence[Site], inputs: list[int]
    ) -> _Part:
        """The program perturbed at the inputs ``inputs`` (their ``sites``, in order)."""
        edits, at = [], iter(sites)
        for local, k in enumerate(inputs):
            members = self._inputs[k]
            own = [next(at) for _ in members]
            v = self._avals[members[0]]
            add = _add_jaxpr((tuple(v.shape), v.dtype))
            ranged = iteration_run(own)
            if ranged is not None:  # consecutive iterations: one edit, the input whole
                edits.append(Edit(ranged, "apply", add, (ranged.vars[0], Extra(local))))
                continue
            for row, site in enumerate(own):
                read = Extra(local, row if len(members) > 1 else None)
                edits.append(Edit(site, "apply", add, (site.vars[0], read)))
        guards = [Edit(Site(site.steps, ()), "hit") for site in sites if site.path_bound]
        structured, outs, out_guards = graph._exposing(out_vars, [*edits, *guards])
        return _Part(structured, inputs, outs, [*guards, *out_guards])

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        flat = self.graph._flatten_args(*args, **kwargs)
        if not self._warned:  # once, at the first call (under jit: when it traces)
            self._warned = True
            for note in [*self._read_by_derivative, *self.dropped]:
                warn(f"grads_fn: {note}")
        return self.at_flat(flat)

    @property
    def notes(self) -> list[str]:
        """Remarks about the edited program (a custom rule bypassed, a derivative a
        custom rule drops, ...)."""
        return [*self.bypassed, *self._read_by_derivative, *self.dropped]

    @property
    def bypassed(self) -> list[str]:
        """The custom rules the perturbations inside custom calls bypass (known once
        the function ran)."""
        return list(dict.fromkeys(n for part in self._parts for n in part.structured.notes))

    def _total(self, flat_args: Sequence[Any]) -> Any:
        """``eps -> (sum of out with eps added at each wrt value, path hits)``: one run
        per part, each with its own perturbations (each ``eps`` is read by one)."""

        def total(eps: list[Any]) -> Any:
            loss, hits = 0.0, []
            for part in self._parts:
                mine = [eps[k] for k in part.inputs]
                _, exposed = part.structured.run(flat_args, mine, outputs=False)
                loss = loss + sum(jnp.sum(exposed[e]) for e in part.outs)
                hits += [exposed[h] for h in part.guards]
            return loss, hits

        return total

    def _zeros(self) -> list[Any]:
        """The zero perturbations, typed as the values they perturb (shardings too: under
        an Explicit mesh they decide the gradients' types)."""

        # values of several shardings stacked in one result (a value and its reshard)
        # take plain zeros: their gradients, of one type, stack
        def sharding(i: int) -> str:
            return str(getattr(self._avals[i], "sharding", None))

        plain = {
            i
            for group, many in zip(self._groups, self._stacked)
            if many and len({sharding(j) for j in group}) > 1
            for i in group
        }
        return [
            C.zeros_of(
                self._avals[m[0]],
                len(m) if len(m) > 1 else None,
                sharded=not plain.intersection(m),  # (m: one value, at several iterations)
            )
            for m in self._inputs
        ]

    @functools.cached_property
    def dropped(self) -> list[str]:
        """Notes for the ``custom_jvp`` calls whose rules drop the derivative of some
        ``wrt`` value (see :mod:`jaxsurgery._rules`): the same for every argument, found
        by tracing the program once, abstractly (only if it has such a call at all)."""
        from ._rules import dropped_derivatives, may_drop

        jaxprs = [  # what runs: the nested program and its edits
            self._parts[0].structured.closed.jaxpr,
            *(e.fn.jaxpr for part in self._parts for e in part.structured.edits if e.fn),
        ]
        if not any(may_drop(j) for j in jaxprs):
            return []
        program = self.graph._program
        specs = [
            jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
            for v in program.vars[: program.num_inputs]
        ]
        closed = C.make_jaxpr(lambda args, eps: self._total(args)(eps), specs, self._zeros())
        return dropped_derivatives(closed.jaxpr, closed.jaxpr.invars[len(specs) :])

    def at_flat(self, flat_args: Sequence[Any]) -> dict[str, Any]:
        with no_reverse_through_while():
            grads, hits = jax.grad(self._total(flat_args), has_aux=True)(self._zeros())
        check_hits([(h, True, self._message) for h in hits])
        whole = {tuple(m): g for m, g in zip(self._inputs, grads) if len(m) > 1}
        where = (
            {
                j: (grad, row, len(m) > 1)
                for m, grad in zip(self._inputs, grads)
                for row, j in enumerate(m)
            }
            if any(tuple(group) not in whole for group in self._groups)
            else {}  # every group is one stacked input: nothing to pick rows from
        )

        def found(j: int) -> Any:
            grad, row, stacked = where[j]
            return grad[row] if stacked else grad

        def stacked(group: list[int]) -> Any:
            """The group's gradients stacked, a run of rows of one input as one slice
            (``step/h@*`` whose last iteration is the loop's result: the scan's
            stacked rows, then that one; T row picks made a program growing with T)."""
            picks = [where[j] for j in group]
            return stack_rows([Row(grad, row) if many else grad for grad, row, many in picks])

        out = {}
        for key, group, many in zip(self.keys, self._groups, self._stacked):
            if tuple(group) in whole:  # every iteration of one loop value, in order:
                out[key] = whole[tuple(group)]  # the scan's own stacked gradient
            elif not many:
                out[key] = found(group[0])
            else:
                out[key] = stacked(group)
        return out
