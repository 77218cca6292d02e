"""Graphs in long-running programs: what they keep alive, slices jitted before any
other use, traces from threads, and js.trace inside a jitted function."""

import concurrent.futures
import functools
import gc
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose

import jaxsurgery as js
from jaxsurgery import _instrument


def _scanned(x):
    a = jnp.sin(x)

    def body(h, xi):
        h2 = jnp.cos(h + xi) * a
        return h2, h2

    h, _ = jax.lax.scan(body, x, jnp.ones((3, 4)))
    return h.sum()


def _chain(x, w):
    a = jnp.sin(x)
    b = jnp.tanh(w @ x)
    c = jnp.cos(b) * a
    return c.sum()


def test_a_slice_jitted_before_any_other_use_keeps_no_tracer():
    """A slice's context was first computed under ``jax.jit`` and kept as that trace's
    tracers: every later eager call or retrace raised UnexpectedTracerError (a slice of
    a folded loop, and every slice of a patched graph)."""
    x = jnp.arange(4.0) / 4
    g = js.trace(_scanned, x)
    s, z = g.slice("body/h2@1", "h"), g.value("body/h2@1")
    want = jnp.cos(z + 1.0) * jnp.sin(x)
    allclose(jax.jit(s)(z), want)
    allclose(s(z), want)
    allclose(jax.jit(jax.vmap(s))(jnp.stack([z, z]))[1], want)
    w = jnp.eye(4) * 0.5
    patched = js.trace(_chain, x, w).replace("a", lambda a: a * 2.0)
    s, b = patched.slice("b", "c"), patched.value("b")
    allclose(jax.jit(s)(b), jnp.cos(b) * jnp.sin(x) * 2.0)
    allclose(s(b), jnp.cos(b) * jnp.sin(x) * 2.0)
    allclose(patched.value("a"), jnp.sin(x) * 2.0)


def test_a_jitted_function_a_trace_met_is_released_with_what_it_holds(monkeypatch):
    """Each ``@jax.jit`` function a trace meets gets a rewritten twin, cached per
    function: the twin held its function, so the cache never let go of it, nor of the
    arrays it closed over (4 MB a step in a loop making layers); and the progress
    thread kept the last trace's recorder, which holds what the traced function called."""
    monkeypatch.setenv("JAXSURGERY_PROGRESS", "1")
    x, released = jnp.ones(8), []
    for i in range(3):
        big = jnp.full((64, 8), float(i))

        @jax.jit
        def layer(h, big=big):
            return jnp.tanh(h + big[0])

        def f(x, layer=layer):
            h = layer(x)
            return h.sum()

        g = js.trace(f, x)
        allclose(g.value("layer"), jnp.tanh(x + i))
        released.append((weakref.ref(layer), weakref.ref(big)))
        del g, f, layer, big
    gc.collect()
    assert [(a(), b()) for a, b in released] == [(None, None)] * 3


class _Model:
    def __init__(self, w):
        self.w = w
        self.layer = jax.jit(self._layer)  # a jitted bound method, as in plain-JAX code
        self.scaled = jax.jit(functools.partial(_scaled_layer, w))  # a jitted partial

    def _layer(self, h):
        pre = self.w @ h
        return jnp.tanh(pre)

    def __call__(self, x):
        h1 = self.layer(x)
        return self.scaled(h1).sum()


def _scaled_layer(w, h):
    inner = w @ h * 2.0
    return jnp.sin(inner)


def test_names_inside_a_jitted_bound_method_and_a_jitted_partial():
    """``jax.jit(self._layer)`` and ``jax.jit(functools.partial(f, w))`` hid their
    values (and the partial's call name) with no note; the bound method's twin holds
    the object weakly, so the model is released with its jit."""
    w, x = jnp.eye(4) * 0.5, jnp.linspace(-1.0, 1.0, 4)
    m = _Model(w)
    g = js.trace(lambda m, x: m(x), m, x)  # (a static argument: not a pytree)
    h1 = jnp.tanh(w @ x)
    allclose(g.value("m/layer/pre"), w @ x)
    allclose(g.value("m/scaled/inner"), w @ h1 * 2.0)
    assert not g.notes
    dead = weakref.ref(m)
    del g, m
    gc.collect()
    assert dead() is None


def _two_layers(x):
    a = jnp.tanh(x)
    return a.sum()


