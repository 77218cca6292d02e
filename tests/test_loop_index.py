"""Long scans stay one equation in the index; their body values answer to ``name@t``.

References are hand-written: the recurrence run for t steps by ``lax.scan`` over a
prefix of the inputs, and the zero-perturbation trick written by hand.
"""

import functools
import inspect
import re
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from conftest import allclose, check_slice
from models import RNN_STEPS, rnn, rnn_args, rnn_state_after

import jaxsurgery as js
from jaxsurgery._loop_index import VirtualVar

T = RNN_STEPS  # every scan stays folded in the index


@pytest.fixture
def setup():
    return rnn_args()


def test_a_long_scan_is_not_unrolled_and_its_values_resolve(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    assert len(g.vars) < 20  # nothing unrolled
    assert "scan" in [v.primitive for v in g.vars]
    assert any("name@iteration" in n for n in g.notes)
    v = g["step/h_new@700"]
    assert isinstance(v, VirtualVar) and v not in g.vars
    assert repr(v) == "Var(step/h_new@700: f32[4] = tanh, in a folded loop)"  # no index
    assert v.shape == (4,) and v.primitive == "tanh" and v.source.startswith(models.__file__)
    # the scan's results come from the user's line that called it, not a wrapper's
    scan_line = (
        inspect.getsource(rnn).splitlines().index("    h_last, hs = jax.lax.scan(step, h, xs)")
    )
    assert (
        g["h_last"].source
        == g["hs"].source
        == f"{models.__file__}:{rnn.__code__.co_firstlineno + scan_line}"
    )
    allclose(g.value(v), rnn_state_after(h0, xs, w, 700), rtol=1e-4)
    allclose(g.value("step/a@3"), rnn_state_after(h0, xs, w, 2) @ w + xs[3], rtol=1e-5)
    # one value, one var: the carry entering step t is what step t-1 returned
    assert g["step/h@701"] is v and "step/h@701" in v.aliases
    # ... and the carry entering step 0 is the loop's operand, as unrolled
    assert g["step/h@0"] is g["h"] and g["step/h@1"] is g["step/h_new@0"]
    # the last step's carry holds the loop's result (here also a row of hs, so an edit
    # there is not an edit of h_last alone: they stay two vars)
    allclose(g.value("step/h_new@999"), g.value("h_last"))
    assert len(g.select("step/h_new@*")) == T
    assert len(g.select("step/h_new@1?")) == 10


def test_reads_and_users_of_body_values_come_from_the_body_not_an_unrolled_copy(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    a, h_new, x = g["step/a@5"], g["step/h_new@5"], g["step/x@5"]
    # a = h @ w + x: the add reads the product (unnamed: loop0%i@5) and x@5
    dot, *rest = a.producers
    assert rest == [x] and dot.name.startswith("loop0%") and dot.name.endswith("@5")
    assert g[dot.name] is dot and dot.primitive == "dot_general"
    assert set(dot.producers) == {g["step/h@5"], g["w"]}  # the carry in, the operand w
    assert x.producers == (g["xs"],) and h_new.producers == (a,)
    # h_new@5 is read by step 6 (the carry) and stacked into hs
    assert set(h_new.users) == {g["step/a@6"].producers[0], g["hs"]}
    # the last step's carry makes the loop's result
    assert g["h_last"] in g["step/h_new@999"].users
    # the unrolled twin holds each of these as a var of its own: it agrees, var by var
    twin = g._loop_index.twin()
    for v in (a, h_new, dot, g["step/a@0"]):
        mine = {g._loop_index.in_twin(p).index for p in v.producers}
        assert mine == {p.index for p in g._loop_index.in_twin(v).producers}
    assert twin.vars  # (made above, for the check only)


def test_a_table_of_every_step_is_drawn_without_unrolling(setup):
    g = js.trace(rnn, *setup)
    text = repr(g.select("step/a@*"))
    assert g._loop_index._twin is None  # 1000 steps were not unrolled to draw 20 rows
    assert "step/a@0" in text and "loop0%" in text and "step/x@0" in text


def test_names_out_of_range_and_without_iteration_say_what_to_do(setup):
    g = js.trace(rnn, *setup)
    with pytest.raises(js.SelectionError, match=r"step/h_new@0'? \.\. '?step/h_new@999"):
        g["step/h_new"]
    with pytest.raises(js.SelectionError, match="0 .. 999"):
        g["step/h_new@1000"]
    with pytest.raises(js.SelectionError, match="'step/h_new@3'"):
        g["step/h_new@03"]  # one spelling per iteration


def test_grads_over_every_step_equal_the_stacked_eps_trick(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    # a dict entry selecting every iteration: one stacked array, the scan's own gradient
    fn = jax.jit(g.grads_fn("out", {"h": "step/h_new@*", "w": "w"}))

    def perturbed(eps, h0, xs, w):  # the trick by hand: h_t + eps_t in every step
        def step(h, x_e):
            x, e = x_e
            h_new = jnp.tanh(h @ w + x) + e
            return h_new, h_new

        h_last, hs = jax.lax.scan(step, h0, (xs, eps))
        return jnp.sum(h_last**2) + 0.1 * jnp.sum(hs[::100] ** 2)

    for args in (setup, (0.5 * h0, xs[::-1], w.T)):  # traced and new arguments
        got = fn(*args)
        ref = jax.grad(perturbed)(jnp.zeros((T, 4)), *args)
        assert got["h"].shape == (T, 4) and got["w"].shape == (4, 4)
        allclose(got["h"], ref, rtol=1e-4, atol=1e-6)
    # iterations by name, one key each
    ref = jax.grad(perturbed)(jnp.zeros((T, 4)), h0, xs, w)
    some = g.grads("out", wrt=["step/h_new@800", "step/h_new@3", "step/h_new@999"])
    for t in (800, 3, 999):
        allclose(some[f"step/h_new@{t}"], ref[t], rtol=1e-4, atol=1e-6)


def test_slices_at_loop_values_are_cut_from_the_running_loop(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    s = g.slice("step/h_new@995", "h_last")
    assert s.graph is g and [e.primitive.name for e in s.jaxpr.eqns].count("scan") == 1

    def rest(h, xs=xs, w=w):  # steps 996..999 by hand
        for t in range(996, T):
            h = jnp.tanh(h @ w + xs[t])
        return h

    h = g.value("step/h_new@995")
    check_slice(s, (h,), rest)
    tangent = jnp.ones(4)
    allclose(g.jvp("step/h_new@995", "h_last", tangent)[1], jax.jvp(rest, (h,), (tangent,))[1])
    # bound to new arguments: the context is recomputed, the input still cut in
    xs2, w2 = xs[::-1], w.T
    allclose(s.bind(h0, xs2, w2)(h), rest(h, xs2, w2), rtol=1e-5)

    def between(h3):  # steps 4..7 by hand
        for t in range(4, 8):
            h3 = jnp.tanh(h3 @ w + xs[t])
        return h3

    check_slice(g.slice("step/h_new@3", "step/h_new@7"), (g.value("step/h_new@3"),), between)


def test_a_slice_across_every_step_is_one_scan_whatever_the_length(setup):
    h0, xs, w = setup

    def whole(h, xs=xs):  # the loss from step 1 on, given the state after step 0
        def step(h, x):
            h_new = jnp.tanh(h @ w + x)
            return h_new, h_new

        h_last, hs = jax.lax.scan(step, h, xs[1:])
        hs = jnp.concatenate([h[None], hs])
        return jnp.sum(h_last**2) + 0.1 * jnp.sum(hs[::100] ** 2)

    sizes = []
    for xs_t in (xs, jnp.concatenate([xs, xs])):
        g = js.trace(rnn, h0, xs_t, w)
        s = g.slice("step/h_new@0", "out")
        check_slice(s, (g.value("step/h_new@0"),), functools.partial(whole, xs=xs_t))
        sizes.append(len(s.jaxpr.eqns))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("reverse", [False, True])
def test_a_slice_from_a_step_whose_rows_are_read_is_one_scan_copying_no_row_after_it(reverse):
    """The rows of a scan from its input's step on are one scan's: the input is
    selected in at its iteration (no second scan whose rows would be concatenated with
    the input's, a copy of every row; rows before it, made in the context, still are).
    Also a gradient at one step."""
    n = 40
    xs = jax.random.normal(jax.random.key(7), (n, 3))
    w = jax.random.normal(jax.random.key(8), (3, 3)) / 2

    def f(h0, xs):
        def step(h, x):
            h_new = jnp.tanh(h @ w + x)
            return h_new, h_new

        h_last, hs = jax.lax.scan(step, h0, xs, reverse=reverse)
        return jnp.sum(hs**2 * jnp.arange(1.0, n + 1)[:, None]) + jnp.sum(h_last)

    h0 = jnp.ones(3) * 0.3
    g = js.trace(f, h0, xs)
    t = 0 if not reverse else n - 1  # the loop's first iteration
    for at in (t, 17):
        name = f"step/h_new@{at}"
        s = g.slice(name, "out")
        primitives = [e.primitive.name for e in s.jaxpr.eqns]
        assert primitives.count("scan") == 1, s.jaxpr
        assert ("concatenate" in primitives) == (at != t), s.jaxpr

        def rest(h, at=at):  # the loss given the state after step `at`, by hand
            order = range(n) if not reverse else range(n - 1, -1, -1)
            rows, c = [None] * n, h0
            for k in order:
                c = h if k == at else jnp.tanh(c @ w + xs[k])
                rows[k] = c
            hs = jnp.stack(rows)
            return jnp.sum(hs**2 * jnp.arange(1.0, n + 1)[:, None]) + jnp.sum(c)

        h = g.value(name)
        check_slice(s, (h,), rest)
        allclose(g.grads("out", [name])[name], jax.grad(rest)(h), rtol=1e-5)


@pytest.mark.parametrize("rows", [True, False])
def test_values_put_in_where_the_function_is_singular_give_finite_gradients(rows):
    """A slice's input replaces ``h = sqrt(a)`` at a step where ``a < 0`` (NaN in the
    traced run) while another input is upstream of it: the value it replaces is not
    computed from the other input and differentiated with a zero cotangent (0 * inf:
    NaN gradients of every input upstream; with the rows read, a first version of the
    one-scan slice did; masked spans, and the step before a carry put in, always had),
    whether ``h`` is a row of the scan or only its carry."""
    n, k = 1100, 700
    xs = jnp.full((n,), 0.5).at[k].set(-100.0)

    def step(c, x):
        a = c + x
        h = jnp.sqrt(a)
        return h, (a, 2 * h) if rows else a

    def f(h0, xs):
        h_last, ys = jax.lax.scan(step, h0, xs)
        return jnp.sum(ys[1][k + 1 :]) + jnp.sum(ys[0]) + h_last if rows else jnp.sum(ys) + h_last

    def rest(h, xs, start, stop):  # steps start..stop-1 by hand, from carry h
        h, ys = jax.lax.scan(step, h, xs[start:stop])
        if rows:
            return h, jnp.sum(ys[0]) + (jnp.sum(ys[1]) if start > k else 0.0)
        return h, jnp.sum(ys)

    def loss(h0, xs, puts):  # the loss with h at the steps of `puts` replaced
        total, h, start = 0.0, h0, 0
        for t, v in sorted(puts.items()):
            h, part = rest(h, xs, start, t)
            a = h + xs[t]
            total += part + a + (2 * v if rows and t > k else 0.0)
            h, start = v, t + 1
        h, part = rest(h, xs, start, n)
        return total + part + h

    h0 = jnp.float32(1.0)
    g = js.trace(f, h0, xs)
    assert g._program.folded
    v, v3 = jnp.float32(3.0), jnp.float32(2.0)
    cases = {
        ("h0", f"step/h@{k}"): ((h0, v), lambda a, b: loss(a, xs, {k: b})),
        ("step/h@3", f"step/h@{k}"): ((v3, v), lambda a, b: loss(h0, xs, {3: a, k: b})),
        ("xs", f"step/h@{k}"): ((xs, v), lambda a, b: loss(h0, a, {k: b})),
    }
    for names, (args, reference) in cases.items():
        s = g.slice(names, "out")
        # (the references under jit: run eagerly, each operation compiles on its own)
        allclose(s(*args), jax.jit(reference)(*args), rtol=1e-5)
        got, expected = jax.grad(s, (0, 1))(*args), jax.jit(jax.grad(reference, (0, 1)))(*args)
        assert all(bool(jnp.isfinite(x).all()) for x in got), (names, got)
        allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("steps", [(1185,), tuple(range(1160, 1180, 2))])
def test_inputs_shielding_a_singular_value_give_zero_gradients_also_in_a_patched_graph(steps):
    """Inputs ``a@t`` and ``r@t = sqrt(a@t)`` at steps where ``a`` is given negative:
    ``a@t`` reaches the output only through ``r@t`` (shielded: gradient 0), also with
    a patch at another step of the loop and at ten steps (the hunt's finds: NaN, the
    iterations run masked, computing ``sqrt`` of the input)."""
    n, d = 1200, 3
    w = jax.random.normal(jax.random.key(0), (d, d)) * 0.3
    xs = jax.random.uniform(jax.random.key(1), (n, d), minval=1.0, maxval=2.0)

    def f(h0, xs):
        def step(h, x):
            a = w @ h + x
            r = jnp.sqrt(a)
            h_new = jnp.tanh(r) * 0.5 + 0.4 * h
            return h_new, None

        return jnp.sum(jax.lax.scan(step, h0, xs)[0])

    g = js.trace(f, jnp.full((d,), 0.2), xs)
    patched = [g.replace(f"step/h_new@{t}", lambda v: v * 1.5) for t in (600, 1195)]
    for graph in (g, *patched):
        names = [f"step/{v}@{t}" for t in steps for v in ("a", "r")]
        values = [-jnp.ones(d) if n.startswith("step/a") else graph.value(n) for n in names]
        s = graph.slice(names, "out")
        allclose(s(values), graph.value("out"))
        gradients = jax.grad(s)(values)
        for name, gradient in zip(names, gradients):
            if name.startswith("step/a"):
                allclose(gradient, jnp.zeros(d))
            else:
                assert bool(jnp.isfinite(gradient).all()) and bool(jnp.any(gradient != 0))


def test_an_lstm_over_a_long_sequence_flax_nn_rnn(key):
    model = nn.RNN(nn.OptimizedLSTMCell(8))
    xs = jax.random.normal(jax.random.key(4), (1, 400, 3))
    params = model.init(key, xs)
    g = js.trace(model.apply, params, xs)
    assert len(g.vars) < 200 and g._program.folded
    # library code has no Python names: the body's scope outputs name it, one name for
    # all of them, as outside a loop (``#k`` numbers instances of the scope only)
    assert not [n for n in g._loop_index.names if n.startswith("cell.scan_fn#")]
    outputs = g.select("cell.scan_fn@250")
    # each has a name of its own, its place in what the cell returned, ((c, h), h)
    cell = "RNN/cell.scan_fn/cell"
    assert [v.name for v in outputs] == [f"{cell}[0][0]@250", f"{cell}[0][1]@250"]
    assert all(g[v.name] is v for v in outputs) and g[f"{cell}[1]@250"] is outputs[1]
    # the reference: the same model over the first 251 steps, returning its carry
    carry, _ = nn.RNN(nn.OptimizedLSTMCell(8), return_carry=True).apply(params, xs[:, :251])
    for v, ref in zip(outputs, carry):  # (c, h) after step 250
        allclose(g.value(v), ref, rtol=1e-4, atol=1e-5)


def test_a_gru_rnn_in_equinox_with_a_folded_loop_inside_a_jit_call(key):
    cell = eqx.nn.GRUCell(3, 5, key=key)
    xs = jax.random.normal(jax.random.key(5), (600, 3))

    @jax.jit
    def encode(h, xs):
        def step(h, x):
            h_new = cell(x, h)
            return h_new, None

        return jax.lax.scan(step, h, xs)[0]

    def f(h, xs):
        return jnp.sum(encode(h, xs) ** 2)

    h0 = jnp.zeros(5)
    g = js.trace(f, h0, xs)
    v = g["encode/step/h_new@321"]
    ref = jax.lax.scan(lambda h, x: (cell(x, h), None), h0, xs[:322])[0]
    allclose(g.value(v), ref, rtol=1e-4, atol=1e-6)
    grads = g.grads("out", wrt=["encode/step/h_new@598"])
    allclose(
        grads["encode/step/h_new@598"],
        jax.grad(lambda h: jnp.sum(cell(xs[599], h) ** 2))(
            g.value(v.graph["encode/step/h_new@598"])
        ),
        rtol=1e-4,
        atol=1e-6,
    )


def test_an_abstract_trace_resolves_names_and_asks_for_values():
    spec = jax.ShapeDtypeStruct
    g = js.trace(rnn, spec((4,), jnp.float32), spec((T, 4), jnp.float32), spec((4, 4), jnp.float32))
    v = g["step/a@9"]
    assert v.shape == (4,)
    with pytest.raises(js.SliceError, match="abstract"):
        g.value(v)


# -- a while_loop with a large body: folded without running it op by op -----------------
def refine(x, tol):
    def cond(c):
        h, k = c
        return (jnp.max(jnp.abs(h)) > tol) & (k < 50)

    def body(c):
        h, k = c
        for _ in range(120):  # a large body: past WHILE_FOLD_LIMIT equations
            h = jnp.sin(h) * 0.99
        h_new = h * 0.5
        return h_new, k + 1

    h, k = jax.lax.while_loop(cond, body, (x, 0))
    return jnp.sum(h**2)


def refine_by_hand(x, trips):
    for _ in range(trips):
        for _ in range(120):
            x = jnp.sin(x) * 0.99
        x = x * 0.5
    return x


def test_a_while_loop_with_a_large_body_is_folded_and_its_trips_resolve():
    x = jnp.array([2.0, -1.0, 0.5])
    g = js.trace(refine, x, 1e-4)
    assert g._program.folded and not g._program.folded[0].is_scan
    assert len(g.vars) < 30 and any("a while_loop" in n for n in g.notes)
    allclose(g.value("body/h_new@2"), refine_by_hand(x, 3), rtol=1e-5)
    trips = g._loop_index.length(g._program.folded[0], need=True)
    assert trips == len(g.select("body/h_new@*")) and 2 < trips < 50
    with pytest.raises(js.SelectionError, match=f"0 .. {trips - 1}"):
        g[f"body/h_new@{trips}"]
    # a slice from one trip to the output: a while_loop with the input spliced in
    s = g.slice("body/h_new@1", "out")

    def rest(h, trips=trips):  # the remaining trips by hand, then the loss
        return jnp.sum(refine_by_hand(h, trips - 2) ** 2)

    h1 = g.value("body/h_new@1")
    allclose(s(h1), rest(h1), rtol=1e-5)
    tangent = jnp.array([1.0, 0.5, -1.0])
    allclose(jax.jvp(s, (h1,), (tangent,))[1], jax.jvp(rest, (h1,), (tangent,))[1], rtol=1e-4)
    # arguments for which the loop stops before trip 1: an error, not a wrong number
    with pytest.raises(js.SliceError, match="the loop stops before it"):
        s.bind(x * 1e-5, 1e-4)(h1)


def test_a_trip_past_a_folded_while_loops_end_is_refused_before_any_value_is_asked():
    """In a fresh graph, a name past the loop's traced trips selects nothing, as after
    the trips are counted (it selected a var, whose values_fn said the arguments take
    another path: the traced ones)."""
    x = jnp.array([2.0, -1.0, 0.5])
    trips = 3
    while jnp.max(jnp.abs(refine_by_hand(x, trips))) > 1e-4:
        trips += 1
    g = js.trace(refine, x, 1e-4)
    with pytest.raises(js.SelectionError, match=f"0 .. {trips - 1}"):
        g[f"body/h_new@{trips + 2}"]
    g = js.trace(refine, x, 1e-4)
    with pytest.raises(js.SelectionError, match=f"0 .. {trips - 1}"):
        g.slice(f"body/h_new@{trips}", "out")
    allclose(g.value(f"body/h_new@{trips - 1}"), refine_by_hand(x, trips), rtol=1e-5)


def test_a_glob_over_a_folded_while_loops_unnamed_values_counts_its_trips_first():
    """A body value nothing names (a library's loop: NUTS's) answers to loop<k>%<i>@t;
    a glob over its trips counts them, in a fresh graph too (it matched nothing until
    an exact name had counted them)."""
    x = jnp.array([2.0, -1.0, 0.5])
    counted = js.trace(refine, x, 1e-4)
    trips = len(counted.select("body/h_new@*"))
    assert counted["loop0%2@1"].name == "loop0%2@1"  # sin(h), unnamed
    g = js.trace(refine, x, 1e-4)  # fresh: the trips not counted yet
    found = g.select("loop0%2@*")
    assert found.names == tuple(f"loop0%2@{t}" for t in range(trips))
    allclose(g.value(found[1]), jnp.sin(refine_by_hand(x, 1)), rtol=1e-5)
    fresh = js.trace(refine, x, 1e-4)  # a glob not spelling the loop's number counts too
    assert fresh.select("loop?%2@*").names == found.names

    # a glob that may mean a tag (loop?, loop*) counts no trips: in an abstract graph,
    # whose trips are not known, it still finds the tag
    def tagged(x, tol):
        return js.tag(refine(x, tol), "loopy")

    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    g = js.trace(tagged, spec, jax.ShapeDtypeStruct((), jnp.float32))
    assert g.select("loop?").names == ("loopy",) == g.select("loop*").names
    with pytest.raises(js.SelectionError, match="trip count is not known"):
        g.select("loop0%2@*")


@pytest.mark.parametrize("reverse", [False, True])
def test_values_of_a_body_value_come_from_one_run_of_the_loop_as_rows(reverse):
    """``g.value("step/...@t")`` runs the scan once and keeps each body value's rows: any
    other iteration is then a row, with no var made per iteration; values equal a
    hand-written loop (forward and reverse, the value inside a call in the body)."""
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    xs = jax.random.normal(jax.random.key(1), (300, 4))

    def cell(h, x):
        pre = w @ h + x
        return jnp.tanh(pre)

    def rnn(h0, xs):
        def step(h, x):
            h_new = cell(h, x)
            return h_new, h_new * 2

        return jax.lax.scan(step, h0, xs, reverse=reverse)

    hs, h = [], jnp.zeros(4)  # by hand
    for t in range(300)[::-1] if reverse else range(300):
        h = jnp.tanh(w @ h + xs[t])
        hs.append((t, h, w @ (hs[-1][1] if hs else jnp.zeros(4)) + xs[t]))
    by_t = {t: (h, pre) for t, h, pre in hs}

    g = js.trace(rnn, jnp.zeros(4), xs)
    allclose(g.value("step/h_new@7"), by_t[7][0], rtol=1e-5)
    made = len(g._loop_index.vars)
    for t in (0, 150, 298):
        allclose(g.value(f"step/h_new@{t}"), by_t[t][0], rtol=1e-5)
        allclose(g.value(f"step/cell/pre@{t}"), by_t[t][1], rtol=1e-5)
    assert len(g._loop_index.vars) - made <= 6  # the vars asked for, not one per iteration


@pytest.mark.parametrize("reverse", [False, True])
def test_a_scans_values_too_large_to_keep_at_every_iteration_run_up_to_the_one_asked(
    reverse, monkeypatch
):
    """Where a body value at every iteration would take more than KEPT_TRIPS_BYTES (a
    scanned transformer's activations), a value runs the scan up to its iteration and
    keeps no rows; values still equal the loop by hand, reverse scans too."""
    from jaxsurgery import _loop_index

    monkeypatch.setattr(_loop_index, "KEPT_TRIPS_BYTES", 100)
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    xs = jax.random.normal(jax.random.key(1), (300, 4))

    def rnn(h0, xs):
        def step(h, x):
            h_new = jnp.tanh(w @ h + x)
            return h_new, h_new

        return jax.lax.scan(step, h0, xs, reverse=reverse)[0]

    g = js.trace(rnn, jnp.zeros(4), xs)
    by_t, state = {}, jnp.zeros(4)
    for t in range(300)[::-1] if reverse else range(300):
        state = by_t[t] = jnp.tanh(w @ state + xs[t])
    for t in (7, 150, 299):
        allclose(g.value(f"step/h_new@{t}"), by_t[t], rtol=1e-5)
    assert not g._loop_rows


def test_a_graph_keeps_values_at_every_iteration_up_to_its_budget(monkeypatch):
    """Each body value asked keeps its values at every iteration (a later iteration is
    a lookup), up to KEPT_ROWS_BYTES in all for the graph (three 114 MB values of a
    scanned model kept 342 MB beside what was asked): a value past it runs the scan up
    to its iteration, keeping no rows. Values equal the loop by hand."""
    from jaxsurgery import _loop_index

    monkeypatch.setattr(_loop_index, "KEPT_ROWS_BYTES", 50 * 4 * 4 * 3 // 2)
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    xs = jax.random.normal(jax.random.key(1), (50, 4))

    def rnn(h0, xs):
        def step(h, x):
            a = w @ h + x
            h_new = jnp.tanh(a)
            return h_new, h_new

        return jax.lax.scan(step, h0, xs)[0]

    g = js.trace(rnn, jnp.zeros(4), xs)
    by_t, state = {}, jnp.zeros(4)
    for t in range(50):
        a = w @ state + xs[t]
        state = jnp.tanh(a)
        by_t[t] = (a, state)
    allclose(g.value("step/h_new@7"), by_t[7][1], rtol=1e-5)
    assert len(g._loop_rows) == 1  # 800 bytes of 1 200
    allclose(g.value("step/a@30"), by_t[30][0], rtol=1e-5)  # another 800: not kept
    assert len(g._loop_rows) == 1
    for t in (0, 49):
        allclose(g.value(f"step/h_new@{t}"), by_t[t][1], rtol=1e-5)
        allclose(g.value(f"step/a@{t}"), by_t[t][0], rtol=1e-5)
    assert len(g._loop_rows) == 1


def test_values_that_keep_no_rows_leave_the_graphs_budget_to_others(monkeypatch):
    """A value the graph keeps at one iteration only (here: in a while_loop holding a
    patch, whose trips it may change) took its share of the budget when asked (the
    regression hunt): a scan's values after it, which fit, ran the scan again for each
    iteration. They are rows of one run; values equal the loops by hand."""
    from jaxsurgery import _control_flow, _loop_index

    monkeypatch.setattr(_loop_index, "KEPT_ROWS_BYTES", 1000)  # a 50 x 4 float32: 800
    monkeypatch.setattr(_control_flow, "WHILE_FOLD_LIMIT", -1)  # (folded: a long body's)
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    xs = jax.random.normal(jax.random.key(1), (50, 4))

    def f(h0, xs, n):
        def body(c):
            i, h = c
            a = w @ h + 0.1 * i
            hn = jnp.tanh(a)
            return i + 1, hn

        h = jax.lax.while_loop(lambda c: c[0] < n, body, (0, h0))[1]

        def step(h, x):
            s = w @ h + x
            return jnp.tanh(s), s

        return jax.lax.scan(step, h, xs)[0]

    h0 = jnp.ones(4) * 0.3
    g = js.trace(f, h0, xs, 40).replace("body/a@3", lambda a: a * 0.5)
    assert isinstance(g["body/hn@10"], VirtualVar)
    h, by_hand = h0, {}
    for i in range(40):
        a = w @ h + 0.1 * i
        a = a * 0.5 if i == 3 else a
        h = by_hand[i] = jnp.tanh(a)
    for i in (10, 20, 30):
        allclose(g.value(f"body/hn@{i}"), by_hand[i], rtol=1e-5)
    s_by_t = {}
    for t in range(50):
        s_by_t[t] = w @ h + xs[t]
        h = jnp.tanh(s_by_t[t])
    allclose(g.value("step/s@10"), s_by_t[10], rtol=1e-5)
    assert len(g._loop_rows) == 1  # the scan's s at every step
    for t in (0, 25, 49):
        allclose(g.value(f"step/s@{t}"), s_by_t[t], rtol=1e-5)


def _halving_loop(x, n):
    """A while_loop of a traced trip count ``n`` (a reference: :func:`_halving_by_hand`)."""

    def body(c):
        i, h = c
        hn = jnp.tanh(h * 1.5 + 0.1)
        return i + 1, hn

    return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1].sum()


def _halving_by_hand(x, n, patches=None):
    """``hn`` at every trip of :func:`_halving_loop` (``patches``: trip → value put in)."""
    found, h = [], x
    for t in range(n):
        h = jnp.tanh(h * 1.5 + 0.1)
        h = (patches or {}).get(t, h)
        found.append(h)
    return found


def test_values_of_a_while_loops_trips_come_from_one_run_as_rows(monkeypatch):
    """``g.value("body/hn@t")`` of a folded while_loop runs the loop once for every
    traced trip, keeping the rows as a scan's (one by one, each value ran the loop again:
    100 ms each at 4 000 trips); a loop whose trips' values would take more than
    KEPT_TRIPS_BYTES runs for the asked trips only, several asked at once (in any order,
    far apart) from one run. Values equal the loop by hand."""
    from jaxsurgery import _loop_index, _structured

    runs = []
    run = _structured.Structured.run
    monkeypatch.setattr(
        _structured.Structured, "run", lambda *a, **k: runs.append(1) or run(*a, **k)
    )
    x, n = jnp.linspace(-1.0, 1.0, 4), 2000
    by_hand = _halving_by_hand(x, n)
    g = js.trace(_halving_loop, x, jnp.asarray(n))
    assert isinstance(g["body/hn@7"], VirtualVar)  # (folded: too long to unroll)
    allclose(g.value("body/hn@7"), by_hand[7], rtol=1e-5)
    made, ran = len(g._loop_index.vars), len(runs)
    for t in (0, 1500, 1999):
        allclose(g.value(f"body/hn@{t}"), by_hand[t], rtol=1e-5)
    assert len(runs) == ran  # rows of the first run
    assert len(g._loop_index.vars) - made <= 3  # the vars asked for, not one per trip

    monkeypatch.setattr(_loop_index, "KEPT_TRIPS_BYTES", 4 * 4 * 10)
    g = js.trace(_halving_loop, x, jnp.asarray(n))
    found = g.value(["body/hn@40", "body/hn@3", "body/hn@17", "body/hn@1999"])
    for t, value in zip((40, 3, 17, 1999), found):
        allclose(value, by_hand[t], rtol=1e-5)
    allclose(g.value("body/hn@150"), by_hand[150], rtol=1e-5)
    assert len(g._loop_index.vars) <= 5


def test_a_patch_that_ends_a_folded_while_loop_sooner_leaves_its_later_trips_unmade():
    """A patch in a while_loop's body can change how many trips it runs: a value at a
    trip the patched loop no longer reaches is a SliceError (its traced count's rows
    held zeros there); values before it equal the loop by hand."""

    def f(x):
        def body(c):
            i, h = c
            hn = jnp.tanh(h * 1.01 + 0.1)
            j = i + 1
            return j, hn

        return jax.lax.while_loop(lambda c: c[0] < 3000, body, (0, x))[1].sum()

    x = jnp.linspace(-1.0, 1.0, 4)
    g = js.trace(f, x)
    assert isinstance(g["body/hn@2000"], VirtualVar)
    for patched in (
        g.replace("body/j@100", lambda j: j + 5000),  # stops after trip 100
        g.replace("body/j@*", lambda j: j + 1),  # 1 500 trips
    ):
        for name in ("body/hn@2000", "body/j@2500"):
            with pytest.raises(js.SliceError, match="not made for the traced arguments"):
                patched.value(name)
        h = x
        for _ in range(51):
            h = jnp.tanh(h * 1.01 + 0.1)
        allclose(patched.value("body/hn@50"), h, rtol=1e-5)


def test_a_while_loops_trips_are_counted_by_one_compiled_counter_for_every_patched_graph(
    monkeypatch,
):
    """Each graph g.replace makes counts its while_loops' trips again (a patch before
    the loop can change them): the counter is compiled once per loop (made anew, each
    replace compiled it again, 100 ms); each graph counts its own trips."""
    from jaxsurgery import _control_flow

    traced = []
    counting = _control_flow._counting_loop
    monkeypatch.setattr(
        _control_flow, "_counting_loop", lambda *a: traced.append(1) or counting(*a)
    )
    x, n = jnp.linspace(-1.0, 1.0, 4), 2000
    g = js.trace(_halving_loop, x, jnp.asarray(n))
    g["body/hn@1999"]  # (counts the trips)
    made = len(traced)
    patched = g
    for t in (3, 5, 7):
        patched = patched.replace(f"body/hn@{t}", lambda h: h * 0.5)
        patched["body/hn@1999"]
    assert len(traced) == made
    shorter = g.replace("n", jnp.asarray(1500))  # its own count
    with pytest.raises(js.SelectionError, match="a loop of 1500 iterations"):
        shorter["body/hn@1700"]


def test_patches_of_one_function_at_many_trips_are_one_edit_of_the_loop_body():
    """``g.replace`` at 30 trips of a while_loop, each call with a function of its own
    that computes the same (closing over a NumPy steering vector, which each trace
    copies): the loop body holds one patch for all of them (was one
    branch per patch: 200 patches took 4 s to compile); the output equals the loop by
    hand."""
    x, n = jnp.linspace(-1.0, 1.0, 4), 2000
    g = js.trace(_halving_loop, x, jnp.asarray(n))
    patched = g
    steer = np.full(4, 0.1, np.float32)  # (a NumPy array: copied at each trace)
    for t in range(10, 40):
        patched = patched.replace(f"body/hn@{t}", lambda h: h * 0.5 + steer)
    f = patched.as_function()
    loops = [
        e for e in jax.make_jaxpr(f)(x, jnp.asarray(n)).jaxpr.eqns if e.primitive.name == "while"
    ]
    (body,) = [loop.params["body_jaxpr"].jaxpr for loop in loops if "body_jaxpr" in loop.params][
        -1:
    ]
    assert sum(e.primitive.name == "cond" for e in body.eqns) <= 1
    by_hand = _halving_by_hand(x, n, {})
    h = x
    for t in range(n):
        h = jnp.tanh(h * 1.5 + 0.1)
        h = h * 0.5 + 0.1 if 10 <= t < 40 else h
    allclose(f(x, jnp.asarray(n)), h.sum(), rtol=1e-5)
    allclose(patched.value("body/hn@5"), by_hand[5], rtol=1e-5)


def test_patches_at_far_apart_trips_of_a_while_loop_given_in_any_order():
    """Values put in at trips of a while_loop far apart (one loop counting its trips),
    listed out of order, go to their own trips; the output equals the loop by hand."""
    x, n = jnp.linspace(-1.0, 1.0, 4), 2000
    patches = {40: jnp.full(4, 0.5), 3: jnp.full(4, -0.25), 17: jnp.arange(4.0) / 8}
    g = js.trace(_halving_loop, x, jnp.asarray(n))
    assert isinstance(g["body/hn@40"], VirtualVar)
    p = g.patch_fn([f"body/hn@{t}" for t in patches])
    out = p({f"body/hn@{t}": v for t, v in patches.items()}, x, jnp.asarray(n))
    allclose(out, _halving_by_hand(x, n, patches)[-1].sum(), rtol=1e-5)
    patched = g
    for t, v in patches.items():
        patched = patched.replace(f"body/hn@{t}", v)
    allclose(patched.as_function()(x, jnp.asarray(n)), out, rtol=1e-6)
    allclose(patched.value("body/hn@20"), _halving_by_hand(x, n, patches)[20], rtol=1e-5)
    allclose(patched.value("body/hn@40"), patches[40])
    # patched at every trip: its values, after the patch, from one run of the loop
    halved = g.replace("body/hn@*", lambda h: h * 0.5)
    by_hand, h = [], x
    for _ in range(n):
        h = jnp.tanh(h * 1.5 + 0.1) * 0.5
        by_hand.append(h)
    for t in (0, 999, 1999):
        allclose(halved.value(f"body/hn@{t}"), by_hand[t], rtol=1e-5)


def _long_body_loop(x, n):
    """A while_loop whose body is too long to unroll at trace time (folded), inside a
    ``jax.jit`` helper (as diffrax's solver loop sits inside its calls)."""

    @jax.jit
    def solve(x, n):
        def body(state):
            i, y = state
            for _ in range(70):  # 210 equations
                y = jnp.sin(y) * 0.9 + 0.01
            return i + 1, y

        return jax.lax.while_loop(lambda s: s[0] < n, body, (0, x))[1]

    return solve(x, n)


def test_a_folded_while_loop_inside_a_call_counts_its_trips():
    """Its trip count is found when first needed, though the loop sits inside a call:
    a glob over its iterations selects one var per trip; an iteration it never runs is a
    SelectionError saying how many times it runs (not a wrong-path error), though its
    name has brackets (tried as a glob too); values agree
    with the loop run by hand."""
    x, n = jnp.linspace(0.1, 0.5, 3), jnp.asarray(3)
    g = js.trace(_long_body_loop, x, n)
    assert any(v.primitive == "while" for v in g.vars)
    base = "solve/body[1]"  # what the body returns: y after its trip
    with pytest.raises(js.SelectionError, match=r"inside a loop of 3 iterations, 0 \.\. 2"):
        g.value(f"{base}@5")

    y = x
    for _ in range(70 * 3):
        y = jnp.sin(y) * 0.9 + 0.01
    allclose(g.value(f"{base}@2"), y, rtol=1e-5)
    h = js.trace(_long_body_loop, x, n)
    assert len(h.select(f"{base}@*")) == 3


def layers_of_scans(w, xs):
    """A scan over blocks whose body runs a scan over a sequence (layers × time)."""

    def block(c, x):
        def cell(h, y):
            h = jnp.tanh(h * w + y)
            return h, h

        c, hs = jax.lax.scan(cell, c, x)
        c2 = c * 2.0
        return c2, hs.sum()

    c, s = jax.lax.scan(block, jnp.zeros(3), xs)
    return c.sum() + s.sum()


def layers_of_scans_by_hand(w, xs, at=None, h_at=None):
    """The same by hand; ``h_at`` replaces the cell state at ``at = (block, step)``."""
    c, total = jnp.zeros(3), 0.0
    for t in range(xs.shape[0]):
        h = c
        for u in range(xs.shape[1]):
            h = h_at if (t, u) == at else jnp.tanh(h * w + xs[t, u])
            total = total + h.sum()
        c = h * 2.0
    return c.sum() + total


def test_a_short_scan_inside_a_folded_loop_is_unrolled_in_its_template_and_named():
    w, xs = jnp.array([0.5, -0.3, 0.8]), jax.random.normal(jax.random.key(4), (4, 6, 3)) * 0.3
    g = js.trace(layers_of_scans, w, xs)
    # the outer loop stays one equation; inner values are name@block@step
    assert len(g._program.folded) == 1 and len(g.vars) < 20
    h = g["block/cell/h#1@2@3"]
    assert isinstance(h, VirtualVar) and h.name == "block/cell/h#1@2@3"
    c, state = jnp.zeros(3), None  # the cell state at block 2, step 3, by hand
    for t in range(3):
        state = c
        for u in range(6 if t < 2 else 4):
            state = jnp.tanh(state * w + xs[t, u])
        c = state * 2.0
    allclose(g.value(h), state, rtol=1e-5)
    # one value, one var: the parameter h at step 4 is what step 3 made
    assert g["block/cell/h#0@2@4"] is h and "block/cell/h#0@2@4" in h.aliases
    # the name without #k names two values: the parameter at step 3 (step 2's result)
    # and the result of step 3
    with pytest.raises(
        js.SelectionError, match=r"h#1@2@3, block/cell/h#0@2@3 \(= block/cell/h#1@2@2\)"
    ):
        g["block/cell/h@2@3"]
    assert len(g.select("block/cell/h#1@2@*")) == 6
    # a slice from that inner value to the output, and gradients at it, against the hand
    rest = functools.partial(layers_of_scans_by_hand, w, xs, (2, 3))
    check_slice(g.slice(h, "out"), (g.value(h),), rest)
    allclose(g.grads("out", [h.name])[h.name], jax.grad(rest)(g.value(h)), rtol=1e-5)
    # it reads a value of the same step, which resolves by the name it shows
    (read,) = h.producers
    assert read.name.endswith("@2@3") and g[read.name] is read


def test_a_long_scan_inside_a_folded_loop_stays_one_equation_of_the_template():
    w, xs = jnp.ones(3) * 0.5, jnp.ones((3, 1000, 3)) * 0.1  # 1000 steps: not unrolled
    g = js.trace(layers_of_scans, w, xs)
    assert g["block/c2@1"].shape == (3,)
    with pytest.raises(js.SelectionError, match="block/cell/h"):
        g["block/cell/h#1@1@3"]


def test_stacked_gradients_of_a_carry_whose_last_step_is_the_loop_result():
    w = jax.random.normal(jax.random.key(5), (4, 4)) / 2
    xs = jax.random.normal(jax.random.key(6), (20, 4))

    def rnn_last(w, xs):  # only the last carry leaves the loop: h_new@19 is h_last
        def step(h, x):
            h_new = jnp.tanh(w @ h + x)
            return h_new, None

        h_last, _ = jax.lax.scan(step, jnp.zeros(4), xs)
        return jnp.sum(h_last**2)

    def trick(eps, w, xs):  # eps[t] added to h_new at step t, by hand
        def step(h, inp):
            x, e = inp
            h_new = jnp.tanh(w @ h + x) + e
            return h_new, None

        h_last, _ = jax.lax.scan(step, jnp.zeros(4), (xs, eps))
        return jnp.sum(h_last**2)

    g = js.trace(rnn_last, w, xs)
    assert g["step/h_new@19"] is g["h_last"]
    expected = jax.grad(trick)(jnp.zeros((20, 4)), w, xs)
    allclose(g.grads("out", {"h": "step/h_new@*"})["h"], expected, rtol=1e-5)
    fn = jax.jit(g.grads_fn("out", {"h": "step/h_new@*"}))
    allclose(fn(w * 0.5, xs)["h"], jax.grad(trick)(jnp.zeros((20, 4)), w * 0.5, xs), rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_a_slice_to_an_iteration_that_runs_before_its_input_is_refused(reverse):
    w = jax.random.normal(jax.random.key(7), (4, 4)) / 2
    xs = jax.random.normal(jax.random.key(8), (20, 4))

    def rnn(w, xs):
        def step(h, x):
            a = w @ h + x
            return jnp.tanh(a), a

        return jax.lax.scan(step, jnp.zeros(4), xs, reverse=reverse)[0].sum()

    g = js.trace(rnn, w, xs)
    early, late = ("step/a@3", "step/a@10") if not reverse else ("step/a@10", "step/a@3")
    # the split keeps the loop whole, so only the order of iterations tells this
    with pytest.raises(js.SliceError, match=f"output '{early}' does not depend on any input"):
        g.slice(late, early)
    with pytest.raises(js.SliceError, match=f"input '{late}' is computed after every output"):
        g.slice((early, late), g["step/a@" + ("5" if not reverse else "8")])
    s = g.slice(early, late)  # the other way round is a slice
    check_slice(s, (g.value(early),))
    assert float(jnp.abs(jax.jvp(s, (g.value(early),), (jnp.ones(4),))[1]).sum()) > 0


@pytest.mark.parametrize("reverse", [False, True])
def test_an_input_that_is_an_output_is_the_identity_also_for_a_value_only_the_carry_holds(
    reverse,
):
    """A body value only the carry passes on is cut in on the carry entering the next
    iteration: as an output too it is the input itself (it was the traced value, with a
    zero derivative), and later outputs read the input."""

    def f(h0, xs):
        def step(h, x):
            hn = jnp.tanh(h + x)
            return hn, None

        return jax.lax.scan(step, h0, xs, reverse=reverse)[0]

    xs = jax.random.normal(jax.random.key(3), (40, 2))
    g = js.trace(f, jnp.zeros(2), xs)
    z = g.value("step/hn@20") + 1.0
    same = g.slice("step/hn@20", "step/hn@20")
    allclose(same(z), z)
    allclose(jax.jacfwd(same)(z), jnp.eye(2))
    after = 19 if reverse else 21
    s = g.slice("step/hn@20", ("step/hn@20", f"step/hn@{after}"))
    check_slice(s, (z,), lambda h: (h, jnp.tanh(h + xs[after])))


def test_an_input_another_input_shields_in_a_loop_slice_has_a_zero_derivative_and_a_note():
    """``a@t`` reaches the output only through ``hn@t``, also an input: the slice is
    made (it was a SliceError saying a@t does not reach any output), a@t's derivative
    is zero and the notes say why, as for a flat slice."""

    def f(h0, xs):
        def step(h, x):
            a = h + x
            hn = jnp.tanh(a)
            return hn, hn

        return jax.lax.scan(step, h0, xs)[0]

    xs = jax.random.normal(jax.random.key(4), (30, 3))
    g = js.trace(f, jnp.ones(3), xs)
    s = g.slice(("step/a@3", "step/hn@3"), "out")
    assert s.notes[0] == (
        "input 'step/a@3' reaches the outputs only through other inputs: its derivative is zero"
    )
    a, hn = g.value("step/a@3"), g.value("step/hn@3")
    allclose(jax.jacfwd(s, argnums=0)(a, hn), jnp.zeros((3, 3)))

    def rest(hn):
        for t in range(4, 30):
            hn = jnp.tanh(hn + xs[t])
        return hn

    check_slice(s, (a, hn), lambda a, hn: rest(hn))


def test_a_scan_in_an_unrolled_while_loops_trips_is_named_trip_then_step():
    """The index unrolls the while_loop and keeps the scan in each trip folded: a value
    of the scan's body is ``name@trip@step``, as nested loops are (it was ``#trip``)."""

    def f(h0, xs):
        def body(c):
            k, v = c

            def step(h, x):
                hh = jnp.tanh(h + x)
                return hh, None

            vv, _ = jax.lax.scan(step, v, xs)
            return k + 1, vv * 0.5

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, h0))[1]

    h0, xs = jnp.array([0.1, 0.2]), jax.random.normal(jax.random.key(5), (4, 2))
    g = js.trace(f, h0, xs)
    by_hand, v = {}, h0
    for trip in range(3):
        h = v
        for step in range(4):
            h = by_hand[trip, step] = jnp.tanh(h + xs[step])
        v = h * 0.5
    for (trip, step), value in by_hand.items():
        allclose(g.value(f"body/step/hh@{trip}@{step}"), value)
    assert len(g.select("body/step/hh@*@1")) == 3  # step 1 of every trip
    assert len(g.select("body/step/hh@2@*")) == 4  # every step of trip 2
    check_slice(g.slice("body/step/hh@1@2", "body/step/hh@2@0"), (by_hand[1, 2],))
    with pytest.raises(
        js.SelectionError,
        match=r"'body/step/hh' is inside a loop of 4 iterations in each iteration of the "
        r"loops around it, 0 \.\. 3 \('body/step/hh@0@0' \.\. 'body/step/hh@2@3'\)",
    ):
        g["body/step/hh@3@0"]
    with pytest.raises(js.SelectionError, match=r"did you mean 'body/step/hh@1@2'"):
        g["body/step/hhh@1@2"]
    assert "e.g. 'body/step/h@0@0'" in " ".join(g.notes)


@jax.jit
def _solve(x):
    def body(h, _):
        nv = jnp.sin(h) + 0.5
        return nv, None

    return jax.lax.scan(body, x, None, length=3)[0]


def test_a_loop_in_a_jitted_function_called_twice_is_named_by_each_call():
    """JAX traces the jitted function once; each call's frames name its own loop (they
    named both, so a name had #k forms and solve#1's #0 was the first call's value)."""

    def f(x):
        a = _solve(x)
        b = _solve(a * 2.0)
        return b

    x = jnp.array([0.1, 0.2])
    g = js.trace(f, x)
    for call, h in enumerate((x, _solve(x) * 2.0)):
        for t in range(3):
            h = jnp.sin(h) + 0.5
            allclose(g.value(f"_solve#{call}/body/nv@{t}"), h)
    assert g["_solve#1/body/nv@2"] is g["b"]


def scoped_rnn(h0, xs):
    """A scan whose body runs in a ``jax.named_scope``: ``blk@t`` and ``step/h_new@t``."""

    def step(h, x):
        with jax.named_scope("blk"):
            h_new = jnp.tanh(h + x)
        return h_new, None

    return jax.lax.scan(step, h0, xs)[0].sum()


def test_loop_values_rank_names_as_the_flat_index_and_filter_by_their_primitives():
    g = js.trace(scoped_rnn, jnp.zeros(3), jnp.ones((50, 3)))
    v = g["blk@7"]
    # the Python name first, then what the body returned, then the scope, as for flat vars
    assert v.name == "step/h_new@7" and v.aliases[:2] == ("step[0]@7", "blk@7")
    # a primitive only the loop body has is a filter, not "no var is made by 'tanh'"
    # (step/h@3, the carry into step 3, is step/h_new@2)
    assert g.select("step/*@3", primitive="tanh").names == ("step/h_new@2", "step/h_new@3")


def test_reverse_mode_through_a_folded_while_loop_is_a_slice_error_and_auto_goes_forward():
    x = jnp.array([2.0, -1.0, 0.5])
    g = js.trace(refine, x, 1e-4)
    with pytest.raises(js.SliceError, match="no reverse mode"):
        g.vjp("body/h_new@1", "out", 1.0)
    with pytest.raises(js.SliceError, match="mode='fwd'"):
        g.jacobian("body/h_new@1", "out", mode="rev")
    trips = g._loop_index.length(g._program.folded[0], need=True)

    def rest(h):  # the remaining trips by hand, then the loss
        return jnp.sum(refine_by_hand(h, trips - 2) ** 2)

    h1 = g.value("body/h_new@1")  # 3 inputs, 1 output: auto would pick reverse mode
    allclose(g.jacobian("body/h_new@1", "out"), jax.jacfwd(rest)(h1), rtol=1e-4)


def test_a_slice_inside_one_trip_of_a_folded_while_loop_holds_no_loop():
    x = jnp.array([2.0, -1.0, 0.5])
    g = js.trace(refine, x, 1e-4)
    # the carry trip 1 passes on to the value trip 2 makes: trip 2's body alone
    s = g.slice("body/h_new@1", "body/h_new@2")
    assert not [e for e in s.jaxpr.eqns if e.primitive.name == "while"]
    h = g.value("body/h_new@1")
    allclose(s(h), refine_by_hand(h, 1), rtol=1e-5)
    loss = lambda h: jnp.sum(s(h) ** 2)  # noqa: E731
    by_hand = lambda h: jnp.sum(refine_by_hand(h, 1) ** 2)  # noqa: E731
    allclose(jax.grad(loss)(h), jax.grad(by_hand)(h), rtol=1e-4)  # reverse mode works
    _, pullback = jax.vjp(lambda h: refine_by_hand(h, 1), h)
    allclose(g.vjp("body/h_new@1", "body/h_new@2", jnp.ones(3))[1], pullback(jnp.ones(3))[0])
    # arguments for which the loop stops before trip 2: an error, not a wrong number
    with pytest.raises(js.SliceError, match="the loop stops before it"):
        s.bind(x * 1e-5, 1e-4)(h)
    # the value of that trip for new arguments runs 2 plain trips, then the edited one
    got = g.values_fn("body/h_new@2")(x * 2.0, 1e-4)["body/h_new@2"]
    allclose(got, refine_by_hand(x * 2.0, 3), rtol=1e-5)


def test_a_misspelt_loop_value_name_suggests_the_body_names(setup):
    g = js.trace(rnn, *setup)
    with pytest.raises(js.SelectionError, match=r"did you mean 'step/h_new@3'.*g\.notes"):
        g["step/h_neu@3"]
    # past the loop's end, or with iterations of loops the value is not in: names at
    # an iteration it has (the suggestions were 'step/h_new@5000', 'step/h_new@3@0')
    last = f"step/h_new@{len(setup[1]) - 1}"
    with pytest.raises(js.SelectionError, match=f"did you mean '{last}'"):
        g["step/h_neu@5000"]
    with pytest.raises(js.SelectionError, match="did you mean 'step/h_new@3'"):
        g["step/h_neu@3@0"]
    for suggested in (last, "step/h_new@3"):
        assert g[suggested].shape == setup[0].shape


def test_values_fn_keyed_by_a_dict_stacks_every_iteration(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    capture = jax.jit(g.values_fn({"h": "step/h_new@*", "few": ["step/a@1", "step/a@2"]}))
    got = capture(h0 * 0.5, xs, w)
    assert set(got) == {"h", "few"} and got["h"].shape == (T, 4) and got["few"].shape == (2, 4)
    allclose(got["h"][700], rnn_state_after(h0 * 0.5, xs, w, 700), rtol=1e-4)
    allclose(got["few"][1], rnn_state_after(h0 * 0.5, xs, w, 1) @ w + xs[2], rtol=1e-5)


def test_a_drawing_highlights_the_loop_that_holds_a_loop_value(setup):
    from jaxsurgery._draw import roles

    g = js.trace(rnn, *setup)
    on_loop = {g["h_last"].index, g["hs"].index}
    assert set(roles(g, "step/a@5")) == on_loop
    assert set(roles(g, "step/a@5").values()) == {"selected"}
    cut = roles(g, g.slice("step/a@3", "out"))
    assert {i for i, r in cut.items() if r == "input"} == on_loop
    assert cut[g["out"].index] == "output"


def test_scopes_in_unrolled_iterations_are_named_by_the_iteration_also_after_replace():
    h0, xs = jnp.zeros(3), jnp.linspace(0, 1, 30).reshape(10, 3)
    g = js.trace(scoped_rnn, h0, xs)
    # a patched graph keeps its index: blk@5 still names the value, and
    # blk@5.unpatched the old one
    g2 = g.replace("blk@5", lambda h: h * 0)
    assert g2["blk@5"].index != g2["blk@5.unpatched"].index
    allclose(g2.value("blk@5"), jnp.zeros(3))
    allclose(g2.value("blk@5.unpatched"), g.value("blk@5"))
    assert g2["blk@6"] is g2["step/h_new@6"]
    with pytest.raises(js.SelectionError):
        g2["blk#5"]  # no longer numbered as if each iteration were another scope


def test_a_cond_in_a_folded_loop_body_is_kept_whole_and_the_notes_say_so():
    def rnn(xs):
        def step(h, x):
            h_new = jax.lax.cond(x[0] > 0, jnp.tanh, jnp.sin, h + x)
            return h_new, None

        return jax.lax.scan(step, jnp.zeros(2), xs)[0].sum()

    g = js.trace(rnn, jnp.linspace(-1, 1, 40).reshape(20, 2))
    assert any("a cond stays one equation" in n and "js.tag" in n for n in g.notes)
    assert g["step/h_new@3"].primitive == "cond"


def test_a_reverse_scan_stacks_its_carry_in_iteration_order():
    """In a reverse scan the carry entering iteration t is iteration t + 1's result,
    and the one entering the last iteration (which runs first) is the initial carry:
    ``step/h@*`` stacks them by iteration, as for a forward scan."""

    def f(h0, xs):
        def step(h, x):
            a = jnp.sin(h) + x
            return a, None

        return jax.lax.scan(step, h0, xs, reverse=True)[0]

    h0, xs = jnp.float32(0.0), jnp.arange(1.0, 5.0)
    entering = [None] * 4  # by hand: the carry entering each iteration
    h = h0
    for t in reversed(range(4)):
        entering[t] = h
        h = jnp.sin(h) + xs[t]
    g = js.trace(f, h0, xs)
    assert g.select("step/h@*").matched == tuple(f"step/h@{t}" for t in range(4))
    allclose(g.values_fn({"h": "step/h@*"})(h0, xs)["h"], jnp.stack(entering))

    def perturbed(eps):  # the zero-perturbation trick at every carry
        h = h0
        for t in reversed(range(4)):
            h = jnp.sin(h + eps[t]) + xs[t]
        return h

    allclose(g.grads("out", {"h": "step/h@*"})["h"], jax.grad(perturbed)(jnp.zeros(4)))


@pytest.mark.parametrize("loop", ["scan", "fori_loop"])
def test_a_carry_the_loop_passes_on_unchanged_has_no_value_per_iteration(loop):
    """JAX makes a carry the body returns unchanged a constant of the loop: one value
    for every iteration. Edits "at iteration t" of it would be edits of that constant
    in one iteration only (or before the loop), not of the carry the user wrote, so
    it has no name per iteration, and the graph says why."""

    def f(c0, xs, n):
        def step(carry, x):
            h, c = carry
            h_new = h + jnp.sin(c * x)
            return (h_new, c), None

        def body(i, carry):
            return step(carry, xs[i])[0]

        init = (jnp.zeros(()), c0)
        if loop == "scan":
            (h, c), _ = jax.lax.scan(step, init, xs)
        else:  # a traced trip count: a while_loop, unrolled in the index
            (h, c) = jax.lax.fori_loop(0, n, body, init)
        return h + 10.0 * c

    c0, xs = jnp.float32(0.7), jnp.arange(1.0, 5.0)
    g = js.trace(f, c0, xs, 4)
    name = "step/c@2" if loop == "scan" else "body/step/c@2"
    with pytest.raises(js.SelectionError, match=f"no var named '{name}'"):
        g[name]
    assert any("step/c" in n and "passes on unchanged" in n for n in g.notes)
    allclose(g.as_function()(c0, xs, 4), f(c0, xs, 4))
    # the carry that changes keeps its names, per iteration
    h2 = sum(jnp.sin(c0 * x) for x in xs[:3])
    allclose(g.value(name.replace("/c@", "/h_new@")), h2)


class Pair(NamedTuple):
    carry: Any
    y: Any


@pytest.mark.parametrize("loop", ["scan", "scan, a list", "scan, a namedtuple", "map", "hk.scan"])
def test_a_row_a_body_returns_as_it_is_reaches_what_reads_ys(loop):
    """``return c + sin(x), x``: JAX takes such a ``ys`` from ``xs`` outside the loop,
    so ``step/x@3`` reached none of the readers of ``ys``: its gradient missed the
    ``sum(ys ** 2)`` term, a patch of it left ``ys`` as it was, and a slice from a row
    read only through ``ys`` was refused ("does not depend"), all silently. The row is
    returned anew (a copy), as the body says."""
    import haiku as hk

    def f(w, xs):
        def step(c, x):
            c_new = jnp.tanh(w * c + x[0])
            if loop == "scan, a list":  # (JAX takes any pair)
                return [c_new, (x[1], c_new)]
            if loop == "scan, a namedtuple":
                return Pair(c_new, (x[1], c_new))
            return c_new, (x[1], c_new)  # the second row as it is

        if loop == "map":
            c, (ys, cs) = 0.0, jax.lax.map(lambda x: step(0.0, x)[1], xs)
        elif loop == "hk.scan":
            c, (ys, cs) = hk.scan(step, 0.0, xs)
        elif loop == "scan, a namedtuple":  # (its type kept: read by field)
            out = jax.lax.scan(step, 0.0, xs)
            c, (ys, cs) = out.carry, out.y
        else:
            c, (ys, cs) = jax.lax.scan(step, 0.0, xs)
        return jnp.sum(ys * cs) + jnp.sum(ys**2) + c

    xs = (jnp.linspace(-1.0, 1.0, 6), jnp.linspace(0.5, 2.0, 6))
    if loop == "scan, a namedtuple":
        try:
            jax.make_jaxpr(f)(0.7, xs)
        except TypeError as refused:  # (newer JAX wants a tuple or list: as JAX does)
            with pytest.raises(TypeError, match=re.escape(str(refused).split(",")[0])):
                js.trace(f, 0.7, xs)
            return
    if loop == "hk.scan":  # (Haiku's loops run inside a transformed function)
        apply = hk.without_apply_rng(hk.transform(f)).apply
        g, call = js.trace(apply, {}, 0.7, xs), lambda *a: apply({}, *a)
    else:
        g, call = js.trace(f, 0.7, xs), f
    row = g.select("**step/x[1]@2").one().name

    def moved(e):  # f with that row of ys (and of xs: the same value) moved by e
        return call(0.7, (xs[0], xs[1].at[2].add(e)))

    args = ({}, 0.7, xs) if loop == "hk.scan" else (0.7, xs)
    # (the references under jit: run eagerly, each operation compiles on its own)
    d_moved = jax.jit(jax.grad(moved))(0.0)
    allclose(g.grads("out", wrt=[row])[row], d_moved, rtol=1e-5)
    allclose(jax.grad(g.slice(row, "out"))(g.value(row)), d_moved, rtol=1e-5)
    allclose(g.replace(row, lambda v: v + 1.0).as_function()(*args), jax.jit(moved)(1.0), rtol=1e-5)
    allclose(g.as_function()(*args), jax.jit(call)(0.7, xs))


def test_globs_match_body_values_by_place():
    """``loop<k>%<i>@t`` names a body value nothing names (as ``%<i>`` in the flat
    index); globs over it stack its iterations."""

    def f(h0, xs):
        def step(h, x):
            return jnp.sin(h) * 2.0 + x, None

        h, _ = jax.lax.scan(step, h0, xs)
        return h

    h0, xs = jnp.float32(0.0), jnp.arange(1.0, 5.0)
    g = js.trace(f, h0, xs)
    unnamed = [n for n in g.select("loop0%*@2").names if n.startswith("loop0%")]
    assert unnamed, g.select("loop0%*@2").names
    base = unnamed[0].removesuffix("@2")
    rows = g.values_fn({"v": f"{base}@*"})(h0, xs)["v"]
    assert rows.shape == (4,)
    allclose(rows[2], g.value(f"{base}@2"))


def test_a_scope_of_several_outputs_in_a_loop_body_is_one_name_as_outside_loops():
    """``blk`` with two outputs in a scan body: ``blk@t`` selects both, as ``blk`` does
    outside loops, and ``#k`` numbers instances of the scope only (``blk#1@t`` was the
    second output, or the second instance once the body entered ``blk`` twice)."""

    def body(h, _):
        with jax.named_scope("blk"):
            a = jnp.sin(h)
            b = jnp.cos(h)
        m = a * b
        with jax.named_scope("blk"):
            c = jnp.sin(m)
        return c, None

    def once(h0):
        def step(h, _):
            with jax.named_scope("blk"):
                a = jnp.sin(h)
                b = jnp.cos(h)
            return a * b, None

        return jax.lax.scan(step, h0, None, length=4)[0]

    x = jnp.array([0.3, 0.7])
    g = js.trace(once, x)
    assert g.select("blk@1").names == ("step/a@1", "step/b@1")
    with pytest.raises(js.SelectionError):
        g["blk#1@1"]
    twice = js.trace(lambda h0: jax.lax.scan(body, h0, None, length=4)[0], x)
    assert twice.select("blk#0@1").names == ("body/a@1", "body/b@1")
    assert twice["blk#1@1"].name == "body/c@1"
    h = x
    for _ in range(2):
        h = jnp.sin(jnp.sin(h) * jnp.cos(h))
    allclose(twice.value("blk#1@1"), h)


def test_a_patched_graph_counts_its_own_trips():
    """``g.replace("n", 5)`` makes a loop of 5 trips that shares the folded loop with
    ``g`` (100 trips): naming a trip in one does not fix the count of the other."""

    def f(x, n):
        def body(c):
            i, h = c
            for _ in range(60):  # folded
                h = jnp.sin(h) * 0.9 + 0.01
            h2 = h + 0.5 * i
            return i + 1, h2

        return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

    x = jnp.linspace(-1.0, 1.0, 3)
    g = js.trace(f, x, jnp.int32(100))
    fewer, more = g.replace("n", jnp.int32(5)), g.replace("n", jnp.int32(200))
    assert fewer["body/h2@3"].shape == more["body/h2@150"].shape == (3,)
    with pytest.raises(js.SelectionError, match=r"0 \.\. 4"):
        fewer["body/h2@50"]
    with pytest.raises(js.SelectionError, match=r"0 \.\. 99"):
        g["body/h2@150"]
    allclose(g.value("body/h2@50"), f(x, jnp.int32(51)), rtol=1e-5)


def test_a_suggestion_for_a_value_of_nested_loops_keeps_the_inner_iteration():
    def f(x):
        def outer(c, _):
            def inner(d, _):
                hid = jnp.sin(d) + 0.5
                return hid, None

            return jax.lax.scan(inner, c, None, length=3)[0] * 0.9, None

        return jax.lax.scan(outer, x, None, length=4)[0]

    g = js.trace(f, jnp.ones(3))
    with pytest.raises(js.SelectionError, match="did you mean 'outer/inner/hid@1@2'"):
        g["outer/inner/hdi@1@2"]


@jax.jit
def _jitted_layer(x):
    pre = jnp.cos(x) * 2
    return jnp.tanh(pre)


def test_a_jitted_layer_in_the_bodies_of_two_scans_names_each_scans_value():
    """One jaxpr for the layer, a copy in each scan's body: each call's frame found
    both (``s1/lay/pre#1@0`` was the second scan's value)."""

    def model(x):
        def s1(h, t):
            v = _jitted_layer(h + t)
            return v, v

        def s2(h, t):
            u = _jitted_layer(h * t)
            return u, u

        h, _ = jax.lax.scan(s1, x, jnp.arange(3.0))
        h, _ = jax.lax.scan(s2, h, jnp.arange(1.0, 3.0))
        return h

    x = jnp.array([0.5, -0.1, 0.2])
    g = js.trace(model, x)
    h = x
    for t in range(3):
        allclose(g.value(f"s1/_jitted_layer/pre@{t}"), jnp.cos(h + t) * 2)
        h = jnp.tanh(jnp.cos(h + t) * 2)
    for t in range(2):
        allclose(g.value(f"s2/_jitted_layer/pre@{t}"), jnp.cos(h * (t + 1.0)) * 2)
        h = jnp.tanh(jnp.cos(h * (t + 1.0)) * 2)


def test_a_layer_in_a_while_loop_kept_whole_in_a_scans_body_is_not_named_by_a_later_call():
    """The while_loop is one equation in the scan's body (its values unnamed, as the
    notes say): its frame took the copy of the call after it (step/body/lay/pre@0 was
    step/lay/pre@0's value)."""

    def model(x):
        def step(h, t):
            def body(c):
                i, q = c
                return i + 1, _jitted_layer(q + t)

            _, q = jax.lax.while_loop(lambda c: c[0] < 2, body, (0, h))
            return _jitted_layer(q * 0.5), None

        return jax.lax.scan(step, x, jnp.arange(1.0, 3.0))[0]

    g = js.trace(model, jnp.array([0.5, -0.1, 0.2]))
    with pytest.raises(js.SelectionError):
        g["step/body/_jitted_layer/pre@0"]
    q = jnp.array([0.5, -0.1, 0.2])
    for _ in range(2):
        q = jnp.tanh(jnp.cos(q + 1.0) * 2)
    allclose(g.value("step/_jitted_layer/pre@0"), jnp.cos(q * 0.5) * 2)


def test_an_unnamed_carry_is_named_by_the_parameter_that_takes_it_next():
    """The value trip t returns unnamed (fori_loop's i + 1, a `return jnp.tanh(...)`)
    is the body's parameter at trip t + 1: its canonical name is that parameter's
    (`step/i@3`), as an unrolled index names it, not `loop0%2@2`."""

    def f(x):
        def step(i, x):
            t = 9 - i
            return x * 0.5 + t

        return jax.lax.fori_loop(0, 10, step, x)

    g = js.trace(f, jnp.ones(3))
    v = g["step/i@3"]
    assert v.name == "step/i@3" and any(a.startswith("loop0%") for a in v.aliases), v.aliases
    assert g[v.aliases[0]] is v
    allclose(g.value("step/t@3"), 6.0)
    assert "step/i@3" in g.select("step/*@3").names


def _nested_scans(x, ws):  # ws: (outer, inner, 4, 4); the inner scan short: unrolled
    def outer(h, w3):
        def inner(h, w):
            return jnp.sin(h @ w) + h, None

        hn, _ = jax.lax.scan(inner, h, w3)
        return hn, None

    y, _ = jax.lax.scan(outer, x, ws)
    return jnp.sum(y**2)


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        pre = nn.Dense(5)(x)
        return jnp.sin(pre) + x


class _RematScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.sum(nn.remat_scan(_Inner, lengths=(2, 3))()(x) ** 2)


def test_values_an_unrolled_inner_loop_makes_list_and_differentiate_at_every_iteration():
    """An inner scan the outer body's index unrolls makes its rows of ``xs`` itself
    (``outer/inner/w@1@2``, no value of the nested program): the table, globs,
    producers and users at outer iterations past the first crashed (TypeError)."""
    x = jnp.ones(4)
    ws = jax.random.normal(jax.random.key(0), (2, 3, 4, 4)) / 3
    g = js.trace(_nested_scans, x, ws)
    reference = jax.grad(_nested_scans, argnums=1)(x, ws)
    for name, t in [("outer/inner/w@1@2", (1, 2)), ("outer/w3@1", 1)]:
        v = g[name]
        assert v.producers and v.users  # (no TypeError)
        allclose(g.value(v), ws[t])
        allclose(g.grads("out", wrt=[name])[name], reference[t], atol=1e-5)
        allclose(jax.grad(g.slice(name, "out"))(ws[t]), reference[t], atol=1e-5)
    assert "outer/inner/w@1@2" in str(g.select("**"))
    # Flax's nn.remat_scan: a scan of scans (a glob crashed)
    xs = jax.random.normal(jax.random.key(2), (2, 5))
    model = _RematScan()
    g = js.trace(model.apply, model.init(jax.random.key(1), xs), xs)
    assert len(g.select("**@1")) > 0 and len(g.select("**@*")) > 0


def test_the_note_of_a_folded_loop_no_code_names_says_how_its_values_are_named():
    """A loop in code jaxsurgery cannot rewrite (a library's, JAX's own as the Newton
    iterations of lax.custom_root, code without source) has no names from the code: the
    note said its values "answer to name@iteration", which none did; it says they
    answer to loop<k>%<i>@iteration, and they do."""
    space: dict = {"jax": jax, "jnp": jnp}
    exec(  # (no source to read: nothing in it is named)
        "def rnn(h, xs):\n    return jax.lax.scan(lambda h, x: (jnp.tanh(h + x), h), h, xs)[0]\n",
        space,
    )
    g = js.trace(space["rnn"], jnp.zeros(2), jnp.ones((5, 2)))
    (note,) = [n for n in g.notes if "one equation in the index" in n]
    assert "have no names from the code" in note and "name@iteration" not in note, note
    (add,) = [v for v in g.select("loop0%*@2") if v.primitive == "add"]  # h + x at step 2
    h = jnp.tanh(jnp.tanh(jnp.ones(2)) + 1.0)
    np.testing.assert_allclose(g.value(add), h + 1.0, rtol=1e-6)
