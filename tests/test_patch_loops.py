"""Patching a graph whose index keeps loops folded: the running program is edited, the
index stays as it is (nothing unrolled), and every view of the patched graph (values,
slices, gradients, experiments, the whole function for new arguments) sees the patch.

References are hand-written scans with the patch at its iteration (``jnp.where`` on
the step number), and the zero-perturbation trick written by hand; for library models,
the same patch made on the graph's unrolled twin (the flat index, spliced).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose, assert_at_callers_line, check_slice
from models import RNN_STEPS, rnn, rnn_args, rnn_state_after

import jaxsurgery as js
from jaxsurgery._compat import inner_jaxprs as jax_inner_jaxprs
from jaxsurgery._loop_index import VirtualVar

T = RNN_STEPS  # every scan stays folded in the index


def patched_by_hand(h0, xs, w, at, fn, eps_before=None, eps_after=None):
    """``rnn`` with ``h_new@at`` replaced by ``fn(h_new)``; ``eps_before``/``eps_after``
    (one row per step) are added to ``h_new`` before / after the patch."""
    zeros = jnp.zeros((len(xs), h0.shape[0]))
    before = zeros if eps_before is None else eps_before
    after = zeros if eps_after is None else eps_after

    def step(h, inputs):
        x, t, e_before, e_after = inputs
        h_new = jnp.tanh(h @ w + x) + e_before
        h_new = jnp.where(t == at, fn(h_new), h_new) + e_after
        return h_new, h_new

    h_last, hs = jax.lax.scan(step, h0, (xs, jnp.arange(len(xs)), before, after))
    return jnp.sum(h_last**2) + 0.1 * jnp.sum(hs[::100] ** 2)


@pytest.fixture
def setup():
    return rnn_args()


def halve(h):
    return h * 0.5


def test_a_patch_at_a_loop_value_keeps_the_index_folded(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    patched = g.replace("step/h_new@10", lambda v: v * 0.0)
    # the same index: nothing unrolled, the patched value keeps its name
    assert patched._program is g._program and len(patched.vars) == len(g.vars)
    assert g._loop_index._twin is None
    v = patched["step/h_new@10"]
    assert isinstance(v, VirtualVar) and v.name == "step/h_new@10"
    assert patched["step/h@11"] is v
    zero = lambda h: h * 0.0  # noqa: E731
    allclose(patched.value("out"), patched_by_hand(h0, xs, w, 10, zero), rtol=1e-5)
    allclose(patched.value("step/h_new@10"), jnp.zeros(4))
    allclose(patched.value("step/a@11"), xs[11])  # 0 @ w + x
    allclose(patched.value("step/h_new@9"), g.value("step/h_new@9"))
    # the old value, by its old name
    before = patched["step/h_new@10.unpatched"]
    assert before.name == "step/h_new@10.unpatched" and before.shape == (4,)
    allclose(patched.value(before), g.value("step/h_new@10"))
    # new arguments: the loop runs with the patch at step 10
    new = (h0 * 0.5, xs[::-1], w.T)
    allclose(patched.as_function()(*new), patched_by_hand(*new, 10, zero), rtol=1e-5)
    # the original graph is untouched
    allclose(g.value("out"), rnn(h0, xs, w), rtol=1e-5)
    allclose(g.value("step/h_new@10"), patched.value(before))


def test_slices_and_gradients_of_a_patched_loop_graph_see_the_patch(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    patched = g.replace("step/h_new@10", halve)

    # a slice from inside the loop, across the patch, to the output (by hand: h_new@5
    # moved to the input, the zero-perturbation trick)
    traced = g.value("step/h_new@5")

    def from_h5(h5):
        moved = jnp.zeros((T, 4)).at[5].set(h5 - traced)
        return patched_by_hand(h0, xs, w, 10, halve, eps_after=moved)

    check_slice(patched.slice("step/h_new@5", "out"), (patched.value("step/h_new@5"),), from_h5)

    # a slice between values of the flat index, through the patched loop
    def from_w(w):
        return patched_by_hand(h0, xs, w, 10, halve)

    s = patched.slice("w", "out")
    check_slice(s, (w,), from_w)
    # for new arguments too (the context is recomputed with the patch)
    allclose(s.bind(h0 * 2.0, xs, w)(w), patched_by_hand(h0 * 2.0, xs, w, 10, halve))

    # gradients at the patched value, before it, and at an argument, in one pass
    grads = patched.grads("out", ["step/h_new@10", "step/h_new@10.unpatched", "w"])
    at = jnp.zeros((T, 4))
    eps_grad = jax.grad(
        lambda after, before: patched_by_hand(h0, xs, w, 10, halve, before, after), (0, 1)
    )(at, at)
    allclose(grads["step/h_new@10"], eps_grad[0][10], rtol=1e-5)
    allclose(grads["step/h_new@10.unpatched"], eps_grad[1][10], rtol=1e-5)
    allclose(grads["step/h_new@10.unpatched"], 0.5 * grads["step/h_new@10"], rtol=1e-5)
    allclose(grads["w"], jax.grad(from_w)(w), rtol=1e-5)
    # the same under jit, for new arguments
    fn = jax.jit(patched.grads_fn("out", ["w"]))
    new = (h0 * 0.5, xs * 2.0, w)
    allclose(
        fn(*new)["w"],
        jax.grad(lambda w: patched_by_hand(new[0], new[1], w, 10, halve))(w),
        rtol=1e-5,
    )
    allclose(jax.grad(patched.as_function(), 2)(*new), fn(*new)["w"], rtol=1e-5)


def test_a_value_cut_off_by_a_patch_has_no_effect_past_it(setup):
    h0, xs, w = setup
    patched = js.trace(rnn, h0, xs, w).replace("step/h_new@10", 0.0)
    allclose(patched.value("step/h_new@10"), jnp.zeros(4))
    # the cut is found in the running loop (the index still shows the dependence): the
    # output does not depend on the input, as for a flat cut; held constant on request
    with pytest.raises(js.SliceError, match="does not depend on any input"):
        patched.slice("step/h_new@3", "h_last")
    s = patched.slice("step/h_new@3", "h_last", allow_unconnected=True)
    h3 = patched.value("step/h_new@3")
    out, tangent = jax.jvp(s, (h3,), (jnp.ones(4),))
    allclose(out, patched.value("h_last"))
    allclose(tangent, jnp.zeros(4))
    allclose(s(h3 + 1.0), out)
    # so for values inside the loop after the patch (masked with the iterations after
    # the input, the loop carried it on: a slice of zero derivative, no error)
    for inside in ("step/h_new@500", "step/h@700", ["step/h_new@11", "h_last"]):
        with pytest.raises(js.SliceError, match="does not depend on any input"):
            patched.slice("step/h_new@3", inside)
        s = patched.slice("step/h_new@3", inside, allow_unconnected=True)
        out, tangent = jax.jvp(s, (h3,), (jnp.ones(4),))
        allclose(out, patched.value(inside))
        allclose(tangent, jax.tree.map(jnp.zeros_like, out))
    # before the patch the output still depends on the input
    s = patched.slice("step/h_new@3", "step/h_new@9")
    assert float(jnp.abs(jax.jvp(s, (h3,), (jnp.ones(4),))[1]).sum()) > 0
    # a value-patch experiment on the patched graph: both patches apply
    again = patched.patch_fn("step/h_new@20")

    def twice_by_hand(h0, xs, w, value):
        def step(h, inputs):
            x, t = inputs
            h_new = jnp.tanh(h @ w + x)
            h_new = jnp.where(t == 10, 0.0, jnp.where(t == 20, value, h_new))
            return h_new, h_new

        h_last, hs = jax.lax.scan(step, h0, (xs, jnp.arange(len(xs))))
        return jnp.sum(h_last**2) + 0.1 * jnp.sum(hs[::100] ** 2)

    value = jnp.linspace(-1.0, 1.0, 4)
    allclose(again({"step/h_new@20": value}, h0, xs, w), twice_by_hand(h0, xs, w, value))


def _equations(jaxpr) -> int:
    """Equations of a jaxpr, those of the jaxprs inside it included."""
    return sum(1 + sum(_equations(inner) for inner in jax_inner_jaxprs(e)) for e in jaxpr.eqns)


def test_patches_of_the_old_value_cost_a_slice_no_copy_of_the_loop_body(setup):
    """Patches that cut nothing (a function of the old value) run masked in a slice of
    the patched loop: each adds its masked application, not a copy of the body (each
    ran as its own copy: 14 patches of a 20-layer body compiled 6x slower)."""
    h0, xs, w = setup

    def deep(h0, xs, w):  # a body of 24 equations
        def step(h, x):
            a = h
            for _ in range(8):
                a = jnp.tanh(a @ w + x)
            return a, None

        return jax.lax.scan(step, h0, xs)[0].sum()

    g = js.trace(deep, h0, xs, w)
    sizes = []
    for k in (1, 10):
        patched = g
        for t in range(100, 100 + 50 * k, 50):
            patched = patched.replace(f"step/a#7@{t}", halve)
        s = patched.slice("step/a#7@50", "out")
        a50 = patched.value("step/a#7@50")
        sizes.append(_equations(jax.make_jaxpr(s)(a50).jaxpr))
    # (each patch adds its masked application, a few equations; a copy of the body, 24)
    assert sizes[1] - sizes[0] < 9 * 5, sizes


def test_a_patch_outside_the_loop_keeps_the_loop_values_named(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    patched = g.replace("w", lambda w: w * 2.0)
    assert patched._program is g._program
    v = patched["step/h_new@700"]
    assert isinstance(v, VirtualVar)
    allclose(patched.value(v), rnn_state_after(h0, xs, w * 2.0, 700), rtol=1e-4)
    allclose(patched.value("w.unpatched"), w)
    assert "w.unpatched" in patched.names() and patched.select("w*").names == ("w",)
    assert patched.select("w*.unpatched").names == ("w.unpatched",)
    allclose(patched.value("w"), w * 2.0)
    allclose(patched.value("out"), rnn(h0, xs, w * 2.0), rtol=1e-5)
    # a second patch on the patched graph: both apply
    twice = patched.replace("step/h_new@10", halve)
    allclose(twice.value("out"), patched_by_hand(h0, xs, w * 2.0, 10, halve), rtol=1e-5)
    allclose(twice.value("w.unpatched"), w)


def test_two_patches_at_one_loop_value(setup):
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    twice = g.replace("step/h_new@10", halve).replace("step/h_new@10", jnp.sin)
    at = "step/h_new@10"
    allclose(twice.value("out"), patched_by_hand(h0, xs, w, 10, lambda h: jnp.sin(h * 0.5)))
    allclose(twice.value(at), jnp.sin(0.5 * g.value(at)))
    allclose(twice.value(f"{at}.unpatched"), 0.5 * g.value(at))
    allclose(twice.value(f"{at}.unpatched.unpatched"), g.value(at))
    grads = twice.grads("out", [at, f"{at}.unpatched", f"{at}.unpatched.unpatched"])
    both = lambda h: jnp.sin(h * 0.5)  # noqa: E731
    eps_grad = jax.grad(lambda e: patched_by_hand(h0, xs, w, 10, both, eps_after=e))
    allclose(grads[at], eps_grad(jnp.zeros((T, 4)))[10], rtol=1e-5)
    # chain rule through sin, then through the halving
    middle = 0.5 * g.value(at)
    allclose(grads[f"{at}.unpatched"], grads[at] * jnp.cos(middle), rtol=1e-5)
    allclose(grads[f"{at}.unpatched.unpatched"], 0.5 * grads[f"{at}.unpatched"], rtol=1e-5)
    with pytest.raises(js.SelectionError, match="no var patched that many times"):
        twice[f"{at}.unpatched.unpatched.unpatched"]
    # listed and matched by globs, as in a spliced index
    old = [f"{at}.unpatched", f"{at}.unpatched.unpatched"]
    assert [n for n in twice.names() if n.endswith(".unpatched")] == old
    assert twice.select("step/*.unpatched").names == tuple(old)
    assert twice.select("step/h_new@10.*").names == tuple(old)


def gated_rnn(xs):
    """A scan with a cond in its body (the branch per step decided by the input)."""

    def step(h, x):
        gate = jax.lax.cond(x.sum() > 0, jnp.tanh, jnp.sin, h + x)
        h_new = gate * 0.9
        return h_new, h_new

    return jax.lax.scan(step, jnp.zeros(3), xs)[0].sum()


def test_a_patch_in_a_loop_with_a_cond_in_its_body():
    xs = jax.random.normal(jax.random.key(4), (400, 3))
    g = js.trace(gated_rnn, xs)
    patched = g.replace("step/h_new@200", lambda h: h + 1.0)

    def by_hand(xs):
        def step(h, inputs):
            x, t = inputs
            gate = jnp.where(x.sum() > 0, jnp.tanh(h + x), jnp.sin(h + x))
            h_new = gate * 0.9
            h_new = jnp.where(t == 200, h_new + 1.0, h_new)
            return h_new, h_new

        return jax.lax.scan(step, jnp.zeros(3), (xs, jnp.arange(len(xs))))[0].sum()

    allclose(patched.value("out"), by_hand(xs), rtol=1e-5)
    allclose(patched.as_function()(-xs), by_hand(-xs), rtol=1e-5)
    allclose(jax.grad(patched.as_function())(xs), jax.grad(by_hand)(xs), rtol=1e-5)


def test_a_flax_lstm_patched_at_a_step_agrees_with_the_unrolled_index(key):
    """A model a library ships: the patch on the folded index against the same patch
    spliced into the unrolled index (the graph's twin)."""
    model = nn.RNN(nn.OptimizedLSTMCell(5))
    x = jax.random.normal(key, (2, 24, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)

    def f(variables, x):
        return (model.apply(variables, x) ** 2).sum()

    g = js.trace(f, variables, x)
    # the cell's second output, h = o * tanh(c) (its scope's name selects both)
    at, early = (g.select(f"RNN/cell.scan_fn/cell@{t}")[1].name for t in (20, 5))
    assert g[at].shape == (2, 5) and g[at].primitive == "mul"
    patched = g.replace(at, lambda h: -h)
    assert patched._program is g._program
    # the same values in the unrolled index (whose scopes are numbered per step)
    twin_at, twin_early = (g._loop_index.in_twin(g[n]).name for n in (at, early))
    reference = g._loop_index.twin().replace(twin_at, lambda h: -h)
    allclose(patched.value("out"), reference.value("out"), rtol=1e-5)
    allclose(patched.value(at), -g.value(at), rtol=1e-5)
    allclose(patched.value(f"{at}.unpatched"), g.value(at), rtol=1e-5)
    ours = patched.grads("out", [at, f"{at}.unpatched", early])
    theirs = reference.grads("out", [twin_early])  # (before the patch: same index there)
    allclose(ours[early], theirs[twin_early], rtol=1e-4, atol=1e-6)
    # at the patched value: as putting a given value there (the experiments API)
    given = g.patch_fn(at)
    new_value = patched.value(at)
    by_value = jax.jit(jax.grad(lambda value: given({at: value}, variables, x)))(new_value)
    allclose(ours[at], by_value, rtol=1e-4, atol=1e-6)
    allclose(ours[f"{at}.unpatched"], -ours[at])  # through the patch h -> -h


def test_a_patch_is_not_differentiated_at_iterations_it_does_not_touch():
    """Two patched iterations (or a patch and a gradient at another one) run the span
    between them as one masked scan; a patch that is not differentiable at the other
    iterations' values (sqrt of a negative) must not make the gradient NaN there."""

    def rnn6(w, h0, xs):
        def step(h, x):
            h_new = jnp.tanh(w * h + x)
            return h_new, h_new

        h_last, hs = jax.lax.scan(step, h0, xs)
        return (h_last**2).sum() + hs.sum()

    def by_hand(w, h0, xs, at, fn, eps_at=None, eps=0.0):  # the same patch, a Python loop
        h, total = h0, 0.0
        for t in range(len(xs)):
            h = jnp.tanh(w * h + xs[t])
            h = fn(h) if t in at else h
            h = h + eps if t == eps_at else h
            total = total + h.sum()
        return (h**2).sum() + total

    w, h0 = jnp.float32(0.5), jnp.zeros(2)
    # h_new > 0 at iterations 0-2 and 4-5, < 0 at 3
    xs = jnp.array([[1.0, 1.0], [1.0, 1.0], [0.9, 0.8], [-3.0, -3.0], [2.0, 2.0], [1.0, 1.0]])
    g = js.trace(rnn6, w, h0, xs)
    two = g.replace(["step/h_new@2", "step/h_new@4"], jnp.sqrt)
    reference = jax.grad(by_hand)(w, h0, xs, (2, 4), jnp.sqrt)
    allclose(jax.grad(two.as_function())(w, h0, xs), reference)
    allclose(jax.jit(two.grads_fn("out", "w"))(w, h0, xs)["w"], reference)

    def negated(h):
        return jnp.sqrt(-h)

    one = g.replace("step/h_new@3", negated)
    at1 = jax.grad(lambda e: by_hand(w, h0, xs, (3,), negated, 1, e))(jnp.zeros(2))
    allclose(one.grads("out", "step/h_new@1")["step/h_new@1"], at1)
    h1 = one.value("step/h_new@1")
    check_slice(
        one.slice("step/h_new@1", "out"),
        (h1,),
        lambda h: by_hand(w, h0, xs, (3,), negated, 1, h - h1),
    )


def test_the_gradient_at_an_unpatched_iteration_beside_others_is_before_the_patch():
    """``step/pre@3.unpatched`` asked for with ``step/pre@2``: consecutive iterations of
    one value share one stacked perturbation, but the value before a patch is another
    value (it was perturbed after the patch)."""

    def rnn5(w, h0, xs):
        def step(h, x):
            pre = w @ h + x
            return jnp.tanh(pre), None

        return jax.lax.scan(step, h0, xs)[0].sum()

    w = jax.random.normal(jax.random.key(0), (3, 3)) / 2
    h0, xs = jnp.array([0.1, 0.5, -0.3]), jax.random.normal(jax.random.key(1), (5, 3))

    def square(p):
        return p * p

    def by_hand(e2, e3_before, e3):  # the patched RNN with zero perturbations
        h = h0
        for t in range(5):
            pre = w @ h + xs[t]
            pre = pre + e2 if t == 2 else pre
            pre = square(pre + e3_before) + e3 if t == 3 else pre
            h = jnp.tanh(pre)
        return h.sum()

    z = jnp.zeros(3)
    at2, before3, at3 = jax.grad(by_hand, (0, 1, 2))(z, z, z)
    patched = js.trace(rnn5, w, h0, xs).replace("step/pre@3", square)
    wrt = ["step/pre@2", "step/pre@3.unpatched", "step/pre@3"]
    expected = {"step/pre@2": at2, "step/pre@3.unpatched": before3, "step/pre@3": at3}
    allclose(patched.grads("out", wrt), expected, rtol=1e-4)
    allclose(
        jax.jit(patched.grads_fn("out", wrt[:2]))(w, h0, xs),
        {k: expected[k] for k in wrt[:2]},
        rtol=1e-4,
    )


def test_a_glob_over_iterations_of_a_patched_graph_is_one_value_per_iteration(setup):
    """``step/h_new@*`` stacks one row per iteration, also after a patch at one of them
    (its value before the patch, ``@10.unpatched``, answers to globs that say so)."""
    h0, xs, w = setup
    patched = js.trace(rnn, h0, xs, w).replace("step/h_new@10", halve)
    rows = patched.values_fn({"h": "step/h_new@*"})(h0, xs, w)["h"]
    assert rows.shape == (T, h0.shape[0])
    allclose(rows[10], patched.value("step/h_new@10"))
    allclose(rows[11], patched.value("step/h_new@11"))
    assert patched.select("step/h_new@*.unpatched").names == ("step/h_new@10.unpatched",)

    # in an unrolled index too: h#* is the values the program reads, one per binding
    def chain(x):
        h = jnp.sin(x)
        h = jnp.sin(h)
        h = jnp.sin(h)
        return h

    flat = js.trace(chain, jnp.ones(2)).replace("h#1", halve)
    assert flat.select("h#*").names == ("h#0", "h#1", "h#2")
    assert flat.select("h#*.unpatched").names == ("h#1.unpatched",)


def _scan_body_size(fn, *args):
    """Equations in the body of the one scan ``fn`` runs."""
    (scan,) = [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "scan"]
    return len(scan.params["jaxpr"].jaxpr.eqns)


def test_a_patch_at_every_iteration_is_one_edit_of_the_body(setup):
    """``replace("step/h_new@*", fn)`` patches every iteration with one traced copy of
    ``fn``: the running scan's body grows by that copy, whatever the length (a copy per
    iteration made a body of T copies and T masks: minutes of compiling at T = 5000)."""
    h0, xs, w = setup
    g = js.trace(rnn, h0, xs, w)
    patched = g.replace("step/h_new@*", halve)
    allclose(patched.as_function()(h0, xs, w), _every(h0, xs, w))
    plain = _scan_body_size(g.as_function(), h0, xs, w)
    assert _scan_body_size(patched.as_function(), h0, xs, w) <= plain + 2
    # a value for every iteration too
    zeroed = g.replace("step/h_new@*", 0.0)
    allclose(zeroed.as_function()(h0, xs, w), 0.0)
    assert _scan_body_size(zeroed.as_function(), h0, xs, w) <= plain + 2


def _every(h0, xs, w):
    """``rnn`` with ``halve`` applied to ``h_new`` at every step, by hand."""

    def step(h, x):
        h_new = halve(jnp.tanh(h @ w + x))
        return h_new, h_new

    h_last, hs = jax.lax.scan(step, h0, xs)
    return jnp.sum(h_last**2) + 0.1 * jnp.sum(hs[::100] ** 2)


def _while_rnn(x, n, wide=False):
    """A while_loop running ``n`` trips; ``wide`` adds work to its body, so that the
    index keeps the loop folded rather than unrolling its trips."""

    def body(c):
        i, y = c
        h = jnp.sin(y) + 1.0
        z = h
        for _ in range(110 if wide else 0):
            z = jnp.cos(z) * 0.5
        return i + 1, h + 0.0 * z

    return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]


def _halved(x, n):  # by hand: the loop with h halved at every trip
    def body(c):
        i, y = c
        return i + 1, (jnp.sin(y) + 1.0) * 0.5

    return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]


