"""Real models, built the way each library's examples build them: names and slices.

Each test selects module outputs by readable names (documented in the README) and
compares slices between them with a hand-written reference made from the library's
own sub-modules (the zero-tangent semantics: everything else held fixed).
"""

import functools
import sys

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from conftest import allclose, check_slice
from flax import nnx
from flax.core import scope as flax_scope
from haiku._src import base as hk_base
from jax.example_libraries import stax
from models import nnx_mlp_module

import jaxsurgery as js

RTOL = 2e-4


# -- Flax linen: a CNN with BatchNorm (eval mode) and a dense head ------------------------------
class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=8, kernel_size=(3, 3))(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=16)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


def test_flax_linen_cnn_module_outputs_and_slices(key):
    model = CNN()
    x = jax.random.normal(key, (2, 8, 8, 1))
    variables = model.init(jax.random.key(1), x)
    # make the BatchNorm statistics non-trivial, as after training
    stats = jax.tree_util.tree_map(lambda s: s + 0.3, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    g = js.trace(model.apply, variables, x)
    params = variables["params"]

    dense0 = g["CNN/Dense_0"]
    assert dense0.shape == (2, 16) and dense0.primitive == "add"
    assert g["CNN/Conv_0"].shape == (2, 8, 8, 8)
    assert g["CNN/BatchNorm_0"].shape == (2, 8, 8, 8)
    allclose(g.value("CNN/Dense_1"), model.apply(variables, x), rtol=RTOL)

    def head(h):  # Dense_0 output -> logits, by hand from the library's modules
        return nn.Dense(10).apply({"params": params["Dense_1"]}, nn.relu(h))

    s = g.slice("CNN/Dense_0", "CNN/Dense_1")
    check_slice(s, (g.value(dense0),), head)
    allclose(jax.jacfwd(s)(g.value(dense0)), jax.jacfwd(head)(g.value(dense0)), rtol=RTOL)

    def body(c):  # Conv output -> Dense_0 output: BatchNorm with running stats, pool, dense
        h = nn.BatchNorm(use_running_average=True).apply(
            {"params": params["BatchNorm_0"], "batch_stats": stats["BatchNorm_0"]}, c
        )
        h = nn.avg_pool(nn.relu(h), window_shape=(2, 2), strides=(2, 2))
        return nn.Dense(16).apply({"params": params["Dense_0"]}, h.reshape((h.shape[0], -1)))

    s2 = g.slice("CNN/Conv_0", "CNN/Dense_0")
    conv = g.value("CNN/Conv_0")
    allclose(s2(conv), body(conv), rtol=RTOL)
    v = jax.random.normal(key, conv.shape)
    allclose(jax.jvp(s2, (conv,), (v,))[1], jax.jvp(body, (conv,), (v,))[1], rtol=RTOL)
    inside = g.select("CNN/Conv_0/*")
    assert g["CNN/Conv_0"] in inside and {v.scope for v in inside} == {"CNN/Conv_0"}


# -- Flax linen: blocks ending in relu, traced inside a training step -----------------------------
class ReluBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(8)(x))


class ReluMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = ReluBlock()(x)
        h = ReluBlock()(h)
        return nn.Dense(1)(h)


def test_a_linen_block_under_grad_is_its_value_not_also_its_relu_mask(key):
    """Under jax.grad, a block ending in relu has a second value read outside it: relu's
    mask (x > 0), which the backward pass keeps. The block's name is its value alone."""
    model, x = ReluMLP(), jax.random.normal(key, (4, 3))
    params = model.init(jax.random.key(1), x)

    def step(params, x):
        return jax.value_and_grad(lambda p: (model.apply(p, x) ** 2).mean())(params)

    g = js.trace(step, params, x)
    block0 = params["params"]["ReluBlock_0"]
    h0 = ReluBlock().apply({"params": block0}, x)
    h1 = ReluBlock().apply({"params": params["params"]["ReluBlock_1"]}, h0)
    allclose(g.value("ReluMLP/ReluBlock_0"), h0)
    allclose(g.value("ReluMLP/ReluBlock_1"), h1)
    assert g["ReluMLP/ReluBlock_1"].dtype == jnp.float32  # not the bool mask
    # the backward instance keeps its own outputs
    assert g.select("grad(ReluMLP)/ReluBlock_1")

    def rest(h):  # block 1 and the head, by hand
        head = params["params"]["Dense_0"]
        h = ReluBlock().apply({"params": params["params"]["ReluBlock_1"]}, h)
        return nn.Dense(1).apply({"params": head}, h)

    s = g.slice("ReluMLP/ReluBlock_0", "ReluMLP/Dense_0")
    check_slice(s, (h0,), rest)


# -- Flax linen: a pre-norm transformer block ------------------------------------------------------
class TransformerBlock(nn.Module):
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        x = x + h
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * x.shape[-1])(h)
        h = nn.gelu(h)
        h = nn.Dense(x.shape[-1])(h)
        return x + h


