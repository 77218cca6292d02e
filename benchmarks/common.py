"""Timing helpers and the programs the benchmarks trace (each made fresh per run)."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (results blocked until ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def once(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` (blocked until ready) and its wall time in seconds, the garbage of what
    ran before collected first, untimed (js.trace pauses the collector: its garbage
    would be collected inside the next timing, a compile's or a value's)."""
    gc.collect()
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


class Times(dict):
    """The median time of each function (seconds), every round behind it (``runs``),
    and the best run (``best``).

    Two ways to compare, for two kinds of work (both measured on the 2-core machine):

    * compiled programs (XLA runs them on both cores, so a run is fast or slow with the
      rest of the machine): :meth:`ratio`, the median over rounds of the two runs of one
      round. Two programs with identical optimized HLO read 0.86×–1.16× as a ratio of
      best runs over four measurements under load, and 1.02×–1.06× paired; their best
      runs once read 4.0 and 2.9 ms (1.36×) where the paired ratio read 0.96×;
    * tracing (one core of Python work, which other processes and the collector only
      slow down): :meth:`best_ratio`, of the best runs. Its medians spread widely (one
      10k-equation trace read 0.93×–1.58× make_jaxpr over nine rounds), its best runs do
      not."""

    def __init__(self, runs: dict[str, list[float]]):
        super().__init__({name: statistics.median(ts) for name, ts in runs.items()})
        self.runs = runs
        self.best = {name: min(ts) for name, ts in runs.items()}

    def ratio(self, name: str, baseline: str) -> float:
        """``name``'s time over ``baseline``'s: the median over rounds of the two measured
        in the same round (seconds apart, so a burst of load falls on both)."""
        return statistics.median(a / b for a, b in zip(self.runs[name], self.runs[baseline]))

    def best_ratio(self, name: str, baseline: str) -> float:
        """``name``'s best run over ``baseline``'s: the runs least disturbed by the rest
        of the machine."""
        return self.best[name] / self.best[baseline]


def interleaved_times(fns: dict[str, Callable[[], object]], repeat: int = 30) -> Times:
    """Wall times of each function over ``repeat`` rounds, measured round-robin so
    that drifts in machine speed (other processes, clocks) fall on all of them alike;
    every other round runs them in reverse order, so that none always runs first (right
    after the collection) or last. Garbage is collected, untimed, after each call:
    js.trace pauses the cyclic collector, so the garbage of one run would otherwise be
    collected inside the next one's timing.

    Compare two functions with :meth:`Times.ratio`, which pairs their runs round by
    round."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    gc.collect()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    for r in range(repeat):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            runs[name].append(time.perf_counter() - t0)
            gc.collect()
    return Times(runs)


def deep_mlp(depth: int) -> tuple[Callable, tuple]:
    """A fresh depth-``depth`` MLP function (2 equations a layer) and its arguments."""

    def mlp(x, ws):
        h = x
        for w in ws:
            h = jnp.tanh(h @ w)
        return h.sum()

    return mlp, (jnp.ones((4, 8)), [jnp.ones((8, 8)) * 0.1] * depth)


def transformer_stack(blocks: int) -> tuple[Callable, tuple]:
    """A fresh stack of pre-norm self-attention blocks in plain jax.numpy."""

    def layer_norm(x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    def block(x, p):
        h = layer_norm(x)
        q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
        attn = jax.nn.softmax(q @ k.T / 4.0, axis=-1)
        x = x + attn @ v @ p["o"]
        h = layer_norm(x)
        return x + jnp.tanh(h @ p["up"]) @ p["down"]

    def stack(x, params):
        for p in params:
            x = block(x, p)
        return x.sum()

    p = {n: jnp.ones((16, 16)) * 0.01 for n in ("q", "k", "v", "o", "up", "down")}
    return stack, (jnp.ones((8, 16)), [p] * blocks)


def unrolled_loop(steps: int) -> tuple[Callable, tuple]:
    """A fresh Python loop of elementwise updates, unrolled by tracing."""

    def loop(x, a):
        for _ in range(steps):
            x = jnp.sin(x) * a + 0.1
        return x

    return loop, (jnp.ones(16), jnp.asarray(0.9))


def count_eqns(fn: Callable, args: tuple) -> int:
    return len(jax.make_jaxpr(fn)(*args).jaxpr.eqns)
