"""``js.collect``: activations of 10k examples streamed to a Zarr store, read back equal to
``values_fn`` per batch, in bounded memory, resumable, and sharded over 8 devices."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr
from conftest import allclose, run_script

import jaxsurgery as js

BATCH, EXAMPLES, WIDTH = 500, 10_000, 256
LAYERS = "eqx.nn.MLP/eqx.nn.Linear#*"


@pytest.fixture(scope="module")
def setup():
    model = eqx.nn.MLP(16, 4, WIDTH, 2, activation=jax.nn.relu, key=jax.random.key(0))
    g = js.trace(lambda m, xs: jax.vmap(m)(xs), model, jnp.ones((BATCH, 16)))
    values = g.values_fn(LAYERS)
    return model, values


def batch(i):
    return jax.random.normal(jax.random.key(i), (BATCH, 16))


def dataset(live=None):
    """The batches, made lazily; ``live`` records the bytes of JAX arrays alive at each."""
    for i in range(EXAMPLES // BATCH):
        if live is not None:
            live.append(sum(a.nbytes for a in jax.live_arrays()))
        yield batch(i)


def by_hand(model, xs):
    """Each Linear layer's output (before its activation), written out."""
    outs, h = [], xs
    for k, layer in enumerate(model.layers):
        h = h @ layer.weight.T + layer.bias
        outs.append(h)
        if k < len(model.layers) - 1:
            h = jax.nn.relu(h)
    return outs


