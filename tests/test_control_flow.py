"""Loops and conditionals: values per iteration ("body/h@3"), slices that unroll only
what they need, and loops kept whole when a slice takes them as a unit."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose, check_slice, work

import jaxsurgery as js


# -- a GRU RNN over 20 steps with lax.scan (as in Equinox's RNN example) -----------------------
def rnn(cell, h0, xs):
    def step(h, x):
        h_new = cell(x, h)
        return h_new, h_new

    h_last, hs = jax.lax.scan(step, h0, xs)
    return h_last


def test_gru_rnn_jacobian_across_steps(key):
    cell = eqx.nn.GRUCell(3, 4, key=key)
    xs = jax.random.normal(jax.random.key(1), (20, 3))
    h0 = jax.random.normal(jax.random.key(2), (4,))
    g = js.trace(rnn, cell, h0, xs)
    # step/h@t is the carry entering step t: h_t, the state after t steps
    assert g["step/h@5"] is g["step/h_new@4"]
    assert len(g.select("step/h_new@*")) == 20
    assert g["h_last"] is g["step/h_new@19"]

    def unrolled(h5):  # the reference: the loop from step 5 on, unrolled by hand
        h = h5
        for t in range(5, 20):
            h = cell(xs[t], h)
        return h

    h5 = g.value("step/h@5")
    jac = g.jacobian("step/h@5", "h_last")  # ∂h_20/∂h_5
    allclose(jac, jax.jacfwd(unrolled)(h5), rtol=1e-4)
    s = g.slice("step/h@5", "h_last")
    # steps 5..19 only: h@5 is what step 4 returned, then a scan over steps 5..19
    one_step = work(jax.make_jaxpr(cell)(xs[0], h0).jaxpr, "tanh")
    assert one_step > 0 and work(s.jaxpr, "tanh") == 15 * one_step
    assert [e.params["length"] for e in s.jaxpr.eqns if e.primitive.name == "scan"] == [15]
    check_slice(s, (h5,), unrolled)


def test_a_slice_over_the_whole_loop_keeps_it_a_loop(key):
    cell = eqx.nn.GRUCell(3, 4, key=key)
    xs = jax.random.normal(jax.random.key(1), (20, 3))
    g = js.trace(rnn, cell, jnp.zeros(4), xs)
    s = g.slice("h0", "h_last")
    assert [e.primitive.name for e in s.jaxpr.eqns] == ["scan"]
    check_slice(s, (jnp.zeros(4),), lambda h0: rnn(cell, h0, xs))
    # and it is still a loop over the sequence when the sequence is the input
    s2 = g.slice("xs", "h_last")
    assert [e.primitive.name for e in s2.jaxpr.eqns] == ["scan"]
    check_slice(s2, (xs,), lambda xs: rnn(cell, jnp.zeros(4), xs))


# -- scan over 12 layers with stacked parameters ------------------------------------------------
def scanned_mlp(params, x):
    def layer(h, p):
        w, b = p
        out = jnp.tanh(h @ w + b)
        return out, None

    h, _ = jax.lax.scan(layer, x, params)
    return h


def test_scan_over_layers_slice_takes_only_its_layers(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = (jax.random.normal(k1, (12, 6, 6)) / 2.0, jax.random.normal(k2, (12, 6)))
    x = jax.random.normal(k3, (2, 6))
    g = js.trace(scanned_mlp, params, x)
    # the output of layer 3 (1-based) is the input of iteration 3; the output of layer 7
    # is iteration 6's output: four layers of work, iterations 3, 4, 5 and 6
    s = g.slice("layer/h@3", "layer/out@6")
    assert work(s.jaxpr, "dot_general") == 4
    assert work(s.jaxpr, "tanh") == 4

    def layers_4_to_7(h):
        for t in range(3, 7):
            h = jnp.tanh(h @ params[0][t] + params[1][t])
        return h

    check_slice(s, (g.value("layer/h@3"),), layers_4_to_7)
    # the stacked weights are context: dout/dW for one layer is a slice from the params
    w6 = g.select("layer/w@6").one()
    check_slice(
        g.slice(w6, "layer/out@6"),
        (params[0][6],),
        lambda w: jnp.tanh(g.value("layer/h@6") @ w + params[1][6]),
    )


# -- fori_loop, while_loop, cond --------------------------------------------------------------
def fori(x):
    def body(i, h):
        h_next = jnp.sin(h) * (i + 1.0)
        return h_next

    y = jax.lax.fori_loop(0, 8, body, x)
    return y


def test_fori_loop_slice():
    x = jnp.array([0.1, 0.2, 0.3])
    g = js.trace(fori, x)
    s = g.slice("body/h@2", "body/h_next@5")

    def reference(h):
        for i in range(2, 6):
            h = jnp.sin(h) * (i + 1.0)
        return h

    check_slice(s, (g.value("body/h@2"),), reference)
    assert g.slice("x", "y").jaxpr.eqns[0].primitive.name == "scan"


def fixed_point(a):
    def keep_going(state):
        x, prev = state
        return jnp.abs(x - prev) > 1e-4

    def improve(state):
        x, _ = state
        x_new = jnp.cos(a * x)
        return x_new, x

    x_star, _ = jax.lax.while_loop(keep_going, improve, (jnp.cos(a), jnp.zeros_like(a)))
    return x_star


def test_while_loop_fixed_point_slice():
    a = jnp.array(0.7)
    g = js.trace(fixed_point, a)
    trips = len(g.select("improve/x_new@*"))
    assert trips > 5
    s = g.slice("improve/x_new@2", "x_star")
    assert any("while" in n and f"{trips} traced trips" in n for n in s.notes)

    def reference(x):
        for _ in range(trips - 3):
            x = jnp.cos(a * x)
        return x

    # its input decides the trip count: near the traced value the loop runs as traced,
    # from elsewhere it would converge in another number of trips (a SliceError)
    x2 = g.value("improve/x_new@2")
    for x in (x2, x2 + 1e-7):
        allclose(s(x), reference(x))
        allclose(jax.jit(s)(x), reference(x))
        allclose(jax.jvp(s, (x,), (1.0,))[1], jax.jvp(reference, (x,), (1.0,))[1])
        allclose(jax.grad(s)(x), jax.grad(reference)(x))
    with pytest.raises(js.SliceError, match="traced trips of a while_loop"):
        s(x2 + 0.5)
    whole = g.slice("a", "x_star")  # the whole loop: still a while_loop, any trip count
    assert [e.primitive.name for e in whole.jaxpr.eqns][-1] == "while"
    allclose(whole(jnp.array(0.3)), fixed_point(jnp.array(0.3)))


def test_while_loop_with_abstract_inputs_explains_itself():
    g = js.trace(fixed_point, jax.ShapeDtypeStruct((), jnp.float32))
    assert any("while_loop stays one equation" in n for n in g.notes)
    with pytest.raises(js.SliceError, match=r"inside a loop iteration.*abstract.*fori_loop"):
        g.slice("improve/x_new@2", "x_star")
    s = g.slice("a", "x_star").bind(jnp.array(0.7))  # the loop as a unit still works
    allclose(s(jnp.array(0.7)), fixed_point(jnp.array(0.7)))


def branchy(x):
    def positive(v):
        doubled = v * 2.0
        return jnp.sin(doubled)

    def negative(v):
        shifted = v - 1.0
        return jnp.cos(shifted)

    pre = x * 3.0
    y = jax.lax.cond(pre.sum() > 0, positive, negative, pre)
    return y


def test_cond_taken_branch_is_selectable_and_sliced():
    x = jnp.array([0.5, 1.0])
    g = js.trace(branchy, x)
    assert g["positive/doubled"].primitive == "mul"
    with pytest.raises(js.SelectionError, match="no var named 'negative/shifted'"):
        g["negative/shifted"]  # not the branch taken for these values
    s = g.slice("positive/doubled", "y")
    check_slice(s, (g.value("positive/doubled"),), jnp.sin)
    s2 = g.slice("pre", "positive/doubled")
    assert any("branch 1" in n for n in s2.notes)
    whole = g.slice("pre", "y")  # the cond as a unit: both branches, any predicate
    assert [e.primitive.name for e in whole.jaxpr.eqns] == [
        "reduce_sum",  # the predicate depends on the input, so it is recomputed
        "gt",
        "convert_element_type",
        "cond",
    ]
    allclose(whole(-jnp.ones(2)), jnp.cos(-jnp.ones(2) - 1.0))
    h = js.trace(branchy, -x)
    assert h["negative/shifted"].primitive == "sub"


@pytest.mark.parametrize("padding", [0, 120], ids=["small", "large"])
def test_a_vmapped_while_loop_with_a_condition_per_lane_stays_whole(padding):
    """Under jax.vmap a while_loop's condition is per lane (bool[n]): lanes stop at
    different trips, and its body computes every lane at every trip (JAX keeps a
    finished lane's carry only when it lowers the loop). It runs as one equation:
    the whole function, slices across it and their derivatives are the function's;
    values inside it are a SliceError saying so."""

    def newton_sqrt(a):
        def body(x):
            for _ in range(padding):
                x = x * 1.0 + 0.0
            nx = 0.5 * (x + a / x)
            return nx

        return jax.lax.while_loop(lambda x: jnp.abs(x * x - a) > 1e-4, body, jnp.ones_like(a))

    def f(a):
        r = jax.vmap(newton_sqrt)(a)
        return jnp.sum(r)

    a = jnp.array([1.0, 2.0, 100.0])  # lane 0 stops at once, lane 2 after 8 trips
    g = js.trace(f, a)
    assert any("condition is per lane" in n for n in g.notes)
    for new in (a, jnp.array([9.0, 1.0, 400.0])):
        allclose(g.as_function()(new), f(new))
    s = g.slice("a", "out")
    allclose(s(a), f(a))
    allclose(jax.jvp(s, (a,), (jnp.ones(3),))[1], jax.jvp(f, (a,), (jnp.ones(3),))[1], rtol=1e-4)
    with pytest.raises(js.SliceError, match="condition per lane"):
        g.value("newton_sqrt/body/nx@2")


def many_trips(a, work=1):
    def body(c):
        i, x = c
        for _ in range(work):  # a bigger body: work x 5 equations
            x = jnp.cos(a * x) + 0.01 * i
        x_new = x
        return i + 1, x_new

    return jax.lax.while_loop(lambda c: c[0] < 400, body, (0, a))[1]


def by_hand(a, trips, work=1):
    x = a
    for i in range(trips):
        for _ in range(work):
            x = jnp.cos(a * x) + 0.01 * i
    return x


def test_a_while_loop_of_many_trips_of_a_big_body_stays_folded_and_answers_per_trip():
    """400 trips of a body of 60 equations pass what is unrolled at trace time
    (EAGER_UNROLL): the loop stays one equation (its trips are not all run op by op
    while tracing: an optimistix BFGS solve's 80 trips took 0.5 s), and its values
    still answer per trip, sliced from any trip on."""
    a = jnp.float32(0.5)
    big = functools.partial(many_trips, work=12)
    g = js.trace(big, a)
    assert g._program.folded and len(g.vars) < 20
    allclose(g.value("body/x_new@300"), by_hand(a, 301, 12))
    s = g.slice("body/x_new@300", "out")
    allclose(s(by_hand(a, 301, 12)), big(a))
    allclose(g.as_function()(jnp.float32(0.7)), big(jnp.float32(0.7)))


def test_a_while_loop_of_many_trips_of_a_small_body_is_unrolled_for_reverse_mode():
    """A small body costs little a trip: its 400 trips are unrolled, so a slice across
    them is plain code that reverse mode takes (JAX has none for a while_loop)."""
    a = jnp.float32(0.5)
    g = js.trace(many_trips, a)
    assert not g._program.folded
    s = g.slice("body/x_new@390", "out")
    x390 = by_hand(a, 391)
    allclose(s(x390), many_trips(a))
    rest = lambda x: functools.reduce(  # noqa: E731  trips 391..399 by hand
        lambda x, i: jnp.cos(a * x) + 0.01 * i, range(391, 400), x
    )
    allclose(jax.grad(s)(x390), jax.grad(rest)(x390))
    allclose(g.vjp("body/x_new@390", "out", jnp.float32(1.0))[1], jax.grad(rest)(x390))
    # past the trips it ran: the iterations it has, as for a loop the index keeps whole
    with pytest.raises(
        js.SelectionError,
        match=r"'body/x_new' is named at iterations 0 \.\. 399 of its loop, those it ran "
        r"when traced \('body/x_new@0' \.\. 'body/x_new@399'\)",
    ):
        g["body/x_new@400"]


def test_a_long_while_loop_of_a_small_body_stays_folded():
    """A fori_loop of a traced bound (a while_loop) of a small body is unrolled only up
    to SMALL_UNROLL equations: 2 000 trips of 7 equations were all indexed at trace
    time (69x make_jaxpr, 470x at 10 000 trips, then 2x past them: a cliff). Its values
    still answer per trip; a slice across its trips is a while_loop, which forward mode
    takes, and reverse mode is refused as JAX refuses it."""

    def f(x, n):
        def body(i, h):
            h_new = jnp.sin(h) * 0.9 + 0.1 * i
            return h_new

        return jax.lax.fori_loop(0, n, body, x).sum()

    def by_hand(x, n, start=0):
        for i in range(start, n):
            x = jnp.sin(x) * 0.9 + 0.1 * i
        return x

    x = jnp.linspace(-1.0, 1.0, 4)
    g = js.trace(f, x, jnp.int32(2000))
    assert g._program.folded and len(g.vars) < 10
    h = by_hand(x, 1991)
    allclose(g.value("body/h_new@1990"), h, rtol=1e-4)
    s = g.slice("body/h_new@1990", "out")
    allclose(s(h), f(x, jnp.int32(2000)), rtol=1e-4)
    tangent = jnp.array([1.0, 0.0, 0.0, 0.0])
    want = jax.jvp(lambda h: by_hand(h, 2000, 1991).sum(), (h,), (tangent,))[1]
    allclose(jax.jvp(s, (h,), (tangent,))[1], want, rtol=1e-4)
    with pytest.raises(js.SliceError, match="while_loop"):
        g.vjp("body/h_new@1990", "out", jnp.float32(1.0))
    small = js.trace(f, x, jnp.int32(300))  # 2 100 equations: unrolled for reverse mode
    assert not small._program.folded


def test_a_library_check_after_a_cut_loop_does_not_hide_the_path_error():
    """A slice cut inside a while_loop's trip, called with inputs that need more trips:
    the cut loop's result fails a library's own check in the window (optimistix's
    'maximum number of steps'); the error is still the SliceError saying the inputs take
    another path."""

    def halve_until_small(x):
        def body(c):
            i, y = c
            h = y * 0.5
            return i + 1, h

        _, y = jax.lax.while_loop(lambda c: c[1] > 0.1, body, (0, x))
        return eqx.error_if(y, y > 0.1, "not converged")  # the library's check

    g = js.trace(halve_until_small, jnp.float32(1.0))  # 4 trips
    s = g.slice("body/h@1", "out")
    allclose(s(jnp.float32(0.25)), 0.0625)
    with pytest.raises(js.SliceError, match="another path"):
        s(jnp.float32(100.0))


def test_the_path_error_of_a_bound_slice_names_values_of_the_branch_not_inputs():
    def f(x, w, p):
        def taken(x):
            a = jnp.tanh(x * w)
            return a

        h = jax.lax.cond(p > 0, taken, jnp.sin, x)
        return (h * w).sum()

    x, w = jnp.ones(3), jnp.full(3, 0.5)
    g = js.trace(f, x, w, 1.0)
    s = g.slice("taken/a", "out")
    allclose(s.bind(x, w, 2.0)(jnp.ones(3)), 1.5)
    with pytest.raises(js.SliceError, match="another path") as info:
        s.bind(x, w, -1.0)
    message = str(info.value)
    assert f"some of {g['taken/a'].name} exist" in message, message  # not the input w


def _growing(k):
    """A while_loop whose body has ``k`` sines: small, it is unrolled in the index;
    large, it stays one equation."""

    def f(x, thr):
        def body(c):
            i, h = c
            z = h
            for _ in range(k):
                z = jnp.sin(z) * 0.9
            nv = h + 0.3 * jnp.abs(z) + 0.1
            return i + 1, nv

        return jax.lax.while_loop(lambda c: jnp.sum(c[1]) < thr, body, (0, x))[1]

    return f


@pytest.mark.parametrize("k", [2, 70], ids=["unrolled", "folded"])
def test_a_while_loop_body_value_has_the_same_name_unrolled_or_folded(k):
    """What a trip binds names its value in every trip, whether the index unrolls the
    loop or keeps it whole: ``body/nv@1``, not the body's return ``body[1]@1`` (nor the
    next trip's parameter ``body/c[1]@2``), which stay aliases."""
    g = js.trace(_growing(k), jnp.array([0.1, 0.2]), 12.0)
    v = g["body/nv@1"]
    assert v.name == "body/nv@1", v.aliases
    assert {"body[1]@1", "body/c[1]@2", "body/h@2"} <= set(v.aliases)
    assert g["body/nv@2"].name == "body/nv@2"


def _doubled_sine(h):
    return jnp.sin(h) * 2.0


@pytest.mark.parametrize("big", [False, True], ids=["unrolled", "folded"])
def test_a_parameter_a_trip_rebinds_through_a_helper_is_binding_zero(big):
    """``h = helper(h)`` in a while_loop's body: ``h#0@t`` is the parameter (the helper's
    own ``h`` too), ``h#1@t`` the helper's result, unrolled or folded (the helper's
    parameter once took the body's parameter's place in the order: #0 and #1 swapped)."""

    def f(x):
        def body(c):
            i, h = c
            h = _doubled_sine(h)
            for _ in range(80 if big else 0):  # a body over the unrolling limit
                h = h * 1.0
            return i + 1, h

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    x = jnp.array([0.1, 0.2])
    g = js.trace(f, x)
    h = x
    for t in range(3):
        allclose(g.value(f"body/h#0@{t}"), h)
        allclose(g.value(f"body/_doubled_sine/h@{t}"), h)
        h = _doubled_sine(h)
        allclose(g.value(f"body/h#1@{t}"), h)


@pytest.mark.parametrize("big", [False, True], ids=["unrolled", "folded"])
def test_a_while_loop_whose_body_sets_what_its_condition_reads_to_a_constant(big):
    """A do-while (the body returns ``False`` for the flag its condition reads): its
    trip count is found and its values are named (a constant among the results it
    reads made a TypeError, tracing it unrolled and naming a value folded)."""

    def f(x):
        def body(c):
            go, h = c
            h = jnp.sin(h)
            for _ in range(80 if big else 0):
                h = h * 1.0
            hh = h
            return False, hh

        return jax.lax.while_loop(lambda c: c[0], body, (True, x))[1].sum()

    x = jnp.array([0.5, 1.0])
    g = js.trace(f, x)
    allclose(g.value("body/hh@0"), jnp.sin(x))
    with pytest.raises(js.SelectionError):
        g["body/hh@1"]  # one trip
    allclose(g.as_function()(x * 2.0), jnp.sin(x * 2.0).sum())


@jax.jit
def _jitted_cos(h):
    return jnp.cos(h)


def _two(h):
    a = jnp.cos(h)
    return a, a + 1.0


def _helper(h):
    return jnp.sin(h) * 0.5


def test_canonical_names_in_a_while_loops_trips_are_the_same_unrolled_or_folded(monkeypatch):
    """The index unrolls a small body and folds a large one: a value has the same
    canonical name either way (the folded index ranked a call's own names and what a
    call returns before the body's: body/two/a@1, body[2]@1, body/_jitted_cos@1)."""

    def f(x):
        def body(c):
            i, h, k = c
            a, b = _two(h)
            k = k + a
            h = _jitted_cos(h)
            return i + 1, _helper(b * 0.5 + h), k

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x, x))[2]

    x = jnp.array([0.1, 0.2])
    unrolled = js.trace(f, x)
    monkeypatch.setattr(js._control_flow, "WHILE_FOLD_LIMIT", -1)  # as a body past it
    folded = js.trace(f, x)
    assert folded._program.folded and not unrolled._program.folded
    names = [v.name for v in unrolled.select("body/**@1") if "%" not in v.name]
    assert {"body/a@1", "body/k#1@1", "body/h#1@1"} <= set(names)
    for name in names:
        assert folded[name].name == name, (name, folded[name].name)
        allclose(folded.value(name), unrolled.value(name))


