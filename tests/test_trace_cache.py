"""A ``jax.jit``-ed user function called many times is traced once (JAX's cache hits),
and every call still has its names: ``layer#k/pre`` is call k's own value."""

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import allclose, check_slice

import jaxsurgery as js

DEPTH = 24


def make_model(counter):
    """A fresh MLP calling one fresh ``@jax.jit`` layer per parameter set."""

    @jax.jit
    def layer(p, x):
        counter.append(1)  # runs only when JAX traces the body
        pre = x @ p["w"] + p["b"]
        return jnp.tanh(pre)

    def mlp(x, params):
        h = x
        for p in params:
            h = layer(p, h)
        return h

    return mlp


def make_args(depth=DEPTH, width=6):
    keys = jax.random.split(jax.random.key(0), 2 * depth + 1)
    params = [
        {
            "w": jax.random.normal(keys[2 * i], (width, width)) / width**0.5,
            "b": 0.1 * jax.random.normal(keys[2 * i + 1], (width,)),
        }
        for i in range(depth)
    ]
    return jax.random.normal(keys[-1], (3, width)), params


def reference_pres(x, params):
    """Each layer's pre-activation, by hand."""
    pres, h = [], x
    for p in params:
        pres.append(jnp.dot(h, p["w"]) + p["b"])
        h = jnp.tanh(pres[-1])
    return pres


def test_a_jitted_layer_called_24_times_is_traced_once_and_named_per_call():
    counter = []
    x, params = make_args()
    g = js.trace(make_model(counter), x, params)
    assert len(counter) == 1  # JAX's cache served the other 23 calls
    pres = reference_pres(x, params)
    names = [g[f"layer#{k}/pre"] for k in range(DEPTH)]
    assert len({v.index for v in names}) == DEPTH
    for k, pre in enumerate(pres):
        assert g[f"layer#{k}/pre"].primitive == "add"
        allclose(g.value(f"layer#{k}/pre"), pre)
        allclose(g.value(f"layer#{k}"), jnp.tanh(pre))
        if k:
            assert g[f"layer#{k}/x"] is g[f"layer#{k - 1}"]
        allclose(g.value(f"layer#{k}/p['w']"), params[k]["w"])
    assert g["layer#0/x"] is g["x"]
    assert g["layer#23"] is g.outputs[0]
    with pytest.raises(js.SelectionError):
        g["layer#24/pre"]


def test_slices_between_cached_calls_equal_the_reference():
    x, params = make_args()
    g = js.trace(make_model([]), x, params)
    pres = reference_pres(x, params)

    def layers(h, ks):
        for k in ks:
            h = jnp.tanh(jnp.dot(h, params[k]["w"]) + params[k]["b"])
        return h

    h3 = g.value("layer#3")
    allclose(h3, jnp.tanh(pres[3]))
    s = g.slice("layer#3", "layer#7")  # whole calls: kept as jit equations
    assert [e.primitive.name for e in s.jaxpr.eqns] == ["jit"] * 4
    check_slice(s, (h3,), lambda h: layers(h, range(4, 8)), eqns=4)
    inside = g.slice("layer#10/pre", "layer#12/pre")  # cuts inside calls 10 and 12
    assert [e.primitive.name for e in inside.jaxpr.eqns].count("jit") == 1  # call 11
    check_slice(
        inside,
        (pres[10],),
        lambda pre: jnp.dot(layers(jnp.tanh(pre), [11]), params[12]["w"]) + params[12]["b"],
    )


def test_a_second_trace_of_the_same_model_is_served_from_the_cache_with_names():
    counter = []
    x, params = make_args(depth=5)
    model = make_model(counter)
    first = js.trace(model, x, params)
    second = js.trace(model, x, params)
    assert len(counter) == 1  # the second trace did not run the body at all
    for k in range(5):
        allclose(second.value(f"layer#{k}/pre"), first.value(f"layer#{k}/pre"))
    assert [v.name for v in second.vars] == [v.name for v in first.vars]


def test_new_argument_types_trace_the_body_again_and_name_each_call():
    counter = []

    @functools.partial(jax.jit, static_argnums=2)
    def scaled(x, w, n):
        counter.append(n)
        y = jnp.sin(x * w) * n
        return y

    def f(x, w):
        a = scaled(x, w, 2)
        b = scaled(a, w, 3)
        c = scaled(b, w, 2)
        d = scaled(c[:2], w, 2)  # a new shape
        return d

    x, w = jnp.linspace(0.0, 1.0, 3), jnp.asarray(0.5)
    g = js.trace(f, x, w)
    assert counter == [2, 3, 2]  # (n=2, 3 elements) once, n=3 once, 2 elements once
    allclose(g.value("scaled#0/y"), jnp.sin(x * w) * 2)
    allclose(g.value("scaled#2/y"), jnp.sin(g.value("b") * w) * 2)
    allclose(g.value("scaled#3/y"), jnp.sin(g.value("c")[:2] * w) * 2)
    assert g["scaled#2"] is g["c"] and g["scaled#3/x"].shape == (2,)