@pytest.mark.parametrize("wide", [False, True], ids=["unrolled", "folded"])
def test_a_patch_at_every_trip_of_a_while_loop_patches_the_trips_more_arguments_run(wide):
    g = js.trace(lambda x, n: _while_rnn(x, n, wide), jnp.float32(0.3), 3)
    H = "_while_rnn/body/h@*"  # h at every trip
    assert bool(g._program.folded) == wide
    p = g.replace(H, lambda h: h * 0.5)
    f = p.as_function()
    f_selected = g.replace(g.select(H), lambda h: h * 0.5).as_function()  # the same
    for n in (1, 3, 6):  # fewer, as many and more trips than traced
        x = jnp.float32(0.3)
        allclose(f(x, n), _halved(x, n))
        allclose(f_selected(x, n), _halved(x, n))
        tangent = jax.jvp(lambda x, n=n: f(x, n), (x,), (jnp.float32(1.0),))[1]
        allclose(tangent, jax.jvp(lambda x, n=n: _halved(x, n), (x,), (jnp.float32(1.0),))[1])
    name = g.select(H).names[1]
    allclose(p.value(name), (jnp.sin(_halved(0.3, 1)) + 1.0) * 0.5)
    allclose(p.slice("x", "out")(jnp.float32(0.3)), _halved(0.3, 3))
    with pytest.raises(js.SelectionError, match="every trip"):
        p[f"{name}.unpatched"]
    # a patch at one trip, then at every trip: in order at the traced trips (warned)
    with pytest.warns(UserWarning, match="traced trips only") as warned:
        q = g.replace(name, 5.0).replace(H, lambda h: h * 0.5)
    assert_at_callers_line(warned)
    allclose(q.value(name), 2.5)
    # at every trip, then at one: the later patch on top, every trip patched
    r = g.replace(H, lambda h: h * 0.5).replace(name, 5.0)
    allclose(r.value(name), 5.0)
    later = g.select(H).names[2]
    allclose(r.value(later), (jnp.sin(5.0) + 1.0) * 0.5)


