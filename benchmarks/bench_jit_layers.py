"""js.trace against jax.make_jaxpr on a model that calls one ``@jax.jit`` layer D times.

JAX traces a jitted function once per argument shapes and reuses the jaxpr for the
other calls; js.trace must too (its rewritten layer is cached per function object), or
it re-traces the layer at every call. Each run makes a fresh model and layer, as
bench_trace does, so both sides trace the layer once.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

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


def collected_times(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each function, round-robin, collecting garbage untimed after
    each call (js.trace pauses the cyclic collector, so the garbage of one run would
    otherwise be collected inside the next one's timing)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
            gc.collect()
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(quick: bool = False) -> list[dict]:
    rows = []
    for depth in DEPTHS[: 2 if quick else 3]:
        args = jit_layer_args(depth)
        n = len(jax.make_jaxpr(jit_layer_mlp(depth))(*args).jaxpr.eqns)
        times = collected_times(
            {
                # a fresh model and layer each run (JAX caches traces per function
                # object); the arguments are made once, outside the timing
                "make_jaxpr": lambda d=depth, a=args: jax.make_jaxpr(jit_layer_mlp(d))(*a),
                "js.trace": lambda d=depth, a=args: js.trace(jit_layer_mlp(d), *a),
            },
            repeat=15 if depth < 300 else 7,
        )
        baseline, ours = times["make_jaxpr"], times["js.trace"]
        rows.append(
            {
                "layer calls": depth,
                "equations": n,
                "make_jaxpr s": baseline,
                "js.trace s": ours,
                "ratio": ours / baseline,
                "target": "≤ 1.3",
            }
        )
        print(
            f"  jit layers {depth:4d} calls ({n} eqns): make_jaxpr {baseline * 1e3:.2f}ms,"
            f" js.trace {ours * 1e3:.2f}ms, ratio {ours / baseline:.2f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    run()
