"""The exceptions a user can see, and the helpers that word their messages.

Every message names the culprit, says what was expected and ends with a fix.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence


class SurgeryError(Exception):
    """Base class of every error jaxsurgery raises on purpose."""


class SelectionError(SurgeryError, LookupError):
    """A selector matched nothing, or several vars where one was needed.

    Example:
        >>> import jax.numpy as jnp, jaxsurgery as js
        >>> g = js.trace(lambda x: jnp.sin(x), jnp.ones(2))
        >>> try:
        ...     g["xx"]
        ... except js.SelectionError as e:
        ...     print(e)
        no var named 'xx'; did you mean 'x'? (g.names() lists all)
    """

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else ""


class SliceError(SurgeryError, ValueError):
    """A slice cannot be built or called as asked."""


#: packages whose frames a warning skips to reach the user's line
_INTERNAL = frozenset({"jaxsurgery", "jax", "jaxlib"})


def warn(message: str) -> None:
    """``warnings.warn(message)``, shown at the user's line: the first frame outside
    jaxsurgery and JAX (a call through ``Graph``'s methods, their traceback filter, or
    ``jax.jit`` tracing a function jaxsurgery returned).
    A stack level counted by hand breaks as soon as a call goes through one more layer.
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level if frame is not None else 2)


@contextlib.contextmanager
def jax_derivative_refusals(fix: str = "") -> Iterator[None]:
    """JAX refusing a derivative of what runs inside, as a SliceError saying what to
    do: reverse mode through a ``while_loop`` (``fix``: one more way out), or any
    derivative through an ``io_callback`` (inside a jitted call or a loop, where a
    slice's own check does not look)."""
    try:
        yield
    except ValueError as e:
        if "IO callbacks do not support" in str(e):
            raise SliceError(
                "the derivative reaches an io_callback that reads a value it perturbs, "
                "and JAX differentiates no io_callback (jax.grad of your function fails "
                "the same way); log with jax.debug.callback, which derivatives pass "
                "through, or ask for values the io_callback does not read"
            ) from None
        if "while_loop" not in str(e):
            raise
        raise SliceError(
            "the gradients cross a while_loop, and JAX has no reverse mode for it "
            "(jax.grad of your function fails the same way, unless a custom_vjp rule "
            "around the loop stands in for it: a value inside that call is differentiated "
            "through the call's body, loop included); use g.jvp / "
            f"jax.jvp of a slice, or a fori_loop with static bounds (a scan){fix}"
        ) from None


class TraceError(SurgeryError, TypeError):
    """``js.trace`` was given something it cannot trace (a non-array argument, ...),
    or ``js.tag`` a name that is not a non-empty string or a value that is not arrays."""


def type_of(var: object) -> str:
    """``float32[4]``: a var's type as messages write it."""
    return f"{var.dtype}{list(var.shape)}"  # type: ignore[attr-defined]


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The few candidates closest to ``word``, best first.

    On large graphs only names of about the same length are compared, so a typo in a
    100k-var graph is answered in milliseconds.
    """
    pool = [c for c in candidates if abs(len(c) - len(word)) <= max(3, len(word) // 2)]
    return difflib.get_close_matches(word, pool[:20_000], n=n, cutoff=0.5)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'a' or 'b'?"`` or ``""`` when nothing is close; a candidate
    that ends with ``/word`` (the path left out) or ``.word`` (``eqx.nn.Linear#1`` for
    ``Linear#1``) is closest."""
    candidates = list(candidates)
    suffixed = [c for c in candidates if c.endswith((f"/{word}", f".{word}"))]
    matches = list(dict.fromkeys([*suffixed, *close_matches(word, candidates)]))[:3]
    if not matches:
        return ""
    quoted = [repr(m) for m in matches]
    if len(quoted) > 1:
        quoted = [", ".join(quoted[:-1]), quoted[-1]]
    return "; did you mean " + " or ".join(quoted) + "?"


def short_repr(value: object) -> str:
    """``repr(value)``, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def short_list(items: Iterable[str], limit: int = 6) -> str:
    """``"a, b, c"``, cut with ``"... (+k more)"`` past ``limit`` items."""
    items = list(items)
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head}, ... (+{len(items) - limit} more)"


def check_like(values: object, treedef: object, vars_: Sequence, what: str, role: str) -> list:
    """Flat ``values`` checked to be ``what`` (tangents, cotangents) of ``vars_``.

    ``values`` must have the structure ``treedef`` and each leaf the var's shape and
    tangent dtype (the var's own for floats, ``float0`` for integers and bools);
    Python scalars the dtype holds (``_promotion.holds``: not ``1j`` for float32) and
    NumPy arrays of a dtype JAX canonicalizes to it are converted.
    A mismatch is a SliceError naming the ``role`` var (``input 'z1'``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import _compat as C
    from ._promotion import holds

    leaves, tree = jax.tree_util.tree_flatten(values)
    names = short_list(v.name for v in vars_)
    if tree != treedef:
        raise SliceError(
            f"the {what}s must be structured like the {role}s ({names}): {treedef}, got "
            f"{tree}; pass one {what} per {role}, in the selectors' structure"
        )
    checked = []
    for x, v in zip(leaves, vars_):
        C.refuses_x64(x, v.dtype, f"the {what} for {role} {v.name!r}")
        is_float = jnp.issubdtype(v.dtype, jnp.inexact)
        want = v.dtype if is_float else jax.dtypes.float0
        dtype = getattr(x, "dtype", None)
        number = isinstance(x, (bool, int, float, complex))
        if dtype is None and number and is_float and holds(want, x):
            x, dtype = jnp.asarray(x, want), want
        shape = tuple(np.shape(x)) if dtype is not None else None
        same = dtype == want
        if not same and is_float and dtype is not None:
            try:
                same = jax.dtypes.canonicalize_dtype(np.dtype(dtype)) == want
            except TypeError:
                same = False
            if same:
                x = jnp.asarray(x, want)
        if shape != v.shape or not same:

            def name(d: object) -> str:
                return "float0" if d == jax.dtypes.float0 else np.dtype(d).name

            if dtype is not None:
                got = f"{name(dtype)}{list(shape)}"
            else:
                got = f"a Python {type(x).__name__}" if number else type(x).__name__
            expected = f"{name(want)}{list(v.shape)}"
            fix = (
                f"pass a {what} shaped like g.value({v.name!r})"
                if is_float
                else f"an integer or bool {role} takes np.zeros({v.shape}, jax.dtypes.float0)"
            )
            raise SliceError(
                f"the {what} for {role} {v.name!r} must be {expected}, got {got}; {fix}"
            )
        checked.append(x)
    return checked
