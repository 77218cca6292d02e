"""The kinds of numbers arguments are: which weak types decided a promotion, which
Python numbers a dtype takes.

JAX types a Python number as a *weakly typed* array: ``x_bf16 * 2.5`` computes in
bfloat16, while ``x_bf16 * jnp.float32(2.5)`` computes in float32. ``jax.jit`` keys its
cache on weak types and traces again; a graph runs the one program it traced. So an
argument traced as a Python number and given as an array of its dtype runs another
program than the function would, wherever its weak type decided a promotion (also
through values computed from it, ``s * 2.0``, weakly typed too).
:func:`weak_type_decides` finds those arguments, so that
:func:`jaxsurgery._trace.same_avals` refuses such a call (a :class:`SliceError`) and
takes any other: ``x_f32 * n`` with ``n`` traced as a Python ``int`` computes in
float32 either way. The other way round (a Python number where an array was traced) is
taken, as an array of the traced dtype: the jaxpr cannot tell a promotion the array
caused from the user's own cast (``x.astype(jnp.float32) * s``), so the graph computes
as traced. :func:`holds` says which Python numbers an argument or a slice input of a
dtype takes (an ``int`` where a float was traced, not a ``float`` where an ``int`` was).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxsurgery._promotion import weak_type_decides
    >>> def f(x, s, n):
    ...     return x * s + n
    >>> closed = jax.make_jaxpr(f)(jnp.ones(2, jnp.bfloat16), 2.5, 3)
    >>> weak_type_decides(closed)
    {1: [('bfloat16', 'float32', True)]}

A number can reach its promotion through an op that makes a float of an int (``x_bf16 *
(step / 1000)``, ``x + jnp.sqrt(n)``): a strongly typed int array given for it is the
default float there (float32), not an int, which promotes ``x`` to float32: what
:func:`computed_with` works out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from ._errors import SliceError, short_list

_CONVERT = "convert_element_type"


def weak_type_decides(closed: Any) -> dict[int, list[Decision]]:
    """``{position of a program input: [(the dtype it was promoted with, its dtype
    there, whether it is the number itself there)]}`` for weakly typed inputs (Python
    numbers) converted, or a weakly typed value computed from them converted, to a
    dtype a strongly typed one of their dtype would not be converted to (``2.5`` with a
    bfloat16 value: bfloat16, from float32; ``2.5 / 1000``: not the number itself)."""
    found: dict[int, list[Decision]] = {}
    jaxpr = closed.jaxpr
    weak = {v: k for k, v in enumerate(jaxpr.invars) if getattr(v.aval, "weak_type", False)}
    _walk(jaxpr, weak, set(weak), found)
    return found


#: ``(dtype decided, the number's dtype there, whether the number itself is converted)``
Decision = tuple[str, str, bool]


def _walk(jaxpr: Any, watched: dict[Any, int], itself: set[Any], found: dict) -> None:
    """``watched``: weakly typed vars of ``jaxpr``, by the input they come from;
    ``itself``: those that are the input as it is (not computed from it)."""
    for eqn in jaxpr.eqns:
        reads = [watched[a] for a in eqn.invars if type(a) is not C.Literal and a in watched]
        if not reads:
            continue
        if eqn.primitive.name == _CONVERT:
            a = eqn.invars[0]
            new = eqn.params.get("new_dtype")
            if a in watched and new is not None and _promotes(a.aval.dtype, new):
                decision = (jnp.dtype(new).name, jnp.dtype(a.aval.dtype).name, a in itself)
                if decision not in (known := found.setdefault(watched[a], [])):
                    known.append(decision)
        for v in eqn.outvars:  # a weakly typed result: computed from the number alone
            if getattr(v.aval, "weak_type", False):
                watched[v] = reads[0]
        for sub, operands in _sub_jaxprs(eqn):
            inner = {
                v: watched[a]
                for v, a in zip(sub.invars, operands)
                if type(a) is not C.Literal and a in watched
            }
            if inner:
                kept = {v for v, a in zip(sub.invars, operands) if v in inner and a in itself}
                _walk(sub, inner, kept, found)


def _promotes(old: Any, new: Any) -> bool:
    """Whether converting a weakly typed ``old`` to ``new`` may be a promotion with a
    value of dtype ``new`` that a strongly typed ``old`` would not make (``2.5`` with a
    bfloat16 value). A conversion to a lower kind (a float cast to an integer or a
    bool: ``jnp.asarray(p).astype(jnp.int32)``) is an explicit cast: JAX promotes a
    Python number up to the other operand's kind, never down."""
    if jnp.promote_types(old, new) == new:
        return False
    kinds = dtype_kind(old), dtype_kind(new)
    return None in kinds or kinds[1] >= kinds[0]


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


