"""``js.tag``: name a value from inside user code."""

from __future__ import annotations

from typing import TypeVar

import jax
from jax.ad_checkpoint import checkpoint_name

T = TypeVar("T")


def tag(x: T, name: str) -> T:
    """Name ``x`` (an array or a pytree of arrays) in the graph; returns ``x`` unchanged.

    A tag is ``jax.ad_checkpoint.checkpoint_name``, so it also works as a name for
    rematerialization policies and costs nothing when the function is not traced by
    jaxsurgery. A pytree gets one name per leaf, ``name`` plus the leaf's key path.

    Example:
        >>> import jax.numpy as jnp, jaxsurgery as js
        >>> g = js.trace(lambda x: js.tag(jnp.sin(x), "s") * 2, jnp.ones(3))
        >>> g["s"].primitive
        'sin'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"js.tag needs a non-empty string name, got {name!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(x)
    tagged = [checkpoint_name(leaf, name + jax.tree_util.keystr(path)) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, tagged)
