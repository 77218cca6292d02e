"""js.trace against jax.make_jaxpr on a model that calls one ``@jax.jit`` layer D times.

JAX traces a jitted function once per argument shapes and reuses the jaxpr for the
other calls; js.trace must too (its rewritten layer is cached per function object), or
it re-traces the layer at every call. Each run makes a fresh model and layer, as
bench_trace does, so both sides trace the layer once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from common import interleaved_times

import jaxsurgery as js

#: layer calls per model: the issue's 24, and more to show that the cost is per call
DEPTHS = (24, 96, 384)


def jit_layer_mlp(depth: int) -> Callable:
    """A fresh MLP function calling a fresh ``@jax.jit`` layer ``depth`` times."""

    @jax.jit
    def layer(p, x):
        pre = x @ p["w"] + p["b"]
        return jnp.tanh(pre)

    def mlp(x, params):
        h = x
        for p in params:
            h = layer(p, h)
        return h.sum()

    return mlp


def jit_layer_args(depth: int) -> tuple:
    p = {"w": jnp.ones((16, 16)) * 0.1, "b": jnp.zeros(16)}
    return jnp.ones((4, 16)), [p] * depth


def run(quick: bool = False) -> list[dict]:
    rows = []
    for depth in DEPTHS[: 2 if quick else 3]:
        args = jit_layer_args(depth)
        n = len(jax.make_jaxpr(jit_layer_mlp(depth))(*args).jaxpr.eqns)
        times = interleaved_times(
            {
                # a fresh model and layer each run (JAX caches traces per function
                # object); the arguments are made once, outside the timing
                "make_jaxpr": lambda d=depth, a=args: jax.make_jaxpr(jit_layer_mlp(d))(*a),
                "js.trace": lambda d=depth, a=args: js.trace(jit_layer_mlp(d), *a),
            },
            repeat=15 if depth < 300 else 7,
        )
        baseline, ours = times.best["make_jaxpr"], times.best["js.trace"]
        ratio = times.best_ratio("js.trace", "make_jaxpr")
        rows.append(
            {
                "layer calls": depth,
                "equations": n,
                "make_jaxpr s": baseline,
                "js.trace s": ours,
                "ratio": ratio,
                "target": "≤ 1.3",
            }
        )
        print(
            f"  jit layers {depth:4d} calls ({n} eqns): make_jaxpr {baseline * 1e3:.2f}ms,"
            f" js.trace {ours * 1e3:.2f}ms, ratio {ratio:.2f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    run()