def promoted(given: Any, decided: str) -> str | None:
    """The dtype a strongly typed array of dtype ``given`` computes with where a Python
    number was promoted to ``decided`` (``float32`` with bfloat16: float32, where the
    traced program computes in bfloat16); None where JAX promotes none (a float8, a key)."""
    try:
        return jnp.dtype(jnp.promote_types(given, decided)).name
    except (TypeError, ValueError):  # TypePromotionError is a ValueError
        return None


def guessed(given: Any, traced: Any, decision: Decision) -> bool:
    """Whether :func:`computed_with` takes an int array for a float where the program
    computed a value from a float number before the promotion: ``s / 1000`` makes a
    float32 of it, ``s * 2`` keeps it an int8 (another program than the traced one
    either way, which the jaxpr of the number cannot tell apart)."""
    return _floated(given, traced, decision) == "computed"


def _floated(given: Any, traced: Any, decision: Decision) -> str:
    """Why an array of dtype ``given`` is a float at the decision (``""``: it is not):
    ``"number"`` where the number became a float on the way, ``"computed"`` where a value
    computed from a float number is converted. Not a bool: divided by a Python number,
    it is a weak float, which promotes as the number did (hunt W)."""
    kind = dtype_kind(decision[1]) or 0
    if not 0 < (dtype_kind(given) or 0) < kind:
        return ""
    if (dtype_kind(traced) or 0) < kind:
        return "number"
    return "" if decision[2] else "computed"


def computed_with(given: Any, traced: Any, decision: Decision) -> str | None:
    """The dtype a strongly typed array of dtype ``given`` computes with at a promotion
    a Python number of dtype ``traced`` decided (``decision``, from
    :func:`weak_type_decides`), or None where JAX promotes none: :func:`promoted` of the
    array's dtype there, which is a float where the number became a float on the way
    and the array is an int, as ``jnp`` makes one of it (an int32 step counter given for
    ``step`` in ``x_bf16 * (step / 1000)``: float32, not bfloat16), or where a value
    computed from a float number is converted and the array is an int (``s / 1000``
    makes a float32 of an int8 array; ``x_bf16 * s`` with the number itself keeps it an
    int8, which promotes to bfloat16)."""
    decided, there, _ = decision
    if _floated(given, traced, decision):
        # (JAX's table: a 64-bit int is a float64, a narrower one a float32)
        wide = jnp.dtype(given).itemsize == 8
        made = jax.dtypes.canonicalize_dtype(np.float64 if wide else np.float32)
        given = made if dtype_kind(there) == 2 else jnp.promote_types(made, np.complex64)
    return promoted(given, decided)


def held(x: Any, dtype: Any) -> Any:
    """``x``, an argument a graph keeps to compute values from when they are first asked:
    a NumPy array the caller may write into after tracing (a data loader refilling one
    buffer, weights updated in place) copied, as the traced ``dtype`` (the function saw
    a float64 array as float32 without x64: half the memory), also a read-only view of a
    writeable array (``np.broadcast_to`` of a buffer); a read-only one on memory nothing
    writes through NumPy (a memory map opened for reading) and JAX's arrays, which do not
    change, as they are."""
    base = x
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return np.array(x, dtype=dtype)
        base = base.base
    return x


def alive(args: Sequence[Any], inputs: Sequence[Any]) -> Sequence[Any]:
    """``args`` (arguments a graph or slice computes from, of the graph's ``inputs``), or a
    SliceError naming those deleted: donated to a ``jax.jit`` (``donate_argnums``, as a
    training step donates its parameters), or tracers of a transform that has ended."""
    array, tracer = C.ArrayImpl, jax.core.Tracer
    gone, ended = [], []
    for x, v in zip(args, inputs):
        if type(x) is array:  # (the common case, checked by type: 50k arguments in 3 ms)
            if x.is_deleted():
                gone.append(v.name)
        elif isinstance(x, tracer):
            ended.append(v.name)
        elif getattr(x, "is_deleted", _never)():
            gone.append(v.name)
    if ended and C.outside_transforms():
        raise SliceError(
            f"the argument{'s' if len(ended) > 1 else ''} "
            f"{short_list([repr(n) for n in ended])} this computes from "
            f"{'are tracers' if len(ended) > 1 else 'is a tracer'} of a transform that has "
            "ended (js.trace ran inside jax.jit, jax.vmap or jax.eval_shape, and the graph "
            "is used after it): its values are gone; pass arguments: "
            "g.as_function()(...), g.grads_fn(...)(...), g.values_fn(...)(...), s.bind(...)"
        )
    if gone:
        raise SliceError(
            f"the argument{'s' if len(gone) > 1 else ''} {short_list([repr(n) for n in gone])} "
            f"this computes from {'were' if len(gone) > 1 else 'was'} deleted (donated to a jax.jit with donate_argnums, as a training step "
            "donates its parameters); trace with copies that stay (jax.tree.map(jnp.copy, "
            "params)), or pass the new arguments: s.bind(...), g.grads_fn(...)(...), "
            "g.as_function()(...)"
        )
    return args


