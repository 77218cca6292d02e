"""What a graph makes, called eagerly (not under ``jax.jit``), against the function
itself called eagerly: a notebook's calls. On a model of many small ops the cost is
dispatch, one op at a time; jaxsurgery runs each equation with a compiled op (JAX's C++
fast path, ``jaxsurgery/_eager.py``), as ``jnp`` calls run, also under an eager
derivative (``jax.grad``, ``g.grads``: a compiled op's derivative is JAX's, kept per
op, where a bound primitive is linearized anew each time). A 100-layer MLP, 4 wide,
batch 2 (no target: shown for scale; under ``jax.jit`` the programs are the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from common import interleaved_times

import jaxsurgery as js

DEPTH, WIDTH, BATCH = 100, 4, 2


def loss(params, x, y):
    h = x
    for w, b in params:
        h = jnp.tanh(h @ w + b)
    return jnp.mean((h - y) ** 2)


def hiddens(params, x):
    """Every layer's h, stacked, written out."""
    h, out = x, []
    for w, b in params:
        h = jnp.tanh(h @ w + b)
        out.append(h)
    return jnp.stack(out)


def rest(h, params, y):
    """The loss from layer 10's h on, written out."""
    for w, b in params[10:]:
        h = jnp.tanh(h @ w + b)
    return jnp.mean((h - y) ** 2)


def perturbed(eps, params, x, y):
    """The loss with ``eps[k]`` added to layer k's h: the zero-perturbation trick."""
    h = x
    for (w, b), e in zip(params, eps):
        h = jnp.tanh(h @ w + b) + e
    return jnp.mean((h - y) ** 2)


def run(quick: bool = False) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), DEPTH)
    params = [(jax.random.normal(k, (WIDTH, WIDTH)) / 2, jnp.zeros(WIDTH)) for k in keys]
    x, y = jnp.ones((BATCH, WIDTH)), jnp.zeros((BATCH, WIDTH))
    g = js.trace(loss, params, x, y)
    whole, values = g.as_function(), g.values_fn({"h": "h#*"})
    piece = g.slice("h#10", "out")
    h10 = g.value("h#10")
    layers = [f"h#{k}" for k in range(1, DEPTH + 1)]
    zeros = [jnp.zeros((BATCH, WIDTH))] * DEPTH
    pairs = {
        "as_function": (lambda: whole(params, x, y), lambda: loss(params, x, y)),
        "values_fn of every layer": (
            lambda: values(params, x, y)["h"],
            lambda: hiddens(params, x),
        ),
        "slice h#10 -> out": (lambda: piece(h10), lambda: rest(h10, params, y)),
        # derivatives taken eagerly: op by op under JAX's linearize
        "jax.grad of as_function": (
            lambda: jax.grad(whole)(params, x, y),
            lambda: jax.grad(loss)(params, x, y),
        ),
        "g.grads of every layer (vs the trick)": (
            lambda: g.grads("out", layers),
            lambda: jax.grad(perturbed)(zeros, params, x, y),
        ),
    }
    rows = []
    for label, (ours, hand) in pairs.items():
        times = interleaved_times({"ours": ours, "hand": hand}, repeat=5 if quick else 20)
        rows.append(
            {
                "function (eager)": label,
                "jaxsurgery ms": times["ours"] * 1e3,
                "hand-written ms": times["hand"] * 1e3,
                "ratio": times.ratio("ours", "hand"),
            }
        )
        print(f"  eager {label}: {rows[-1]['ratio']:.2f}x the hand-written", flush=True)
    return rows


if __name__ == "__main__":
    run()
