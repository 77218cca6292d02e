"""One-pass gradients of many intermediates: ``g.grads`` and ``g.grads_fn``.

The structured program (:mod:`jaxsurgery._structured`) is edited so that each chosen
var ``v`` is replaced by ``v + eps_v`` for extra inputs ``eps_v``; one ``jax.grad`` with
respect to all ``eps`` at zero gives every ``d(sum of out)/dv`` in a single backward
pass: the zero-perturbation trick, applied to all vars at once. Since the nested
program runs, calls keep their custom rules, conds decide again and loops stay
loops (a perturbation at ``h@t`` for many ``t`` is one stacked input of the scan).
A var inside a cond branch or a while trip exists only on that path: arguments
that take another path raise a SliceError. A var inside a ``custom_jvp``/``custom_vjp``
call is perturbed in the call's body, which gives its gradient, while the call keeps
its rule for everything else, also for an output read inside it (see
``_structured``'s perturbed calls; a call with effects then runs twice, as the notes
and ``g.grads`` say).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from . import _compat as C
from . import _select
from ._errors import SliceError, jax_derivative_refusals, warn
from ._made import TakesArguments, selection_key, var_keys
from ._structured import (
    Edit,
    Extra,
    Row,
    Site,
    check_hits,
    iteration_run,
    loop_value,
    row_value,
    stack_rows,
)

if TYPE_CHECKING:
    from ._graph import Graph


@C.cached_per_mesh(256)
def _add_jaxpr(aval: tuple[tuple[int, ...], Any]) -> C.ClosedJaxpr:
    spec = jax.ShapeDtypeStruct(*aval)
    return C.make_jaxpr(lambda v, eps: v + eps, spec, spec)


def _no_gradient(v: Any, wrt: Any, wrt_vars: list[Any]) -> SliceError:
    """The error for ``wrt`` selecting ``v``, a var that is no float: a PRNG key, an
    integer or a boolean (JAX's gradient of one is ``float0``, no number)."""
    if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
        fix = "a PRNG key has no gradient: leave it out of wrt"
    else:
        fix = (
            "gradients are of floating-point values: pick a float var, or cast it in your function"
        )
    # a pattern that selected it among vars that have gradients: keep those (a dict
    # entry selects vars of one type: no such pattern)
    if isinstance(wrt, str) and any(jnp.issubdtype(u.dtype, jnp.inexact) for u in wrt_vars):
        fix += (
            f"; {wrt!r} selects it with float vars: keep those with "
            f"g.select({wrt!r}).where(lambda v: jnp.issubdtype(v.dtype, jnp.inexact))"
        )
    return SliceError(f"cannot differentiate with respect to {v.name!r} ({v.dtype}): {fix}")


class GradsFunction(TakesArguments):
    """``fn(*args, **kwargs) -> {name: d(sum of out)/d(var)}``, traceable and jittable."""

    _kind = "grads"

    def __init__(self, graph: Graph, out: Any, wrt: Any, *, with_values: bool = False):
        """``with_values``: the same run also gives the ``wrt`` values, keyed alike
        (:meth:`values_and_grads`: one forward pass where attribution needs both)."""
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
        for v in out_vars:
            if not jnp.issubdtype(v.dtype, jnp.inexact):
                raise SliceError(
                    f"cannot take gradients of the output {v.name!r} ({v.dtype}): they are "
                    "of the sum of floating-point outputs (a loss); name a float output"
                )
        for v in wrt_vars:
            if not jnp.issubdtype(v.dtype, jnp.inexact):
                raise _no_gradient(v, wrt, wrt_vars)
        for v in out_vars:
            if jnp.issubdtype(v.dtype, jnp.complexfloating):
                raise SliceError(
                    f"cannot take the gradient of {v.name!r} ({v.dtype}): the sum of a "
                    "complex output is not a real loss; return its real part, abs or "
                    "squared magnitude in your function and take the gradient of that"
                )
        self.keys = keys
        self._key = (var_keys(out_vars), selection_key(keys, wrt_vars, groups, stacked))
        sites = graph._sites_of(wrt_vars)
        # one perturbation input per value; the iterations of one loop value share one
        # stacked input (its rows), so the scan takes it whole as xs
        inputs: dict[Any, list[int]] = {}
        for j, site in enumerate(sites):
            inputs.setdefault(loop_value(site) or j, []).append(j)
        self._inputs = list(inputs.values())
        self._avals = [v.aval for v in wrt_vars]
        edits = []
        for k, members in enumerate(self._inputs):
            v = wrt_vars[members[0]]
            add = _add_jaxpr((tuple(v.shape), v.dtype))
            ranged = iteration_run([sites[j] for j in members])
            # (a perturbation: inside a custom_jvp/custom_vjp call, the call keeps its
            # rule, and the body gives the perturbation's own gradient)
            if ranged is not None:  # consecutive iterations: one edit, the input whole
                reads = (ranged.vars[0], Extra(k))
                edits.append(Edit(ranged, "apply", add, reads, perturbation=True))
                continue
            for row, j in enumerate(members):
                read = Extra(k, row if len(members) > 1 else None)
                edits.append(
                    Edit(sites[j], "apply", add, (sites[j].vars[0], read), perturbation=True)
                )
        guards = [Edit(Site(site.steps, ()), "hit") for site in sites if site.path_bound]
        exposed = [*out_vars, *wrt_vars] if with_values else out_vars
        self._structured, exposures, out_guards = graph._exposing(exposed, [*edits, *guards])
        self._outs, self._wrt_exposures = exposures[: len(out_vars)], exposures[len(out_vars) :]
        self._guards = [*guards, *out_guards]
        self._message = graph._path_message([*wrt_vars, *out_vars])
        self._warned = False
        from ._patch_graph import read_by_derivative, rewritten_away_note

        away = rewritten_away_note(graph, wrt_vars, "its gradient is zero")
        #: what to say of the values selected (see the notes)
        self._selection_notes = [
            *read_by_derivative(graph, wrt_vars, out_vars),
            *([away] if away else []),
        ]

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        flat = self.graph._flatten_args(*args, **kwargs)
        self._warn_once()
        return self.at_flat(flat)

    def _warn_once(self) -> None:
        if not self._warned:  # once, at the first call (under jit: when it traces)
            self._warned = True
            for note in [*self._selection_notes, *self.dropped]:
                warn(f"grads_fn: {note}")

    @property
    def notes(self) -> list[str]:
        """Remarks about the edited program (a custom rule bypassed, a derivative a
        custom rule drops, ...)."""
        return [*self.bypassed, *self._selection_notes, *self.dropped]

    @property
    def bypassed(self) -> list[str]:
        """What the run says of the custom calls it edits (one with effects running
        twice), known once the function ran."""
        return list(self._structured.notes)

    def _total(self, flat_args: Sequence[Any]) -> Any:
        """``eps -> (sum of out with eps added at each wrt value, (path hits, the wrt
        values by key where asked for)``)."""

        def total(eps: list[Any]) -> Any:
            _, exposed = self._structured.run(flat_args, eps, outputs=False)
            loss = sum(jnp.sum(exposed[e]) for e in self._outs)
            raw = [exposed.raw(e) for e in self._wrt_exposures]
            values = (
                {
                    key: stack_rows([raw[j] for j in group]) if many else row_value(raw[group[0]])
                    for key, group, many in zip(self.keys, self._groups, self._stacked)
                }
                if raw
                else {}
            )
            return loss, ([exposed[h] for h in self._guards], values)

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
        zeros = [
            C.zeros_of(
                self._avals[m[0]],
                len(m) if len(m) > 1 else None,
                sharded=not plain.intersection(m),  # (m: one value, at several iterations)
            )
            for m in self._inputs
        ]
        # a weakly typed value (a Python number traced) has a weakly typed gradient, as
        # jax.grad gives it (a step p - lr * g then keeps a bfloat16 p's dtype)
        return [
            C.weak_cast(z, z.dtype) if getattr(self._avals[m[0]], "weak_type", False) else z
            for z, m in zip(zeros, self._inputs)
        ]

    @functools.cached_property
    def dropped(self) -> list[str]:
        """Notes for the ``custom_jvp`` calls whose rules drop the derivative of some
        ``wrt`` value (see :mod:`jaxsurgery._rules`): the same for every argument, found
        by tracing the program once, abstractly (only if it has such a call at all)."""
        from ._rules import dropped_derivatives, may_drop

        structured = self._structured  # what runs: the nested program and its edits
        jaxprs = [structured.closed.jaxpr, *(e.fn.jaxpr for e in structured.edits if e.fn)]
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
        return self._values_and_grads(flat_args)[1]

    def values_and_grads(self, *args: Any, **kwargs: Any) -> tuple[dict, dict]:
        """``({key: wrt value}, {key: gradient})`` from one run, for a function made
        ``with_values`` (``g.attribution_fn``'s); else a SliceError (it returned no
        values: hunt X)."""
        if not self._wrt_exposures:
            raise SliceError(
                "this gradients function computes the gradients only (g.grads_fn): take "
                "the values from g.values_fn(...) with the same arguments, or both from "
                "g.attribution_fn's run"
            )
        flat = self.graph._flatten_args(*args, **kwargs)
        self._warn_once()
        return self._values_and_grads(flat)

    def _values_and_grads(self, flat_args: Sequence[Any]) -> tuple[dict, dict]:
        with jax_derivative_refusals():
            grads, (hits, values) = jax.grad(self._total(flat_args), has_aux=True)(self._zeros())
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
        return values, out
