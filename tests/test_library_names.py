"""Names that libraries give, read as jaxsurgery names: items of library containers
(``eqx.nn.Sequential``, ``nnx.Sequential``, penzai groups), Equinox layers that share
their base's scope, penzai parameter labels, NumPyro sites, Flax ``sow``, and the
backward pass of ``jax.grad`` marked apart from the forward one. References are
computed by hand, layer by layer, without jaxsurgery."""

from typing import NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from conftest import allclose, check_slice
from flax import nnx
from models import penzai_llama_config
from numpyro.infer.util import log_density, potential_energy
from penzai import pz
from penzai.models import simple_mlp

import jaxsurgery as js


def forward(model, x):
    return model(x)


# -- containers -----------------------------------------------------------------------------
def test_equinox_sequential_items_are_named_by_their_place(key):
    k1, k2 = jax.random.split(key)
    seq = eqx.nn.Sequential(
        [eqx.nn.Linear(4, 5, key=k1), eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(5, 2, key=k2)]
    )
    x = jax.random.normal(jax.random.key(3), (4,))
    g = js.trace(forward, seq, x)
    h0 = seq.layers[0](x)  # by hand, item by item
    h1 = jax.nn.relu(h0)
    allclose(g.value("model/layers[0]"), h0)
    allclose(g.value("model/layers[1]"), h1)
    allclose(g.value("model/layers[2]"), seq.layers[2](h1))
    assert g["model/layers[2]"] is g["out"]
    check_slice(
        g.slice("model/layers[0]", "model/layers[2]"),
        (h0,),
        lambda h: seq.layers[2](jax.nn.relu(h)),
    )
    # the library is as it was: its classes and the model untouched
    assert eqx.nn.Sequential.__call__.__qualname__ == "Sequential.__call__"
    assert isinstance(seq.layers, tuple) and seq.layers[1].fn is jax.nn.relu


def test_a_stateful_item_keeps_its_type_and_its_scope(key):
    seq = eqx.nn.Sequential(
        [eqx.nn.Linear(3, 3, key=key), eqx.nn.BatchNorm(3, "batch", mode="batch")]
    )
    model, state = eqx.nn.make_with_state(lambda: seq)()

    def f(model, state, x):
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)[
            0
        ]

    x = jax.random.normal(jax.random.key(1), (6, 3))
    g = js.trace(f, model, state, x)
    allclose(g.value("out"), f(model, state, x))
    # inside jax.vmap a name holds the whole batch
    allclose(g.value("model/layers[0]"), jax.vmap(model.layers[0])(x))
    assert "model/layers[1]" not in g.names()  # BatchNorm keeps its type (and its scope)
    assert g.select(scope="eqx.nn.Sequential/eqx.nn.BatchNorm")


def test_nnx_sequential_items_are_named_by_their_place():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.seq = nnx.Sequential(
                nnx.Linear(4, 6, rngs=rngs), nnx.relu, nnx.Linear(6, 2, rngs=rngs)
            )

        def __call__(self, x):
            return self.seq(x)

    model = Model(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def f(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(2), (3, 4))
    g = js.trace(f, state, x)
    h0 = model.seq.layers[0](x)
    allclose(g.value("Model/seq/layers[0]"), h0)
    allclose(g.value("Model/seq/layers[1]"), jax.nn.relu(h0))  # a JAX function, named too
    allclose(g.value("Model/seq/layers[2]"), model(x))
    check_slice(
        g.slice("Model/seq/layers[1]", "out"), (jax.nn.relu(h0),), lambda h: model.seq.layers[2](h)
    )


def test_nnx_variables_are_selected_without_the_value_of_their_tree_path():
    class Holder(NamedTuple):  # a pytree with a field `value`, not a variable: no alias
        value: jax.Array

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def f(model, state, held, x):
        return (model(x) * nnx.merge(graphdef, state)(x)).sum() + held.value.sum()

    x = jnp.arange(3.0)
    g = js.trace(f, model, state, Holder(jnp.ones(2)), x)
    assert g["model.kernel"] is g["model.kernel.value"]  # the tree path stays canonical
    assert g["state['kernel']"] is g["state['kernel'].value"]
    assert g["model.kernel"].name == "model.kernel.value"
    with pytest.raises(js.SelectionError):
        g["held"]  # noqa: B018
    by_hand = jax.grad(lambda k: (model(x) * (x @ k + model.bias[...])).sum())(model.kernel[...])
    allclose(g.grads("out", wrt=["state['kernel']"])["state['kernel']"], by_hand)

    def tagged(model, x):  # a tag of the alias's name keeps it: no var answers twice
        k = js.tag(model.kernel[...] * 2, "model.kernel")
        return (x @ k).sum()

    g = js.trace(tagged, model, x)
    assert g.select("model.kernel").names == ("model.kernel",)
    assert g["model.kernel"].primitive == "mul"


def test_an_equinox_conv2d_has_its_own_scope(key):
    conv = eqx.nn.Conv2d(3, 4, 3, key=key)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8))
    g = js.trace(forward, conv, x)
    assert "eqx.nn.Conv2d" in g.names() and "eqx.nn.Conv" not in g.names()
    allclose(g.value("eqx.nn.Conv2d"), conv(x))
    assert g.select(scope="eqx.nn.Conv2d")
    assert "__call__" not in vars(eqx.nn.Conv2d)  # restored after tracing


