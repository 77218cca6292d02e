"""Peak memory of tracing, indexing and slicing a 100k-equation program (subprocesses)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

DEPTH = 50_000  # two equations a layer: 100k equations


def child(mode: str) -> None:
    import jax
    from common import deep_mlp

    import jaxsurgery as js

    fn, args = deep_mlp(DEPTH)
    if mode == "make_jaxpr":
        n = len(jax.make_jaxpr(fn)(*args).jaxpr.eqns)
    else:
        g = js.trace(fn, *args)
        g.slice("h#100", "h#200")
        g.names()
        n = len(g.jaxpr.eqns)
    print(json.dumps({"equations": n, "peak GB": peak_kb() / 2**20}))


def peak_kb() -> int:
    """This process's peak resident memory in KiB.

    Linux's VmHWM belongs to the process image, so it starts afresh at exec; ru_maxrss
    is carried over from the parent process and would report the benchmark runner's
    own peak instead.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(quick: bool = False) -> list[dict]:
    rows = []
    for mode in ("make_jaxpr", "js.trace + slice"):
        out = subprocess.run(
            [sys.executable, __file__, mode], capture_output=True, text=True, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"process": mode, **result, "target": "≤ 2 GB" if mode != "make_jaxpr" else ""})
        print(
            f"  memory {mode:18s}: {result['equations']} eqns, peak {result['peak GB'] * 1024:.0f} MB",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    child(sys.argv[1])
