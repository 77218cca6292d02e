"""g.grads: every layer's dL/dz in one backward pass, equal to separate VJPs."""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import allclose

import jaxsurgery as js

DEPTH = 12


def deep_mlp(params, x, y):
    h = x
    for w, b in params:
        h = jnp.tanh(h @ w + b)
    loss = jnp.mean((h - y) ** 2)
    return loss


def make_params(key, width=8):
    keys = jax.random.split(key, DEPTH)
    return [(jax.random.normal(k, (width, width)) / 3.0, jnp.zeros(width)) for k in keys]


def test_grads_of_all_12_activations_equal_12_separate_vjps(key):
    params = make_params(key)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    y = jax.random.normal(jax.random.key(2), (4, 8))
    g = js.trace(deep_mlp, params, x, y)
    names = [f"h#{k}" for k in range(1, DEPTH + 1)]
    grads = g.grads("loss", wrt=names)
    assert list(grads) == names
    for name in names:
        _, separate = g.vjp(name, "loss", jnp.ones(()))
        allclose(grads[name], separate, rtol=1e-5, atol=1e-7)

    # the zero-perturbation reference for one layer, by hand
    def perturbed(eps):
        h = x
        for k, (w, b) in enumerate(params):
            h = jnp.tanh(h @ w + b) + (eps if k == 4 else 0.0)
        return jnp.mean((h - y) ** 2)

    allclose(grads["h#5"], jax.grad(perturbed)(jnp.zeros((4, 8))), rtol=1e-5, atol=1e-7)


def test_grads_mixes_inputs_and_intermediates(key):
    params = make_params(key)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    y = jnp.zeros((4, 8))
    g = js.trace(deep_mlp, params, x, y)
    grads = g.grads("loss", wrt={"w0": "params[0][0]", "x": "x", "mid": "h#6"})
    allclose(grads["w0"], jax.grad(deep_mlp)(params, x, y)[0][0], rtol=1e-5)
    allclose(grads["x"], jax.grad(deep_mlp, argnums=1)(params, x, y), rtol=1e-5)


def test_grads_inside_a_jitted_optax_training_loop(key):
    params = make_params(key)
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jnp.sin(x)
    g = js.trace(deep_mlp, params, x, y)
    monitor = g.grads_fn("loss", wrt=["h#1", "h#6", "h#12"])
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(deep_mlp)(params, x, y)
        updates, state = optimizer.update(grads, state)
        watched = monitor(params, x, y)  # dL/dz_i at this step's parameters
        norms = {k: jnp.linalg.norm(v) for k, v in watched.items()}
        return optax.apply_updates(params, updates), state, loss, norms, watched

    history = []
    for _ in range(4):
        before = params
        params, state, loss, norms, watched = step(params, state)
        history.append(norms)
        _, reference = js.trace(deep_mlp, before, x, y).vjp("h#6", "loss", jnp.ones(()))
        allclose(watched["h#6"], reference, rtol=1e-4, atol=1e-7)
    assert float(history[0]["h#12"]) != float(history[-1]["h#12"])  # they follow the params


def test_grads_need_float_vars():
    def f(x, n):
        m = n * 2
        return (x * m).sum()

    g = js.trace(f, jnp.ones(3), jnp.arange(3))
    with pytest.raises(js.SliceError, match=r"cannot differentiate with respect to 'm' \(int32\)"):
        g.grads("out", wrt=["m"])


def _rnn(w, h0, xs):
    def step(h, x):
        h = jnp.tanh(w @ h + x)
        return h, h

    h_last, hs = jax.lax.scan(step, h0, xs)
    return jnp.sum(hs**2) + jnp.sum(h_last)


def _eps_scan(eps, w, h0, xs):
    """The RNN with the hand-written zero-perturbation trick: eps[t] added at step t."""

    def step(h, inp):
        x, e = inp
        h = jnp.tanh(w @ h + x) + e
        return h, h

    return jax.lax.scan(step, h0, (xs, eps))


def _stacked_eps_trick(eps, w, h0, xs):
    h_last, hs = _eps_scan(eps, w, h0, xs)
    return jnp.sum(hs**2) + jnp.sum(h_last)