def _never() -> bool:
    return False


def refuse_wrapping(what: str, dtype: Any, value: Any) -> None:
    """A SliceError where ``value``, ``what`` for a value of ``dtype`` (``"the patch for
    'k' (int32)"``), is a constant outside its range: cast, an integer would wrap around
    (300 for a uint8 var runs as 44; 2**40 for an int32 one is JAX's OverflowError), a
    finite float become inf (1e6 for a float16 var)."""
    outside = outside_range(dtype, value)
    if outside:
        raise SliceError(
            f"{what}: {outside}; give a value in the range (cast it yourself if that is "
            "what you mean)"
        )


def outside_range(dtype: Any, value: Any) -> str:
    """What of a constant (a Python number, a NumPy or JAX array) lies outside an integer,
    floating or complex ``dtype``'s range and what casting it would do (``""`` if
    nothing): an integer wraps around, a finite float (or a finite part of a complex
    number) becomes inf."""
    kind = dtype_kind(dtype)
    if kind not in (1, 2, 3) or isinstance(value, jax.core.Tracer):
        return ""
    if is_key(getattr(value, "dtype", None)):  # (refused elsewhere: not a number)
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        if kind == 1:  # 2**70 too
            said = out_of_range(dtype, value)
            return said and f"{said}, where it would wrap around"
        try:  # (as an array, 10**50 is one of Python objects, which the check skips)
            value = float(value)
        except OverflowError:  # past float64's range
            return _becomes_inf(dtype, f"a Python int of {len(str(abs(value)))} digits")
    if _within(getattr(value, "dtype", None), dtype):
        return ""  # (nothing of the given dtype is outside: no pass over its values)
    values = np.asarray(value)
    if values.size == 0:
        return ""
    if kind in (2, 3) and dtype_kind(values.dtype) in (1, 2, kind):
        # (bfloat16 too; an int 10**5 is inf as a float16; 1e300 as a complex64)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = values.astype(dtype)
        # where the cast overflows (a value that rounds to the largest finite one is fine)
        over = np.zeros(values.shape, bool)
        for part in (np.real, np.imag) if kind == 3 else (np.real,):
            wide = (part(a).astype(np.float64) for a in (cast, values))
            over |= np.isinf(next(wide)) & np.isfinite(next(wide))
        return _becomes_inf(dtype, values[over].flat[0].item()) if over.any() else ""
    if kind != 1 or not np.issubdtype(values.dtype, np.integer):
        return ""
    for end in (int(values.min()), int(values.max())):
        said = out_of_range(dtype, end)
        if said:
            return f"{said}, where it would wrap around"
    return ""


def _becomes_inf(dtype: Any, x: Any) -> str:
    """Says that ``x`` (a number, or what to call it), outside a floating or complex
    ``dtype``'s range, becomes inf."""
    top = float(jnp.finfo(dtype).max)
    shown = x if isinstance(x, str) else repr(x)
    each = " (each part)" if dtype_kind(dtype) == 3 else ""
    return (
        f"{shown} is outside {jnp.dtype(dtype).name}'s range{each}, -{top!r} .. {top!r}, "
        "where it would become inf"
    )


def _within(given: Any, dtype: Any) -> bool:
    """Whether every value of dtype ``given`` (None: not an array) is one ``dtype`` holds
    without wrapping around or becoming inf (a float32 patch of a float32 var)."""
    if given is None or is_key(given) or dtype_kind(given) not in (1, 2, 3):
        return False
    if dtype_kind(given) == 3 and dtype_kind(dtype) != 3:
        return False
    if dtype_kind(dtype) == 1:
        if dtype_kind(given) != 1:
            return False
        a, b = jnp.iinfo(given), jnp.iinfo(dtype)
        return b.min <= a.min and a.max <= b.max
    top = jnp.finfo(given).max if dtype_kind(given) in (2, 3) else jnp.iinfo(given).max
    return float(top) <= float(jnp.finfo(dtype).max)


