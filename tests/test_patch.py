"""g.replace and g.as_function: activation patching, composed with jit and grad."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose, assert_at_callers_line, check_slice
from models import big_or_small

import jaxsurgery as js


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        h = nn.relu(h)
        return nn.Dense(3)(h)


def test_zero_ablating_one_hidden_unit_of_a_flax_model(key):
    model = MLP()
    x = jax.random.normal(key, (5, 4))
    variables = model.init(jax.random.key(1), x)
    g = js.trace(model.apply, variables, x)
    patched = g.replace("MLP/Dense_0", lambda h: h.at[:, 3].set(0.0))
    ablated = jax.jit(patched.as_function())

    def by_hand(variables, x):  # the model with unit 3 zeroed, written out
        p = variables["params"]
        h = nn.Dense(8).apply({"params": p["Dense_0"]}, x).at[:, 3].set(0.0)
        return nn.Dense(3).apply({"params": p["Dense_1"]}, nn.relu(h))

    allclose(ablated(variables, x), by_hand(variables, x))
    assert not jnp.allclose(ablated(variables, x), model.apply(variables, x))
    new_x = jax.random.normal(jax.random.key(3), (5, 4))
    allclose(ablated(variables, new_x), by_hand(variables, new_x))  # any arguments
    # patching composes with differentiation
    loss = lambda f: lambda v, x: jnp.sum(f(v, x) ** 2)  # noqa: E731
    allclose(
        jax.grad(loss(patched.as_function()))(variables, x),
        jax.grad(loss(by_hand))(variables, x),
    )
    # the original graph is untouched
    allclose(g.as_function()(variables, x), model.apply(variables, x))


@pytest.mark.parametrize(
    "patch",
    [jax.nn.relu, lambda h: jnp.clip(h, -0.5, 0.5), lambda h: h / jnp.linalg.norm(h)],
    ids=["relu", "clip", "norm"],
)
def test_a_replacement_holding_calls_in_a_scoped_model(key, patch):
    """A replacement whose own program holds calls (jax.nn.relu's custom_jvp, jnp.clip's
    jit), at a value inside a scope (a Flax module)."""
    model = MLP()
    x = jax.random.normal(key, (5, 4))
    variables = model.init(jax.random.key(1), x)
    g = js.trace(model.apply, variables, x)
    patched = g.replace("MLP/Dense_1", patch)

    def by_hand(variables, x):
        return patch(model.apply(variables, x))

    allclose(patched.as_function()(variables, 2 * x), by_hand(variables, 2 * x))
    loss = lambda f: lambda v, x: jnp.sum(f(v, x) ** 2)  # noqa: E731
    allclose(
        jax.grad(loss(patched.as_function()))(variables, x),
        jax.grad(loss(by_hand))(variables, x),
    )
    # the value before the patch keeps its name
    allclose(patched.value("MLP/Dense_1.unpatched"), model.apply(variables, x))


def test_replace_with_a_value_and_names_of_the_old_value():
    def f(x):
        h = jnp.sin(x)
        y = jnp.exp(h) * 2.0
        return y

    g = js.trace(f, jnp.ones(3))
    p = g.replace("h", 0.5)
    allclose(p.value("h"), 0.5 * jnp.ones(3))
    allclose(p.value("h.unpatched"), jnp.sin(jnp.ones(3)))
    allclose(p.value("y"), jnp.exp(0.5) * 2.0 * jnp.ones(3))
    s = p.slice("x", "y", allow_unconnected=True)  # y no longer depends on x
    allclose(jax.jacfwd(s)(jnp.ones(3)), jnp.zeros((3, 3)))
    with pytest.raises(js.SliceError, match=r"output 'y' does not depend on any input"):
        p.slice("x", "y")


def test_gradients_and_slices_at_the_old_value_go_through_the_patch():
    def f(x):
        h = jnp.tanh(x)
        return (h * 2.0).sum()

    x = jnp.linspace(-1.0, 1.0, 3)
    p = js.trace(f, x).replace("h", lambda h: h * 3.0)
    # out = sum(2 * 3 * h_old): d/dh_old = 6, d/dh (the new value) = 2
    grads = p.grads("out", ["h.unpatched", "h"])
    allclose(grads["h.unpatched"], jnp.full(3, 6.0))
    allclose(grads["h"], jnp.full(3, 2.0))
    allclose(p.grads_fn("out", ["h.unpatched"])(x * 2.0)["h.unpatched"], jnp.full(3, 6.0))
    s = p.slice("h.unpatched", "out")
    allclose(jax.grad(s)(p.value("h.unpatched")), jnp.full(3, 6.0))


def test_two_patches_of_one_value_keep_each_value_in_between():
    f1 = lambda h: 2.0 * h + 0.3  # noqa: E731
    f2 = lambda h: jnp.sin(h) - 0.1  # noqa: E731

    def f(x):
        h = jnp.tanh(x)
        return jnp.sum(h**2)

    x = jnp.linspace(-1.0, 1.0, 4)
    twice = js.trace(f, x).replace("h", f1).replace("h", f2)
    # h.unpatched is the value before the last patch, h.unpatched.unpatched the first
    middle, first = f1(jnp.tanh(x)), jnp.tanh(x)
    allclose(twice.value("h.unpatched"), middle)
    allclose(twice.value("h.unpatched.unpatched"), first)
    allclose(twice.values_fn(["h.unpatched"])(x)["h.unpatched"], middle)
    after_middle = lambda m: jnp.sum(f2(m) ** 2)  # noqa: E731
    grads = twice.grads("out", ["h.unpatched", "h.unpatched.unpatched"])
    allclose(grads["h.unpatched"], jax.grad(after_middle)(middle))
    allclose(grads["h.unpatched.unpatched"], jax.grad(lambda t: after_middle(f1(t)))(first))
    given = twice.patch_fn(["h.unpatched"])({"h.unpatched": jnp.ones(4)}, x)
    allclose(given, after_middle(jnp.ones(4)))
    # a patch applies to the value the program reads, not to one before a patch
    with pytest.raises(js.SliceError, match="'h.unpatched' is the value before a patch"):
        js.trace(f, x).replace("h", f1).replace("h.unpatched", f2)
    with pytest.raises(js.SelectionError, match="no var patched that many times"):
        twice["h.unpatched.unpatched.unpatched"]


def test_a_bound_slice_through_a_patch_with_constants():
    def f(x):
        h = jnp.tanh(x)
        y = jnp.sin(h) * 2.0
        return jnp.sum(y**2)

    ablate = lambda h: h.at[1].set(0.0) * 2.0  # noqa: E731  (its index is a constant)
    x = jnp.linspace(-1.0, 1.0, 3)
    patched = js.trace(f, x).replace("h", ablate)

    def by_hand(x):
        return jnp.sum((jnp.sin(ablate(jnp.tanh(x))) * 2.0) ** 2)

    s = patched.slice("x", "out")
    allclose(s.bind(x * 0.5)(x * 0.5), by_hand(x * 0.5))
    allclose(jax.jit(lambda a: s.bind(a)(a))(x * 0.5), by_hand(x * 0.5))
    allclose(jax.grad(lambda a: s.bind(a)(a))(x * 0.5), jax.grad(by_hand)(x * 0.5))


def test_a_patch_keeps_calls_it_does_not_touch():
    def f(x):
        a = x * 2.0
        r = jax.nn.relu(a)
        out = r + 1.0
        return out

    g = js.trace(f, jnp.array([-1.0, 0.0, 1.0]))
    p = g.replace("out", lambda o: o * 3.0)
    s = p.slice("a", "out")
    assert "custom_jvp_call" in [e.primitive.name for e in s.jaxpr.eqns]
    allclose(jax.jvp(s, (jnp.zeros(3),), (jnp.ones(3),))[1], jnp.zeros(3))


def test_bad_replacements_are_slice_errors():
    g = js.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))
    with pytest.raises(js.SliceError, match=r"must give float32\[3\], got float32\[2\]"):
        g.replace(1, lambda h: h[:2])
    with pytest.raises(js.SelectionError, match="no var named 'nope'"):
        g.replace("nope", 0.0)
    # a container of the right array is not the array: said, not unwrapped silently
    with pytest.raises(js.SliceError, match=r"got dict of float32\[3\]"):
        g.replace(1, lambda h: {"h": h})
    with pytest.raises(js.SliceError, match=r"got list of float32\[3\]"):
        g.replace(1, lambda h: [h])


def test_replace_in_a_program_with_captured_constants_and_a_cond():
    """A program holding captured constants (arrays a closure reads) and a cond
    decided by values made before the patch: the patched graph runs, for the traced and
    for new arguments (newer JAX lists a built jaxpr's constants among its inputs)."""
    table = jnp.arange(1.0, 5.0)

    def f(x):
        h = jnp.sin(x) * table
        y = jax.lax.cond(h.sum() > 0, jnp.cos, jnp.sin, h)
        return (y * table).sum()

    x, other = jnp.linspace(0.1, 0.4, 4), -jnp.linspace(0.1, 0.4, 4)
    g = js.trace(f, x)
    assert g._program.num_consts > 0
    patched = g.replace("h", lambda old: old * 0.5)

    def by_hand(x):
        h = jnp.sin(x) * table * 0.5
        return (jax.lax.cond(h.sum() > 0, jnp.cos, jnp.sin, h) * table).sum()

    allclose(patched.value("out"), by_hand(x))
    allclose(patched.as_function()(other), by_hand(other))
    allclose(jax.jit(patched.as_function())(other), by_hand(other))


@jax.custom_jvp
def safe_norm(x):
    sq = jnp.sum(x**2)
    return jnp.sqrt(sq)


@safe_norm.defjvp
def _safe_norm_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    n = safe_norm(x)
    return n, jnp.where(n > 0, jnp.dot(x, t) / jnp.where(n > 0, n, 1.0), 0.0)


def test_a_patch_inside_a_call_with_a_custom_rule_says_the_rule_is_bypassed():
    """Inside a custom_jvp call a patch runs the call's body, whose derivative replaces
    the rule's: even an identity patch of ``safe_norm``'s ``sq`` makes its gradient at
    0 NaN. The patched graph says so (a warning and a note); a patch of the call's
    result keeps the rule."""

    def f(x):
        n = safe_norm(x)
        return n * 2.0

    x = jnp.zeros(3)
    g = js.trace(f, x)
    with pytest.warns(
        UserWarning, match=r"inside the call 'safe_norm', which has a custom"
    ) as warned:
        inside = g.replace("safe_norm/sq", lambda s: s)
    assert_at_callers_line(warned)
    assert any("patch the call's result to keep the rule" in n for n in inside.notes)
    assert bool(jnp.isnan(jax.grad(inside.as_function())(x)).all())  # the body's sqrt at 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outside = g.replace("n", lambda n: n)
    allclose(jax.grad(outside.as_function())(x), jax.grad(f)(x))  # the rule's 0
    assert not any("custom derivative rule" in n for n in outside.notes)


def test_a_patched_graph_follows_other_branches_in_slices_that_take_the_cond_whole():
    """A patch inside a cond branch (or a while trip) edits the running program and
    keeps the index as it is: a slice that takes the cond whole decides again for
    bound arguments that take the other branch, with the patch in its branch."""

    def f(p, y):
        r = big_or_small(p, y)
        return r + 1

    def patched_by_hand(p, y):
        return jax.lax.cond(p > 0, lambda y: (jnp.sin(y) + 10) * 2, lambda y: jnp.cos(y) * 3, y) + 1

    g = js.trace(f, 1.0, 0.5)
    patched = g.replace("big_or_small/big/h", lambda h: h + 10)
    for p in (-1.0, 1.0):
        s = patched.slice("y", "out").bind(p, 0.5)
        check_slice(s, (jnp.float32(0.7),), lambda y, p=p: patched_by_hand(p, y))
    allclose(patched.value("big_or_small/big/h.unpatched"), jnp.sin(0.5))
    allclose(patched.as_function()(-1.0, 0.7), patched_by_hand(-1.0, 0.7))


def test_a_patch_that_changes_a_conds_branch_gives_the_values_of_the_other_branch():
    """A patch before a cond whose predicate it changes (a graph without loops): the
    patched graph's values (g.value, a slice's context) came from its index, which holds
    the branch traced before the patch (the other branch's numbers, silently)."""

    def f(x):
        hs = jnp.sin(x)
        q = jax.lax.cond(hs[0] > 0.5, lambda a: a * 2.0, lambda a: a - 1.0, hs)
        out = (q * hs).sum()
        return out

    def by_hand(x, patch):
        hs = patch(jnp.sin(x))
        q = jnp.where(hs[0] > 0.5, hs * 2.0, hs - 1.0)
        return hs, q, (q * hs).sum()

    x = jnp.arange(3.0)  # traced: sin(0) = 0, the false branch
    g = js.trace(f, x)
    for patched, patch in (
        (g.replace("hs", lambda h: h + 1.0), lambda h: h + 1.0),  # hs[0] = 1: true branch
        (g.rewrite(jnp.sin, jnp.cos, jnp.ones(3)), lambda h: jnp.cos(x)),
    ):
        hs, q, out = by_hand(x, patch)
        allclose(patched.value("q"), q)
        allclose(patched.value("out"), out)
        allclose(patched.slice("q", "out")(q), out)  # its context: the patched hs
        allclose(patched.as_function()(x), out)
    unchanged = g.replace("q", lambda q: q * 3.0)  # after the cond: spliced as before
    allclose(unchanged.value("out"), (3.0 * (jnp.sin(x) - 1.0) * jnp.sin(x)).sum())


def test_a_rewrite_inside_a_jitted_layer_reads_the_layer_arguments():
    """A pattern inside a ``@jax.jit`` layer whose inputs are the layer's arguments:
    those are the call's operands outside it, the same values as its body's inputs."""

    def make(jit):
        def layer(w, h):
            return jnp.tanh(h @ w) + h

        layer = jax.jit(layer) if jit else layer

        def net(ws, x):
            h = x
            for w in ws:
                h = layer(w, h)
            return (h**2).sum()

        return net

    ws, x = [jnp.eye(4) * 0.5] * 3, jnp.ones((2, 4))

    def by_hand(ws, x):
        h = x
        for w in ws:
            h = jnp.sin(h @ w) + h
        return (h**2).sum()

    g = js.trace(make(True), ws, x)
    rewritten = g.rewrite(lambda a, w: jnp.tanh(a @ w), lambda a, w: jnp.sin(a @ w), x, ws[0])
    allclose(rewritten.as_function()(ws, 0.5 * x), by_hand(ws, 0.5 * x))
    allclose(jax.grad(rewritten.as_function())(ws, x), jax.grad(by_hand)(ws, x))


def test_a_bound_slice_of_a_rewritten_graph_recomputes_what_the_replacements_made():
    """Context values made inside a rewrite's replacement (the broadcast of a bias)
    have no place in the nested program: under ``bind`` they are computed from the
    values they read, for the new arguments."""

    def loss(params, x):
        h = x
        for w, b in params:
            h = jnp.tanh(h @ w + b)
        return (h**2).sum()

    ks = jax.random.split(jax.random.key(0), 3)
    params = [(jax.random.normal(k, (4, 4)) / 2, jnp.ones(4) * 0.1) for k in ks]
    x = jax.random.normal(ks[0], (2, 4))
    g = js.trace(loss, params, x)
    relu = g.rewrite(
        lambda a, w, b: jnp.tanh(a @ w + b),
        lambda a, w, b: jax.nn.relu(a @ w + b),
        x,
        *params[0],
    )
    new = [(w * 1.5, b - 0.3) for w, b in params]

    def rest(params):  # layers 2 and 3 rewritten to relu, by hand
        def f(h):
            for w, b in params[1:]:
                h = jax.nn.relu(h @ w + b)
            return (h**2).sum()

        return f

    h1 = relu.value("h#1")
    check_slice(relu.slice("h#1", "out").bind(new, x), (h1,), rest(new))


@pytest.mark.parametrize(
    "patch",
    [0.0, np.float32(2.0), lambda v: 2.0, lambda v: jnp.float32(2.0)],
    ids=["0.0", "np.float32(2.0)", "lambda v: 2.0", "lambda v: jnp.float32(2.0)"],
)
def test_an_output_replaced_by_a_constant(patch):
    """A constant patch becomes a jaxpr Literal; as an output it is a constant var (it
    was an unhashable Literal in the program's outputs)."""

    def f(x):
        h = jnp.sin(x)
        return h.sum()

    x = jnp.ones(3)
    g = js.trace(f, x).replace("out", patch)
    want = 0.0 if patch == 0.0 else 2.0
    allclose(g.as_function()(x), want)
    allclose(g.value("out"), want)
    allclose(jax.grad(g.as_function())(x), jnp.zeros(3))
    allclose(g.value("h"), jnp.sin(x))


def test_unnamed_values_keep_their_numbers_in_a_patched_graph():
    """Values inside library code have no Python name: ``%k`` is how one reaches them.
    A patched (spliced) graph keeps g's numbers, the patched value's too, so p["%k"] is
    g["%k"] (patched); the patch's own values take numbers after g's (its captured
    constant shifted every later %k, and p.grads("out", ["%2"]) read sin(x))."""
    import equinox as eqx

    def f(x):
        return jnp.sum(jnp.cos(jnp.sin(x) * 2.0))  # %1 sin, %2 mul, %3 cos

    x = jnp.array([0.3, -1.2, 0.5])
    g = js.trace(f, x)
    mask = jnp.array([1.0, 0.0, 1.0])
    p = g.replace("%2", lambda h: h * mask)
    assert [p[f"%{k}"].primitive for k in range(4)] == ["input", "sin", "mul", "cos"]
    allclose(p.value("%2"), jnp.sin(x) * 2.0 * mask)
    allclose(p.value("%2.unpatched"), jnp.sin(x) * 2.0)
    allclose(p.grads("out", ["%2"])["%2"], -jnp.sin(jnp.sin(x) * 2.0 * mask))
    allclose(jax.jit(p.values_fn(["%3"]))(-x)["%3"], jnp.cos(jnp.sin(-x) * 2.0 * mask))
    news = {v.name for v in p.vars} - {v.name for v in g.vars}
    assert news == {"%2.unpatched", "%5"}  # the mask, numbered after g's values

    # an Equinox attention: patch the softmax's exp inside jax.nn.softmax; every value
    # of g answers to its name in p, with its primitive, and those before it its value
    attn = eqx.nn.MultiheadAttention(2, 8, key=jax.random.key(0))
    q = jax.random.normal(jax.random.key(1), (3, 8))
    ga = js.trace(lambda q: attn(q, q, q).sum(), q)
    target = next(v for v in ga.vars if v.primitive == "exp" and v.name.startswith("%"))
    pa = ga.replace(target, lambda e: e * 0.5)
    for v in ga.vars:
        w = pa[v.name]
        same = "mul" if v is target else v.primitive  # the patched value: what it computes
        assert w.primitive == same and w.aval == v.aval, v.name
        if v.index < target.index:
            allclose(pa.value(w), ga.value(v))
    allclose(pa.value(target.name), ga.value(target) * 0.5)
    assert pa[f"{target.name}.unpatched"].primitive == "exp"


def test_identity_patches_and_scope_globs_of_a_patched_graph():
    """An identity rewrite (ablating relu) makes the patched value g's own ``%2``: it
    keeps its number and answers to the rewritten one's too; an unnamed value patched to
    itself stays ``%2``; a scope's glob selects g's values, not the patch's own (grads
    of "blk/*" failed on them); the patch's captured constant is not called a Python
    number the function returns."""
    import numpy as np

    def f(x):
        a = jnp.sin(x)
        with jax.named_scope("blk"):
            r = jax.nn.relu(a * 2.0)
        return jnp.exp(r).sum()

    x = jnp.linspace(-1.0, 1.0, 3)
    g = js.trace(f, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (relu's rule is replaced: said, not tested here)
        p = g.rewrite(jax.nn.relu, lambda t: t, jnp.ones(3))
    for name in ("%2", "blk/%2", "mul:2", g["r"].name):
        assert p[name] is p["%2"], name
    allclose(p.grads("out", ["%2"])["%2"], jnp.exp(jnp.sin(x) * 2.0))

    q = g.replace("%2", lambda v: v)
    assert q["%2"].name == "%2" and q["%2.unpatched"] is q["%2"]
    twice = q.replace("%2", lambda v: v * 3.0)  # (it was "the value before a patch")
    allclose(twice.as_function()(x), jnp.exp(jax.nn.relu(jnp.sin(x) * 6.0)).sum())

    C = np.array([0.5, -0.3, 0.2], np.float32)
    p = g.replace("blk/%2", lambda v: jnp.cos(v) * C + 1.0)
    inside = p.select("blk/*")
    # g's values: the patched %2 (the replacement's add), %2.unpatched (mul), relu's max
    assert sorted(v.primitive for v in inside) == ["add", "max", "mul"]
    assert p["%2.unpatched"] in inside and p["%2"] in inside
    assert set(p.select(scope="blk")) == set(inside)  # the scope filter too
    mul = jnp.cos(jnp.sin(x) * 2.0) * C + 1.0
    ref = jax.grad(lambda m: jnp.exp(jax.nn.relu(m)).sum())(mul)
    allclose(p.grads("out", "blk/*")["blk/%2"], ref)
    const = next(v for v in p.vars if v.primitive == "const")
    with pytest.raises(js.SliceError, match="a value inside a patch"):
        p.grads("out", [const])

    # a scope inside an unrolled while_loop keeps its iterations in a patched graph
    def looped(x):
        def body(c):
            i, v = c
            with jax.named_scope("blk"):
                v = jnp.tanh(v * 1.1) + 0.1
            return i + 1, v

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1].sum()

    g = js.trace(looped, x)
    p = g.replace("out", lambda o: o * 2.0)
    assert p.select("blk/*@1").matched == g.select("blk/*@1").matched
    last = g.select("blk/*@1").matched[-1]
    allclose(p.values_fn("blk/*@1")(x)[last], g.value(last))


def test_constants_that_round_to_the_largest_finite_value_are_patched_in():
    """The range check refuses what a cast makes inf, not what rounds to the dtype's
    largest value: ``-3.4028235e+38`` (finfo(float32).min as printed, a mask fill) for a
    float32 var, 65519.0 for a float16 one (65504.0); inf given on purpose stays."""

    def f(x):
        h = jnp.sin(x)
        h16 = h.astype(jnp.float16)
        return h, h16

    x = jnp.ones(3)
    g = js.trace(f, x)
    out = g.replace("h", -3.4028235e38).as_function()(x)[0]
    np.testing.assert_array_equal(out, np.full(3, np.finfo(np.float32).min))
    out = g.patch_fn(["h16"])({"h16": np.full(3, 65519.0)}, x)[1]
    np.testing.assert_array_equal(out, np.full(3, 65504.0, np.float16))
    out = g.replace("h16", np.inf).as_function()(x)[1]
    assert np.isinf(out).all()
