"""`make bench`: measure the SPEC §7 targets and write benchmarks/RESULTS.md.

Every number is a ratio against a baseline run in the same process (or, for memory, in
a sibling process of the same script). Run: ``make bench`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_grads  # noqa: E402
import bench_memory  # noqa: E402
import bench_runtime  # noqa: E402
import bench_slice  # noqa: E402
import bench_trace  # noqa: E402
import jax  # noqa: E402

import jaxsurgery  # noqa: E402

SECTIONS = [
    ("Trace + index + names vs jax.make_jaxpr", bench_trace),
    ("Slice construction: all adjacent pairs of a depth-D MLP", bench_slice),
    (
        "Runtime of jit(jvp(...)) between layers 3 and 5 of an 8-layer MLP (1024 wide, batch 256)",
        bench_runtime,
    ),
    (
        "g.grads over K = 12 intermediates vs 12 separate VJPs (12-layer MLP, 512 wide, batch 128)",
        bench_grads,
    ),
    ("Peak memory for a 100k-equation program", bench_memory),
]


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"jax {jax.__version__}, jaxsurgery {jaxsurgery.__version__}, "
        f"device {jax.devices()[0].device_kind}"
    )


def main() -> None:
    quick = "--quick" in sys.argv
    start = time.perf_counter()
    out = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {datetime.date.today()}: {machine()}.",
        "Ratios compare against a baseline run in the same process; times are medians.",
        "",
    ]
    for title, module in SECTIONS:
        print(f"== {title}", flush=True)
        rows = module.run(quick=quick)
        out += [f"## {title}", "", table(rows), ""]
    elapsed = time.perf_counter() - start
    out.append(f"Total benchmark time: {elapsed:.0f} s.")
    text = "\n".join(out) + "\n"
    if not quick:
        (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
