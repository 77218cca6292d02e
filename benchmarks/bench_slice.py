"""Slice construction: all adjacent-layer slices of a depth-D MLP cost O(D) in total."""

from __future__ import annotations

import gc

from common import deep_mlp, median_time

import jaxsurgery as js


def run(quick: bool = False) -> list[dict]:
    rows = []
    totals = {}
    for depth in (10, 100, 1000):
        fn, args = deep_mlp(depth)
        g = js.trace(fn, *args)
        gc.collect()  # the collection the trace deferred is the trace's cost, not slicing's

        def all_pairs(g=g, depth=depth):
            for k in range(1, depth):
                g.slice(f"h#{k}", f"h#{k + 1}")

        totals[depth] = median_time(all_pairs, repeat=7, warmup=1)
        per = totals[depth] / (depth - 1)
        rows.append(
            {
                "depth": depth,
                "slices": depth - 1,
                "total s": totals[depth],
                "per slice ms": per * 1e3,
            }
        )
        print(
            f"  slices depth {depth:5d}: {depth - 1} slices in {totals[depth]:.3f}s ({per * 1e3:.2f} ms each)",
            flush=True,
        )
    ratio = totals[1000] / totals[100]
    rows.append(
        {"depth": "1000 / 100", "slices": "", "total s": ratio, "per slice ms": "target ≤ 12"}
    )
    print(f"  slices D=1000 / D=100 total time: {ratio:.1f}x (target ≤ 12)", flush=True)
    return rows