def _tanh_ops(fn, *args):
    """tanh instructions in the optimized HLO: one per loop body, T if unrolled."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if " tanh(" in line)


def test_grads_over_every_step_of_a_scan_are_one_scan_with_stacked_perturbations():
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    ops = []
    for T in (5, 40):
        args = (w, jnp.zeros(4), jnp.linspace(-1, 1, T * 4).reshape(T, 4))
        g = js.trace(_rnn, *args)
        names = [f"step/h#1@{t}" for t in range(T)]
        fn = g.grads_fn("out", names)
        new = (2 * w, jnp.ones(4) * 0.1, args[2] * 0.5)  # new arguments, jitted
        got = jax.jit(fn)(*new)
        reference = jax.grad(_stacked_eps_trick)(jnp.zeros((T, 4)), *new)
        allclose(jnp.stack([got[n] for n in names]), reference)
        ops.append(_tanh_ops(fn, *new))
    # the loop stays a loop (forward and backward scans), not T unrolled steps
    assert ops[0] == ops[1] <= 3, ops


def test_a_dict_entry_selecting_many_vars_stacks_their_gradients(key):
    params = make_params(key)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    y = jnp.zeros((4, 8))
    g = js.trace(deep_mlp, params, x, y)
    grads = g.grads("loss", wrt={"hidden": "h#*", "x": "x"})
    names = [v.name for v in g.select("h#*")]
    singles = g.grads("loss", wrt=names)
    assert grads["hidden"].shape == (len(names), 4, 8) and grads["x"].shape == (4, 8)
    allclose(grads["hidden"], jnp.stack([singles[n] for n in names]), rtol=1e-6)
    with pytest.raises(js.SliceError, match=r"wrt\['mixed'\] selects vars of different types"):
        g.grads("loss", wrt={"mixed": ["x", "params[0][1]"]})

    # every iteration of a (short, unrolled) loop value: the scan's stacked gradient
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    args = (w, jnp.zeros(4), jnp.linspace(-1, 1, 24).reshape(6, 4))
    g = js.trace(_rnn, *args)
    got = jax.jit(g.grads_fn("out", {"h": "step/h#1@*"}))(*args)["h"]
    allclose(got, jax.grad(_stacked_eps_trick)(jnp.zeros((6, 4)), *args))


def _last_only_rnn(w, h0, xs):  # the README's rnn: the last carry is the result
    def step(h, x):
        h_new = jnp.tanh(w @ h + x)
        return h_new, h_new

    h_last, _ = jax.lax.scan(step, h0, xs)
    return jnp.sum(h_last**2)


def _last_only_trick(eps, w, h0, xs):
    return jnp.sum(_eps_scan(eps, w, h0, xs)[0] ** 2)


@pytest.mark.parametrize("T", [12, 300])
def test_gradients_at_every_step_when_the_last_is_the_loops_result(T):
    """``step/h_new@{T-1}`` is the scan's result (a flat var), the others rows of the
    folded loop: the gradients are the scan's stacked rows and that one (they were T
    row picks stacked: a program, and a compile, growing with T)."""
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    xs = jnp.linspace(-1, 1, T * 4).reshape(T, 4)
    args = (w, jnp.zeros(4), xs)
    g = js.trace(_last_only_rnn, *args)
    assert g[f"step/h_new@{T - 1}"].primitive == "scan"  # the result itself
    fn = g.grads_fn("out", {"h": "step/h_new@*"})
    new = (2 * w, jnp.ones(4) * 0.1, xs * 0.5)
    allclose(jax.jit(fn)(*new)["h"], jax.grad(_last_only_trick)(jnp.zeros((T, 4)), *new))
    eqns = len(jax.make_jaxpr(lambda *a: fn(*a)["h"])(*new).jaxpr.eqns)
    assert eqns < 40, eqns


def _carry_only(ws, x):  # a stack of layers run by a scan: h is only the carry
    def step(h, w):
        h = jnp.tanh(h @ w)
        return h, None

    h, _ = jax.lax.scan(step, x, ws)
    return jnp.sum(h**2)


def _carry_only_by_hand(eps, patch, ws, x):
    """``_carry_only`` with ``eps[t]`` added to step t's h, or h replaced by
    ``patch[t]`` where that is not NaN; and every step's h."""

    def step(h, inp):
        w, e, p = inp
        h = jnp.tanh(h @ w) + e
        h = jnp.where(jnp.isnan(p), h, p)
        return h, h

    h, hs = jax.lax.scan(step, x, (ws, eps, patch))
    return jnp.sum(h**2), hs


