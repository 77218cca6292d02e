"""The functions a graph makes (slices, ``grads_fn``, ``values_fn``, ``patch_fn``,
``attribution_fn``): named after the traced function and what they compute, as
``jax.jit`` names the programs it compiles by a function's ``__name__`` (compile logs,
profiles and StableHLO read ``jit(loss_grads)``, not ``jit(<unnamed function>)``).

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def loss(w):
    ...     h = jnp.tanh(w)
    ...     return (h ** 2).sum()
    >>> grads = js.trace(loss, jnp.ones(3)).grads_fn("out", ["h"])
    >>> grads.__name__, repr(grads)
    ('loss_grads', '<loss_grads: GradsFunction of loss(w)>')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._copying import Shared

if TYPE_CHECKING:
    from ._graph import Graph


class Made(Shared):
    """A function made from ``self.graph``, computing what ``_kind`` says."""

    graph: Graph
    _kind: str

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return f"{self.graph._function_name}_{self._kind}"

    def __repr__(self) -> str:
        return f"<{self.__name__}: {type(self).__name__} of {self.graph._title}>"
