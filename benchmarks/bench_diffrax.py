"""Tracing a diffrax ODE solve: ``js.trace`` vs ``jax.make_jaxpr``.

An adaptive solve is a ``while_loop`` whose trip count depends on values: the index
keeps its large body folded instead of running it op by op at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from common import interleaved_times

import jaxsurgery as js


def solve_fn():
    """A fresh diffrax solve (adaptive Tsit5: a while_loop whose trips depend on values)."""
    import diffrax

    def solve(y0, theta):
        term = diffrax.ODETerm(lambda t, y, theta: -theta * y + jnp.sin(t) * y[::-1])
        return diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            t0=0.0,
            t1=1.0,
            dt0=0.1,
            y0=y0,
            args=theta,
            saveat=diffrax.SaveAt(ts=jnp.array([0.0, 0.5, 1.0])),
            stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-6),
            max_steps=64,
        ).ys

    return solve


def run(quick: bool = False) -> list[dict]:
    """``js.trace`` of a diffrax solve vs ``jax.make_jaxpr`` (fresh functions each time)."""
    args = (jnp.array([1.0, -0.5]), jnp.array(0.7))
    js.trace(solve_fn(), *args)  # warm JAX's own caches (primitive compiles) once
    n = 2 if quick else 5
    times = interleaved_times(
        {
            "js.trace": lambda: js.trace(solve_fn(), *args),
            "make_jaxpr": lambda: jax.make_jaxpr(solve_fn())(*args),
        },
        repeat=n,
    )
    t_js, t_mj = times.best["js.trace"], times.best["make_jaxpr"]
    print(f"  diffrax solve: js.trace {t_js:.3f} s, make_jaxpr {t_mj:.3f} s", flush=True)
    return [
        {
            "program": "diffrax Tsit5 solve",
            "make_jaxpr s": t_mj,
            "js.trace s": t_js,
            "ratio": times.best_ratio("js.trace", "make_jaxpr"),
            "target": "≤ 2",
        }
    ]


if __name__ == "__main__":
    run(quick=True)
