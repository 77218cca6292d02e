"""Scopes in loop bodies are named as outside loops, per iteration.

``"blk/*@3"`` selects everything inside ``blk`` at iteration 3, in a folded scan body
as in a loop the flat index unrolls; what a library stores as module state in a body
(Haiku's ``hk.scan`` under ``transform_with_state``, an Equinox ``State``) is not an
output of its scope there either. References are the recurrences written by hand and
the same module traced outside a loop.
"""

import re
import warnings

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from conftest import allclose

import jaxsurgery as js
from jaxsurgery._loop_index import VirtualVar

T = 6


def _block(c, x):
    """What scope ``blk`` computes, in order: ``sin(c)``, ``a``, ``cos(a)``, ``b``."""
    s = jnp.sin(c)
    a = s * x
    k = jnp.cos(a)
    return [s, a, k, k + 1.0]


def scoped_scan(xs):
    def body(c, x):
        with jax.named_scope("blk"):
            a = jnp.sin(c) * x
            b = jnp.cos(a) + 1.0
        return b, None

    return jax.lax.scan(body, jnp.ones(3), xs)[0]


def scoped_while(x, n):
    def body(i, c):
        with jax.named_scope("blk"):
            a = jnp.sin(c) * x
            b = jnp.cos(a) + 1.0
        return b

    return jax.lax.fori_loop(0, n, body, x)  # a traced bound: a while_loop, unrolled


def _carries(c, xs):
    """The carry entering each iteration of ``scoped_scan``'s body."""
    found = []
    for x in xs:
        found.append(c)
        c = _block(c, x)[-1]
    return found


def test_a_scopes_inside_in_a_folded_scan_body_is_selected_per_iteration():
    xs = jax.random.normal(jax.random.key(0), (T, 3))
    g = js.trace(scoped_scan, xs)
    assert "scan" in [v.primitive for v in g.vars]  # the loop stays folded
    c3 = _carries(jnp.ones(3), xs)[3]
    want = _block(c3, xs[3])
    got = g.select("blk/*@3")
    assert all(isinstance(v, VirtualVar) or v is g["out"] for v in got)
    assert len(got) == len(want) and g.select("blk/**@3").names == got.names
    for v, w in zip(got, want):
        allclose(g.value(v), w, rtol=1e-6)
    # what blk makes that nothing names keeps its loop<k>%<i> name, as %i outside loops
    assert got[0].name.startswith("loop0%") and got[0].name.endswith("@3")
    assert f"blk/{got[0].name}" in got[0].aliases
    # every iteration, as for any name per iteration; the scope itself is its output
    assert len(g.select("blk/*@*")) == len(want) * T
    either = g.select(re.compile(r"blk/.*@3|blk/.*@4"))  # a regex of its own
    assert either.names == (*got.names, *g.select("blk/*@4").names)
    assert g.select("blk@3").names == (got[-1].name,)


def test_a_scopes_inside_in_an_unrolled_while_loop_takes_the_iteration_last():
    x = jax.random.normal(jax.random.key(1), (3,))
    g = js.trace(scoped_while, x, 4)
    assert "while" not in [v.primitive for v in g.vars]  # unrolled in the flat index
    want = _block(_carries(x, [x] * 4)[2], x)
    got = g.select("blk/*@2")
    assert len(got) == len(want)
    for v, w in zip(got, want):
        allclose(g.value(v), w, rtol=1e-6)


def _lstm_steps(xs):
    core = hk.LSTM(4)
    outs, _ = hk.dynamic_unroll(core, xs, core.initial_state(2))
    return outs


def _lstm_step(inputs):
    x, state = inputs
    return hk.LSTM(4)(x, state)


def test_a_haiku_lstm_under_dynamic_unroll_holds_its_gates_at_each_step():
    xs = jax.random.normal(jax.random.key(2), (T, 2, 3))
    unrolled = hk.transform(_lstm_steps)
    params = unrolled.init(jax.random.key(1), xs)
    g = js.trace(unrolled.apply, params, None, xs)
    got = g.select("lstm/*@3")
    # the reference: one step of the same LSTM, traced outside a loop
    state = hk.LSTMState(jnp.zeros((2, 4)), jnp.zeros((2, 4)))
    for t in range(3):
        _, state = hk.transform(_lstm_step).apply(params, None, (xs[t], state))
    flat = js.trace(hk.transform(_lstm_step).apply, params, None, (xs[3], state))
    inside = flat.select("lstm/*")
    assert [v.primitive for v in got] == [v.primitive for v in inside]
    for v, w in zip(got, inside):
        allclose(g.value(v), flat.value(w), rtol=1e-5, atol=1e-6)


def _lstm_python_loop(xs):
    core = hk.LSTM(4)
    state, outs = core.initial_state(2), []
    for t in range(3):
        out, state = core(xs[t], state)
        outs.append(out)
    return jnp.stack(outs)