def test_every_step_of_a_carry_only_scan_is_one_loop():
    """``step/h#1@*`` where h is only the carry: its last iteration is the scan's result,
    edited and read where that iteration makes it, so values, gradients and patches
    at every step run the scan once (they split it before its last iteration, and
    concatenated the rows: 1.3x the hand-written attribution on a scanned stack)."""
    T = 6
    ws = jax.random.normal(jax.random.key(0), (T, 3, 3)) / 2
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    g = js.trace(_carry_only, ws, x)
    assert g[f"step/h#1@{T - 1}"].primitive == "scan"  # the result itself
    every = {"h": "step/h#1@*"}
    no_patch = jnp.full((T, 2, 3), jnp.nan)
    zeros = jnp.zeros((T, 2, 3))
    new = (ws * 0.5, x * 2)

    def shape(fn, *args):  # (scans, concatenations) of the program a function runs
        names = [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]
        return names.count("scan"), names.count("concatenate")

    values = g.values_fn(every)
    allclose(jax.jit(values)(*new)["h"], _carry_only_by_hand(zeros, no_patch, *new)[1])
    assert shape(values, *new) == (1, 0)
    grads = g.grads_fn("out", every)
    reference = jax.grad(lambda e: _carry_only_by_hand(e, no_patch, *new)[0])(zeros)
    allclose(jax.jit(grads)(*new)["h"], reference)
    assert shape(grads, *new) == (2, 0)  # the forward and the backward scan
    patch = g.patch_fn(every)
    rows = jnp.arange(T * 6.0).reshape(T, 2, 3) / 10
    allclose(jax.jit(patch)({"h": rows}, *new), _carry_only_by_hand(zeros, rows, *new)[0])
    assert shape(lambda *a: patch({"h": rows}, *a), *new) == (1, 0)
    # the last step alone is still the result, after the loop
    last = f"step/h#1@{T - 1}"
    allclose(g.grads("out", wrt=[last])[last], 2 * g.value(last))
    # in a patched graph (a patch of the result runs after the loop) every step is
    # read where it was: after the patch
    patched = g.replace(last, lambda h: h * 3)
    hs = _carry_only_by_hand(zeros, no_patch, ws, x)[1]
    allclose(patched.values_fn(every)(ws, x)["h"], hs.at[-1].multiply(3))

    def patched_by_hand(eps):
        h = _carry_only_by_hand(eps.at[-1].set(0), no_patch, ws, x)[1][-1] * 3 + eps[-1]
        return jnp.sum(h**2)

    allclose(patched.grads_fn("out", every)(ws, x)["h"], jax.grad(patched_by_hand)(zeros))


def test_the_result_asked_alone_or_twice_is_read_where_the_function_has_it():
    """Regressions of reading a scan's result inside its last iteration: with the
    result perturbed alone (after the loop), every step asked as the output read the
    result before the perturbation (zero gradient); and where the last iteration's
    value is also a ys row the function leaves unread but the call asks for, the
    perturbation of the result reached that row."""
    T = 4
    ws = jax.random.normal(jax.random.key(0), (T, 3, 3)) / 2
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    g = js.trace(_carry_only, ws, x)
    every = [v.name for v in g.select("step/h#1@*")]
    assert every[-1] == "h"  # the result
    allclose(g.grads(every, ["h"])["h"], jnp.ones((2, 3)))  # d(sum of every h)/d(h)
    allclose(jax.jit(g.grads_fn(every, ["h"]))(ws, x)["h"], jnp.ones((2, 3)))

    def also_ys(ws, x):  # hs unread by the function
        def step(h, w):
            h = jnp.tanh(h @ w)
            return h, h

        h, hs = jax.lax.scan(step, x, ws)
        return jnp.sum(h**2)

    g = js.trace(also_ys, ws, x)
    every = [v.name for v in g.select("step/h#1@*")]
    got = g.grads_fn("hs", {"h": every})(ws, x)["h"]

    def hs_by_hand(eps):  # the result's perturbation (the last row) is after the loop
        def step(h, inp):
            h = jnp.tanh(h @ inp[0]) + inp[1]
            return h, h

        return jnp.sum(jax.lax.scan(step, x, (ws, eps.at[-1].set(0.0)))[1])

    reference = jax.grad(hs_by_hand)(jnp.zeros((T, 2, 3)))
    allclose(got, reference)
    allclose(got[-1], jnp.zeros((2, 3)))  # hs does not hold the result's perturbation


