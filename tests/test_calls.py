"""Calls keep their structure: custom rules survive unless the slice cuts inside."""

import jax
import jax.numpy as jnp
from conftest import allclose, check_slice

import jaxsurgery as js


def relu_net(x, w):
    a = x * w
    r = jax.nn.relu(a)
    out = r * 3.0
    return out


def test_relu_custom_jvp_survives_a_slice_through_it():
    x = jnp.array([-1.0, 0.0, 2.0])
    g = js.trace(relu_net, x, jnp.ones(3))
    s = g.slice("a", "out")
    assert "custom_jvp_call" in [e.primitive.name for e in s.jaxpr.eqns]
    assert s.notes == ()
    # the custom rule's derivative at 0 is 0; max(x, 0)'s own derivative at the tie is 0.5
    _, t = jax.jvp(s, (jnp.zeros(3),), (jnp.ones(3),))
    allclose(t, jnp.zeros(3))
    check_slice(s, (g.value("a"),), lambda a: jax.nn.relu(a) * 3.0)


@jax.custom_jvp
def softplus(x):
    e = jnp.exp(x)
    return jnp.log1p(e)


# a deliberately scaled rule, so a test can tell the rule from the primal body
softplus.defjvp(lambda p, t: (softplus(p[0]), 100.0 * t[0]))


def test_cutting_inside_a_custom_jvp_bypasses_the_rule_and_says_so():
    def f(x):
        a = x * 2.0
        b = softplus(a)
        return b

    g = js.trace(f, jnp.ones(3))
    kept = g.slice("a", "b")
    allclose(jax.jvp(kept, (g.value("a"),), (jnp.ones(3),))[1], 100.0 * jnp.ones(3))
    assert kept.notes == ()
    inner = g.select(primitive="exp").one()  # made inside the custom_jvp function
    s = g.slice(inner, "b")
    assert "custom_jvp_call" not in [e.primitive.name for e in s.jaxpr.eqns]
    assert any("custom_jvp_call" in n and "bypassed" in n for n in s.notes)
    e = g.value(inner)
    allclose(jax.jvp(s, (e,), (jnp.ones(3),))[1], 1.0 / (1.0 + e))


@jax.custom_vjp
def clipped_identity(x):
    return x


clipped_identity.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


def test_custom_vjp_rule_survives():
    def f(x):
        y = jnp.sin(x)
        z = clipped_identity(y)
        w = z * 10.0
        return w

    g = js.trace(f, jnp.ones(2))
    s = g.slice("y", "w")
    assert "custom_vjp_call" in [e.primitive.name for e in s.jaxpr.eqns]
    _, pullback = jax.vjp(s, g.value("y"))
    allclose(pullback(jnp.ones(2))[0], 0.1 * jnp.ones(2))  # the rule clipped 10 to 0.1


def test_jit_and_remat_calls_are_kept_whole_when_not_cut():
    @jax.jit
    def block(h):
        return jnp.tanh(h) * 2.0

    def f(x):
        a = x + 1.0
        b = block(a)
        c = jax.checkpoint(lambda t: jnp.sin(t) ** 2)(b)
        return c

    g = js.trace(f, jnp.ones(3))
    s = g.slice("a", "c")
    assert [e.primitive.name for e in s.jaxpr.eqns] == ["jit", "remat2"]
    check_slice(s, (g.value("a"),), lambda a: jnp.sin(jnp.tanh(a) * 2.0) ** 2, eqns=2)
    inner = g.select(primitive="tanh").one()
    cut = g.slice(inner, "c")  # starts inside the jit: the jit is inlined, remat kept
    assert [e.primitive.name for e in cut.jaxpr.eqns] == ["mul", "remat2"]
    assert cut.notes == ()
