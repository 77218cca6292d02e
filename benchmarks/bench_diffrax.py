"""Tracing solver loops: ``js.trace`` vs ``jax.make_jaxpr``.

An adaptive diffrax solve and an optimistix BFGS minimisation (80 trips of a body of
180 equations, line-search conds inside) are ``while_loop``s whose trip counts depend on
values: the index keeps their bodies folded instead of running them op by op at trace
time. The BFGS body (over ``SMALL_BODY``) is run op by op for its first trips, until they
pass ``EAGER_UNROLL`` equations, then folded: reported, no target (it traced in 15×
``make_jaxpr`` when its 80 trips were all unrolled).
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


def bfgs_fn():
    """A fresh optimistix BFGS minimisation of a 4-d Rosenbrock function (80 trips)."""
    import optimistix as optx

    def rosenbrock(y, args):
        return jnp.sum(100 * (y[1:] - y[:-1] ** 2) ** 2 + (1 - y[:-1]) ** 2)

    def solve(y0):
        solver = optx.BFGS(rtol=1e-6, atol=1e-6)
        return optx.minimise(rosenbrock, solver, y0, max_steps=200, throw=False).value

    return solve


PROGRAMS = {
    "diffrax Tsit5 solve": (solve_fn, (jnp.array([1.0, -0.5]), jnp.array(0.7)), "≤ 2"),
    "optimistix BFGS": (bfgs_fn, (jnp.zeros(4),), ""),
}


def run(quick: bool = False) -> list[dict]:
    """``js.trace`` of each program vs ``jax.make_jaxpr`` (fresh functions each time)."""
    rows = []
    for name, (make, args, target) in PROGRAMS.items():
        js.trace(make(), *args)  # warm JAX's own caches (primitive compiles) once
        times = interleaved_times(
            {
                "js.trace": lambda m=make, a=args: js.trace(m(), *a),
                "make_jaxpr": lambda m=make, a=args: jax.make_jaxpr(m())(*a),
            },
            repeat=2 if quick else 5,
        )
        t_js, t_mj = times.best["js.trace"], times.best["make_jaxpr"]
        print(f"  {name}: js.trace {t_js:.3f} s, make_jaxpr {t_mj:.3f} s", flush=True)
        rows.append(
            {
                "program": name,
                "make_jaxpr s": t_mj,
                "js.trace s": t_js,
                "ratio": times.best_ratio("js.trace", "make_jaxpr"),
                "target": target,
            }
        )
    return rows


if __name__ == "__main__":
    run(quick=True)
