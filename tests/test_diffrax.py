"""A diffrax ODE solve: adaptive Tsit5 steps (a while_loop whose trip count depends on the
state and the parameter), saved at given times. Slices from the initial state and from
the parameter to the saved states take the solve as a unit: they equal the solve for any
input, and their JVP equals ``jax.jvp`` of a hand-written function calling diffeqsolve."""

import warnings

import jax
import jax.numpy as jnp
import pytest
from conftest import allclose, assert_at_callers_line
from models import diffrax_solution

import jaxsurgery as js
from jaxsurgery._compat import check_jaxpr

diffrax = pytest.importorskip("diffrax")

TS = jnp.array([0.0, 0.5, 1.0])
Y0 = jnp.array([1.0, -0.5])
THETA = jnp.array(0.7)


def solve(y0, theta):
    # forward-mode differentiable, for jax.jvp
    sol = diffrax_solution(y0, theta, TS, adjoint=diffrax.ForwardMode())
    ys = sol.ys
    return ys


@pytest.fixture(scope="module")
def graph():
    return js.trace(solve, Y0, THETA)


@pytest.mark.parametrize("output", ["out", "ys"])
def test_slices_of_a_diffrax_solve(graph, output):
    assert [v.name for v in graph.inputs] == ["y0", "theta"]
    vary = {
        "y0": (lambda y0: solve(y0, THETA), Y0, jnp.array([-2.0, 0.3]), jnp.array([0.5, 1.0])),
        "theta": (lambda theta: solve(Y0, theta), THETA, jnp.array(3.0), jnp.array(1.0)),
    }
    for name, (reference, traced, other, tangent) in vary.items():
        s = graph.slice(name, output)
        check_jaxpr(s.jaxpr)
        allclose(s(traced), solve(Y0, THETA), rtol=1e-5)
        for value in (traced, other):  # another input: the solve takes other steps
            allclose(s(value), reference(value), rtol=1e-5)
            allclose(jax.jit(s)(value), reference(value), rtol=1e-5)
            primal, jvp = jax.jvp(s, (value,), (tangent,))
            ref_primal, ref_jvp = jax.jvp(reference, (value,), (tangent,))
            allclose(primal, ref_primal, rtol=1e-5)
            allclose(jvp, ref_jvp, rtol=1e-4, atol=1e-6)


def euler_solve(adjoint):
    """Ten Euler steps of a tagged vector field, diffrax's loop unrolled in the index."""

    def field(t, y, theta):
        dy = js.tag(-theta * y + jnp.sin(t), "dy")
        return dy

    def solve(y0, theta):
        term = diffrax.ODETerm(field)
        sol = diffrax.diffeqsolve(
            term, diffrax.Euler(), 0.0, 1.0, 0.1, y0, args=theta,
            saveat=diffrax.SaveAt(t1=True), max_steps=16, adjoint=adjoint,
        )  # fmt: skip
        return jnp.sum(sol.ys**2)

    return solve


def euler_by_hand(eps):
    """The same steps written out, ``eps`` added to the field's value at step 3."""
    y, t = Y0, 0.0
    for k in range(10):
        dy = -THETA * y + jnp.sin(jnp.float32(t)) + (eps if k == 3 else 0.0)
        y, t = y + 0.1 * dy, t + 0.1
    return jnp.sum(y**2)


