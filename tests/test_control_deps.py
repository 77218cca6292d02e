"""Control dependencies in the flat index: a ``cond``'s predicate, a ``switch``'s index and
a loop's trip count are dependencies for windows, context and connectivity. A slice from
one of them takes the conditional or loop as a unit, so it decides again for each input.

Also: a ``fori_loop`` with a traced trip count folds back into a well-typed ``while``, and
a ``jit`` helper that returns a Python constant folds back. Every reference is written by
hand, in plain JAX, without jaxsurgery.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose, check_slice

import jaxsurgery as js
from jaxsurgery._compat import check_jaxpr

X = jnp.array([0.5, -1.0, 2.0])


def primitives(s):
    return [e.primitive.name for e in s.jaxpr.eqns]


def float0_like(x):
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def forward_checks(s, args, reference):
    """``check_slice`` without reverse mode (a while_loop has none): value, jit, jvp, vmap."""
    check_jaxpr(s.jaxpr)
    out = s(*args)
    allclose(out, reference(*args))
    allclose(jax.jit(s)(*args), out)
    tangents = tuple(jnp.full_like(a, 0.5) for a in args)
    allclose(jax.jvp(s, args, tangents), jax.jvp(reference, args, tangents))
    batch = [tuple(a * (1.0 + 0.1 * i) for a in args) for i in range(3)]
    stacked = [jnp.stack(xs) for xs in zip(*batch)]
    allclose(jax.vmap(s)(*stacked), jnp.stack([reference(*b) for b in batch]), rtol=1e-4)


# -- cond: the predicate p, used as p > 0 ------------------------------------------------------
def gated(x, p):
    pre = x * 3.0

    def positive(v):
        doubled = v * 2.0
        return jnp.sin(doubled)

    def negative(v):
        shifted = v - 1.0
        return jnp.cos(shifted)

    y = jax.lax.cond(p > 0, positive, negative, pre)
    out = y * y + x
    return out


def gated_y(p):  # the reference: y as a function of p, x held at X
    pre = X * 3.0
    return jnp.where(p > 0, jnp.sin(pre * 2.0), jnp.cos(pre - 1.0))


def gated_out(p):
    y = gated_y(p)
    return y * y + X


def test_a_slice_from_the_predicate_decides_again():
    g = js.trace(gated, X, 1.0)  # traced on the positive branch
    for output, reference in [("y", gated_y), ("out", gated_out)]:
        s = g.slice("p", output)
        assert "cond" in primitives(s)
        assert s.notes == ()
        for p in (2.0, -1.0, 0.0):
            p = jnp.float32(p)
            allclose(s(p), reference(p))
            allclose(jax.jit(s)(p), reference(p))
        _, tangent = jax.jvp(s, (jnp.float32(-1.0),), (jnp.float32(1.0),))
        allclose(tangent, jnp.zeros(3))  # the predicate has no derivative
        check_slice(s, (jnp.float32(-1.0),), reference)
    # the predicate and the data together: still one cond, deciding for each input
    both = g.slice(("x", "p"), "out")

    def reference(x, p):
        pre = x * 3.0
        y = jnp.where(p > 0, jnp.sin(pre * 2.0), jnp.cos(pre - 1.0))
        return y * y + x

    assert "cond" in primitives(both)
    check_slice(both, (X, jnp.float32(-0.5)), reference)


def test_the_predicate_is_context_of_a_slice_through_the_cond():
    g = js.trace(gated, X, -1.0)  # traced on the negative branch
    s = g.slice("pre", "y")
    (index,) = s.context.values()  # the folded cond reads the branch index p > 0 decides
    assert int(index) == 0
    allclose(s(X * 3.0), jnp.cos(X * 3.0 - 1.0))
    allclose(s.bind(X, 1.0)(X * 3.0), jnp.sin(X * 6.0))  # context from new arguments


# -- switch: an integer index ------------------------------------------------------------------
def switched(x, k):
    def first(v):
        return jnp.sin(v)

    def second(v):
        return v * v

    def third(v):
        return jnp.exp(-v)

    y = jax.lax.switch(k, [first, second, third], x)
    out = y + 1.0
    return out


def switched_ref(k):
    k = jnp.clip(k, 0, 2)  # switch clamps its index
    y = jnp.where(k == 0, jnp.sin(X), jnp.where(k == 1, X * X, jnp.exp(-X)))
    return y + 1.0


def test_a_slice_from_the_switch_index_decides_again():
    g = js.trace(switched, X, 1)
    s = g.slice("k", "out")
    check_jaxpr(s.jaxpr)
    assert "cond" in primitives(s)
    for k in (0, 1, 2, 7, -3):
        k = jnp.int32(k)
        allclose(s(k), switched_ref(k))
        allclose(jax.jit(s)(k), switched_ref(k))
    _, tangent = jax.jvp(s, (jnp.int32(0),), (float0_like(0),))
    allclose(tangent, jnp.zeros(3))


# -- loops: the trip count ---------------------------------------------------------------------
def counted(x, n):
    def body(i, h):
        h_next = jnp.sin(h) * (i + 1.0)
        return h_next

    out = jax.lax.fori_loop(0, n, body, x)
    return out


def counted_ref(x, n):  # a Python loop: n must be concrete
    h = x
    for i in range(int(n)):
        h = jnp.sin(h) * (i + 1.0)
    return h


def test_a_slice_from_the_trip_count_runs_the_new_count():
    g = js.trace(counted, X, 3)
    s = g.slice("n", "out")
    check_jaxpr(s.jaxpr)
    assert primitives(s) == ["while"]
    for n in (0, 1, 3, 5):
        n = jnp.int32(n)
        allclose(s(n), counted_ref(X, n))
        allclose(jax.jit(s)(n), counted_ref(X, n))
    _, tangent = jax.jvp(s, (jnp.int32(4),), (float0_like(0),))
    allclose(tangent, jnp.zeros(3))


def test_fori_loop_with_a_traced_count_folds_into_a_well_typed_while():
    g = js.trace(counted, X, 3)
    s = g.slice("x", "out")
    check_jaxpr(s.jaxpr)  # the forwarded count is read, not redefined
    assert primitives(s) == ["while"]
    assert "n" in s.context
    forward_checks(s, (X,), lambda x: counted_ref(x, 3))
    allclose(s.bind(X, 5)(X * 0.5), counted_ref(X * 0.5, 5))
    both = g.slice(("x", "n"), "out")
    check_jaxpr(both.jaxpr)
    allclose(both(X, jnp.int32(2)), counted_ref(X, 2))
    allclose(jax.jit(both)(X, jnp.int32(6)), counted_ref(X, 6))


def doubling(x, limit):
    def keep_going(h):
        return h.sum() < limit

    def grow(h):
        h_next = h * 2.0 + 1.0
        return h_next

    out = jax.lax.while_loop(keep_going, grow, x)
    return out


def doubling_ref(x, limit):
    h = x
    while float(h.sum()) < float(limit):
        h = h * 2.0 + 1.0
    return h


def test_a_slice_from_a_while_loop_limit_runs_the_new_trips():
    x = jnp.array([0.1, 0.2])
    g = js.trace(doubling, x, 10.0)
    assert len(g.select("grow/h_next@*")) == 3
    s = g.slice("limit", "out")
    check_jaxpr(s.jaxpr)
    assert primitives(s) == ["while"]
    for limit in (0.0, 5.0, 10.0, 100.0):
        limit = jnp.float32(limit)
        allclose(s(limit), doubling_ref(x, limit))
        allclose(jax.jit(s)(limit), doubling_ref(x, limit))
    _, tangent = jax.jvp(s, (jnp.float32(50.0),), (jnp.float32(1.0),))
    allclose(tangent, jnp.zeros(2))
    # the loop's start also decides its trip count
    s2 = g.slice("x", "out")
    x2 = jnp.array([3.0, 4.0])
    allclose(s2(x2), doubling_ref(x2, 10.0))
    allclose(jax.jit(s2)(x2), doubling_ref(x2, 10.0))


def test_an_input_that_reaches_only_through_control_is_not_unconnected():
    g = js.trace(gated, X, 1.0)
    s = g.slice("p", "out")  # no SliceError: the predicate decides out
    assert [v.name for v in s.in_vars] == ["p"]
    g2 = js.trace(counted, X, 3)
    assert [v.name for v in g2.slice("n", "out").in_vars] == ["n"]


# -- a jit helper returning a Python constant (and an operand) ---------------------------------
def with_constant(x):
    @jax.jit
    def helper(v):
        return v * 2.0, 1.0, v

    a, b, c = helper(x)
    out = a + b * c
    return out


def test_a_jit_helper_returning_a_constant_folds():
    g = js.trace(with_constant, X)
    s = g.slice("x", "out")
    check_jaxpr(s.jaxpr)
    assert "jit" in primitives(s) or "pjit" in primitives(s)
    check_slice(s, (X,), lambda x: x * 2.0 + 1.0 * x)
    s2 = g.slice("a", "out")
    check_slice(s2, (X * 2.0,), lambda a: a + X)


# -- a slice that cuts inside the branch keeps the traced branch, without its predicate ---------
def self_gated(x):
    pre = x * 3.0

    def positive(v):
        doubled = v * 2.0
        return jnp.sin(doubled)

    y = jax.lax.cond(pre.sum() > 0, positive, jnp.cos, pre)
    return y


def test_a_cut_inside_the_branch_checks_the_branch_its_inputs_decide():
    g = js.trace(self_gated, X)
    s = g.slice("x", "positive/doubled")
    # the window keeps the traced branch; x decides it, so each call checks the decision
    assert primitives(s) == ["mul", "reduce_sum", "gt", "convert_element_type", "mul"]
    assert any("branch 1" in n for n in s.notes)
    check_jaxpr(s.jaxpr)
    allclose(s(X), X * 6.0)
    allclose(jax.jit(s)(X), X * 6.0)
    allclose(jax.jvp(s, (X,), (X,))[1], X * 6.0)
    with pytest.raises(js.SliceError, match="keeps branch 1 of a cond"):
        s(-X)  # takes the other branch: no silently wrong number
    whole = g.slice("x", "y")  # the cond as a unit recomputes its predicate
    assert primitives(whole)[-1] == "cond" and "reduce_sum" in primitives(whole)
    check_slice(whole, (-X,), lambda x: jnp.cos(x * 3.0))


def test_a_path_check_without_a_cpu_device_says_to_list_one(monkeypatch):
    """Under jit, a slice cut inside a cond branch checks its path with a
    jax.debug.callback, which JAX runs on a CPU device: with platforms that leave the CPU
    out (JAX_PLATFORMS=cuda) that was JAX's RuntimeError at run time; now a SliceError
    naming the fix when traced, and eager calls still work."""
    from jaxsurgery import _structured

    real = jax.devices

    def no_cpu(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu. Available backends are ['cuda']")
        return real(backend)

    s = js.trace(self_gated, X).slice("x", "positive/doubled")
    monkeypatch.setattr(jax, "devices", no_cpu)
    _structured._callbacks_run.cache_clear()
    try:
        allclose(s(X), X * 6.0)
        with pytest.raises(js.SliceError, match=r"JAX_PLATFORMS=cuda,cpu"):
            jax.jit(s)(X)
    finally:
        monkeypatch.undo()
        _structured._callbacks_run.cache_clear()
    allclose(jax.jit(s)(X), X * 6.0)


def test_a_cut_inside_a_while_checks_the_trips_its_inputs_decide():
    """Traced at 1.0 the loop runs 4 trips (2, 4, 8, 16); a slice from ``nv@1`` (4.0)
    runs trips 2 and 3 as traced. Its input decides whether the loop would go on or stop
    there: from 3.0 it stops after them too (3, 6, 12), from 2.0 or 100.0 it would not,
    and the slice says so on each call (eagerly, under jit, per example under vmap)."""
    g = js.trace(doubling_once, 1.0)
    s = g.slice("body/nv@1", "out")
    for v in (4.0, 3.0, 4.9):
        allclose(s(v), v * 4 * 3.0)
        allclose(jax.jit(s)(v), v * 4 * 3.0)
        allclose(jax.grad(s)(v), 12.0)
    allclose(jax.vmap(s)(jnp.array([3.0, 4.0])), jnp.array([36.0, 48.0]))
    for v in (2.0, 100.0):
        with pytest.raises(js.SliceError, match="keeps the 4 traced trips of a while_loop"):
            s(v)
    with pytest.raises(Exception, match="keeps the 4 traced trips of a while_loop"):
        jax.block_until_ready(jax.jit(s)(2.0))
    with pytest.raises(js.SliceError):
        jax.vmap(s)(jnp.array([3.0, 100.0]))


# A branch that passes its input on (a Metropolis accept/reject: `new = cond(accept,
# proposal, current)`), or a loop that runs no trip, writes no equation of its own: its
# result still depends on the decision, for slices, values_fn and grads_fn alike.
def accept_reject(x, u):
    proposal = x * 2.0 + 1.0
    accept = jnp.log(u) < -jnp.sum(proposal**2)
    new = jax.lax.cond(accept, lambda p, c: p, lambda p, c: c, proposal, x)
    return new * 3.0


def pick(x, i):
    h = jnp.sin(x)
    new = jax.lax.switch(i, [lambda h: h * 3.0, lambda h: h, lambda h: (-h, h)[0]], h)
    return new * 2.0


def swap(x, y, u):
    a, b = jax.lax.cond(u > 0, lambda p, q: (p, q), lambda p, q: (q, p), x, y)
    return a * 2.0 + b


def doubled_sin(x, n):
    h = jnp.sin(x)
    _, z = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 2.0), (0, h))
    return z + 1.0


X2 = jnp.array([0.1, 0.2])


@pytest.mark.parametrize(
    "fn, traced, other, start",
    [
        (accept_reject, (X2, 0.9), (X2, 1e-3), "x"),  # traced rejecting, run accepting
        (accept_reject, (X2, 1e-3), (X2, 0.9), "x"),
        (pick, (X2, 1), (X2, 0), "h"),  # traced through the branch that passes h on
        (pick, (X2, 0), (X2, 1), "h"),
        (swap, (X2, 2.0 * X2, 1.0), (X2, 2.0 * X2, -1.0), "x"),
        (doubled_sin, (X2, 0), (X2, 2), "h"),  # traced with no trip
        (doubled_sin, (X2, 2), (X2, 0), "h"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_a_result_a_branch_passes_on_still_depends_on_the_decision(fn, traced, other, start):
    g = js.trace(fn, *traced)
    want = fn(*other)
    allclose(g.as_function()(*other), want)
    allclose(g.values_fn(["out"])(*other)["out"], want)
    at = g.values_fn([start])(*other)[start]  # the start value at the new arguments

    def rest(v):  # by hand: the function from the start value on, at the new arguments
        if fn is accept_reject:
            p = v * 2.0 + 1.0
            return 3.0 * jnp.where(jnp.log(other[1]) < -jnp.sum(p**2), p, v)
        if fn is pick:
            return 2.0 * (v * 3.0 if other[1] == 0 else v)
        if fn is swap:
            return 2.0 * v + other[1] if other[2] > 0 else 2.0 * other[1] + v
        return v * 2.0 ** other[1] + 1.0

    allclose(g.slice(start, "out").bind(*other)(at), rest(at))
    if fn is not doubled_sin:  # no reverse mode through a while_loop
        allclose(g.grads_fn("out", [start])(*other)[start], jax.grad(lambda v: rest(v).sum())(at))


def counted_growth(x):
    def body(c):
        v, n = c
        v2 = v * 1.5 + 0.1
        return v2, n + 1.0

    r, n = jax.lax.while_loop(lambda c: c[0] < 10.0, body, (x, 0.0))
    return r, n


@pytest.mark.parametrize("jit", [False, True])
def test_a_trip_count_depends_on_a_value_inside_a_trip(jit):
    """``n`` (the trip count) depends on ``v2@2``: whether trip 3 runs is decided by
    it. The slice was "unconnected", and with allow_unconnected gave the traced count
    (6) for a v2@2 that stops the loop after 4 trips."""
    g = js.trace(counted_growth, 1.0)
    s = g.slice("body/v2@2", "out[1]")
    run = jax.jit(s) if jit else s
    v = g.value("body/v2@2")
    allclose(run(v + 0.01), 6.0)  # still 6 trips
    allclose(jax.jvp(s, (v,), (1.0,))[1], 0.0)
    with pytest.raises((js.SliceError, RuntimeError), match="traced trips of a while_loop"):
        jax.block_until_ready(run(7.7))
    assert counted_growth(7.7)[1] != 6.0  # (the loop from there: 4 trips)


def test_a_cut_inside_a_while_loop_of_calls_says_so_in_its_notes():
    """The loop's region, not the last call inside its body, carries the note."""

    @jax.jit
    def halve(v):
        return v * 0.5

    def f(x):
        def body(c):
            i, v = c
            v2 = halve(v) + 1.0
            return i + 1, v2

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    g = js.trace(f, X)
    s = g.slice("body/v2@1", "out")
    assert any("the slice cuts inside a while" in n and "3 traced trips" in n for n in s.notes)
    allclose(s(g.value("body/v2@1")), g.value("out"))