@pytest.mark.parametrize("T", [12, 200])
def test_gradients_at_a_run_of_iterations_are_one_edit(T):
    """Consecutive iterations ``t..u`` of one loop value: one edit over the range (its
    work independent of how many), equal to the stacked-eps trick on those rows."""
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    xs = jnp.linspace(-1, 1, T * 4).reshape(T, 4)
    args = (w, jnp.zeros(4), xs)
    new = (2 * w, jnp.ones(4) * 0.1, xs * 0.5)
    run = range(3, T - 2)
    fn = js.trace(_rnn, *args).grads_fn("out", {"mid": [f"step/h#1@{t}" for t in run]})
    got = jax.jit(fn)(*new)["mid"]
    allclose(got, jax.grad(_stacked_eps_trick)(jnp.zeros((T, 4)), *new)[3 : T - 2], rtol=1e-5)
    # the program that runs does not grow with the number of iterations
    eqns = len(jax.make_jaxpr(lambda *a: fn(*a)["mid"])(*new).jaxpr.eqns)
    assert eqns < 40, eqns

    # in a while_loop (a fori_loop with a traced bound) the same edit is refused as
    # jax.grad refuses the function: no reverse mode through while
    def fori_rnn(w, h0, xs, n):
        def body(t, h):
            return jnp.tanh(w @ h + xs[t])

        return jnp.sum(jax.lax.fori_loop(0, n, body, h0) ** 2)

    g = js.trace(fori_rnn, *args, 6)
    picked = [v.name for v in g.select("body/*@*") if v.shape == (4,)][1:4]
    with pytest.raises(js.SliceError, match="cross a while_loop"):
        g.grads_fn("out", {"h": picked})(*new, 6)


def test_grads_inside_a_custom_vjp_around_a_while_loop_say_why_the_rule_does_not_help():
    """jax.grad of the function takes the rule; a gradient at a value inside the call
    differentiates its body, loop included, which JAX refuses: the message must not
    claim that jax.grad of the function fails too, without a word on the rule."""

    @jax.custom_vjp
    def sqrt_newton(a):
        def body(c):
            x, i = c
            x_new = 0.5 * (x + a / x)
            return x_new, i + 1

        x, _ = jax.lax.while_loop(lambda c: c[1] < 4, body, (a, 0))
        return x

    sqrt_newton.defvjp(lambda a: (sqrt_newton(a), sqrt_newton(a)), lambda r, ct: (ct * 0.5 / r,))

    def f(a):
        r = sqrt_newton(a)
        return jnp.sum(r * 2.0)

    a = jnp.array([2.0, 9.0])
    g = js.trace(f, a)
    allclose(g.grads("out", ["r"])["r"], jnp.full(2, 2.0))  # outside the call: fine
    with pytest.raises(js.SliceError, match="unless a custom_vjp rule around the loop"):
        g.grads("out", ["sqrt_newton/body/x_new@1"])
    allclose(jax.grad(f)(a), 1 / jnp.sqrt(a), rtol=1e-3)  # the rule answers for the loop


@jax.custom_jvp
def frozen(x):
    """The identity, whose rule drops the derivative (a custom_jvp stop-gradient)."""
    return x


frozen.defjvp(lambda primals, tangents: (primals[0], jnp.zeros_like(primals[0])))


@jax.custom_jvp
def soft(x):
    """softplus, whose rule differentiates it (drops nothing)."""
    return jnp.logaddexp(x, 0.0)


soft.defjvp(lambda primals, tangents: (soft(primals[0]), jax.nn.sigmoid(primals[0]) * tangents[0]))


def looped(rule, kind):
    """A loop of 8 steps whose body passes its value through ``rule``, as a scan or as
    a while_loop (a fori_loop with a traced bound)."""

    def step(c, x):
        h = rule(jnp.sin(c + x))
        o = h * 2.0
        return o

    def f(c0, xs, n):
        if kind == "scan":
            return jax.lax.scan(lambda c, x: (step(c, x), None), c0, xs)[0].sum()
        return jax.lax.fori_loop(0, n, lambda t, c: step(c, xs[t]), c0).sum()

    return f


