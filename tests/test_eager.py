"""What a graph makes, called eagerly, runs each equation with a compiled op
(``jaxsurgery/_eager.py``): the values of the function itself called eagerly.
References: the function called directly."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import allclose

import jaxsurgery as js

_sub = jax.jit(lambda a, b: a - b)
_scaled = jax.checkpoint(lambda a, b: jnp.sin(a) * b)


def _twice_then_apart(x, y):
    u = _sub(x, x)
    v = _sub(x, y)
    return u, v, _scaled(x, x), _scaled(x, y)


def test_a_call_given_one_value_twice_runs_each_call_on_its_operands():
    """A call's compiled op was kept for its body with the first call's vars: sub(x, x)
    read its one input for both operands, and sub(x, y) of the same body (in this graph
    or another) then computed y - y, silently."""
    x, y = jnp.arange(3.0), jnp.ones(3)
    expected = _twice_then_apart(x, y)
    g = js.trace(_twice_then_apart, x, y)
    for got in (g.as_function()(x, y), jax.jit(g.as_function())(x, y)):
        for a, b in zip(got, expected):
            allclose(a, b)
    allclose(g.values_fn(["v"])(x, y)["v"], x - y)
    allclose(js.trace(lambda a, b: _sub(a, b), x, y).as_function()(x, y), x - y)


def _mixed(key, x, n):
    noise = jax.random.normal(key, x.shape)
    h = _sub(x, noise * 0.1)
    h = jax.lax.cond(n > 0, jnp.sin, jnp.cos, h)
    hs = jax.lax.scan(lambda c, _: (jnp.tanh(c) * 1.5, c), h, None, length=4)[1]
    return hs.sum(0) + x / 3.0


def test_eager_calls_give_the_functions_values_bit_for_bit():
    key, x = jax.random.key(3), jnp.linspace(-1.0, 1.0, 5)
    g = js.trace(_mixed, key, x, 1)
    for n in (1, -1):  # (the other branch too)
        expected = _mixed(key, x, n)
        got = g.as_function()(key, x, n)
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype and got.weak_type == expected.weak_type


def test_an_eager_gradient_keeps_no_constant_of_a_graph_gone():
    """An eager derivative of what a graph makes runs its primitives with compiled ops
    (JAX's jit rule linearizes them; 0.4-0.6x an eager jax.grad of the function on real
    models) but binds a call's equation as JAX does: compiled and kept, the call's op held
    the array its body closes over after the graph was gone (33 MB a trace of a jit
    closing over 16 MB), and ran it 2.5x slower. The gradient equals the function's."""
    import gc
    import weakref

    x = jnp.ones((4, 8))

    def make(w):
        @jax.jit
        def inner(x):
            return jnp.tanh(x @ w) + w.mean()

        return lambda x: (inner(x) ** 2).sum()

    w = jax.random.normal(jax.random.key(0), (8, 8))
    f = make(w)
    g = js.trace(f, x)
    allclose(jax.grad(g.as_function())(x), jax.grad(f)(x), rtol=1e-5)
    gone = weakref.ref(w)
    del g, f, w
    gc.collect()
    assert gone() is None
