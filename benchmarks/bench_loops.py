"""Loops at scale: a scan RNN of T steps, against JAX and hand-written equivalents.

* ``js.trace`` vs ``jax.make_jaxpr`` (fresh functions, GC collected untimed between);
* ``jit(g.grads_fn("out", {"h": "step/h@*"}))`` (every step, stacked) vs one
  ``jax.grad`` of the hand-written stacked-eps trick (a perturbation ``eps[t]`` added to
  ``h`` in the scan body): run time, compile time and compiled op count;
* an uncached ``g.value("step/h@{T-10}")`` vs the trace time of its graph;
* the slice ``step/h@0 -> out`` (every later step) vs the same computation written by
  hand as a scan: compiled op count and run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from common import interleaved_times, once

import jaxsurgery as js

WIDTH = 16


def rnn_fn():
    """A fresh scan RNN (about 10 equations a step)."""

    def rnn(w, h0, xs):
        def step(h, x):
            h = jnp.tanh(w @ h + x)
            return h, h

        h_last, hs = jax.lax.scan(step, h0, xs)
        return jnp.sum(hs**2) + jnp.sum(h_last)

    return rnn


def trick(eps, w, h0, xs):
    """The hand-written zero-perturbation trick: eps[t] added to h at step t."""

    def step(h, inp):
        x, e = inp
        h = jnp.tanh(w @ h + x) + e
        return h, h

    h_last, hs = jax.lax.scan(step, h0, (xs, eps))
    return jnp.sum(hs**2) + jnp.sum(h_last)


def rest_by_hand(h0, w, xs):
    """The loss given the state after step 0, written by hand (a scan over steps 1..)."""

    def step(h, x):
        h = jnp.tanh(w @ h + x)
        return h, h

    h_last, hs = jax.lax.scan(step, h0, xs[1:])
    return jnp.sum(h0**2) + jnp.sum(hs**2) + jnp.sum(h_last)


def _ops(compiled) -> int:
    text = compiled.as_text()
    return sum(1 for line in text.splitlines() if " = " in line and "ROOT" not in line)


def run(quick: bool = False) -> list[dict]:
    return [_one(T, quick) for T in ((10, 100) if quick else (10, 1000, 10000))]


def _one(T: int, quick: bool) -> dict:
    w = jax.random.normal(jax.random.key(0), (WIDTH, WIDTH)) / WIDTH**0.5
    args = (w, jnp.zeros(WIDTH), jnp.ones((T, WIDTH)) * 0.1)
    # a few ms each: many alternating rounds (fresh functions each time)
    trace_times = interleaved_times(
        {
            "js.trace": lambda: js.trace(rnn_fn(), *args),
            "make_jaxpr": lambda: jax.make_jaxpr(rnn_fn())(*args),
        },
        repeat=3 if quick else 30,
    )
    t_js, t_mj = trace_times.best["js.trace"], trace_times.best["make_jaxpr"]
    g = js.trace(rnn_fn(), *args)
    name = f"step/h#1@{T - 10}" if T > 10 else "step/h#1@5"
    _, t_value = once(lambda: g.value(name))
    # a patch at a late step keeps the index folded
    _, t_replace = once(lambda: g.replace(name, lambda h: h * 0.5))
    # a patch at every step, then a glob over the patched graph (which counted every
    # edit for each patched step: 25 s at T = 10 000)
    every, t_every = once(lambda: g.replace("step/h#1@*", lambda h: h * 0.5))
    _, t_glob = once(lambda: every.select("step/h#1@1*"))
    # the baseline: computing the function at all, first call
    _, t_call = once(lambda: rnn_fn()(*args))

    fn = g.grads_fn("out", {"h": "step/h#1@*"})  # every step, stacked
    ours = jax.jit(lambda *a: fn(*a)["h"])
    hand = jax.jit(lambda *a: jax.grad(trick)(jnp.zeros((T, WIDTH)), *a))
    c_ours, t_c_ours = once(lambda: ours.lower(*args).compile())
    c_hand, t_c_hand = once(lambda: hand.lower(*args).compile())
    same = bool(jnp.allclose(ours(*args), hand(*args), atol=1e-5))
    times = interleaved_times(
        {"ours": lambda: ours(*args), "hand": lambda: hand(*args)}, repeat=5 if quick else 20
    )
    s, t_slice = once(lambda: g.slice("step/h#1@0", "out"))
    h_first = g.value("step/h#1@0")
    s_ours = jax.jit(s)
    s_hand = jax.jit(lambda h: rest_by_hand(h, args[0], args[2]))
    s_ops = (_ops(s_ours.lower(h_first).compile()), _ops(s_hand.lower(h_first).compile()))
    s_same = bool(jnp.allclose(s_ours(h_first), s_hand(h_first), rtol=1e-5))
    s_times = interleaved_times(
        {"ours": lambda: s_ours(h_first), "hand": lambda: s_hand(h_first)},
        repeat=5 if quick else 60,  # well under a millisecond each
    )
    row = {
        "T": T,
        "make_jaxpr ms": t_mj * 1e3,
        "js.trace ms": t_js * 1e3,
        "trace ratio": trace_times.best_ratio("js.trace", "make_jaxpr"),
        "value ms": t_value * 1e3,
        "value / trace": t_value / t_js,
        "value / first call": t_value / t_call,
        "replace ms": t_replace * 1e3,
        "replace / trace": t_replace / t_js,
        "replace every step ms": t_every * 1e3,
        "glob after it ms": t_glob * 1e3,
        "grads run ratio": times.ratio("ours", "hand"),
        "grads compile s": t_c_ours,
        "hand compile s": t_c_hand,
        "ops": _ops(c_ours),
        "hand ops": _ops(c_hand),
        "equal": same,
        "slice build ms": t_slice * 1e3,
        "slice ops": s_ops[0],
        "slice hand ops": s_ops[1],
        "slice run ratio": s_times.ratio("ours", "hand"),
        "slice equal": s_same,
    }
    print(
        f"  scan RNN T={T}: js.trace {t_js * 1e3:.0f} ms = {row['trace ratio']:.0f}x "
        f"make_jaxpr; g.value({name!r}) {t_value * 1e3:.0f} ms "
        f"({row['value / trace']:.2f}x trace); replace there {t_replace * 1e3:.1f} ms; "
        f"jit(grads_fn) over {T} steps "
        f"{row['grads run ratio']:.2f}x the stacked-eps trick, compile "
        f"{t_c_ours:.2f} s vs {t_c_hand:.2f} s, {row['ops']} vs {row['hand ops']} ops, "
        f"equal: {same}; slice step/h@0 -> out built in {t_slice * 1e3:.0f} ms, "
        f"{s_ops[0]} vs {s_ops[1]} ops, runs {row['slice run ratio']:.2f}x the hand scan, "
        f"equal: {s_same}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    run(quick=True)