def test_flax_linen_transformer_block_from_attention_to_block_output(key):
    model = TransformerBlock()
    x = jax.random.normal(key, (2, 5, 8))
    variables = jax.jit(model.init)(jax.random.key(1), x)  # (jitted: faster than eagerly)
    p = variables["params"]
    g = js.trace(model.apply, variables, x)
    attn = g["TransformerBlock/MultiHeadDotProductAttention_0"]
    assert attn.shape == (2, 5, 8)
    assert g["TransformerBlock/Dense_1"].shape == (2, 5, 8)
    out = g.outputs[0]

    def rest(a):  # attention output -> block output; the residual input x is context
        x1 = x + a
        h = nn.LayerNorm().apply({"params": p["LayerNorm_1"]}, x1)
        h = nn.Dense(32).apply({"params": p["Dense_0"]}, h)
        h = nn.Dense(8).apply({"params": p["Dense_1"]}, nn.gelu(h))
        return x1 + h

    s = g.slice(attn, out)
    assert "args[0]" in s.context  # model.apply(variables, *args): x is args[0]
    a = g.value(attn)
    rest = jax.jit(rest)  # (the reference under jit: eagerly, each operation compiles)
    check_slice(s, (a,), rest)
    allclose(
        g.jvp(attn, out, jnp.ones_like(a))[1],
        jax.jvp(rest, (a,), (jnp.ones_like(a),))[1],
        rtol=RTOL,
    )


# -- Flax NNX: an MLP with a list of layers -----------------------------------------------------
def test_flax_nnx_layers_are_named_by_attribute_path(key):
    model = nnx_mlp_module(3)
    graphdef, state = nnx.split(model)

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        return model(x)

    x = jax.random.normal(key, (4, 3))
    g = js.trace(forward, state, x)
    assert g["model/l1"].shape == (4, 8)
    assert [g[f"model/layers[{k}]"].primitive for k in range(3)] == ["add"] * 3
    assert g["model/head"] is g.outputs[0]
    layers = model.layers

    def rest(h):  # layers[1] output -> head output
        h = layers[2](nnx.relu(h))
        return model.head(nnx.relu(h))

    s = g.slice("model/layers[1]", "model/head")
    h = g.value("model/layers[1]")
    check_slice(s, (h,), rest)


# -- Flax NNX: the library's own modules, called by another of them -------------------------------
class NNXAttentionBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
        self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        h = self.attn(x)
        return self.lin(h) + x


class NNXAttentionNet(nnx.Module):
    def __init__(self, rngs):
        self.b1, self.b2 = NNXAttentionBlock(rngs), NNXAttentionBlock(rngs)

    def __call__(self, x):
        return self.b2(self.b1(x)).sum()


def test_nnx_library_modules_inside_library_modules_are_named_by_attribute_path(key):
    # nnx.MultiHeadAttention calls its projections (self.query...): library code, which
    # is not rewritten; they run in frames named by their paths, `m/b2/attn/query`
    m = NNXAttentionNet(nnx.Rngs(0))
    x = jax.random.normal(key, (1, 5, 8))
    g = js.trace(lambda m, x: m(x), m, x)
    h1 = m.b1(x)
    for block, inp in (("b1", x), ("b2", h1)):
        attn = getattr(m, block).attn
        for proj in ("query", "key", "value"):
            allclose(g.value(f"m/{block}/attn/{proj}"), getattr(attn, proj)(inp), rtol=RTOL)
        assert g[f"m/{block}/attn/out"] is g[f"m/{block}/attn"]
    assert "m/b1/attn/query/query" not in g.names()
    attn = m.b2.attn
    q, k = attn.query(h1), attn.key(h1)

    def rest(v):  # the value projection of b2 -> the attention's output, q and k held
        return attn.out(nnx.dot_product_attention(q, k, v))

    v = g.value("m/b2/attn/value")
    allclose(rest(v), g.value("m/b2/attn"), rtol=RTOL)
    check_slice(g.slice("m/b2/attn/value", "m/b2/attn"), (v,), rest)


# -- Equinox: eqx.nn.MLP ------------------------------------------------------------------------------
def test_equinox_mlp_layers_by_scope(key):
    mlp = eqx.nn.MLP(in_size=3, out_size=2, width_size=8, depth=3, key=key)

    def forward(model, x):
        return model(x)

    x = jnp.array([0.5, -1.0, 2.0])
    g = js.trace(forward, mlp, x)  # the activation functions are held static
    names = [f"eqx.nn.MLP/eqx.nn.Linear#{k}" for k in range(4)]
    assert [g[n].shape for n in names] == [(8,), (8,), (8,), (2,)]
    assert g["model"] is g.outputs[0] is g[names[-1]]
    layers = mlp.layers

    def rest(h):  # layer 1 output -> output
        h = layers[2](jax.nn.relu(h))
        return layers[3](jax.nn.relu(h))

    s = g.slice(names[1], names[3])
    check_slice(s, (g.value(names[1]),), rest)