def returned(x: Any) -> Any:
    """``x``, a value jaxsurgery hands out, as a JAX array where it is a NumPy array (a
    constant the function closes over, an argument given as one): the graph's own, or
    the caller's, would be written in place (``g.value("mask")[...] = 0`` changed what
    the graph computed after, and the caller's global; a ``values_fn`` of an argument
    gave back the caller's array)."""
    return jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x


def deleted(x: Any) -> bool:
    """Whether ``x``, an argument, is an array deleted (donated to a ``jax.jit``)."""
    if type(x) is C.ArrayImpl:
        return x.is_deleted()
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_deleted", _never)()


def as_traced(x: Any, dtype: Any) -> Any:
    """``x``, an argument, as the traced program takes it: of ``dtype``, the dtype JAX
    made of it (a NumPy float64 array or an int64 is float32 or int32 to JAX without
    x64), a Python number weakly typed as ``jax.jit`` takes it (``s * v_bf16`` stays
    bfloat16): the values of the inputs are what the function saw, not what the caller
    passed."""
    if hasattr(x, "dtype") and x.dtype == dtype:  # (np.dtype(None) is float64)
        return x
    if isinstance(x, (bool, int, float, complex)):
        weak = jnp.asarray(x)
        # (an int for a float traced: weakly typed too, as jax.jit takes it)
        return weak if weak.dtype == dtype else C.weak_cast(weak, dtype)
    if getattr(getattr(x, "aval", None), "weak_type", False):  # (one under jax.jit)
        return C.weak_cast(x, dtype)
    return jnp.asarray(x, dtype)


def holds(dtype: Any, value: Any) -> bool:
    """Whether ``dtype`` holds a Python number, bool or array of this kind (bool < int <
    float < complex, as JAX promotes them; bfloat16 and float8 are floats too), and a
    Python int for an integer dtype within its range."""
    given = next((k for t, k in _PYTHON_KINDS if isinstance(value, t)), None)  # IntEnum too
    if given is None or hasattr(value, "dtype"):  # NumPy scalars: by their dtype
        given = dtype_kind(getattr(value, "dtype", None))
    want = dtype_kind(dtype)
    if given == 1 == want and isinstance(value, int) and not hasattr(value, "dtype"):
        return not out_of_range(dtype, value)  # a Python int: also its range (300: no uint8)
    return given is not None and want is not None and given <= want


_PYTHON_KINDS = ((bool, 0), (int, 1), (float, 2), (complex, 3))  # bool before int
_KINDS = ((jnp.bool_, 0), (jnp.integer, 1), (jnp.floating, 2), (jnp.complexfloating, 3))


def a_or_an(word: str) -> str:
    """``word`` with its article: ``a float32``, ``an int32``, ``a uint8``."""
    return f"{'an' if word[:1] in 'aeio' else 'a'} {word}"


def is_key(dtype: Any) -> bool:
    """Whether ``dtype`` is a typed PRNG key's (``jax.random.key``); None, a Python
    number's, is not."""
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def not_a_key(dtype: Any) -> str:
    """The fix a message gives for a typed key where a value of ``dtype`` was traced: a
    raw key (``jax.random.PRNGKey``) is integer data, which ``jax.random.key_data``
    gives of a typed key."""
    data = " (jax.random.key_data(key) is a key's data)" if dtype_kind(dtype) == 1 else ""
    return f"give {a_or_an(jnp.dtype(dtype).name)} value, not a key{data}"


def dtype_kind(dtype: Any) -> int | None:
    """0 bool, 1 integer, 2 floating, 3 complex; None for anything else (a key)."""
    if dtype is None or is_key(dtype):
        return None
    return next((k for t, k in _KINDS if jnp.issubdtype(dtype, t)), None)


def out_of_range(dtype: Any, value: Any) -> str:
    """``"300 is outside uint8's range, 0 .. 255"`` for a Python int an integer dtype
    does not hold, else ``""``."""
    if isinstance(value, int) and not isinstance(value, bool) and dtype_kind(dtype) == 1:
        info = jnp.iinfo(dtype)
        if not info.min <= value <= info.max:
            return f"{value} is outside {jnp.dtype(dtype).name}'s range, {info.min} .. {info.max}"
    return ""
