"""Custom derivative rules a slice keeps, and the derivatives they drop.

A slice keeps every ``custom_jvp`` call it does not cut through, with its rule (SPEC
§5). Some of these calls return one of their operands as it is and attach a
derivative computed from *other* operands: equinox's checkpointed ``while_loop``
(diffrax's default adjoint) runs the loop first, then passes its result through such a
call whose rule differentiates the loop again from its initial state. A slice whose
inputs are values inside that loop reaches the call only through the passed-on result,
whose tangent the rule ignores: the slice's derivative is zero, though the values are
right. A ``custom_jvp`` stop-gradient looks the same. Either way the user must know:
:func:`dropped_derivatives` finds such calls (it traces the rule once, asking whether
the passed-on operand's tangent reaches the result) and says so in the slice's notes;
``g.grads`` warns when a gradient it returns is zero because of one.

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> @jax.custom_jvp
    ... def frozen(x):
    ...     return x
    >>> frozen.defjvp(lambda primals, tangents: (primals[0], jnp.zeros_like(primals[0])))
    <function ...>
    >>> def f(x):
    ...     h = jnp.sin(x)
    ...     return frozen(h) * 2.0
    >>> s = js.trace(f, 1.0).slice("h", "out")
    >>> any("ignores" in n for n in s.notes)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from . import _compat as C


def dropped_derivatives(jaxpr: C.Jaxpr, inputs: Sequence[Any]) -> list[str]:
    """Notes for the ``custom_jvp`` calls of ``jaxpr`` (top level, and inside calls,
    loop bodies and ``cond`` branches: a stage loop inside a solver loop) whose rule
    ignores the tangent of an operand they return as it is, when that
    operand is computed from ``inputs``, the result reaches the outputs, and some
    output's derivative with respect to some input is zero for every argument (JAX's
    linearization of the jaxpr never reads that input's tangent there)."""
    notes: list[str] = []
    _walk(jaxpr, set(inputs), _live(jaxpr, jaxpr.outvars), notes)
    if notes and not _zero_somewhere(jaxpr, inputs):
        return []  # the rule differentiates these inputs some other way
    return list(dict.fromkeys(notes))