@pytest.mark.parametrize("trips", [700, 720], ids=["unrolled", "folded"])
def test_a_patch_of_the_carry_entering_every_trip_leaves_the_loops_result(trips):
    """``body/h@*`` is the carry entering each trip: ``body/h@t`` is what trip t - 1
    made, the last trip's result is the loop's, which no ``body/h@t`` names. A folded
    loop's (720 trips of 7 equations pass SMALL_UNROLL) patch at every trip replaced the
    result too: ``r`` was the patch's value."""

    def f(x, n):
        def body(i, h):
            h2 = jnp.sin(h) * 0.9 + 0.01 * i
            return h2

        r = jax.lax.fori_loop(0, n, body, x)
        return r

    x = jnp.array([0.3, -0.2])
    g = js.trace(f, x, jnp.int32(trips))
    assert bool(g._program.folded) == (trips == 720)
    last = jnp.sin(1.0) * 0.9 + 0.01 * (trips - 1)  # the last trip, from h = 1
    # (patched at the traced trips only, as it says: other trip counts shift them)
    with pytest.warns(UserWarning, match="'body/h@\\*' names the carry entering each trip"):
        allclose(g.replace("body/h@*", lambda h: h * 0 + 1).value("r"), jnp.full(2, last))
    with pytest.warns(UserWarning, match="at the traced trips only"):
        allclose(g.replace("body/h@*", jnp.ones(2)).value("r"), jnp.full(2, last))