class AttentionBlock(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=key)
        self.norm = eqx.nn.LayerNorm(8)

    def __call__(self, x):
        h = jax.vmap(self.norm)(x)
        return (x + self.attn(h, h, h)).sum()


def test_equinox_layers_a_library_layer_calls_are_named_by_their_paths(key):
    """Called by the library's code (eqx.nn.MultiheadAttention's projections, an
    eqx.nn.MLP's layers), they were named by scopes alone (eqx.nn.Linear#0 .. #3);
    the scopes stay aliases."""
    m = AttentionBlock(key)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    g = js.trace(forward, m, x)
    h = jax.vmap(m.norm)(x)
    for k, proj in enumerate(("query_proj", "key_proj", "value_proj")):
        var = g[f"model/attn/{proj}"]
        assert f"eqx.nn.MultiheadAttention/eqx.nn.Linear#{k}" in var.aliases
        # (under the library's jax.vmap: the batch axis where JAX put it, last)
        allclose(g.value(var), jax.vmap(getattr(m.attn, proj))(h).T)
    k, v = jax.vmap(m.attn.key_proj)(h), jax.vmap(m.attn.value_proj)(h)

    def rest(q_t):  # the block after the query projection, by hand
        q = q_t.T
        heads = lambda a: a.reshape(5, 2, 4)  # noqa: E731
        logits = jnp.einsum("shd,Shd->hsS", heads(q), heads(k)) / 2.0
        mixed = jnp.einsum("hsS,Shd->shd", jax.nn.softmax(logits, -1), heads(v))
        return (x + jax.vmap(m.attn.output_proj)(mixed.reshape(5, 8))).sum()

    q_t = jax.vmap(m.attn.query_proj)(h).T
    allclose(rest(q_t), g.value("out"))
    check_slice(g.slice("model/attn/query_proj", "out"), (q_t,), rest)

    mlp = eqx.nn.MLP(3, 2, 4, 2, key=key)
    g = js.trace(forward, mlp, jnp.ones(3))
    assert g["model/layers[1]"] is g["eqx.nn.MLP/eqx.nn.Linear#1"]
    h1 = jax.nn.relu(mlp.layers[0](jnp.ones(3)))
    allclose(g.value("model/layers[1]"), mlp.layers[1](h1))


class Vmapped(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, x):
        return jax.vmap(self.mlp)(x) + eqx.filter_vmap(self.mlp)(x)


