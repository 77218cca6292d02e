"""Effects kept in slices (also after the last output), unbound slices of abstract
traces that need no arguments, and tracebacks without jaxsurgery's frames."""

import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose, check_slice

import jaxsurgery as js

PACKAGE = os.path.dirname(js.__file__) + os.sep

# -- effects --------------------------------------------------------------------------

LOG: list = []


def record(label):
    return lambda *values: LOG.append((label, *(np.asarray(v).tolist() for v in values)))


def printing(x):
    z1 = jnp.sin(x)
    jax.debug.callback(record("z1"), z1, ordered=True)
    z2 = jnp.cos(z1) * 2.0
    jax.debug.callback(record("z2"), z2, ordered=True)  # reads the output, after it
    later = z2 + 1.0
    jax.debug.callback(record("z2 and later"), z2, later, ordered=True)
    jax.debug.callback(record("x"), x, ordered=True)
    return later.sum()


@pytest.fixture
def log():
    LOG.clear()
    yield LOG
    LOG.clear()


def test_effects_reading_the_output_are_kept_in_order(log):
    g = js.trace(printing, jnp.ones(2))
    log.clear()
    s = g.slice("z1", "z2")
    z1 = jnp.array([0.0, 1.0])
    out = s(z1)
    np.testing.assert_allclose(out, jnp.cos(z1) * 2.0)
    z2 = (jnp.cos(z1) * 2.0).tolist()
    # the effects reading the window's values (the input too), in program order;
    # not the one reading only x, a value outside the window
    assert [entry[0] for entry in log] == ["z1", "z2", "z2 and later"]
    assert log[1][1] == pytest.approx(z2)
    # 'later' depends on the input, so it is computed from it, not held at the trace
    assert log[2][2] == pytest.approx([v + 1.0 for v in z2])
    assert len(s.jaxpr.eqns) == 6  # callback, cos, mul, callback, add, callback


def test_effects_reading_an_input_or_a_side_value_are_kept(log):
    g = js.trace(printing, jnp.ones(2))
    s = g.slice("x", "z2")
    log.clear()
    s(jnp.zeros(2))
    assert [entry[0] for entry in log] == ["z1", "z2", "z2 and later", "x"]
    log.clear()
    jax.block_until_ready(jax.jit(s)(jnp.zeros(2)))  # under jit too
    jax.effects_barrier()
    assert [entry[0] for entry in log] == ["z1", "z2", "z2 and later", "x"]


def test_no_effect_of_other_values_joins_the_slice(log):
    g = js.trace(printing, jnp.ones(2))
    s = g.slice("later", "out")
    log.clear()
    s(jnp.ones(2))
    assert [entry[0] for entry in log] == ["z2 and later"]  # reads 'later' itself


def looped(x):
    def step(h, t):
        jax.debug.callback(record("step"), h, ordered=True)
        return jnp.tanh(h + t), None

    first = jnp.sin(x)
    h, _ = jax.lax.scan(step, first, jnp.arange(3.0))
    jax.debug.callback(record("after"), h, ordered=True)
    return h.sum()


def test_values_run_their_ancestors_only_not_the_callbacks_after_them(log):
    """A value before a loop (also a first value of a graph with loops, computed by the
    structured program) runs no callback of the loop or after it, nor does
    ``values_fn`` (they ran: the loop's three, at every request)."""
    x = jnp.array([0.5, -1.0])
    g = js.trace(looped, x)
    log.clear()
    np.testing.assert_allclose(g.value("first"), jnp.sin(x), rtol=1e-6)
    np.testing.assert_allclose(g.values_fn("first")(x)["first"], jnp.sin(x), rtol=1e-6)
    jax.effects_barrier()
    assert log == []
    g.as_function()(x)  # the whole function runs them all, in order
    jax.effects_barrier()
    assert [entry[0] for entry in log] == ["step", "step", "step", "after"]
    for run in (  # so do gradients and a slice through the loop (they ran none)
        lambda: g.grads_fn("out", ["first"])(x),
        lambda: g.slice("step/h@1", "out")(g.value("step/h@1")),
    ):
        log.clear()
        run()
        jax.effects_barrier()
        assert [entry[0] for entry in log][-1] == "after", log


