"""Copies and pickles of what jaxsurgery returns.

Graphs, vars, slices and the functions made from them hold a traced program (JAX's
jaxprs, with their source tracebacks), and none of them is ever mutated: an edit
makes a new graph. So ``copy.copy`` and ``copy.deepcopy`` give an equivalent object
that shares the traced program (a graph or a var is its own copy: vars compare by
identity, and a graph's vars belong to it), and pickling one is a ``TypeError``
saying what to save instead, where JAX's own error would name a traceback object.

Example:
    >>> import copy, pickle, jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     h = jnp.sin(x)
    ...     return h * 2.0
    >>> g = js.trace(f, jnp.ones(3))
    >>> copy.deepcopy({"graph": g})["graph"] is g
    True
    >>> try:
    ...     pickle.dumps(g.slice("h", "out"))
    ... except TypeError as e:
    ...     print(str(e)[:56])
    cannot pickle a jaxsurgery Slice: it holds a traced JAX
"""

from __future__ import annotations

from typing import Any, NoReturn


class Shared:
    """Mixin: a shallow ``copy.copy``, ``copy.deepcopy`` the object itself, no pickle."""

    __slots__ = ()  # (a Var keeps its own slots and no __dict__)

    def __copy__(self) -> Any:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> Any:
        return self  # never mutated: what it shares cannot change under the copy

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        refuse_pickle(self)


class Identical(Shared):
    """A :class:`Shared` object whose every copy is itself (compared by identity)."""

    __slots__ = ()

    def __copy__(self) -> Any:
        return self


def refuse_pickle(obj: Any) -> NoReturn:
    """The ``TypeError`` pickling ``obj`` (anything jaxsurgery returns) is."""
    raise TypeError(
        f"cannot pickle a jaxsurgery {type(obj).__name__}: it holds a traced JAX program "
        "(jaxprs), which JAX does not pickle. Pickle the function and its arguments and "
        "call js.trace again where you load them; to save a slice's computation, "
        "s.export().serialize() gives bytes that jax.export.deserialize loads"
    )
