"""g.grads over K = 12 intermediates (one backward pass) against hand-written equivalents.

The target (SPEC §7): ``jit(g.grads_fn)`` within 1.05× of one ``jax.grad`` of the
hand-written zero-perturbation trick (an ``eps_k`` added at every layer, as Flax's
``perturb``), with the same compiled op count. For scale, also K separate VJPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from common import interleaved_times

import jaxsurgery as js

K, WIDTH, BATCH = 12, 512, 128


def loss(ws, x, y):
    h = x
    for w in ws:
        h = jnp.tanh(h @ w)
    return jnp.mean((h - y) ** 2)


def run(quick: bool = False) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), K + 2)
    x = jax.random.normal(keys[0], (BATCH, WIDTH))
    y = jax.random.normal(keys[1], (BATCH, WIDTH))
    ws = [jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH**0.5 for k in keys[2:]]
    g = js.trace(loss, ws, x, y)
    names = [f"h#{k}" for k in range(1, K + 1)]
    one_pass = jax.jit(g.grads_fn("out", names))

    def separate(i):  # the zero-tangent trick for one layer: a whole forward + backward
        def perturbed(eps, ws, x, y):
            h = x
            for k, w in enumerate(ws):
                h = jnp.tanh(h @ w) + (eps if k == i else 0.0)
            return jnp.mean((h - y) ** 2)

        return jax.jit(jax.grad(perturbed))

    def perturbed_all(eps, ws, x, y):  # the trick for all layers at once: one grad
        h = x
        for e, w in zip(eps, ws):
            h = jnp.tanh(h @ w) + e
        return jnp.mean((h - y) ** 2)

    zeros = jnp.zeros((BATCH, WIDTH))
    fns = [separate(i) for i in range(K)]
    trick = jax.jit(lambda ws, x, y: jax.grad(perturbed_all)([zeros] * K, ws, x, y))
    ops = [_ops(f.lower(ws, x, y).compile()) for f in (one_pass, trick)]

    def slice_vjp(name):
        s = g.slice(name, "out")
        return jax.jit(lambda ws, x, y, z: jax.grad(s.bind(ws, x, y))(z))

    slices = [slice_vjp(n) for n in names]
    zs = [g.value(n) for n in names]
    timed = {"one": lambda: one_pass(ws, x, y), "trick": lambda: trick(ws, x, y)}
    timed.update({f"sep{i}": (lambda f=f: f(zeros, ws, x, y)) for i, f in enumerate(fns)})
    timed.update(
        {f"slice{i}": (lambda f=f, z=z: f(ws, x, y, z)) for i, (f, z) in enumerate(zip(slices, zs))}
    )
    times = interleaved_times(timed, repeat=5 if quick else 15)
    t_one, t_trick = times["one"], times["trick"]
    t_sep = sum(times[f"sep{i}"] for i in range(K))
    t_slices = sum(times[f"slice{i}"] for i in range(K))
    check = one_pass(ws, x, y)
    ok = all(
        bool(jnp.allclose(check[n], fns[i](zeros, ws, x, y), atol=1e-6))
        for i, n in enumerate(names)
    )
    ok = ok and all(
        bool(jnp.allclose(check[n], t, atol=1e-6)) for n, t in zip(names, trick(ws, x, y))
    )
    rows = [
        {
            "method": f"jit(g.grads_fn) over {K} vars (one pass)",
            "ms": t_one * 1e3,
            "speed-up": 1.0,
            "HLO ops": ops[0],
        },
        {
            "method": "one grad of the hand-written perturbation trick",
            "ms": t_trick * 1e3,
            "speed-up": times.ratio("trick", "one"),
            "HLO ops": ops[1],
        },
        {
            "method": f"{K} separate VJPs (zero-tangent trick)",
            "ms": t_sep * 1e3,
            "speed-up": t_sep / t_one,
        },
        {
            "method": f"{K} separate VJPs of slices z_i -> loss",
            "ms": t_slices * 1e3,
            "speed-up": t_slices / t_one,
        },
    ]
    print(
        f"  grads one pass {t_one * 1e3:.2f} ms = {t_one / t_trick:.3f}x the hand-written "
        f"trick ({ops[0]} vs {ops[1]} HLO ops); {K} zero-tangent VJPs {t_sep * 1e3:.2f} ms "
        f"({t_sep / t_one:.1f}x, target ≥ {0.8 * K:.1f}x); {K} slice VJPs {t_slices * 1e3:.2f} ms "
        f"({t_slices / t_one:.1f}x); equal: {ok}",
        flush=True,
    )
    return rows


def _ops(compiled) -> int:
    """Instructions in the optimized HLO (metadata and the ROOT marker aside)."""
    return sum(1 for line in compiled.as_text().splitlines() if " = " in line)