def test_collection_reads_back_equal_per_batch_in_bounded_memory(setup, tmp_path):
    model, values = setup
    live: list[int] = []
    store = js.collect(tmp_path / "acts.zarr", lambda xs: values(model, xs), dataset(live))
    keys = list(values(model, batch(0)))
    assert len(keys) == 3
    for key in keys:
        assert store[key].shape[0] == EXAMPLES
    for i in (0, 7, EXAMPLES // BATCH - 1):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        expected = values(model, batch(i))
        for k, key in enumerate(keys):
            allclose(store[key][rows], expected[key], rtol=1e-5, atol=1e-5)
            allclose(store[key][rows], by_hand(model, batch(i))[k], rtol=1e-4, atol=1e-4)
    # bounded memory: the outputs of all batches are 10k x (256 + 256 + 4) floats (~20 MB);
    # what is alive while batches are pulled stays within a few batches' worth
    one_batch = BATCH * (2 * WIDTH + 4) * 4
    assert EXAMPLES // BATCH * one_batch > 15 * one_batch
    assert max(live) - live[0] < 4 * one_batch, (max(live) - live[0]) / one_batch


class Interrupted(Exception):
    pass


def test_collection_resumes_after_an_interruption(setup, tmp_path):
    model, values = setup
    run = lambda xs: values(model, xs)  # noqa: E731
    path = tmp_path / "acts.zarr"

    def interrupted():
        for i in range(EXAMPLES // BATCH):
            if i == 7:
                raise Interrupted
            yield batch(i)

    with pytest.raises(Interrupted):
        js.collect(path, run, interrupted(), progress=False)
    done = zarr.open_group(str(path), mode="r").attrs["jaxsurgery"]
    # every batch computed before the interruption, the last one too (it was dropped)
    assert done["batches"] == 7 and done["rows"] == done["batches"] * BATCH
    # a batch interrupted while writing leaves rows in some arrays only
    key = done["keys"][0]
    zarr.open_group(str(path), mode="a")[key].append(np.zeros((3, WIDTH), np.float32))

    def resumed():  # the batches already written are skipped, not computed: None stands in
        for i in range(EXAMPLES // BATCH):
            yield None if i < done["batches"] else batch(i)

    store = js.collect(path, run, resumed(), progress=False)
    assert store.attrs["jaxsurgery"]["batches"] == EXAMPLES // BATCH
    fresh = js.collect(tmp_path / "fresh.zarr", run, dataset(), progress=False)
    for key in done["keys"]:
        assert store[key].shape == fresh[key].shape == (EXAMPLES, *store[key].shape[1:])
        np.testing.assert_array_equal(store[key][:], fresh[key][:])


def test_collection_errors_name_the_culprit(setup, tmp_path):
    model, values = setup
    with pytest.raises(js.SelectionError, match="no batch axis"):
        js.collect(tmp_path / "a.zarr", lambda xs: {"mean": xs.mean()}, [batch(0)])
    stacked = lambda xs: {"h": jnp.stack([xs, xs])}  # noqa: E731 (iterations first)
    with pytest.raises(js.SelectionError, match=r"stacking a loop's iterations.*moveaxis"):
        js.collect(tmp_path / "s.zarr", stacked, [batch(0)])
    js.collect(tmp_path / "b.zarr", lambda xs: {"x": xs}, [batch(0)])
    with pytest.raises(js.SelectionError, match="not the keys the store"):
        js.collect(tmp_path / "b.zarr", lambda xs: {"y": xs}, [batch(0), batch(1)])
    # the batches recorded only: every one skipped, nothing written (without a word)
    with pytest.warns(UserWarning, match=r"computed nothing: .* the 1 batch given as done .*'x'"):
        js.collect(tmp_path / "b.zarr", lambda xs: {"y": xs}, [batch(0)])
    for key in ("..", "", "a//b"):  # (Zarr's own ValueError, the group root, a rewritten path)
        with pytest.raises(js.SelectionError, match="no empty, '.' or '..' part"):
            js.collect(tmp_path / "p.zarr", lambda xs, k=key: {k: xs}, [batch(0)], resume=False)
    with pytest.raises(js.SelectionError, match="disagree on the batch size"):
        js.collect(tmp_path / "c.zarr", lambda b: {"x": b[0]}, [(batch(0), jnp.ones(3))])
    shapes = [jnp.ones((4, 2)), jnp.ones((4, 3))]  # (a raw Zarr ValueError before)
    with pytest.raises(js.SelectionError, match=r"`a` is float32\[3\] per example .* float32\[2\]"):
        js.collect(tmp_path / "d.zarr", lambda x: {"a": x}, shapes, progress=False)
    # another dtype: Zarr cast it silently (2.7 stored as 2 in an int array)
    dtypes = [jnp.arange(4, dtype=jnp.int32).reshape(4, 1), jnp.full((4, 1), 2.7)]
    with pytest.raises(js.SelectionError, match=r"`a` is float32\[1\] .* int32\[1\]"):
        js.collect(tmp_path / "e.zarr", lambda x: {"a": x * 1}, dtypes, progress=False)


def test_a_store_it_did_not_write_is_refused_not_replaced(tmp_path):
    """An array of the group js.collect did not make was replaced (create_array with
    overwrite): the user's rows were gone, without a word."""
    path = str(tmp_path / "mine.zarr")
    mine = zarr.open_group(path, mode="w")
    mine.create_array("h", shape=(3, 8), dtype="f4")[:] = np.arange(24.0).reshape(3, 8)
    with pytest.raises(js.SelectionError, match="holds 'h' already, and js.collect did not"):
        js.collect(path, lambda x: {"h": x * 2}, [jnp.ones((4, 8))] * 2, progress=False)
    np.testing.assert_array_equal(
        zarr.open_group(path, mode="r")["h"][:], np.arange(24.0).reshape(3, 8)
    )
    (tmp_path / "a_file").write_text("")
    for bad in (tmp_path / "a_file", tmp_path / "a_file" / "below.zarr"):  # (raw OSErrors)
        with pytest.raises(js.SelectionError, match="cannot open a Zarr store at"):
            js.collect(bad, lambda x: {"h": x}, [jnp.ones((4, 8))], progress=False)


def test_a_directory_of_other_files_is_refused_not_cleared(tmp_path):
    """resume=False opened the path with Zarr's mode "w", which deleted every file of a
    directory that was no store (the user's data, without a word); resume=True wrote a
    store among them. A Zarr group js.collect did not write is not cleared either."""
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    for resume in (False, True):
        for path in (mine, f"file://{mine}"):
            with pytest.raises(js.SelectionError, match=r"directory of other files \(importa"):
                js.collect(path, lambda x: {"h": x}, [jnp.ones((2, 3))], resume=resume)
    assert sorted(p.name for p in mine.iterdir()) == ["important.txt"]
    theirs = str(tmp_path / "theirs.zarr")
    zarr.open_group(theirs, mode="w").create_array("w", shape=(2,), dtype="f4")[:] = 7.0
    with pytest.raises(js.SelectionError, match="holds w that js.collect did not write"):
        js.collect(theirs, lambda x: {"h": x}, [jnp.ones((2, 3))], resume=False)
    np.testing.assert_array_equal(zarr.open_group(theirs, mode="r")["w"][:], [7.0, 7.0])
    # its own store, an empty directory: started over, collected
    ours, empty = tmp_path / "ours.zarr", tmp_path / "empty"
    empty.mkdir()
    for path in (ours, ours, empty):
        store = js.collect(path, lambda x: {"h": x}, [jnp.ones((2, 3))], resume=False)
        np.testing.assert_array_equal(store["h"][:], np.ones((2, 3)))


def test_a_run_interrupted_in_its_first_write_resumes(tmp_path, monkeypatch):
    """Interrupted while the first batch was appended (its arrays made, nothing recorded
    yet), the store was refused as one js.collect did not write."""
    path = str(tmp_path / "acts.zarr")
    batches = [jnp.full((4, 3), float(i)) for i in range(3)]
    fn = lambda x: {"a": x * 2, "b": x + 1}  # noqa: E731
    write = zarr.Array.__setitem__

    def interrupted(array, at, value):
        monkeypatch.setattr(zarr.Array, "__setitem__", write)  # once
        write(array, at, value)
        raise KeyboardInterrupt

    monkeypatch.setattr(zarr.Array, "__setitem__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        js.collect(path, fn, batches, progress=False)
    store = js.collect(path, fn, batches, progress=False)
    np.testing.assert_array_equal(store["a"][:], np.concatenate([b * 2 for b in batches]))
    np.testing.assert_array_equal(store["b"][:], np.concatenate([b + 1 for b in batches]))


def test_a_killed_run_leaves_rows_past_the_record_that_resuming_drops(tmp_path, monkeypatch):
    """Arrays grow ahead of the rows written (doubling) and are cut to them at the end; a
    run killed outright (no cut) leaves rows past the record, which the next call drops
    before it goes on: the store then equals one collected in one go."""
    from jaxsurgery import _collect

    path = str(tmp_path / "acts.zarr")
    batches = [jnp.full((4, 3), float(i)) for i in range(7)]
    fn = lambda x: {"a": x * 2}  # noqa: E731

    def killed():
        yield from batches[:5]
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_collect._Writer, "trim", lambda self: None)  # as if killed
        with pytest.raises(KeyboardInterrupt):
            js.collect(path, fn, killed(), progress=False)
    left = zarr.open_group(path, mode="r")
    assert left.attrs["jaxsurgery"]["rows"] == 20 and left["a"].shape[0] > 20
    store = js.collect(path, fn, batches, progress=False)
    assert store["a"].shape == (28, 3)
    np.testing.assert_array_equal(store["a"][:], np.concatenate([b * 2 for b in batches]))


def test_the_batch_before_a_failing_one_is_kept(tmp_path):
    """A batch the function refuses (a last smaller batch for a values_fn traced at 16
    rows) raises its error; the batch computed before it was dropped unwritten."""
    g = js.trace(lambda x: jnp.tanh(x), jnp.ones((16, 8)))
    values = g.values_fn(["out"])
    batches = [jnp.full((16, 8), float(k)) for k in range(4)] + [jnp.ones((10, 8))]
    path = tmp_path / "acts.zarr"
    with pytest.raises(js.SliceError):
        js.collect(path, values, batches, progress=False)
    store = zarr.open_group(str(path), mode="r")
    assert store.attrs["jaxsurgery"]["batches"] == 4 and store["out"].shape == (64, 8)
    allclose(store["out"][:], jnp.tanh(jnp.concatenate(batches[:4])))


def test_bfloat16_values_are_stored_as_float32_with_their_dtype_recorded(tmp_path):
    xs = jnp.arange(12.0).reshape(4, 3).astype(jnp.bfloat16)
    store = js.collect(tmp_path / "bf.zarr", lambda b: {"x": b * 2}, [xs, xs], progress=False)
    assert store["x"].dtype == np.float32 and store["x"].attrs["dtype"] == "bfloat16"
    allclose(store["x"][:4], np.asarray(xs, np.float32) * 2)


def test_keys_are_stored_as_their_key_data_with_their_dtype_recorded(tmp_path):
    """A batch of PRNG keys (per-example keys a sampler splits) is stored as its key
    data, from which ``wrap_key_data`` makes the same keys (it raised TypeError)."""

    def per_example(key, xs):
        keys = jax.random.split(key, xs.shape[0])
        return {"keys": keys, "noise": jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)}

    batches = [jnp.ones(4) * i for i in range(2)]
    store = js.collect(
        tmp_path / "keys.zarr",
        lambda xs: per_example(jax.random.key(1), xs),
        batches,
        progress=False,
    )
    assert store["keys"].attrs["dtype"] == str(jax.random.key(0).dtype)
    keys = jax.random.wrap_key_data(jnp.asarray(store["keys"][:4]))
    assert bool(
        jnp.all(
            jax.random.key_data(keys) == jax.random.key_data(jax.random.split(jax.random.key(1), 4))
        )
    )
    allclose(store["noise"][4:], per_example(jax.random.key(1), batches[1])["noise"])


def test_a_key_that_is_a_path_prefix_of_another_is_refused_before_writing(tmp_path):
    """Keys are Zarr paths: a scope's output and a value inside it cannot both be
    stored under their names (a raw Zarr ValueError); with keys of one's own they can."""
    xs = jnp.arange(12.0).reshape(4, 3)

    def f(x):
        h = jnp.sin(x)
        return (h * 2).sum(-1)

    g = js.trace(f, xs)
    clash = g.values_fn(["out", "h"])
    with pytest.raises(js.SelectionError, match="'a' cannot be both an array and the group"):
        js.collect(
            tmp_path / "c.zarr",
            lambda b: {"a": clash(b)["out"], "a/h": clash(b)["h"]},
            [xs],
            progress=False,
        )
    keyed = g.values_fn({"total": "out", "h": "h"})
    store = js.collect(tmp_path / "k.zarr", keyed, [xs, xs + 1.0], progress=False)
    allclose(store["total"][4:], f(xs + 1.0))
    allclose(store["h"][:4], jnp.sin(xs))


def test_collection_is_sharded_over_8_devices():
    run_script("sharded_collect.py", "sharded collection ok")
