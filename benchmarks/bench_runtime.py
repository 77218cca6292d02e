"""Run time of compiled slices: jit(jvp(slice)) against a hand-written equivalent and
against the zero-tangent trick on the whole function; HLO sizes compared."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from common import interleaved_times

import jaxsurgery as js

DEPTH, WIDTH, BATCH = 8, 1024, 256


def mlp(x, ws):
    h = x
    for w in ws:
        h = jnp.tanh(h @ w)
    return h


def hlo_instructions(fn, *args) -> list[str]:
    """The instructions of the optimized HLO module (all computations), without what
    names where they came from: value names, metadata (source lines, op names)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    lines = [
        line for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//")
    ]
    return [re.sub(r"%[\w.\-]+", "%", re.sub(r",? metadata=\{[^}]*\}", "", line)) for line in lines]


def run(quick: bool = False) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), DEPTH + 1)
    x = jax.random.normal(keys[0], (BATCH, WIDTH))
    ws = [jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH**0.5 for k in keys[1:]]
    g = js.trace(mlp, x, ws)
    s = g.slice("h#3", "h#5")  # two layers: 4 and 5 (1-based)
    z = g.value("h#3")
    v = jnp.ones_like(z)

    def sliced(ws, x, z, v):
        return jax.jvp(s.bind(x, ws), (z,), (v,))

    def hand(ws, x, z, v):
        return jax.jvp(lambda h: jnp.tanh(jnp.tanh(h @ ws[3]) @ ws[4]), (z,), (v,))

    def zero_tangent(ws, x, z, v):  # the issue-12782 trick: the whole function, perturbed
        def perturbed(eps):
            h = x
            for k, w in enumerate(ws):
                h = jnp.tanh(h @ w)
                if k == 2:
                    h = h + eps
                if k == 4:
                    return h

        return jax.jvp(perturbed, (jnp.zeros_like(z),), (v,))

    args = (ws, x, z, v)
    fns = {"hand-written": hand, "jaxsurgery slice": sliced, "zero-tangent trick": zero_tangent}
    jitted = {name: jax.jit(fn) for name, fn in fns.items()}
    times = interleaved_times(
        {name: (lambda f=f: f(*args)) for name, f in jitted.items()}, repeat=10 if quick else 40
    )
    rows = []
    reference = hlo_instructions(hand, *args)
    for name, fn in fns.items():
        instructions = hlo_instructions(fn, *args)
        ops = len(instructions)
        rows.append(
            {
                "function": f"jit(jvp({name}))",
                "ms": times[name] * 1e3,
                "HLO ops": ops,
                "same HLO": instructions == reference,
                "vs hand-written": times.ratio(name, "hand-written"),
            }
        )
        print(
            f"  runtime {name:20s} {times[name] * 1e3:8.3f} ms, {ops} HLO ops, "
            f"{times.ratio(name, 'hand-written'):.3f}x hand-written",
            flush=True,
        )
    allclose = all(
        bool(jnp.allclose(a, b, atol=1e-4))
        for a, b in zip(jax.jit(sliced)(*args), jax.jit(hand)(*args))
    )
    print(
        f"  runtime slice == hand-written: {allclose}; device {jax.devices()[0].device_kind}",
        flush=True,
    )
    return rows