def test_debug_print_of_a_slice_output(capfd):
    def f(x):
        h = jnp.tanh(x)
        out = h * 3.0
        jax.debug.print("out is {}", out)
        return out

    g = js.trace(f, jnp.ones(2))
    capfd.readouterr()
    s = g.slice("h", "out")
    s(jnp.zeros(2))
    jax.block_until_ready(jax.jit(s)(jnp.zeros(2)))
    printed = capfd.readouterr().out
    assert printed.count("out is [0. 0.]") == 2, printed
    check_slice(s, (jnp.full(2, 0.5),), lambda h: h * 3.0)


# -- abstract traces ------------------------------------------------------------------


def chain(x, w):
    z1 = jnp.tanh(x * w)
    z2 = jnp.sin(z1) * 2.0
    z3 = z2 * jnp.array([1.0, -1.0])  # a constant of the program
    return (z3 * w).sum()


@pytest.fixture
def abstract():
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    return js.trace(chain, spec, spec)


def test_a_slice_without_context_runs_unbound(abstract):
    s = abstract.slice("z1", "z2")
    assert s.context_vars == ()
    z1 = jnp.array([0.1, 0.2])
    np.testing.assert_allclose(s(z1), jnp.sin(z1) * 2.0, rtol=1e-6)
    check_slice(s, (z1,), lambda z: jnp.sin(z) * 2.0, eqns=2)
    assert s.context == {}
    assert s.export().call(z1).shape == (2,)


def test_a_slice_whose_context_is_constants_runs_unbound(abstract):
    s = abstract.slice("z2", "z3")
    assert [v.primitive for v in s.context_vars] == ["const"]
    np.testing.assert_allclose(s(jnp.ones(2)), jnp.array([1.0, -1.0]))


def test_a_slice_needing_arguments_still_asks_for_bind(abstract):
    s = abstract.slice("z1", "out")  # reads w
    with pytest.raises(js.SliceError, match=r"is unbound.*call s\.bind"):
        s(jnp.ones(2))
    assert s.bind(jnp.ones(2), jnp.ones(2))(jnp.ones(2)).shape == ()
    with pytest.raises(js.SliceError, match=r"so its input has no values; call s\.bind"):
        abstract.slice("z1", "z2").input_values()


def test_binding_or_calling_with_shape_structs_asks_for_arrays(abstract):
    """They were taken, and the call failed inside jaxsurgery with JAX's TypeError
    about the context value w (an argument nobody passed to it)."""
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    for action in (
        lambda: abstract.slice("z1", "out").bind(spec, spec),
        lambda: abstract.as_function()(spec, spec),
        lambda: abstract.grads_fn("out", ["z1"])(spec, spec),
        lambda: abstract.values_fn("z2")(spec, spec),
    ):
        with pytest.raises(js.SliceError, match="`x` is a jax.ShapeDtypeStruct.*jax.eval_shape"):
            action()
    assert jax.eval_shape(abstract.as_function(), spec, spec).shape == ()


# -- tracebacks -----------------------------------------------------------------------


def internal_frames(e):
    return [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(PACKAGE)]


def raised(action):
    with pytest.raises(Exception) as info:
        action()
    return info.value


def small():
    def f(x):
        z1 = jnp.sin(x)
        return jnp.cos(z1)

    return js.trace(f, jnp.ones(3))


