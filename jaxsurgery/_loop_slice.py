"""Slices at body values of folded loops: the running program, split by JAX itself.

A slice whose inputs or outputs include a value inside a loop the index keeps folded
(a :class:`~jaxsurgery._loop_index.VirtualVar`, ``step/h@t``) is cut from the nested
program, not from a flat copy:

1. the structured program (:mod:`jaxsurgery._structured`) is edited so that each
   input's value is replaced by a new argument at its site (at iteration ``t`` of the
   running scan) and each output is exposed;
2. that program, as a function of the traced function's arguments and the new ones,
   is split by JAX's partial evaluation (``partial_eval_jaxpr_nounits``): the part
   that does not depend on the slice's inputs is the *context* (its results are the
   residuals, computed once from the traced arguments or ``bind``), the rest is the
   slice's ``jaxpr``.

So a slice from ``step/h@0`` to the end of a 10 000-step RNN is one scan over the
sequence (its op count does not grow with the length), and a slice between two
iterations runs those only: the interpreter splits an edited scan into the iterations
before the first edit (plain, left in the context), the edited span (masked) and the
rest (plain). An input that is only the carry an iteration returns is spliced in where
the next iteration takes it (:func:`~jaxsurgery._structured.carry_entry`). The context is
made of residuals, named ``residual[k]`` in :attr:`Slice.context`.

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def rnn(h, xs):
    ...     def step(h, x):
    ...         h = js.tag(jnp.tanh(h + x), "state")
    ...         return h, h
    ...     return jax.lax.scan(step, h, xs)[0]
    >>> g = js.trace(rnn, jnp.zeros(2), jnp.ones((3000, 2)))
    >>> s = g.slice("state@0", "out")
    >>> [e.primitive.name for e in s.jaxpr.eqns].count("scan")
    1
    >>> bool(jnp.allclose(s(g.value("state@0")), g.value("out")))
    True
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from . import _compat as C
from ._patch_graph import read_by_derivative
from ._rules import dropped_derivatives
from ._slice import (
    IO_CALLBACK_NOTE,
    Decision,
    Slice,
    _check_connected,
    _coerce,
    _takes,
    shielded_note,
)
from ._structured import Edit, Extra, Site, carry_entry

if TYPE_CHECKING:
    from ._graph import Graph, Var


@C.cached_per_mesh(256)
def _given(shape: tuple[int, ...], dtype: Any) -> C.ClosedJaxpr:
    """``lambda new: new``: the edit that puts a slice input in place of a value."""
    return C.make_jaxpr(lambda new: new, jax.ShapeDtypeStruct(shape, dtype))


#: the note of a slice that holds only where the traced arguments went
_ON_PATH = (
    "the slice cuts inside a while_loop trip or a cond branch: it holds for arguments that "
    "reach it there; for arguments whose loop stops before that trip, or whose cond takes "
    "another branch, a call raises a SliceError"
)


class _Split:
    """The running program with ``in_vars`` cut in and ``out_vars`` exposed, split by
    JAX into what the inputs do not change (``known``) and the rest (``unknown``, its
    first ``n_res`` inputs the residuals); ``unused``: the inputs it does not read."""

    def __init__(self, graph: Graph, in_vars: list[Var], out_vars: list[Var]):
        nested = graph._structure.closed
        sites = [carry_entry(nested, graph._site_of(v)) for v in in_vars]
        edits = [
            Edit(site, "apply", _given(v.shape, v.dtype), (Extra(k),))
            for k, (v, site) in enumerate(zip(in_vars, sites))
        ]
        # an input or output in a while_loop trip exists only when the loop gets there:
        # whether it did is an extra result, checked on every call
        edits += [Edit(Site(site.steps, ()), "hit") for site in sites if site.path_bound]
        structured, exposures, guards = graph._exposing(out_vars, edits)
        self.structured = structured
        self.guards = guards = [*(e for e in edits if e.kind == "hit"), *guards]
        n_args = len(graph.inputs)
        # an output that is an input is that input (the identity): exposed where it was
        # made, a value only the carry passes on would be read before the input's edit,
        # which is on the carry entering the next iteration
        same = [in_vars.index(v) if v in in_vars else None for v in out_vars]

        def program(*flat: Any) -> list[Any]:
            _, exposed = structured.run(flat[:n_args], flat[n_args:], outputs=False)
            hits = [jnp.asarray(exposed[h], jnp.int32) for h in guards]
            outs = [exposed[e] if k is None else flat[n_args + k] for e, k in zip(exposures, same)]
            return [*outs, *hits]

        specs = [C.spec_of(v.aval) for v in (*graph.inputs, *in_vars)]
        closed = C.make_jaxpr(program, *specs)
        self.known, self.known_consts, unknown, self.n_res = C.split_known(
            closed, [False] * n_args + [True] * len(in_vars)
        )
        self.unknown = unknown = C.dce(unknown)
        read = {a for e in unknown.eqns for a in e.invars if isinstance(a, C.Var)}
        read.update(a for a in unknown.outvars if isinstance(a, C.Var))
        ins = unknown.invars[self.n_res :]
        self.unused = [v for v, x in zip(in_vars, ins) if x not in read]


class LoopSlice(Slice):
    """A :class:`~jaxsurgery.Slice` cut from the running program (module docstring)."""

    _known: C.Jaxpr
    _known_consts: list[Any]

    @classmethod
    def _cut(
        cls,
        graph: Graph,
        in_tree: Any,
        in_vars: list[Var],
        out_tree: Any,
        out_vars: list[Var],
        allow_unconnected: bool,
    ) -> LoopSlice:
        split = _Split(graph, in_vars, out_vars)
        structured, guards, unused = split.structured, split.guards, split.unused
        unknown, n_res = split.unknown, split.n_res
        residuals, ins = unknown.invars[:n_res], unknown.invars[n_res:]
        given = set(residuals)  # an output that needs no input is a residual passed on
        unconnected = [
            v for v, o in zip(out_vars, unknown.outvars) if not isinstance(o, C.Var) or o in given
        ]  # (the hits follow the outputs)
        # the split keeps a whole loop unknown once any iteration reads an input: what
        # runs before every input (an earlier iteration) cannot depend on it either way
        run = graph._run_order
        unconnected += [
            o
            for o in out_vars
            if o not in unconnected and all(run(i.index) > run(o.index) for i in in_vars)
        ]
        late = [i for i in in_vars if all(run(i.index) > run(o.index) for o in out_vars)]
        # an input the others shield (reaching the outputs only through them) is used,
        # with a derivative of zero, as in a flat slice
        shielded = [
            v
            for v in unused
            if v not in late and len(in_vars) > 1 and not _Split(graph, [v], out_vars).unused
        ]
        unused = [v for v in dict.fromkeys([*unused, *late]) if v not in shielded]
        if not allow_unconnected:
            _check_connected(graph, unconnected, unused, in_vars, out_vars)
        jaxpr = C.new_jaxpr(residuals, ins, unknown.outvars, unknown.eqns, "slice")
        notes = (
            *(shielded_note(v) for v in shielded),
            *structured.notes,
            *dropped_derivatives(jaxpr, ins),
            *read_by_derivative(graph, in_vars, out_vars),
        )
        if guards:
            notes += (_ON_PATH,)
        if C.calls_io_back(jaxpr.effects):  # (partial evaluation keeps them: split_known)
            notes += (IO_CALLBACK_NOTE,)
        s = cls(
            graph,
            in_tree,
            tuple(in_vars),
            out_tree,
            tuple(out_vars),
            jaxpr,
            (),
            graph._flat_args,
            tuple(dict.fromkeys(notes)),
        )
        s._known, s._known_consts = split.known, split.known_consts
        hit = Decision(1, functools.partial(_takes, 2, 1), "a trip or branch")  # hits are 1
        s._decisions = (hit,) * len(guards)
        return s

    def shown_roles(self) -> tuple[tuple[Var, ...], tuple[Var, ...]]:
        """``(window, context)`` vars of the flat index a picture or table shows: the
        equations between the inputs and the outputs, a folded loop counted as one
        equation (its results are not the window where the loop holds an output), and
        what they read besides. Its own program has no flat equations to name them."""
        graph, program = self.graph, self.graph._program
        n = len(program.vars)

        def loop_eqn(v: Var) -> int | None:
            return None if v.index < n else v._loop.flat_eqn if v._loop.flat_eqn >= 0 else None

        starts = [v.index for v in self.in_vars if v.index < n]
        ends = [v.index for v in self.out_vars if v.index < n]
        out_loops = {e for v in self.out_vars if (e := loop_eqn(v)) is not None}
        in_loops = {e for v in self.in_vars if (e := loop_eqn(v)) is not None}
        for e in in_loops:
            starts += program.eqn_out[e]
        for e in out_loops:
            ends += program.eqn_in[e]
        below = program.ancestor_eqns(ends) | out_loops
        window, stack = set(in_loops & below), list(starts)
        seen = set(stack)
        while stack:
            for e in program.users[stack.pop()]:
                if e in below and e not in window:
                    window.add(e)
                    for o in program.eqn_out[e]:
                        if o not in seen:
                            seen.add(o)
                            stack.append(o)
        ends_at = {v.index for v in (*self.in_vars, *self.out_vars)}
        made = {  # (a loop's result no window equation reads is none of the slice's)
            o
            for e in window - out_loops
            for o in program.eqn_out[e]
            if e not in in_loops or o in ends_at or window.intersection(program.users[o])
        }
        read = {i for e in window for i in program.eqn_in[e]}
        as_var = graph._var
        return (
            tuple(as_var(i) for i in sorted(made - ends_at)),
            tuple(as_var(i) for i in sorted(read - made - ends_at - set(starts))),
        )

    def _path_message(self, what: str) -> str:
        return (
            f"{self!r} cuts inside a while_loop trip or a cond branch that these "
            "arguments do not reach (the loop stops before it, or the cond takes another "
            "branch); use arguments that take the traced path there, or cut outside the "
            "loop or cond"
        )

    # -- context: the residuals of the split ------------------------------------------
    @property
    def context(self) -> dict[str, Any]:
        """Context values (the residuals of the split), ``residual[k]``."""
        return {f"residual[{k}]": x for k, x in enumerate(self._context())}

    def _computed_context(self) -> list[Any]:
        args = self._require_args()
        with C.compile_time_eval(args, C.retraced(self._known.eqns)):
            return self._residuals(args)

    def _residuals(self, flat_args: Any) -> list[Any]:
        return C.eval_jaxpr(self._known, (), *self._known_consts, *flat_args)

    def bind(self, *args: Any, **kwargs: Any) -> Slice:
        """The same slice with its context recomputed for new arguments (traceable)."""
        flat = self.graph._flatten_args(*args, **kwargs)
        flat = [_coerce(x, v) for x, v in zip(flat, self.graph.inputs, strict=True)]
        bound = copy.copy(self)
        bound._flat_args, bound._context_values = flat, self._residuals(flat)
        return bound

    def __repr__(self) -> str:
        ins = ", ".join(v.name for v in self.in_vars)
        outs = ", ".join(v.name for v in self.out_vars)
        n = len(self.jaxpr.eqns)
        k = len(self._known.outvars)  # the residuals (newer JAX lists them as invars)
        return (
            f"Slice({ins} ↦ {outs}: {n} equation{'s' if n != 1 else ''}, "
            f"context: {k} residual{'s' if k != 1 else ''})"
        )