def test_a_jitted_layer_called_in_a_scan_body_is_named_per_call_and_iteration():
    counter = []

    @jax.jit
    def layer(w, h):
        counter.append(1)
        pre = h * w + 1.0
        return jnp.tanh(pre)

    def f(h0, ws):
        def step(h, w):
            a = layer(w, h)
            b = layer(w * 2.0, a)
            return b, a

        last, firsts = jax.lax.scan(step, h0, ws)
        return last, firsts

    h0, ws = jnp.linspace(-1.0, 1.0, 4), jnp.asarray([0.5, -0.3, 0.8])
    g = js.trace(f, h0, ws)
    assert len(counter) == 1
    h = h0
    for t, w in enumerate(ws):
        allclose(g.value(f"step/layer#0/pre@{t}"), h * w + 1.0)
        a = jnp.tanh(h * w + 1.0)
        allclose(g.value(f"step/layer#1/pre@{t}"), a * (2.0 * w) + 1.0)
        h = jnp.tanh(a * (2.0 * w) + 1.0)
        assert g[f"step/layer#1@{t}"] is g[f"step/b@{t}"]
    allclose(g.value("last"), h)

    def rest(a):  # step 1's second call, then step 2 up to its second call's pre
        h = jnp.tanh(a * (2.0 * ws[1]) + 1.0)
        a = jnp.tanh(h * ws[2] + 1.0)
        return a * (2.0 * ws[2]) + 1.0

    s = g.slice("step/layer#0@1", "step/layer#1/pre@2")
    check_slice(s, (g.value("step/layer#0@1"),), rest)


def test_cached_calls_inside_cached_calls_are_named_at_every_depth():
    counter = []

    @jax.jit
    def layer(h):
        counter.append("layer")
        z = jnp.sin(h) + 1.0
        return z

    @jax.jit
    def block(h):
        counter.append("block")
        u = layer(h)
        v = layer(u * 2.0)
        return v

    def f(x):
        y = block(x)
        y = block(y)
        y = block(y)
        return y

    x = jnp.linspace(0.0, 1.0, 3)
    g = js.trace(f, x)
    assert sorted(counter) == ["block", "layer"]
    h = x
    for b in range(3):
        z0 = jnp.sin(h) + 1.0
        allclose(g.value(f"block#{b}/layer#0/z"), z0)
        z1 = jnp.sin(z0 * 2.0) + 1.0
        allclose(g.value(f"block#{b}/layer#1/z"), z1)
        assert g[f"block#{b}/v"] is g[f"block#{b}/layer#1"] is g[f"y#{b}"]
        h = z1

    def layer_ref(h):
        return jnp.sin(h) + 1.0

    def rest(u):  # the rest of block 0, block 1, and block 2's first layer
        v0 = layer_ref(u * 2.0)
        v1 = layer_ref(layer_ref(v0) * 2.0)
        return layer_ref(v1)

    s = g.slice("block#0/u", "block#2/layer#0/z")
    check_slice(s, (g.value("block#0/u"),), rest)


def test_jitted_layers_of_flax_and_equinox_modules_are_traced_once_and_named_per_call():
    import equinox as eqx
    import flax.linen as nn

    counter = []
    dense = nn.Dense(6)

    @jax.jit
    def flax_layer(p, x):
        counter.append("flax")
        pre = dense.apply(p, x)
        return jnp.tanh(pre)

    @jax.jit
    def eqx_layer(lin, x):
        counter.append("eqx")
        pre = lin(x)
        return jnp.tanh(pre)

    class Net(eqx.Module):
        linears: list

        def __call__(self, x):
            for lin in self.linears:
                x = eqx_layer(lin, x)
            return x

    def f(x, ps, net):
        for p in ps:
            x = flax_layer(p, x)
        y = net(x[0])  # equinox layers take one example
        return y

    x = jax.random.normal(jax.random.key(0), (2, 6))
    ps = [dense.init(jax.random.key(i), x) for i in range(4)]
    net = Net([eqx.nn.Linear(6, 6, key=jax.random.key(10 + i)) for i in range(4)])
    g = js.trace(f, x, ps, net)
    assert sorted(counter) == ["eqx", "flax"]
    h = x
    for k, p in enumerate(ps):
        pre = dense.apply(p, h)
        allclose(g.value(f"flax_layer#{k}/pre"), pre, rtol=1e-4)
        h = jnp.tanh(pre)
    h = h[0]
    for k, lin in enumerate(net.linears):
        pre = lin(h)
        allclose(g.value(f"net/eqx_layer#{k}/pre"), pre, rtol=1e-4)
        h = jnp.tanh(pre)
    allclose(g.value("y"), h, rtol=1e-4)


def test_a_jit_inlined_when_traced_still_names_its_calls():
    @functools.partial(jax.jit, inline=True)  # jax 0.10 inlines it; newer ones keep it
    def shift(x):
        s = x + 1.0
        return s

    def f(x):
        for _ in range(3):
            x = shift(jnp.sin(x))
        return x

    x = jnp.linspace(0.0, 1.0, 3)
    g = js.trace(f, x)
    h = x
    for k in range(3):
        h = jnp.sin(h) + 1.0
        allclose(g.value(f"shift#{k}"), h)
        assert g[f"shift#{k}"] is g[f"x#{k + 1}"]
        assert g[f"shift#{k}/s"] is g[f"shift#{k}"]  # its body's names, per call


def test_fresh_closures_keep_their_own_signature():
    """Signatures are kept per code object (a model function made afresh per trace),
    but a closure with other defaults or annotations binds and reads as its own."""

    def make(scale, note):
        def f(x: note, k=scale):
            return x * k

        return f

    g1 = js.trace(make(2.0, "a"), jnp.ones(3))
    g2 = js.trace(make(2.0, "a"), jnp.ones(3))
    g3 = js.trace(make(3.0, "b"), jnp.ones(3))
    assert g1._title == g2._title and g1._title.endswith(".f(x: 'a', k=2.0)")
    assert g3._title.endswith(".f(x: 'b', k=3.0)")
    allclose(g3.value("out"), 3.0 * jnp.ones(3))
    with pytest.raises(js.TraceError, match="do not fit"):
        js.trace(make(2.0, "a"), jnp.ones(3), 1.0, 2.0)