def test_a_slice_inside_the_solver_loop_says_when_the_adjoint_drops_its_derivative():
    # diffrax's default adjoint differentiates the loop again from its inputs, through
    # a custom_jvp the slice keeps: a value inside the loop gets no derivative there
    g = js.trace(euler_solve(diffrax.RecursiveCheckpointAdjoint()), Y0, THETA)
    s = g.slice("dy@3", "out")
    dy3 = g.value("dy@3")
    allclose(s(dy3 + 1.0), euler_by_hand(jnp.ones(2)), rtol=1e-5)  # the values are right
    assert any("diffrax.ForwardMode()" in n for n in s.notes), s.notes
    # from the loop's inputs the rule is what differentiates, rightly: no such note
    assert not any("ignores the tangent" in n for n in g.slice("y0", "out").notes)
    # forward mode differentiates the loop itself: the derivative is the hand-written one
    g = js.trace(euler_solve(diffrax.ForwardMode()), Y0, THETA)
    s = g.slice("dy@3", "out")
    assert not any("ignores the tangent" in n for n in s.notes), s.notes
    tangent = jnp.array([1.0, -2.0])
    ours = jax.jvp(s, (g.value("dy@3"),), (tangent,))
    allclose(ours, jax.jvp(euler_by_hand, (jnp.zeros(2),), (tangent,)), rtol=1e-5)


def test_a_zero_gradient_a_custom_rule_gives_inside_the_solver_loop_is_a_warning():
    g = js.trace(euler_solve(diffrax.RecursiveCheckpointAdjoint()), Y0, THETA)
    with pytest.warns(UserWarning) as warned:
        grads = g.grads("out", ["dy@3"])
    assert_at_callers_line(warned)
    said = [str(w.message) for w in warned]
    assert any("diffrax.ForwardMode()" in m for m in said), said
    allclose(grads["dy@3"], jnp.zeros(2))  # what the rule gives
    # at the loop's inputs the rule is what differentiates: no warning there
    solve = euler_solve(diffrax.RecursiveCheckpointAdjoint())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allclose(g.grads("out", ["y0"])["y0"], jax.grad(solve)(Y0, THETA), rtol=1e-5)
        at_inputs = jax.jit(g.grads_fn("out", ["y0"]))
        allclose(at_inputs(Y0, THETA)["y0"], jax.grad(solve)(Y0, THETA), rtol=1e-5)
    # grads_fn, being traceable, cannot look at its values: it warns once, when first
    # called (under jit: when traced), whatever the arguments, and lists the note
    fn = g.grads_fn("out", ["dy@3"])
    assert any("diffrax.ForwardMode()" in n for n in fn.notes), fn.notes
    monitor = jax.jit(fn)
    with pytest.warns(UserWarning, match=r"grads_fn: .*diffrax\.ForwardMode\(\)") as warned:
        allclose(monitor(Y0 * 2.0, THETA)["dy@3"], jnp.zeros(2))
    assert_at_callers_line(warned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor(Y0, THETA * 0.5)  # warned already


def test_a_stage_loop_inside_the_solver_loop_says_when_its_rule_drops_the_derivative():
    """BacksolveAdjoint runs Heun's stages in equinox's checkpointed while_loop inside
    the solver loop, whose custom_jvp rule differentiates the stage loop from its inputs:
    a value inside it (stage 1 of step 3) gets a zero derivative. The slice's notes and
    g.grads say so (the rule's call is inside the solver loop's body, which they did not
    look into); forward mode differentiates the stages themselves."""

    def solve_with(adjoint):
        def solve(y0, theta):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, k: js.tag(-k * y + jnp.sin(t), "dy")),
                diffrax.Heun(), 0.0, 1.0, 0.1, y0, args=theta,
                saveat=diffrax.SaveAt(t1=True), max_steps=16, adjoint=adjoint,
            )  # fmt: skip
            return jnp.sum(sol.ys**2)

        return solve

    def by_hand(k1_at_3):  # Heun's steps written out, stage 1 of step 3 replaced
        y = Y0
        for step in range(10):
            t = jnp.float32(step * 0.1)
            k0 = -THETA * y + jnp.sin(t)
            k1 = -THETA * (y + 0.1 * k0) + jnp.sin(t + jnp.float32(0.1))
            y = y + 0.05 * (k0 + (k1_at_3 if step == 3 else k1))
        return jnp.sum(y**2)

    g = js.trace(solve_with(diffrax.BacksolveAdjoint()), Y0, THETA)
    s = g.slice("dy@3@1", "out")
    k1 = g.value("dy@3@1")
    allclose(s(k1), by_hand(k1), rtol=1e-5)  # the values are right
    assert any("ignores the tangent" in n for n in s.notes), s.notes
    allclose(jax.jvp(s, (k1,), (jnp.ones(2),))[1], jnp.zeros(()))  # what the rule gives
    with pytest.warns(UserWarning, match="ignores the tangent"):
        allclose(g.grads("out", ["dy@3@1"])["dy@3@1"], jnp.zeros(2))
    g = js.trace(solve_with(diffrax.ForwardMode()), Y0, THETA)
    s = g.slice("dy@3@1", "out")
    assert not any("ignores the tangent" in n for n in s.notes), s.notes
    k1, tangent = g.value("dy@3@1"), jnp.array([1.0, -2.0])
    allclose(jax.jvp(s, (k1,), (tangent,)), jax.jvp(by_hand, (k1,), (tangent,)), rtol=1e-5)


