"""Experiments as compiled functions against the same computations written by hand.

On the 12-layer MLP of bench_grads (512 wide, batch 128):

* ``jit(g.values_fn)`` capturing layers 3 and 6 vs a hand-written function returning
  them (target ≤ 1.05×: it runs only what they need, as the hand-written one does);
* ``jit(g.attribution_fn)`` over all 12 layers vs attribution patching by hand: the
  clean and corrupted forward passes and one ``jax.grad`` of the perturbation trick
  (target ≤ 1.1×);
* a patch sweep: ``jit(vmap(g.patch_fn))`` over N = 64 patches of one layer vs the
  patched model written by hand and vmapped the same way;
* ``jit(g.attribution_fn)`` over every step of the same layers run by a ``lax.scan``
  (stacked weights) vs the hand-written scan with a stacked perturbation (target ≤ 1.1×:
  a scan's forward pass runs once for values and gradients, two while loops XLA does not
  merge).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from bench_grads import BATCH, WIDTH, K, loss
from bench_runtime import hlo_instructions
from common import interleaved_times

import jaxsurgery as js

N_PATCHES = 64


def layers(ws, x, upto):
    h, outs = x, []
    for w in ws[:upto]:
        h = jnp.tanh(h @ w)
        outs.append(h)
    return outs


def scanned_loss(ws, x, y):
    """The layers of ``loss`` run by a scan over their stacked weights."""

    def step(h, w):
        h = jnp.tanh(h @ w)
        return h, None

    h, _ = jax.lax.scan(step, x, ws)
    return jnp.mean((h - y) ** 2)


def scanned_perturbed(eps, ws, x, y):
    """``scanned_loss`` with ``eps[k]`` added to step k's ``h``, and every step's ``h``."""

    def step(h, inp):
        w, e = inp
        h = jnp.tanh(h @ w) + e
        return h, h

    h, hs = jax.lax.scan(step, x, (ws, eps))
    return jnp.mean((h - y) ** 2), hs


def run(quick: bool = False) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), K + 3)
    x = jax.random.normal(keys[0], (BATCH, WIDTH))
    y = jax.random.normal(keys[1], (BATCH, WIDTH))
    x_corrupt = jax.random.normal(keys[2], (BATCH, WIDTH))
    ws = [jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH**0.5 for k in keys[3:]]
    g = js.trace(loss, ws, x, y)
    names = [f"h#{k}" for k in range(1, K + 1)]

    values = jax.jit(g.values_fn([names[2], names[5]]))
    values_hand = jax.jit(
        lambda ws, x, y: (lambda o: {names[2]: o[2], names[5]: o[5]})(layers(ws, x, 6))
    )

    attribution = jax.jit(g.attribution_fn("out", names))

    def perturbed(eps, ws, x, y):
        h = x
        for e, w in zip(eps, ws):
            h = jnp.tanh(h @ w) + e
        return jnp.mean((h - y) ** 2)

    def attribution_by_hand(ws, x, xc, y):
        clean, corrupt = layers(ws, x, K), layers(ws, xc, K)
        grads = jax.grad(perturbed)([jnp.zeros_like(h) for h in corrupt], ws, xc, y)
        return {n: (a - b) * d for n, a, b, d in zip(names, clean, corrupt, grads)}

    attribution_hand = jax.jit(attribution_by_hand)

    patch = g.patch_fn(names[5])
    sweep = jax.jit(
        jax.vmap(lambda v, ws, x, y: patch({names[5]: v}, ws, x, y), (0, None, None, None))
    )

    def patched_by_hand(v, ws, x, y):
        h = x
        for k, w in enumerate(ws):
            h = v if k == 5 else jnp.tanh(h @ w)
        return jnp.mean((h - y) ** 2)

    sweep_hand = jax.jit(jax.vmap(patched_by_hand, (0, None, None, None)))
    patches = jax.random.normal(keys[2], (N_PATCHES, BATCH, WIDTH))

    stacked = jnp.stack(ws)
    scanned = js.trace(scanned_loss, stacked, x, y)
    attribution_scan = jax.jit(scanned.attribution_fn("out", {"h": "step/h#1@*"}))

    def attribution_scan_by_hand(ws, x, xc, y):
        eps = jnp.zeros((K, BATCH, WIDTH))
        _, clean = scanned_perturbed(eps, ws, x, y)
        grads, corrupt = jax.grad(scanned_perturbed, has_aux=True)(eps, ws, xc, y)
        return {"h": (clean - corrupt) * grads}

    attribution_scan_hand = jax.jit(attribution_scan_by_hand)

    same = all(
        bool(jnp.allclose(a, b, atol=1e-5))
        for a, b in [
            *zip(values(ws, x, y).values(), values_hand(ws, x, y).values()),
            *zip(
                attribution((ws, x, y), (ws, x_corrupt, y)).values(),
                attribution_hand(ws, x, x_corrupt, y).values(),
            ),
            (sweep(patches, ws, x, y), sweep_hand(patches, ws, x, y)),
            *zip(
                attribution_scan((stacked, x, y), (stacked, x_corrupt, y)).values(),
                attribution_scan_hand(stacked, x, x_corrupt, y).values(),
            ),
        ]
    )
    times = interleaved_times(
        {
            "values": lambda: values(ws, x, y),
            "values_hand": lambda: values_hand(ws, x, y),
            "attr": lambda: attribution((ws, x, y), (ws, x_corrupt, y)),
            "attr_hand": lambda: attribution_hand(ws, x, x_corrupt, y),
            "sweep": lambda: sweep(patches, ws, x, y),
            "sweep_hand": lambda: sweep_hand(patches, ws, x, y),
            "attr_scan": lambda: attribution_scan((stacked, x, y), (stacked, x_corrupt, y)),
            "attr_scan_hand": lambda: attribution_scan_hand(stacked, x, x_corrupt, y),
        },
        repeat=5 if quick else 40,
    )
    # whether the compiled programs are the same: then a ratio away from 1 is the machine
    same_hlo = {
        "values": hlo_instructions(values, ws, x, y) == hlo_instructions(values_hand, ws, x, y),
        "attr": hlo_instructions(attribution, (ws, x, y), (ws, x_corrupt, y))
        == hlo_instructions(attribution_hand, ws, x, x_corrupt, y),
        "sweep": hlo_instructions(sweep, patches, ws, x, y)
        == hlo_instructions(sweep_hand, patches, ws, x, y),
        "attr_scan": hlo_instructions(attribution_scan, (stacked, x, y), (stacked, x_corrupt, y))
        == hlo_instructions(attribution_scan_hand, stacked, x, x_corrupt, y),
    }
    rows = [
        {
            "function": what,
            "ms": times[ours] * 1e3,
            "hand-written ms": times[hand] * 1e3,
            "ratio": times.ratio(ours, hand),
            "target": target,
            "equal": same,
            "same HLO": same_hlo[ours],
        }
        for what, ours, hand, target in (
            ("jit(g.values_fn) of layers 3 and 6", "values", "values_hand", "≤ 1.05"),
            (f"jit(g.attribution_fn) over {K} layers", "attr", "attr_hand", "≤ 1.1"),
            (f"jit(vmap(g.patch_fn)) over {N_PATCHES} patches", "sweep", "sweep_hand", ""),
            (
                f"jit(g.attribution_fn)@scan over {K} scan steps",
                "attr_scan",
                "attr_scan_hand",
                "≤ 1.1",
            ),
        )
    ]
    for r in rows:
        print(
            f"  {r['function']}: {r['ms']:.2f} ms, {r['ratio']:.3f}x by hand, equal: {same},"
            f" same HLO: {r['same HLO']}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    run()