ACTIONS = {
    "g[...]": lambda g: g["nope"],
    "g.select": lambda g: g.select("nope*"),
    "g.slice": lambda g: g.slice("z1", "x"),
    "slice call": lambda g: g.slice("z1", "out")(jnp.ones(4)),
    "slice under jit": lambda g: jax.jit(g.slice("z1", "out"))(jnp.ones(4)),
    "g.jvp": lambda g: g.jvp("z1", "out", jnp.ones(4)),
    "bind": lambda g: g.slice("z1", "out").bind(jnp.ones(4)),
    "js.trace": lambda g: js.trace(42),
    "js.tag": lambda g: js.tag(jnp.ones(2), ""),
    "Selection.one": lambda g: g.select().one(),
    "values_fn call": lambda g: g.values_fn("z1")(jnp.ones(4)),
    "patch_fn call": lambda g: g.patch_fn("z1")({"z1": jnp.ones(4)}, jnp.ones(3)),
    "attribution_fn call": lambda g: g.attribution_fn("out", ["z1"])((jnp.ones(4),), (1.0,)),
}


@pytest.mark.parametrize("name", list(ACTIONS))
def test_errors_show_the_users_line_not_jaxsurgerys_frames(name):
    g = small()
    e = raised(lambda: ACTIONS[name](g))
    assert isinstance(e, js.SurgeryError)
    assert len(internal_frames(e)) <= 1, traceback.format_tb(e.__traceback__)
    frames = traceback.extract_tb(e.__traceback__)
    assert any(f.filename == __file__ for f in frames)  # the user's call is there


@pytest.mark.parametrize("name", ["g[...]", "g.slice", "g.jvp", "slice call"])
def test_filtering_changes_neither_type_nor_message_and_can_be_turned_off(name, monkeypatch):
    g = small()
    filtered = raised(lambda: ACTIONS[name](g))
    monkeypatch.setenv("JAXSURGERY_TRACEBACK_FILTERING", "off")
    full = raised(lambda: ACTIONS[name](g))
    assert type(full) is type(filtered) and str(full) == str(filtered)
    assert len(internal_frames(full)) > 1
    assert not getattr(filtered, "__notes__", None)  # a SurgeryError gets no note


def test_user_errors_keep_the_users_frames():
    def f(x):
        return broken(x)

    def broken(x):
        raise RuntimeError("the user's own bug")

    e = raised(lambda: js.trace(f, jnp.ones(2)))
    assert isinstance(e, RuntimeError) and str(e) == "the user's own bug"
    names = [fr.name for fr in traceback.extract_tb(e.__traceback__)]
    assert "broken" in names
    assert len(internal_frames(e)) <= 1
    assert any("JAXSURGERY_TRACEBACK_FILTERING=off" in n for n in e.__notes__)


def test_boundaries_keep_signatures_and_docs():
    import inspect

    assert "selectors" in inspect.signature(js.Graph.select).parameters
    assert js.Graph.select.__doc__.startswith("Vars matching")
    assert js.trace.__wrapped__.__module__ == "jaxsurgery._trace"


def growing(x):
    def more(carry):
        return carry[1].sum() < 10.0

    def body(carry):
        i, h = carry
        a = jnp.exp(h) + 0.1
        jax.debug.callback(record("trip"), a, ordered=True)
        return i + 1, a * 2.0

    return jax.lax.while_loop(more, body, (0, x))[1].sum()


def test_tracing_runs_no_callback_of_a_while_loop(log):
    """A while_loop whose body calls back to the host stays one equation: its trips
    are not counted by running it while tracing (that ran the user's callbacks, a
    logger's writes, at trace time); its values still answer per trip."""
    x = jnp.full(2, 0.1)
    log.clear()
    g = js.trace(growing, x)
    jax.effects_barrier()
    assert log == []
    a0 = jnp.exp(x) + 0.1
    np.testing.assert_allclose(g.value("body/a@1"), jnp.exp(2 * a0) + 0.1, rtol=1e-6)
    np.testing.assert_allclose(g.as_function()(x), growing(x), rtol=1e-6)
    s = g.slice("body/a@1", "out")  # the loop goes on from there as the condition says
    np.testing.assert_allclose(s(jnp.full(2, 20.0)), 80.0)


