"""Names inside JAX transforms of user functions: ``jax.vmap(model)(x)``,
``jax.value_and_grad(loss)(params, ...)``, ``jax.checkpoint(f)``, ``jax.jvp(f, ...)``,
Equinox's ``filter_*`` and Flax NNX's twins, applied inside the traced function (called
at once or later), run the rewritten function, so what it binds is named
(``loss/model/hidden``): under ``vmap`` a name holds the batch, under a derivative the
forward pass's value. A derivative's call does not name what it returns after the
function (``jax.grad(loss)(w)`` is a gradient, not ``loss``).

References: the same computations written by hand.
"""

import functools
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import allclose, check_slice
from flax import nnx

import jaxsurgery as js


def mlp(x, w):
    h = jnp.tanh(x @ w)
    z = h * 2.0
    return jnp.sum(z**2)


def batched(x, w):
    return jax.vmap(mlp, (0, None))(x, w).sum()


@pytest.fixture
def data():
    x = jax.random.normal(jax.random.key(0), (5, 3, 4))
    w = 0.5 * jax.random.normal(jax.random.key(1), (4, 4))
    return x, w


def test_a_name_inside_jax_vmap_holds_the_batch(data):
    x, w = data
    g = js.trace(batched, x, w)
    assert g["mlp/h"].shape == (5, 3, 4)
    allclose(g.value("mlp/h"), jnp.tanh(x @ w))
    allclose(g.value("mlp"), jax.vmap(mlp, (0, None))(x, w))  # the call's batched result
    check_slice(g.slice("mlp/h", "out"), (g.value("mlp/h"),), lambda h: jnp.sum((2.0 * h) ** 2))