def test_equinox_backward_layers_are_numbered_as_the_forward_ones(key):
    """The backward pass runs the layers last to first; ``grad(eqx.nn.MLP)/eqx.nn.Linear#k``
    is still layer k's (its weight gradient among its outputs)."""
    mlp = eqx.nn.MLP(in_size=3, out_size=2, width_size=4, depth=2, key=key)
    x = jnp.array([0.5, -1.0, 2.0])

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    g = js.trace(lambda m, x: eqx.filter_grad(loss)(m, x), mlp, x)
    grads = eqx.filter_grad(loss)(mlp, x)
    for k, layer in enumerate(grads.layers):
        outs = g.select(f"grad(eqx.nn.MLP)/eqx.nn.Linear#{k}")
        (weight,) = [v for v in outs if v.shape == layer.weight.shape]
        allclose(g.value(weight), layer.weight, rtol=1e-5)


def test_equinox_modules_as_given_hold_their_flags_and_hyperparameters_static(key):
    # eqx.nn.MultiheadAttention holds eqx.nn.Dropout(inference=True) and Python ints:
    # traced, `if inference` would fail; as equinox.filter_jit, only arrays are traced
    mha = eqx.nn.MultiheadAttention(
        num_heads=2, query_size=8, key=key, dropout_p=0.1, inference=True
    )

    def forward(model, x):
        h = model(x, x, x)
        out = jnp.tanh(h).sum()
        return out

    x = jax.random.normal(key, (5, 8))
    g = js.trace(forward, mha, x)
    assert [v.name for v in g.inputs] == [
        "model.query_proj.weight",
        "model.key_proj.weight",
        "model.value_proj.weight",
        "model.output_proj.weight",
        "x",
    ]
    allclose(g.as_function()(mha, 2 * x), forward(mha, 2 * x))
    check_slice(g.slice("h", "out"), (g.value("h"),), lambda h: jnp.tanh(h).sum())


def test_an_equinox_module_returned_keeps_its_python_fields(key):
    """A training step returning the updated model: its Python fields (a dropout's
    ``p`` and ``inference``) came back from ``as_function`` as arrays, and the next
    jitted step failed on ``if inference`` (a TracerBoolConversionError)."""
    model = eqx.nn.Sequential([eqx.nn.Linear(3, 3, key=key), eqx.nn.Dropout(0.1)])

    def step(model, x):
        loss = lambda m: jnp.sum(m(x, key=jax.random.key(1)) ** 2)  # noqa: E731
        grads = eqx.filter_grad(loss)(model)
        return eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))

    x = jnp.ones(3)
    g = js.trace(step, model, x)
    new = g.as_function()(model, x)
    dropout = new.layers[1]
    assert type(dropout.p) is float and dropout.p == 0.1 and dropout.inference is False
    again = eqx.filter_jit(step)(new, x)  # the next step, jitted
    ref = step(step(model, x), x)
    allclose(again.layers[0].weight, ref.layers[0].weight, atol=1e-6)


def test_equinox_state_items_are_named_by_their_markers(key):
    """An eqx.nn.State flattens without keys: its statistics were
    state[<flat index 1>][0]. They are keyed by the State's markers, in the arguments,
    the outputs and what the function binds; a slice from the running mean in to the
    running mean out is BatchNorm's average, by hand."""

    class Net(eqx.Module):
        lin: eqx.nn.Linear
        bn: eqx.nn.BatchNorm

        def __init__(self, key):
            self.lin = eqx.nn.Linear(3, 4, key=key)
            self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="ema", momentum=0.9)

        def __call__(self, x, state):
            h = self.lin(x)
            h, state = self.bn(h, state)
            return h, state

    model, state = eqx.nn.make_with_state(Net)(key)
    state = state.set(model.bn.ema_first_time_index, jnp.array(False))  # (after a step)
    xs = jax.random.normal(key, (5, 3))

    def step(model, state, xs):
        batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        ys, state = batched(xs, state)
        return jnp.sum(ys**2), state

    g = js.trace(step, model, state, xs)
    mean = "state['Net.bn.ema_state_index'][0]#0"  # (the argument: step rebinds state)
    assert g[mean].index == 5 and g[mean].shape == (4,)
    assert not [n for n in g.names() if "<flat index" in n]
    new_mean = "out[1]['Net.bn.ema_state_index'][0]"
    allclose(g.value(new_mean), step(model, state, xs)[1].get(model.bn.ema_state_index)[0])
    batch_mean = jnp.mean(jax.vmap(model.lin)(xs), axis=0)
    check_slice(g.slice(mean, new_mean), (jnp.arange(4.0),), lambda m: 0.9 * m + 0.1 * batch_mean)


# -- Haiku: hk.nets.MLP ----------------------------------------------------------------------------
def test_haiku_mlp_layers_by_module_name(key):
    forward = hk.transform(lambda x: hk.nets.MLP([8, 8, 2])(x))
    x = jax.random.normal(key, (4, 3))
    params = forward.init(jax.random.key(1), x)
    g = js.trace(forward.apply, params, None, x)
    assert [g[f"mlp/linear_{k}"].shape for k in range(3)] == [(4, 8), (4, 8), (4, 2)]
    assert g.outputs[0] is g["mlp/linear_2"]

    def rest(h):
        p = params["mlp/~/linear_2"]
        return jax.nn.relu(h) @ p["w"] + p["b"]

    s = g.slice("mlp/linear_1", "mlp/linear_2")
    check_slice(s, (g.value("mlp/linear_1"),), rest)


