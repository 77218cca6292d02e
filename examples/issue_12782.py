"""JAX issue 12782, "calculate jvp for intermediate variables in a function", solved
without rewriting the function.

Run: ``make demo``. Prints each quantity next to the reference computed the way the
issue's thread does it (the zero-tangent trick, or hand-written re-implementations)
and exits non-zero if any pair differs.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxsurgery as js


# -- case 1: the MLP from the issue ------------------------------------------------------
def f(x, params_1, params_2, params_3):
    z1 = jnp.tanh(jnp.dot(params_1[0], x) + params_1[1])
    z2 = jnp.tanh(jnp.dot(params_2[0], z1) + params_2[1])
    z3 = jnp.tanh(jnp.dot(params_3[0], z2) + params_3[1])
    return z3


def f_zero_tangent_trick(x, params_1, params_2, params_3, eps):
    """The thread's workaround: f rewritten with a perturbation input at z1."""
    z1 = jnp.tanh(jnp.dot(params_1[0], x) + params_1[1]) + eps
    z2 = jnp.tanh(jnp.dot(params_2[0], z1) + params_2[1])
    return z2


def make_params(key):
    ks = jax.random.split(key, 7)
    x = jax.random.normal(ks[0], (3,))
    p1 = (jax.random.normal(ks[1], (4, 3)), jax.random.normal(ks[2], (4,)))
    p2 = (jax.random.normal(ks[3], (5, 4)), jax.random.normal(ks[4], (5,)))
    p3 = (jax.random.normal(ks[5], (2, 5)), jax.random.normal(ks[6], (2,)))
    return x, p1, p2, p3


# -- case 2: g(x0) built from f1, f2, f3 (the thread's second post) ---------------------
def f1(x):
    return jnp.sin(x) * 0.5


def f2(x):
    return jnp.cumsum(x) * 0.3 + 0.1 * x**2


def f3(x):
    return jnp.tanh(x[::-1] * x + x)


def g(x0):
    x1 = f1(x0)
    x2 = f2(x1)
    x3 = f3(x2)
    return x3


def report(label, ours, reference):
    # a reference of zeros would make the check vacuous: it must be non-trivial too
    ok = np.allclose(ours, reference, rtol=1e-5, atol=1e-6) and bool(np.any(reference != 0))
    diff, size = np.max(np.abs(ours - reference)), np.max(np.abs(reference))
    print(f"  {'ok ' if ok else 'BAD'} {label}: max |diff| = {diff:.2e} (max |ref| = {size:.2f})")
    return ok


def main() -> int:
    x, p1, p2, p3 = make_params(jax.random.key(0))
    graph = js.trace(f, x, p1, p2, p3)
    print(graph)
    s = graph.slice("z1", "z2")
    print(s)
    z1 = graph.value("z1")
    v = jnp.arange(1.0, 5.0)
    z2, dz2 = jax.jvp(s, (z1,), (v,))
    _, reference = jax.jvp(
        lambda eps: f_zero_tangent_trick(x, p1, p2, p3, eps), (jnp.zeros(4),), (v,)
    )
    print("case 1: (dz2/dz1)·v for the issue's MLP")
    oks = [
        report("jax.jvp(g.slice('z1', 'z2'))  vs zero-tangent trick", dz2, reference),
        report(
            "jax.jit(jvp) of the slice      vs zero-tangent trick",
            jax.jit(lambda t: jax.jvp(s, (z1,), (t,))[1])(v),
            reference,
        ),
        report("slice value                    vs traced z2", z2, graph.value("z2")),
    ]

    x0 = jnp.array([1.0, 2.0, 4.0])
    h = js.trace(g, x0)
    x1, x2 = f1(x0), f2(f1(x0))
    print("case 2: Jacobians of 'the rest of the function' for g(x0) = f3(f2(f1(x0)))")
    oks += [
        report(
            "jacfwd(h.slice('x2', 'x3')) vs jacfwd(f3)",
            jax.jacfwd(h.slice("x2", "x3"))(x2),
            jax.jacfwd(f3)(x2),
        ),
        report(
            "jacfwd(h.slice('x1', 'x3')) vs jacfwd(f3∘f2)",
            jax.jacfwd(h.slice("x1", "x3"))(x1),
            jax.jacfwd(lambda a: f3(f2(a)))(x1),
        ),
        report(
            "jacfwd(h.slice('x0', 'x3')) vs jacfwd(g)",
            jax.jacfwd(h.slice("x0", "x3"))(x0),
            jax.jacfwd(g)(x0),
        ),
        report(
            "h.jacobian('x1', 'x2')      vs jacfwd(f2)", h.jacobian("x1", "x2"), jax.jacfwd(f2)(x1)
        ),
    ]
    print("all checks pass" if all(oks) else "SOME CHECKS FAILED")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
