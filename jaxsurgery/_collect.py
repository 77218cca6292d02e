"""Collecting activations over a dataset into a Zarr store, resumable and sharded.

``js.collect(path, fn, batches)`` runs ``fn`` (typically a :meth:`Graph.values_fn`
with the parameters bound) on every batch and appends each output along its first
axis to one array per key in a Zarr group at ``path``::

    values = g.values_fn("Block_*/out")
    store = js.collect("acts.zarr", lambda x: values(params, x), dataset)
    store["Block_0/out"][:1000]      # a zarr array: read any rows, no full load

Why Zarr: the arrays are chunked along the example axis and stored chunk by chunk, so
appending a batch writes new chunks and never rewrites the file; an interrupted run
leaves complete chunks behind (HDF5 keeps one file whose metadata an interrupted
writer can corrupt, and ``.npy`` cannot grow); and xarray, dask, tensorstore and
numpy-like readers open it in many languages. Zarr is the ``collect`` extra
(``pip install jaxsurgery[collect]``); it is imported only here.

What you can rely on:

* **Bounded memory.** Batches are pulled from the iterable one at a time. The next
  batch is dispatched to the devices before the previous one is copied to the host
  and written, so at most two batches of outputs are alive: the collection of a
  dataset much larger than memory runs in the memory of a few batches.
* **Resumable.** After every batch the group records how many batches and rows are
  complete (``store.attrs["jaxsurgery"]``); a call ended by an error or an interrupt
  writes the batch computed before it first. A store js.collect did not write is
  refused, not replaced, and so is a directory of other files (never cleared, nor
  written among); a store goes into a new or empty directory. Called again on the
  same path, ``collect``
  skips that many batches of the iterable (it must yield the same batches in the
  same order), drops rows a batch interrupted while writing left behind, and goes on.
  ``resume=False`` starts over. While it runs, the arrays grow ahead of the rows
  written (doubling their length: a Zarr ``append`` per key and batch rewrote the
  array's metadata each time) and are cut to them at the end, also of a run ended by
  an error; a process killed outright leaves rows past ``attrs["jaxsurgery"]["rows"]``
  that hold no data until the next call drops them.
* **Sharded.** Each batch is placed over the devices (``devices=``, default all of
  them) with ``NamedSharding(Mesh(devices, ("batch",)), P("batch"))`` on every
  leaf, and ``fn`` runs under ``jax.jit``, so XLA splits the work data-parallel.
  A batch whose size does not divide the number of devices runs whole, on every
  device (not padded: copies of an example would change what a function of the
  whole batch computes, and could meet the one batch size a ``values_fn`` was traced
  for, which then raises its ``SliceError`` as it does on one device).
* Every output must be computed per example (leading axis = batch size). A
  ``values_fn`` key that stacks a loop's iterations (``{"h": "step/h@*"}``) has them on
  its first axis, the batch second: put the batch first (``jnp.moveaxis(v, 0, 1)`` in
  ``fn``), or select the iterations as one key each (``"step/h@*"``); where the loop's
  length equals the batch size nothing can tell the two apart. Dtypes
  Zarr cannot store (``bfloat16``, ``float8``) are written as ``float32``, and PRNG
  keys as their key data (``jax.random.key_data``: ``jax.random.wrap_key_data`` makes
  keys of it again); the original dtype is recorded in the array's attributes.

A progress line (on stderr, past about two seconds: :mod:`jaxsurgery._progress`)
counts examples and batches; ``progress=False`` silences it.

Example:
    >>> import tempfile, jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     h = jnp.tanh(x)
    ...     return jnp.sin(h).sum()
    >>> g = js.trace(f, jnp.ones((4, 3)))
    >>> values = g.values_fn("h")
    >>> batches = (jnp.full((4, 3), float(i)) for i in range(5))
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = folder.name + "/acts.zarr"
    >>> store = js.collect(path, values, batches, progress=False)
    >>> store["h"].shape
    (20, 3)
    >>> bool((store["h"][4:8] == jnp.tanh(1.0)).all())
    True
    >>> folder.cleanup()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from . import _progress
from ._errors import SelectionError, short_list, warn

_STATE = "jaxsurgery"  # the group attribute that records what is complete


def collect(
    path: str | os.PathLike,
    fn: Callable[[Any], Mapping[str, Any]],
    batches: Iterable[Any],
    *,
    resume: bool = True,
    devices: list[Any] | None = None,
    progress: bool = True,
) -> Any:
    """Append ``fn(batch)`` for every batch to a Zarr group at ``path``; return the group.

    Args:
        path: a directory for the Zarr store (created when missing).
        fn: ``batch -> {key: array}``, each array with the batch size as its first
            axis; run under ``jax.jit``. Usually a ``values_fn`` with parameters
            bound: ``lambda x: values(params, x)``.
        batches: an iterable of batches, each a pytree of arrays whose leaves share
            the leading batch axis. Read lazily, one batch at a time.
        resume: go on from the batches a previous call recorded as complete (the
            iterable must yield the same batches); ``False`` starts over.
        devices: the devices to shard each batch over (default: ``jax.devices()``).
        progress: show a progress line on stderr for long collections.

    Returns:
        The ``zarr.Group``: ``group[key]`` is a Zarr array of all rows so far.
    """
    zarr = _import_zarr()
    writer = _Writer(zarr, path, resume)
    run = jax.jit(fn)
    place = _Placement(devices or jax.devices())
    total = _length(batches)
    pending: tuple[Any, int] | None = None
    shown = None if progress else False
    with _progress.progress(f"collecting into {path}", total, enabled=shown) as bar:
        try:
            for i, batch in enumerate(batches):
                if i < writer.batches_done:
                    continue  # done by an earlier call
                args, size = place(batch)
                outs = run(args)  # dispatched: runs while the previous batch is written
                _check_outputs(outs)
                if pending is not None:
                    done, pending = pending, None
                    writer.write(*done)
                    bar.update(writer.batches_done, phase=f"{writer.rows} examples, batch")
                pending = (outs, size)
            if pending is not None:
                done, pending = pending, None
                writer.write(*done)
        except BaseException:
            # the next batch failed (its fn, the loader, an interrupt): the one computed
            # before it is kept, as is the record of what is complete
            with contextlib.suppress(Exception):
                if pending is not None:
                    writer.write(*pending)
            with contextlib.suppress(Exception):
                writer.trim()
            raise
        writer.trim()
        if writer.computed == 0 and writer.batches_done:
            # (another function's store: its keys were not checked)
            n = writer.batches_done
            warn(
                f"js.collect computed nothing: the store at {path} records the "
                f"{n} batch{'es' if n != 1 else ''} given as done by an earlier call (keys "
                f"{short_list([repr(k) for k in writer.keys or []])}); to collect another "
                "function or dataset, give a new path or resume=False"
            )
    return writer.group


def _import_zarr() -> Any:
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dev dependency
        raise ImportError(
            "js.collect writes Zarr stores: `pip install jaxsurgery[collect]` (or `zarr>=3`)"
        ) from None
    return zarr


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Placement:
    """Puts a batch on the devices, split along its first axis."""

    def __init__(self, devices: list[Any]):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.count = len(devices)
        mesh = Mesh(np.asarray(devices), ("batch",))
        self.split = NamedSharding(mesh, PartitionSpec("batch"))
        self.whole = NamedSharding(mesh, PartitionSpec())

    def __call__(self, batch: Any) -> tuple[Any, int]:
        """The placed batch and its size. A batch the devices do not divide runs whole
        on every device: padded with copies of an example, it would change what a
        function of the whole batch computes (``h - h.mean(0)``), and could meet the
        one batch size a ``values_fn`` was traced for."""
        leaves = [x for x in jax.tree_util.tree_leaves(batch) if np.ndim(x) > 0]
        sizes = {np.shape(x)[0] for x in leaves}
        if len(sizes) != 1:
            raise SelectionError(
                f"a batch's arrays disagree on the batch size (leading axes {sorted(sizes)}): "
                "every leaf of a batch needs the examples on its first axis"
            )
        (size,) = sizes
        split = not size % self.count

        def put(x: Any) -> Any:
            return jax.device_put(x, self.split if split and np.ndim(x) else self.whole)

        return jax.tree_util.tree_map(put, batch), size


def _check_outputs(outs: Any) -> None:
    """A SelectionError unless ``outs`` is a flat dict of arrays."""
    if not isinstance(outs, Mapping):
        raise SelectionError(
            f"fn returned {type(outs).__name__}; js.collect needs a dict {{key: "
            "array} per batch (a values_fn's result, or {'h': h} of your own)"
        )
    for key, value in outs.items():
        if not isinstance(value, jax.Array):
            raise SelectionError(
                f"fn returned {type(value).__name__} at {key!r}; js.collect needs a "
                "flat dict {key: array} per batch (one array per stored key: name "
                "the leaves of a nested value, {'a/b': b})"
            )


def _refuse_what_is_not_ours(zarr: Any, path: str, resume: bool) -> None:
    """Refuse a directory of other files (Zarr's ``mode="w"`` of ``resume=False``
    deleted them, and ``mode="a"`` wrote a store among them), and, for ``resume=False``,
    a Zarr group js.collect did not write that holds something (deleted too)."""
    local = path.removeprefix("file://")  # (Zarr's mode "w" clears a file:// URL too)
    if "://" in local or not os.path.isdir(local) or not os.listdir(local):
        return  # a new or empty directory, a file (refused when opened), a remote store
    path = local
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001 (no Zarr group there: a directory of other files)
        group = None
    if group is None:
        listed = short_list(sorted(os.listdir(path)), 3)
        raise SelectionError(
            f"{path!r} is a directory of other files ({listed}), not a Zarr store: "
            "js.collect writes its store into a new or empty directory (it would "
            f"{'delete them' if not resume else 'write among them'}); give another path"
        )
    held = sorted(group.keys())
    if not resume and _STATE not in group.attrs and (held or dict(group.attrs)):
        raise SelectionError(
            f"the Zarr group at {path!r} holds {short_list(held, 3) or 'attributes'} that "
            "js.collect did not write, and resume=False would delete them: collect to a "
            "new path"
        )


class _Writer:
    """The Zarr group, one growing array per key, and the record of completed batches."""

    def __init__(self, zarr: Any, path: str | os.PathLike, resume: bool):
        _refuse_what_is_not_ours(zarr, str(path), resume)
        try:
            self.group = zarr.open_group(str(path), mode="a" if resume else "w")
        except (OSError, ValueError) as e:
            raise SelectionError(
                f"js.collect cannot open a Zarr store at {str(path)!r} ({type(e).__name__}: "
                f"{e}): give the path of a directory, made when missing with its parents"
            ) from None
        state = dict(self.group.attrs.get(_STATE, {})) if resume else {}
        self.batches_done = int(state.get("batches", 0))
        self.rows = int(state.get("rows", 0))
        self.keys: list[str] | None = state.get("keys")
        self.computed = 0  # batches written by this call
        #: the arrays, opened once (reopened per batch: 12 store reads a key a batch)
        self.arrays: dict[str, Any] = {}
        self.trim()  # drop rows an interrupted batch, or a killed run's growth, left behind

    def write(self, outs: Mapping[str, Any], size: int) -> None:
        host = {key: _host(key, value, size) for key, value in outs.items()}
        if self.keys is None:
            _check_paths(list(host))
            found = [key for key in host if key in self.group]
            if found:  # (not a store of this function's: create_array would replace it)
                raise SelectionError(
                    f"the Zarr group at {self.group.store} holds {found[0]!r} already, and "
                    "js.collect did not write it: collect to a new path (resume=False "
                    "starts over, deleting what the group holds)"
                )
            self.keys = list(host)
            for key, value in host.items():
                self._create(key, value, outs[key].dtype)
            self._record()  # (the arrays are this store's: a run interrupted now resumes)
        else:
            self.check_keys(host)
        for key, value in host.items():
            array = self._array(key)
            if value.shape[1:] != array.shape[1:] or value.dtype != array.dtype:
                raise SelectionError(
                    f"`{key}` is {value.dtype}{list(value.shape[1:])} per example in this "
                    f"batch, and {array.dtype}{list(array.shape[1:])} in the store at "
                    f"{self.group.store}: every batch must give each key the same shape "
                    "and dtype per example (Zarr would cast it; pad or cast it yourself, "
                    "or collect to a new path; resume=False starts over)"
                )
        for key, value in host.items():
            array = self._array(key)
            if array.shape[0] < self.rows + size:  # (grown ahead: see trim)
                array.resize((max(self.rows + size, 2 * array.shape[0]), *array.shape[1:]))
            array[self.rows : self.rows + size] = value
        self.rows += size
        self.batches_done += 1
        self.computed += 1
        self._record()

    def trim(self) -> None:
        """Cut every array to the rows written. Arrays grow ahead of them, doubling:
        Zarr's ``append`` rewrote an array's metadata at every batch, most of the cost of
        a key a batch (1 000 keys: about 5 s a batch)."""
        for key in self.keys or []:
            array = self._array(key)
            if array.shape[0] != self.rows:
                array.resize((self.rows, *array.shape[1:]))

    def _record(self) -> None:
        """Record the batches complete (``store.attrs["jaxsurgery"]``)."""
        self.group.attrs[_STATE] = {
            "batches": self.batches_done,
            "rows": self.rows,
            "keys": self.keys,
        }

    def check_keys(self, outs: Mapping[str, Any]) -> None:
        """A SelectionError where a batch's outputs are not the keys the store holds."""
        if sorted(outs) != sorted(self.keys or []):
            raise SelectionError(
                f"this batch's outputs {sorted(outs)} are not the keys the store at "
                f"{self.group.store} holds ({sorted(self.keys)}): collect to a new path, "
                "or pass resume=False to start over"
            )

    def _array(self, key: str) -> Any:
        if key not in self.arrays:
            self.arrays[key] = self.group[key]
        return self.arrays[key]

    def _create(self, key: str, value: np.ndarray, dtype: Any) -> None:
        array = self.arrays[key] = self.group.create_array(
            key,
            shape=(0, *value.shape[1:]),
            chunks=(max(len(value), 1), *value.shape[1:]),
            dtype=value.dtype,
            overwrite=True,
        )
        array.attrs["dtype"] = str(dtype)  # the computed dtype, when stored otherwise