def test_a_while_loop_after_a_folded_scan_is_folded_and_named_per_trip():
    """What the while_loop reads comes out of a scan the index keeps whole (tracing
    does not run it): the while_loop is folded too, its values named per trip and its
    trips counted when first asked for (it stayed one equation with nothing named)."""

    def f(x, xs):
        def step(h, xt):
            r = jnp.tanh(h + xt)
            return r, r

        hl, _ = jax.lax.scan(step, x, xs)

        def body(cc):
            i, h = cc
            hn = jax.nn.relu(h - 0.1) + 0.05
            return i + 1, hn

        return jax.lax.while_loop(lambda cc: cc[0] < 3, body, (0, hl))[1].sum()

    x, xs = jnp.array([1.0, -2.0, 3.0]), jnp.ones((4, 3)) * 0.5
    g = js.trace(f, x, xs)
    h = x
    for t in range(4):
        h = jnp.tanh(h + xs[t])
    first = jax.nn.relu(h - 0.1) + 0.05
    for t in range(3):
        h = jax.nn.relu(h - 0.1) + 0.05
        allclose(g.value(f"body/hn@{t}"), h)
    with pytest.raises(js.SelectionError, match=r"inside a loop of 3 iterations"):
        g["body/hn@3"]

    def rest(hn):
        for _ in range(2):
            hn = jax.nn.relu(hn - 0.1) + 0.05
        return hn.sum()

    s = g.slice("body/hn@0", "out")
    allclose(s(first), rest(first))
    allclose(jax.jvp(s, (first,), (jnp.ones(3),))[1], jax.jvp(rest, (first,), (jnp.ones(3),))[1])
    allclose(g.as_function()(x * 0.5, xs), f(x * 0.5, xs))