def test_traces_from_threads_run_one_at_a_time_and_put_libraries_back():
    """While tracing, library classes are patched (an Equinox Sequential names its
    items); two traces overlapping in threads put back each other's patches as the
    originals, for good: later traces nested the items' names 20 deep."""
    call = eqx.nn.Sequential.__dict__["__call__"]

    def work(n):
        for _ in range(n):
            assert "a" in js.trace(_two_layers, jnp.ones(4)).names()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(work, [40, 40]))
    assert eqx.nn.Sequential.__dict__["__call__"] is call
    seq = eqx.nn.Sequential([eqx.nn.Linear(3, 3, key=jax.random.key(0)), eqx.nn.Lambda(jnp.tanh)])
    names = js.trace(lambda m, x: m(x), seq, jnp.ones(3)).names()
    assert "m/layers[0]" in names and not [n for n in names if "layers[0]/layers[0]" in n]


def _branching(x):
    a = jnp.sin(x)
    b = jax.lax.cond(a.sum() > 0, lambda t: t * 2.0, lambda t: t - 5.0, a)
    _, c = jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, s[1] * 0.5), (0, b))
    return c.sum()


@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_js_trace_inside_a_transform_keeps_conds_and_loops_whole(transform):
    """Traced inside ``jax.jit`` (or ``vmap``), the arguments are the transform's
    tracers, which decide no cond or loop while tracing (converting them to decide
    raised JAX's tracer errors); the graph's values and gradients are staged."""

    def step(x):
        g = js.trace(_branching, x)
        return g.value("out"), g.grads("b", wrt=["a"])["a"]  # (no reverse mode of a while)

    x = jnp.array([0.5, 0.2, -0.1])
    run = jax.jit(step) if transform == "jit" else (lambda x: jax.vmap(step)(x[None]))
    value, grad = run(x)
    a = jnp.sin(x)
    allclose(jnp.squeeze(value), _branching(x))
    allclose(jnp.squeeze(grad), jnp.full_like(a, 2.0))  # the cond's branch: a * 2


def _scaled_scan(x, scale):
    a = jnp.sin(x) * scale

    def body(h, _):
        h2 = jnp.cos(h) * scale
        return h2, None

    h, _ = jax.lax.scan(body, a, None, length=3)
    return jnp.tanh(h).sum()


def test_a_graph_traced_inside_a_jitted_step_over_a_traced_closure():
    """A training step traces ``lambda x: model(x, params)`` at a fixed ``x`` inside
    ``jax.jit``: the function closes over the step's tracers, so its values are that
    trace's (staged, and not kept: computing them eagerly raised UnexpectedTracerError),
    and so is a replacement that closes over one."""
    x0 = jnp.arange(3.0) / 3

    def step(scale):
        g = js.trace(lambda x: _scaled_scan(x, scale), x0)
        h1 = g.value("_scaled_scan/body/h2@1")
        s = g.slice("_scaled_scan/body/h2@0", "out")
        replaced = g.replace("_scaled_scan/a", lambda a: a * 0 + scale).value("out")
        return g.value("_scaled_scan/a"), h1, s(g.value("_scaled_scan/body/h2@0")), replaced

    a, h1, out, replaced = jax.jit(step)(jnp.float32(2.0))
    allclose(a, jnp.sin(x0) * 2.0)
    allclose(h1, jnp.cos(jnp.cos(jnp.sin(x0) * 2.0) * 2.0) * 2.0)
    allclose(out, _scaled_scan(x0, 2.0))
    h = jnp.full(3, 2.0)
    for _ in range(3):
        h = jnp.cos(h) * 2.0
    allclose(replaced, jnp.tanh(h).sum())
    allclose(jax.grad(lambda s: step(s)[0].sum())(2.0), jnp.sin(x0).sum())


def _long_while(x):
    def body(s):
        i, h = s
        for _ in range(60):  # a body too large to unroll 300 trips of: folded
            h = jnp.cos(h) * 0.9 + 0.01
        hb = h
        return i + 1, hb

    _, h = jax.lax.while_loop(lambda s: s[0] < 300, body, (0, x))
    return h.sum()


def test_a_folded_while_loops_iteration_first_named_inside_jax_jit():
    """Naming an iteration of a folded while_loop counts its trips; first asked inside
    ``jax.jit``, the count was that trace's, and ``int()`` of it raised JAX's
    ConcretizationTypeError."""
    x0 = jnp.array([0.5, 0.2, -0.1])
    want = js.trace(_long_while, x0).value("body/hb@5")
    g = js.trace(_long_while, x0)
    allclose(jax.jit(lambda z: g.value("body/hb@5") + z)(0.0), want)
    g = js.trace(_long_while, x0)
    allclose(jax.jit(lambda h: g.slice("body/hb@5", "h")(h))(want), g.value("h"))


def _sine(x):
    h = jnp.sin(x)
    return h * 2


