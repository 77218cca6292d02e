"""Whole-function semantics (SPEC §5): everything that runs the whole function computes
what the original function computes, for ANY arguments.

``g.as_function()``, ``g.replace(...)``, ``g.grads``/``g.grads_fn`` and the context that
``s.bind(new_args)`` recomputes run the structured program with edits only where the user
cut or patched: calls not cut keep their custom differentiation rules, and ``cond`` /
``switch`` / ``while_loop`` decide again for new arguments. Where a cut really is
specialised to the traced path (it starts inside a ``cond`` branch or a ``while``
iteration), arguments that leave that path are a ``SliceError``, never a wrong number.

Every reference here is written by hand, in plain JAX, without jaxsurgery.
"""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose

import jaxsurgery as js

# -- custom rules survive: relu's derivative at 0 and a gradient-clipping custom_vjp --------


@jax.custom_vjp
def clip_grad(h):
    return h


def _clip_fwd(h):
    return h, None


def _clip_bwd(_, ct):
    return (jnp.clip(ct, -0.5, 0.5),)


clip_grad.defvjp(_clip_fwd, _clip_bwd)

SCALE = 15.0  # the cotangent reaching clip_grad; clipped to 0.5 by its rule


def net(x, w):
    a = x * w
    h = jax.nn.relu(a)
    c = clip_grad(h)
    loss = jnp.sum(c * SCALE)
    return loss


def net_from_a(a):  # dL/da by hand: the rest of the net as a function of a
    return jnp.sum(clip_grad(jax.nn.relu(a)) * SCALE)


def net_from_h(h):
    return jnp.sum(clip_grad(h) * SCALE)


X = jnp.array([0.0, 1.0, -1.0])  # a = [0, 2, -2]: relu at exactly 0 in the first element
W = jnp.array(2.0)
X_NEW = jnp.array([-3.0, 0.0, 0.5])  # new arguments: relu at 0 in the second element
W_NEW = jnp.array(-1.5)


def test_the_reference_net_is_the_one_from_the_issue():
    # the original function's dL/da: relu'(0) = 0 and the clipped cotangent 0.5 ...
    allclose(jax.grad(net_from_a)(X * W), jnp.array([0.0, 0.5, 0.0]))
    # ... where inlining both rules (max(a, 0) splits its tie, no clipping) gives
    # [7.5, 15, 0]: the numbers a flat, inlined program would give
    inlined = lambda a: jnp.sum(jnp.maximum(a, 0.0) * SCALE)
    allclose(jax.grad(inlined)(X * W), jnp.array([7.5, 15.0, 0.0]))


def test_grads_keep_custom_rules():
    g = js.trace(net, X, W)
    grads = g.grads("loss", wrt=["a", "h", "x", "w"])
    allclose(grads["a"], jax.grad(net_from_a)(X * W))
    allclose(grads["a"], jnp.array([0.0, 0.5, 0.0]))
    allclose(grads["h"], jax.grad(net_from_h)(jax.nn.relu(X * W)))
    dx, dw = jax.grad(net, argnums=(0, 1))(X, W)
    allclose(grads["x"], dx)
    allclose(grads["w"], dw)


@jax.custom_vjp
def clip_body(h):
    inner = h * 3.0
    return jnp.sin(inner)


clip_body.defvjp(lambda h: (clip_body(h), None), lambda _, ct: (jnp.clip(ct, -0.5, 0.5),))


def two_clips(x):
    a = jnp.sin(x)
    c = clip_body(clip_body(a))
    return jnp.sum(c**2)