# -- training mode: modules that return their statistics ------------------------------------------
class BNBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.relu(h)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        h = BNBlock()(x, train)
        h = BNBlock()(h, train)
        return nn.Dense(1)(h)


def _linen_bn(x):
    model = BNNet()
    v = model.init(jax.random.key(1), x, train=False)

    def f(v, x):
        out, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        return out.sum(), updates

    def block(k, h):
        sub = {c: v[c][f"BNBlock_{k}"] for c in ("params", "batch_stats")}
        return BNBlock().apply(sub, h, True, mutable=["batch_stats"])[0]

    def rest(h):  # block 1 and the head: block 1 normalizes with its own batch statistics
        head = nn.Dense(1).apply({"params": v["params"]["Dense_0"]}, block(1, h))
        return head.sum()

    first = block(0, x)
    scopes = ("BNNet/BNBlock_0", "BNNet/BNBlock_1/BatchNorm_0", "BNNet")
    return (
        f,
        (v, x),
        first,
        scopes,
        rest,
        "out[1]['batch_stats']['BNBlock_0']['BatchNorm_0']['mean']",
    )


def _haiku_bn_scan(x):
    """The state threads through an ``hk.scan`` (as through ``hk.dynamic_unroll``): the
    loop reads the statistics, and they were the BatchNorm's outputs too."""
    return _haiku_bn(x, scan=True)


def _haiku_bn(x, scan=False):
    def net(x):
        h = hk.BatchNorm(True, True, 0.9)(hk.Linear(8)(x), is_training=True)
        if scan:
            ones = jnp.ones((3, *h.shape))
            h = h + hk.scan(lambda c, xi: (c + xi, c), jnp.zeros_like(h), ones)[0]
        return hk.Linear(1)(jax.nn.relu(h))

    t = hk.transform_with_state(net)
    params, state = t.init(jax.random.key(1), x)

    def f(params, state, x):
        return t.apply(params, state, None, x)

    def normed(h):  # the first layers, by hand: batch statistics, scale 1, offset 0
        mean, var = h.mean(0), h.var(0)
        return (h - mean) * jax.lax.rsqrt(var + 1e-5)

    lin = params["linear"]
    head = params["linear_1"]
    first = normed(x @ lin["w"] + lin["b"])
    scopes = ("batch_norm", "linear")
    return (
        f,
        (params, state, x),
        first,
        scopes,
        (lambda h: jax.nn.relu(h + (3.0 if scan else 0.0)) @ head["w"] + head["b"]),
        "out[1]['batch_norm/~/mean_ema']['average']",
    )


def _equinox_bn(x):
    class Net(eqx.Module):
        l1: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        l2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.l1 = eqx.nn.Linear(3, 8, key=k1)
            self.bn = eqx.nn.BatchNorm(8, "batch", mode="batch")
            self.l2 = eqx.nn.Linear(8, 1, key=k2)

        def __call__(self, x, state):
            h, state = self.bn(self.l1(x), state)
            return self.l2(jax.nn.relu(h)), state

    model, state = eqx.nn.make_with_state(Net)(jax.random.key(1))

    def f(model, state, x):
        batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        out, state = batched(x, state)
        return out.sum(), state

    h = jax.vmap(model.l1)(x)
    first = (h - h.mean(0)) * jax.lax.rsqrt(h.var(0) + 1e-5)
    return (
        f,
        (model, state, x),
        first,
        ("eqx.nn.BatchNorm",),
        (lambda h: jax.vmap(model.l2)(jax.nn.relu(h)).sum()),
        None,
    )


@pytest.mark.parametrize(
    "make", [_linen_bn, _haiku_bn, _haiku_bn_scan, _equinox_bn], ids=lambda m: m.__name__
)
def test_a_module_returning_its_statistics_is_named_by_its_value(key, make):
    """In training mode BatchNorm returns its updated statistics (linen's
    ``mutable=["batch_stats"]``, Haiku's ``transform_with_state``, Equinox's ``State``):
    the module's scope names its value, and the statistics keep their output names."""
    x = jax.random.normal(key, (6, 3))
    f, args, first, scopes, rest, stat = make(x)
    put_variable, state_set = flax_scope.Scope.put_variable, eqx.nn.State.set
    g = js.trace(f, *args)
    for scope in scopes:  # a block, a BatchNorm inside it, the model: one value each
        assert g[scope].dtype == jnp.float32 and g[scope] not in g.outputs[1:]
    allclose(g.value(scopes[0]), first, rtol=2e-4, atol=1e-5)
    # (the references under jit: run eagerly, each operation compiles on its own)
    allclose(g.as_function()(*args), eqx.filter_jit(f)(*args), rtol=2e-4, atol=1e-5)
    if stat is not None:
        assert g[stat] in g.outputs  # the statistics keep their output names
    check_slice(
        g.slice(scopes[0], "out[0]" if "linear" not in scopes else "linear_1"),
        (g.value(scopes[0]),),
        jax.jit(rest),
    )
    # the libraries are as they were
    assert (flax_scope.Scope.put_variable, eqx.nn.State.set) == (put_variable, state_set)
    assert not hk_base.state_setter_stack


