"""Real models traced once per test session, for the picture tests (test_draw_models.py,
test_interactive.py, test_browser_view.py): each builder returns a Graph, cached."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from models import nnx_mlp_module, penzai_llama_config

import jaxsurgery as js

BLOCKS = 6


def random_like(shapes):
    """Random arrays (numpy's generator: no compiling) of the shapes of a pytree of
    ``jax.ShapeDtypeStruct`` (what ``jax.eval_shape`` of an init gives); integer leaves
    are zeros. Running a model's init op by op takes seconds; this, milliseconds."""
    rng = np.random.default_rng(0)

    def fill(s):
        if not isinstance(s, jax.ShapeDtypeStruct):
            return s
        if jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map(fill, shapes)


@functools.cache
def flax_transformer() -> js.Graph:
    """A Flax linen transformer: 6 blocks of attention and a relu MLP."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h)
            h = nn.relu(nn.Dense(32)(nn.LayerNorm()(x)))
            return x + nn.Dense(x.shape[-1])(h)

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(BLOCKS):
                x = Block()(x)
            return nn.Dense(4)(x)

    model = Transformer()
    x = jax.random.normal(jax.random.key(0), (1, 6, 8))
    variables = random_like(jax.eval_shape(model.init, jax.random.key(1), x))
    return js.trace(model.apply, variables, x)


@functools.cache
def equinox_transformer() -> js.Graph:
    """An Equinox transformer from eqx.nn.MultiheadAttention, MLP and LayerNorm: 6 blocks."""
    import equinox as eqx

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attention: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.ln1 = eqx.nn.LayerNorm(8)
            self.attention = eqx.nn.MultiheadAttention(num_heads=2, query_size=8, key=k1)
            self.ln2 = eqx.nn.LayerNorm(8)
            self.mlp = eqx.nn.MLP(8, 8, width_size=16, depth=1, key=k2)

        def __call__(self, x):
            h = jax.vmap(self.ln1)(x)
            x = x + self.attention(h, h, h)
            return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))

    class Transformer(eqx.Module):
        blocks: list

        def __init__(self, key):
            self.blocks = [Block(k) for k in jax.random.split(key, BLOCKS)]

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    def forward(model, x):
        return model(x)

    model = random_like(eqx.filter_eval_shape(Transformer, jax.random.key(0)))
    return js.trace(forward, model, jax.random.normal(jax.random.key(1), (5, 8)))


@functools.cache
def haiku_resnet50() -> js.Graph:
    """Haiku's ResNet50 at a 1x32x32x3 input, inference mode."""
    import haiku as hk

    forward = hk.transform_with_state(
        lambda x: hk.nets.ResNet50(num_classes=10)(x, is_training=False)
    )
    x = jnp.ones((1, 32, 32, 3))
    init = hk.transform_with_state(lambda x: hk.nets.ResNet50(num_classes=10)(x, is_training=True))
    params, state = random_like(jax.eval_shape(init.init, jax.random.key(0), x))
    return js.trace(forward.apply, params, state, None, x)


@functools.cache
def nnx_mlp() -> js.Graph:
    """A Flax NNX model: a list of Linear layers with relu."""
    from flax import nnx

    graphdef, state = nnx.split(nnx_mlp_module(BLOCKS))

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    return js.trace(forward, state, jax.random.normal(jax.random.key(2), (4, 3)))


@functools.cache
def penzai_transformer() -> js.Graph:
    """A penzai llama-like transformer with 2 decoder blocks."""
    from penzai import pz
    from penzai.models.transformer.variants import llamalike_common as llama

    config = penzai_llama_config()
    unbound, params = random_like(
        jax.eval_shape(
            lambda: pz.unbind_params(
                llama.build_llamalike_transformer(config, init_base_rng=jax.random.key(0)),
                freeze=True,
            )
        )
    )

    def logits(params, tokens):
        model = pz.bind_variables(unbound, params)
        positions = pz.nx.wrap(jnp.arange(tokens.shape[1])[None], "batch", "seq")
        out = model(pz.nx.wrap(tokens, "batch", "seq"), token_positions=positions)
        return out.unwrap("batch", "seq", "vocabulary")

    return js.trace(logits, params, jnp.asarray([[3, 1, 4, 1, 5, 9]]))


def chain(n: int) -> js.Graph:
    """A chain of ``2 n`` vars: ``x = sin(x) * 0.5`` n times, in the traced function itself."""

    def f(x):
        for _ in range(n):
            x = jnp.sin(x) * 0.5
        return x

    return js.trace(f, jnp.ones(2))


MODELS = {
    "flax": flax_transformer,
    "equinox": equinox_transformer,
    "haiku_resnet50": haiku_resnet50,
    "nnx": nnx_mlp,
    "penzai": penzai_transformer,
}


def picture(svg: str) -> str:
    """An SVG drawing with its page-unique id (an arrowhead's) fixed as a saved file has
    it, to compare two drawings of the same picture."""
    import re

    return re.sub(r"jsarrow[0-9a-f]+-\d+", "arrow", svg)  # (as Drawing.save writes it)
