"""A data- and tensor-parallel MLP on 8 simulated CPU devices, sliced (run by test_sharding).

Run as a script in a fresh process: the device count is fixed when JAX starts.
"""

import os

if __name__ == "__main__":  # only in its own process: pytest imports this file for doctests
    # (after the flags the tests run with: XLA_FLAGS set by conftest, inherited)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"  # the simulated devices, also where a GPU is

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxsurgery as js  # noqa: E402


def spec(*axes):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return NamedSharding(mesh, P(*axes))


@jax.jit
def mlp(x, w1, w2):
    h = jnp.tanh(x @ w1)
    h = jax.lax.with_sharding_constraint(h, spec("data", "model"))
    y = h @ w2
    y = jax.lax.with_sharding_constraint(y, spec("data", None))
    return y


def main():
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(8, 16)).astype(np.float32)
    w1_np = rng.normal(size=(16, 32)).astype(np.float32) / 4
    w2_np = rng.normal(size=(32, 8)).astype(np.float32) / 4
    x = jax.device_put(x_np, spec("data", None))
    w1 = jax.device_put(w1_np, spec(None, "model"))
    w2 = jax.device_put(w2_np, spec("model", None))
    g = js.trace(mlp, x, w1, w2)
    s = g.slice("h#1", "y#1")  # h and y are each bound twice: computed, then constrained
    kept = [e.primitive.name for e in s.jaxpr.eqns]
    assert "sharding_constraint" in kept, kept
    h = g.value("h#1")
    run = jax.jit(s, in_shardings=spec("data", "model"))
    out = run(jax.device_put(h, spec("data", "model")))
    assert len(out.sharding.device_set) == 8, out.sharding
    assert out.sharding.is_equivalent_to(spec("data", None), out.ndim), out.sharding
    h_np = np.tanh(x_np @ w1_np)
    np.testing.assert_allclose(np.asarray(out), h_np @ w2_np, rtol=1e-5, atol=1e-5)
    # the JVP of the sharded slice equals the unsharded one
    v = np.ones_like(h_np)
    _, t = jax.jit(lambda h, v: jax.jvp(s, (h,), (v,)))(jax.device_put(h, spec("data", "model")), v)
    np.testing.assert_allclose(np.asarray(t), v @ w2_np, rtol=1e-5, atol=1e-5)
    # bound to new sharded arguments inside jit: the whole input-to-output slice
    whole = g.slice("x", "y#1")
    assert sum(e.primitive.name == "sharding_constraint" for e in whole.jaxpr.eqns) == 2
    step = jax.jit(lambda x, w1, w2: whole.bind(x, w1, w2)(x))
    out2 = step(x, w1, w2)
    assert len(out2.sharding.device_set) == 8
    np.testing.assert_allclose(
        np.asarray(out2), np.tanh(x_np @ w1_np) @ w2_np, rtol=1e-5, atol=1e-5
    )
    # a shard_map'd layer stays one equation inside the slice, and runs on all devices
    mesh = spec().mesh

    def local(h, w):
        return jnp.tanh(h @ w) * 0.5  # a constant times a varying value: a pvary in it

    def with_shard_map(x, w1):
        a = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data", None), P(None, "model")),
            out_specs=P("data", "model"),
        )(x, w1)
        b = a * 2.0
        u = jnp.cos(x).sum()
        return b * u

    g2 = js.trace(with_shard_map, x, w1)
    s2 = g2.slice("x", "b")
    assert [e.primitive.name for e in s2.jaxpr.eqns] == ["shard_map", "mul"], s2.jaxpr
    out3 = jax.jit(s2)(x)
    np.testing.assert_allclose(np.asarray(out3), np.tanh(x_np @ w1_np), rtol=1e-5, atol=1e-5)
    # values and a slice whose context is the shard_map's result run it concretely (a
    # pvary of a constant failed under ensure_compile_time_eval)
    a_np = 0.5 * np.tanh(x_np @ w1_np)
    np.testing.assert_allclose(np.asarray(g2.value("a")), a_np, rtol=1e-5, atol=1e-5)
    s3 = g2.slice("u", "out")
    np.testing.assert_allclose(np.asarray(s3(3.0)), 6.0 * a_np, rtol=1e-5, atol=1e-5)
    explicit_grads(x_np, w1_np, w2_np)
    jit_options(x_np, w1_np)
    print("sharded slices ok:", kept, out.sharding.spec)


