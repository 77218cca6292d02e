"""Small models used by several test files, each with its hand-made reference."""

import jax
import jax.numpy as jnp


def mlp_12782(x, params_1, params_2, params_3):
    z1 = jnp.tanh(jnp.dot(params_1[0], x) + params_1[1])
    z2 = jnp.tanh(jnp.dot(params_2[0], z1) + params_2[1])
    z3 = jnp.tanh(jnp.dot(params_3[0], z2) + params_3[1])
    return z3


def mlp_12782_args(key=None):
    key = jax.random.key(0) if key is None else key
    ks = jax.random.split(key, 7)
    x = jax.random.normal(ks[0], (3,))
    p1 = (jax.random.normal(ks[1], (4, 3)), jax.random.normal(ks[2], (4,)))
    p2 = (jax.random.normal(ks[3], (5, 4)), jax.random.normal(ks[4], (5,)))
    p3 = (jax.random.normal(ks[5], (2, 5)), jax.random.normal(ks[6], (2,)))
    return x, p1, p2, p3