def _check_paths(keys: list[str]) -> None:
    """Zarr stores ``a/b`` as array ``b`` in group ``a``: no key may be a path prefix of
    another (a scope's output ``mlp`` and a value inside it, ``mlp/linear_0``), nor have
    an empty, ``.`` or ``..`` part (the group itself, or a path Zarr rewrites)."""
    for key in keys:
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise SelectionError(
                f"output {key!r}: Zarr stores a key with '/' as a path, which has no empty, "
                "'.' or '..' part; give it another key"
            )
        inside = next((k for k in keys if k.split("/")[: len(parts)] == parts and k != key), None)
        if inside is not None:
            raise SelectionError(
                f"outputs {key!r} and {inside!r}: Zarr stores a key with '/' as a path, so "
                f"{key!r} cannot be both an array and the group holding {inside!r}; give "
                "them other keys, e.g. g.values_fn({'mlp_out': 'mlp', 'linear_0': "
                "'mlp/linear_0'})"
            )


def _host(key: str, value: Any, size: int) -> np.ndarray:
    """An output of a batch of ``size`` examples on the host, in a dtype Zarr stores."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended):  # keys: their data
        value = jax.random.key_data(value)
    dtype = np.dtype(value.dtype)
    if np.ndim(value) == 0 or np.shape(value)[0] != size:
        raise SelectionError(
            f"`{key}` has shape {np.shape(value)}, with no batch axis of size {size}: "
            "collect values computed per example (a batch-wide value, such as a "
            "parameter or a mean over the batch, is one array: use g.value for it; a "
            'values_fn key stacking a loop\'s iterations, {"h": "step/h@*"}, has them '
            "first: put the batch first, jnp.moveaxis(v, 0, 1), or select them as one "
            'key each, "step/h@*")'
        )
    value = np.asarray(value)
    if dtype.kind == "V" or dtype.name.startswith(("bfloat", "float8", "float4")):
        value = value.astype(np.float32)  # Zarr has no bfloat16 / float8
    return value