def may_drop(jaxpr: C.Jaxpr) -> bool:
    """Whether ``jaxpr`` holds, anywhere inside, a ``custom_jvp`` call that returns one
    of its operands as it is: the only calls :func:`dropped_derivatives` looks at
    (``jax.nn.relu``'s, say, does not), found without tracing anything."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_jvp_call":
            body = C.called_jaxpr(eqn).jaxpr
            if any(_forwarded(body, out) is not None for out in body.outvars):
                return True
        if any(may_drop(inner) for inner in C.inner_jaxprs(eqn)):
            return True
    return False


def _live(jaxpr: C.Jaxpr, outs: Sequence[Any]) -> set[Any]:
    """The vars of ``jaxpr`` that ``outs`` are computed from (and ``outs``)."""
    live = {v for v in outs if isinstance(v, C.Var)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(a for a in eqn.invars if isinstance(a, C.Var))
    return live


def _walk(jaxpr: C.Jaxpr, dependent: set[Any], live: set[Any], notes: list[str]) -> None:
    for eqn in jaxpr.eqns:
        reads = [isinstance(a, C.Var) and a in dependent for a in eqn.invars]
        if not any(reads) or not any(v in live for v in eqn.outvars):
            continue
        name = eqn.primitive.name
        if name == "custom_jvp_call":
            body = C.called_jaxpr(eqn).jaxpr
            for j, out in enumerate(body.outvars):
                k = _forwarded(body, out)
                if k is not None and reads[k] and eqn.outvars[j] in live and _ignores(eqn, k, j):
                    notes.append(_note(eqn))
        elif name in C.CALL_PRIMITIVES and name not in C.CUSTOM_RULE_PRIMITIVES:
            body = C.called_jaxpr(eqn).jaxpr
            wanted = [o for o, v in zip(body.outvars, eqn.outvars) if v in live]
            _walk(body, {v for v, r in zip(body.invars, reads) if r}, _live(body, wanted), notes)
        else:
            for body, ins, outs, _ in _bodies(eqn, reads, [v in live for v in eqn.outvars]):
                _walk(body, ins, _live(body, outs), notes)
        dependent.update(v for v in eqn.outvars if not isinstance(v, C.DropVar))


def _bodies(
    eqn: C.JaxprEqn, reads: list[bool], live: list[bool]
) -> list[tuple[C.Jaxpr, set[Any], list[Any], set[Any] | None]]:
    """``(jaxpr, its inputs computed from the inputs, its live results, the vars computed
    from those: a loop's, found on the way; None for a branch)`` of each body of
    a ``scan`` or ``while`` equation and each branch of a ``cond``, from which of its
    operands are computed from the inputs (``reads``) and which results are live. A
    carry computed from the inputs in one iteration is in every later one, and a carry
    a live result is computed from is live in every earlier one (both found by
    iterating until nothing changes, at most once per carry)."""
    name = eqn.primitive.name
    if name == "cond":  # operands: the index, then every branch's
        return [
            (
                b.jaxpr,
                {v for v, r in zip(b.jaxpr.invars, reads[1:]) if r},
                _picked(b.jaxpr, live),
                None,
            )
            for b in eqn.params["branches"]
        ]
    if name == "scan":  # operands: consts, carry, xs; results: carry, ys
        body = eqn.params["jaxpr"].jaxpr
        n_consts, n_carry = C.scan_layout(eqn)
        dep, wanted = list(reads), list(live)
    elif name == "while":  # operands: the test's consts, the body's consts, carry
        body = eqn.params["body_jaxpr"].jaxpr
        n_consts, n_carry = eqn.params["body_nconsts"], len(eqn.outvars)
        dep = reads[eqn.params["cond_nconsts"] :]
        wanted = list(live)
    else:
        return []
    carry_in = body.invars[n_consts : n_consts + n_carry]
    while True:
        ins = {v for v, r in zip(body.invars, dep) if r}
        reached = _reached_from(body, ins)
        used = _live(body, _picked(body, wanted))
        grown = [j for j in range(n_carry) if not dep[n_consts + j] and body.outvars[j] in reached]
        needed = [j for j in range(n_carry) if not wanted[j] and carry_in[j] in used]
        if not grown and not needed:
            return [(body, ins, _picked(body, wanted), reached)]
        for j in grown:
            dep[n_consts + j] = True
        for j in needed:
            wanted[j] = True


def _picked(jaxpr: C.Jaxpr, live: list[bool]) -> list[Any]:
    return [o for o, keep in zip(jaxpr.outvars, live) if keep]


def _zero_somewhere(jaxpr: C.Jaxpr, inputs: Sequence[Any]) -> bool:
    """Whether some float output computed from a float input has a derivative with
    respect to it that is zero for every argument: JAX's linearization of the jaxpr
    (traced once, abstractly) computes that output's tangent without reading the
    input's. A jaxpr that cannot be linearized counts as zero (the notes stand)."""
    ins = [v for v in dict.fromkeys(inputs) if _inexact(v)]
    outs = [k for k, o in enumerate(jaxpr.outvars) if isinstance(o, C.Var) and _inexact(o)]
    if not ins or not outs:
        return False
    reached = {v: _reached(jaxpr, v) for v in ins}
    every = [*jaxpr.constvars, *jaxpr.invars]
    at = [every.index(v) for v in ins]
    n_consts = len(jaxpr.constvars)

    def linear(*args: Any) -> Any:
        primals, tangents = list(args[: len(every)]), args[len(every) :]

        def run(*xs: Any) -> Any:
            values = list(primals)
            for i, x in zip(at, xs):
                values[i] = x
            return jax.core.eval_jaxpr(jaxpr, values[:n_consts], *values[n_consts:])

        return jax.linearize(run, *[primals[i] for i in at])[1](*tangents)

    specs = [C.spec_of(v.aval) for v in every]
    try:
        traced = C.make_jaxpr(linear, *specs, *[specs[i] for i in at])
    except Exception:  # noqa: BLE001  (not linearizable: the notes stand)
        return True
    tangents = traced.jaxpr.invars[len(every) :]
    made = [_reached_from(traced.jaxpr, {t}) for t in tangents]
    for k in outs:
        tangent, out = traced.jaxpr.outvars[k], jaxpr.outvars[k]
        unread = [not isinstance(tangent, C.Var) or tangent not in m for m in made]
        if any(out in reached[v] and u for v, u in zip(ins, unread)):
            return True
    return False


def _inexact(v: Any) -> bool:
    return np.issubdtype(v.aval.dtype, np.inexact)


def _reached(jaxpr: C.Jaxpr, source: Any) -> set[Any]:
    """The vars of ``jaxpr`` computed from ``source`` (and ``source``)."""
    return _reached_from(jaxpr, {source})


def _reached_from(jaxpr: C.Jaxpr, sources: set[Any]) -> set[Any]:
    """The vars of ``jaxpr`` computed from any of ``sources`` (and ``sources``).

    An equation's results are computed from all its operands, except those of calls,
    loops and conditionals, whose bodies say which results (a loop's linearization
    carries every tangent, zeros a rule made included, but reads only some), and a
    ``stop_gradient``'s: what only it passes on has no derivative to drop (a function
    returning ``stop_gradient(h)`` beside its loss)."""
    reached = set(sources)
    for eqn in jaxpr.eqns:
        reads = [isinstance(a, C.Var) and a in reached for a in eqn.invars]
        if any(reads) and eqn.primitive.name != "stop_gradient":
            outs = _results_reached(eqn, reads)
            reached.update(v for v, r in zip(eqn.outvars, outs) if r)
    return reached


def _results_reached(eqn: C.JaxprEqn, reads: list[bool]) -> list[bool]:
    """Which results of ``eqn`` are computed from the operands ``reads`` marks."""
    name = eqn.primitive.name
    every = [True] * len(eqn.outvars)
    if name in C.CALL_PRIMITIVES and name not in C.CUSTOM_RULE_PRIMITIVES:
        body = C.called_jaxpr(eqn).jaxpr
        reached = _reached_from(body, {v for v, r in zip(body.invars, reads) if r})
        return [isinstance(o, C.Var) and o in reached for o in body.outvars]
    if name == "cond":
        if reads[0]:  # the index: every result
            return every
        found = [False] * len(eqn.outvars)
        for b in eqn.params["branches"]:
            reached = _reached_from(b.jaxpr, {v for v, r in zip(b.jaxpr.invars, reads[1:]) if r})
            found = [
                f or (isinstance(o, C.Var) and o in reached) for f, o in zip(found, b.jaxpr.outvars)
            ]
        return found
    if name == "while" and any(reads[: eqn.params["cond_nconsts"]]):
        return every  # what decides the trips
    bodies = _bodies(eqn, reads, every)
    if not bodies:
        return every
    body, _, _, reached = bodies[0]
    found = [isinstance(o, C.Var) and o in reached for o in body.outvars]
    if name == "while":  # what the test reads decides every result
        test = eqn.params["cond_jaxpr"].jaxpr
        carry = test.invars[eqn.params["cond_nconsts"] :]
        decided = _reached_from(test, {v for v, r in zip(carry, found) if r})
        if any(isinstance(o, C.Var) and o in decided for o in test.outvars):
            return every
        # (judged as running at least one trip, where the value a slice or gradient is
        # taken at exists: passing its carry on for no trip, a loop that always runs
        # lost the note of a rule in it that drops every derivative)
        return found
    if eqn.params["length"]:
        return found
    n_consts, n_carry = C.scan_layout(eqn)  # a scan of no iteration passes its carry on
    return [*reads[n_consts : n_consts + n_carry], *[False] * (len(eqn.outvars) - n_carry)]


def _forwarded(body: C.Jaxpr, out: Any) -> int | None:
    """The operand a call body returns as it is at ``out``, or None."""
    if not isinstance(out, C.Var):
        return None
    found = [k for k, v in enumerate(body.invars) if v is out]
    return found[0] if found else None


def _ignores(eqn: C.JaxprEqn, k: int, j: int) -> bool:
    """Whether the call's rule gives result ``j`` a tangent without reading operand
    ``k``'s (traced once, abstractly; a rule that fails to trace is not judged)."""
    invars = [a for a in eqn.invars if isinstance(a, C.Var)]
    unique = list(dict.fromkeys(invars))
    one = C.new_jaxpr([], unique, eqn.outvars, [eqn], "rule")
    position = unique.index(eqn.invars[k])

    def tangent_out(*args: Any) -> Any:
        *ops, t = args

        def only_k(x: Any) -> Any:
            values = list(ops)
            values[position] = x
            return jax.core.eval_jaxpr(one, [], *values)[j]

        return jax.jvp(only_k, (ops[position],), (t,))[1]

    specs = [C.spec_of(v.aval) for v in unique]
    if not np.issubdtype(specs[position].dtype, np.inexact):
        return False
    try:
        traced = C.make_jaxpr(tangent_out, *specs, specs[position])
    except Exception:  # noqa: BLE001  (a rule that refuses tangents fails loudly itself)
        return False
    return not _reads(traced.jaxpr, traced.jaxpr.invars[-1], traced.jaxpr.outvars[0])


def _reads(jaxpr: C.Jaxpr, source: Any, target: Any) -> bool:
    """Whether ``target`` depends on ``source`` in ``jaxpr`` (an equation's results all
    depend on any of its operands)."""
    return isinstance(target, C.Var) and target in _reached(jaxpr, source)


def _note(eqn: C.JaxprEqn) -> str:
    return (
        f"the derivative through the custom_jvp call {C.call_name(eqn)!r} is zero: its "
        "rule ignores the tangent of a value it passes on, which the slice computes from "
        "its inputs. A stop-gradient means that; a rule that differentiates a loop run "
        "before it (equinox's checkpointed while_loop: diffrax's default adjoint) does "
        "not see values inside that loop: differentiate with diffrax.ForwardMode() "
        "there, or cut at the loop's inputs"
    )
