"""The kinds of numbers arguments are: which weak types decided a promotion, which
Python numbers a dtype takes.

JAX types a Python number as a *weakly typed* array: ``x_bf16 * 2.5`` computes in
bfloat16, while ``x_bf16 * jnp.float32(2.5)`` computes in float32. ``jax.jit`` keys its
cache on weak types and traces again; a graph runs the one program it traced. So an
argument traced as a Python number and given as an array of the same dtype (or the
other way round) runs another program than the function would, wherever its weak type
decided a promotion. :func:`weak_type_decides` finds those arguments, so that
:func:`jaxsurgery._trace.same_avals` refuses such a call (a :class:`SliceError`) and
takes any other: ``x_f32 * n`` with ``n`` traced as a Python ``int`` computes in
float32 either way. :func:`holds` says which Python numbers an argument or a slice
input of a dtype takes (an ``int`` where a float was traced, not a ``float`` where an
``int`` was).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxsurgery._promotion import weak_type_decides
    >>> def f(x, s, n):
    ...     return x * s + n
    >>> closed = jax.make_jaxpr(f)(jnp.ones(2, jnp.bfloat16), 2.5, 3)
    >>> weak_type_decides(closed)
    {1: 'bfloat16'}
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C

_CONVERT = "convert_element_type"
#: a Python number of each dtype kind (bool, int, unsigned, float, complex)
_WEAK = {"b": False, "i": 0, "u": 0, "f": 0.0, "c": 0j}


def weak_type_decides(closed: Any) -> dict[int, str]:
    """``{position of a program input: the dtype it was promoted with}`` for inputs
    whose weak type decided a promotion (see the module docstring):

    * a weakly typed input converted to a dtype that a strongly typed one of its
      dtype would not be converted to (``2.5`` with a bfloat16 value: bfloat16);
    * a strongly typed input with which another operand was converted to its dtype,
      where a weakly typed one would not have been (``jnp.float32(2.5)`` with a
      bfloat16 value: float32).
    """
    found: dict[int, str] = {}
    jaxpr = closed.jaxpr
    _walk(jaxpr, {v: k for k, v in enumerate(jaxpr.invars)}, found)
    return found


def _walk(jaxpr: Any, watched: dict[Any, int], found: dict[int, str]) -> None:
    converted: dict[Any, Any] = {}  # var made by a conversion: the dtype converted from
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == _CONVERT:
            converted[eqn.outvars[0]] = eqn.invars[0].aval.dtype
        reads = [(a, watched[a]) for a in eqn.invars if type(a) is not C.Literal and a in watched]
        for a, k in reads:
            aval = a.aval
            if getattr(aval, "weak_type", False):
                new = eqn.params.get("new_dtype") if name == _CONVERT else None
                if new is not None and jnp.promote_types(aval.dtype, new) != new:
                    found.setdefault(k, str(new))
            elif aval.dtype.kind in _WEAK:
                weak = _WEAK[aval.dtype.kind]
                for b in eqn.invars:
                    was = converted.get(b) if type(b) is not C.Literal else None
                    if was is not None and jnp.result_type(weak, was) != aval.dtype:
                        found.setdefault(k, str(aval.dtype))
        if reads:
            for sub, operands in _sub_jaxprs(eqn):
                inner = {
                    v: watched[a]
                    for v, a in zip(sub.invars, operands)
                    if type(a) is not C.Literal and a in watched
                }
                if inner:
                    _walk(sub, inner, found)


def _sub_jaxprs(eqn: Any) -> list[tuple[Any, list[Any]]]:
    """``(jaxpr, the operands its inputs take)`` for the jaxprs an equation runs (a
    call's body, a loop's body and condition, a conditional's branches)."""
    params, invars = eqn.params, list(eqn.invars)
    if eqn.primitive.name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        carry = invars[nc + nb :]
        return [
            (params["cond_jaxpr"].jaxpr, invars[:nc] + carry),
            (params["body_jaxpr"].jaxpr, invars[nc : nc + nb] + carry),
        ]
    out = []
    for value in params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            jaxpr = getattr(sub, "jaxpr", sub)
            if not hasattr(jaxpr, "invars") or not hasattr(jaxpr, "eqns"):
                continue
            if len(jaxpr.invars) == len(invars):  # a call, a scan body
                out.append((jaxpr, invars))
            elif len(jaxpr.invars) == len(invars) - 1:  # a branch: the index first
                out.append((jaxpr, invars[1:]))
    return out


def holds(dtype: Any, value: Any) -> bool:
    """Whether ``dtype`` holds a Python number, bool or weakly typed array of this kind
    (bool < int < float < complex, as JAX promotes them)."""
    kinds = "biufc"
    given = (
        np.asarray(value).dtype.kind
        if isinstance(value, (bool, int, float, complex))
        else (getattr(value, "dtype", np.dtype(object)).kind)
    )
    want = np.dtype(dtype).kind if not jax.dtypes.issubdtype(dtype, jax.dtypes.extended) else "V"
    order = {"b": 0, "i": 1, "u": 1, "f": 2, "c": 3}
    return given in kinds and want in order and order[given] <= order[want]