def test_a_value_in_a_loop_runs_the_loop_up_to_it(log):
    """A value at an iteration the program computes with edits (a patched graph, a
    while_loop's trip) runs the loop up to that iteration: the trips after it ran,
    with their callbacks, for a value that does not need them."""

    def long_scan(x):
        def step(h, t):
            jax.debug.callback(record("step"), h, ordered=True)
            h = jnp.tanh(h + t)
            return h, None

        h, _ = jax.lax.scan(step, x, jnp.arange(50.0) * 0.01)
        return h.sum()

    x = jnp.array([0.5, -1.0])
    patched = js.trace(long_scan, x).replace("step/h#1@1", lambda h: h * 0.5)
    log.clear()
    h1 = jnp.tanh(jnp.tanh(x) + 0.01) * 0.5
    np.testing.assert_allclose(patched.value("step/h#1@3"), jnp.tanh(jnp.tanh(h1 + 0.02) + 0.03))
    jax.effects_barrier()
    assert [entry[0] for entry in log] == ["step"] * 4
    log.clear()
    np.testing.assert_allclose(patched.as_function()(x), _patched_scan(x), rtol=1e-6)
    jax.effects_barrier()
    assert len(log) == 50  # the whole function runs every step

    def counted(x):
        def body(carry):
            i, h = carry
            jax.debug.callback(record("trip"), i, ordered=True)
            h = jnp.sin(h) + 0.1
            return i + 1, h

        return jax.lax.while_loop(lambda c: c[0] < 20, body, (0, x))[1].sum()

    x = jnp.full(2, 0.1)
    g = js.trace(counted, x)
    by_hand = jnp.sin(jnp.sin(jnp.sin(x) + 0.1) + 0.1) + 0.1
    for graph in (g, g.replace("body/h#1@0", lambda h: h)):
        log.clear()
        # selecting it counts the trips without running the callbacks, the value
        # runs trips 0..2
        np.testing.assert_allclose(graph.value("body/h#1@2"), by_hand, rtol=1e-6)
        jax.effects_barrier()
        # (in the patched graph, the loop's operands are found without running the
        # loop for its patch: trips 0 and 1 ran twice)
        assert [entry[1] for entry in log] == [0, 1, 2], log


def _patched_scan(x):
    h = x
    for t in range(50):
        h = jnp.tanh(h + t * 0.01)
        h = h * 0.5 if t == 1 else h
    return h.sum()


def test_a_callback_in_a_while_condition_runs_once_a_trip_with_its_carry(log):
    """Counting a while_loop's trips (to select a value in it) runs only what its
    condition's test needs: a print in the condition showed the counter, which the
    test does not read, as 0 at every trip; the value then ran the condition of the
    trip it stopped at twice."""

    def halving(x):
        def more(c):
            i, v = c
            jax.debug.callback(record("cond"), i, v, ordered=True)
            return v > 0.1

        def body(c):
            i, v = c
            nv = v * 0.5
            return i + 1, nv

        i, v = jax.lax.while_loop(more, body, (0, jnp.sum(x)))
        return v * i

    g = js.trace(halving, jnp.array([0.3, -0.2, 0.5]))
    log.clear()
    np.testing.assert_allclose(g.value("body/nv@1"), 0.15, rtol=1e-6)
    jax.effects_barrier()
    assert [entry[1] for entry in log] == [0, 1], log
    np.testing.assert_allclose([entry[2] for entry in log], [0.6, 0.3], rtol=1e-6)
    # a patch at a later trip changes nothing before it: the loop stops where asked
    patched = g.replace("body/nv@2", lambda v: v * 0.1)
    log.clear()
    np.testing.assert_allclose(patched.value("body/nv@0"), 0.3, rtol=1e-6)
    jax.effects_barrier()
    assert [entry[1] for entry in log] == [0], log