def test_values_at_each_stage_of_a_runge_kutta_step_are_named():
    """A Runge-Kutta step runs its stages in a while_loop inside the solver's loop: with
    a fixed number of stages (Heun's 2, counted from a literal) they are named
    ``dy@step@stage``; where the stage count depends on the step (Tsit5 reuses its first
    stage after an accepted step) selecting one says why it has no name."""
    import diffrax

    def field(t, y, args):
        dy = js.tag(jnp.tanh(args @ y) - 0.5 * y, "dy")
        return dy

    def f(t, y, w):
        return jnp.tanh(w @ y) - 0.5 * y

    def solve_with(solver):
        def solve(w, y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field), solver, 0.0, 1.0, 0.1, y0, args=w,
                saveat=diffrax.SaveAt(t1=True), max_steps=16, adjoint=diffrax.ForwardMode(),
            )  # fmt: skip
            return sol.ys

        return solve

    def heun_by_hand(w, y0, at=None, k=None):
        y, h = y0, 0.1
        for step in range(10):
            k0 = f(step * h, y, w)
            k1 = f(step * h + h, y + h * k0, w)
            k1 = k if step == at else k1
            y = y + h / 2 * (k0 + k1)
        return y[None]

    w, y0 = jnp.eye(4) * 0.5 + 0.1, jnp.linspace(-1.0, 1.0, 4)
    g = js.trace(solve_with(diffrax.Heun()), w, y0)
    assert len(g.select("dy@*@*")) == 20
    # (the note showed no name where the value is in a loop inside the folded one)
    assert any("name one iteration, e.g. 'dy@0@0'" in n for n in g.notes), g.notes
    y, h = y0, 0.1
    for step in range(10):
        k0, k1 = f(step * h, y, w), f(step * h + h, y + h * f(step * h, y, w), w)
        allclose(g.value(f"dy@{step}@0"), k0, rtol=1e-5, atol=1e-6)
        allclose(g.value(f"dy@{step}@1"), k1, rtol=1e-5, atol=1e-6)
        y = y + h / 2 * (k0 + k1)
    s = g.slice("dy@3@1", "out")
    k = g.value("dy@3@1")
    tangent = jnp.ones(4)
    allclose(jax.jit(s)(2 * k), heun_by_hand(w, y0, 3, 2 * k), rtol=1e-5)
    got = jax.jvp(s, (k,), (tangent,))[1]
    allclose(got, jax.jvp(lambda k: heun_by_hand(w, y0, 3, k), (k,), (tangent,))[1], rtol=1e-4)
    p = g.replace("dy@3@1", lambda k: k * 0)
    allclose(p.as_function()(w, y0), heun_by_hand(w, y0, 3, k * 0), rtol=1e-5)

    g = js.trace(solve_with(diffrax.Tsit5()), w, y0)
    with pytest.raises(js.SelectionError, match="the tag 'dy', which is inside a while_loop kept"):
        g.select("dy@3@1")
    with pytest.raises(js.SelectionError, match="'dy' names the tag 'dy', which is inside"):
        g["dy"]  # (the bare name said "no var named 'dy'; did you mean 'y0'?")
