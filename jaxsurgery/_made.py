"""The functions a graph makes (slices, ``grads_fn``, ``values_fn``, ``patch_fn``,
``attribution_fn``): named after the traced function and what they compute, as
``jax.jit`` names the programs it compiles by a function's ``__name__`` (compile logs,
profiles and StableHLO read ``jit(loss_grads)``, not ``jit(<unnamed function>)``).

A graph makes one function per computation: ``g.grads_fn("out", ["h"])`` asked again
(the same values, keys and outputs) is the same object (so are ``g.slice(a, b)`` and
``g.as_function()``), so that
``jax.jit(g.grads_fn(...))`` in a training loop compiles once, as JAX caches compiled
programs per function object (made anew, it compiled at every step).

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def loss(w):
    ...     h = jnp.tanh(w)
    ...     return (h ** 2).sum()
    >>> grads = js.trace(loss, jnp.ones(3)).grads_fn("out", ["h"])
    >>> grads.__name__, repr(grads)
    ('loss_grads', '<loss_grads: GradsFunction of loss(w)>')
    >>> grads is js.trace(loss, jnp.ones(3)).grads_fn("out", ["h"])  # another graph
    False
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._copying import Shared

if TYPE_CHECKING:
    from ._graph import Graph


class Made(Shared):
    """A function made from ``self.graph``, computing what ``_kind`` says."""

    graph: Graph
    _kind: str
    #: what it computes, as a key (see :func:`one`)
    _key: Any = None

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return f"{self.graph._function_name}_{self._kind}"

    def __repr__(self) -> str:
        return f"<{self.__name__}: {type(self).__name__} of {self.graph._title}>"


class _SignatureOf:
    """``__signature__``: what ``_signature`` gives (the class itself has none)."""

    def __get__(self, made: Any, owner: type | None = None) -> inspect.Signature | None:
        return None if made is None else made._signature()


class TakesArguments(Made):
    """A function made from a graph called with the traced function's arguments (a
    patch dict first where ``_patches_first``), with their signature: ``jax.jit(fn,
    static_argnames="mode")`` finds ``mode`` by name, as for the traced function."""

    __signature__ = _SignatureOf()
    _patches_first = False

    def _signature(self) -> inspect.Signature | None:
        signature = self.graph._signature
        if signature is None or not self._patches_first:
            return signature
        patches = inspect.Parameter("patches", inspect.Parameter.POSITIONAL_ONLY)
        try:
            return signature.replace(parameters=[patches, *signature.parameters.values()])
        except ValueError:  # a parameter of the function's named `patches`
            return None


M = TypeVar("M", bound=Made)


def one(made: M) -> M:
    """``made``, or the function its graph made before for the same computation (the
    same ``_key``): see the module docstring."""
    return made.graph._made.setdefault((type(made), made._key), made)


def var_keys(vars_: Sequence[Any]) -> tuple:
    """The selected vars, as a key: a loop's value by its template and iteration (a
    ``VirtualVar`` is made anew at each selection)."""
    return tuple(
        (v.index, getattr(v, "template", None), getattr(v, "iteration", None)) for v in vars_
    )


def selection_key(keys: Sequence[str], vars_: Sequence[Any], groups: Any, stacked: Any) -> tuple:
    """What a grouped selection (``_select.grouped``) selects, as a key."""
    return tuple(keys), var_keys(vars_), tuple(map(tuple, groups)), tuple(stacked)