# -- stax: a ResNet-style network with FanOut / FanInSum --------------------------------------------
def residual_block(width):
    return stax.serial(
        stax.FanOut(2),
        stax.parallel(stax.serial(stax.Dense(width), stax.Tanh, stax.Dense(width)), stax.Identity),
        stax.FanInSum,
    )


def test_stax_resnet_slice_across_a_residual_block(key):
    init_in, apply_in = stax.serial(stax.Dense(8), stax.Tanh)
    init_block, apply_block = residual_block(8)
    init_out, apply_out = stax.Dense(2)
    k1, k2, k3 = jax.random.split(key, 3)
    _, p_in = init_in(k1, (-1, 3))
    _, p_block = init_block(k2, (-1, 8))
    _, p_out = init_out(k3, (-1, 8))

    def resnet(params, x):
        h0 = apply_in(params["in"], x)
        h1 = apply_block(params["block1"], h0)
        h2 = apply_block(params["block2"], jnp.tanh(h1))
        return apply_out(params["out"], h2)

    params = {"in": p_in, "block1": p_block, "block2": p_block, "out": p_out}
    x = jax.random.normal(key, (4, 3))
    g = js.trace(resnet, params, x)
    s = g.slice("h0", "h1")  # across the first residual block: the skip is inside
    h0 = g.value("h0")
    check_slice(s, (h0,), lambda h: apply_block(p_block, h))
    allclose(
        jax.jacfwd(s)(h0),
        jax.jacfwd(lambda h: apply_block(p_block, h))(h0),
        rtol=RTOL,
    )
    # h1 -> out: two blocks' worth of work, block 2's parameters held fixed
    check_slice(
        g.slice("h1", "out"),
        (g.value("h1"),),
        lambda h: apply_out(p_out, apply_block(p_block, jnp.tanh(h))),
    )


class _PreNormBlock(eqx.Module):
    """A user module calling library layers through jax.vmap, as Equinox users do."""

    ln1: eqx.nn.LayerNorm
    mlp: eqx.nn.Linear

    def __init__(self, key):
        self.ln1 = eqx.nn.LayerNorm(4)
        self.mlp = eqx.nn.Linear(4, 4, key=key)

    def __call__(self, x):
        h = jax.vmap(self.ln1)(x)
        return x + jax.vmap(self.mlp)(jnp.tanh(h))


def test_calls_through_jax_vmap_are_named_after_the_wrapped_layer(key):
    block = _PreNormBlock(key)
    x = jax.random.normal(jax.random.key(3), (3, 4))
    g = js.trace(lambda_free_forward, block, x)
    assert g["block/ln1"] is g["block/h"] and g["block/ln1"].shape == (3, 4)
    assert g["block/mlp"].shape == (3, 4)
    # the reference: the library's own layers, batched by hand
    normed = jnp.stack([block.ln1(row) for row in x])
    allclose(g.value("block/ln1"), normed, rtol=1e-5)
    rest = lambda h: x + jnp.stack([block.mlp(row) for row in jnp.tanh(h)])  # noqa: E731
    check_slice(g.slice("block/ln1", "block"), (normed,), rest)


def lambda_free_forward(block, x):
    return block(x)