def test_equinox_layers_under_a_transform_and_tied_ones_are_named_as_called(key):
    """Under jax.vmap / eqx.filter_vmap the transform's own attributes were in the path
    (model/mlp#0/__wrapped__/layers[0], model/mlp#1/_fun/layers[0]); a layer held at two
    places took its first path at both (layers[0]#0, layers[0]#1: layers[2] gone)."""
    g = js.trace(forward, Vmapped(eqx.nn.MLP(3, 2, 4, 1, key=key)), jnp.ones((5, 3)))
    for k in (0, 1):
        assert {f"model/mlp#{k}/layers[0]", f"model/mlp#{k}/layers[1]"} <= set(g.names())
    assert not any("__wrapped__" in n or "_fun" in n for n in g.names())
    lin = eqx.nn.Linear(3, 3, key=key)
    seq = eqx.nn.Sequential([lin, eqx.nn.Lambda(jnp.tanh), lin])
    g = js.trace(forward, seq, jnp.ones(3))
    allclose(g.value("model/layers[2]"), seq(jnp.ones(3)))
    assert g["model/layers[0]"] is not g["model/layers[2]"]

    class Twice(eqx.Module):  # vmapped twice: no `_fun._fun.` in the paths
        mlp: eqx.nn.MLP

        def __call__(self, x):
            return eqx.filter_vmap(eqx.filter_vmap(self.mlp))(x)

    g = js.trace(forward, Twice(eqx.nn.MLP(3, 2, 4, 1, key=key)), jnp.ones((2, 5, 3)))
    assert "model/mlp/layers[0]" in g.names() and not any("_fun" in n for n in g.names())

    inner = eqx.nn.Sequential([lin, eqx.nn.Lambda(jnp.tanh)])
    outer = eqx.nn.Sequential([inner, eqx.nn.Lambda(jnp.cos), inner])

    def closed_over(x):  # (a tied module's insides took its first place's path)
        y = outer(x)
        return y

    g = js.trace(closed_over, jnp.ones(3) * 0.4)
    assert not any("layers[0].layers" in n for n in g.names())
    allclose(g.value("y"), outer(jnp.ones(3) * 0.4))


def test_a_patched_equinox_layer_runs_as_patched_in_every_trace(key):
    """The layers' __call__ were kept from the first trace: a patch made after it was
    ignored, and one active during it stayed after it ended (silent wrong values)."""
    lin = eqx.nn.Linear(3, 3, key=key)
    x = jnp.ones(3)

    def f(x):
        y = lin(x)
        return y

    js.trace(f, x)
    original = vars(eqx.nn.Linear)["__call__"]
    try:
        eqx.nn.Linear.__call__ = lambda self, x, *, key=None: 2.0 * original(self, x)
        allclose(js.trace(f, x).value("out"), 2.0 * original(lin, x))
    finally:
        eqx.nn.Linear.__call__ = original
    allclose(js.trace(f, x).value("out"), lin(x))
    assert vars(eqx.nn.Linear)["__call__"] is original


# -- penzai ---------------------------------------------------------------------------------
def test_penzai_parameters_by_label_and_layers_by_place():
    mlp = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[8, 16, 4]
    )
    unbound, params = pz.unbind_params(mlp, freeze=True)

    def f(params, x):
        model = pz.bind_variables(unbound, params)
        return model(pz.nx.wrap(x, "features")).unwrap("features")

    x = jax.random.normal(jax.random.key(1), (8,))
    g = js.trace(f, params, x)
    w0 = g["mlp/Affine_0/Linear.weights"]
    assert w0 is g["params[0].value.data_array"] and w0.name == "mlp/Affine_0/Linear.weights"
    allclose(g.value(w0), params[0].value.unwrap("features", "features_out"))
    # by hand: affine, relu, affine
    weights = [p.value.unwrap("features", "features_out") for p in params[0::2]]
    biases = [p.value.unwrap("features") for p in params[1::2]]
    h = x @ weights[0] + biases[0]
    allclose(g.value("model/sublayers[0]"), h, rtol=1e-5)
    allclose(g.value("model/sublayers[1]"), jax.nn.relu(h), rtol=1e-5)
    check_slice(
        g.slice("model/sublayers[1]", "out"),
        (jax.nn.relu(h),),
        lambda a: a @ weights[1] + biases[1],
    )


# -- NumPyro sites ----------------------------------------------------------------------------
def model(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    mu = numpyro.deterministic("mu", x @ w + b)
    numpyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def test_numpyro_sites_are_named():
    def log_joint(params, x, y):
        return log_density(model, (x, y), {}, params)[0]

    params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.3)}
    x = jax.random.normal(jax.random.key(0), (5, 3))
    y = jax.random.normal(jax.random.key(1), (5,))
    g = js.trace(log_joint, params, x, y)
    assert g["log_density/w"] is g["params['w']"]  # the site holds the substituted value
    mu = x @ params["w"] + params["b"]
    allclose(g.value("log_density/mu"), mu)

    def by_hand(mu):  # log p(obs | mu) + the priors, written out
        normal = lambda v, m: -0.5 * (v - m) ** 2 - 0.5 * jnp.log(2 * jnp.pi)  # noqa: E731
        return normal(y, mu).sum() + normal(params["w"], 0.0).sum() + normal(params["b"], 0.0)

    check_slice(g.slice("log_density/mu", "out"), (mu,), by_hand)


