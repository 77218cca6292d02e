"""Property-based checks of long loops kept folded in the index (``_loop_index``).

Each example builds a random recurrence ``h_t = f(h_{t-1}, x_t)`` from a few random
elementwise and matrix ops, runs it with ``lax.scan`` over a sequence long enough to be
folded, and checks what jaxsurgery gives at random iterations against references
written with plain ``lax.scan`` over slices of the sequence (they share no code with
jaxsurgery):

* ``g.value("step/h_new@t")`` is the state after steps ``0..t``;
* the slice ``h_new@t1 -> h_new@t2`` is the recurrence run from ``z`` over steps
  ``t1+1..t2`` (values, JVP, VJP), and the slice ``h_new@t1 -> out`` the rest of the loss;
* ``g.grads("out", ["h_new@t"])`` is ``jax.grad`` of the loss with a perturbation added
  to ``h_t`` by hand.

Deterministic (``derandomize``); ``JS_FUZZ_EXAMPLES`` scales it (1/100 of it, at least 4: 4 by
default; each example compiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from conftest import allclose
from fuzz_programs import EXAMPLES as FUZZ_EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxsurgery as js
from jaxsurgery._loop_index import VirtualVar

EXAMPLES = max(4, FUZZ_EXAMPLES // 100)
WIDTH = 3
OPS = {
    "tanh": lambda h, x, w: jnp.tanh(h),
    "sin": lambda h, x, w: jnp.sin(h) * 0.9,
    "matmul": lambda h, x, w: h @ w,
    "add_x": lambda h, x, w: h + x,
    "mul_x": lambda h, x, w: h * jnp.tanh(x),
    "decay": lambda h, x, w: 0.5 * h + 0.1 * x,
}


def cell(ops, h, x, w):
    for op in ops:
        h = OPS[op](h, x, w)
    return jnp.tanh(h)  # bounded, so long runs stay finite


def make(ops):
    def program(h, xs, w):
        def step(h, x):
            h_new = cell(ops, h, x, w)
            return h_new, h_new

        h_last, hs = jax.lax.scan(step, h, xs)
        return jnp.sum(h_last**2) + 0.01 * jnp.sum(hs)

    return program


def run(ops, h, xs, w):
    """The state after running the recurrence over ``xs`` from ``h`` (by hand)."""
    return jax.lax.scan(lambda c, x: (cell(ops, c, x, w), None), h, xs)[0]


def loss_from(ops, t, h_t, h0, xs, w):
    """The program's loss given the state after step ``t`` (steps t+1.. by hand)."""

    def step(c, x):
        c = cell(ops, c, x, w)
        return c, c

    before = jax.lax.scan(step, h0, xs[:t])[1]
    h_last, after = jax.lax.scan(step, h_t, xs[t + 1 :])
    hs = jnp.concatenate([before, h_t[None], after])
    return jnp.sum(h_last**2) + 0.01 * jnp.sum(hs)


@st.composite
def cases(draw):
    ops = draw(st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=4))
    length = draw(st.integers(1100, 1500))  # x >= 2 body equations: folded
    t1 = draw(st.integers(0, length - 2))
    t2 = draw(st.integers(t1 + 1, min(length - 1, t1 + 6)))
    seed = draw(st.integers(0, 2**16))
    return ops, length, t1, t2, seed


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(cases())
def test_random_recurrences_folded_match_hand_written_scans(case):
    ops, length, t1, t2, seed = case
    keys = jax.random.split(jax.random.key(seed), 3)
    h0 = jax.random.normal(keys[0], (WIDTH,))
    xs = jax.random.normal(keys[1], (length, WIDTH))
    w = jax.random.normal(keys[2], (WIDTH, WIDTH)) / WIDTH
    g = js.trace(make(ops), h0, xs, w)
    assert g._program.folded, "the scan should stay one equation at this length"
    z = g[f"step/h_new@{t1}"]
    assert isinstance(z, VirtualVar)
    allclose(g.value(z), run(ops, h0, xs[: t1 + 1], w), rtol=1e-4, atol=1e-5)

    s = g.slice(z, f"step/h_new@{t2}")
    z_value = g.value(z) + 0.1
    ref = lambda v: run(ops, v, xs[t1 + 1 : t2 + 1], w)  # noqa: E731
    allclose(s(z_value), ref(z_value), rtol=1e-4, atol=1e-5)
    tangent = jnp.ones(WIDTH)
    allclose(
        jax.jvp(s, (z_value,), (tangent,))[1],
        jax.jvp(ref, (z_value,), (tangent,))[1],
        rtol=1e-3,
        atol=1e-5,
    )

    to_out = g.slice(z, "out")
    rest = lambda v: loss_from(ops, t1, v, h0, xs, w)  # noqa: E731
    allclose(to_out(z_value), rest(z_value), rtol=1e-4, atol=1e-5)
    allclose(jax.grad(to_out)(z_value), jax.grad(rest)(z_value), rtol=1e-3, atol=1e-5)
    allclose(
        g.grads("out", [f"step/h_new@{t1}"])[f"step/h_new@{t1}"],
        jax.grad(rest)(g.value(z)),
        rtol=1e-3,
        atol=1e-5,
    )
