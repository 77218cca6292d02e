"""Graphs of programs on an Explicit mesh, a shard_map holding a scan, and a graph traced
after another one's gradients under a mesh, on 8 simulated CPU devices (run by
test_sharding).

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
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxsurgery as js  # noqa: E402

SHARD_MAP = getattr(jax, "shard_map", None)
if SHARD_MAP is None:  # jax 0.10
    from jax.experimental.shard_map import shard_map as SHARD_MAP  # noqa: N812


def total_sin(x):
    return jnp.sum(jnp.sin(x))


def halving(a):  # a few trips: unrolled in the index
    def body(s):
        i, v = s
        v2 = jnp.sin(v) + 0.1
        return i + 1, v2

    _, v = jax.lax.while_loop(lambda s: s[0] < 3, body, (0, a))
    return v.sum()


def branching(a):
    def yes(a):
        inner = jnp.sin(a) * 2
        return inner + 1

    return jax.lax.cond(a.sum() > 0, yes, jnp.cos, a).sum()


def scanned(a):
    def step(c, _):
        u = jnp.sin(c) + 0.1
        return u, None

    c, _ = jax.lax.scan(step, a, None, length=6)
    return c.sum()


def with_inputs(a, xs):
    def step(c, x):
        u = jnp.sin(c) + x
        return u, u * 2

    c, ys = jax.lax.scan(step, a, xs)
    return c.sum() + ys.sum()


def check_explicit_mesh():
    """Zeros made for a trip not run, another branch or the iterations not asked for
    have the type of the values they stand for (on an Explicit mesh their sharding is
    part of it): each of these raised a type error inside jaxsurgery."""
    mesh = jax.make_mesh((2, 4), ("d", "m"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        a = jax.device_put(np.linspace(0.1, 1.0, 256, dtype=np.float32).reshape(8, 32), P("d", "m"))
        v1 = jnp.sin(jnp.sin(a) + 0.1) + 0.1
        got = js.trace(halving, a).value("body/v2@1")
        np.testing.assert_allclose(got, v1, rtol=1e-6)
        assert got.sharding.spec == P("d", "m")
        values = jax.jit(js.trace(branching, a).values_fn(["yes/inner"]))(a)
        np.testing.assert_allclose(values["yes/inner"], jnp.sin(a) * 2, rtol=1e-6)
        grads = js.trace(scanned, a).grads("out", {"u": ["step/u@1", "step/u@3"]})["u"]

        def perturbed(e1, e3):
            c = a
            for t in range(6):
                c = jnp.sin(c) + 0.1 + (e1 if t == 1 else e3 if t == 3 else 0.0)
            return c.sum()

        zeros = jnp.zeros_like(a)
        want = jax.grad(perturbed, argnums=(0, 1))(zeros, zeros)
        np.testing.assert_allclose(grads, jnp.stack(want), rtol=1e-6)
        # a slice from an iteration: its step and the scan after it have the
        # iteration's sharding (the step's spec had none, and the parts differed)
        xs = jax.device_put(np.full((10, 8, 32), 0.01, np.float32), P(None, "d", "m"))
        g = js.trace(with_inputs, a, xs)
        u3 = g.value("step/u@3")

        def rest(u):  # step 3's output and steps 4.. by hand; steps 0..2's are context
            c = u
            total = sum(2 * g.value(f"step/u@{t}").sum() for t in range(3)) + 2 * u.sum()
            for _ in range(4, 10):
                c = jnp.sin(c) + 0.01
                total = total + 2 * c.sum()
            return c.sum() + total

        np.testing.assert_allclose(g.slice("step/u@3", "out")(u3), rest(u3), rtol=1e-5)
        # a replicated patch of a sharded value inside a cond branch takes its sharding
        # (the branches' types differed)
        patched = js.trace(branching, a).replace("yes/inner", jnp.zeros((8, 32)))
        np.testing.assert_allclose(patched.value("out"), 256.0)
        patch = js.trace(branching, a).patch_fn("yes/inner")
        np.testing.assert_allclose(patch({"yes/inner": jnp.zeros((8, 32))}, a), 256.0)
        swept = jax.vmap(lambda z: patch({"yes/inner": z}, a))(jnp.zeros((2, 8, 32)))
        np.testing.assert_allclose(swept, [256.0, 256.0])
        # the gradient of an add traced under this mesh is kept per mesh
        g = js.trace(total_sin, a)
        np.testing.assert_allclose(g.grads("out", ["x"])["x"], jnp.cos(a), rtol=1e-6)
    x = jnp.linspace(-1.0, 1.0, 256).reshape(8, 32)
    g = js.trace(total_sin, x)  # the same shapes, no mesh: it failed on the other's add
    np.testing.assert_allclose(g.grads("out", ["x"])["x"], jnp.cos(x), rtol=1e-6)


def check_shard_map_with_a_scan():
    """A value of a graph whose shard_map holds a scan: evaluated, its body was traced
    under ensure_compile_time_eval and failed ("pvary should be called under
    jax.shard_map"); a js.tag inside a shard_map gets a note, not a bare 'no var'."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def body(h, w):
        def step(c, _):
            c2 = jnp.tanh(c @ w)
            return c2, c2.sum()

        c_last, ys = jax.lax.scan(step, h, None, length=3)
        marked = js.tag(c_last, "last_step")
        return jax.lax.psum(marked, "data"), ys

    mapped = SHARD_MAP(body, mesh=mesh, in_specs=(P("data", None), P()), out_specs=(P(), P("data")))

    def f(x, w):
        a, ys = mapped(x, w)
        return a.sum() + ys.sum()

    x, w = np.ones((8, 16), np.float32), np.eye(16, dtype=np.float32) / 2
    g = js.trace(f, x, w)
    np.testing.assert_allclose(g.value("out"), f(x, w), rtol=1e-6)
    assert any("'last_step' tags a value inside a shard_map" in n for n in g.notes), g.notes
    # selecting them says why they select nothing (both were a bare "no var named")
    with pytest.raises(js.SelectionError, match="'last_step' names a value inside a shard_map"):
        g["last_step"]
    with pytest.raises(js.SelectionError, match="keeps each shard_map as one equation"):
        g["c2"]


def check_rewrite_names_occurrences_in_a_shard_map():
    """g.rewrite changes what the index lists; an occurrence inside a shard_map body (which
    the graph keeps as one equation) runs as it is and is named in a warning and the
    notes, as in an untaken cond branch (it was left out without a word)."""
    import warnings

    mesh = jax.make_mesh((8,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = dict(mesh=mesh, in_specs=(P("b", None), P()), out_specs=P("b", None))
    mapped = SHARD_MAP(lambda h, w: jnp.tanh(h @ w), **spec)

    def f(x, w):
        return jnp.sum(mapped(jnp.tanh(x @ w), w))

    def outer_only(x, w):  # what the rewrite promises: the mapped body's tanh as it was
        return jnp.sum(mapped(jax.nn.gelu(x @ w), w))

    x, w = jnp.linspace(-1, 1, 128).reshape(16, 8), jnp.eye(8) / 2
    g = js.trace(f, x, w)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = g.rewrite(jnp.tanh, jax.nn.gelu, jnp.ones((16, 8)))
    assert any("the body of the shard_map" in str(m.message) for m in caught), caught
    assert any("the body of the shard_map" in n for n in r.notes), r.notes
    np.testing.assert_allclose(r.value("out"), outer_only(x, w), rtol=1e-6)

    def only_inside(x, w):
        return jnp.sum(mapped(jnp.sin(x), w))

    try:
        js.trace(only_inside, x, w).rewrite(jnp.tanh, jax.nn.gelu, jnp.ones((2, 8)))
    except js.SliceError as e:
        assert "the body of the shard_map" in str(e), e
    else:
        raise AssertionError("a rewrite with every occurrence in a shard_map body passed")


def main():
    assert len(jax.devices()) == 8
    check_explicit_mesh()
    check_shard_map_with_a_scan()
    check_rewrite_names_occurrences_in_a_shard_map()
    print("meshes ok")


if __name__ == "__main__":
    main()