def test_numpyro_factors_are_named_by_what_they_add_to_the_log_density():
    """A factor site's value is an empty array (NumPyro samples a ``Unit``): its name
    is what it adds, ``numpyro.factor``'s log factor and a constrained site's log-det."""

    def model():
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.factor("penalty", -(s**2))

    def pe(z):  # the unconstrained potential energy, as an HMC step takes it
        return potential_energy(model, (), {}, z)

    z = {"s": jnp.asarray(0.3)}
    g = js.trace(pe, z)
    assert g.value("potential_energy/penalty").shape == ()
    allclose(g.value("potential_energy/penalty"), -(jnp.exp(0.3) ** 2))
    allclose(g.value("potential_energy/_s_log_det"), 0.3)  # log |d exp(u)/du| at u
    grads = g.grads("out", wrt=["potential_energy/penalty"])
    allclose(grads["potential_energy/penalty"], -1.0)  # the energy is minus the density

    def masked():  # a factor masked, and one a plate expands: the value given too
        mask = jnp.asarray([True, False, True])
        with numpyro.plate("n", 3), numpyro.handlers.mask(mask=mask):
            s = numpyro.sample("s", dist.HalfNormal(1.0))
            numpyro.factor("masked", -(s**2))
        with numpyro.plate("k", 2):
            numpyro.factor("spread", -s.sum())

    z = {"s": jnp.asarray([0.1, 0.2, 0.3])}
    g = js.trace(lambda z: potential_energy(masked, (), {}, z), z)
    allclose(g.value("potential_energy/masked"), -(jnp.exp(z["s"]) ** 2))
    allclose(g.value("potential_energy/spread"), -jnp.exp(z["s"]).sum())
    allclose(g.value("potential_energy/_s_log_det"), z["s"])
    allclose(
        g.grads("out", wrt=["potential_energy/masked"])["potential_energy/masked"],
        jnp.asarray([-1.0, 0.0, -1.0]),
    )


def test_numpyro_distributions_and_transforms_are_named_by_their_fields():
    """A NumPyro distribution flattens without keys, its fields ordered by a set (the
    order changes with the hash seed): its leaves are named by their fields, in
    arguments and outputs, not by positions (``d[<flat index 1>][0][<flat index 0>]``
    named another field in the next process)."""
    base = dist.Normal(jnp.asarray([0.1, 0.2, 0.3]), jnp.asarray([1.0, 2.0, 0.5]))
    shift = dist.transforms.AffineTransform(jnp.asarray(1.5), jnp.asarray(3.0))
    d = dist.TransformedDistribution(base, [shift])

    def f(d, x):
        moved = dist.TransformedDistribution(d.base_dist, [dist.transforms.ExpTransform()])
        return d.log_prob(x).sum(), moved

    x = jnp.asarray([0.0, 1.0, 2.0])
    g = js.trace(f, d, x)
    arguments = {"d.base_dist.loc", "d.base_dist.scale", "d.transforms[0].loc"}
    assert arguments | {"d.transforms[0].scale", "x"} <= set(g.names())
    assert not [n for n in g.names() if "flat index" in n]
    allclose(g.value("d.transforms[0].scale"), 3.0)
    allclose(g.value("d.base_dist.scale"), base.scale)
    assert g["out[1].base_dist.loc"] is g["d.base_dist.loc"]  # returned as it came in

    def by_hand(scale):  # log N((x - 1.5) / scale; loc, base scale) - log |scale|, summed
        z = (x - 1.5) / scale
        return (dist.Normal(base.loc, base.scale).log_prob(z) - jnp.log(scale)).sum()

    check_slice(g.slice("d.transforms[0].scale", "out[0]"), (jnp.asarray(3.0),), by_hand)
    # a constraint with array bounds (a Uniform's support) by its fields too
    u = js.trace(lambda d, v: d.log_prob(v), dist.Uniform(jnp.asarray(-1.0), 2.0), 0.5)
    assert {"d._support.lower_bound", "d._support.upper_bound"} <= set(u.names())
    allclose(u.value("d._support.upper_bound"), 2.0)

    fields = "abcd"

    class Shifted(dist.Distribution):  # a flattening of its own (NumPyro's older idiom)
        arg_constraints = dict.fromkeys(fields, dist.constraints.real)

        def __init__(self, a, b, c, d):
            self.a, self.b, self.c, self.d = a, b, c, d
            super().__init__(batch_shape=jnp.shape(a))

        def log_prob(self, x):
            return self.a * x + self.b + self.c + self.d

        def tree_flatten(self):  # (its fields' order is a set's: another, mostly)
            return (self.d, self.b, self.a, self.c), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            d, b, a, c = children
            return cls(a, b, c, d)

    shifted = Shifted(*map(jnp.float32, (1.0, 2.0, 3.0, 4.0)))
    s = js.trace(lambda d, x: d.log_prob(x), shifted, 0.5)
    for v, value in zip(s.inputs, (4.0, 2.0, 1.0, 3.0)):  # by position: for any hash seed
        allclose(s.value(v), value)
        assert "flat index" in v.name