def test_a_small_while_loop_is_counted_by_one_compiled_loop_kept_per_structure():
    """A while_loop unrolled at trace time is counted by one compiled loop, kept by the
    text of its jaxprs: a fresh trace of the same model compiles nothing new (op by op,
    every trip's ops ran again at every trace, and compiled once per process)."""
    from jaxsurgery import _control_flow

    def solve(a, b):
        def body(c):
            y, k = c
            y_new = y - (jnp.tanh(y) + a * y - b) / (1 - jnp.tanh(y) ** 2 + a)
            return y_new, k + 1

        y, k = jax.lax.while_loop(lambda c: c[1] < 5, body, (jnp.zeros(3), 0))
        return y

    a, b = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.3, -1.0, 2.0])
    g = js.trace(solve, a, b)
    known = len(_control_flow._COUNTED)
    again = js.trace(solve, a * 2, b)
    assert len(_control_flow._COUNTED) == known
    for graph, (x, y) in ((g, (a, b)), (again, (a * 2, b))):
        allclose(graph.value("out"), solve(x, y))
        allclose(graph.value("body/y_new@4"), solve(x, y))


def _stepping_loop(step):
    """A while_loop whose body calls a jitted helper closing over an array: the loop's
    text is the same for every ``step``, its trip count is not."""
    c = jnp.full((3,), step)
    inner = jax.jit(lambda s: s + c)

    def f(x):
        def body(s):
            h = inner(s)
            return h

        return jax.lax.while_loop(lambda s: s[0] < 10.0, body, x)

    return f