@pytest.mark.parametrize("kind", ["scan", "while"])
def test_a_rule_dropping_a_derivative_in_a_later_iteration_is_said(kind):
    """A slice input or a gradient at iteration 3 reaches the output through the later
    iterations, where the body's custom_jvp rule drops the derivative: the derivative
    is zero, as the rule says, and the slice's notes and g.grads say why (they looked
    at the top level of the loop around the input only)."""
    f = looped(frozen, kind)
    c0, xs, n = jnp.ones(2), jnp.linspace(0.0, 1.0, 16).reshape(8, 2), 8
    g = js.trace(f, c0, xs, n)
    name = (
        "step/o@3"
        if kind == "scan"
        else next(n for n in g.select("**/o@*").names if n.endswith("o@3"))
    )
    s = g.slice(name, "out")
    assert any("'frozen' is zero" in note for note in s.notes), s.notes
    o3 = g.value(name)
    allclose(jax.jvp(s, (o3,), (jnp.ones(2),))[1], jnp.zeros(()))
    if kind == "scan":  # (JAX has no reverse mode for a while_loop)
        with pytest.warns(UserWarning, match="'frozen' is zero"):
            allclose(g.grads("out", [name])[name], jnp.zeros(2))
    # a rule that differentiates: no note, no warning, the derivative of the loop
    g = js.trace(looped(soft, kind), c0, xs, n)
    s = g.slice(name, "out")
    assert not any("is zero" in note for note in s.notes), s.notes

    def by_hand(o):  # iterations 4..7 written out
        c = o
        for t in range(4, 8):
            c = soft(jnp.sin(c + xs[t])) * 2.0
        return c.sum()

    o3, tangent = g.value(name), jnp.array([1.0, -2.0])
    allclose(jax.jvp(s, (o3,), (tangent,)), jax.jvp(by_hand, (o3,), (tangent,)), rtol=1e-5)
    if kind == "scan":  # (JAX has no reverse mode for a while_loop)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            allclose(g.grads("out", [name])[name], jax.grad(by_hand)(o3), rtol=1e-5)


def test_no_note_where_the_derivative_is_not_zero_for_every_argument():
    """A dropped-derivative note stands only where some output's derivative is zero for
    every argument: not for a rule in a scan of no iteration (its carry passes on: the
    identity), and not because of another output that is a stop_gradient (the
    user's own zero, beside a rule that differentiates its loop again from its inputs,
    as diffrax's adjoint does)."""
    c0 = jnp.array([0.3, -0.5])

    def empty_scan(c0):
        def step(c, _):
            return frozen(jnp.sin(c)) * 2.0, None

        return jax.lax.scan(step, c0, None, length=0)[0] * 3.0

    s = js.trace(empty_scan, c0).slice("c0", "out")
    assert not any("is zero" in n for n in s.notes), s.notes
    allclose(jax.jvp(s, (c0,), (jnp.ones(2),))[1], 3.0 * jnp.ones(2))

    def while_eight_trips(c0):  # a while_loop is judged as running a trip: noted
        def body(state):
            t, c = state
            return t + 1, frozen(jnp.sin(c)) * 2.0

        return jax.lax.while_loop(lambda state: state[0] < 8, body, (0, c0))[1].sum()

    s = js.trace(while_eight_trips, c0).slice("c0", "out")
    assert any("'frozen' is zero" in n for n in s.notes), s.notes
    allclose(jax.jvp(s, (c0,), (jnp.ones(2),))[1], 0.0)

    def loop(x):
        return jnp.sin(x) * 2.0

    @jax.custom_jvp
    def rerun(x, y):  # y = loop(x), passed on; the rule differentiates loop(x) again
        return y

    rerun.defjvp(lambda p, t: (p[1], jax.jvp(loop, (p[0],), (t[0],))[1]))

    def f(c0):
        out = rerun(c0, loop(c0))
        return out.sum(), jax.lax.stop_gradient(c0)

    s = js.trace(f, c0).slice("c0", ("out[0]", "out[1]"))
    assert not any("is zero" in n for n in s.notes), s.notes
    allclose(jax.grad(lambda c: s(c)[0])(c0), jax.grad(lambda c: f(c)[0])(c0))


def test_values_and_grads_of_a_grads_fn_says_it_has_no_values():
    """``g.grads_fn(...)`` computes gradients only: its ``values_and_grads`` returned an
    empty dict of values, silently (hunt X); attribution's function has both."""

    def loss(w, x):
        h = jnp.tanh(x @ w)
        return (h**2).mean()

    w, x = jnp.eye(2), jnp.ones((3, 2))
    g = js.trace(loss, w, x)
    with pytest.raises(js.SliceError, match="gradients only.*g.values_fn"):
        g.grads_fn("out", ["h", "w"]).values_and_grads(w, x)
    allclose(g.grads_fn("out", ["h"])(w, x)["h"], g.grads("out", ["h"])["h"])
