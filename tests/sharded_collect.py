"""``js.collect``, ``patch_fn`` and ``attribution_fn`` over 8 simulated CPU devices (run by
test_collect in a fresh process).

Each batch is split over the devices along its first axis, a batch of a size the devices
do not divide runs whole (not padded: a value of the whole batch stays right), and the store
equals an unsharded run.
"""

import os

if __name__ == "__main__":  # only in its own process: pytest imports this file for doctests
    # (after the flags the tests run with: XLA_FLAGS set by conftest, inherited)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"  # the simulated devices, also where a GPU is

import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsurgery as js  # noqa: E402


def model(w, xs):
    h = jnp.tanh(xs @ w)
    return jnp.sin(h) @ w


def main():
    assert jax.device_count() == 8, jax.devices()
    w = jax.random.normal(jax.random.key(0), (6, 6))
    g = js.trace(model, w, jnp.ones((16, 6)))
    values = g.values_fn("h")
    seen = []

    def run(xs):
        jax.debug.inspect_array_sharding(xs, callback=seen.append)
        return values(w, xs)

    sizes = [16, 16]
    batches = [jax.random.normal(jax.random.key(i), (n, 6)) for i, n in enumerate(sizes)]
    scratch = tempfile.TemporaryDirectory()  # (removed at exit)
    path = scratch.name + "/acts.zarr"
    store = js.collect(path, run, batches, progress=False)
    assert store["h"].shape == (sum(sizes), 6), store["h"].shape
    expected = np.concatenate([np.tanh(np.asarray(b) @ np.asarray(w)) for b in batches])
    np.testing.assert_allclose(store["h"][:], expected, rtol=1e-5, atol=1e-5)
    assert seen and all(len(s.device_set) == 8 for s in seen), seen
    assert all(not s.is_fully_replicated for s in seen), seen
    # a values_fn traced with the batch size collected, which the devices do not divide:
    # such batches run whole, on every device
    twelve = js.trace(model, w, jnp.ones((12, 6))).values_fn("h")
    odd = [jax.random.normal(jax.random.key(i), (12, 6)) for i in range(3)]
    store = js.collect(scratch.name + "/odd.zarr", lambda x: twelve(w, x), odd, progress=False)
    expected = np.concatenate([np.tanh(np.asarray(b) @ np.asarray(w)) for b in odd])
    np.testing.assert_allclose(store["h"][:], expected, rtol=1e-5, atol=1e-5)
    # a value of the whole batch, for a last batch the devices do not divide: not padded
    # with copies of an example, which would change its mean
    centred = [jax.random.normal(jax.random.key(i), (n, 6)) for i, n in enumerate((16, 12))]
    store = js.collect(
        scratch.name + "/centred.zarr",
        lambda x: {"c": x - x.mean(0)},
        centred,
        progress=False,
    )
    expected = np.concatenate([np.asarray(b - b.mean(0)) for b in centred])
    np.testing.assert_allclose(store["c"][:], expected, rtol=1e-5, atol=1e-5)
    # patch_fn and attribution_fn on arguments sharded over the 8 devices
    from jax.sharding import NamedSharding, PartitionSpec

    split = NamedSharding(jax.make_mesh((8,), ("batch",)), PartitionSpec("batch"))
    xs, h = (jax.device_put(a, split) for a in (batches[0], jnp.ones((16, 6))))
    patched = jax.jit(g.patch_fn("h"))({"h": h}, w, xs)
    np.testing.assert_allclose(patched, np.sin(np.ones((16, 6))) @ np.asarray(w), rtol=1e-5)
    attribution = jax.jit(g.attribution_fn("out", "h"))((w, xs), (w, xs * 0))["h"]
    # by hand: (h_clean - h_corrupt) * d sum(sin(h) @ w)/dh at h_corrupt = tanh(0) = 0
    h_clean = np.tanh(np.asarray(batches[0]) @ np.asarray(w))
    np.testing.assert_allclose(attribution, h_clean * np.asarray(w).sum(1), rtol=1e-5, atol=1e-6)
    print("sharded collection ok")


if __name__ == "__main__":
    main()