def _calling_loop(scale):
    """The same with a pure_callback (printed by address in the loop's text)."""

    def host(s):
        return np.asarray(s) + scale

    def f(x):
        def body(s):
            h = jax.pure_callback(host, jax.ShapeDtypeStruct((3,), jnp.float32), s)
            return h

        return jax.lax.while_loop(lambda s: s[0] < 10.0, body, x)

    return f


@pytest.mark.parametrize("make", [_stepping_loop, _calling_loop])
def test_loops_of_the_same_text_with_other_constants_or_callbacks_count_their_own_trips(make):
    """The compiled counter is kept by the loop's text and what the text does not show
    (a nested jaxpr's constants, a callback): the second loop got the first's count (10
    for 4), and every value inside it said it was not made for the traced arguments."""
    x = jnp.zeros(3)
    for step, trips in ((1.0, 10), (3.0, 4), (1.0, 10)):
        f = make(step)
        g = js.trace(f, x)
        assert list(g._program.while_trips.values()) == [trips]
        allclose(g.value("body/h@2"), jnp.full(3, 3 * step))
        allclose(g.value("out"), f(x))


def _ratio(a, b):
    y = a + 0.0
    y = y * 1.0
    y = y - 0.0
    e = jnp.exp(b)
    e = e * 1.0
    e = e + 0.0
    q = y / e
    return q