def test_a_library_module_returning_several_arrays_names_each_by_its_path():
    """hk.LSTM returns (h, LSTMState(hidden, cell)): its scope `lstm` names both arrays
    (so neither alone); each is also named by its place in what the module returned."""
    xs = jax.random.normal(jax.random.key(2), (T, 2, 3))
    unrolled = hk.transform(_lstm_steps)
    params = unrolled.init(jax.random.key(1), xs)
    g = js.trace(unrolled.apply, params, None, xs)
    state = hk.LSTMState(jnp.zeros((2, 4)), jnp.zeros((2, 4)))
    for t in range(T):  # the reference: one step at a time
        out, state = hk.transform(_lstm_step).apply(params, None, (xs[t], state))
        allclose(g.value(f"lstm[1].cell@{t}"), state.cell, rtol=1e-5, atol=1e-6)
        allclose(g.value(f"lstm[0]@{t}"), out, rtol=1e-5, atol=1e-6)
        assert g[f"lstm[1].hidden@{t}"] is g[f"lstm[0]@{t}"]
    assert len(g.select("lstm[1].cell@*")) == T
    # called three times in a Python loop: numbered as its scope is; the Python names
    # stay canonical (they rank before scopes), and a path without the numbers selects
    # every instance
    looped = hk.transform(_lstm_python_loop)
    params = looped.init(jax.random.key(1), xs)
    g = js.trace(looped.apply, params, None, xs)
    state = hk.LSTMState(jnp.zeros((2, 4)), jnp.zeros((2, 4)))
    for t in range(3):
        _, state = hk.transform(_lstm_step).apply(params, None, (xs[t], state))
        v = g[f"lstm#{t}[1].cell"]
        allclose(g.value(v), state.cell, rtol=1e-5, atol=1e-6)
        assert v.scope == "lstm" and v.name == f"state.cell#{t + 1}"  # (#0: the first)
    assert list(g.select("lstm[1].cell")) == [g[f"lstm#{t}[1].cell"] for t in range(3)]
    # a module returning one array twice (hk.GRU's (h, h)) is named by its scope alone
    gru = hk.transform(_gru_steps)
    params = gru.init(jax.random.key(1), xs)
    g = js.trace(gru.apply, params, None, xs)
    assert g["gru@2"].name == "gru@2" and "gru[0]@2" not in g["gru@2"].aliases


def _gru_steps(xs):
    core = hk.GRU(4)
    return hk.dynamic_unroll(core, xs, core.initial_state(2))[0]


def _bn_scan(xs):
    bn = hk.BatchNorm(True, True, 0.9)

    def step(c, x):
        h = jnp.tanh(bn(c + x, is_training=True))
        return h, h

    return hk.scan(step, jnp.zeros((2, 3)), xs)[1]


def _bn_flat(x):
    return jnp.tanh(hk.BatchNorm(True, True, 0.9)(x, is_training=True))


def test_haiku_batchnorm_state_in_an_hk_scan_is_not_an_output_of_its_scope():
    xs = jax.random.normal(jax.random.key(0), (4, 2, 3))
    flat_t = hk.transform_with_state(_bn_flat)
    p, st = flat_t.init(jax.random.key(1), xs[0])
    flat = js.trace(flat_t.apply, p, st, None, xs[0])
    assert len(flat.select("batch_norm")) == 1  # the reference: the normalised value
    t = hk.transform_with_state(_bn_scan)
    p, st = t.init(jax.random.key(1), xs)
    g = js.trace(t.apply, p, st, None, xs)
    v = g["batch_norm@2"]  # one var, not also the moving averages' updates
    assert v.shape == (2, 3) and len(g.select("batch_norm@*")) == 4
    ys = t.apply(p, st, None, xs)[0]
    allclose(jnp.tanh(g.value(v)), ys[2], rtol=1e-5)
    # the statistics are still inside the scope
    assert len(g.select("batch_norm/*@2")) > len(g.select("batch_norm@2"))


def _eqx_bn_scan(bn, state, xs):
    def step(carry, x):
        h, st = carry
        y, st = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(h + x, st)
        h = jnp.tanh(y)
        return (h, st), h

    return jax.lax.scan(step, (jnp.zeros((2, 3)), state), xs)


def test_equinox_batchnorm_state_in_a_scan_is_not_an_output_of_its_scope():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default mode's warning
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", momentum=0.9)
    xs = jax.random.normal(jax.random.key(0), (4, 2, 3))
    g = js.trace(_eqx_bn_scan, bn, state, xs)
    v = g["eqx.nn.BatchNorm@2"]  # the normalised value alone, as outside loops
    assert v.shape == (2, 3)
    ys = _eqx_bn_scan(bn, state, xs)[1]
    allclose(jnp.tanh(g.value(v)), ys[2], rtol=1e-5)
    np.testing.assert_equal(len(g.select("eqx.nn.BatchNorm@*")), 4)
