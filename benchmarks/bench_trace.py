"""js.trace (trace + index + names) against jax.make_jaxpr on the same, fresh function."""

from __future__ import annotations

import jax
from common import deep_mlp, interleaved_times, transformer_stack, unrolled_loop

import jaxsurgery as js

PROGRAMS = {
    "deep MLP": deep_mlp,
    "transformer stack": transformer_stack,
    "unrolled loop": unrolled_loop,
}
# sizes per program giving about 1k, 10k and 100k equations
SIZES = {
    "deep MLP": (500, 5_000, 50_000),
    "transformer stack": (30, 300, 3_000),
    "unrolled loop": (330, 3_300, 33_000),
}


def run(quick: bool = False) -> list[dict]:
    rows = []
    for name, make in PROGRAMS.items():
        for size in SIZES[name][: 2 if quick else 3]:
            fn, args = make(size)
            n = len(jax.make_jaxpr(fn)(*args).jaxpr.eqns)
            repeat = 9 if n < 5_000 else 5 if n < 50_000 else 2
            times = interleaved_times(
                {
                    # a fresh function each run: make_jaxpr caches per function object
                    "make_jaxpr": lambda m=make, s=size, a=args: jax.make_jaxpr(m(s)[0])(*a),
                    "js.trace": lambda m=make, s=size, a=args: js.trace(m(s)[0], *a),
                },
                repeat,
            )
            baseline, ours = times.best["make_jaxpr"], times.best["js.trace"]
            ratio = times.best_ratio("js.trace", "make_jaxpr")
            rows.append(
                {
                    "program": name,
                    "equations": n,
                    "make_jaxpr s": baseline,
                    "js.trace s": ours,
                    "ratio": ratio,
                    "target": "≤ 1.3",
                }
            )
            print(
                f"  trace {name:18s} {n:7d} eqns: make_jaxpr {baseline:.3f}s, js.trace {ours:.3f}s,"
                f" ratio {ratio:.2f}",
                flush=True,
            )
    return rows
