"""Values of intermediates for the traced arguments: ``g.value`` on a long chain.

``g.value`` computes only the ancestors of what is asked, and keeps checkpoints (about
every √n-th value of the n equations it ran): the first value pays for its prefix, a
later one re-runs at most about √n equations. Measured on the deep MLP of bench_trace
(100k equations): the first value near the end and one five equations later, against
the trace time of the graph and one eager call of the function itself (the cost of
computing the prefix at all, op by op).
"""

from __future__ import annotations

import time

import jax
from common import deep_mlp

import jaxsurgery as js


def run(quick: bool = False) -> list[dict]:
    depth = 5_000 if quick else 50_000
    fn, args = deep_mlp(depth)
    jax.block_until_ready(deep_mlp(8)[0](*args[:1], args[1][:8]))  # warm the op caches
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    t_eager = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = js.trace(fn, *args)
    t_trace = time.perf_counter() - t0
    n = len(g.vars)
    timings = {}
    for label, k in (("first value", n - 10), ("a later value", n - 5)):
        t0 = time.perf_counter()
        jax.block_until_ready(g.value(g.vars[k]))
        timings[label] = time.perf_counter() - t0
    rows = [
        {
            "request": label,
            "equations": len(g._program.jaxpr.eqns),
            "trace s": t_trace,
            "eager call s": t_eager,
            "value s": t,
            "value / trace": t / t_trace,
            "value / eager call": t / t_eager,
        }
        for label, t in timings.items()
    ]
    for r in rows:
        print(
            f"  {r['request']}: {r['value s'] * 1e3:.1f} ms ({r['value / trace']:.3f}x trace,"
            f" {r['value / eager call']:.2f}x an eager call)",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    run()