class _ScanCell(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        h = jnp.tanh(nn.Dense(2)(h) + x)
        return h, h


class _ScanNet(nn.Module):
    @nn.compact
    def __call__(self, xs):
        scan = nn.scan(_ScanCell, variable_broadcast="params", split_rngs={"params": False})
        h, _ = scan()(jnp.zeros(2), xs)
        return nn.Dense(1)(h)


def test_flax_nn_scan_body_modules_are_named_by_their_whole_path(key):
    """A module inside a Flax ``nn.scan`` is named by its whole path, the scanning
    module's first (``Net/ScanCell_0/Dense_0@1``, as ``Net/Dense_0`` outside the loop),
    and still by its path in the body; its value at each step is the cell's."""
    xs = jax.random.normal(key, (3, 2))
    variables = _ScanNet().init(jax.random.key(0), xs)
    g = js.trace(_ScanNet().apply, variables, xs)
    v = g["_ScanNet/Scan_ScanCell_0/Dense_0@1"]
    assert v is g["Scan_ScanCell_0/Dense_0@1"] and v.scope == "_ScanNet/Scan_ScanCell_0/Dense_0"
    assert v.name == "_ScanNet/Scan_ScanCell_0/Dense_0@1"
    p = variables["params"]["Scan_ScanCell_0"]["Dense_0"]
    h = jnp.zeros(2)
    for t in range(2):
        pre = h @ p["kernel"] + p["bias"]
        h = jnp.tanh(pre + xs[t])
    allclose(g.value(v), pre, rtol=1e-5)
    assert len(g.select("_ScanNet/Scan_ScanCell_0/Dense_0@*")) == 3


# An Equinox `filter_jit` function holds a module's non-array leaves (an MLP's
# activation) static: its rewritten twin is made by `filter_jit` too, cached per function.
@eqx.filter_jit
def jitted_head(model, x):
    hidden = model(x)
    return jnp.tanh(hidden)


def two_heads(model, x):
    first = jitted_head(model, x)
    return jitted_head(model, first[:3]).sum()


def test_an_equinox_filter_jit_function_is_rewritten_by_filter_jit():
    model = eqx.nn.MLP(3, 3, 8, 2, key=jax.random.key(0))
    x = jnp.array([0.5, -1.0, 2.0])
    first = jnp.tanh(model(x))

    def train(model, x):
        return eqx.filter_value_and_grad(two_heads)(model, x)

    for fn, prefix in ((two_heads, ""), (train, "two_heads/")):
        g = js.trace(fn, model, x)  # the second call of each is served by JAX's cache
        allclose(g.value(f"{prefix}jitted_head#0/hidden"), model(x))
        allclose(g.value(f"{prefix}jitted_head#1/hidden"), model(first))
        check_slice(
            g.slice(f"{prefix}jitted_head#1/hidden", f"{prefix}jitted_head#1"),
            (model(first),),
            jnp.tanh,
        )
        new = (model, -x)
        for ours, theirs in zip(jax.tree.leaves(g.as_function()(*new)), jax.tree.leaves(fn(*new))):
            allclose(ours, theirs, rtol=1e-5)


# A module whose `__call__` is jitted (`jax.jit`, `eqx.filter_jit`, `nnx.jit`) is
# rewritten through its jit. An `nnx.jit` twin is an `nnx.jit`: it carries the module's
# state updates (BatchNorm statistics) out of the call, as the original does.
class JaxJitBlock(eqx.Module):
    l1: eqx.nn.Linear

    def __init__(self, key):
        self.l1 = eqx.nn.Linear(3, 3, key=key)

    @jax.jit
    def __call__(self, x):
        h1 = jnp.tanh(self.l1(x))
        return h1 * 2.0


class FilterJitBlock(JaxJitBlock):
    @eqx.filter_jit
    def __call__(self, x):
        h1 = jnp.tanh(self.l1(x))
        return h1 * 2.0


class FilterJitMethodBlock(JaxJitBlock):
    @eqx.filter_jit
    def step(self, x):
        h1 = jnp.tanh(self.l1(x))
        return h1 * 2.0


def call_block(model, x):
    out = model.step(x) if isinstance(model, FilterJitMethodBlock) else model(x)
    return out


@pytest.mark.parametrize(
    "block", [JaxJitBlock, FilterJitBlock, FilterJitMethodBlock], ids=lambda b: b.__name__
)
def test_a_module_with_a_jitted_call_is_rewritten_through_its_jit(block):
    model = block(jax.random.key(0))
    x = jnp.array([0.5, -1.0, 2.0])
    g = js.trace(call_block, model, x)
    h1 = jnp.tanh(model.l1.weight @ x + model.l1.bias)
    name = "model.step/h1" if block is FilterJitMethodBlock else "model/h1"
    allclose(g.value(name), h1)
    check_slice(g.slice(name, "out"), (h1,), lambda h: h * 2.0)


class NNXBatchNormBlock(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)

    @nnx.jit
    def __call__(self, x):
        h1 = self.bn(self.l1(x))
        return jnp.tanh(h1)

    @nnx.jit
    def forward(self, x):
        h1 = self.bn(self.l1(x))
        return jnp.tanh(h1)


@nnx.jit
def nnx_run(model, x):
    y = model.bn(x)
    return y


@pytest.mark.parametrize("through", ["jitted __call__", "jitted method", "jitted function"])
def test_an_nnx_jit_twin_keeps_the_module_state_updates(through):
    model = NNXBatchNormBlock(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def step(state, x):
        model = nnx.merge(graphdef, state)
        if through == "jitted __call__":
            y = model(x)
        elif through == "jitted method":
            y = model.forward(x)
        else:
            y = nnx_run(model, x)
        return y, nnx.state(model)

    x = jax.random.normal(jax.random.key(1), (5, 3))
    g = js.trace(step, state, x)
    name = {"jitted __call__": "model/h1", "jitted method": "model.forward/h1"}
    assert name.get(through, "nnx_run/y") in g.names()
    for args in ((state, x), (state, 2.0 * x)):  # the statistics move: the update is kept
        allclose(g.as_function()(*args), step(*args), atol=1e-5)


# Flax NNX's loops: `nnx.scan` over stacked layers and `nnx.fori_loop` run their body in
# a frame, as `jax.lax.scan` does: its values answer to `name@t`.
class NNXTanhBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        pre = self.lin(x)
        return jnp.tanh(pre)


@nnx.split_rngs(splits=3)
@nnx.vmap(in_axes=(0,), out_axes=0)
def stacked_blocks(rngs):
    return NNXTanhBlock(rngs)


class NNXScanned(nnx.Module):
    def __init__(self, rngs):
        self.blocks = stacked_blocks(rngs)

    def __call__(self, x):
        def body(h, block):
            h = block(h)
            return h

        return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)


class NNXLooped(nnx.Module):
    def __init__(self, rngs):
        self.block = NNXTanhBlock(rngs)

    def __call__(self, x):
        def body(i, carry):
            block, h = carry
            h = block(h)
            return block, h

        return nnx.fori_loop(0, 3, body, (self.block, x))[1]


@pytest.mark.parametrize("model_type", [NNXScanned, NNXLooped], ids=lambda m: m.__name__)
def test_nnx_scan_and_fori_loop_bodies_are_named_per_iteration(model_type):
    model = model_type(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        return model(x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    g = js.trace(forward, state, x)
    if model_type is NNXScanned:  # layer t's parameters: stacked, or one layer thrice
        kernels, biases = model.blocks.lin.kernel[...], model.blocks.lin.bias[...]
    else:
        kernels, biases = [model.block.lin.kernel[...]] * 3, [model.block.lin.bias[...]] * 3
    h, pres = x, []  # by hand: layer t's pre-activation
    for kernel, bias in zip(kernels, biases):
        pres.append(h @ kernel + bias)
        h = jnp.tanh(pres[-1])
    for t in range(3):
        allclose(g.value(f"model/body/block/pre@{t}"), pres[t], atol=1e-6)
    check_slice(g.slice("model/body/block/pre@2", "out"), (pres[2],), jnp.tanh)


def test_the_cell_nnx_rnn_scans_is_named_by_its_attribute_path_at_each_step():
    """``nnx.RNN`` (library code) scans a copy of its cell merged inside the loop: its
    values are the cell's, ``rnn/cell/ii@t``, not unnamed body values."""
    cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(nnx.RNN(cell))
    zeros = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))

    def f(state, xs):
        rnn = nnx.merge(graphdef, state)
        hs = rnn(xs, initial_carry=zeros)
        return jnp.sum(hs**2)

    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    g = js.trace(f, state, xs)
    carries, hs = [zeros], []  # by hand: the cell, step by step
    for t in range(5):
        carry, h = cell(carries[-1], xs[:, t])
        carries.append(carry)
        hs.append(h)
    for t in (0, 3):
        allclose(g.value(f"rnn/cell/ii@{t}"), cell.ii(xs[:, t]), atol=1e-6)
        allclose(g.value(f"rnn/cell/hf@{t}"), cell.hf(carries[t][1]), atol=1e-6)

    def rest(carry2):  # the loss given the carry after step 2
        carry, out = carry2, [*hs[:2], carry2[1]]
        for t in (3, 4):
            carry, h = cell(carry, xs[:, t])
            out.append(h)
        return sum(jnp.sum(h**2) for h in out)

    s = g.slice(["rnn/cell[0][0]@2", "rnn/cell[0][1]@2"], "out")
    check_slice(s, (list(carries[3]),), rest)


class UserCell(nnx.Module):
    """A recurrent cell of the user's, which library code (``nnx.RNN``) calls."""

    def __init__(self, rngs):
        self.ih = nnx.Linear(3, 4, rngs=rngs)
        self.hh = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, carry, x):
        pre = self.ih(x) + self.hh(carry)
        h = jnp.tanh(pre)
        return h, h

    def initialize_carry(self, input_shape, rngs=None):
        return jnp.zeros((*input_shape[:-1], 4))

    @property
    def num_feature_axes(self):
        return 1