def test_a_patch_at_every_trip_of_an_inner_loop_in_one_outer_trip_stays_there():
    """``outer/body/h2@1@*``: every trip of the inner loop in outer trip 1, which the
    patch's edit kept (every outer trip was patched)."""

    def f(x, n, m):
        def outer(j, h):
            def body(i, h):
                h2 = jnp.sin(h) * 0.9 + 0.001 * i
                return h2

            hh = jax.lax.fori_loop(0, n, body, h)
            return hh * 1.1 + j

        return jax.lax.fori_loop(0, m, outer, x)

    def by_hand(x, zero_in):
        for j in range(3):
            x = (x * 0 if j == zero_in else _inner_by_hand(x)) * 1.1 + j
        return x

    x = jnp.array([0.3, -0.2])
    g = js.trace(f, x, jnp.int32(20), jnp.int32(3))
    p = g.replace("outer/body/h2@1@*", lambda v: v * 0)
    allclose(p.value("outer/hh@0"), _inner_by_hand(x))
    allclose(p.as_function()(x, jnp.int32(20), jnp.int32(3)), by_hand(x, 1), rtol=1e-5)


def test_a_patch_at_every_trip_of_two_nested_loops_patches_the_trips_more_arguments_run():
    """``obody/ibody/h2@*@*``: every inner trip of every outer trip, also those that
    arguments running more outer trips add (the edit kept the outer trip when only the
    innermost loop's trip was freed)."""

    def make(hook):
        def f(x, n, m):
            def obody(c):
                j, h = c

                def ibody(d):
                    i, hi = d
                    h2 = jnp.sin(hi) * 0.9 + 0.01
                    return i + 1, hook(h2)

                _, hh = jax.lax.while_loop(lambda d: d[0] < n, ibody, (0, h))
                return j + 1, hh * 1.1 + 0.1

            return jax.lax.while_loop(lambda c: c[0] < m, obody, (0, x))[1]

        return f

    fn = lambda v: v * 0.5 - 0.2  # noqa: E731
    x = jnp.array([0.3, -0.2])
    patched = js.trace(make(lambda v: v), x, 4, 3).replace("obody/ibody/h2@*@*", fn)
    for n, m in [(4, 3), (6, 3), (4, 5), (2, 1)]:
        allclose(patched.as_function()(x, n, m), make(fn)(x, n, m))