def test_tracing_runs_no_io_callback_that_decides_a_cond_or_a_loop(log):
    """An ``io_callback`` whose result decides a cond (or a while_loop's trips) is not
    run while tracing to decide it, as ``make_jaxpr`` runs none: the host saw an extra
    call, and the graph held the branch that call chose. The cond stays one equation,
    the loop is folded, and a note says why."""
    from jax.experimental import io_callback

    def ask(p):
        log.append(("host", float(p)))
        return np.float32(len(log))

    def decided(x):
        p = jnp.sum(jnp.sin(x))
        n = io_callback(ask, jax.ShapeDtypeStruct((), jnp.float32), p, ordered=True)
        y = jax.lax.cond(n > 1, jnp.cos, jnp.sin, x)
        k, _ = jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] + 1, c[1] + 0.5), (0, 0.0))
        return y * k

    x = jnp.array([0.3, -0.2, 0.5])
    log.clear()
    g = js.trace(decided, x)
    jax.effects_barrier()
    assert log == []
    assert any("comes out of an io_callback" in n for n in g.notes), g.notes
    np.testing.assert_allclose(g.value("out"), jnp.sin(x) * 2, rtol=1e-6)  # n = 1: sin, 2 trips
    log.clear()
    np.testing.assert_allclose(g.as_function()(x), jnp.sin(x) * 2, rtol=1e-6)
    jax.effects_barrier()
    assert len(log) == 1


def test_a_slice_keeping_an_io_callback_says_it_has_no_derivative(log):
    """An io_callback that reads a slice's output (host logging) is kept with it, and
    JAX differentiates no io_callback: the slice says so, and g.jvp/g.vjp/g.jacobian
    refuse it with a SliceError (they raised JAX's error, naming no value)."""
    from jax.experimental import io_callback

    def logged(x):
        h = jnp.tanh(x)
        z = jnp.sin(h)
        io_callback(lambda v: log.append(np.asarray(v).tolist()), None, z, ordered=True)
        return jnp.sum(z**2)

    x = jnp.array([0.3, -0.2, 0.5])
    g = js.trace(logged, x)
    s = g.slice("h", "z")
    assert any("keeps an io_callback" in n for n in s.notes), s.notes
    np.testing.assert_allclose(s(jnp.tanh(x)), jnp.sin(jnp.tanh(x)), rtol=1e-6)
    for ask in (
        lambda: g.jvp("h", "z", jnp.ones(3)),
        lambda: g.vjp("h", "z", jnp.ones(3)),
        lambda: g.jacobian("h", "z"),
    ):
        with pytest.raises(js.SliceError, match="no derivative of .*keeps an io_callback"):
            ask()
    # a slice the callback reads nothing of differentiates as usual
    np.testing.assert_allclose(g.jvp("x", "h", jnp.ones(3))[1], 1 - jnp.tanh(x) ** 2, rtol=1e-6)

    @jax.jit
    def logged_sin(h):  # inside a call the slice keeps whole: JAX's refusal, as a SliceError
        io_callback(lambda v: log.append(np.asarray(v).tolist()), None, h, ordered=True)
        return jnp.sin(h)

    g = js.trace(lambda x: jnp.sum(logged_sin(jnp.tanh(x)) * 3), x)
    h = g.select(primitive="tanh").one()
    for ask in (
        lambda: g.jvp(h, "out", jnp.ones(3)),
        lambda: g.grads("out", wrt=h),
    ):
        with pytest.raises(js.SliceError, match="reaches an io_callback that reads a value"):
            ask()


def test_a_slice_cut_inside_a_loop_keeps_its_io_callbacks(log):
    """A slice cut inside a folded scan ran its iterations' jax.debug.callbacks and none
    of their io_callbacks, nor did its context (JAX's partial evaluation, which splits
    the loop, keeps debug effects only): both run now, and the slice says that JAX
    differentiates none of them (g.jvp refuses with a SliceError)."""
    from jax.experimental import io_callback

    def rnn(x):
        def step(c, xt):
            u = jnp.sin(c) + xt
            io_callback(lambda v: log.append(float(v[0])), None, u, ordered=True)
            return u * 0.5, None

        return jax.lax.scan(step, x, jnp.stack([x, x + 1, x + 2, x + 3]))[0] * 2

    def by_hand(u, start):  # the u of each iteration from ``start`` on, given u there
        us = [u]
        for t in range(start + 1, 4):
            us.append(jnp.sin(us[-1] * 0.5) + x + t)
        return [float(v[0]) for v in us]

    x = jnp.array([0.5])
    g = js.trace(rnn, x)
    s = g.slice("step/u@1", "out")
    z, out = g.value("step/u@1"), rnn(x)
    jax.effects_barrier()
    log.clear()
    np.testing.assert_allclose(s(z), out, rtol=1e-6)  # the context runs u@0's
    jax.effects_barrier()
    np.testing.assert_allclose(log, [float(jnp.sin(x)[0] + x[0]), *by_hand(z, 1)], rtol=1e-6)
    for run in (s, jax.jit(s)):
        log.clear()
        run(z + 1.0)
        jax.effects_barrier()
        np.testing.assert_allclose(log, by_hand(z + 1.0, 1), rtol=1e-6)
    assert any("keeps an io_callback" in n for n in s.notes), s.notes
    with pytest.raises(js.SliceError, match="no derivative of .*keeps an io_callback"):
        g.jvp("step/u@1", "out", jnp.ones(1))