class GatedUserCell(UserCell):  # (its __call__ inherited)
    pass


def _passing(fn):  # a user's decorator
    @functools.wraps(fn)
    def passed(self, *args):
        return fn(self, *args)

    return passed


class DecoratedUserCell(UserCell):
    __call__ = _passing(UserCell.__call__)


@pytest.mark.parametrize("cell_type", [UserCell, GatedUserCell, DecoratedUserCell])
def test_a_user_cell_nnx_rnn_scans_is_rewritten_and_named_at_each_step(cell_type):
    """``nnx.RNN`` (library code) calls a user's cell: its ``__call__`` runs rewritten
    in a frame named by its path, ``rnn/cell/pre@t`` (it ran as it is, its values
    unnamed), the library modules it calls under it (``rnn/cell/ih@t``, was
    ``rnn/cell.ih@t``); the class is as it was after the trace."""
    cell = cell_type(nnx.Rngs(0))
    graphdef, state = nnx.split(nnx.RNN(cell))

    def f(state, xs):
        rnn = nnx.merge(graphdef, state)
        return jnp.sum(rnn(xs) ** 2)

    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    g = js.trace(f, state, xs)
    assert "__call__" not in vars(GatedUserCell) and vars(UserCell)["__call__"].__module__ == (
        __name__
    )
    assert vars(DecoratedUserCell)["__call__"].__name__ == "__call__"  # (the decorator's)
    assert vars(DecoratedUserCell)["__call__"].__code__ is _passing(None).__code__
    h, pres = jnp.zeros((2, 4)), []  # by hand: the cell, step by step
    for t in range(5):
        pres.append(cell.ih(xs[:, t]) + cell.hh(h))
        h = jnp.tanh(pres[-1])
    for t in (0, 3):
        allclose(g.value(f"rnn/cell/pre@{t}"), pres[t], atol=1e-6)
        allclose(g.value(f"rnn/cell/ih@{t}"), cell.ih(xs[:, t]), atol=1e-6)
    allclose(g.value("out"), f(state, xs), atol=1e-5)

    def rest(pre2):  # the loss given step 2's pre-activation
        hs = [jnp.tanh(p) for p in pres[:2]] + [jnp.tanh(pre2)]
        for t in (3, 4):
            hs.append(jnp.tanh(cell.ih(xs[:, t]) + cell.hh(hs[-1])))
        return sum(jnp.sum(h**2) for h in hs)

    check_slice(g.slice("rnn/cell/pre@2", "out"), (pres[2],), rest)


