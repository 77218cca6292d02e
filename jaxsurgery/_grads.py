"""One-pass gradients of many intermediates: ``g.grads`` and ``g.grads_fn``.

The program is spliced (:mod:`jaxsurgery._patch`) so that each chosen var ``v`` is
replaced by ``v + eps_v`` for new inputs ``eps_v``; one ``jax.grad`` with respect to all
``eps`` at zero gives every ``d(sum of out)/dv`` in a single backward pass: the
zero-perturbation trick, applied to all vars at once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from . import _compat as C
from . import _select
from ._errors import SliceError
from ._patch import Edit, Extra, splice

if TYPE_CHECKING:
    from ._graph import Graph


@functools.lru_cache(maxsize=256)
def _add_jaxpr(shape: tuple[int, ...], dtype: Any) -> C.ClosedJaxpr:
    spec = jax.ShapeDtypeStruct(shape, dtype)
    return C.make_jaxpr(lambda v, eps: v + eps, spec, spec)


class GradsFunction:
    """``fn(*args, **kwargs) -> {name: d(sum of out)/d(var)}``, traceable and jittable."""

    def __init__(self, graph: Graph, out: Any, wrt: Any):
        self.graph = graph
        _, out_vars = _select.tree(graph, out)
        if isinstance(wrt, dict):
            keys = list(wrt)
            wrt_vars = [_select.one(graph, wrt[k]) for k in keys]
        else:
            _, wrt_vars = _select.tree(graph, wrt)
            keys = [v.name for v in wrt_vars]
        for v in [*out_vars, *wrt_vars]:
            if not jnp.issubdtype(v.dtype, jnp.inexact):
                raise SliceError(
                    f"cannot differentiate {v.name!r} ({v.dtype}): gradients need "
                    "floating-point vars; pick a float var or cast it in your function"
                )
        self.keys = keys
        edits = [
            Edit(v.index, _add_jaxpr(v.shape, v.dtype), (v.index, Extra(k)))
            for k, v in enumerate(wrt_vars)
        ]
        self._program, var_map, patched = splice(graph._program, edits, [v.aval for v in wrt_vars])
        self._targets = [patched.get(v.index, var_map[v.index]) for v in out_vars]
        self._avals = [v.aval for v in wrt_vars]

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.at_flat(self.graph._flatten_args(*args, **kwargs))

    def at_flat(self, flat_args: Sequence[Any]) -> dict[str, Any]:
        def total(eps: list[Any]) -> Any:
            outs = self._program.evaluate(self._targets, [*flat_args, *eps])
            return sum(jnp.sum(o) for o in outs)

        zeros = [jnp.zeros(a.shape, a.dtype) for a in self._avals]
        return dict(zip(self.keys, jax.grad(total)(zeros)))
