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
import jaxtyping
import optax
import pytest
from conftest import allclose, assert_at_callers_line, check_slice
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import checkify

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
    model = eqx.filter_jit(MLP)(jax.random.key(0))  # (jitted: faster than eagerly)
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
    # (the references under jit: run eagerly, each operation compiles on its own)
    check_slice(g.slice("loss/pred", "value"), (pred,), jax.jit(lambda p: jnp.mean((p - y) ** 2)))
    # the forward value feeds the backward pass: d(mean((p - y)^2))/d(l2.bias), by hand
    check_slice(
        g.slice("loss/pred", "grads.l2.bias"),
        (pred,),
        jax.jit(lambda p: 2.0 * jnp.mean(p - y)[None]),
    )
    check_slice(
        g.slice("loss/model/hidden", "value"),
        (hidden,),
        jax.jit(lambda h: jnp.mean((h @ model.l2.weight[0] + model.l2.bias[0] - y) ** 2)),
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
    params = jax.jit(model.init)(jax.random.key(0), x)  # (jitted: faster than eagerly)
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
    # (the references under jit: run eagerly, each operation compiles on its own)
    check_slice(g.slice("loss_fn/pred", "loss"), (pred,), jax.jit(lambda p: jnp.mean((p - y) ** 2)))
    # the whole step for new arguments still equals the original
    new = (params, opt_state, x * 2.0, y[::-1])
    theirs_all = jax.tree.leaves(jax.jit(step)(*new))
    for ours, theirs in zip(jax.tree.leaves(g.as_function()(*new)), theirs_all):
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
    with pytest.warns(UserWarning, match="do not differentiate the patch") as warned:
        patched = g.replace("loss_wx/h", double)
    assert_at_callers_line(warned)
    value, _ = patched.as_function()(w, x)
    allclose(value, patched_by_hand(w, x), rtol=1e-5)  # the values see the patch
    with pytest.warns(UserWarning, match="jax.grad\\(g.replace") as warned:
        g.patch_fn("loss_wx/h")
    assert_at_callers_line(warned)
    with pytest.warns(UserWarning, match="g.rewrite: .* do not differentiate the patch") as warned:
        g.rewrite(jnp.tanh, jax.nn.gelu, jnp.ones((3, 4)))  # its backward pass is tanh's
    assert_at_callers_line(warned)
    # the way the warning gives: trace the loss, patch it, differentiate that
    loss_graph = js.trace(loss_wx, w, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing differentiated there, and under vmap
        through = jax.grad(loss_graph.replace("h", double).as_function())(w, x)
        js.trace(batched, data[0], w).replace("mlp/h", double)
    allclose(through, jax.grad(patched_by_hand)(w, x), rtol=1e-5)


def test_a_patch_of_a_gradient_the_step_computes_is_not_a_differentiated_value(data):
    """Clipping the gradient a training step computes: the gradient is made by the
    backward pass, which nothing differentiates, so the patched step is the step with
    the patch and no warning says otherwise."""
    x, w = data[0][0], data[1]

    def clip(gw):
        return jnp.clip(gw, -0.01, 0.01)

    def step(w, x):
        gw = jax.grad(loss_wx)(w, x)
        return w - 0.1 * gw

    def clipped_by_hand(w, x):
        return w - 0.1 * clip(jax.grad(loss_wx)(w, x))

    g = js.trace(step, w, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched = g.replace("gw", clip)
    allclose(patched.as_function()(w, x), clipped_by_hand(w, x), rtol=1e-5)

    # a gradient penalty differentiates its gradient: that patch still warns
    def penalty_grad(w, x):
        def penalty(w):
            gw = jax.grad(loss_wx)(w, x)
            return jnp.sum(gw**2)

        return jax.grad(penalty)(w)

    with pytest.warns(UserWarning, match="do not differentiate the patch") as warned:
        js.trace(penalty_grad, w, x).replace("penalty/gw", clip)
    assert_at_callers_line(warned)


# Inside a transformed function, JAX remakes whole the sub-programs it traced on their
# own (a jit call, a scan body, a checkpoint): their values are named through tags the
# transform keeps. A module-level jitted layer: its twin is cached across traces, with
# and without a transform around its calls.
@jax.jit
def dense(w, h):
    pre = h @ w
    return jnp.tanh(pre)


def block(c):
    inner = jnp.cos(c) * 2.0
    return inner + c


def deep_loss(w, x):
    h1 = dense(w, x)
    h2 = dense(w, h1)

    def step(carry, _):
        nxt = jnp.sin(carry) * 0.5 + carry
        return nxt, nxt

    c, _ = jax.lax.scan(step, h2, None, length=4)
    blocked = jax.checkpoint(block)(c)
    return jnp.sum(blocked**2)


def deep_values(w, x):
    """The values deep_loss names, by hand: pre of both dense calls, nxt per step, inner."""
    pre0 = x @ w
    pre1 = jnp.tanh(pre0) @ w
    c, nxt = jnp.tanh(pre1), []
    for _ in range(4):
        c = jnp.sin(c) * 0.5 + c
        nxt.append(c)
    return pre0, pre1, nxt, jnp.cos(c) * 2.0


def _steps(c, n):
    for _ in range(n):
        c = jnp.sin(c) * 0.5 + c
    return c


def deep_rest(w, pre1):
    """deep_loss as a function of the second layer's pre-activation."""
    c = _steps(jnp.tanh(pre1), 4)
    return jnp.sum((jnp.cos(c) * 2.0 + c) ** 2)


def deep_train(w, x):
    return jax.value_and_grad(deep_loss)(w, x)


def deep_batched(w, xs):
    return jax.vmap(deep_loss, (None, 0))(w, xs)


@pytest.mark.parametrize("first_untransformed", [False, True])
@pytest.mark.parametrize("fn", [deep_train, deep_batched], ids=lambda f: f.__name__)
def test_names_inside_jit_calls_loops_and_checkpoints_under_a_transform(fn, first_untransformed):
    w = 0.5 * jax.random.normal(jax.random.key(0), (3, 3))
    x = jax.random.normal(jax.random.key(1), (2, 3))
    args = (w, x) if fn is deep_train else (w, jnp.stack([x, -2.0 * x]))
    if first_untransformed:  # the layer's jaxpr is in JAX's cache, traced without tags
        js.trace(deep_loss, w, x)
    for _ in range(2):  # the second time, JAX's cache serves every jit call
        g = js.trace(fn, *args)
        want = deep_values(w, x)
        if fn is deep_batched:  # the batch: x, then -2x
            other = deep_values(w, -2.0 * x)
            want = jax.tree.map(lambda a, b: jnp.stack([a, b]), want, other)
        pre0, pre1, nxt, inner = want
        allclose(g.value("deep_loss/dense#0/pre"), pre0)
        allclose(g.value("deep_loss/dense#1/pre"), pre1)
        for t in (0, 3):
            allclose(g.value(f"deep_loss/step/nxt@{t}"), nxt[t])
        allclose(g.value("deep_loss/block/inner"), inner)
    # no token is a name, and the tags change no number of the whole function
    assert not any("__js" in n for n in g.names())
    new = (w.T, args[1][::-1])
    # (the references under jit: run eagerly, each operation compiles on its own)
    allclose(g.as_function()(*new), jax.jit(fn)(*new), rtol=1e-5)
    if fn is deep_train:
        s = g.slice("deep_loss/dense#1/pre", "out[0]")
        check_slice(s, (pre1,), jax.jit(lambda p: deep_rest(w, p)))
        s = g.slice("deep_loss/step/nxt@1", "deep_loss/block/inner")
        check_slice(s, (nxt[1],), jax.jit(lambda c: jnp.cos(_steps(c, 2)) * 2.0))


class GRURNN(eqx.Module):
    cell: eqx.nn.GRUCell
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.cell = eqx.nn.GRUCell(2, 6, key=k1)
        self.out = eqx.nn.Linear(6, 1, key=k2)

    def __call__(self, xs):
        def step(state, x):
            state = self.cell(x, state)
            return state, state

        last, _ = jax.lax.scan(step, jnp.zeros(6), xs)
        return self.out(last)[0]


def gru_loss(model, xs, y):
    pred = jax.vmap(model)(xs)
    return jnp.mean((pred - y) ** 2)


def test_an_equinox_gru_scanned_under_vmap_and_a_gradient_names_its_steps():
    model = eqx.filter_jit(GRURNN)(jax.random.key(0))  # (jitted: faster than eagerly)
    xs = jax.random.normal(jax.random.key(1), (4, 7, 2))
    y = jnp.arange(4.0)

    def step(model, xs, y):
        return eqx.filter_value_and_grad(gru_loss)(model, xs, y)

    g = js.trace(step, model, xs, y)
    states, state = [], jnp.zeros((4, 6))
    for t in range(7):  # by hand: the cell over the batch, step by step
        state = jax.vmap(model.cell)(xs[:, t], state)
        states.append(state)
    for t in (0, 3, 6):
        allclose(g.value(f"gru_loss/model/step/state#1@{t}"), states[t])
    # the cell's scope in the forward scan is its state (not also the residuals the
    # backward scan reads); the transposed scan's scopes are the backward pass's
    allclose(g.value("eqx.nn.GRUCell@3"), states[3])
    forward = {g["eqx.nn.GRUCell@3"].name, "gru_loss/model/step/cell@3"}
    scoped = [v for v in g.select("**GRUCell*@3") if v.name not in forward]
    assert scoped and all(
        n.startswith("grad(eqx.nn.GRUCell)")
        for v in scoped
        for n in (v.name, *v.aliases)
        if "GRUCell" in n
    ), [(v.name, v.aliases) for v in scoped]
    pred = jax.vmap(model)(xs)
    check_slice(
        g.slice("gru_loss/model/step/state#1@6", "out[0]"),
        (states[6],),
        jax.jit(lambda s: jnp.mean((s @ model.out.weight[0] + model.out.bias[0] - y) ** 2)),
    )
    allclose(g.value("out[0]"), jnp.mean((pred - y) ** 2))


def test_a_gradient_of_a_backward_pass_output_wrt_a_differentiated_value_says_what_it_is():
    """Under jax.grad, tanh's derivative reads tanh's result: perturbing ``loss/h`` in the
    traced program moves the gradient, where a zero perturbation added in ``loss`` would
    not. The loss itself (forward) is the hand-written trick's; its gradient says so."""
    w, x = jnp.array([0.3, -0.5]), jnp.array([1.0, 2.0])

    def step(w, x):
        def loss(w):
            h = jnp.tanh(x * w)
            return jnp.sum(h * 2.0)

        return jax.value_and_grad(loss)(w)

    g = js.trace(step, w, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note for the forward value
        allclose(g.grads("out[0]", wrt=["loss/h"])["loss/h"], jnp.full(2, 2.0))
        assert not g.slice("loss/h", "out[0]").notes
    with pytest.warns(UserWarning, match="backward pass, whose equations read the value") as warned:
        g.grads("out[1]", wrt=["loss/h"])
    assert_at_callers_line(warned)
    fn = g.grads_fn("out[1]", ["loss/h"])
    assert any("backward pass" in n for n in fn.notes)
    assert any("backward pass" in n for n in g.slice("loss/h", "out[1]").notes)


def test_no_backward_pass_note_where_the_value_reaches_the_outputs_through_forward_equations():
    """The note is for a backward pass that reads the value (or what it makes); a
    value no backward equation depends on (``h = x * w`` under a linear loss, whose
    gradient is ``3 x``) got it too, though its gradients are the hand-written trick's."""
    w, x = jnp.array([0.3, -0.5]), jnp.array([1.0, 2.0])

    def step(w, x):
        def loss(w):
            h = x * w
            return jnp.sum(h * 3.0) + jnp.sum(jnp.tanh(w))

        return jax.value_and_grad(loss)(w)

    g = js.trace(step, w, x)

    def trick(eps):  # the zero perturbation at h, added in the function's code
        def loss(w):
            return jnp.sum((x * w + eps) * 3.0) + jnp.sum(jnp.tanh(w))

        val, grad = jax.value_and_grad(loss)(w)
        return val + grad.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = g.grads(["out[0]", "out[1]"], wrt=["loss/h"])["loss/h"]
        assert not g.grads_fn(["out[0]", "out[1]"], ["loss/h"]).notes
    allclose(got, jax.grad(trick)(jnp.zeros(2)))


def test_the_functions_vjp_and_linearize_return_name_none_of_their_residuals(data):
    """``o, pullback = jax.vjp(...)``: the pullback holds residuals; they named the
    program's values (``pullback[<flat index 1>][1]`` was the canonical name of
    ``mlp#1/h`` and ``g.select("pullback*")`` selected ``w``)."""
    x, w = data[0][0], data[1]

    def f(x, w):
        o, pullback = jax.vjp(lambda x: mlp(x, w), x)
        (ct,) = pullback(o)
        y, lin = jax.linearize(lambda x: mlp(x, w), x)
        return jnp.sum(ct) + y * lin(x)

    g = js.trace(f, x, w)
    assert not [n for n in g.names() if "flat index" in n or n.startswith(("pullback", "lin["))]
    assert g["mlp#0/h"].name == "mlp#0/h"
    allclose(g.value("ct"), jax.grad(mlp)(x, w) * mlp(x, w))


def scoped_rnn(w, xs):
    def step(h, x):
        with jax.named_scope("cell"):
            a = jnp.tanh(h @ w + x)
            h = a * 2.0 + jnp.sin(a)
        return h, h

    _, hs = jax.lax.scan(step, jnp.zeros(4), xs)
    return jnp.sum(hs**2)


def test_a_scope_in_a_scan_body_under_a_gradient_is_its_forward_value():
    """The forward scan of jax.grad also stacks what the backward one reads (tanh's and
    sin's derivatives): those are not the scope's values; the transposed scan's scope
    is ``grad(cell)``, and no transform's mark (``jvp()``) enters a name."""
    w = jnp.eye(4) * 0.5 + 0.1
    xs = jax.random.normal(jax.random.key(0), (6, 4))
    g = js.trace(lambda w, xs: jax.value_and_grad(scoped_rnn)(w, xs), w, xs)
    h, states = jnp.zeros(4), []
    for t in range(6):
        a = jnp.tanh(h @ w + xs[t])
        h = a * 2.0 + jnp.sin(a)
        states.append(h)
    allclose(g.value("cell@2"), states[2])
    state = g["cell@2"]
    others = [v for v in g.select("**cell*@2") if v.name != state.name]
    assert others and all(
        n.startswith("grad(cell)") for v in others for n in (v.name, *v.aliases) if "cell" in n
    ), [(v.name, v.aliases) for v in others]
    check_slice(
        g.slice("cell@4", "out[0]"),
        (states[4],),
        lambda h4: sum(s @ s for s in states[:4]) + _rest(h4, w, xs),
    )


def _rest(h, w, xs):  # the loss from the state after step 4, by hand
    a = jnp.tanh(h @ w + xs[5])
    return jnp.sum((a * 2.0 + jnp.sin(a)) ** 2) + h @ h


def branchy(w, x):
    def pos(v):
        up = jnp.sin(v) * 3.0
        return up

    def neg(v):
        down = jnp.cos(v) * 3.0
        return down

    y = jax.lax.cond(x.sum() > 0, pos, neg, x @ w)

    def body(carry):
        i, v = carry
        shrunk = v * 0.9
        return i + 1, shrunk

    _, z = jax.lax.while_loop(lambda carry: carry[0] < 3, body, (0, y))
    return jnp.sum(z**2)


def branchy_jvp(w, x):
    return jax.jvp(branchy, (w, x), (jnp.ones_like(w), jnp.zeros_like(x)))


def branchy_vmap(w, xs):
    return jax.vmap(branchy, (None, 0))(w, xs)


@pytest.mark.parametrize("fn", [branchy_jvp, branchy_vmap], ids=lambda f: f.__name__)
def test_names_inside_cond_branches_and_while_bodies_under_a_transform(fn):
    w = 0.3 * jax.random.normal(jax.random.key(0), (3, 3))
    x = jnp.abs(jax.random.normal(jax.random.key(1), (3,)))  # sum > 0: the `pos` branch
    batch = fn is branchy_vmap
    g = js.trace(fn, w, jnp.stack([x, 2.0 * x]) if batch else x)
    up = jnp.sin(x @ w) * 3.0
    allclose(
        g.value("branchy/pos/up"), jnp.stack([up, jnp.sin(2.0 * x @ w) * 3.0]) if batch else up
    )
    allclose(g.value("branchy/body/shrunk@1")[0] if batch else g.value("branchy/body/shrunk@1"),
             up * 0.9**2)  # fmt: skip
    new = (w.T, jnp.stack([x, -x]) if batch else -x)  # the other branch too
    allclose(g.as_function()(*new), fn(*new), rtol=1e-5)


# A transform decorating a function defined in the traced one applies to its rewritten
# copy, as a call of the transform does.
def decorated(kind, w, xs):
    if kind == "vmap":

        @jax.vmap
        def run(x):
            h = jnp.tanh(x @ w)
            return h * 2.0

    elif kind == "partial":

        @functools.partial(jax.vmap, in_axes=0)
        def run(x):
            h = jnp.tanh(x @ w)
            return h * 2.0

    elif kind == "nnx factory":

        @nnx.vmap(in_axes=0)
        def run(x):
            h = jnp.tanh(x @ w)
            return h * 2.0

    else:

        @jax.grad
        def run(x):
            h = jnp.tanh(x @ w)
            return jnp.sum(h * 2.0)

    out = run(xs)
    return out.sum()


@pytest.mark.parametrize("kind", ["vmap", "partial", "nnx factory", "grad"])
def test_a_transform_decorating_a_nested_function_names_inside_it(kind, data):
    xs, w = data[0][0], data[1]
    g = js.trace(functools.partial(decorated, kind), w, xs)
    allclose(g.value("run/h"), jnp.tanh(xs @ w))
    # a derivative's call is not named after the function (it returns a gradient)
    assert ("run" in g.names()) == (kind != "grad")
    allclose(g.as_function()(w.T, xs[::-1]), decorated(kind, w.T, xs[::-1]), rtol=1e-5)


# A checkpointed function called twice: JAX traces its body once and serves the second
# call from its cache; each call names its own values, also under a derivative, where
# the backward pass's recomputed copies are not named again.
def ckpt_block(w, h):
    pre = h @ w
    return jnp.sin(pre) * 2.0


def ckpt_loss(w, x):
    f = jax.checkpoint(ckpt_block)
    h1 = f(w, x)
    h2 = f(w, h1)
    return jnp.sum(h2**2)


def ckpt_train(w, x):
    return jax.value_and_grad(ckpt_loss)(w, x)


@pytest.mark.parametrize("fn, prefix", [(ckpt_loss, ""), (ckpt_train, "ckpt_loss/")])
def test_each_call_of_a_checkpointed_function_names_its_own_values(fn, prefix, data):
    w, x = data[1][:3, :3], data[0][0, 0, :3]
    pre1 = x @ w
    pre2 = (jnp.sin(pre1) * 2.0) @ w
    g = js.trace(fn, w, x)
    allclose(g.value(f"{prefix}f#0/pre"), pre1)
    allclose(g.value(f"{prefix}f#1/pre"), pre2)
    check_slice(
        g.slice(f"{prefix}f#1/pre", "out" if fn is ckpt_loss else "out[0]"),
        (pre2,),
        lambda p: jnp.sum((jnp.sin(p) * 2.0) ** 2),
    )


@pytest.mark.parametrize(
    "outer",
    [
        jax.grad,
        lambda f: jax.vmap(f, in_axes=(0, None)),
        lambda f: jax.value_and_grad(f, argnums=1),
    ],
    ids=["grad", "vmap", "value_and_grad"],
)
def test_a_transform_of_a_checkpoint_made_at_the_call_names_inside(outer, data):
    """``jax.grad(jax.checkpoint(mlp))(x, w)``: both transforms made where they are
    called; what ``mlp`` binds is named (the outer transform ran the checkpoint as it
    was, so nothing inside was)."""
    x, w = data

    def step(x, w):
        return outer(jax.checkpoint(mlp))(x, w)

    g = js.trace(step, x[0], w)
    allclose(g.value("mlp/h"), jnp.tanh(x[0] @ w))
    allclose(g.as_function()(x[1], w), step(x[1], w))


def tagged_block(w, x):
    pre = checkpoint_name(x @ w, "p")
    q = js.tag(jnp.tanh(pre), "q")
    return jnp.sin(q)


def tagged_blocks(ws, x):
    h = x
    for w in ws:
        h = jax.checkpoint(tagged_block)(w, h)
    return jnp.sum(h**2)


def test_tags_in_a_checkpoint_are_not_named_again_in_its_recomputation():
    """``js.trace(jax.grad(f))``: a checkpoint's body runs again in the backward pass;
    the tags there (``checkpoint_name``, ``js.tag``) named those copies ``q#3``..."""
    ws = [jnp.eye(3) * (i + 1) / 3 for i in range(3)]
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    g = js.trace(jax.grad(tagged_blocks), ws, x)
    assert len(g.select("q")) == len(g.select("p")) == 3
    h = x
    for k, w in enumerate(ws):
        allclose(g.value(f"p#{k}"), h @ w)
        allclose(g.value(f"q#{k}"), jnp.tanh(h @ w))
        h = jnp.sin(jnp.tanh(h @ w))


def test_names_under_linearize_of_a_checkpoint_name_the_forward_values_once():
    """``jax.linearize(jax.checkpoint(f))``: its linear function recomputes the
    checkpointed forward values (a checkpoint with ``differentiated=True``); what
    ``f`` binds and the tags inside were named twice (``f/q#0``, ``f/q#1``)."""

    def f(x):
        q = jnp.sin(x) * 2
        return jnp.tanh(q).sum()

    def lin(x):
        y, f_jvp = jax.linearize(jax.checkpoint(f), x)
        return y + f_jvp(jnp.ones_like(x))

    def lin_blocks(ws, x):
        y, f_jvp = jax.linearize(lambda x: tagged_blocks(ws, x), x)
        return y + f_jvp(jnp.ones_like(x))

    x = jnp.linspace(0.1, 1.0, 3)
    g = js.trace(lin, x)
    assert [n for n in g.names() if n.startswith("f/q")] == ["f/q"]
    allclose(g.value("f/q"), 2 * jnp.sin(x))
    allclose(g.as_function()(x + 1), lin(x + 1))
    ws = [jnp.eye(3) * (i + 1) / 3 for i in range(3)]
    xs = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    g = js.trace(lin_blocks, ws, xs)
    assert len(g.select("q")) == len(g.select("p")) == 3
    allclose(
        g.value("q#2"), jnp.tanh(jnp.sin(jnp.tanh(jnp.sin(jnp.tanh(xs @ ws[0])) @ ws[1])) @ ws[2])
    )


def test_a_tag_in_a_checkpointed_scan_body_under_a_gradient_names_the_forward_value():
    """The backward scan recomputes the checkpointed body: its tag was ``pre#1@t``, and
    ``pre@0`` was ambiguous."""

    def cell(c, xi):
        pre = js.tag(c * xi + 1.0, "pre")
        return jnp.tanh(pre), None

    def loss(w, xs):
        fin, _ = jax.lax.scan(jax.checkpoint(cell), w, xs)
        return fin.sum()

    w, xs = jnp.array([0.3, 0.5]), jnp.ones((3, 2))
    g = js.trace(jax.grad(loss), w, xs)
    allclose(g.value("pre@0"), w + 1.0)
    allclose(g.value("pre@1"), jnp.tanh(w + 1.0) + 1.0)


def test_a_tag_in_a_custom_vjp_backward_rule_is_named():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (js.tag(c * g, "bwd"),))
    w = jnp.array([0.3, 0.5])
    g = js.trace(jax.grad(lambda w: f(w).sum()), w)
    allclose(g.value("bwd"), jnp.cos(w))


def test_a_checkpointed_scan_body_under_a_derivative_is_named_once(data):
    """The backward pass's scan recomputes a checkpointed body: its copies are not named
    again, so the parameter is ``h#0`` and the rebinding ``h#1`` at every step, as
    without the derivative (the copies took ``#k`` forms: ``h#1@2`` was step 2's input
    and ``pre@2`` was ambiguous)."""

    def loss(w, x):
        @jax.checkpoint
        def body(h, wt):
            pre = h @ wt
            h = jnp.tanh(pre)
            return h, None

        h, _ = jax.lax.scan(body, x, w)
        return jnp.sum(h**2)

    def train(w, x):
        return jax.value_and_grad(loss)(w, x)

    w = jax.random.normal(jax.random.key(0), (40, 3, 3)) / 2  # folded (40 steps)
    x = data[0][0, 0, :3]
    hs, pres = [x], []
    for t in range(40):
        pres.append(hs[-1] @ w[t])
        hs.append(jnp.tanh(pres[-1]))
    for fn, prefix, out in ((loss, "", "out"), (train, "loss/", "out[0]")):
        g = js.trace(fn, w, x)
        allclose(g.value(f"{prefix}body/h#0@2"), hs[2])
        allclose(g.value(f"{prefix}body/h#1@2"), hs[3])
        allclose(g.value(f"{prefix}body/pre@2"), pres[2])

        def rest(h3):
            for t in range(3, 40):
                h3 = jnp.tanh(h3 @ w[t])
            return jnp.sum(h3**2)

        grads = g.grads(out, wrt=[f"{prefix}body/h#1@2"])
        allclose(grads[f"{prefix}body/h#1@2"], jax.grad(rest)(hs[3]), rtol=1e-5)


def test_a_checkpoint_policy_that_saves_named_values_keeps_what_it_saves(data):
    """Inside such a checkpoint marks add no tags (a tag would be a named value the
    policy saves): the program that runs saves what the function's does."""
    policy = jax.checkpoint_policies.save_any_names_but_these("pre")

    def loss(w, x):
        f = jax.checkpoint(ckpt_block, policy=policy)
        return jnp.sum(f(w, x) ** 2)

    def train(w, x):
        return jax.value_and_grad(loss)(w, x)

    w, x = data[1][:3, :3], data[0][0, 0, :3]
    g = js.trace(train, w, x)

    def saved(fn):
        jaxpr = jax.make_jaxpr(fn)(w, x).jaxpr
        return [len(e.invars) for e in jaxpr.eqns if e.primitive.name in ("checkpoint", "remat2")]

    assert saved(g.as_function()) == saved(train)
    allclose(g.as_function()(w, x), train(w, x))


# A jit inside a jit, under a transform: the inner call's equation is in a sub-program
# the transform remakes, so its values are found by their tags too.
@jax.jit
def inner_layer(w, h):
    pre_i = h @ w
    return jnp.tanh(pre_i)


@jax.jit
def outer_layer(w, h):
    a = inner_layer(w, h)
    return a * 0.5


def nested_loss(w, x):
    return jnp.sum(outer_layer(w, x) ** 2)


def nested_train(w, x):
    return jax.value_and_grad(nested_loss)(w, x)


def nested_batched(w, xs):
    return jax.vmap(nested_loss, (None, 0))(w, xs)


@pytest.mark.parametrize("fn", [nested_train, nested_batched], ids=lambda f: f.__name__)
def test_names_inside_a_jit_inside_a_jit_under_a_transform(fn, data):
    w, x = data[1][:3, :3], data[0][0, 0, :3]
    xs = jnp.stack([x, 2.0 * x])
    g = js.trace(fn, w, x if fn is nested_train else xs)
    want = x @ w if fn is nested_train else xs @ w
    allclose(g.value("nested_loss/outer_layer/inner_layer/pre_i"), want)


# -- functions a transform made elsewhere: js.trace(jax.vmap(f), xs), module-level twins ------

#: made once, at module level: JAX's closures around ``mlp``, as a user would keep them
BATCHED_MLP = jax.vmap(mlp, (0, None))
GRAD_MLP = jax.grad(mlp, argnums=1)


@pytest.mark.parametrize(
    "made, batch",
    [
        (jax.vmap(mlp, (0, None)), True),
        (jax.jit(jax.vmap(mlp, (0, None))), True),
        (jax.checkpoint(mlp, policy=jax.checkpoint_policies.dots_saveable), False),
        (jax.grad(mlp, argnums=1), False),
        (jax.value_and_grad(mlp), False),
        (jax.jacrev(mlp, argnums=1), False),
        (jax.vmap(jax.grad(mlp, argnums=1), (0, None)), True),
    ],
    ids=["vmap", "jit-vmap", "checkpoint", "grad", "value_and_grad", "jacrev", "vmap-grad"],
)
def test_tracing_a_transformed_function_names_the_function_inside(made, batch, data):
    """``js.trace(jax.vmap(f), xs)`` names ``f``'s values as ``js.trace(f, x)`` does
    (under vmap the batch, under a derivative the forward pass), and the graph runs the
    transform: at new arguments its function equals the transformed function."""
    x, w = data
    x = x if batch else x[0]
    closure = getattr(made, "__closure__", None) or ()
    before = [c.cell_contents for c in closure]
    g = js.trace(made, x, w)
    assert {"h", "z"} <= set(g.names()), g.names()
    allclose(g.value("h"), jnp.tanh(x @ w))
    allclose(g.value("z"), 2.0 * jnp.tanh(x @ w))
    x2, w2 = x + 0.3, 0.7 * w
    allclose(g.as_function()(x2, w2), made(x2, w2))
    assert [c.cell_contents for c in closure] == before  # what the user passed is unchanged
    assert not any("not user code" in n for n in g.notes), g.notes


def test_a_module_level_transformed_function_called_inside_is_a_call_with_names(data):
    """``BATCHED_MLP = jax.vmap(mlp)`` made at import, called in the traced function:
    a call named at its call site, its values named inside (they ran as they were)."""
    x, w = data

    def loss(x, w):
        per_example = BATCHED_MLP(x, w)
        dw = GRAD_MLP(x[0], w)
        return per_example.sum() + jnp.sum(dw**2)

    g = js.trace(loss, x, w)
    allclose(g.value("BATCHED_MLP/h"), jnp.tanh(x @ w))
    allclose(g.value("per_example"), jax.vmap(mlp, (0, None))(x, w))
    allclose(g.value("GRAD_MLP/h"), jnp.tanh(x[0] @ w))  # the forward pass
    allclose(g.value("dw"), jax.grad(mlp, argnums=1)(x[0], w))
    check_slice(
        g.slice("BATCHED_MLP/z", "out"),
        (g.value("BATCHED_MLP/z"),),
        lambda z: jnp.sum(z**2) + jnp.sum(jax.grad(mlp, argnums=1)(x[0], w) ** 2),
    )
    grads = g.grads("out", ["BATCHED_MLP/h"])
    allclose(grads["BATCHED_MLP/h"], 4.0 * 2.0 * jnp.tanh(x @ w))


def test_a_slice_from_a_differentiated_loop_value_says_so_as_an_unrolled_one_does():
    """The note of the test above for a value inside a scan the index keeps folded
    (``loss/step/h_new@2``): the slice's Jacobian equals the Python loop's, and so do the
    notes saying what it is (the loop's slice had none)."""
    w = jax.random.normal(jax.random.key(0), (3, 3)) / 2
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    h0 = jax.random.normal(jax.random.key(2), (3,))

    def unrolled(w, h0, xs):
        def loss(w):
            h = h0
            for t in range(5):
                h = jnp.tanh(w @ h + xs[t])
            return (h**2).sum()

        return w - 0.1 * jax.grad(loss)(w)

    def scanned(w, h0, xs):
        def loss(w):
            def step(h, x):
                h_new = jnp.tanh(w @ h + x)
                return h_new, None

            return (jax.lax.scan(step, h0, xs)[0] ** 2).sum()

        return w - 0.1 * jax.grad(loss)(w)

    flat = js.trace(unrolled, w, h0, xs).slice("loss/h#3", "out")
    loop = js.trace(scanned, w, h0, xs).slice("loss/step/h_new@2", "out")
    at = flat.input_values()
    allclose(jax.jacfwd(loop)(*at), jax.jacfwd(flat)(*at), atol=1e-6)
    for s in (flat, loop):
        assert any("backward pass" in n for n in s.notes), s.notes


class ScanCell(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        pre = nn.Dense(4)(h) + x
        h_new = jnp.tanh(pre)
        return h_new, h_new


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, xs):
        scan = nn.scan(ScanCell, variable_broadcast="params", split_rngs={"params": False})
        _, ys = scan()(jnp.zeros(4), xs)
        return jnp.sum(ys**2)


def test_a_derivative_of_a_linen_modules_apply_names_what_its_methods_bind():
    """``jax.value_and_grad(net.apply)(v, xs)``: linen runs the methods (rewritten
    through its interceptors) under the derivative, which remakes what they traced:
    they were run untagged, so nothing inside was named (the closure form was)."""
    net, xs = ScanNet(), jnp.linspace(-1.0, 1.0, 20).reshape(5, 4)
    v = net.init(jax.random.key(0), xs)
    g = js.trace(lambda v, xs: jax.value_and_grad(net.apply)(v, xs), v, xs)
    dense = v["params"]["ScanScanCell_0"]["Dense_0"]
    h = jnp.zeros(4)
    for t in range(3):
        pre = h @ dense["kernel"] + dense["bias"] + xs[t]
        h = jnp.tanh(pre)
    allclose(g.value("ScanNet/ScanScanCell_0/pre@2"), pre)


class TransformedMethods(eqx.Module):
    """Methods a JAX transform decorates: a checkpointed ``__call__``, a vmapped method."""

    w: jax.Array

    @jax.checkpoint
    def __call__(self, x):
        h = jnp.sin(x @ self.w)
        return h * 2

    @functools.partial(jax.vmap, in_axes=(None, 0))
    def batched(self, x):
        hv = jnp.cos(x @ self.w)
        return hv


def test_a_method_a_jax_transform_decorates_names_what_it_binds():
    """``@jax.checkpoint`` on a module's ``__call__`` and ``@partial(jax.vmap, ...)`` on a
    method: the transform is made again around the rewritten method, bound to its
    object (nothing inside was named, and no note said so)."""
    blk, xs = TransformedMethods(jnp.eye(3) * 0.5), jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def fwd(blk, xs):
        a = blk(xs[0])
        b = blk.batched(xs)
        return a + b.sum(0)

    g = js.trace(fwd, blk, xs)
    allclose(g.value("blk/h"), jnp.sin(xs[0] @ blk.w))
    allclose(g.value("blk.batched/hv"), jnp.cos(xs @ blk.w))
    check_slice(
        g.slice("blk/h", "out"),
        (jnp.sin(xs[0] @ blk.w),),
        lambda h: h * 2 + jnp.cos(xs @ blk.w).sum(0),
    )
    allclose(
        jax.grad(lambda w: g.as_function()(TransformedMethods(w), xs).sum())(blk.w),
        jax.grad(lambda w: fwd(TransformedMethods(w), xs).sum())(blk.w),
    )
    allclose(js.trace(blk, xs[0]).value("h"), jnp.sin(xs[0] @ blk.w))
    allclose(js.trace(blk.batched, xs).value("hv"), jnp.cos(xs @ blk.w))


Vector = jaxtyping.Float[jax.Array, "d"]


class TypecheckedModule(eqx.Module):
    """A module whose ``__call__`` jaxtyping decorates (``functools.wraps``)."""

    w: jax.Array

    @jaxtyping.jaxtyped(typechecker=None)
    def __call__(self, x: Vector) -> Vector:
        h = jnp.sin(x @ self.w)
        y = h * 2
        return y


def test_equinox_transforms_of_a_module_whose_call_is_decorated_name_inside_it():
    """``eqx.filter_vmap(m)(xs)`` of a module with a decorated ``__call__`` (jaxtyping's
    ``jaxtyped``) ran it as it was: nothing inside named (``jax.vmap(m)`` was)."""
    m, xs = TypecheckedModule(jnp.eye(3) * 0.5), jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def by_jax(m, xs):
        return jax.vmap(m)(xs)

    def by_equinox(m, xs):
        return eqx.filter_vmap(m)(xs)

    for fwd in (by_jax, by_equinox):
        g = js.trace(fwd, m, xs)
        allclose(g.value("m/h"), jnp.sin(xs @ m.w))
        check_slice(g.slice("m/h", "out"), (jnp.sin(xs @ m.w),), lambda h: h * 2)


@eqx.filter_jit
def filter_jitted_loss(w, x):
    hid = jnp.tanh(w * x)
    return jnp.sum(hid**2)


@jax.jit
def jitted_loss(w, x):
    hid = jnp.tanh(w * x)
    return jnp.sum(hid**2)


@pytest.mark.parametrize("transform", [jax.grad, eqx.filter_grad], ids=["jax", "equinox"])
@pytest.mark.parametrize("loss", [filter_jitted_loss, jitted_loss], ids=["filter_jit", "jit"])
def test_a_derivative_of_a_jitted_loss_names_inside_it_at_every_trace(transform, loss):
    """``eqx.filter_grad(jitted loss)`` ran the loss as it was (nothing inside named)
    and its call named the gradient after the loss; ``jax.grad(jitted loss)`` named
    inside it at the first trace only (the second one JAX served from the twin's cache)."""

    def step(w, x):
        gr = transform(loss)(w, x)
        return gr

    w, x = jnp.ones(3) * 0.5, jnp.arange(3.0)
    name = "jitted_loss" if loss is jitted_loss else "filter_jitted_loss"
    for _ in range(2):
        g = js.trace(step, w, x)
        allclose(g.value(f"{name}/hid"), jnp.tanh(w * x))
        assert name not in g["gr"].aliases
        allclose(g.value("gr"), jax.grad(loss)(w, x))


@jax.jit
def shared_layer(x):
    pre = jnp.cos(x) * 2
    return jnp.tanh(pre)


def test_a_jitted_layer_called_batched_and_not_under_vmap_names_both_calls():
    """Under ``jax.vmap`` a call on unbatched values stays the jit's own equation, and a
    call on batched ones batches the jaxpr JAX cached from it (the body does not run
    again): the second call's values were unnamed, also in a later trace of another
    transform of the same function (``jax.grad`` first, then ``jax.vmap``)."""

    def f(w, x):
        a = shared_layer(w)  # not batched
        b = shared_layer(x)  # batched
        return (a * b).sum()

    w = jnp.linspace(0.1, 0.9, 3)
    xs = jnp.stack([w * 2, w * 3])
    grad_step = jax.grad(f, argnums=1)
    js.trace(grad_step, w, xs[0])  # (fills the jit's cache first)
    g = js.trace(lambda w, xs: jax.vmap(f, in_axes=(None, 0))(w, xs), w, xs)
    allclose(g.value("f/shared_layer#0/pre"), jnp.cos(w) * 2)
    allclose(g.value("f/shared_layer#1/pre"), jnp.cos(xs) * 2)
    g = js.trace(grad_step, w, xs[0])  # (f's values, named as in js.trace(f))
    allclose(g.value("shared_layer#1/pre"), jnp.cos(xs[0]) * 2)


def _passing(fn):
    """A user's decorator (``functools.wraps``) that calls the function as it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def _module_calling(decorator):
    class Decorated(eqx.Module):
        w: jax.Array

        @decorator
        def __call__(self, x):
            hid = jnp.tanh(self.w @ x)
            return hid * 2

    return Decorated(jnp.eye(3) * 0.5)


def _by_jax(m, xs):
    return jax.vmap(m)(xs)


def _by_equinox(m, xs):
    return eqx.filter_vmap(m)(xs)


@pytest.mark.parametrize(
    "decorator",
    [eqx.filter_jit, jax.jit, lambda f: jax.jit(_passing(f)), jax.checkpoint],
    ids=["filter_jit", "jit", "jit-over-decorator", "checkpoint"],
)
@pytest.mark.parametrize("batched", [_by_jax, _by_equinox], ids=["jax.vmap", "eqx.filter_vmap"])
def test_a_module_with_a_jitted_or_checkpointed_call_under_vmap_names_inside_it(decorator, batched):
    """``jax.vmap(m)`` / ``eqx.filter_vmap(m)`` of an Equinox module whose ``__call__``
    is jitted (or checkpointed): the jit's function runs rewritten, as for ``m(x)``
    (nothing inside was named)."""
    m, xs = _module_calling(decorator), jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    g = js.trace(batched, m, xs)
    hid = g.value("m/hid")  # (the whole batch, its axis where JAX's batching put it)
    allclose(hid if hid.shape == xs.shape else hid.T, jnp.tanh(xs @ m.w.T))
    allclose(js.trace(m, xs[0]).value("hid"), jnp.tanh(m.w @ xs[0]))


def test_a_jitted_layer_called_in_a_scan_and_after_it_under_vmap_names_each_call():
    """Under a transform a jitted layer's names are tokens in its jaxpr, which the
    scan's body and the call after the scan both hold: the scan's ``pre@t`` named the
    call after it (``model/step/layer/pre`` was ``model/layer/pre``)."""

    def model(xb, w):
        def step(h, t):
            v = shared_layer(h @ w + t)
            return v, v

        h, _ = jax.lax.scan(step, xb, jnp.arange(3.0))
        return shared_layer(h * 10.0)

    w = jnp.eye(3) * 0.7 + 0.1
    xbs = jnp.array([[0.5, -0.1, 0.2], [0.3, 0.3, -0.9]])
    for transformed in (
        lambda xbs, w: jax.vmap(model, in_axes=(0, None))(xbs, w),
        lambda xbs, w: jax.grad(lambda w: model(xbs[0], w).sum())(w),
    ):
        g = js.trace(transformed, xbs, w)
        h = xbs if g["model/shared_layer/pre"].ndim == 2 else xbs[0]
        for t in range(3):
            pre = h @ w + t
            allclose(g.value(f"model/step/shared_layer/pre@{t}"), jnp.cos(pre) * 2)
            h = jnp.tanh(jnp.cos(pre) * 2)
        allclose(g.value("model/shared_layer/pre"), jnp.cos(h * 10.0) * 2)


def test_a_jitted_layer_before_in_and_after_a_scan_under_vmap_names_each_call():
    """The two calls outside the loop both took both copies of the token (ambiguous
    names, and lay#0/pre#1 was the last call's value)."""

    def model(x):
        h0 = shared_layer(x * 0.5)

        def step(h, t):
            v = shared_layer(h + t)
            return v, v

        h, _ = jax.lax.scan(step, h0, jnp.arange(3.0))
        return shared_layer(h * 10.0)

    xs = jnp.array([[0.5, -0.1, 0.2], [0.3, 0.3, -0.9]])
    g = js.trace(jax.vmap(model), xs)
    allclose(g.value("shared_layer#0/pre"), jnp.cos(xs * 0.5) * 2)
    h = jnp.tanh(jnp.cos(xs * 0.5) * 2)
    for t in range(3):
        allclose(g.value(f"step/shared_layer/pre@{t}"), jnp.cos(h + t) * 2)
        h = jnp.tanh(jnp.cos(h + t) * 2)
    allclose(g.value("shared_layer#1/pre"), jnp.cos(h * 10.0) * 2)


class _StaticCall:
    def __init__(self, w):
        self.w = w

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def __call__(self, x, n):
        h = x
        for _ in range(n):
            h = jnp.tanh(self.w @ h)
        return h


def test_an_object_with_a_jitted_call_traced_itself_keeps_its_static_arguments():
    p, x = _StaticCall(jnp.eye(3) * 0.5), jnp.ones(3)
    g = js.trace(p, x, 3)
    assert [v.name for v in g.inputs] == ["x"]
    allclose(g.value("h#1"), jnp.tanh(0.5 * x))
    allclose(g.value("out"), p(x, 3))


def test_a_jitted_layer_in_an_unrolled_while_a_scan_and_around_them_under_vmap():
    """A while_loop the index unrolls holds its trips' copies in the flat program, a
    scan its body's in a template: body/lay/pre@0 named the scan's value, and the calls
    outside took the while's trips."""

    def model(x):
        a = shared_layer(x)

        def body(c):
            i, h = c
            return i + 1, shared_layer(h + 1.0)

        _, h = jax.lax.while_loop(lambda c: c[0] < 2, body, (0, a))

        def step(h, t):
            return shared_layer(h * t), None

        h, _ = jax.lax.scan(step, h, jnp.arange(1.0, 3.0))
        return shared_layer(h - 1.0)

    def by_hand(x):
        pre = {"shared_layer#0/pre": jnp.cos(x) * 2}
        h = jnp.tanh(pre["shared_layer#0/pre"])
        for t in range(2):
            pre[f"body/shared_layer/pre@{t}"] = jnp.cos(h + 1.0) * 2
            h = jnp.tanh(pre[f"body/shared_layer/pre@{t}"])
        for t in range(2):
            pre[f"step/shared_layer/pre@{t}"] = jnp.cos(h * (t + 1.0)) * 2
            h = jnp.tanh(pre[f"step/shared_layer/pre@{t}"])
        pre["shared_layer#1/pre"] = jnp.cos(h - 1.0) * 2
        return pre

    xs = jnp.array([[0.5, -0.1, 0.2], [0.3, 0.3, -0.9]])
    g = js.trace(jax.vmap(model), xs)
    for name, value in jax.vmap(by_hand)(xs).items():
        allclose(g.value(name), value)


@jax.jit
def _block_with_a_scan(x):
    def st(h, t):
        q = shared_layer(h + t)
        return q, None

    return jax.lax.scan(st, x, jnp.arange(2.0))[0]


def test_a_jitted_block_holding_a_scan_served_from_the_cache_keeps_its_loop_names():
    """A jit body's loop frames were not kept with its recording: once JAX served the
    block from its cache, its scan's names and the calls around it were ambiguous."""

    def model(x):
        a = shared_layer(x)
        return shared_layer(_block_with_a_scan(a))

    def other(x):
        return _block_with_a_scan(_block_with_a_scan(x) * 2.0)

    xs = jnp.array([[0.5, -0.1, 0.2], [0.3, 0.3, -0.9]])
    js.trace(jax.vmap(other), xs)  # (the block in JAX's cache)
    g = js.trace(jax.vmap(model), xs)
    allclose(g.value("shared_layer#0/pre"), jnp.cos(xs) * 2)
    h = jnp.tanh(jnp.cos(xs) * 2)
    for t in range(2):
        allclose(g.value(f"_block_with_a_scan/st/shared_layer/pre@{t}"), jnp.cos(h + t) * 2)
        h = jnp.tanh(jnp.cos(h + t) * 2)
    allclose(g.value("shared_layer#1/pre"), jnp.cos(h) * 2)


def _halving(x, n):
    h = x
    for _ in range(n):
        h = jnp.tanh(h * 0.5)
    return h


class _StaticMethodCall:
    __call__ = staticmethod(jax.jit(_halving, static_argnums=1))


def test_an_object_whose_call_is_a_jitted_staticmethod_traces_with_its_statics():
    """inspect takes an object's ``__call__`` as bound, so a staticmethod lost its first
    parameter: "the arguments do not fit fn(n)"."""
    obj, x = _StaticMethodCall(), jnp.ones(3)
    g = js.trace(obj, x, 3)
    assert [v.name for v in g.inputs] == ["x"]
    allclose(g.value("h#1"), jnp.tanh(x * 0.5))
    allclose(g.value("out"), obj(x, 3))


class _RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(3)(x))


class _RematNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(_RematBlock)()(x)
        return nn.remat(_RematBlock)()(x).sum()


def _remat_block(p, v):
    pre = p @ v
    return jnp.sin(jnp.tanh(pre) * 3)


def _remat_loss(p, x):
    blk = jax.checkpoint(_remat_block)(p, x)
    return jnp.sum(jax.checkpoint(_remat_block)(p, blk) ** 2)


def test_a_checkpoints_recomputation_in_a_backward_pass_is_named_recomputed():
    """JAX marks a checkpoint's recomputation in the backward pass with the name
    ``rematted_computation``: the forward values computed again there are
    ``recomputed``, not a backward pass's scope (they were
    ``grad(rematted_computation)#1/%15``, JAX's word), and apart from the backward
    pass's own instances (a linen ``nn.remat`` block's ``Dense_0`` is one instance
    there, not ``#0`` and ``#1``)."""
    x, p = jnp.array([0.3, -0.2, 0.5]), jnp.eye(3) * 0.7 + 0.1
    net = _RematNet()
    variables = net.init(jax.random.key(0), jnp.ones((2, 3)))
    g = js.trace(jax.grad(_remat_loss), p, x)
    assert {v.scope for v in g.vars} == {"", "recomputed"}
    # the second checkpoint's recomputed `pre`: numbered as the forward calls are,
    # though its backward pass runs first
    allclose(g.value("recomputed#1/%15"), p @ jnp.sin(jnp.tanh(p @ x) * 3))
    g = js.trace(jax.grad(lambda v, x: net.apply(v, x)), variables, jnp.ones((2, 3)))
    scopes = {v.scope for v in g.vars}
    # (the backward pass's scopes hold the module's own path again: JAX's name stack)
    assert "grad(_RematNet)/_RematNet/recomputed/Checkpoint_RematBlock_1/Dense_0" in scopes
    assert "grad(_RematNet)/_RematNet/Checkpoint_RematBlock_1/Dense_0" in scopes
    assert not [n for n in g.names() if "rematted" in n or "Dense_0#" in n]


def _checked_part(h):
    a = jnp.log(h + 1.0)
    checkify.check(jnp.all(a > -1), "a small")
    b = a * 2
    return b


def _with_checked_part(x):
    h = jnp.tanh(x)
    err, y = checkify.checkify(_checked_part)(h)
    return jnp.sum(jnp.sin(y)), err


def test_names_inside_checkify():
    """``checkify.checkify(f)`` remakes the jaxpr it traces, as ``jax.vmap`` does: the
    values inside ``f`` were unnamed, called there or traced at the top
    (``checked_fun is not user code``)."""
    x = jnp.array([0.3, -0.2, 0.5])
    a = jnp.log(jnp.tanh(x) + 1.0)
    g = js.trace(_with_checked_part, x)
    allclose(g.value("_checked_part/a"), a)
    allclose(g.value("_checked_part/b"), a * 2)
    g = js.trace(checkify.checkify(_checked_part), jnp.tanh(x))
    assert not g.notes
    allclose(g.value("b"), a * 2)
    check_slice(g.slice("a", "b"), (a,), lambda a: a * 2)


@jax.custom_jvp
def _soft(x):
    inner = jnp.log1p(jnp.exp(x))
    return inner


_soft.defjvp(lambda p, t: (_soft(p[0]), jax.nn.sigmoid(p[0]) * t[0]))


@jax.checkpoint
def _soft_block(w, h):
    pre = h @ w
    act = _soft(pre)
    return act + h


@pytest.mark.parametrize("derivative", ["grad", "jvp"])
@pytest.mark.parametrize("first", ["plain", "derivative"])
def test_a_custom_jvp_body_in_a_replayed_checkpoint_names_its_own_call(derivative, first):
    """A checkpointed block called twice (JAX serves the second call from its cache, so
    the names its body reported are replayed) calling a user custom_jvp, the caller
    also differentiated: under the derivative JAX runs the rule, not the body, whose
    names then took the other calls' values (`block#1/_soft/x#0` selected block#0's
    `pre`, silently; also with the derivative first, and under jax.jvp). Names inside
    the body are given only where the body ran outside a derivative."""

    def per_example(w, xe):
        a = _soft_block(w, xe)
        b = _soft_block(w, a)
        return jnp.sum(b)

    pe = jax.vmap(per_example, in_axes=(None, 0))

    def mean(w, xs):
        return jnp.mean(pe(w, xs))

    def f(w, xs):
        if derivative == "grad":
            d = lambda: jax.grad(mean)(w, xs)  # noqa: E731
        else:
            d = lambda: jax.jvp(lambda v: mean(v, xs), (w,), (jnp.ones_like(w),))[1]  # noqa: E731
        if first == "derivative":
            dw = d()
            return pe(w, xs), dw
        losses = pe(w, xs)
        return losses, d()

    w, xs = jnp.eye(3) * 0.5, jnp.arange(6.0).reshape(2, 3)
    g = js.trace(f, w, xs)
    a = xs @ w
    pres = [a, (jnp.log1p(jnp.exp(a)) + xs) @ w]
    body = [n for n in g.names() if "/_soft/" in n]
    for n in body:  # every name inside the body selects its own call's value
        k = int(n.split("_soft_block#")[1][0])
        expected = pres[k] if n.endswith("/x") else jnp.log1p(jnp.exp(pres[k]))
        allclose(g.value(n).reshape(expected.shape), expected)
    assert not [n for n in body if "#" in n.rsplit("/", 1)[1]]  # (no x#0, x#1 of one call)
    if first == "plain" and derivative == "grad":
        for k, pre in enumerate(pres):
            assert g[f"pe/_soft_block#{k}/_soft/x"] is g[f"pe/_soft_block#{k}/pre"]
            allclose(g.value(f"pe/_soft_block#{k}/_soft/inner"), jnp.log1p(jnp.exp(pre)))