def test_a_numpy_argument_converted_when_first_needed_under_jax_jit():
    """A float64 NumPy argument is converted to float32 (what the function saw) when
    first needed: first needed under ``jax.jit``, the conversion was that trace's and
    was kept, and every later value raised UnexpectedTracerError."""
    x = np.linspace(0.0, 1.0, 4)  # float64
    g = js.trace(_sine, x)
    want = jnp.sin(jnp.asarray(x, jnp.float32))
    allclose(jax.jit(lambda: g.value("h"))(), want)
    allclose(jax.jit(lambda z: g.value("h") + z)(0.0), want)
    allclose(g.value("h"), want)
    assert g.value("x").dtype == jnp.float32


def test_a_closed_over_tracer_deciding_a_loop_or_cond_traced_inside_jax_jit():
    """Traced inside ``jax.jit`` at concrete arguments, a cond or while_loop decided by
    a tracer the function closes over raised JAX's tracer errors: it stays whole."""
    v0 = jnp.array([1.0, 2.0, 3.0])

    def looped(v, thr):
        def body(st):
            i, v = st
            return i + 1, v * 0.9 + 0.01

        i, v = jax.lax.while_loop(lambda st: st[1].sum() > thr, body, (0, v))
        return v.sum() * i

    def branched(v, thr):
        return jax.lax.cond(thr > 0, jnp.sin, jnp.cos, v).sum()

    for fn, other in ((looped, 2.5), (branched, -1.0)):  # another trip count, branch

        @jax.jit
        def step(thr, fn=fn):
            g = js.trace(lambda v: fn(v, thr), v0)
            return g.value(g.outputs[0])

        allclose(step(1.0), fn(v0, 1.0))
        allclose(step(other), fn(v0, other))


def test_a_trace_leaks_no_tracer_to_jax_checking_leaks():
    """js.trace failed under jax.checking_leaks ("Leaked trace DynamicJaxprTrace"): its
    call cache kept the bound methods of tracers (`h.sum`) it had looked at."""

    @jax.jit
    def layer(h):
        return jnp.tanh(h) * 2

    def f(x):
        h = jnp.sin(x)
        h = layer(h).reshape(-1)
        q = jax.lax.cond(h[0] > 0, lambda a: a * 2.0, lambda a: a - 1.0, h)
        c, _ = jax.lax.scan(lambda c, _: (c * 0.5, None), q, None, length=2)
        return c.sum() + h.mean()

    x = jnp.arange(3.0)
    with jax.checking_leaks():
        g = js.trace(f, x)
    allclose(g.value("out"), f(x))


def test_what_runs_as_it_is_is_kept_across_traces_without_keeping_what_it_is_bound_to():
    """The functions found to run as they are (JAX's, builtins) are kept across traces;
    a list's ``append`` bound to a list of tracers, a tracer's ``h.sum`` and a jit made
    per call are not (kept, they would leak the trace to jax.checking_leaks), and each
    still runs as it is, its results named."""

    def f(x):
        hs = []
        h = jnp.sin(x)
        hs.append(h)
        h3 = jax.jit(lambda a: a * 3.0)(h)
        hs.append(h3)

        # made per call, posing as JAX's (no closure: the tracer is a default; the
        # regression hunt's find: kept, it kept the trace alive)
        @functools.wraps(jnp.tanh)
        def shifted(y, h=h):
            return y + h

        e = jax.jit(jnp.einsum, static_argnums=0)("i,i->", x, x)  # a jit made per call
        total = max(len(hs), 1) * sum(v.sum() for v in hs) + shifted(x).sum() + e
        return total

    x = jnp.arange(3.0)
    for _ in range(2):  # (the second trace finds them kept)
        with jax.checking_leaks():
            g = js.trace(f, x)
        allclose(g.value("out"), f(x))
        allclose(g.value("h3"), jnp.sin(x) * 3.0)
    kept = _instrument._AS_THEY_ARE.values()
    assert not any(type(k).__name__ == "PjitFunction" for k in kept)  # (a jit's function is)


def test_tracing_modules_leaks_no_tracer_to_jax_checking_leaks():
    """The graph kept what the traced function called, modules whose leaves were the
    trace's tracers (an Equinox MLP under jax.vmap, a linen module's scope variables):
    a leak to jax.checking_leaks (on jax 0.10, JAX's own report crashed)."""
    import flax.linen as nn

    mlp = eqx.nn.MLP(8, 1, 16, 2, key=jax.random.key(0))
    x = jnp.ones((4, 8))

    def f(m, x):
        return jax.vmap(m)(x).sum()

    with jax.checking_leaks():
        g = js.trace(f, mlp, x)
    allclose(g.value("out"), f(mlp, x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(4)(x))).sum()

    net = Net()
    variables = net.init(jax.random.key(0), x)
    with jax.checking_leaks():
        g = js.trace(net.apply, variables, x)
    allclose(g.value("out"), net.apply(variables, x))
