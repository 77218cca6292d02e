"""``js.tag``: name a value from inside user code."""

from __future__ import annotations

from typing import TypeVar

import jax
from jax.ad_checkpoint import checkpoint_name

from ._errors import TraceError

T = TypeVar("T")

#: The start of the names jaxsurgery's marks give values under a transform (see
#: ``_instrument.Recorder._named``): tokens, not names, kept apart from the tags.
MARK_PREFIX = "__js_mark_"


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

    A name that is not a non-empty ``str``, holds a character that selectors read
    (``@`` an iteration, ``#`` a numbered binding, ``*``/``?`` a glob) or starts with
    ``%`` (an index's name), or a leaf that is not an array, is a
    :class:`~jaxsurgery.TraceError` (a ``TypeError``).
    """
    if not isinstance(name, str) or not name.strip():
        raise TraceError(
            f"js.tag needs a non-empty string name, got {type(name).__name__}: {name!r}; "
            "call it as js.tag(value, 'name')"
        )
    reserved = [c for c in "@#*?" if c in name] + (["%"] if name.startswith("%") else [])
    if reserved:
        raise TraceError(
            f"js.tag name {name!r} holds {reserved[0]!r}, which selectors read ('@' an "
            "iteration, '#' a numbered binding, '*' and '?' globs, a leading '%' an index): "
            "pick a name without it"
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(x)  # (None, (): nothing to name)
    for path, leaf in leaves:
        if not (hasattr(leaf, "dtype") or isinstance(leaf, (bool, int, float, complex))):
            where = f" at {jax.tree_util.keystr(path)}" if path else ""
            raise TraceError(
                f"js.tag({name!r}) can only name arrays, got {type(leaf).__name__}{where}: "
                f"{repr(leaf)[:60]}; tag the array values (or pass non-arrays around the tag)"
            )
    tagged = [checkpoint_name(leaf, name + jax.tree_util.keystr(path)) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, tagged)