def test_a_cond_at_its_threshold_takes_the_branch_an_eager_call_takes():
    """What decides a cond at trace time runs op by op, as an eager call does: compiled
    whole, XLA (jax 0.10's) computes ``a / exp(b)`` as ``a * exp(-b)``, and at the
    threshold the graph inlined the other branch than its own values and the function
    say. (Where eager and compiled agree everywhere, any point checks the same.)"""

    def f(a, b, sign, thr):
        q = _ratio(a, b)
        return jax.lax.cond(sign * q > thr, lambda v: v + 100.0, lambda v: v - 100.0, a)

    rng = np.random.default_rng(0)
    for _ in range(200):  # a point where the eager and the compiled ratio differ
        a, b = jnp.float32(rng.normal()), jnp.float32(rng.normal())
        eager, compiled = _ratio(a, b), jax.jit(_ratio)(a, b)
        if eager != compiled:
            break
    sign = jnp.float32(1.0 if compiled >= eager else -1.0)  # compiled says go, eager not
    args = (a, b, sign, sign * eager)
    g = js.trace(f, *args)
    allclose(g.value("out"), f(*args))
    allclose(g.as_function()(*args), f(*args))


def test_a_second_cond_one_ulp_from_its_threshold_takes_the_eager_branch():
    """A compiled evaluation of what decided a first cond (reverted) kept its values,
    and a second cond one ulp from its threshold read them: the graph inlined the
    other branch than an eager call takes (XLA's tanh differs by an ulp)."""

    def act(x):
        return jnp.tanh(x * 3.3 + 0.1)

    def f(x, t):
        y = act(x)
        a = jax.lax.cond(jnp.sum(y) > -1e3, lambda v: v * 2.0, lambda v: v * 3.0, y)
        return jax.lax.cond(y[0] > t, lambda a: a + 100.0, lambda a: a - 100.0, a)

    xs = jnp.asarray(np.random.default_rng(1).uniform(-0.5, 0.5, 4000), jnp.float32)
    eager, compiled = np.asarray(act(xs)), np.asarray(jax.jit(act)(xs))
    apart = np.where(compiled > eager)[0]  # compiled says above, eager not
    i = int(apart[0]) if len(apart) else 0  # (where they agree everywhere, any point)
    x, t = xs[i : i + 4], jnp.float32(eager[i])
    g = js.trace(f, x, t)
    allclose(g.value("out"), f(x, t))
    allclose(g.as_function()(x, t), f(x, t))