_LIBRARY_BLOCK = """
from flax import nnx

class Block(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x, proj=None):
        proj = self.proj if proj is None else proj
        return proj(x) * 2.0
"""


def test_a_module_a_library_module_is_given_is_not_named_as_its_own(tmp_path, monkeypatch):
    """A library's NNX module calling a module it is given, of its own submodule's type
    and structure, is no copy an NNX transform made of that submodule: not named by its
    path (``block/proj`` was the given module's output: the regression hunt's find)."""
    root = tmp_path / "lib" / "python3" / "dist-packages"  # library code, as installed
    root.mkdir(parents=True)
    (root / "js_nnx_library_block.py").write_text(_LIBRARY_BLOCK)
    monkeypatch.syspath_prepend(str(root))
    try:
        from js_nnx_library_block import Block

        rngs = nnx.Rngs(0)
        block, given = Block(rngs), nnx.Linear(3, 3, rngs=rngs)
        x = jax.random.normal(jax.random.key(1), (2, 3))
        g = js.trace(lambda x: block(x, given), x)
        assert "block/proj" not in g.names()
        allclose(g.value("block"), 2 * given(x), atol=1e-6)
        # given as a state the trace merges (its state traced, the block's concrete)
        graphdef, state = nnx.split(given)
        g = js.trace(lambda state, x: block(x, nnx.merge(graphdef, state)), state, x)
        assert "block/proj" not in g.names()
        g = js.trace(lambda x: block(x), x)  # its own: named
        allclose(g.value("block/proj"), block.proj(x), atol=1e-6)
    finally:
        sys.modules.pop("js_nnx_library_block", None)


class NNXBranches(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 3, rngs=rngs)
        self.b = nnx.Linear(3, 3, rngs=rngs)
        self.heads = nnx.Dict({k: nnx.Linear(3, 2, rngs=rngs) for k in ("enc/0", "1", "class")})

    def __call__(self, x, flag, index):
        def ta(m, x):
            pre = m.a(x)
            ha = jnp.sin(pre)
            return ha

        def tb(m, x):
            hb = jnp.cos(m.b(x))
            return hb

        y = nnx.cond(flag > 0, ta, tb, self, x) + nnx.switch(index, [ta, tb], self, x)
        return y.sum() + sum(self.heads[k](x).sum() for k in self.heads)


def test_nnx_cond_and_switch_branches_and_nnx_dict_items_are_named():
    """The branches of ``nnx.cond`` and ``nnx.switch`` are named as ``lax.cond``'s (they
    were unnamed, ``%12``); an ``nnx.Dict`` key that is no identifier is subscripted
    (``heads.enc/0`` was a path of two names, which ``heads*`` missed)."""
    model = NNXBranches(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def forward(state, x, flag, index):
        m = nnx.merge(graphdef, state)
        return m(x, flag, index)

    x = jax.random.normal(jax.random.key(1), (2, 3))
    g = js.trace(forward, state, x, 1.0, 1)  # (the index shows the branches taken)
    pre = model.a(x)
    allclose(g.value("m/ta/pre"), pre, atol=1e-6)
    allclose(g.value("m/tb/hb"), jnp.cos(model.b(x)), atol=1e-6)
    check_slice(g.slice("m/ta/pre", "m/ta/ha"), (pre,), jnp.sin)
    assert set(g.select("m/heads*").names) == {
        "m/heads['enc/0']",
        "m/heads['1']",
        "m/heads['class']",  # (a keyword: no attribute either)
    }
    assert "m.heads['enc/0'].kernel.value" in g.names()  # (a parameter's alias: one name)
    assert "m.heads['class'].kernel.value" in g.names()
    allclose(g.value("m/heads['enc/0']"), model.heads["enc/0"](x), atol=1e-6)
    for args in ((state, x, -1.0, 0), (state, 2 * x, 1.0, 1)):  # the other branches
        allclose(g.as_function()(*args), forward(*args), atol=1e-5)
