"""Slices against independent references: the zero-tangent trick and hand-written code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose, check_slice
from models import chain, f2, f3, mlp_12782, mlp_12782_args

import jaxsurgery as js


# -- issue 12782, case 1: the MLP ----------------------------------------------------------
def test_mlp_jvp_equals_zero_tangent_trick():
    x, p1, p2, p3 = mlp_12782_args()
    g = js.trace(mlp_12782, x, p1, p2, p3)
    s = g.slice("z1", "z2")
    z1 = g.value("z1")
    v = jnp.arange(1.0, 5.0)

    def perturbed(eps):  # the thread's rewrite of f with a perturbation at z1
        z1 = jnp.tanh(jnp.dot(p1[0], x) + p1[1]) + eps
        return jnp.tanh(jnp.dot(p2[0], z1) + p2[1])

    _, expected = jax.jvp(perturbed, (jnp.zeros(4),), (v,))
    _, got = jax.jvp(s, (z1,), (v,))
    allclose(got, expected)
    allclose(g.jvp("z1", "z2", v)[1], expected)
    check_slice(s, (z1,), lambda z1: jnp.tanh(jnp.dot(p2[0], z1) + p2[1]), eqns=3)


def test_mlp_every_pair_and_whole_rest():
    x, p1, p2, p3 = mlp_12782_args()
    g = js.trace(mlp_12782, x, p1, p2, p3)
    layer2 = lambda z: jnp.tanh(jnp.dot(p2[0], z) + p2[1])  # noqa: E731
    layer3 = lambda z: jnp.tanh(jnp.dot(p3[0], z) + p3[1])  # noqa: E731
    check_slice(g.slice("z2", "z3"), (g.value("z2"),), layer3, eqns=3)
    check_slice(g.slice("z1", "z3"), (g.value("z1"),), lambda z: layer3(layer2(z)), eqns=6)
    check_slice(g.slice("x", "z3"), (x,), lambda x: mlp_12782(x, p1, p2, p3), eqns=9)
    # a parameter as slice input: dz3/dW2 with everything else fixed
    check_slice(
        g.slice("params_2[0]", "z3"),
        (p2[0],),
        lambda w: layer3(jnp.tanh(jnp.dot(w, g.value("z1")) + p2[1])),
        eqns=6,
    )


def test_value_of_slice_matches_trace():
    args = mlp_12782_args()
    g = js.trace(mlp_12782, *args)
    allclose(g.slice("z1", "z3")(g.value("z1")), mlp_12782(*args))


# -- issue 12782, case 2: g(x0) built from f1, f2, f3 ---------------------------------------
@pytest.mark.parametrize(
    "start, reference",
    [
        ("x2", f3),
        ("x1", lambda a: f3(f2(a))),
        ("x0", chain),
    ],
)
def test_chain_rest_of_function_jacobians(start, reference):
    x0 = jnp.array([1.0, 2.0, 4.0])
    g = js.trace(chain, x0)
    s = g.slice(start, "x3")
    z = g.value(start)
    allclose(jax.jacfwd(s)(z), jax.jacfwd(reference)(z))
    allclose(g.jacobian(start, "x3", mode="rev"), jax.jacrev(reference)(z))
    check_slice(s, (z,), reference)


# -- residual and DenseNet-style connections: context semantics -----------------------------
def residual(x, w1, w2):
    z1 = jnp.tanh(x @ w1)
    z2 = jnp.tanh(z1 @ w2) + z1
    z3 = jnp.tanh(z2 @ w2) + z2
    return z3.sum()


def test_residual_skip_is_part_of_partial_derivative(key):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (2, 4))
    w1, w2 = jax.random.normal(k2, (4, 4)), jax.random.normal(k3, (4, 4))
    g = js.trace(residual, x, w1, w2)
    # z1 -> z2 : the skip reads z1, the input, so it is inside the window
    check_slice(g.slice("z1", "z2"), (g.value("z1"),), lambda z1: jnp.tanh(z1 @ w2) + z1, eqns=3)
    # z1 and z2 as inputs, z3 output: z3's dependence on z1 through z2 is cut at z2
    s = g.slice(("z1", "z2"), "z3")
    assert any("'z1' reaches the outputs only through other inputs" in n for n in s.notes)
    check_slice(s, (g.value("z1"), g.value("z2")), lambda z1, z2: jnp.tanh(z2 @ w2) + z2, eqns=3)
    # z1 @ w2 -> z2: the skip reads z1, which is not downstream of the input: context
    z1v = g.value("z1")
    dot = g.select(primitive="dot_general", where=lambda v: g["z1"] in v.producers).one()
    s3 = g.slice(dot, "z2")  # z1 @ w2 -> z2: z1 (the skip) is context
    assert [v.name for v in s3.context_vars] == ["z1"]
    assert "z1" in s3.context
    v = jax.random.normal(k1, (2, 4))
    _, got = jax.jvp(s3, (g.value(dot),), (v,))
    _, expected = jax.jvp(lambda d: jnp.tanh(d) + z1v, (g.value(dot),), (v,))
    allclose(got, expected)


def dense_block(x, ws):
    h0 = x
    h1 = jnp.tanh(h0 @ ws[0])
    h2 = jnp.tanh(jnp.concatenate([h0, h1], axis=-1) @ ws[1])
    h3 = jnp.tanh(jnp.concatenate([h0, h1, h2], axis=-1) @ ws[2])
    return h3


def test_densenet_block_context_is_the_zero_tangent_trick(key):
    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (2, 3))
    ws = [
        jax.random.normal(ks[1], (3, 3)),
        jax.random.normal(ks[2], (6, 3)),
        jax.random.normal(ks[3], (9, 3)),
    ]
    g = js.trace(dense_block, x, ws)
    h1 = g.value("h1")
    v = jax.random.normal(ks[0], h1.shape)

    def perturbed(eps):  # every layer reads h1; perturb h1 only
        h0 = x
        h1 = jnp.tanh(h0 @ ws[0]) + eps
        h2 = jnp.tanh(jnp.concatenate([h0, h1], axis=-1) @ ws[1])
        return jnp.tanh(jnp.concatenate([h0, h1, h2], axis=-1) @ ws[2])

    s = g.slice("h1", "h3")
    allclose(jax.jvp(s, (h1,), (v,))[1], jax.jvp(perturbed, (jnp.zeros_like(h1),), (v,))[1])
    assert {c.name for c in s.context_vars} == {"x", "ws[1]", "ws[2]"}
    check_slice(s, (h1,), lambda h1: perturbed(h1 - g.value("h1")))
    # h2 -> h3 holds h0 and h1 fixed: only the h2 block of the weight matters
    s2 = g.slice("h2", "h3")
    h2 = g.value("h2")

    def by_hand(h2):
        return jnp.tanh(jnp.concatenate([x, h1, h2], axis=-1) @ ws[2])

    check_slice(s2, (h2,), by_hand, eqns=3)


# -- semantics of the cut -------------------------------------------------------------------
def simple(x, w):
    a = jnp.sin(x)
    b = jnp.cos(a) * w
    c = a + b
    d = jnp.exp(c)
    return d, b


def test_identity_slice():
    g = js.trace(simple, jnp.ones(3), 2.0)
    s = g.slice("a", "a")
    assert len(s.jaxpr.eqns) == 0
    allclose(s(jnp.arange(3.0)), jnp.arange(3.0))
    allclose(jax.jacfwd(s)(jnp.ones(3)), jnp.eye(3))


def test_input_also_output_and_structures():
    g = js.trace(simple, jnp.ones(3), 2.0)
    s = g.slice({"first": "a", "scale": "w"}, ["a", ("c", "d")])
    assert s.inputs == {"first": g["a"], "scale": g["w"]}
    out = s({"first": jnp.zeros(3), "scale": jnp.asarray(3.0)})
    assert isinstance(out, list) and isinstance(out[1], tuple)
    allclose(out[0], jnp.zeros(3))
    allclose(out[1][0], jnp.cos(0.0) * 3.0 * jnp.ones(3))
    allclose(out[1][1], jnp.exp(jnp.cos(0.0) * 3.0 * jnp.ones(3)))


def test_unconnected_output_is_an_error_unless_allowed():
    g = js.trace(simple, jnp.ones(3), 2.0)
    with pytest.raises(
        js.SliceError,
        match=r"output 'a' does not depend on any input \(b\).*allow_unconnected=True",
    ):
        g.slice("b", ["c", "a"])
    s = g.slice("b", ["c", "a"], allow_unconnected=True)
    jac = jax.jacfwd(s)(g.value("b"))
    allclose(jac[1], jnp.zeros((3, 3)))  # the unconnected output is a constant
    allclose(s(g.value("b"))[1], g.value("a"))


def test_input_downstream_or_unused_is_an_error():
    g = js.trace(simple, jnp.ones(3), 2.0)
    with pytest.raises(js.SliceError, match="input 'd' is computed after every output"):
        g.slice(["a", "d"], "c")
    with pytest.raises(js.SliceError, match="output 'a' does not depend"):
        g.slice("d", "a")
    s = g.slice(("a", "d"), "c", allow_unconnected=True)
    allclose(s(g.value("a"), g.value("d")), g.value("c"))


def test_duplicate_input_is_an_error():
    g = js.trace(simple, jnp.ones(3), 2.0)
    with pytest.raises(js.SliceError, match="selected twice"):
        g.slice(("a", "a"), "c")


def test_slice_holds_only_its_window():
    def long(x):
        h = x
        for _ in range(20):
            h = jnp.sin(h) * 1.5
        return h

    g = js.trace(long, jnp.ones(4))
    s = g.slice("h#5", "h#8")
    assert len(s.jaxpr.eqns) == 6
    assert {e.primitive.name for e in s.jaxpr.eqns} == {"sin", "mul"}
    check_slice(s, (g.value("h#5"),), lambda h: jnp.sin(jnp.sin(jnp.sin(h) * 1.5) * 1.5) * 1.5)


def test_context_is_computed_lazily_from_ancestors_only():
    calls = []

    def f(x, y):
        a = jnp.sin(x)
        b = jax.pure_callback(
            lambda v: (calls.append(1), v)[1], jax.ShapeDtypeStruct((3,), jnp.float32), y
        )
        c = a * 2.0
        return c + b

    g = js.trace(f, jnp.ones(3), jnp.ones(3))
    s = g.slice("a", "c")
    calls.clear()
    s(jnp.ones(3))
    assert calls == []  # the callback branch is not an ancestor of the slice's context


def test_effects_in_window_are_kept(capsys):
    def f(x):
        a = jnp.sin(x)
        jax.debug.print("a={a}", a=a)
        b = a * 2.0
        return b

    g = js.trace(f, jnp.ones(2))
    s = g.slice("a", "b")
    assert any(e.primitive.name == "debug_print" for e in s.jaxpr.eqns)
    jax.block_until_ready(s(jnp.zeros(2)))
    jax.effects_barrier()
    assert "a=[0. 0.]" in capsys.readouterr().out
    outside = g.slice("b", "b")
    assert all(e.primitive.name != "debug_print" for e in outside.jaxpr.eqns)


def test_integer_and_bool_inputs():
    def f(x, n, flag):
        m = n * 2
        y = x * m
        z = jnp.where(flag, y, -y)
        return z

    g = js.trace(f, jnp.ones(3), jnp.arange(3), jnp.array([True, False, True]))
    s = g.slice(("x", "m"), "z")
    out, tangent = jax.jvp(
        s, (jnp.ones(3), jnp.arange(3) * 2), (jnp.ones(3), np.zeros(3, jax.dtypes.float0))
    )
    allclose(out, g.value("z"))
    allclose(tangent, jnp.array([0.0, -2.0, 4.0]))
    si = g.slice("n", "m")
    allclose(si(jnp.array([1, 2, 3])), jnp.array([2, 4, 6]))


def test_bind_recomputes_context_and_is_traceable():
    args = mlp_12782_args()
    g = js.trace(mlp_12782, *args)
    s = g.slice("z1", "z2")
    new = mlp_12782_args(jax.random.key(5))
    b = s.bind(*new)
    z1 = jnp.linspace(-1, 1, 4)
    allclose(b(z1), jnp.tanh(jnp.dot(new[2][0], z1) + new[2][1]))

    @jax.jit
    def step(x, p1, p2, p3, z):
        return jax.jvp(s.bind(x, p1, p2, p3), (z,), (jnp.ones(4),))[1]

    expected = jax.jvp(
        lambda z: jnp.tanh(jnp.dot(new[2][0], z) + new[2][1]), (z1,), (jnp.ones(4),)
    )[1]
    allclose(step(*new, z1), expected)
    allclose(s(z1), jnp.tanh(jnp.dot(args[2][0], z1) + args[2][1]))  # the original is unchanged


def test_numpy_arguments_written_after_tracing_or_binding_leave_values_as_traced():
    # a data loader refilling one NumPy buffer, weights updated in place: the graph (and a
    # bound slice) computes from what the function saw, not the buffer's new contents
    def f(w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(h**2)

    w, buf = jnp.ones((3, 2)) * 0.1, np.ones((4, 3), np.float32)
    g = js.trace(f, w, buf)
    s = g.slice("w", "out")
    b = g.slice("h", "out").bind(w, buf)
    s_h = g.slice("w", "h")
    traced = f(w, np.ones((4, 3), np.float32))
    buf[:] = 5.0
    allclose(g.value("out"), traced)
    allclose(s(w), traced)
    allclose(b(g.value("h")), traced)
    bound = s_h.bind(w, buf)  # bound to 5s: written after, still 5s
    buf[:] = -1.0
    allclose(bound(w), jnp.tanh(jnp.full((4, 3), 5.0) @ w))
    # a read-only view of a buffer written after (np.broadcast_to) is copied too
    row = np.ones(3, np.float32)
    g2 = js.trace(f, w, np.broadcast_to(row, (4, 3)))
    row[:] = 5.0
    allclose(g2.value("out"), traced)


def test_arguments_donated_after_tracing_are_a_clear_error_and_bind_still_works():
    def loss(w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(h**2)

    w, x = jnp.ones((3, 2)) * 0.1, jnp.ones((4, 3))
    g = js.trace(loss, w, x)
    s = g.slice("h", "out")
    s_w = g.slice("x", "h")  # its context is the argument w itself, once computed
    s_w(x)
    step = jax.jit(lambda w, x: w - 0.1 * jax.grad(loss)(w, x), donate_argnums=0)
    w_new = step(w, x)
    assert w.is_deleted()  # (the CPU backend donates, on jax 0.10 and 0.12)
    runs = (lambda: g.value("h"), lambda: g.grads("out", ["h"]), lambda: s_w(x))
    for run in runs:
        with pytest.raises(js.SliceError, match=r"argument 'w' .* was deleted .*donate_argnums"):
            run()
    # a slice computing from no argument still runs (its context is empty)
    assert s.context == {}
    allclose(s(jnp.ones((4, 2))), 8.0)
    h_new = jnp.tanh(x @ w_new)
    allclose(s.bind(w_new, x)(h_new), loss(w_new, x))
    allclose(g.grads_fn("out", ["h"])(w_new, x)["h"], 2 * h_new)


def test_a_value_reading_no_deleted_argument_is_computed_on_a_fresh_graph():
    # the first value converted every argument and said one it does not read was deleted
    def f(params, x):
        return jnp.sin(x) * 2, params["w"] + 1

    params, x = {"w": jnp.ones(3)}, jnp.ones(3)
    g = js.trace(f, params, x)
    jax.jit(lambda p: p, donate_argnums=0)(params)  # (a training step donating them)
    assert params["w"].is_deleted()
    allclose(g.value("out[0]"), 2 * jnp.sin(x))
    with pytest.raises(js.SliceError, match=r"argument \"params\['w'\]\" .* was deleted"):
        g.value("out[1]")

    # a slice's context names the donated arguments it computes from, not all (hunt X)
    def two_layers(params, x):
        h = jnp.tanh(x @ params[0])
        h = jnp.tanh(h @ params[1])
        return h.sum()

    params = [jnp.eye(3), jnp.eye(3) * 2]
    g = js.trace(two_layers, params, x)
    s = g.slice("h#0", "h#1")  # reads params[1] only
    jax.jit(lambda p: p, donate_argnums=0)(params)
    with pytest.raises(js.SliceError, match=r"^the argument 'params\[1\]' this computes from"):
        s.context  # noqa: B018 (the property computes it)


def test_a_loop_slice_after_donation_names_the_donated_arguments():
    """A slice cut inside a folded scan computes its context (the split's residuals)
    from the arguments directly: after the traced parameters are donated it is a
    SliceError naming them, also where the context was computed before (it was JAX's
    'Array has been deleted': hunt Y)."""

    def f(p, x):
        h0 = jnp.tanh(p["w1"] @ x)

        def body(h, _):
            hn = jnp.tanh(p["w2"] @ h)
            return hn, hn.sum()

        h_last, ys = jax.lax.scan(body, h0, None, length=100)
        return h_last.sum() + ys.sum()

    for before in (False, True):
        p = {"w1": jnp.eye(4) * 0.5, "w2": jnp.eye(4) * 0.3}
        g = js.trace(f, p, jnp.ones(4))
        s = g.slice("body/hn@5", "out")
        if before:
            s(jnp.ones(4))
        jax.jit(lambda p: p, donate_argnums=0)(p)
        with pytest.raises(js.SliceError, match=r"p\['w2'\].* donate_argnums"):
            s(jnp.ones(4))


def test_abstract_trace_needs_bind():
    specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mlp_12782_args()
    )
    g = js.trace(mlp_12782, *specs)
    assert not g.is_concrete
    s = g.slice("z1", "z2")
    with pytest.raises(js.SliceError, match=r"unbound.*s\.bind"):
        s(jnp.zeros(4))
    with pytest.raises(js.SliceError, match="abstract"):
        g.value("z1")
    args = mlp_12782_args()
    z1 = jnp.ones(4)
    allclose(s.bind(*args)(z1), jnp.tanh(jnp.dot(args[2][0], z1) + args[2][1]))


def test_wrong_arguments_to_slice():
    g = js.trace(mlp_12782, *mlp_12782_args())
    s = g.slice("z1", "z2")
    with pytest.raises(js.SliceError, match=r"input 'z1' expects float32\[4\], got float32\[5\]"):
        s(jnp.ones(5))
    with pytest.raises(js.SliceError, match="takes 1 argument"):
        s(jnp.ones(4), jnp.ones(4))
    with pytest.raises(js.SliceError, match="int32"):
        s(jnp.ones(4, jnp.int32))


def test_graph_derivative_helpers():
    x0 = jnp.array([1.0, 2.0, 4.0])
    g = js.trace(chain, x0)
    x1 = g.value("x1")
    out, tangent = g.jvp("x1", "x3", jnp.ones(3))
    ref_out, ref_tangent = jax.jvp(lambda a: f3(f2(a)), (x1,), (jnp.ones(3),))
    allclose((out, tangent), (ref_out, ref_tangent))
    out, ct = g.vjp("x1", "x3", jnp.ones(3))
    allclose(ct, jax.vjp(lambda a: f3(f2(a)), x1)[1](jnp.ones(3))[0])
    for mode in ("auto", "fwd", "rev"):
        allclose(g.jacobian("x1", "x3", mode=mode), jax.jacfwd(lambda a: f3(f2(a)))(x1))
    with pytest.raises(js.SliceError, match="unknown jacobian mode"):
        g.jacobian("x1", "x3", mode="sideways")
    jac = g.jacobian(("x0", "x1"), "x2")
    assert isinstance(jac, tuple) and len(jac) == 2
    allclose(jac[1], jax.jacfwd(f2)(x1))
    allclose(jac[0], jnp.zeros((3, 3)))  # x0's path to x2 is shielded by the input x1
    with pytest.raises(js.SliceError, match="input 'x2' is computed after every output"):
        g.jacobian(("x1", "x2"), "x1")


def test_user_arrays_are_not_modified():
    args = mlp_12782_args()
    before = jax.tree_util.tree_map(np.array, args)
    g = js.trace(mlp_12782, *args)
    s = g.slice("z1", "z3")
    jax.jvp(s, (g.value("z1"),), (jnp.ones(4),))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.array, args)
    )
