"""What a graph makes, called eagerly, runs each equation with a compiled op
(``jaxsurgery/_eager.py``): the values of the function itself called eagerly.
References: the function called directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def _rows(inner, x):
    """The rows ``scan(lambda c, _: (jnp.sin(c), c), inner(x), None, length=3)`` stacks,
    by hand."""
    h = inner(x)
    return jnp.stack([h, jnp.sin(h), jnp.sin(jnp.sin(h))])


@pytest.mark.parametrize(
    "use",
    [
        lambda g, f, inner, x: allclose(
            jax.grad(g.as_function())(x), jax.jit(jax.grad(f))(x), rtol=1e-5
        ),
        lambda g, f, inner, x: allclose(g.as_function()(x), jax.jit(f)(x)),
        lambda g, f, inner, x: allclose(
            g.replace("hs", lambda h: 2 * h).as_function()(x),
            (inner(x) ** 2).sum() + 2 * _rows(inner, x).sum() + inner(jnp.cos(x)).sum(),
        ),
        lambda g, f, inner, x: allclose(g.value("hs"), _rows(inner, x)),
    ],
    ids=["jax.grad", "call", "replaced call", "value"],
)
def test_an_eager_run_keeps_no_constant_of_a_graph_gone(use):
    """What a graph makes, run eagerly, runs its primitives with compiled ops (JAX's jit
    rule linearizes them under a derivative; 0.4-0.6x an eager jax.grad of the function
    on real models). An equation holding a program (a call, a loop) had its compiled op
    kept globally, which held the array its body closes over after the graph was gone
    (33 MB a trace of a jit closing over 16 MB; under a derivative it also ran 2.5x
    slower): each is kept with the program that holds it now. The values equal the
    function's, or its rows by hand. (The function is called jitted, and its loop body
    does not close over ``w``: JAX's own eager ``scan`` keeps its body, and what that
    closes over, in a cache of its own; so does the graph's.)"""
    import gc
    import weakref

    x = jnp.ones((4, 8))

    def make(w):
        @jax.jit
        def inner(x):
            return jnp.tanh(x @ w) + w.mean()

        def f(x):
            h = inner(x)
            hs = jax.lax.scan(lambda c, _: (jnp.sin(c), c), h, None, length=3)[1]
            return (h**2).sum() + hs.sum() + inner(jnp.cos(x)).sum()

        return f, inner

    w = jax.random.normal(jax.random.key(0), (8, 8))
    f, inner = make(w)
    g = js.trace(f, x)
    use(g, f, inner, x)
    gone = weakref.ref(w)
    del g, f, inner, w
    gc.collect()
    assert gone() is None


def _compiles(caplog, run):
    """How many XLA compilations ``run()`` sets off."""
    import logging

    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        caplog.clear()
        run()
        return sum("Finished XLA compilation" in r.getMessage() for r in caplog.records)


@jax.jit
def _layer(h, w):
    return jnp.tanh(h @ w) + h


def _jit_layers(x, ws):
    for w in ws:
        x = _layer(x, w)
    return x.sum()


def _relu_layers(x, ws):
    for w in ws:
        x = jax.nn.relu(x @ w) + jax.nn.gelu(x)
    return x.sum()


@pytest.mark.parametrize("model", [_jit_layers, _relu_layers], ids=["jit layer", "relu, gelu"])
def test_a_layer_called_many_times_compiles_once_for_every_graph_of_it(caplog, model):
    """A jitted layer called 24 times is one compiled op, shared by every graph made
    while one holds it: made per equation, each graph's first eager call compiled 24,
    1.2 s for 2 ms (the regression hunt). A custom rule's call (relu, gelu) runs its
    body's ops outside a derivative: each trace makes its body anew, and a compiled op
    of it compiled 24 times for every graph. ``values_fn`` then compiles nothing new
    either (it bound the calls as JAX does: JAX compiled them again)."""
    ws = [jax.random.normal(jax.random.key(i), (8, 8)) / 4 for i in range(24)]
    x = jnp.ones((2, 8))
    expected = jax.jit(model)(x, ws)
    graphs = [js.trace(model, x, ws) for _ in range(2)]
    first = _compiles(caplog, lambda: allclose(graphs[0].as_function()(x, ws), expected))
    assert first <= 12, first
    assert _compiles(caplog, lambda: allclose(graphs[1].as_function()(x, ws), expected)) == 0
    values = graphs[1].values_fn(["out"])
    assert _compiles(caplog, lambda: allclose(values(x, ws)["out"], expected)) == 0