def test_jax_partials_and_sparse_arrays_are_named_by_their_fields():
    """``jax.tree_util.Partial`` and ``jax.experimental.sparse`` arrays flatten without
    keys too: ``fn.args[0]``, ``fn.keywords['b']``, ``m.data``, ``m.indices``."""
    from jax.experimental import sparse

    m = sparse.BCOO.fromdense(jnp.asarray([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
    fn = jax.tree_util.Partial(lambda w, x, b: w * x + b, jnp.full(3, 2.0), b=jnp.ones(3))
    g = js.trace(lambda fn, m, x: m @ fn(x), fn, m, jnp.arange(3.0))
    assert [v.name for v in g.inputs] == [
        "fn.args[0]",
        "fn.keywords['b']",
        "m.data",
        "m.indices",
        "x",
    ]
    allclose(g.value("m.data"), m.data)
    check_slice(
        g.slice("m.data", "out"),
        (m.data,),
        lambda data: sparse.BCOO((data, m.indices), shape=m.shape) @ (2.0 * jnp.arange(3.0) + 1),
    )


# -- Flax sow and the backward pass ------------------------------------------------------------
class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        self.sow("intermediates", "pre_act", h)
        return nn.relu(h)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = Block()(x)
        return Block()(h).sum()


def traced_with_what_is_sown(net):
    """``(graph of net.apply, the intermediates it sows, its variables, x)``."""
    x = jax.random.normal(jax.random.key(0), (2, 4))
    variables = net.init(jax.random.key(1), x)
    g = js.trace(lambda v, x: net.apply(v, x), variables, x)
    _, sown = net.apply(variables, x, mutable=["intermediates"])
    return g, sown["intermediates"], variables


def test_flax_sow_names_what_is_sown():
    g, inter, variables = traced_with_what_is_sown(Net())
    allclose(g.value("Net/Block_0/pre_act"), inter["Block_0"]["pre_act"][0])
    allclose(g.value("Net/Block_1/pre_act"), inter["Block_1"]["pre_act"][0])
    p1 = variables["params"]["Block_1"]["Dense_0"]
    check_slice(
        g.slice("Net/Block_0/pre_act", "out"),
        (inter["Block_0"]["pre_act"][0],),
        lambda h: jax.nn.relu(jax.nn.relu(h) @ p1["kernel"] + p1["bias"]).sum(),
    )


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, c, x):
        h = nn.Dense(4)(c) + x
        self.sow("intermediates", "pre_act", h)
        return jnp.tanh(h), h


class SowsItsInput(nn.Module):
    @nn.compact
    def __call__(self, x, given):
        self.sow("intermediates", "given", given)  # made by the caller
        return x + given


class LiftedNet(nn.Module):
    """Blocks under Flax's lifted transforms, whose name stack starts again inside."""

    @nn.compact
    def __call__(self, x):
        x = nn.remat(SowsItsInput)()(x, jnp.sin(x) * 0.5)
        x = nn.remat(Block)()(x)
        axes = {"variable_axes": {"params": None, "intermediates": 0}}
        x = nn.vmap(Block, **axes, split_rngs={"params": False})()(x)
        x = nn.jit(Block)()(x)
        scan = nn.scan(
            ScanBlock,
            variable_broadcast="params",
            variable_axes={"intermediates": 0},
            split_rngs={"params": False},
        )
        c, _ = scan()(x, jnp.ones((5, 2, 4)))
        return c.sum()


def test_flax_sow_under_lifted_transforms_names_the_whole_module_path():
    g, inter, _ = traced_with_what_is_sown(LiftedNet())
    given = inter["CheckpointSowsItsInput_0"]["given"][0]
    allclose(g.value("LiftedNet/CheckpointSowsItsInput_0/given"), given)
    for module in ("CheckpointBlock_0", "VmapBlock_0", "JitBlock_0"):
        allclose(g.value(f"LiftedNet/{module}/pre_act"), inter[module]["pre_act"][0])
        assert f"{module}/pre_act" not in g.names()  # not a path that starts inside
    stacked = inter["ScanScanBlock_0"]["pre_act"][0]
    allclose(g.value("LiftedNet/ScanScanBlock_0/pre_act@3"), stacked[3])
    allclose(jnp.stack(g.value("LiftedNet/ScanScanBlock_0/pre_act@*")), stacked)


class SowingBlock(nnx.Module):
    """An NNX block sowing what it mixes, its attention sowing its weights."""

    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        y = self.attn(x, sow_weights=True)
        self.sow(nnx.Intermediate, "mixed", x + y)
        nnx.Module.sow(self, nnx.Intermediate, "called", y)  # (the class's, unbound)
        return jnp.tanh(self.lin(x + y)).sum()


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_nnx_sow_names_what_is_sown_in_the_module_calls_frame():
    m = SowingBlock(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    g = js.trace(forward, m, x)
    ran = nnx.clone(m)
    ran(x)  # what NNX sows, eagerly
    sown = nnx.state(ran, nnx.Intermediate)
    weights = jax.tree_util.tree_leaves(sown["attn"]["attention_weights"])[0]
    allclose(g.value("model/attn/attention_weights"), weights)
    allclose(g.value("model/mixed"), jax.tree_util.tree_leaves(sown["mixed"])[0])
    assert not any("sow/" in n for n in g.names())  # the user's self.sow call: no frame
    assert g["model/called"] is g["model/y"]
    v = m.attn.value(x)  # the rest of the block after the weights, by hand

    def rest(w):
        y = m.attn.out(jnp.einsum("...hqk,...khd->...qhd", w, v))
        return jnp.tanh(m.lin(x + y)).sum()

    check_slice(g.slice("model/attn/attention_weights", "out"), (weights,), rest)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        return nn.Dense(1)(h)


def test_a_training_step_marks_the_backward_pass():
    mlp = MLP()
    x = jax.random.normal(jax.random.key(0), (4, 3))
    y = jax.random.normal(jax.random.key(1), (4, 1))
    params = mlp.init(jax.random.key(2), x)
    opt = optax.adam(1e-2)

    def step(params, state, x, y):
        def loss(p):
            return jnp.mean((mlp.apply(p, x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    g = js.trace(step, params, opt.init(params), x, y)
    names = g.names()
    assert {"MLP/Dense_0", "MLP/Dense_1", "grad(MLP)/Dense_0", "grad(MLP)/Dense_1"} <= set(names)
    assert not any(n.startswith("Dense_0#") for n in names)  # no bare #0/#1 forms
    d0 = params["params"]["Dense_0"]
    allclose(g.value("MLP/Dense_0"), x @ d0["kernel"] + d0["bias"], rtol=1e-5)
    # the backward instance computes the gradient of the loss w.r.t. the layer input side
    backward = g.select(scope="grad(MLP)")
    assert backward and all(v.scope.startswith("grad(MLP)") for v in backward)
    assert not set(backward) & set(g.select(scope="MLP"))


# -- jraph and blackjax: results named by their fields ---------------------------------------
def test_a_jraph_graph_network_slices_from_node_features():
    import jraph

    senders, receivers = jnp.array([0, 1, 2, 3]), jnp.array([1, 2, 3, 0])
    graph = jraph.GraphsTuple(
        nodes=jax.random.normal(jax.random.key(0), (4, 3)),
        edges=None,
        senders=senders,
        receivers=receivers,
        n_node=jnp.array([4]),
        n_edge=jnp.array([4]),
        globals=None,
    )
    w = jax.random.normal(jax.random.key(1), (3, 3))

    def gcn(w, graph):
        net = jraph.GraphConvolution(update_node_fn=lambda n: jnp.tanh(n @ w), add_self_edges=True)
        return net(graph).nodes.sum()

    g = js.trace(gcn, w, graph)

    def by_hand(nodes):  # self edges, symmetric degree normalisation, sum aggregation
        s = jnp.concatenate([senders, jnp.arange(4)])
        r = jnp.concatenate([receivers, jnp.arange(4)])
        h = jnp.tanh(nodes @ w)
        deg_s = jax.ops.segment_sum(jnp.ones_like(s), s, 4)
        deg_r = jax.ops.segment_sum(jnp.ones_like(r), r, 4)
        msg = h[s] * jax.lax.rsqrt(jnp.maximum(deg_s, 1.0))[s][:, None]
        agg = jax.ops.segment_sum(msg, r, 4)
        return (agg * jax.lax.rsqrt(jnp.maximum(deg_r, 1.0))[:, None]).sum()

    allclose(g.value("out"), by_hand(graph.nodes), rtol=1e-5)
    check_slice(g.slice("graph.nodes", "out"), (graph.nodes,), by_hand)


def test_a_blackjax_hmc_step_slices_from_the_position_to_the_proposal():
    import blackjax

    eps, steps = 0.1, 5
    hmc = blackjax.hmc(
        lambda x: -0.5 * jnp.sum(x**2),
        step_size=eps,
        inverse_mass_matrix=jnp.ones(2),
        num_integration_steps=steps,
    )
    state = hmc.init(jnp.asarray([1.0, -0.5]))

    def step(state, key):
        return hmc.step(key, state)

    g = js.trace(step, state, jax.random.key(0))
    momentum = g.value("hmc.step[1].momentum")
    grad0 = state.logdensity_grad  # an input of the step: context for a slice from position

    def leapfrog(x):  # velocity Verlet by hand: grad log p(x) = -x
        p, grad = momentum, grad0
        for _ in range(steps):
            p = p + 0.5 * eps * grad
            x = x + eps * p
            grad = -x
            p = p + 0.5 * eps * grad
        return x

    allclose(g.value("hmc.step[1].proposal.position"), leapfrog(state.position), rtol=1e-5)
    check_slice(
        g.slice("state.position", "hmc.step[1].proposal.position"), (state.position,), leapfrog
    )


def test_a_penzai_transformer_is_named_by_labels_and_paths():
    from penzai.models.transformer.variants import llamalike_common as llama

    config = penzai_llama_config()
    unbound, params = pz.unbind_params(
        llama.build_llamalike_transformer(config, init_base_rng=jax.random.key(0)), freeze=True
    )

    def logits(params, tokens):
        model = pz.bind_variables(unbound, params)
        positions = pz.nx.wrap(jnp.arange(tokens.shape[1])[None], "batch", "seq")
        out = model(pz.nx.wrap(tokens, "batch", "seq"), token_positions=positions)
        return out.unwrap("batch", "seq", "vocabulary")

    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9]])
    g = js.trace(logits, params, tokens)
    table = g["transformer/embedder.embeddings"]
    embeddings = params[0].value.unwrap("vocabulary", "embedding")
    allclose(g.value(table), embeddings)
    # the blocks by their paths in the model (treescope's), the embedding by hand
    found, ref = g.value("model/body.sublayers[0]"), embeddings[tokens]
    # a NamedArray's data is laid out as penzai chose: match the axes by their sizes
    allclose(found.transpose([found.shape.index(d) for d in ref.shape]), ref)
    blocks = [n for n in g.names() if n.startswith("model/body.sublayers[") and "/" not in n[6:]]
    assert blocks == [f"model/body.sublayers[{k}]" for k in range(5)]
    query = "model/body.sublayers[1]/sublayers[0]/delta.sublayers[1]/input_to_query.sublayers[0]"
    assert query in g.names()  # attention's projections, not sublayers[0]#k
    assert not any("#" in n for n in g.names() if n.startswith("model/"))
    allclose(g.value("out"), jax.jit(logits)(params, tokens), rtol=1e-5)  # (jitted: faster)