def jit_options(x_np, w1_np):
    """A jit's out_shardings are an option of its call: a jit called inside the traced
    function keeps them in as_function (which runs the call whole); js.trace of such a
    jit traces its body, and g.notes says that the functions it returns do not (hunt U)."""
    layer = jax.jit(lambda x, w: jnp.tanh(x @ w), out_shardings=spec("data", "model"))

    def f(x, w):
        h = layer(x, w)
        return h * 2

    x, w1 = jnp.asarray(x_np), jnp.asarray(w1_np)  # (on one device)
    out = js.trace(f, x, w1).as_function()(x, w1)
    assert out.sharding.is_equivalent_to(f(x, w1).sharding, 2), out.sharding
    assert len(out.sharding.device_set) == 8, out.sharding
    np.testing.assert_allclose(np.asarray(out), 2 * np.tanh(x_np @ w1_np), rtol=1e-5, atol=1e-5)
    g = js.trace(layer, x, w1)
    (note,) = [n for n in g.notes if "out_shardings" in n]
    assert "jax.jit(g.as_function(), out_shardings=...)" in note, note
    assert not any("shardings" in n for n in js.trace(f, x, w1).notes)


def explicit_grads(x_np, w1_np, w2_np):
    """Under an Explicit mesh a value's sharding is part of its type: g.grads keeps the
    gradients' shardings as jax.grad and the zero-perturbation trick do (they came back
    replicated: the zero perturbations were)."""
    mesh = jax.make_mesh((2, 4), ("d", "m"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)

    def f(x, w1, w2):
        h = jnp.tanh(x @ w1)
        return jnp.sum((jax.sharding.reshard(h, P("d", None)) @ w2) ** 2)

    with jax.set_mesh(mesh):
        x = jax.device_put(x_np, P("d", None))
        w1 = jax.device_put(w1_np, P(None, "m"))
        w2 = jax.device_put(w2_np, P(None, None))
        g = js.trace(f, x, w1, w2)

        def trick(eps):
            h = jnp.tanh(x @ w1) + eps
            return jnp.sum((jax.sharding.reshard(h, P("d", None)) @ w2) ** 2)

        want = {
            "w1": jax.grad(f, argnums=1)(x, w1, w2),
            "h": jax.grad(trick)(jnp.zeros((8, 32), out_sharding=P("d", "m"))),
        }
        for got in (
            g.grads("out", ["w1", "h"]),
            jax.jit(g.grads_fn("out", ["w1", "h"]))(x, w1, w2),
        ):
            for k, ref in want.items():
                assert got[k].sharding.spec == ref.sharding.spec, (k, got[k].sharding, ref.sharding)
                np.testing.assert_allclose(
                    np.asarray(got[k]), np.asarray(ref), rtol=1e-5, atol=1e-5
                )
        # values of two shardings stacked in one result: their gradients stack (a raw
        # ShardingTypeError came through once the zeros were typed)
        a = jax.device_put(x_np[:, :4], P("d", None))
        b = jax.device_put(x_np[:, :4], P(None, "m"))
        pair = js.trace(lambda a, b: jnp.sum(jnp.sin(a) * 3) + jnp.sum(jnp.sin(b) ** 2), a, b)
        stacked = pair.grads("out", {"ab": ["a", "b"]})["ab"]
        expected = np.stack([3 * np.cos(x_np[:, :4]), np.sin(2 * x_np[:, :4])])
        np.testing.assert_allclose(np.asarray(stacked), expected, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    main()
