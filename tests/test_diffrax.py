"""A diffrax ODE solve: adaptive Tsit5 steps (a while_loop whose trip count depends on the
state and the parameter), saved at given times. Slices from the initial state and from
the parameter to the saved states take the solve as a unit: they equal the solve for any
input, and their JVP equals ``jax.jvp`` of a hand-written function calling diffeqsolve."""

import jax
import jax.numpy as jnp
import pytest
from conftest import allclose
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