class MLP(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(3, 8, key=k1)
        self.l2 = eqx.nn.Linear(8, 1, key=k2)

    def __call__(self, x):
        hidden = jax.nn.relu(self.l1(x))
        return self.l2(hidden)[0]


def loss(model, x, y):
    pred = jax.vmap(model)(x)
    return jnp.mean((pred - y) ** 2)


OPTIMIZER = optax.adam(1e-2)


def train_step(model, state, x, y):
    value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    updates, state = OPTIMIZER.update(grads, state, model)
    return eqx.apply_updates(model, updates), state, value


def test_an_equinox_training_step_names_the_forward_pass_inside_the_gradient():
    model = MLP(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jnp.linspace(-1.0, 1.0, 5)
    state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    g = js.trace(train_step, model, state, x, y)

    hidden = jax.nn.relu(x @ model.l1.weight.T + model.l1.bias)
    pred = jax.vmap(model)(x)
    allclose(g.value("loss/model/hidden"), hidden)
    allclose(g.value("loss/pred"), pred)
    assert g["loss/model"] is g["loss/pred"]
    assert "loss" not in g.names()  # the call returned (value, grads), not loss's value
    check_slice(g.slice("loss/pred", "value"), (pred,), lambda p: jnp.mean((p - y) ** 2))
    # the forward value feeds the backward pass: d(mean((p - y)^2))/d(l2.bias), by hand
    check_slice(
        g.slice("loss/pred", "grads.l2.bias"), (pred,), lambda p: 2.0 * jnp.mean(p - y)[None]
    )
    check_slice(
        g.slice("loss/model/hidden", "value"),
        (hidden,),
        lambda h: jnp.mean((h @ model.l2.weight[0] + model.l2.bias[0] - y) ** 2),
    )


def through_grad(x, w):
    return jax.grad(mlp, 1)(x, w)


def through_value_and_grad(x, w):
    value, grads = jax.value_and_grad(mlp, 1)(x, w)
    return value + grads.sum()


def through_checkpoint(x, w):
    return jax.checkpoint(mlp)(x, w)


def through_jvp(x, w):
    primal, tangent = jax.jvp(mlp, (x, w), (jnp.ones_like(x), jnp.zeros_like(w)))
    return primal + tangent


def through_jacfwd(x, w):
    return jax.jacfwd(mlp)(x, w)


@pytest.mark.parametrize(
    "fn, returns",
    [
        (through_grad, False),
        (through_value_and_grad, False),
        (through_jacfwd, False),
        (through_checkpoint, True),
        (through_jvp, True),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_names_inside_a_transformed_function(fn, returns, data):
    x, w = data[0][0], data[1]
    g = js.trace(fn, x, w)
    allclose(g.value("mlp/h"), jnp.tanh(x @ w))
    allclose(g.value("mlp/z"), 2.0 * jnp.tanh(x @ w))
    allclose(g.value("out"), fn(x, w), rtol=1e-5)
    # what the call returned is named after the function only when it is its value
    assert ("mlp" in g.names()) == returns
    if returns:
        allclose(g.value("mlp"), mlp(x, w), rtol=1e-5)
    # the whole function still equals the original's, for new arguments
    new = (x[::-1], w.T)
    allclose(g.as_function()(*new), fn(*new), rtol=1e-5)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        hidden = nnx.relu(self.l1(x))
        return self.l2(hidden)


def nnx_loss(model, x, y):
    pred = model(x)[:, 0]
    return jnp.mean((pred - y) ** 2)


def test_an_nnx_gradient_made_before_its_call_names_the_forward_pass():
    model = NNXMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def step(state, x, y):
        model = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(nnx_loss)  # transformed here, called below
        loss, grads = grad_fn(model, x, y)
        return loss, grads

    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jnp.linspace(-1.0, 1.0, 5)
    g = js.trace(step, state, x, y)
    hidden = jax.nn.relu(x @ model.l1.kernel[...] + model.l1.bias[...])
    pred = model(x)[:, 0]
    allclose(g.value("grad_fn/model/hidden"), hidden)
    allclose(g.value("grad_fn/pred"), pred)
    assert not any(n.startswith("grad_fn[") for n in g.names())  # not the gradient's name
    check_slice(g.slice("grad_fn/pred", "loss"), (pred,), lambda p: jnp.mean((p - y) ** 2))
    check_slice(
        g.slice("grad_fn/pred", "grads['l2']['bias'].value"),
        (pred,),
        lambda p: 2.0 * jnp.mean(p - y)[None],
    )


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        return nn.Dense(1)(h)[:, 0]


def test_a_flax_linen_optax_step_names_what_its_loss_binds():
    model = LinenMLP()
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jnp.linspace(-1.0, 1.0, 5)
    params = model.init(jax.random.key(0), x)
    opt_state = OPTIMIZER.init(params)

    def loss_fn(params, x, y):
        pred = model.apply(params, x)
        return jnp.mean((pred - y) ** 2)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    g = js.trace(step, params, opt_state, x, y)
    pred = model.apply(params, x)
    allclose(g.value("loss_fn/pred"), pred)
    allclose(g.value("LinenMLP/Dense_0"), x @ params["params"]["Dense_0"]["kernel"]
             + params["params"]["Dense_0"]["bias"])  # fmt: skip
    check_slice(g.slice("loss_fn/pred", "loss"), (pred,), lambda p: jnp.mean((p - y) ** 2))
    # the whole step for new arguments still equals the original
    new = (params, opt_state, x * 2.0, y[::-1])
    for ours, theirs in zip(jax.tree.leaves(g.as_function()(*new)), jax.tree.leaves(step(*new))):
        allclose(ours, theirs, rtol=1e-5)


def loss_wx(w, x):
    h = jnp.tanh(x @ w)
    return jnp.sum(h**2)


class Loss:
    def __call__(self, w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(h**2)


# each binds an `h` of its own (2 * xs) and transforms something that is not a plain
# function: a partial, a callable object, another transform; or uses a factory form
def grad_of_partial(w, xs):
    h = xs * 2.0
    return jax.grad(functools.partial(loss_wx, x=h))(w)


def vmap_of_partial(w, xs):
    h = xs * 2.0
    return jax.vmap(functools.partial(loss_wx, w))(h)


def grad_of_object(w, xs):
    h = xs * 2.0
    return jax.grad(Loss())(w, h)


def vmap_of_grad(w, xs):
    h = xs * 2.0
    return jax.vmap(jax.grad(loss_wx), (None, 0))(w, h).sum(0)


def grad_factory(w, xs):
    h = xs * 2.0
    return eqx.filter_grad(has_aux=False)(loss_wx)(w, h)


def jit_of_grad(w, xs):
    h = xs * 2.0
    return jax.jit(jax.grad(loss_wx))(w, h)


def partial_of_grad(w, xs):
    h = xs * 2.0
    return functools.partial(jax.grad, argnums=0)(loss_wx)(w, h)


@pytest.mark.parametrize(
    "fn, inner",
    [
        (grad_of_partial, "loss_wx"),
        (vmap_of_partial, "loss_wx"),
        (grad_of_object, "Loss"),
        (vmap_of_grad, "loss_wx"),
        (grad_factory, "loss_wx"),
        (jit_of_grad, "loss_wx"),
        (partial_of_grad, "loss_wx"),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_the_transformed_function_has_a_frame_of_its_own(fn, inner, data):
    xs, w = data
    g = js.trace(fn, w, xs)
    allclose(g.value("h"), 2.0 * xs)  # the caller's own h, unambiguous
    allclose(g.value(f"{inner}/h"), jnp.tanh(2.0 * xs @ w))
    if fn is vmap_of_partial:  # what the call returns is the function's value, batched
        allclose(g.value(inner), jax.vmap(functools.partial(loss_wx, w))(2.0 * xs))
    else:  # a gradient, not the function's value
        assert not any(n == inner or n.startswith(f"{inner}[") for n in g.names())
    allclose(g.value("out"), fn(w, xs), rtol=1e-5)
    allclose(g.as_function()(w.T, xs[::-1]), fn(w.T, xs[::-1]), rtol=1e-5)


class Encoder(eqx.Module):
    l1: eqx.nn.Linear

    def __init__(self, key):
        self.l1 = eqx.nn.Linear(3, 8, key=key)

    def encode(self, x):
        enc = jnp.tanh(self.l1(x))
        return enc

    def __call__(self, xs):
        e = jax.vmap(self.encode)(xs)  # an Equinox bound method (a pytree) through vmap
        return e.sum()


def test_an_equinox_method_is_rewritten_directly_and_through_vmap():
    model = Encoder(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    enc = jnp.tanh(xs @ model.l1.weight.T + model.l1.bias)

    def direct(model, x):
        return model.encode(x)

    def batched(model, xs):
        return model(xs)

    allclose(js.trace(direct, model, xs[0]).value("model.encode/enc"), enc[0])
    g = js.trace(batched, model, xs)
    allclose(g.value("model/encode/enc"), enc)
    check_slice(g.slice("model/encode/enc", "out"), (enc,), jnp.sum)


def test_a_patch_of_a_value_jax_differentiates_says_its_gradients_miss_the_patch(data):
    x, w = data[0][0], data[1]

    def double(h):
        return 2.0 * h

    def step(w, x):
        return jax.value_and_grad(loss_wx)(w, x)

    def patched_by_hand(w, x):  # the patch where the function is written
        return jnp.sum(double(jnp.tanh(x @ w)) ** 2)

    g = js.trace(step, w, x)
    with pytest.warns(UserWarning, match="do not differentiate the patch"):
        patched = g.replace("loss_wx/h", double)
    value, _ = patched.as_function()(w, x)
    allclose(value, patched_by_hand(w, x), rtol=1e-5)  # the values see the patch
    with pytest.warns(UserWarning, match="jax.grad\\(g.replace"):
        g.patch_fn("loss_wx/h")
    with pytest.warns(UserWarning, match="g.rewrite: .* do not differentiate the patch"):
        g.rewrite(jnp.tanh, jax.nn.gelu, jnp.ones((3, 4)))  # its backward pass is tanh's
    # the way the warning gives: trace the loss, patch it, differentiate that
    loss_graph = js.trace(loss_wx, w, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing differentiated there, and under vmap
        through = jax.grad(loss_graph.replace("h", double).as_function())(w, x)
        js.trace(batched, data[0], w).replace("mlp/h", double)
    allclose(through, jax.grad(patched_by_hand)(w, x), rtol=1e-5)
