"""g.match and g.rewrite: structural patterns on the issue-12782 MLP and more."""

import functools
import warnings

import jax
import jax.numpy as jnp
import pytest
from conftest import allclose, assert_at_callers_line, check_slice
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js


def layer_pattern(x, w, b):
    return jnp.tanh(x @ w + b)


def test_dense_tanh_pattern_finds_the_three_layers_and_each_slices():
    args = mlp_12782_args()
    x, p1, p2, p3 = args
    g = js.trace(mlp_12782, *args)
    # traced with a matrix first, as the model's jnp.dot(W, h): dataflow, not names
    matches = g.match(layer_pattern, jnp.ones((4, 3)), jnp.ones(3), jnp.ones(4))
    assert [m.outputs[0].name for m in matches] == ["z1", "z2", "z3"]
    assert [tuple(v.name for v in m.inputs) for m in matches] == [
        ("params_1[0]", "x", "params_1[1]"),
        ("params_2[0]", "z1", "params_2[1]"),
        ("params_3[0]", "z2", "params_3[1]"),
    ]
    for m, (w, b) in zip(matches, (p1, p2, p3)):
        assert len(m.vars) == 3
        h = m.inputs[1]
        check_slice(
            g.slice(h, m.outputs[0]), (g.value(h),), lambda h, w=w, b=b: jnp.tanh(w @ h + b)
        )


def test_commutative_operands_and_no_false_matches():
    args = mlp_12782_args()
    g = js.trace(mlp_12782, *args)
    swapped = g.match(
        lambda w, x, b: jnp.tanh(b + w @ x), jnp.ones((4, 3)), jnp.ones(3), jnp.ones(4)
    )
    assert len(swapped) == 3
    assert g.match(lambda x: jnp.sin(x), jnp.ones(3)) == ()
    assert len(g.match(lambda x: jnp.tanh(x), jnp.ones(3))) == 3


def test_an_operand_order_a_later_operand_refutes_is_undone():
    """``gate * x + x`` for the pattern ``x * g + x``: the product's first order binds
    the pattern's ``x`` to ``gate``, which the add's second operand refutes; the other
    order matches (it silently matched nothing). A rewrite of it runs the replacement."""

    def gated(x, g):
        return x * g + x

    def model(x, gate):
        h = gate * x + x
        d = x * gate - gate
        return h, d

    x, gate = jnp.arange(1.0, 4.0), jnp.arange(2.0, 5.0)
    g = js.trace(model, x, gate)
    (m,) = g.match(gated, x, gate)
    assert [v.name for v in m.inputs] == ["x", "gate"] and m.outputs[0] is g["h"]
    (m,) = g.match(lambda a, b: b * a - a, x, gate)  # a binds gate, b binds x
    assert [v.name for v in m.inputs] == ["gate", "x"] and m.outputs[0] is g["d"]
    r = g.rewrite(gated, lambda x, g: x * jnp.tanh(g) + x, x, gate)
    allclose(r.value("h"), x * jnp.tanh(gate) + x)


def test_matches_do_not_overlap_and_keep_program_order():
    def chain(x):
        for _ in range(5):
            x = jnp.tanh(x * 2.0)
        return x

    g = js.trace(chain, jnp.ones(2))
    two = g.match(lambda a: jnp.tanh(jnp.tanh(a * 2.0) * 2.0), jnp.ones(2))
    assert [m.outputs[0].name for m in two] == ["x#2", "x#4"]
    assert g.match(lambda a: jnp.tanh(a * 2.0), jnp.ones(2))[0].inputs[0] is g["x#0"]


def test_internal_values_read_outside_are_not_matched():
    def f(x):
        a = x * 2.0
        b = jnp.tanh(a)
        return b + a  # a is read outside the would-be match

    g = js.trace(f, jnp.ones(2))
    assert g.match(lambda t: jnp.tanh(t * 2.0), jnp.ones(2)) == ()
    assert len(g.match(lambda t: jnp.tanh(t), jnp.ones(2))) == 1


def test_rewrite_tanh_to_gelu_equals_the_hand_edited_function():
    args = mlp_12782_args()
    g = js.trace(mlp_12782, *args)
    r = g.rewrite(jnp.tanh, jax.nn.gelu, jnp.ones(4))

    def edited(x, params_1, params_2, params_3):
        z1 = jax.nn.gelu(jnp.dot(params_1[0], x) + params_1[1])
        z2 = jax.nn.gelu(jnp.dot(params_2[0], z1) + params_2[1])
        return jax.nn.gelu(jnp.dot(params_3[0], z2) + params_3[1])

    allclose(jax.jit(r.as_function())(*args), edited(*args))
    new = mlp_12782_args(jax.random.key(9))
    allclose(r.as_function()(*new), edited(*new))
    allclose(r.value("z2"), jax.nn.gelu(jnp.dot(args[2][0], r.value("z1")) + args[2][1]))
    # the replaced tanh no longer feeds anything: the output does not depend on it
    with pytest.raises(js.SliceError, match="does not depend on any input"):
        r.slice("z1.unpatched", "out")