def test_grads_inside_a_custom_call_leave_the_rules_of_the_others():
    """A perturbation inside a custom_vjp call ran that call's body in place of its rule
    for every perturbation of the request: ``a``'s gradient lost both clips, with no
    warning. The call now keeps its rule; what the perturbed body adds is zero, and
    its derivative in the perturbation is the body's."""
    g = js.trace(two_clips, X)
    wrt = ["a", "clip_body#0/inner", "clip_body#1/inner"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing bypassed, nothing to say
        traced = g.grads("out", wrt=wrt)
    fn = g.grads_fn("out", wrt)
    x_new = X_NEW + 2.0
    for x, got in [(X, traced), (X, fn(X)), (x_new, jax.jit(fn)(x_new))]:
        a = jnp.sin(x)
        inner0 = a * 3.0
        inner1 = jnp.sin(inner0) * 3.0
        allclose(got["a"], jax.grad(lambda a: jnp.sum(clip_body(clip_body(a)) ** 2))(a))
        # inside the first call its body runs, the second call keeps its rule
        rest = jax.grad(lambda i: jnp.sum(clip_body(jnp.sin(i)) ** 2))
        allclose(got["clip_body#0/inner"], rest(inner0))
        allclose(got["clip_body#1/inner"], 2 * jnp.sin(inner1) * jnp.cos(inner1))
    assert not fn.notes


@pytest.mark.parametrize("args", [(X, W), (X_NEW, W_NEW)], ids=["traced", "new"])
def test_jitted_grads_fn_keeps_custom_rules(args):
    g = js.trace(net, X, W)
    monitor = jax.jit(g.grads_fn("loss", ["a", "h", "x"]))
    grads = monitor(*args)
    x, w = args
    allclose(grads["a"], jax.grad(net_from_a)(x * w))
    allclose(grads["h"], jax.grad(net_from_h)(jax.nn.relu(x * w)))
    allclose(grads["x"], jax.grad(net)(x, w))
    allclose(g.grads_fn("loss", ["a"])(*args)["a"], jax.grad(net_from_a)(x * w))  # eagerly


@pytest.mark.parametrize("args", [(X, W), (X_NEW, W_NEW)], ids=["traced", "new"])
def test_grad_of_as_function_keeps_custom_rules(args):
    g = js.trace(net, X, W)
    whole = g.as_function()
    allclose(whole(*args), net(*args))
    expected = jax.grad(net, argnums=(0, 1))(*args)
    allclose(jax.grad(whole, argnums=(0, 1))(*args), expected)
    allclose(jax.jit(jax.grad(whole, argnums=(0, 1)))(*args), expected)
    allclose(jax.grad(jax.jit(whole), argnums=(0, 1))(*args), expected)


@pytest.mark.parametrize("args", [(X, W), (X_NEW, W_NEW)], ids=["traced", "new"])
def test_a_replaced_graph_keeps_custom_rules(args):
    def by_hand(x, w):  # net with h doubled, written out
        a = x * w
        h = jax.nn.relu(a) * 2.0
        return jnp.sum(clip_grad(h) * SCALE)

    patched = js.trace(net, X, W).replace("h", lambda h: h * 2.0)
    whole = patched.as_function()
    allclose(whole(*args), by_hand(*args))
    expected = jax.grad(by_hand, argnums=(0, 1))(*args)
    allclose(jax.grad(whole, argnums=(0, 1))(*args), expected)
    allclose(jax.jit(jax.grad(whole, argnums=(0, 1)))(*args), expected)
    # and the patched graph's own grads: d loss / d a through the patch and both rules
    x, w = args
    allclose(
        patched.grads_fn("loss", ["a"])(*args)["a"],
        jax.grad(lambda a: jnp.sum(clip_grad(jax.nn.relu(a) * 2.0) * SCALE))(x * w),
    )


def test_a_slice_that_does_not_cut_the_custom_calls_keeps_their_rules():
    # the control: slices already keep uncut calls whole (SPEC §5); whole functions must agree
    g = js.trace(net, X, W)
    s = g.slice("a", "loss")
    allclose(jax.grad(s)(X * W), jnp.array([0.0, 0.5, 0.0]))
    allclose(jax.grad(s.bind(X_NEW, W_NEW))(X_NEW * W_NEW), jax.grad(net_from_a)(X_NEW * W_NEW))


@jax.custom_jvp
def leaky_rule_relu(x):
    return jnp.maximum(x, 0.0)


# a rule unlike the body's derivative anywhere: 3 above 0, 0.5 at or below
leaky_rule_relu.defjvps(lambda t, ans, x: jnp.where(x > 0, 3.0, 0.5) * t)


def looped_relus(x):
    def step(h, xi):
        h2 = jnp.sin(h) - 2.0 + xi
        h3 = leaky_rule_relu(h2)
        return h3, h3

    hl, _ = jax.lax.scan(step, x, jnp.zeros(30))
    a = hl * 1.0
    return leaky_rule_relu(a - 1.0).sum()


def test_a_slice_from_a_loop_value_keeps_the_custom_jvp_rules_after_it():
    """A slice cut from the running loop is split by JAX's partial evaluation, which
    (in jax 0.10) inlined the body of a custom_jvp call reading the input: its rule was
    lost, in the loop and after it (the slice's gradient was 0 where the rule gives
    0.5 per step)."""
    x = jnp.array([1.0, -2.0])
    g = js.trace(looped_relus, x)
    h2 = g.value("step/h2@2")

    def rest(h2):  # the function from step 2's h2 on, by hand
        h = leaky_rule_relu(h2)
        for _ in range(3, 30):
            h = leaky_rule_relu(jnp.sin(h) - 2.0)
        return leaky_rule_relu(h - 1.0).sum()

    s = g.slice("step/h2@2", "out")
    allclose(jax.grad(s)(h2), jax.grad(rest)(h2))
    assert float(jnp.abs(jax.grad(rest)(h2)).sum()) > 0
    allclose(g.jvp("step/h2@2", "out", jnp.ones(2))[1], jax.jvp(rest, (h2,), (jnp.ones(2),))[1])
    patched = g.replace("step/h2@0", lambda v: v)  # the running program, edited
    a = patched.value("a")
    allclose(
        jax.grad(patched.slice("a", "out"))(a),
        jax.grad(lambda a: leaky_rule_relu(a - 1.0).sum())(a),
    )


@jax.custom_jvp
def printed_identity(x):
    jax.debug.print("{}", x[0])
    return x * 1.0


printed_identity.defjvp(lambda p, t: (printed_identity(p[0]), 2.0 * t[0]))


def test_a_slice_from_a_loop_value_keeps_the_rule_of_a_custom_jvp_with_effects():
    def f(h0, xs):
        def step(h, x):
            a = h + x
            return printed_identity(a), None

        return jax.lax.scan(step, h0, xs)[0].sum()

    g = js.trace(f, jnp.ones(3), jnp.ones((4, 3)))
    s = g.slice("step/a@1", "out")
    allclose(jax.grad(s)(g.value("step/a@1")), jnp.full(3, 8.0))  # three rules, 2 each


# -- cond and switch decide again ---------------------------------------------------------


def cond_fn(p, y):
    c = jax.lax.cond(p > 0, jnp.sin, jnp.cos, y)
    out = c * 2.0
    return out


Y = jnp.array([0.3, -1.2, 2.0])
P_TRACED, P_OTHER = jnp.array(1.0), jnp.array(-1.0)


@pytest.mark.parametrize("p", [P_TRACED, P_OTHER], ids=["taken", "other"])
def test_as_function_follows_cond(p):
    g = js.trace(cond_fn, P_TRACED, Y)
    whole = g.as_function()
    expected = (jnp.sin(Y) if p > 0 else jnp.cos(Y)) * 2.0
    allclose(cond_fn(p, Y), expected)  # the reference itself
    allclose(whole(p, Y), expected)
    allclose(jax.jit(whole)(p, Y), expected)
    allclose(jax.grad(lambda y: whole(p, y).sum())(Y), jax.grad(lambda y: expected_fn(p, y))(Y))


def expected_fn(p, y):  # cond_fn's sum by hand, the branch chosen in Python
    return jnp.sum((jnp.sin(y) if p > 0 else jnp.cos(y)) * 2.0)


@pytest.mark.parametrize("p", [P_TRACED, P_OTHER], ids=["taken", "other"])
def test_grads_fn_follows_cond(p):
    g = js.trace(cond_fn, P_TRACED, Y)
    expected_y = jax.grad(expected_fn, argnums=1)(p, Y)  # 2 cos(y) or -2 sin(y)
    fn = g.grads_fn("out", ["y", "c"])
    for grads in (fn(p, Y), jax.jit(fn)(p, Y)):
        allclose(grads["y"], expected_y)
        allclose(grads["c"], 2.0 * jnp.ones(3))


def switch_fn(i, y):
    r = jax.lax.switch(i, [jnp.sin, jnp.cos, jnp.tanh], y)
    out = r * 3.0
    return out


SWITCH_BRANCHES = [jnp.sin, jnp.cos, jnp.tanh, jnp.tanh, jnp.sin]  # for i = 0, 1, 2, 7, -1


@pytest.mark.parametrize("i", [0, 1, 2, 7, -1])  # switch clamps the index
def test_as_function_and_grads_fn_follow_switch(i):
    branch = SWITCH_BRANCHES[[0, 1, 2, 7, -1].index(i)]
    g = js.trace(switch_fn, jnp.int32(0), Y)
    index = jnp.int32(i)
    allclose(switch_fn(index, Y), branch(Y) * 3.0)  # the reference itself
    whole = g.as_function()
    allclose(whole(index, Y), branch(Y) * 3.0)
    allclose(jax.jit(whole)(index, Y), branch(Y) * 3.0)
    expected = jax.grad(lambda y: jnp.sum(branch(y) * 3.0))(Y)
    fn = g.grads_fn("out", ["y"])
    allclose(fn(index, Y)["y"], expected)
    allclose(jax.jit(fn)(index, Y)["y"], expected)


def cond_context(p, y, x):
    c = jax.lax.cond(p > 0, jnp.sin, jnp.cos, y)
    z = jnp.tanh(x)
    out = z * c
    return out


@pytest.mark.parametrize("p", [P_TRACED, P_OTHER], ids=["taken", "other"])
def test_bind_recomputes_context_made_by_a_cond(p):
    x = jnp.array([0.5, -0.25, 1.0])
    g = js.trace(cond_context, P_TRACED, Y, x)
    s = g.slice("z", "out")
    c = jnp.sin(Y) if p > 0 else jnp.cos(Y)  # the context by hand
    z = jnp.array([0.1, 0.2, -0.7])
    bound = s.bind(p, Y, x)
    allclose(bound(z), z * c)
    allclose(bound.context["c"], c)
    allclose(jax.jvp(bound, (z,), (jnp.ones(3),))[1], c)
    allclose(jax.jit(lambda p, y, x, z: s.bind(p, y, x)(z))(p, Y, x, z), z * c)
    allclose(jax.jit(jax.grad(lambda z, p: s.bind(p, Y, x)(z).sum()))(z, p), c)


# -- while_loop and fori_loop: a new trip count ---------------------------------------------


def doubling(x, limit):
    def keep(v):
        return v < limit

    def grow(v):
        v_next = v * 2.0
        return v_next

    y = jax.lax.while_loop(keep, grow, x)
    out = jnp.sin(y) * 3.0
    return out


def doubling_by_hand(x, limit):
    while x < limit:
        x = x * 2.0
    return x


X0, LIMIT = jnp.array(0.3), jnp.array(5.0)  # 0.3 → 0.6 → 1.2 → 2.4 → 4.8 → 9.6: 5 trips


@pytest.mark.parametrize("limit", [5.0, 1.0, 100.0, 0.1], ids=["5", "1", "100", "0.1"])
def test_as_function_follows_while_loop_trip_count(limit):
    g = js.trace(doubling, X0, LIMIT)
    assert len(g.select("grow/v_next@*")) == 5
    limit = jnp.array(limit)
    y = doubling_by_hand(float(X0), float(limit))
    expected = jnp.sin(y) * 3.0
    allclose(doubling(X0, limit), expected)  # the reference itself
    whole = g.as_function()
    allclose(whole(X0, limit), expected)
    allclose(jax.jit(whole)(X0, limit), expected)
    # forward-mode through the loop (JAX cannot reverse-differentiate a while_loop)
    trips = int(np.round(np.log2(y / float(X0))))
    allclose(jax.jvp(lambda x: whole(x, limit), (X0,), (1.0,))[1], 3 * jnp.cos(y) * 2.0**trips)


@pytest.mark.parametrize("limit", [5.0, 1.0, 100.0], ids=["5", "1", "100"])
def test_grads_fn_follows_while_loop_trip_count(limit):
    g = js.trace(doubling, X0, LIMIT)
    limit = jnp.array(limit)
    y = doubling_by_hand(float(X0), float(limit))
    fn = g.grads_fn("out", ["y"])  # d out / d y = 3 cos(y), y after the new trip count
    allclose(fn(X0, limit)["y"], 3.0 * jnp.cos(y))
    allclose(jax.jit(fn)(X0, limit)["y"], 3.0 * jnp.cos(y))


def fori_n(x, n):
    def body(i, h):
        h_next = jnp.sin(h) * 1.5 + 0.1 * i
        return h_next

    y = jax.lax.fori_loop(0, n, body, x)
    out = jnp.sin(y) * 2.0
    return out


def fori_by_hand(x, n):
    for i in range(n):
        x = jnp.sin(x) * 1.5 + 0.1 * i
    return x


@pytest.mark.parametrize("n", [3, 0, 1, 6])
def test_as_function_follows_a_fori_loop_trip_count_argument(n):
    x = jnp.array([0.2, -0.4])
    g = js.trace(fori_n, x, jnp.int32(3))
    y = fori_by_hand(x, n)
    expected = jnp.sin(y) * 2.0
    allclose(fori_n(x, jnp.int32(n)), expected)  # the reference itself
    whole = g.as_function()
    allclose(whole(x, jnp.int32(n)), expected)
    allclose(jax.jit(whole)(x, jnp.int32(n)), expected)
    tangent = jax.jvp(lambda x: whole(x, jnp.int32(n)), (x,), (jnp.ones(2),))[1]
    reference = lambda x: jnp.sin(fori_by_hand(x, n)) * 2.0
    allclose(tangent, jax.jvp(reference, (x,), (jnp.ones(2),))[1])
    fn = g.grads_fn("out", ["y"])  # the loop is upstream of y: plain reverse mode works
    allclose(fn(x, jnp.int32(n))["y"], 2.0 * jnp.cos(y))
    allclose(jax.jit(fn)(x, jnp.int32(n))["y"], 2.0 * jnp.cos(y))


def patched_start(x, limit):
    start = x * 1.0
    y = jax.lax.while_loop(lambda v: v < limit, lambda v: v * 2.0, start)
    return y


@pytest.mark.parametrize("limit", [5.0, 1.0, 100.0], ids=["5", "1", "100"])
def test_a_patch_before_a_while_loop_changes_its_trip_count(limit):
    g = js.trace(patched_start, X0, LIMIT)
    patched = g.replace("start", lambda s: s * 3.0).as_function()  # 0.9 → 1.8 → 3.6 → 7.2
    limit = jnp.array(limit)
    expected = doubling_by_hand(3.0 * float(X0), float(limit))
    allclose(patched(X0, limit), expected)
    allclose(jax.jit(patched)(X0, limit), expected)


def loop_context(x, limit, q):
    y = jax.lax.while_loop(lambda v: v < limit, lambda v: v * 2.0, x)
    z = jnp.tanh(q)
    out = z * y
    return out


@pytest.mark.parametrize("limit", [5.0, 1.0, 100.0], ids=["5", "1", "100"])
def test_bind_recomputes_context_made_by_a_while_loop(limit):
    q = jnp.array([0.5, -1.0])
    g = js.trace(loop_context, X0, LIMIT, q)
    s = g.slice("z", "out")
    limit = jnp.array(limit)
    y = doubling_by_hand(float(X0), float(limit))  # the context by hand
    z = jnp.array([0.25, 0.75])
    allclose(s.bind(X0, limit, q)(z), z * y)
    allclose(jax.jit(lambda x, limit, z: s.bind(x, limit, q)(z))(X0, limit, z), z * y)


def test_a_patch_after_a_cond_follows_the_cond():
    g = js.trace(cond_fn, P_TRACED, Y)
    patched = g.replace("c", lambda c: c + 1.0).as_function()
    for p in (P_TRACED, P_OTHER):
        expected = ((jnp.sin(Y) if p > 0 else jnp.cos(Y)) + 1.0) * 2.0
        allclose(patched(p, Y), expected)
        allclose(jax.jit(patched)(p, Y), expected)
        grad = jax.grad(lambda y, p=p: patched(p, y).sum())(Y)
        allclose(grad, jax.grad(expected_fn, argnums=1)(p, Y))


# -- cuts specialised to the traced path: the same path works, another is a SliceError -----


def branchy(p, x):
    def positive(v):
        doubled = v * 2.0
        return jnp.sin(doubled) + v

    def negative(v):
        shifted = v - 1.0
        return jnp.cos(shifted)

    pre = x * 3.0
    y = jax.lax.cond(p > 0, positive, negative, pre)
    return y


def test_a_slice_starting_inside_a_cond_branch():
    x = jnp.array([0.5, 1.0])
    g = js.trace(branchy, jnp.array(1.0), x)
    s = g.slice("positive/doubled", "y")  # made inside the true branch
    z = jnp.array([0.3, -0.6])
    # the same path, new arguments: context (v = pre) recomputed, right value
    x2 = jnp.array([-2.0, 4.0])
    bound = s.bind(jnp.array(2.0), x2)
    allclose(bound(z), jnp.sin(z) + 3.0 * x2)
    allclose(jax.jvp(bound, (z,), (jnp.ones(2),))[1], jnp.cos(z))
    allclose(jax.jit(lambda p, x, z: s.bind(p, x)(z))(jnp.array(2.0), x2, z), jnp.sin(z) + 3.0 * x2)
    # arguments that take the other branch: the cut does not exist there
    with pytest.raises(js.SliceError):
        s.bind(jnp.array(-1.0), x2)(z)


def test_a_slice_ending_inside_a_cond_branch():
    x = jnp.array([0.5, 1.0])
    g = js.trace(branchy, jnp.array(1.0), x)
    s = g.slice("x", "positive/doubled")
    x2 = jnp.array([-2.0, 4.0])
    allclose(s.bind(jnp.array(3.0), x2)(x2), 6.0 * x2)
    with pytest.raises(js.SliceError):
        s.bind(jnp.array(-1.0), x2)(x2)


def test_a_slice_starting_inside_a_while_iteration():
    g = js.trace(doubling, X0, LIMIT)
    s = g.slice("grow/v_next@2", "y")  # traced: iterations 3 and 4 follow, y = 4 z
    allclose(s(jnp.array(2.4)), 9.6)
    # the same path (5 trips) with new arguments: 0.35 → ... → 2.8 (v_next@2) → 5.6 → 11.2
    bound = s.bind(jnp.array(0.35), jnp.array(8.0))
    allclose(bound(jnp.array(2.8)), 11.2)
    allclose(jax.jvp(bound, (jnp.array(2.8),), (jnp.array(1.0),))[1], 4.0)
    jitted = jax.jit(lambda x, limit, z: s.bind(x, limit)(z))
    allclose(jitted(jnp.array(0.35), jnp.array(8.0), jnp.array(2.8)), 11.2)
    # fewer trips (0.3 → 0.6 → 1.2: 2 trips): iteration 2 never runs
    with pytest.raises(js.SliceError):
        s.bind(X0, jnp.array(1.0))(jnp.array(2.4))
    # more trips leave the traced path too: a SliceError, or else the right number
    # (the loop continued from z: 2.4 → ... → 153.6 for limit 100)
    right_or_slice_error(lambda: s.bind(X0, jnp.array(100.0))(jnp.array(2.4)), 153.6)


def test_a_slice_inside_one_while_iteration():
    g = js.trace(doubling, X0, LIMIT)
    s = g.slice("grow/v@3", "grow/v_next@3")  # iteration 3 alone: z ↦ 2 z
    allclose(s.bind(jnp.array(0.35), jnp.array(8.0))(jnp.array(2.8)), 5.6)
    with pytest.raises(js.SliceError):
        s.bind(X0, jnp.array(2.0))(jnp.array(2.4))  # 0.3 → 0.6 → 1.2 → 2.4: 3 trips


def right_or_slice_error(run, expected):
    """Off the traced path: either a SliceError, or the number the function computes."""
    try:
        result = run()
    except js.SliceError:
        return
    allclose(result, expected)


# The traced call's form: what JAX itself accepts for it, jaxsurgery does too.
def clipped(x, t, train=True, scale=2.0):
    out = jnp.where(x < t, x, t) * scale
    return (out if train else -out), 1.0, True  # two constant outputs


def test_new_arguments_of_the_traced_form_are_taken_as_jax_takes_them():
    x = jnp.arange(4.0)
    g = js.trace(clipped, x, 1.5)
    fn = g.as_function()
    # an int where a float was traced is that float (not its bits), also under jit
    for run in (fn, jax.jit(fn)):
        allclose(run(x, 2)[0], clipped(x, 2.0)[0])
    # a default passed explicitly is the call traced; another value is not
    allclose(fn(x, 1.5, train=True, scale=2.0)[0], clipped(x, 1.5)[0])
    with pytest.raises(js.SliceError, match=r"argument `scale` is 3\.0, but the graph was traced"):
        fn(x, 1.5, scale=3.0)
    # a float where an int was traced is not
    h = js.trace(lambda x, n: x * n, x, 2).as_function()
    with pytest.raises(js.SliceError, match=r"argument `n` is float, but the graph was traced"):
        h(x, 2.5)
    # constant outputs are arrays, as jax.jit(clipped) returns them
    outs = fn(x, 1.5)
    assert all(isinstance(o, jax.Array) for o in outs)
    allclose(outs, jax.jit(clipped)(x, 1.5))


def test_a_python_bool_where_a_bool_array_was_traced_is_that_array():
    def step(x, done):
        return jnp.where(done, x, x * 0.5), jnp.logical_not(done)

    g = js.trace(step, jnp.ones(2), jnp.array(False))
    allclose(g.as_function()(jnp.ones(2), True), step(jnp.ones(2), True))


def test_a_python_number_and_an_array_are_the_same_call_unless_that_changes_a_promotion():
    """JAX types a Python number weakly: ``x_bf16 * 2.5`` is bfloat16, ``x_bf16 *
    jnp.float32(2.5)`` float32. Where a Python number traced decided a promotion (also
    through a value computed from it) the graph refuses an array for it that promotes
    otherwise (jax.jit would trace again); elsewhere it takes either, and a Python number where an array was
    traced runs as that array (the program traced)."""

    def f(x, s, n):
        return x * s + n

    def derived(x, s):
        t = s * 2.0
        return x * t

    bf16, f32 = jnp.ones(3, jnp.bfloat16) * 1.7, jnp.ones(3) * 1.7
    loose = js.trace(f, bf16, 2.5, 3).as_function()
    with pytest.raises(js.SliceError, match=r"argument `s` was traced as a Python number"):
        loose(bf16, jnp.float32(3.1), 3)
    out = loose(bf16, 3.1, jnp.int32(4))  # n: an int32 array or an int, bfloat16 either way
    assert out.dtype == f(bf16, 3.1, jnp.int32(4)).dtype == jnp.bfloat16
    allclose(out.astype(jnp.float32), f(bf16, 3.1, jnp.int32(4)).astype(jnp.float32))
    with pytest.raises(js.SliceError, match=r"argument `s` was traced as a Python number"):
        js.trace(derived, bf16, 2.7).as_function()(bf16, jnp.float32(2.7))
    strict = js.trace(f, bf16, jnp.float32(2.5), 3)
    bound = strict.slice("x", "out").bind(bf16, 3.1, 3)
    allclose(bound(bf16), f(bf16, jnp.float32(3.1), 3))
    allclose(strict.as_function()(bf16, jnp.float32(3.1), 3), f(bf16, jnp.float32(3.1), 3))
    # an explicit cast: an f32 array or a number computes in float32 either way
    cast = js.trace(lambda x, s: x.astype(jnp.float32) * s, bf16, jnp.float32(2.5))
    allclose(cast.as_function()(bf16, 2.5), bf16.astype(jnp.float32) * 2.5)

    # a Python number cast down a kind (float to int: an index) is no promotion: a
    # float32 array for it is cast the same, and vmap over one runs (a SliceError was)
    def switched(x, p):
        idx = jnp.clip(jnp.asarray(p).astype(jnp.int32), 0, 2)
        return jax.lax.switch(idx, [jnp.sin, jnp.cos, jnp.tanh], x).sum()

    ps = jnp.array([0.5, 1.5, 2.5])
    by_index = js.trace(switched, f32, 1.5).as_function()
    allclose(jax.vmap(by_index, (None, 0))(f32, ps), jax.vmap(switched, (None, 0))(f32, ps))
    # in float32 the kind changes nothing: both are taken, as the function computes them
    same = js.trace(f, f32, 2.5, 3).as_function()
    for s, n in ((jnp.float32(3.1), jnp.int32(4)), (3.1, 4)):
        allclose(jax.jit(same)(f32, s, n), f(f32, s, n))


def test_arguments_holding_nnx_objects_say_that_in_place_updates_are_not_made():
    from flax import nnx

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def forward(model, x):
        return model(x)

    g = js.trace(forward, model, jnp.ones(2))
    assert any("model holds Flax NNX objects" in n and "pure" in n for n in g.notes)


def test_an_equinox_step_returning_the_updated_model_runs_as_a_function():
    """``eqx.apply_updates(model, updates)`` returns the model with its activation
    functions: those output leaves are held static (as in arguments), the arrays are
    the outputs, and ``as_function`` gives back a model, step after step."""
    import equinox as eqx
    import optax

    mlp = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    opt = optax.adam(1e-2)
    x, y = jax.random.normal(jax.random.key(1), (5, 3)), jnp.zeros((5, 2))

    def step(model, opt_state, x, y):
        def loss(m):
            return jnp.mean((jax.vmap(m)(x) - y) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    state = opt.init(eqx.filter(mlp, eqx.is_array))
    g = js.trace(step, mlp, state, x, y)
    assert any("out[0].activation" in n for n in g.notes)
    ours = eqx.filter_jit(g.as_function())
    model, ref_model, ref_state = mlp, mlp, state
    for _ in range(3):  # feed the outputs back in
        model, state, value = ours(model, state, x, y)
        ref_model, ref_state, ref_value = step(ref_model, ref_state, x, y)
        assert model.activation is mlp.activation
        allclose(value, ref_value)
        allclose(eqx.filter(model, eqx.is_array), eqx.filter(ref_model, eqx.is_array))
        allclose(state, ref_state)


@jax.custom_jvp
def loud(x):
    w = jnp.sin(x)
    jax.debug.print("loud body")
    return w * 2.0


@loud.defjvp
def _loud_jvp(primals, tangents):
    return loud(primals[0]), 4.0 * tangents[0]


def test_a_perturbation_inside_a_custom_call_with_effects_keeps_the_rule_and_says_so(capsys):
    """A perturbed custom call runs its rule and its body apart: a body with effects (a
    debug print, a callback) runs twice, which the warning says. Run once inline, the
    rule went for every gradient: ``a``'s changed with what else ``wrt`` held."""

    def f(x):
        a = x * 1.5
        return jnp.sum(loud(a) ** 2)

    x = jnp.array([0.3, -0.7, 1.1])
    g = js.trace(f, x)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="has effects .* runs more than once"):
        grads = g.grads("out", ["a", "loud/w"])
    jax.effects_barrier()
    assert capsys.readouterr().out.count("loud body") == 2
    allclose(grads["a"], jax.grad(lambda a: jnp.sum(loud(a) ** 2))(x * 1.5))  # the rule's
    allclose(grads["loud/w"], 8.0 * jnp.sin(x * 1.5))


def test_functions_a_graph_makes_take_the_traced_functions_parameters_by_name():
    """as_function, grads_fn, values_fn and patch_fn had the signature (*args, **kwargs):
    jax.jit(fn, static_argnames="mode") traced the string (JAX's TypeError)."""

    def f(x, mode):
        h = jnp.sin(x) ** 2 if mode == "sq" else jnp.exp(x)
        return h.sum()

    x = jnp.arange(3.0)
    g = js.trace(f, x, "sq")
    assert str(inspect.signature(g.as_function())) == "(x, mode)"
    allclose(jax.jit(g.as_function(), static_argnames="mode")(x, "sq"), f(x, "sq"))
    grads = jax.jit(g.grads_fn("out", ["h"]), static_argnames="mode")(x, "sq")
    allclose(grads["h"], jnp.ones(3))
    values = jax.jit(g.values_fn(["h"]), static_argnames="mode")(x, "sq")
    allclose(values["h"], jnp.sin(x) ** 2)
    patched = g.patch_fn(["h"])
    assert str(inspect.signature(patched)) == "(patches, /, x, mode)"
    out = jax.jit(patched, static_argnames="mode")({"h": jnp.ones(3)}, x, "sq")
    allclose(out, 3.0)
