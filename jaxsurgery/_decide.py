"""What decides a ``cond`` at trace time, computed compiled where that decides as an
eager call would.

Tracing inlines the branch a ``cond`` takes for the traced arguments, so the values its
predicate reads are computed while the index is built. Op by op (as an eager call of
the function runs them) each primitive and shape compiles once per process: a first
trace of a Flax NNX loss ending in a ``cond`` took 3.8 s in 89 op compiles, against
0.02 s for ``jax.make_jaxpr``. Compiled whole they take one compile, but XLA computes
some values otherwise than op by op (jax 0.10 rewrites ``a / exp(b)`` as
``a * exp(-b)``): at its threshold a predicate can come out the other way.

So the equations run compiled, and their result is taken only where rounding cannot
have decided anything: every comparison of floats among them (``lt``, ``gt``, ``eq``...)
must have its operands apart by more than ``MARGIN`` ulps of the largest finite
magnitude the equations compute, and no other equation may turn floats into a
decision (``floor``, ``argmax``, a cast to an integer: no margin tells those). Anything
else (a tie, a NaN, a value at its threshold) runs op by op, as before.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxsurgery._decide import decidable
    >>> closed = jax.make_jaxpr(lambda x: jnp.sum(jnp.tanh(x)) > 0.5)(jnp.ones(3))
    >>> decidable(closed.jaxpr)  # one comparison of floats, its margin checked
    True
    >>> decidable(jax.make_jaxpr(lambda x: jnp.argmax(x))(jnp.ones(3)).jaxpr)
    False
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C

#: how far apart (in ulps of the largest magnitude computed) the operands of every
#: float comparison must be for the compiled result to decide as op by op would
MARGIN = 1024
#: how many equations are worth one compile (fewer: op by op; more: compiling them
#: whole costs more than running them)
AT_LEAST, AT_MOST = 4, 2_000

_COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
#: equations whose rounding may cancel what they add (their magnitudes set the margin)
_CANCELLING = frozenset(
    {"add", "sub", "add_any", "reduce_sum", "dot_general", "cumsum", "conv_general_dilated"}
)
#: float to float, but not continuous: a rounding apart can move the result by a step
_STEPS = frozenset({"floor", "ceil", "round", "sign", "rem", "nextafter"})


def _inexact(atom: Any) -> bool:
    dtype = getattr(atom.aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _checks(jaxpr: C.Jaxpr) -> list[tuple[Any, Any]] | None:
    """The operands of the float comparisons whose margins decide, or None when an
    equation decides in a way no margin tells (or has effects, or a sub-program)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.effects or any(isinstance(p, (C.Jaxpr, C.ClosedJaxpr)) for p in eqn.params.values()):
            return None
        name = eqn.primitive.name
        if not any(_inexact(a) for a in eqn.invars):
            continue  # integers and booleans compute exactly either way
        if name in _STEPS:
            return None
        if all(_inexact(v) for v in eqn.outvars):
            continue  # a float value: its rounding is what the margins allow for
        if name not in _COMPARISONS:
            return None  # argmax, a cast to an integer, is_finite...
        a, b = eqn.invars
        if a is not b:  # x != x (isnan) is exact
            found.append((a, b))
    return found


def decidable(jaxpr: C.Jaxpr) -> bool:
    """Whether :func:`evaluate` may take ``jaxpr``'s compiled result (margins allowing)."""
    return _checks(jaxpr) is not None


def evaluate(eqns: Sequence[Any], env: dict) -> bool:
    """Run straight-line ``eqns`` compiled, reading what they need from ``env`` and
    writing what they make into it, if they decide as op by op would; False (``env``
    as it was) where they may not: run them op by op."""
    if not AT_LEAST <= len(eqns) <= AT_MOST:
        return False
    inside = {v for e in eqns for v in e.outvars}
    ins = list(
        dict.fromkeys(a for e in eqns for a in e.invars if isinstance(a, C.Var) and a not in inside)
    )
    # every value made, kept for later decisions (a while_loop's trips, each a cond:
    # their equations print alike, one compile for all, reading the trip before)
    outs = [v for e in eqns for v in e.outvars if not isinstance(v, C.DropVar)]
    jaxpr = C.new_jaxpr([], ins, outs, list(eqns))
    checks = _checks(jaxpr)
    if checks is None:
        return False
    from ._structured import argument_types, unprinted

    args = [env[a] for a in ins]
    try:
        key = (str(jaxpr), tuple(unprinted(jaxpr)), argument_types(args))
        run = _COMPILED.get(key)
        if run is None:
            if len(_COMPILED) > 256:
                _COMPILED.clear()
            run = _COMPILED[key] = jax.jit(functools.partial(_margined, jaxpr, checks))
        values, clear = run(*args)
    except Exception:  # noqa: BLE001 (op by op says what fails)
        return False
    if not bool(clear):
        return False
    env.update(zip(outs, values))
    return True


#: compiled evaluations, by the text of their jaxpr and the types of their arguments
_COMPILED: dict[tuple, Any] = {}


def _margined(jaxpr: C.Jaxpr, checks: list[tuple[Any, Any]], *args: Any) -> tuple:
    """``(values of the jaxpr's results, whether every comparison's operands are apart
    by the margin)``. The margin is in ulps of the largest magnitude an equation that
    may cancel (a sum, a difference, a dot) reads or makes, or a comparison reads:
    rounding there is what moves a value the most."""
    env: dict[Any, Any] = dict(zip(jaxpr.invars, args))

    def read(a: Any) -> Any:
        return a.val if isinstance(a, C.Literal) else env[a]

    sizes = []  # (flattened, as one max: a reduction each costs compile time)

    def measure(x: Any) -> None:
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and np.size(x):
            sizes.append(jnp.abs(jnp.ravel(jnp.asarray(x))).astype(jnp.float32))

    for x in args:
        measure(x)
    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
        if checks and eqn.primitive.name in _CANCELLING:
            for x in outs:  # (what it reads is an input or what another made)
                measure(x)
    values = [read(a) for a in jaxpr.outvars]
    pairs = [(read(a), read(b)) for a, b in checks]
    for x, y in pairs:
        measure(x)
        measure(y)
    clear = jnp.asarray(True)
    if pairs:
        every = jnp.concatenate(sizes) if sizes else jnp.zeros(1, jnp.float32)
        magnitude = jnp.max(jnp.where(jnp.isfinite(every), every, 0.0))
        for x, y in pairs:
            eps = jnp.finfo(jnp.result_type(x, y)).eps
            gap = jnp.abs(jnp.asarray(x) - jnp.asarray(y)).astype(jnp.float32)
            clear = clear & jnp.all(gap > MARGIN * eps * magnitude)  # (a NaN is never apart)
    return values, clear