def test_a_cut_inside_a_folded_while_loop_trip_says_so_in_its_notes():
    """A while_loop whose body passes WHILE_FOLD_LIMIT stays folded; a slice from one of
    its trips is cut from the running program and its notes say where it holds."""
    from jaxsurgery._control_flow import WHILE_FOLD_LIMIT

    def f(x):
        def body(c):
            i, v = c
            for _ in range(WHILE_FOLD_LIMIT):
                v = jnp.sin(v)
            v2 = v * 0.9
            return i + 1, v2

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    g = js.trace(f, X)
    s = g.slice("body/v2@1", "out")
    assert any("cuts inside a while_loop trip" in n for n in s.notes), s.notes
    allclose(s(g.value("body/v2@1")), g.value("out"))


def doubling_once(x):
    def body(v):
        nv = v * 2.0
        return nv

    r = jax.lax.while_loop(lambda v: v < 10.0, body, x)
    return r * 3.0


def branches(x, i):
    def s0(a):
        w0 = a * 2.0
        return w0

    def s1(a):
        t1 = jnp.sin(a)
        w1 = t1 + 1.0
        return w1

    return jnp.sum(jax.lax.switch(i, [s0, s1], x))


def test_the_last_trip_value_is_not_the_loop_result_at_other_trip_counts():
    """Traced at 1.0 the loop runs 4 trips, so ``body/nv@3`` is what the loop returns
    there; at 0.1 (7 trips) it is 1.6 and the loop returns 12.8, at 3.0 (2 trips) it does
    not exist."""
    g = js.trace(doubling_once, 1.0)
    assert g["body/nv@3"] is not g["r"]
    allclose(g.values_fn(["body/nv@3"])(0.1)["body/nv@3"], 1.6)
    allclose(g.values_fn(["r"])(0.1)["r"], 12.8)
    # a patch at trip 3: 1.6 * 100 ends the loop at once
    allclose(g.replace("body/nv@3", lambda v: v * 100).as_function()(0.1), 160.0 * 3)
    allclose(g.replace("r", lambda v: v * 100).as_function()(0.1), 12.8 * 300)
    with pytest.raises(js.SliceError, match="another path"):
        g.values_fn(["body/nv@3"])(3.0)
    with pytest.raises(js.SliceError, match="another path"):
        g.slice("body/nv@3", "out").bind(0.1)