def test_a_counted_while_loop_in_a_scan_body_is_named_per_trip_unless_too_long():
    """A while_loop counted from a literal inside a scan's body: its trips are named
    (``kn@t@s``), values equal the loop by hand; past 2 000 unrolled equations it stays
    whole and the note says so (not that values decide its count)."""

    def model(trips):
        def f(w, xs):
            def step(h, x):
                def stage(c):
                    j, k = c
                    kn = jnp.tanh(w @ k + x)
                    return j + 1, kn

                hh = jax.lax.while_loop(lambda c: c[0] < trips, stage, (0, h))[1]
                return hh, hh

            return jax.lax.scan(step, jnp.zeros(3), xs)[1].sum()

        return f

    w = jax.random.normal(jax.random.key(0), (3, 3)) / 2
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    g = js.trace(model(3), w, xs)
    h = jnp.zeros(3)
    for t in range(5):
        k = h
        for s in range(3):
            k = jnp.tanh(w @ k + xs[t])
            allclose(g.value(f"step/stage/kn@{t}@{s}"), k, rtol=1e-5)
        h = k
    g = js.trace(model(1000), w, xs)
    assert any("constants decide its trip count, but it would unroll past" in n for n in g.notes)


def test_a_loop_whose_condition_is_any_lane_checks_each_lane_under_vmap():
    """Equinox's loops (optimistix's solvers, diffrax's) go on while any vmap lane does
    (``unvmap_any``) and leave finished lanes as they are: a slice bound at a lane that
    never reaches the trip it cuts at got a number under jax.vmap (an optimistix Newton
    solve: hunt Q), where that lane alone is a SliceError; the check takes each lane
    alone. The loops the program runs keep the program's condition: a body that does
    not leave finished lanes as they are computes on in every lane while one goes on,
    as jax.vmap of the function does (an identity patch gave other numbers: hunt R)."""
    import equinox.internal as eqxi

    def f(target):
        def body(y):
            t = js.tag(y * 2.0, "t")
            return jnp.where(y < target, y + 1.0, y) + 0.0 * t

        y = jax.lax.while_loop(lambda y: eqxi.unvmap_any(y < target), body, 0.0)
        return y * 3.0

    def unmasked(target):  # (computes on in a finished lane while another goes on)
        y = jax.lax.while_loop(
            lambda y: eqxi.unvmap_any(y < target), lambda y: js.tag(y + 1.0, "t"), 0.0
        )
        return y * 3.0

    g = js.trace(f, 5.0)  # 5 trips: t@0 .. t@4
    s = g.slice("t@1", "out")  # (its window: the trips after trip 1)
    with pytest.raises(js.SliceError, match="another path"):
        s.bind(2.0)(2.0)  # 2 trips
    np.testing.assert_allclose(  # lanes on the traced path: each as alone
        jax.vmap(g.values_fn(["t@4"]))(jnp.array([5.0, 4.5]))["t@4"], [8.0, 8.0]
    )
    np.testing.assert_allclose(
        jax.vmap(lambda x, t: s.bind(x)(t))(jnp.array([5.0, 4.5]), jnp.array([2.0, 9.0])),
        [15.0, 15.0],
    )
    late = g.slice("t@4", "out")  # (its context: the trips up to 4)
    for lanes in (jax.vmap, lambda fn: jax.jit(jax.vmap(fn))):
        with pytest.raises(Exception, match="another path"):  # (under jit: at run time)
            lanes(lambda x: s.bind(x)(2.0))(jnp.array([5.0, 2.0]))
        # the values a bound context or values_fn reads, at trips near and far apart
        # (one loop a trip at a time, one with a trip counter): each lane as alone
        for run, on_path in (
            (lambda x: late.bind(x)(8.0), [15.0, 15.0]),
            (lambda x: g.values_fn(["t@4"])(x)["t@4"], [8.0, 8.0]),
            (lambda x: g.values_fn(["t@0", "t@4"])(x)["t@0"], [0.0, 0.0]),
        ):
            with pytest.raises(Exception, match="another path"):
                jax.block_until_ready(lanes(run)(jnp.array([5.0, 2.0])))
            np.testing.assert_allclose(lanes(run)(jnp.array([5.0, 4.5])), on_path)
    targets = jnp.array([5.0, 2.0])
    u = js.trace(unmasked, 5.0)
    same = u.replace("t@1", lambda t: t * 1.0)
    for run in (jax.vmap, lambda fn: jax.jit(jax.vmap(fn))):
        np.testing.assert_allclose(run(same.as_function())(targets), jax.vmap(unmasked)(targets))
    np.testing.assert_allclose(
        jax.vmap(lambda x: u.patch_fn("t@1")({"t@1": 2.0}, x))(targets), [15.0, 15.0]
    )