def test_symbolic_shapes_say_what_runs_and_what_has_no_name():
    """jax.export's symbolic dimensions: a scan of symbolic length raised JAX's
    InconclusiveDimensionOperation when an iteration was selected; a symbolic shape of
    another scope read "is float32[b, 16], but traced with float32[b, 16]"."""
    from jax import export

    def rnn(xs, h0):
        def step(h, x):
            hn = jnp.tanh(h + x)
            return hn, hn

        return jax.lax.scan(step, h0, xs)[0]

    spec = jax.ShapeDtypeStruct(export.symbolic_shape("t, 3"), jnp.float32)
    g = js.trace(rnn, spec, jax.ShapeDtypeStruct((3,), jnp.float32))
    for selector in ("step/hn@2", "step/hn@*"):
        with pytest.raises(js.SelectionError, match="symbolic length t"):
            g.select(selector)
    assert "symbolic length's iterations have no names" in g.notes[0]

    def f(x, w):
        h = jnp.tanh(x @ w)
        return h.sum(0)

    w = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    xs = jax.ShapeDtypeStruct(export.symbolic_shape("b, 16"), jnp.float32)
    whole = js.trace(f, xs, w).as_function()
    again = jax.ShapeDtypeStruct(export.symbolic_shape("b, 16"), jnp.float32)
    with pytest.raises(js.SliceError, match="another scope's"):
        export.export(jax.jit(whole))(again, w)
    with pytest.raises(js.SliceError, match="runs where they are symbolic"):
        whole(jnp.ones((3, 16)), jnp.ones((16, 4)))
    exported = export.export(jax.jit(whole))(xs, w)
    x, wv = jnp.arange(48.0).reshape(3, 16) / 48, jnp.ones((16, 4)) / 4
    allclose(exported.call(x, wv), f(x, wv))


def test_a_graph_used_after_the_transform_it_was_traced_in_says_so():
    """Traced inside jax.jit and used after it: g.value and g.grads raised JAX's
    UnexpectedTracerError; the functions taking arguments still run."""
    saved = {}

    def f(x, w):
        h = jnp.tanh(x @ w)
        out = jnp.sin(h @ w)
        return out

    @jax.jit
    def step(x, w):
        saved["g"] = js.trace(f, x, w)
        return saved["g"].grads_fn("out", ["h"])(x, w)["h"]

    x, w = jnp.ones((2, 4)), jnp.eye(4) / 2
    step(x, w)
    g = saved["g"]
    for use in (lambda: g.value("h"), lambda: g.grads("out", ["h"])):
        with pytest.raises(js.SliceError, match="tracers of a transform that has ended"):
            use()
    allclose(g.as_function()(x, w), f(x, w))


def test_a_name_inside_a_cond_kept_whole_says_why_it_has_no_value():
    def f(x, p):
        def big(y):
            h = jnp.sin(y)
            return h * 2

        c = jax.lax.cond(p > 0, big, jnp.cos, x)
        return (c**2).sum()

    g = js.trace(f, jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    with pytest.raises(js.SelectionError, match="keeps a cond as one equation"):
        g.slice("big/h", "out")
