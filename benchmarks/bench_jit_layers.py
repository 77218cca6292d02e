"""js.trace against jax.make_jaxpr on a model that calls one ``@jax.jit`` layer D times.

JAX traces a jitted function once per argument shapes and reuses the jaxpr for the
other calls; js.trace must too (its rewritten layer is cached per function object), or
it re-traces the layer at every call. Each run makes a fresh model and layer, as
bench_trace does, so both sides trace the layer once.

The graph indexes every call's copy of the layer's values (``layer#5/pre``), which
make_jaxpr's jaxpr holds once: a second baseline, make_jaxpr of the same model with
the layer not jitted (the program the index covers, D copies of the layer's
equations), shows what that costs apart from the instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from common import interleaved_times

import jaxsurgery as js

#: layer calls per model: the issue's 24, and more to show that the cost is per call
DEPTHS = (24, 96, 384)


def jit_layer_mlp(depth: int, jit: bool = True) -> Callable:
    """A fresh MLP function calling a fresh ``@jax.jit`` layer ``depth`` times
    (``jit=False``: the same layer, not jitted)."""

    def layer(p, x):
        pre = x @ p["w"] + p["b"]
        return jnp.tanh(pre)

    if jit:
        layer = jax.jit(layer)

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
        n_flat = len(jax.make_jaxpr(jit_layer_mlp(depth, jit=False))(*args).jaxpr.eqns)
        times = interleaved_times(
            {
                # a fresh model and layer each run (JAX caches traces per function
                # object); the arguments are made once, outside the timing
                "make_jaxpr": lambda d=depth, a=args: jax.make_jaxpr(jit_layer_mlp(d))(*a),
                "js.trace": lambda d=depth, a=args: js.trace(jit_layer_mlp(d), *a),
                "make_jaxpr, layer not jitted": lambda d=depth, a=args: jax.make_jaxpr(
                    jit_layer_mlp(d, jit=False)
                )(*a),
            },
            repeat=15 if depth < 300 else 7,
        )
        baseline, ours = times.best["make_jaxpr"], times.best["js.trace"]
        ratio = times.best_ratio("js.trace", "make_jaxpr")
        inlined = times.best_ratio("js.trace", "make_jaxpr, layer not jitted")
        rows.append(
            {
                "layer calls": depth,
                "equations": n,
                "make_jaxpr s": baseline,
                "js.trace s": ours,
                "ratio": ratio,
                "target": "≤ 1.3",
                "indexed equations": n_flat,
                "ratio to make_jaxpr, layer not jitted": inlined,
            }
        )
        print(
            f"  jit layers {depth:4d} calls ({n} eqns): make_jaxpr {baseline * 1e3:.2f}ms,"
            f" js.trace {ours * 1e3:.2f}ms, ratio {ratio:.2f} ({inlined:.2f} to the"
            f" layer not jitted, {n_flat} eqns)",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    run()
