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
    """Notes for the ``custom_jvp`` calls of ``jaxpr`` (top level, and inside calls)
    whose rule ignores the tangent of an operand they return as it is, when that
    operand is computed from ``inputs``."""
    notes: list[str] = []
    _walk(jaxpr, set(inputs), notes)
    return list(dict.fromkeys(notes))


def _walk(jaxpr: C.Jaxpr, dependent: set[Any], notes: list[str]) -> None:
    for eqn in jaxpr.eqns:
        reads = [isinstance(a, C.Var) and a in dependent for a in eqn.invars]
        if not any(reads):
            continue
        name = eqn.primitive.name
        if name == "custom_jvp_call":
            body = C.called_jaxpr(eqn).jaxpr
            for j, out in enumerate(body.outvars):
                k = _forwarded(body, out)
                if k is not None and reads[k] and _ignores(eqn, k, j):
                    notes.append(_note(eqn))
        elif name in C.CALL_PRIMITIVES and name not in C.CUSTOM_RULE_PRIMITIVES:
            body = C.called_jaxpr(eqn).jaxpr
            _walk(body, {v for v, r in zip(body.invars, reads) if r}, notes)
        dependent.update(v for v in eqn.outvars if not isinstance(v, C.DropVar))


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

    specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in unique]
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
    if not isinstance(target, C.Var):
        return False
    reached = {source}
    for eqn in jaxpr.eqns:
        if any(isinstance(a, C.Var) and a in reached for a in eqn.invars):
            reached.update(eqn.outvars)
    return target in reached


def _note(eqn: C.JaxprEqn) -> str:
    return (
        f"the derivative through the custom_jvp call {C.call_name(eqn)!r} is zero: its "
        "rule ignores the tangent of a value it passes on, which the slice computes from "
        "its inputs. A stop-gradient means that; a rule that differentiates a loop run "
        "before it (equinox's checkpointed while_loop: diffrax's default adjoint) does "
        "not see values inside that loop: use diffrax.ForwardMode() or "
        "diffrax.DirectAdjoint() there, or cut at the loop's inputs"
    )
