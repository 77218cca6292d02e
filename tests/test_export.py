"""s.export(): a slice as serialized StableHLO that round-trips."""

import jax
import jax.numpy as jnp
import pytest
from conftest import allclose
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js


def test_exported_slice_round_trips():
    args = mlp_12782_args()
    g = js.trace(mlp_12782, *args)
    s = g.slice("z1", "z3")
    exported = s.export()
    assert isinstance(exported, jax.export.Exported)
    restored = jax.export.deserialize(exported.serialize())
    z1 = jnp.linspace(-1.0, 1.0, 4)
    allclose(restored.call(z1), s(z1))
    allclose(jax.jit(restored.call)(z1), s(z1))


def test_exporting_an_unbound_slice_is_an_error():
    specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mlp_12782_args()
    )
    s = js.trace(mlp_12782, *specs).slice("z1", "z2")
    with pytest.raises(js.SliceError, match="unbound"):
        s.export()
    allclose(
        jax.export.deserialize(s.bind(*mlp_12782_args()).export().serialize()).call(jnp.ones(4)),
        s.bind(*mlp_12782_args())(jnp.ones(4)),
    )


def test_a_slice_that_checks_its_path_exports_only_without_the_check():
    """A slice cut inside a cond branch checks on every call that its inputs take that
    branch, with a host callback jax.export cannot serialize: a SliceError, unless
    ``check=False`` exports it without the check."""

    def f(a):
        def br0(a):
            u = jnp.sin(a)
            return u * 2

        return jax.lax.cond(a.sum() > 0, br0, jnp.cos, a)

    a = jnp.array([0.3, 0.2])
    s = js.trace(f, a).slice("a", "br0/u")
    with pytest.raises(js.SliceError, match=r"jax\.export cannot serialize.*check=False"):
        s.export()
    restored = jax.export.deserialize(s.export(check=False).serialize())
    allclose(restored.call(2 * a), jnp.sin(2 * a))
    with pytest.raises(js.SliceError, match="these inputs take another path"):
        s(-a)  # the slice itself still checks
