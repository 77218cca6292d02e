"""Pallas kernels (interpret mode, as on a CPU): values around and after them, conds they
decide and loops holding them. JAX lowers such a kernel by tracing its body again, which
eager constant folding (``jax.ensure_compile_time_eval``, how values are computed) broke:
``pl.program_id`` has no eager rule."""

import jax
import jax.numpy as jnp
from conftest import allclose, check_slice
from jax.experimental import pallas as pl

import jaxsurgery as js


def _kernel(x_ref, o_ref):
    o_ref[...] = jnp.tanh(x_ref[...]) + pl.program_id(0).astype(jnp.float32)


def gridded(x):
    """tanh(x) plus the row block's index (two blocks of two rows)."""
    block = pl.BlockSpec((2, 4), lambda i: (i, 0))
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return pl.pallas_call(
        _kernel, out_shape=shape, grid=(2,), in_specs=[block], out_specs=block, interpret=True
    )(x)


def by_hand(x):
    return jnp.tanh(x) + jnp.repeat(jnp.arange(2.0), 2)[:, None]


def test_values_after_a_gridded_kernel_and_slices_around_it():
    def f(x):
        a = jnp.sin(x)
        p = gridded(a)
        return (p * 2).sum()

    x = jnp.linspace(-1, 1, 16).reshape(4, 4)
    allclose(gridded(x), by_hand(x))
    g = js.trace(f, x)
    allclose(g.value("p"), by_hand(jnp.sin(x)))
    allclose(g.value("out"), f(x))
    allclose(g.as_function()(x + 1), f(x + 1))
    p = g.value("p")
    check_slice(g.slice("p", "out"), (p,), lambda p: (p * 2).sum())


def test_a_cond_a_kernel_decides_and_a_scan_holding_one():
    def decided(x):
        return jax.lax.cond(gridded(x).sum() > 0, jnp.sin, jnp.cos, x).sum()

    x = jnp.linspace(-1, 1, 16).reshape(4, 4)
    allclose(js.trace(decided, x).value("out"), decided(x))

    def rnn(xs):
        def step(h, x):
            p = gridded(h + x)
            return p * 0.5, p.sum()

        return jax.lax.scan(step, jnp.zeros((4, 4)), xs)[1].sum()

    xs = jnp.linspace(0, 1, 48).reshape(3, 4, 4)
    g = js.trace(rnn, xs)
    h1 = by_hand(xs[0]) * 0.5
    allclose(g.value("step/p@1"), by_hand(h1 + xs[1]))
    allclose(g.value("out"), rnn(xs))
    patched = g.replace("step/p@1", lambda p: p * 0.0)
    p2 = by_hand(0.0 + xs[2])
    allclose(patched.value("out"), by_hand(xs[0]).sum() + 0.0 + p2.sum())