def test_the_traced_branch_value_is_not_the_switch_result_for_another_branch():
    """``s1/w1`` is branch 1's value: for an index that takes branch 0 it does not exist
    (a SliceError, as for ``s1/t1``), and a patch of it leaves branch 0 alone."""
    x = jnp.array([0.1, 0.2])
    g = js.trace(branches, x, 1)
    allclose(g.values_fn(["s1/w1"])(x, 1)["s1/w1"], jnp.sin(x) + 1.0)
    with pytest.raises(js.SliceError, match="another path"):
        g.values_fn(["s1/w1"])(x, 0)
    patched = g.replace("s1/w1", lambda w: w * 10).as_function()
    allclose(patched(x, 0), branches(x, 0))
    allclose(patched(x, 1), 10 * branches(x, 1))


def switch_reads_b_in_branch_1(i, x, b):
    a = jnp.sin(x)
    c = jax.lax.switch(i, [lambda a, b: a * 2, lambda a, b: b * 2], a, b)
    return jnp.sum(c) + jnp.sum(b)


def loop_reads_w(n, w, x):
    r = jax.lax.fori_loop(0, n, lambda i, v: jnp.sin(v * w), x)
    return jnp.sum(r**2)


def accept_or_keep(p, prop, cur):
    new = jax.lax.cond(p > 0, lambda a, b: a, lambda a, b: b, prop, cur)
    return jnp.sum(new**2) + jnp.sum(cur)


@pytest.mark.parametrize(
    "fn, traced, bound, start",
    [
        (switch_reads_b_in_branch_1, (0, X, X + 1), (1, X, X + 1), 2),
        (loop_reads_w, (0, X, X * 0.5), (3, X, X * 0.5), 1),
        (accept_or_keep, (1.0, X, X * 2), (-1.0, X, X * 2), 2),
    ],
    ids=["switch", "fori_loop", "cond"],
)
def test_a_bound_slice_follows_a_path_the_trace_did_not_take(fn, traced, bound, start):
    """The slice's input is an operand of a cond or loop that the traced path does not
    read (branch 0 reads only ``a``; a loop traced with no trip): bound to arguments that
    take another branch or trip count, the conditional or loop reads it, as in the
    function."""
    g = js.trace(fn, *traced)
    s = g.slice(start, "out").bind(*bound)  # from the argument at position ``start``

    def reference(v):
        args = list(bound)
        args[start] = v
        return fn(*args)

    v = bound[start] * 0.7 + 0.1
    allclose(s(v), reference(v))
    allclose(jax.jit(s)(v), reference(v))
    allclose(jax.jvp(s, (v,), (X,))[1], jax.jvp(reference, (v,), (X,))[1])