@pytest.mark.parametrize("pattern", ["*@1@0", "*@*@1", "1@*@0", "*@0@*", "0@1@*", "*@*@*"])
def test_a_star_before_a_trip_patches_that_trip_in_every_trip_of_the_loops_around(pattern):
    """``ibody/h2@*@1@0``: inner trip 0 of middle trip 1 in every outer trip, also in
    the trips arguments running more of them add (a ``*`` before a fixed trip was
    patched per traced trip, silently: 10 of the 27 patterns of three nested loops
    were wrong at other trip counts)."""

    def make(hook):
        def f(x, n, m, k):
            def obody(i, h):
                def mbody(j, h):
                    def ibody(t, h):
                        h2 = jnp.sin(h) + 0.1 * j + 0.01 * t + 0.3 * i
                        return hook((i, j, t), h2)

                    return jax.lax.fori_loop(0, k, ibody, h) * 0.9

                return jax.lax.fori_loop(0, m, mbody, h) * 1.1

            return jax.lax.fori_loop(0, n, obody, x)

        return f

    def at_pattern(trips, h2):  # the patch, where the pattern names the trip
        hit = True
        for trip, p in zip(trips, pattern.split("@")):
            hit = hit if p == "*" else hit & (trip == int(p))
        return jnp.where(hit, h2 + 1.0, h2)

    x, n = jnp.array([0.3, 0.7]), jnp.int32
    g = js.trace(make(lambda trips, h2: h2), x, n(2), n(2), n(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (every trip patched: nothing to say)
        patched = jax.jit(
            g.replace(f"obody/mbody/ibody/h2@{pattern}", lambda v: v + 1.0).as_function()
        )
    for trips in [(2, 2, 2), (3, 2, 2), (2, 3, 3), (1, 1, 3), (3, 3, 1)]:
        allclose(patched(x, *map(n, trips)), make(at_pattern)(x, *trips), atol=1e-5)


def _two_whiles(hook):
    def f(x, n, m):
        def obody(i, h):
            def ibody(j, h1):
                h2 = jnp.sin(h1) + 0.1 * j + 0.3 * i
                return hook(i, j, h2)

            return jax.lax.fori_loop(0, m, ibody, h) * 1.1

        return jax.lax.fori_loop(0, n, obody, x)

    return f


def test_a_star_spanning_nested_loops_patches_every_trip_of_each():
    """``obody/ibody/h2@*`` (a ``*`` spanning both loops' iterations, as it selects
    ``h2@i@j``) and ``**/h2@*`` patch every trip of both loops, also the outer trips
    more arguments run (the inner loop's alone were freed: outer trip 2 was left
    unpatched at (3, 2), silently)."""
    x, n = jnp.array([0.3, 0.7]), jnp.int32
    g = js.trace(_two_whiles(lambda i, j, h2: h2), x, n(2), n(2))
    everywhere = _two_whiles(lambda i, j, h2: h2 + 1.0)
    for name in ("obody/ibody/h2@*", "**/h2@*"):
        patched = g.replace(name, lambda v: v + 1.0).as_function()
        for trips in [(2, 2), (3, 2), (1, 4)]:
            allclose(patched(x, *map(n, trips)), everywhere(x, *trips), rtol=1e-5)
    ab = g.select("obody/ibody/h2@*@0") + g.select("obody/ibody/h2@*@1")  # (+ keeps the @*)
    patched = g.replace(ab, lambda v: v + 1.0).as_function()
    for trips in [(2, 2), (3, 2)]:  # (inner trips 0 and 1 of every outer trip)
        allclose(patched(x, *map(n, trips)), everywhere(x, *trips), rtol=1e-5)


def test_names_whose_trips_overlap_patch_each_traced_trip_once():
    """``h2@*@1`` and ``h2@1@*`` together both hold trip (1, 1), which was patched twice
    (each name's edit of every trip ran there), even at the traced trip counts: such
    names are patched at the traced trips, once each, and warned; a value selected
    twice is patched once."""
    x, n = jnp.array([0.3, 0.7]), jnp.int32
    g = js.trace(_two_whiles(lambda i, j, h2: h2), x, n(2), n(2))
    once = _two_whiles(lambda i, j, h2: jnp.where((i == 1) | (j == 1), h2 + 1.0, h2))
    both = ("obody/ibody/h2@*@1", "obody/ibody/h2@1@*")
    for selector in (g.select(*both), dict(zip("ab", both))):
        with pytest.warns(UserWarning, match="trips overlap"):
            patched = g.replace(selector, lambda v: v + 1.0)
        allclose(patched.as_function()(x, n(2), n(2)), once(x, 2, 2), rtol=1e-5)
    both_ = g.select(both[0]) + g.select(both[1])  # (one selection: as g.select(*both))
    with pytest.warns(UserWarning, match="trips overlap"):
        allclose(g.replace(both_, lambda v: v + 1.0).as_function()(x, n(2), n(2)), once(x, 2, 2))
    for ranged in ("obody/ibody/h2@?@1", "obody/ibody/h2@?@*"):  # (trips 0 to 9: traced)
        with pytest.warns(UserWarning, match="a range of trips"):
            g.replace(ranged, lambda v: v + 1.0)
    twice = g.replace(["obody/ibody/h2@1@1", "obody/ibody/h2@1@1"], lambda v: v + 1.0)
    at_11 = _two_whiles(lambda i, j, h2: jnp.where((i == 1) & (j == 1), h2 + 1.0, h2))
    allclose(twice.as_function()(x, n(2), n(2)), at_11(x, 2, 2), rtol=1e-5)


def test_a_scans_values_in_every_trip_of_a_while_are_patched_at_the_traced_trips():
    """``obody/step/h2@*@*``: a scan's iterations in every trip of a while_loop. The
    scan's result in trip j (``h2@j@2``) was taken for a value named by its trip where
    the scan's last iteration equalled j, and patched in every trip, the loop's result
    too (a wrong number at the traced arguments); the patch holds for the traced trips
    and says so."""
    fn = lambda v: v * 0.5 - 0.2  # noqa: E731

    def make(hook):
        def f(x, m):
            def obody(c):
                j, h = c

                def step(h, t):
                    h2 = jnp.sin(h) * 0.9 + 0.01 * t
                    return hook(h2), None

                return j + 1, jax.lax.scan(step, h, jnp.arange(3.0))[0]

            return jax.lax.while_loop(lambda c: c[0] < m, obody, (0, x))[1]

        return f

    x = jnp.array([0.3, -0.2])
    g = js.trace(make(lambda v: v), x, jnp.int32(3))
    with pytest.warns(UserWarning, match="every trip of a while_loop .* at the traced trips"):
        patched = g.replace("obody/step/h2@*@*", fn)
    allclose(patched.as_function()(x, jnp.int32(3)), make(fn)(x, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (trip 1 named: as traced, nothing to say)
        one = g.replace("obody/step/h2@1@*", fn)

    def in_trip_1(x, m):
        h = x
        for j in range(m):
            for t in range(3):
                h2 = jnp.sin(h) * 0.9 + 0.01 * t
                h = fn(h2) if j == 1 else h2
        return h

    allclose(one.as_function()(x, jnp.int32(3)), in_trip_1(x, 3))
    allclose(one.as_function()(x, jnp.int32(4)), in_trip_1(x, 4))


def _inner_by_hand(h):
    for i in range(20):
        h = jnp.sin(h) * 0.9 + 0.001 * i
    return h


def test_the_value_before_a_patch_at_every_iteration_of_a_scan_is_before_it():
    """``h_new@3.unpatched`` after a patch of ``h_new@*``: the value the patch read at
    iteration 3, whose gradient goes through the patch (fn' = 0.5)."""

    def f(w, xs):
        def step(h, xt):
            pre = w @ h + xt
            h_new = jnp.tanh(pre)
            return h_new, h_new * 2

        h_last, ys = jax.lax.scan(step, jnp.zeros(4), xs)
        return (h_last**2).sum() + jnp.sin(ys).sum()

    w = jax.random.normal(jax.random.key(0), (4, 4)) * 0.5
    xs = jax.random.normal(jax.random.key(1), (6, 4))
    g = js.trace(f, w, xs).replace("step/h_new@*", lambda h: h * 0.5 + 0.1)
    before = jnp.tanh(g.value("step/pre@3"))
    allclose(g.value("step/h_new@3.unpatched"), before)
    allclose(g.value("step/h_new@3"), before * 0.5 + 0.1)
    got = g.values_fn("step/h_new@3.unpatched")(w, xs)["step/h_new@3.unpatched"]
    allclose(got, before)
    grads = g.grads(g.outputs[0], ["step/h_new@3", "step/h_new@3.unpatched"])
    allclose(grads["step/h_new@3.unpatched"], 0.5 * grads["step/h_new@3"])


def _rnn_with(T):
    def f(w, xs):
        def step(h, x):
            hn = jnp.tanh(w @ h + x)
            return hn, hn

        _, ys = jax.lax.scan(step, jnp.zeros(4), xs)
        return ys.sum()

    w = jax.random.normal(jax.random.key(0), (4, 4)) * 0.5
    return f, w, jax.random.normal(jax.random.key(1), (T, 4))


def test_values_before_a_patch_at_every_iteration_are_one_edit_and_go_through_it():
    """``hn@*.unpatched`` after a patch of ``hn@*``: read before the patch at every
    iteration by one edit of the body (its size does not grow with the length), and
    their gradients go through the patch (fn' = 3)."""
    sizes = []
    for T in (8, 64):
        f, w, xs = _rnn_with(T)
        g = js.trace(f, w, xs).replace("step/hn@*", lambda h: h * 3 + 1)
        values = g.values_fn({"a": "step/hn@*.unpatched"})
        closed = jax.make_jaxpr(values)(w, xs)
        sizes.append(
            max(
                len(e.params["jaxpr"].jaxpr.eqns)
                for e in closed.jaxpr.eqns
                if e.primitive.name == "scan"
            )
        )
    assert sizes[0] == sizes[1], sizes
    h, before = jnp.zeros(4), []  # by hand, at T = 64
    for t in range(64):
        before.append(jnp.tanh(w @ h + xs[t]))
        h = before[-1] * 3 + 1
    allclose(jnp.stack(values(w, xs)["a"]), jnp.stack(before), rtol=1e-5)
    grads = g.grads(g.outputs[0], {"a": "step/hn@*.unpatched", "b": "step/hn@*"})
    allclose(grads["a"], 3 * grads["b"], rtol=1e-5)


def test_a_where_that_keeps_one_trip_of_a_while_loop_value_patches_that_trip():
    g = js.trace(lambda x, n: _while_rnn(x, n), jnp.float32(0.3), 3)
    every = g.select("_while_rnn/body/h@*")
    one = every.where(lambda v: v.name == every.names[1])  # trip 1 only
    p = g.replace(one, lambda h: h * 0.5).as_function()
    for n in (3, 6):
        y = jnp.float32(0.3)  # by hand: h halved in trip 1 only
        for trip in range(n):
            y = (jnp.sin(y) + 1.0) * (0.5 if trip == 1 else 1.0)
        allclose(p(jnp.float32(0.3), n), y)


def test_a_scan_inside_a_while_trip_patched_at_every_iteration_is_that_trips_scan():
    def scan_in_while(w, h0, xs):
        def body(s):
            i, h = s

            def cell(c, x):
                v = jnp.sin(w @ c + x)
                return v, None

            h2, _ = jax.lax.scan(cell, h, xs)
            return i + 1, h2

        return jax.lax.while_loop(lambda s: s[0] < 3, body, (0, h0))[1]

    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    h0, xs = jnp.linspace(-1, 1, 4), jax.random.normal(jax.random.key(3), (5, 4))
    g = js.trace(scan_in_while, w, h0, xs)
    # a folded scan in a trip of the unrolled while_loop: trip, then step
    names = g.select("body/cell/v@1@*").names
    h = h0  # by hand: the scan of the trip those names are in patched
    for trip in range(3):
        for t in range(5):
            h = jnp.sin(w @ h + xs[t])
            h = h * 3 + 1 if trip == 1 else h
    allclose(g.replace("body/cell/v@1@*", lambda v: v * 3 + 1).as_function()(w, h0, xs), h)
    v = g.value("body/cell/v@2@3")  # step 3 of trip 2's scan
    h = h0
    for trip in range(3):
        for t in range(5):
            h = jnp.sin(w @ h + xs[t])
            if (trip, t) == (2, 3):
                allclose(v, h)
    assert len(names) == 5


def _two_value_rnn(reverse):
    def f(w, xs):
        def step(h, x):
            a = w @ h + x
            h_new = jnp.tanh(a)
            return h_new, h_new * 2

        h_last, ys = jax.lax.scan(step, jnp.zeros(4), xs, reverse=reverse)
        return (h_last**2).sum() + jnp.sin(ys).sum()

    return f


def _two_values_by_hand(w, xs, reverse, patch):
    """``{name: [value at t]}`` of ``a`` and ``h_new`` of :func:`_two_value_rnn`, with
    ``h_new`` at step ``t`` replaced by ``patch(t, h_new)``."""
    found = {"a": [None] * len(xs), "h_new": [None] * len(xs)}
    h = jnp.zeros(4)
    for t in range(len(xs))[::-1] if reverse else range(len(xs)):
        a = w @ h + xs[t]
        h = patch(t, jnp.tanh(a))
        found["a"][t], found["h_new"][t] = a, h
    return found


@pytest.mark.parametrize("reverse", [False, True])
def test_values_of_a_patched_scan_come_from_one_run_of_the_patched_loop(reverse, monkeypatch):
    """``g.value("step/h_new@t")`` of a graph patched in the loop (at every step, at a
    step, values put in at two steps) runs the patched loop once for every iteration
    (each asked ran the loop up to it, compiled again: 200 ms a value at 1 000 steps),
    values after the patches there; ``.unpatched`` is the value before its patch. Equal
    to the loop by hand at every iteration."""
    from jaxsurgery import _structured

    w = jax.random.normal(jax.random.key(0), (4, 4)) * 0.5
    xs = jax.random.normal(jax.random.key(1), (120, 4))
    f = _two_value_rnn(reverse)
    g = js.trace(f, w, xs)
    put = {7: jnp.full(4, 0.25), 90: jnp.arange(4.0) / 10}
    cases = [
        (g.replace("step/h_new@*", lambda h: h * 0.5 + 0.1), lambda t, h: h * 0.5 + 0.1),
        (g.replace("step/h_new@30", jnp.sin), lambda t, h: jnp.sin(h) if t == 30 else h),
        (
            g.replace("step/h_new@7", put[7]).replace("step/h_new@90", put[90]),
            lambda t, h: put.get(t, h),
        ),
    ]
    runs = []
    run = _structured.Structured.run
    monkeypatch.setattr(
        _structured.Structured, "run", lambda *a, **k: runs.append(1) or run(*a, **k)
    )
    for patched, patch in cases:
        by_hand = _two_values_by_hand(w, xs, reverse, patch)
        allclose(patched.value("step/h_new@31"), by_hand["h_new"][31], rtol=1e-5)
        ran = len(runs)
        for t in (0, 7, 30, 90, 119):
            allclose(patched.value(f"step/h_new@{t}"), by_hand["h_new"][t], rtol=1e-5)
        assert len(runs) == ran  # rows of one run
        for t in (8, 31, 91, 119):
            allclose(patched.value(f"step/a@{t}"), by_hand["a"][t], rtol=1e-5)
        allclose(jnp.stack(patched.value("step/h_new@*")), jnp.stack(by_hand["h_new"]), rtol=1e-5)
    patched = cases[1][0]
    unpatched = _two_values_by_hand(w, xs, reverse, lambda t, h: h)["h_new"][30]
    allclose(patched.value("step/h_new@30.unpatched"), unpatched, rtol=1e-5)


def test_patches_that_print_alike_but_compute_differently_stay_apart():
    """Patches at two steps whose functions print alike (a jitted helper closing over
    another steering vector, a custom_vjp of another backward rule) are not one edit of
    the body: each step runs its own (the regression hunt: both ran the first's, in
    values and gradients), nor are two NaNs of other signs; a NumPy array given as a
    patch value is copied, a view of a writeable buffer too (refilling the buffer
    changed the patched graph). Equal to the loop by hand."""

    def f(x):
        def step(c, _):
            h = jnp.sin(c)
            return h, h

        return jax.lax.scan(step, x, None, length=10)[1]

    def steer(v):
        add = jax.jit(lambda h: h + v)
        return lambda h: add(h)

    def scaled_grad(c):  # the identity, its gradient scaled by c
        @jax.custom_vjp
        def ident(h):
            return h

        ident.defvjp(lambda h: (h, None), lambda _, g: (c * g,))
        return ident

    def by_hand(x, patches):
        c, ys = x, []
        for t in range(10):
            c = patches.get(t, lambda h: h)(jnp.sin(c))
            ys.append(c)
        return jnp.stack(ys)

    x = jnp.full(2, 0.5)
    g = js.trace(f, x)

    def signed(nan):  # |h| with the sign of a NaN (which prints alike, +nan or -nan)
        return lambda h: jnp.abs(h) * jnp.copysign(1.0, nan)

    for patches in (
        {3: steer(jnp.ones(2)), 7: steer(jnp.full(2, 100.0))},
        {3: scaled_grad(2.0), 7: scaled_grad(-3.0)},
        {3: signed(np.float32("nan")), 7: signed(-np.float32("nan"))},
    ):
        patched = g
        for t, fn in patches.items():
            patched = patched.replace(f"step/h@{t}", fn)
        f2 = patched.as_function()
        allclose(f2(x), by_hand(x, patches), rtol=1e-6)
        allclose(jax.jit(f2)(x), by_hand(x, patches), rtol=1e-6)
        grad = jax.grad(lambda x, f2=f2: f2(x)[-1].sum())(x)
        allclose(grad, jax.grad(lambda x, p=patches: by_hand(x, p)[-1].sum())(x), rtol=1e-5)
        allclose(patched.value("step/h@7"), by_hand(x, patches)[7], rtol=1e-6)
    buffer = np.zeros(2, np.float32)
    patched = g.replace("step/h@3", buffer).replace("step/h@5", np.broadcast_to(buffer, (2,)))
    buffer[:] = 7.0  # (the view, read-only, is of a writeable buffer)
    zero = lambda h: jnp.zeros(2)  # noqa: E731
    allclose(patched.as_function()(x), by_hand(x, {3: zero, 5: zero}), rtol=1e-6)