def test_values_inside_a_rewritten_match_warn_that_nothing_reads_them():
    """A linen Dense's output inside relu(a @ w + b) keeps its name once the match is
    rewritten, but the replacement computes from the match's inputs: its gradient is a
    silent zero and a patch of it changes nothing. Both say why; the match's output
    differentiates as the hand-edited model does."""
    import flax.linen as nn

    class Net(nn.Module):
        edit: bool = False

        @nn.compact
        def __call__(self, x, e=0.0):
            for i in range(3):
                h = nn.Dense(6)(x)
                x = jnp.tanh(h) * 1.5 if self.edit else nn.relu(h)
                if i == 1:
                    x = x + e
            return nn.Dense(1)(x)

    x = jax.random.normal(jax.random.key(1), (5, 4))
    v = jax.jit(Net().init)(jax.random.key(0), x)  # (jitted: faster than eagerly)
    g = js.trace(lambda v, x: jnp.mean(Net().apply(v, x) ** 2), v, x)
    args = (jnp.ones((5, 6)), jnp.ones((6, 6)), jnp.ones(6))
    pattern = lambda a, w, b: jax.nn.relu(a @ w + jnp.reshape(b, (1, -1)))  # noqa: E731
    layer_1 = g.match(pattern, *args)[1].outputs[0].name  # relu(Dense_1), e added after
    rw = g.rewrite(pattern, lambda a, w, b: jnp.tanh(a @ w + b) * 1.5, *args)
    by_hand = jax.jit(jax.grad(lambda e: jnp.mean(Net(edit=True).apply(v, x, e) ** 2)))(
        jnp.zeros((5, 6))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allclose(rw.grads("out", [layer_1])[layer_1], by_hand, rtol=1e-5)
    dense = rw["Net/Dense_1"].name  # (its canonical name: Net/h#1)
    with pytest.warns(
        UserWarning,
        match=f"g.grads: '{dense}' is inside a match g.rewrite replaced: '{layer_1}' is the "
        "replacement's value now.*gradient is zero",
    ):
        got = rw.grads("out", ["Net/Dense_1"])["Net/Dense_1"]
    assert not jnp.any(got)  # (the rewritten program's derivative: zero, as said)
    with pytest.warns(UserWarning, match="inside a match g.rewrite replaced.*changes no output"):
        patched = rw.replace("Net/Dense_1", 0.0)
    allclose(patched.as_function()(v, x), rw.as_function()(v, x))
    with pytest.warns(UserWarning, match=f"g.patch_fn: '{dense}' is inside a match"):
        rw.patch_fn("Net/Dense_1")


def test_values_inside_a_match_rewritten_in_a_folded_body_warn_too():
    """A match in a scan's body is rewritten at every iteration: the values inside it
    are nothing's either (a silent zero gradient at ``step/z@2``)."""
    w = jax.random.normal(jax.random.key(1), (4, 4)) * 0.5

    def f(x, b):
        def step(h, _):
            z = h @ w
            h_new = jax.nn.relu(z + b)
            return h_new, None

        return jax.lax.scan(step, x, None, length=30)[0].sum()

    x, b = jax.random.normal(jax.random.key(0), (2, 4)), jnp.ones(4) * 0.1
    g = js.trace(f, x, b)
    pattern = lambda a, w, b: jax.nn.relu(a @ w + b)  # noqa: E731
    args = (jnp.ones((2, 4)), jnp.ones((4, 4)), jnp.ones(4))
    rw = g.rewrite(pattern, lambda a, w, b: jax.nn.gelu(a @ w + b), *args)
    with pytest.warns(UserWarning, match="'step/z@2' is inside a match.*'step/h_new@\\*'"):
        assert not jnp.any(rw.grads("out", ["step/z@2"])["step/z@2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jnp.any(rw.grads("out", ["step/h_new@2"])["step/h_new@2"])
    with pytest.warns(UserWarning, match="'step/z@0' \\(and 29 more\\) is inside a match"):
        rw.replace("step/z@*", 0.0)


def test_rewrite_that_matches_nothing_says_so():
    g = js.trace(mlp_12782, *mlp_12782_args())
    with pytest.raises(js.SliceError, match="matches nothing"):
        g.rewrite(jnp.sin, jnp.cos, jnp.ones(3))


K = jnp.array([1.0, 2.0, 3.0])


def shifted(x):
    p = x + K
    q = x + jnp.sin(x)
    return (p * q).sum()


def test_a_captured_array_in_a_pattern_matches_only_an_equal_constant():
    """``lambda a: a + K`` matches ``x + K``, not ``x + sin(x)`` nor ``x + 5`` (an array
    constant bound any value: the rewrite changed q too, silently)."""
    x = jnp.array([0.3, -1.0, 2.0])
    g = js.trace(shifted, x)
    assert [m.outputs[0].name for m in g.match(lambda a: a + K, x)] == ["p"]
    assert g.match(lambda a: a + jnp.array([5.0, 5.0, 5.0]), x) == ()
    rewritten = g.rewrite(lambda a: a + K, lambda a: a - K, x)
    allclose(rewritten.as_function()(x), ((x - K) * (x + jnp.sin(x))).sum())


def test_a_candidate_binding_an_input_to_a_literal_is_skipped():
    """``a * b`` in ``sin(x * w) + cos(x * 2.0)`` is the ``x * w`` product; the
    ``x * 2.0`` candidate binds ``b`` to a literal and is skipped (the whole match
    raised 'pattern input 1 is not used')."""

    def f(x, w):
        return (jnp.sin(x * w) + jnp.cos(x * 2.0)).sum()

    x, w = jnp.ones(3), jnp.arange(3.0)
    g = js.trace(f, x, w)
    (found,) = g.match(lambda a, b: a * b, x, w)
    assert {v.name for v in found.inputs} == {"x", "w"}
    with pytest.raises(js.SliceError, match="pattern input 1 is not used"):
        g.match(lambda a, b: jnp.sin(a), x, w)


def test_a_rewrite_reaches_into_a_folded_scan_at_every_iteration():
    """``tanh(2a)`` outside a long scan and inside its body: the match lists the one
    outside and names the body value it does not list (one per iteration); the rewrite
    changes both, the body with one edit of the running scan (its size does not grow
    with the length), as a hand-edited function computes, derivatives too. (The rewrite
    left the body as it was, without a word.)"""

    def f(x, xs, w):
        y = jnp.tanh(x * 2.0)

        def step(h, xt):
            pre = jnp.tanh((h @ w) * 2.0)
            return pre + xt, pre

        h, pres = jax.lax.scan(step, y, xs)
        return h.sum() + 0.1 * pres.sum()

    def by_hand(x, xs, w):
        def step(h, xt):
            pre = jnp.sin(h @ w)
            return pre + xt, pre

        h, pres = jax.lax.scan(step, jnp.sin(x), xs)
        return h.sum() + 0.1 * pres.sum()

    x, xs, w = jnp.linspace(-1.0, 1.0, 3), jnp.full((3000, 3), 0.01), jnp.eye(3) * 0.7
    g = js.trace(f, x, xs, w)
    pattern = lambda a: jnp.tanh(a * 2.0)  # noqa: E731
    with pytest.warns(
        UserWarning, match=r"body of a loop .* at step/pre@\*: one value per"
    ) as warned:
        (m,) = g.match(pattern, x)
    assert_at_callers_line(warned)
    assert m.inputs[0] is g["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unchanged: no warning
        rewritten = g.rewrite(pattern, jnp.sin, x)
    got = rewritten.as_function()
    allclose(got(x, xs, w), by_hand(x, xs, w))
    for k in range(3):
        allclose(jax.grad(got, k)(x, xs, w), jax.grad(by_hand, k)(x, xs, w), rtol=1e-4)
    h = jnp.sin(x)  # the body value at an iteration, by hand
    for t in range(8):
        pre = jnp.sin(h @ w)
        h = pre + xs[t]
    allclose(rewritten.value("step/pre@7"), pre)
    (scan,) = [e for e in jax.make_jaxpr(got)(x, xs, w).jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scan.params["jaxpr"].jaxpr.eqns) < 15


@pytest.mark.parametrize("size", [5, 120])
def test_a_while_loops_body_is_rewritten_in_every_trip_it_runs(size):
    """A ``while_loop``'s trips differ with its arguments: its body is rewritten as one
    edit of every trip, unrolled in the index (a small body) or folded (a large one), so
    arguments that run more trips than the traced ones get them rewritten too (the
    traced trips alone were, silently; a folded body was left as it was)."""

    def f(x, n):
        def body(c):
            i, h = c
            for _ in range(size):
                h = jnp.sin(h) * 0.9 + 0.1
            return i + 1, jnp.tanh(h)

        return jax.lax.while_loop(lambda c: c[0] < n, body, (0, jnp.tanh(x)))[1]

    def by_hand(x, n):
        h = jnp.sin(x)
        for _ in range(n):
            for _ in range(size):
                h = jnp.sin(h) * 0.9 + 0.1
            h = jnp.sin(h)
        return h

    x = jnp.linspace(-1.0, 1.0, 3)
    g = js.trace(f, x, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unchanged: no warning
        rewritten = g.rewrite(jnp.tanh, jnp.sin, x)
    for n in (4, 2, 7):
        allclose(rewritten.as_function()(x, n), by_hand(x, n), rtol=1e-5)
    if size < 100:  # a trip's value in the unrolled index, after the rewrite
        allclose(rewritten.value("body[1]@2"), by_hand(x, 3), rtol=1e-5)


def test_occurrences_in_a_branch_not_taken_are_named_not_silently_left_out():
    """A ``tanh`` in the branch the traced arguments do not take is not in the index:
    the rewrite changes the one outside, and its notes name the branch (arguments that
    take the branch run it unchanged, as a hand-edited function shows)."""

    def f(x, p):
        y = jnp.tanh(x)
        return jax.lax.cond(p > 0, lambda y: y * 2.0, lambda y: jnp.tanh(y) * 3.0, y)

    x = jnp.linspace(-1.0, 1.0, 3)
    g = js.trace(f, x, 1.0)
    with pytest.warns(
        UserWarning, match=r"at branch 0 of the cond at test_match\.py:\d+"
    ) as warned:
        rewritten = g.rewrite(jnp.tanh, jnp.sin, x)
    assert_at_callers_line(warned)
    assert any("branch 0 of the cond" in n for n in rewritten.notes)
    allclose(rewritten.as_function()(x, 1.0), jnp.sin(x) * 2.0)
    allclose(rewritten.as_function()(x, -1.0), jnp.tanh(jnp.sin(x)) * 3.0)


def sin_times(a, b):
    return jnp.sin(a) * b


def test_a_body_value_the_warning_names_selects_that_value_alone():
    """The pattern's output is binding ``c#1`` of a rebound name: the warning names
    ``step/c#1@*``, not the bare ``step/c@*`` (which selects ``c#0``, the loop's input,
    too), so patching what it names is what a hand-edited loop computes."""

    def f(x):
        def step(c, i):
            w = c * 2.0
            c = jnp.sin(w) * w
            return c, None

        return jax.lax.scan(step, x, jnp.arange(4))[0]

    x, z = jnp.linspace(-1.0, 1.0, 3), jnp.ones(3)
    g = js.trace(f, x)
    with pytest.warns(UserWarning, match=r"at step/c#1@\*:") as caught:
        g.match(sin_times, z, z)
    assert_at_callers_line(caught)
    name = str(caught[0].message).split(" at ")[1].split(":")[0]

    def by_hand(x):
        def step(c, i):
            w = c * 2.0
            return jnp.sin(w) * w + 1.0, None

        return jax.lax.scan(step, x, jnp.arange(4))[0]

    allclose(g.replace(name, lambda old: old + 1.0).as_function()(x), by_hand(x))


def test_an_occurrence_in_a_cond_inside_a_folded_loop_is_named():
    """The body's template keeps a cond whole: its branches are searched too, so the
    rewrite says what it leaves (it changed the occurrence outside only, silently)."""
    pattern = lambda v: (lambda w: jnp.sin(w) * w)(v * 2.0)  # noqa: E731

    def f(x):
        def step(c, i):
            return jax.lax.cond(i % 2 == 0, pattern, lambda v: v * 0.5, c), None

        return jax.lax.scan(step, x, jnp.arange(4))[0]

    x, z = jnp.linspace(-1.0, 1.0, 3), jnp.ones(3)
    with pytest.raises(js.SliceError, match=r"at branch 1 of the cond at test_match\.py:\d+"):
        js.trace(f, x).rewrite(sin_times, lambda a, b: jnp.cos(a) + b, z, z)
    with pytest.warns(UserWarning, match="branch 1 of the cond") as warned:
        js.trace(lambda x: f(pattern(x)), x).rewrite(sin_times, lambda a, b: jnp.cos(a) + b, z, z)
    assert_at_callers_line(warned)


def _rnn(act):
    def f(w, h0, xs):
        def step(h, x):
            h_new = act(w @ h + x)
            return h_new, h_new

        return jax.lax.scan(step, h0, xs)[0]

    return f


def test_a_rewritten_scan_runs_rewritten_in_slices_after_patches_and_at_length_one():
    """Slices of a graph rewritten in a folded body run the rewrite (they ran the
    original scan); a patch made before the rewrite stays on top (it was undone); a
    length-1 scan, whose one iteration is also its last, is rewritten (it was refused);
    a rewrite under jax.grad warns as a patch there does."""
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    h0, xs = jnp.ones(4) * 0.3, jax.random.normal(jax.random.key(1), (5, 4))
    g = js.trace(_rnn(jnp.tanh), w, h0, xs)
    gelu = _rnn(jax.nn.gelu)
    rewritten = g.rewrite(jnp.tanh, jax.nn.gelu, h0)
    check_slice(rewritten.slice("h0", "out"), (h0,), lambda h: gelu(w, h, xs))
    check_slice(rewritten.slice("w", "out"), (w,), lambda w: gelu(w, h0, xs))
    v = jnp.full(4, 0.7)
    patched = g.replace("step/h_new@3", v).rewrite(jnp.tanh, jax.nn.gelu, h0)
    allclose(patched.as_function()(w, h0, xs), gelu(w, v, xs[4:]))
    one = js.trace(_rnn(jnp.tanh), w, h0, xs[:1]).rewrite(jnp.tanh, jax.nn.gelu, h0)
    allclose(one.as_function()(w, h0, xs[:1]), gelu(w, h0, xs[:1]))

    def trained(w, h0, xs):
        return jax.grad(lambda w: jnp.sum(_rnn(jnp.tanh)(w, h0, xs) ** 2))(w)

    with pytest.warns(UserWarning, match="is a value JAX differentiates") as warned:
        js.trace(trained, w, h0, xs).rewrite(jnp.tanh, jax.nn.gelu, h0)
    assert_at_callers_line(warned)


def test_a_short_scan_unrolled_in_a_folded_body_is_rewritten_at_every_step():
    """The inner scan's last step's value is a value of the outer body too: it is
    rewritten with the others (it was left as it was, silently)."""
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    h0, xss = jnp.ones(4) * 0.3, jax.random.normal(jax.random.key(2), (4, 3, 4))

    def f(w, h0, xss, act=jnp.tanh):
        def outer(h, xs):
            h2 = _rnn(act)(w, h, xs)
            return h2 * 0.5, h2

        return jax.lax.scan(outer, h0, xss)[0]

    rewritten = js.trace(f, w, h0, xss).rewrite(jnp.tanh, jax.nn.gelu, h0)
    allclose(rewritten.as_function()(w, h0, xss), f(w, h0, xss, jax.nn.gelu))


def test_rewrites_and_patches_compose_on_a_graph_without_loops():
    def f(x):
        h = jnp.sin(x)
        return jnp.tanh(h) * 2

    x = jnp.linspace(-1.0, 1.0, 3)
    g = js.trace(f, x)
    allclose(g.replace("h", x * 0).rewrite(jnp.tanh, jax.nn.gelu, x).as_function()(x), 0.0 * x)
    twice = g.rewrite(jnp.tanh, jax.nn.gelu, x).rewrite(jnp.sin, jnp.cos, x)
    allclose(twice.as_function()(x), jax.nn.gelu(jnp.cos(x)) * 2)


def test_a_second_rewrite_of_a_loop_body_value_is_refused_and_slices_run_after_a_flat_one():
    """Rewriting the same body value twice: the second rewrite was ignored (it went
    under the first), then replaced the first; as in a flat graph, where the pattern is
    gone, it is refused. A flat rewrite, then one in an unrolled while_loop's body:
    slices of the result run (a raw AttributeError came through)."""
    x0 = jnp.array([0.3, 0.5])

    def scanned(x, act=jnp.sin):
        def step(h, _):
            s = act(h * 2.0)
            return s * 0.5, None

        return jax.lax.scan(step, x, None, length=6)[0]

    once = js.trace(scanned, x0).rewrite(jnp.sin, jnp.cos, x0)
    allclose(once.as_function()(x0), scanned(x0, jnp.cos))
    with pytest.raises(js.SliceError, match="step/s@.*rewrote there already"):
        once.rewrite(jnp.sin, jnp.tanh, x0)
    # (flat: the value before the patch is still in the index, which g.match listed,
    # and g.rewrite refused as a patch of a value before a patch; a sin the first
    # replacement computes is not rewritten either: no place in the program to edit)
    flat = js.trace(lambda x: jnp.sin(x) * 2, x0).rewrite(jnp.sin, jnp.cos, x0)
    with pytest.warns(UserWarning, match=r"occurred at %1\.unpatched.*not matched again"):
        assert flat.match(jnp.sin, x0) == ()
    with pytest.raises(js.SliceError, match=r"occurred at %1\.unpatched.*not matched again"):
        flat.rewrite(jnp.sin, jnp.tanh, x0)
    inner = js.trace(lambda x: jnp.sin(x) * 2, x0).rewrite(jnp.sin, lambda a: jnp.sin(a) ** 2, x0)
    with pytest.raises(js.SliceError, match=r"inside what a patch of this graph computes"):
        inner.rewrite(jnp.sin, jnp.tanh, x0)
    # a patch by a function of the old value still reads it: listed, and a rewrite
    # there refused (not left out, which rewrote the other occurrences only)
    halved = js.trace(lambda x: jnp.sin(jnp.sin(x) * 0.5), x0).replace("%1", lambda a: a * 0.5)
    assert [m.outputs[0].name for m in halved.match(jnp.sin, x0)] == ["%1.unpatched", "out"]
    with pytest.raises(js.SliceError, match=r"'%1\.unpatched' is the value before a patch"):
        halved.rewrite(jnp.sin, jnp.tanh, x0)

    def f(x, n, outer=jnp.sin, inner=jnp.tanh):
        y = outer(x) * 3.0

        def body(c):
            i, h = c
            return i + 1, inner(h * 3.0) * 0.5

        return jax.lax.while_loop(lambda c: c[0] < n, body, (0, y))[1]

    rewritten = js.trace(f, x0, 3).rewrite(jnp.sin, jnp.cos, x0).rewrite(jnp.tanh, jnp.arctan, x0)
    by_hand = functools.partial(f, outer=jnp.cos, inner=jnp.arctan)
    s, t = rewritten.slice("x", "out"), jnp.array([1.0, -0.5])  # forward mode: a while_loop
    allclose(s(x0), by_hand(x0, 3))
    allclose(jax.jvp(s, (x0,), (t,))[1], jax.jvp(lambda x: by_hand(x, 3), (x0,), (t,))[1])
    allclose(rewritten.as_function()(x0, 5), by_hand(x0, 5))


def test_the_value_before_a_scan_body_rewrite_is_not_called_a_while_loop_patch():
    def f(w, xs):
        def step(h, x):
            hn = jnp.tanh(w @ h + x)
            return hn, hn

        return jax.lax.scan(step, jnp.zeros(4), xs)[1].sum()

    g = js.trace(f, jnp.eye(4), jnp.ones((50, 4)))
    r = g.rewrite(jnp.tanh, jax.nn.sigmoid, jnp.ones(4))
    with pytest.raises(js.SelectionError) as info:
        r["step/hn@3.unpatched"]
    assert "while_loop" not in str(info.value), str(info.value)


def test_a_pattern_ending_a_jitted_layer_is_rewritten_inside_the_layer():
    """``tanh`` is the last op of a ``@jax.jit`` dense layer: the call returns it, but its
    input is the layer's own ``h @ w + b``; the rewrite edits every call's body (it was a
    SliceError saying the replacement reads a value of another call)."""

    @jax.jit
    def dense(w, b, h):
        return jnp.tanh(h @ w + b)

    def loss(params, x, y):
        h = x
        for w, b in params:
            h = dense(w, b, h)
        return jnp.mean((h - y) ** 2)

    def loss_gelu(params, x, y):
        h = x
        for w, b in params:
            h = jax.nn.gelu(h @ w + b)
        return jnp.mean((h - y) ** 2)

    keys = jax.random.split(jax.random.key(0), 5)
    params = [(jax.random.normal(k, (8, 8)) / 3, jnp.zeros(8) + 0.1) for k in keys[:4]]
    x, y = jnp.ones((16, 8)), jnp.zeros((16, 8))
    g = js.trace(loss, params, x, y)
    gelu_net = g.rewrite(jnp.tanh, jax.nn.gelu, jnp.ones((16, 8)))
    x2 = jax.random.normal(keys[4], (16, 8))
    allclose(jax.jit(gelu_net.as_function())(params, x2, y), loss_gelu(params, x2, y), rtol=1e-5)
    allclose(
        jax.grad(gelu_net.as_function())(params, x2, y)[2][0],
        jax.grad(loss_gelu)(params, x2, y)[2][0],
        rtol=1e-4,
    )
    # the same on a graph patched before (its index spliced: its sites come from g's)
    doubled = g.replace("out", lambda o: o * 2.0).rewrite(jnp.tanh, jax.nn.gelu, x)
    allclose(doubled.as_function()(params, x2, y), 2 * loss_gelu(params, x2, y), rtol=1e-5)


def test_a_pattern_over_two_calls_of_a_jitted_layer_in_a_scan_is_rewritten_at_both():
    """In a scan's body, ``v = layer(w, u)`` reads ``u``, the result of the first call:
    both occurrences of ``tanh(w @ a)`` are rewritten (the second was left, with a
    warning that the index lists no value there, and the function gave other numbers);
    also a jitted ``sin`` feeding ``max(0, .)`` in the body."""

    @jax.jit
    def layer(w, h):
        act = jnp.tanh(w @ h)
        return act

    def net(W, x):
        def step(h, w):
            u = layer(w, h)
            v = layer(w, u) + h
            return v, None

        return jnp.sum(jax.lax.scan(step, x, W)[0])

    def net_gelu(W, x):
        h = x
        for w in W:
            h = jax.nn.gelu(w @ jax.nn.gelu(w @ h)) + h
        return jnp.sum(h)

    W = jax.random.normal(jax.random.key(0), (5, 3, 3)) / 2
    x = jax.random.normal(jax.random.key(1), (3,))
    g = js.trace(net, W, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no occurrence left out
        rw = g.rewrite(lambda w, a: jnp.tanh(w @ a), lambda w, a: jax.nn.gelu(w @ a), W[0], x)
    allclose(rw.as_function()(W * 0.7, -x), net_gelu(W * 0.7, -x), rtol=1e-5)

    def h(xs):
        def step(c, x):
            v = jax.jit(jnp.sin)(x)
            a = jnp.maximum(0.0, v)
            return c + a, None

        return jax.lax.scan(step, jnp.zeros(8), xs)[0]

    xs = jax.random.normal(jax.random.key(2), (3, 8))
    rw = js.trace(h, xs).rewrite(lambda a: jnp.maximum(0.0, a), jnp.abs, jnp.ones(8))
    allclose(rw.as_function()(-xs), jnp.abs(jnp.sin(-xs)).sum(0), rtol=1e-6)


def test_a_pattern_with_a_custom_rule_matches_whole_calls_of_it_only():
    """``nn.relu`` is a custom_jvp call of ``max(x, 0.0)``: it matches the activation, not
    LayerNorm's clamp of its variance (rewritten to gelu too, silently, before), and in
    a scanned block it replaces the call's result, keeping no bypassed-rule warning."""
    import flax.linen as nn

    def mlp(act):
        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                y = nn.LayerNorm()(x)
                h = act(nn.Dense(16)(y))
                return nn.Dense(1)(h).sum()

        return MLP()

    x = jax.random.normal(jax.random.key(1), (4, 8))
    variables = mlp(nn.relu).init(jax.random.key(0), x)
    g = js.trace(mlp(nn.relu).apply, variables, x)
    assert len(g.match(nn.relu, jnp.ones((4, 16)))) == 1
    # a plain max(a, 0.0) is structural: the clamp and the max inside relu
    assert len(g.match(lambda a: jnp.maximum(a, 0.0), jnp.ones((4, 16)))) == 2
    rw = g.rewrite(nn.relu, nn.gelu, jnp.ones((4, 16)))
    x2 = jax.random.normal(jax.random.key(2), (4, 8))
    allclose(rw.as_function()(variables, x2), mlp(nn.gelu).apply(variables, x2), rtol=1e-5)

    class Block(nn.Module):
        act: object

        @nn.compact
        def __call__(self, x, _):
            h = self.act(nn.Dense(8)(nn.LayerNorm()(x)))
            return x + h, None

    def net(act):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                stack = nn.scan(
                    Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
                )
                return stack(act)(x, None)[0].sum()

        return Net()

    variables = net(nn.relu).init(jax.random.key(0), x)
    g = js.trace(net(nn.relu).apply, variables, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the call is replaced whole: its rule is not bypassed
        rw = g.rewrite(nn.relu, nn.gelu, jnp.ones((4, 8)))
    allclose(rw.as_function()(variables, x2), net(nn.gelu).apply(variables, x2), rtol=1e-5)


def test_a_rewrite_edits_every_result_a_call_returns_the_value_as():
    """A jitted RNN cell returns ``(h_new, h_new)``: the rewrite lifted to the cell's
    result edits the carry and the stacked ys (the ys kept tanh: other numbers); a while
    loop's body reading the weights it closes over is rewritten in every trip."""

    @jax.jit
    def cell(w, h, x):
        h_new = jnp.tanh(w @ h + x)
        return h_new, h_new

    def rnn(w, h0, xs):
        return jax.lax.scan(lambda h, x: cell(w, h, x), h0, xs)

    def rnn_gelu(w, h0, xs):
        def step(h, x):
            h_new = jax.nn.gelu(w @ h + x)
            return h_new, h_new

        return jax.lax.scan(step, h0, xs)

    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    h0, xs = jnp.zeros(4), jax.random.normal(jax.random.key(1), (6, 4))
    g = js.trace(rnn, w, h0, xs)
    rw = g.rewrite(
        lambda w, h, x: jnp.tanh(w @ h + x), lambda w, h, x: jax.nn.gelu(w @ h + x), w, h0, xs[0]
    )
    for got, want in zip(rw.as_function()(w, -h0 + 0.3, xs), rnn_gelu(w, -h0 + 0.3, xs)):
        allclose(got, want, rtol=1e-5)

    def looped(w, x, n):
        def body(c):
            i, h = c
            v = jnp.tanh(w @ (h * 2.0))  # w: a constant of the loop
            return i + 1, v

        return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

    def looped_gelu(w, x, n):
        for _ in range(n):
            x = jax.nn.gelu(w @ (x * 2.0))
        return x

    x = jnp.linspace(-1.0, 1.0, 4)
    g = js.trace(looped, w, x, 3)
    rw = g.rewrite(lambda w, a: jnp.tanh(w @ a), lambda w, a: jax.nn.gelu(w @ a), w, x)
    allclose(rw.as_function()(w, x, 5), looped_gelu(w, x, 5), rtol=1e-5)


def test_a_pattern_with_an_equation_nothing_reads_matches():
    """``jax.nn.logsumexp`` computes a sign it drops (``_ = sign s``): that dead read of
    an inner value does not make the occurrence read outside the match (0 matches)."""

    def loss(logits, labels):
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(lse - jnp.sum(logits * labels, axis=-1))

    logits = jax.random.normal(jax.random.key(0), (4, 5))
    labels = jax.nn.one_hot(jnp.arange(4), 5)
    g = js.trace(loss, logits, labels)
    lse = lambda a: jax.nn.logsumexp(a, axis=-1)  # noqa: E731
    assert len(g.match(lse, logits)) == 1
    hard = g.rewrite(lse, lambda a: jnp.max(a, axis=-1), logits)  # a hard max instead

    def hard_loss(logits, labels):
        return jnp.mean(jnp.max(logits, axis=-1) - jnp.sum(logits * labels, axis=-1))

    allclose(hard.as_function()(2 * logits, labels), hard_loss(2 * logits, labels), rtol=1e-5)


def test_rewrites_reading_loop_constants_in_every_trip_and_nothing_else():
    """A loop's constant read by the pattern is passed into every trip (also when the
    loop's condition reads it too, and for a scan's constants on every JAX version); a
    carry that starts as the same value is not a constant (rewritten with the start
    value in every trip before: refused now); a scan folded in each trip of a while_loop
    is rewritten in trips the traced arguments did not run too."""
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    x = jnp.linspace(-1.0, 1.0, 4)
    xs = jax.random.normal(jax.random.key(1), (3, 4))
    dense = (lambda w, a: jnp.tanh(w @ a), lambda w, a: jax.nn.gelu(w @ a))

    def guarded(act):
        def f(w, x, n):
            def body(c):
                return c[0] + 1, act(w @ (c[1] * 2.0))

            return jax.lax.while_loop(lambda c: (c[0] < n) & (jnp.sum(w) > -100.0), body, (0, x))[1]

        return f

    rw = js.trace(guarded(jnp.tanh), w, x, 3).rewrite(*dense, w, x)
    allclose(rw.as_function()(w, x, 5), guarded(jax.nn.gelu)(w, x, 5), rtol=1e-5)

    def stacked(act):
        def f(ws, h0, xs):
            def layer(seq, w):  # w: the inner scan's constant
                def step(h, x):
                    hn = act(w @ (h * 2.0)) + x
                    return hn, hn

                return jax.lax.scan(step, h0, seq)[1], None

            return jax.lax.scan(layer, xs, ws)[0].sum()

        return f

    ws = jnp.stack([w, -w, w / 2])
    rw = js.trace(stacked(jnp.tanh), ws, x * 0, xs).rewrite(*dense, w, x)
    allclose(rw.as_function()(ws, x, xs), stacked(jax.nn.gelu)(ws, x, xs), rtol=1e-5)

    def carried(x, lo, hi):  # the body closes over x, also the carry's start
        return jax.lax.fori_loop(lo, hi, lambda i, h: jnp.sin(h) + x, x)

    with warnings.catch_warnings(), pytest.raises(js.SliceError, match="reads 'x', which lives"):
        warnings.simplefilter("ignore")  # (it reads another trip's value, also said)
        js.trace(carried, x, 0, 1).rewrite(jnp.sin, jnp.cos, x)

    def scanned(act):
        def f(w, x, xs, n):
            def body(c):
                step = lambda hh, xx: (act(w @ (hh * 2.0)) + xx, None)  # noqa: E731
                return c[0] + 1, jax.lax.scan(step, c[1], xs)[0]

            return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

        return f

    rw = js.trace(scanned(jnp.tanh), w, x, xs, 2).rewrite(*dense, w, x)
    allclose(rw.as_function()(w, x, xs, 3), scanned(jax.nn.gelu)(w, x, xs, 3), rtol=1e-5)


def test_an_occurrence_in_a_while_loops_condition_is_named_not_silently_left_out():
    """A condition runs in no trip's equations: its occurrence is not matched, and the
    warning (and the rewrite's error, when nothing else matches) says where it is."""
    x = jnp.linspace(0.1, 0.5, 3)

    def f(x):
        def cond(c):
            return (jnp.tanh(c[1]).sum() < 2.5) & (c[0] < 50)

        return jax.lax.while_loop(cond, lambda c: (c[0] + 1, c[1] * 1.3), (0, x))[1].sum()

    g = js.trace(f, x)
    with pytest.warns(UserWarning, match="at the condition of the while_loop at test_match.py"):
        assert len(g.match(jnp.tanh, x)) == 0
    with warnings.catch_warnings(), pytest.raises(js.SliceError, match="condition of the while"):
        warnings.simplefilter("ignore")
        g.rewrite(jnp.tanh, jnp.sin, x)


def test_a_pattern_reading_a_while_loops_carry_is_rewritten_in_every_trip():
    """``sin(h)``, h the carry entering each trip (the loop's operand in trip 0, what
    the trip before returned after): the rewrite reads the body's carry input, in every
    trip, also those the traced arguments did not run, and inside a jitted call of the
    body (a SliceError before)."""

    @jax.jit
    def cell(h):
        return jnp.sin(h) * 2.0

    def looped(act, jitted):
        def f(x, n):
            def body(c):
                i, h = c
                return i + 1, (cell(h) if jitted else act(h) * 2.0)

            return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

        return f

    def by_hand(x, n):
        for _ in range(n):
            x = jnp.cos(x) * 2.0
        return x

    x = jnp.linspace(-1.0, 1.0, 3)
    for jitted in (False, True):
        g = js.trace(looped(jnp.sin, jitted), x, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every trip: no trip left as it was
            rw = g.rewrite(jnp.sin, jnp.cos, x)
        for n in (0, 2, 4, 6):
            allclose(rw.as_function()(x * 0.5, n), by_hand(x * 0.5, n), rtol=1e-5)


def test_constants_match_across_weak_types_and_widths_as_inputs_do():
    # a pattern traced with a Python int holds its 2 as JAX's weakly typed int64, a program
    # computing with an int32 array holds an int32 2: the same constant (both matched
    # nothing); a float32 pattern's 0.5 matches a bfloat16 program's, as its inputs do
    def f(x, table):
        i = jnp.argmax(x) * 2 + 1
        return table[i]

    x, table = jnp.array([0.0, 3.0, 1.0, 2.0]), jnp.arange(10.0)
    g = js.trace(f, x, table)
    for example in (0, jnp.asarray(0), jnp.int32(0)):
        assert len(g.match(lambda n: n * 2 + 1, example)) == 1
    r = g.rewrite(lambda n: n * 2 + 1, lambda n: n * 3, 0)
    assert float(r.value("out")) == float(table[jnp.argmax(x) * 3]) == 3.0
    weak = js.trace(lambda n, t: t[n * 2 + 1], 1, table)
    assert len(weak.match(lambda n: n * 2 + 1, jnp.int32(0))) == 1

    def half(h):
        return jnp.tanh(h * 0.5 + 1.0)

    xb = jnp.linspace(-1, 1, 4).astype(jnp.bfloat16)
    gb = js.trace(lambda x: half(jnp.sin(x)).sum(), xb)
    assert len(gb.match(half, jnp.ones(4))) == 1
    assert len(gb.match(lambda h: jnp.tanh(h * 0.25 + 1.0), jnp.ones(4))) == 0
    assert len(g.match(lambda n: n * 2.0 + 1.0, 0.0)) == 0  # a float is not an int
    # never the program's constant rounded or wrapped to the pattern's dtype
    f32 = js.trace(lambda x: jnp.sin(x * 0.1001) + jnp.log(x + 1e-8), jnp.linspace(0.5, 1, 4))
    assert len(f32.match(lambda a: a * 0.1, jnp.ones(4, jnp.bfloat16))) == 0
    assert len(f32.match(lambda a: a + 0.0, jnp.ones(4, jnp.float16))) == 0
    xu = jnp.array([0, 1, 200], jnp.uint8)
    u8 = js.trace(lambda x: jnp.where(x > 0, x, 7) + (x == 255), xu)
    assert len(u8.match(lambda a: a > 256, jnp.int32(0))) == 0
    assert len(u8.match(lambda a: a == -1, jnp.int8(0))) == 0
    assert len(u8.match(lambda a: a > 0, jnp.int32(0))) == 1


def test_a_pattern_traced_with_other_shapes_says_so_when_it_matches_nothing():
    # a softmax traced with a matrix in a model of rank-3 activations: its equations are
    # there with other axes and shapes; g.match said nothing, g.rewrite "matches nothing"
    def f(x):
        return jax.nn.softmax(jnp.tanh(x), axis=-1).sum()

    g = js.trace(f, jnp.ones((2, 6, 8)))

    def softmax(a):
        return jax.nn.softmax(a, axis=-1)

    hint = (
        r"with other parameters \(.*\), after \d+ of its equations matched: a pattern "
        r"matches parameters as traced \(a broadcast, reshape or reduction holds shapes"
    )
    with pytest.warns(UserWarning, match=hint):
        assert g.match(softmax, jnp.ones((2, 3))) == ()
    with pytest.raises(js.SliceError, match=hint):
        g.rewrite(softmax, jax.nn.relu, jnp.ones((2, 3)))
    assert len(g.match(softmax, jnp.ones((2, 6, 8)))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing like it at all: nothing to say
        assert g.match(jnp.sin, jnp.ones(3)) == ()
        # only its last primitive (a sum over other axes, of no sin): no clue either
        assert g.match(lambda a: jnp.sum(jnp.sin(a), axis=0), jnp.ones((2, 6, 8))) == ()
    squared = js.trace(lambda x: jnp.sin(jnp.tanh(x) ** 2), jnp.ones(3))
    with pytest.warns(UserWarning, match=r"y=2 where the pattern has y=3\), .*as traced$"):
        assert squared.match(lambda a: jnp.sin(a**3), jnp.ones(3)) == ()  # no shape advice

    # in a scan's body (kept whole in the index) too: it said nothing there
    def scanned(xs):
        def body(c, x):
            return c + f(x), None

        return jax.lax.scan(body, 0.0, xs)[0]

    looped = js.trace(scanned, jnp.ones((3, 2, 6, 8)))
    with pytest.warns(UserWarning, match=hint):
        assert looped.match(softmax, jnp.ones((2, 3))) == ()
    with pytest.warns(UserWarning, match="occurs in the body of a loop"):
        looped.match(softmax, jnp.ones((2, 6, 8)))  # (found there, listed by name)


def test_nan_constants_match():
    def masked(a):
        return jnp.where(a > 0.5, a, jnp.nan)

    g = js.trace(lambda x: masked(jnp.sin(x)).sum(), jnp.ones(3))
    assert len(g.match(masked, jnp.ones(3))) == 1


def test_a_pattern_in_a_taken_branch_reading_the_conds_operand_is_rewritten_in_the_branch():
    # the pattern's input is the operand the cond passes its branch (a SliceError: "reads
    # 'c', which lives in another call, loop iteration or branch"); the edit is in the
    # branch, which runs for the arguments that take it
    def f(x):
        c = jax.checkpoint(lambda t: jnp.cos(t))(x)
        return jax.lax.cond(c.sum() > 0, lambda t: jnp.sin(t) * 2.0, lambda t: t - 1.0, c)

    def by_hand(x):
        c = jnp.cos(x)
        return jax.lax.cond(c.sum() > 0, lambda t: t * 3.0, lambda t: t - 1.0, c)

    x = jnp.linspace(0, 1, 8)
    r = js.trace(f, x).rewrite(lambda a: jnp.sin(a) * 2.0, lambda a: a * 3.0, x)
    for arg in (x, x + 3.0):  # the taken branch, then the other
        allclose(r.as_function()(arg), by_hand(arg))
    allclose(
        jax.grad(lambda x: r.as_function()(x).sum())(x), jax.grad(lambda x: by_hand(x).sum())(x)
    )


def _scanned_tanh(ws, x):
    def step(h, w):
        h = jnp.tanh(h @ w)
        return h, h.sum()

    return jax.lax.scan(step, x, ws)


def test_a_rewritten_loop_body_is_not_matched_or_rewritten_again():
    """The index shows a folded loop's body as traced: after a rewrite there, the old
    pattern still matched (a second rewrite replaced the first, silently) and the new
    one matched nothing without a word."""
    ws, x = jax.random.normal(jax.random.key(0), (5, 4, 4)) / 2, jnp.ones((3, 4))
    g = js.trace(_scanned_tanh, ws, x)
    old, new = (lambda a, w: jnp.tanh(a @ w)), (lambda a, w: jnp.sin(a @ w))
    r = g.rewrite(old, new, x, ws[0])
    with pytest.warns(UserWarning, match=r"occurred at step/h#1@\*.*rewrote there already"):
        assert r.match(old, x, ws[0]) == ()
    with pytest.warns(UserWarning, match="what a patch computes there is matched by no pattern"):
        assert r.match(new, x, ws[0]) == ()
    with pytest.raises(js.SliceError, match="rewrote there already"):
        r.rewrite(old, lambda a, w: jnp.cos(a @ w), x, ws[0])

    def by_hand(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.sin(h @ w), jnp.sin(h @ w).sum()), x, ws)

    allclose(r.as_function()(ws, x)[0], by_hand(ws, x)[0])


def test_match_and_rewrite_agree_on_what_a_nested_loop_body_can_change():
    """A weight an inner scan (unrolled in a folded outer body) closes over is no value
    of the body's level: g.match said g.rewrite would rewrite it at every iteration,
    g.rewrite then refused; both say it is not changed."""

    def nested(x, w, xss):
        def outer(h, xs):
            def inner(h2, xt):
                h2 = jnp.tanh(h2 @ w + xt)
                return h2, None

            h, _ = jax.lax.scan(inner, h, xs)
            return h, h.sum()

        return jax.lax.scan(outer, x, xss)

    x, w = jnp.ones((2, 4)), jnp.eye(4) / 2
    g = js.trace(nested, x, w, jax.random.normal(jax.random.key(2), (3, 5, 2, 4)))
    pattern = lambda a, w, b: jnp.tanh(a @ w + b)  # noqa: E731
    said = "occurs where the index lists no value.*g.rewrite does not change them"
    with pytest.warns(UserWarning, match=said):
        assert g.match(pattern, x, w, x) == ()
    with pytest.raises(js.SliceError, match=said):
        g.rewrite(pattern, lambda a, w, b: jax.nn.gelu(a @ w + b), x, w, x)


def _add_tree(*v):
    v = list(v)
    while len(v) > 1:
        v = [v[i] + v[i + 1] for i in range(0, len(v), 2)]
    return v[0]


def test_a_match_failing_late_tries_a_bounded_number_of_operand_orders(monkeypatch):
    """A tree of 31 adds whose occurrences fail only at the last check (an inner sum is
    read outside): every combination of operand orders was tried (2^31; 15 adds took
    1.6 s). At most BACKTRACKS other orders are tried from one anchor."""
    from jaxsurgery import _match

    def sums(xs):  # each tree's first inner sum read outside it: no match is closed
        outs = []
        for r in range(2):
            v = [x * (r + 1) for x in xs]
            while len(v) > 1:
                v = [v[i] + v[i + 1] for i in range(0, len(v), 2)]
                outs.append(jnp.sin(v[0]))
            outs.append(v[0])
        return outs

    one = jnp.ones(3)
    g = js.trace(sums, [one] * 32)
    calls = []
    real = _match._Matcher._operands

    def counted(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(_match._Matcher, "_operands", counted)
    assert g.match(_add_tree, *([one] * 32)) == ()
    anchors = sum(1 for v in g.vars if v.primitive == "add")
    assert len(calls) < anchors * 40 * (_match.BACKTRACKS + 2), len(calls)
    # (the pattern as the function has it, unread inside, matches)
    assert len(js.trace(lambda xs: _add_tree(*xs), [one] * 8).match(_add_tree, *([one] * 8))) == 1


def test_a_pattern_broadcasting_otherwise_than_the_library_says_so():
    """haiku.nets.MLP broadcasts a bias to the whole output (broadcast_to), + to (1, n):
    traced with the target's shapes, the pattern was told to take the target's shapes."""
    import haiku as hk

    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 8, 3])(x)))
    x = jnp.ones((5, 4))
    g = js.trace(net.apply, net.init(jax.random.key(0), x), x)
    with pytest.warns(UserWarning, match="if they have those shapes, the graph computes it"):
        assert (
            g.match(lambda a, w, b: jax.nn.relu(a @ w + b), x, jnp.ones((4, 8)), jnp.ones(8)) == ()
        )
    # written as the library computes it, it matches both hidden layers
    found = g.match(
        lambda a, w, b: jax.nn.relu(a @ w + jnp.broadcast_to(b, (5, 8))),
        x,
        jnp.ones((4, 8)),
        jnp.ones(8),
    )
    assert len(found) == 2


def test_a_pattern_whose_inner_value_is_read_outside_says_so_when_it_matches_nothing():
    # a batch norm in training: the batch mean it normalises by also updates the moving
    # average, so the pattern of the normalisation is no match (a match's inner values
    # are its own, to cut out or rewrite); g.match said nothing (hunt F, hk.BatchNorm)
    def step(x, ema):
        mean = x.mean(0)
        y = (x - mean) * 2.0
        return y.sum(), 0.9 * ema + 0.1 * mean

    g = js.trace(step, jnp.ones((4, 3)), jnp.zeros(3))

    def norm(a):
        return (a - a.mean(0)) * 2.0

    hint = (
        r"the pattern 'norm' occurs at y, but its value mean is also read outside it "
        r"\(by %\d+\), so it is no match there: .* make mean an output of the pattern too"
    )
    with pytest.warns(UserWarning, match=hint):
        assert g.match(norm, jnp.ones((4, 3))) == ()
    with pytest.raises(js.SliceError, match=hint):
        g.rewrite(norm, lambda a: a, jnp.ones((4, 3)))

    def norm_and_mean(a):  # as the message says: the mean is an output of the pattern
        m = a.mean(0)
        return (a - m) * 2.0, m

    (m,) = g.match(norm_and_mean, jnp.ones((4, 3)))
    assert [v.name for v in m.outputs] == ["y", "mean"]
