"""The exceptions a user can see, and the helpers that word their messages.

Every message names the culprit, says what was expected and ends with a fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


class TraceError(SurgeryError, TypeError):
    """``js.trace`` was given something it cannot trace (a non-array argument, ...)."""


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
    """``"; did you mean 'a' or 'b'?"`` or ``""`` when nothing is close."""
    matches = close_matches(word, candidates)
    if not matches:
        return ""
    quoted = [repr(m) for m in matches]
    if len(quoted) > 1:
        quoted = [", ".join(quoted[:-1]), quoted[-1]]
    return "; did you mean " + " or ".join(quoted) + "?"


def short_list(items: Iterable[str], limit: int = 6) -> str:
    """``"a, b, c"``, cut with ``"... (+k more)"`` past ``limit`` items."""
    items = list(items)
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head}, ... (+{len(items) - limit} more)"
