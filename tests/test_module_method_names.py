"""Python names inside Flax linen and Haiku modules: the library runs a module's
methods itself (``model.apply``), so js.trace runs the user's methods rewritten
through the library's method interceptors, naming what they bind in the module's
scope; the function ``hk.transform`` was given runs rewritten too."""

import functools

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from conftest import allclose, check_slice
from flax.linen import module as linen_module
from haiku._src import module as hk_module_state

import jaxsurgery as js


def squash(z):  # a user helper a module method calls
    inner = z * 1.5
    return jnp.tanh(inner)


class Encoder(nn.Module):
    def setup(self):
        self.dense = nn.Dense(8)

    def encode(self, x):
        code = self.dense(x)
        return squash(code)

    def __call__(self, x):
        e = self.encode(x)
        return e * 2.0


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        pre = nn.Dense(8)(x)
        act = nn.relu(pre)
        return act + x


class Cell(nn.Module):
    @nn.compact
    def __call__(self, c, x):
        new = jnp.tanh(nn.Dense(4)(x) + c)
        return new, new


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = Block()(x)
        h2 = Block()(h)
        y = Encoder()(h2)
        r = nn.remat(Encoder)()(y)
        scan = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False}, length=5)
        c, ys = scan()(jnp.zeros((4,)), r[:, :3].sum(0) * jnp.ones((5, 3)))
        return ys.sum() + c.sum()


@pytest.fixture(scope="module")
def traced():
    x = jax.random.normal(jax.random.key(0), (2, 8))
    variables = Net().init(jax.random.key(1), x)
    return js.trace(Net().apply, variables, x), variables, x


def test_a_linen_method_names_what_it_binds_in_its_module_scope(traced):
    g, variables, x = traced
    p = variables["params"]
    dense = lambda q, v: v @ q["kernel"] + q["bias"]  # noqa: E731
    pre = dense(p["Block_0"]["Dense_0"], x)
    h = jax.nn.relu(pre) + x
    # names from the methods' source, in the module's scope; scope names stay aliases
    allclose(g.value("Net/Block_0/pre"), pre)
    allclose(g.value("Net/Block_0/act"), jax.nn.relu(pre))
    assert g["Net/h"] is g["Net/Block_0"]
    h2 = g.value("Net/h2")
    allclose(h2, jax.nn.relu(dense(p["Block_1"]["Dense_0"], h)) + h)
    # a method another method calls (in its own linen scope), and a helper it calls
    code = g.value("Net/Encoder_0/Encoder_0.encode/code")
    allclose(code, dense(p["Encoder_0"]["dense"], h2))
    allclose(g.value("Net/Encoder_0/Encoder_0.encode/squash/inner"), code * 1.5)
    assert g["Net/y"] is g["Net/Encoder_0"]
    # under nn.remat, whose name stack starts again inside: the whole path
    assert g["Net/CheckpointEncoder_0/CheckpointEncoder_0.encode/squash/inner"].scope.startswith(
        "Net/CheckpointEncoder_0"
    )
    # in an nn.scan body, per iteration
    r = g.value("Net/r")
    carry, q = jnp.zeros(4), p["ScanCell_0"]["Dense_0"]
    for _ in range(3):
        carry = jnp.tanh(dense(q, r[:, :3].sum(0)) + carry)
    allclose(g.value("Net/ScanCell_0/new@2"), carry)
    assert g["Net/ScanCell_0/c@0"].shape == (4,)  # the cell's parameter, in the whole path
    assert not any("no Python variable names" in n for n in g.notes)
    assert not linen_module._global_interceptor_stack  # the interceptor is gone


def test_slices_between_names_inside_linen_methods_equal_the_zero_perturbation_trick(traced):
    g, variables, x = traced
    s = g.slice("Net/Block_0/act", "Net/Encoder_0/Encoder_0.encode/code")

    def rest(act, eps):  # the model by hand, with a zero perturbation at Block_0's act
        p = variables["params"]
        h = act + eps + x
        pre = h @ p["Block_1"]["Dense_0"]["kernel"] + p["Block_1"]["Dense_0"]["bias"]
        h2 = jax.nn.relu(pre) + h
        return h2 @ p["Encoder_0"]["dense"]["kernel"] + p["Encoder_0"]["dense"]["bias"]

    act = g.value("Net/Block_0/act")
    check_slice(s, (act,), lambda a: rest(a, 0.0))
    v = jax.random.normal(jax.random.key(3), act.shape)
    trick = jax.jvp(lambda e: rest(act, e), (jnp.zeros_like(act),), (v,))[1]
    allclose(jax.jit(lambda a, t: jax.jvp(s, (a,), (t,))[1])(act, v), trick)
    # the whole function and its gradient are the model's
    f = g.as_function()
    allclose(f(variables, x), Net().apply(variables, x))
    # (float32 sums in another order: both differ from a float64 gradient by ~3e-6)
    grads = jax.grad(lambda v: Net().apply(v, x))(variables)
    allclose(jax.grad(f)(variables, x), grads, rtol=1e-4, atol=1e-5)


class HkBlock(hk.Module):
    def __call__(self, x):
        pre = hk.Linear(8)(x)
        act = jax.nn.relu(pre)
        return act + x


def hk_forward(x):
    h = HkBlock()(x)
    h2 = HkBlock()(h)
    logits = hk.nets.MLP([8, 4])(h2)
    return logits.sum()


@pytest.mark.parametrize("stateful", [False, True])
def test_haiku_forward_and_module_methods_name_what_they_bind(stateful):
    transform = hk.transform_with_state if stateful else hk.transform
    forward = hk.without_apply_rng(transform(hk_forward))
    x = jax.random.normal(jax.random.key(0), (2, 8))
    made = forward.init(jax.random.key(1), x)
    p, args = (made[0], (*made, x)) if stateful else (made, (made, x))
    g = js.trace(forward.apply, *args)
    dense = lambda q, v: v @ q["w"] + q["b"]  # noqa: E731
    pre = dense(p["hk_block/linear"], x)
    h = jax.nn.relu(pre) + x
    # the forward function's names, unqualified as the traced function's; the methods'
    # names in their module's scope, which still names the module's output
    allclose(g.value("hk_block/pre"), pre)
    allclose(g.value("h"), h)
    assert g["h"] is g["hk_block"] and g["h2"] is g["hk_block_1"]
    assert g["logits"] is g["mlp"]
    s = g.slice("hk_block/act", "logits")

    def rest(act):  # by hand, from the first block's act
        h = act + x
        h2 = jax.nn.relu(dense(p["hk_block_1/linear"], h)) + h
        hidden = jax.nn.relu(dense(p["mlp/~/linear_0"], h2))
        return dense(p["mlp/~/linear_1"], hidden)

    check_slice(s, (g.value("hk_block/act"),), rest)
    assert not any("no Python variable names" in n for n in g.notes)
    # the interceptor is gone and the transformed function runs the original forward
    assert not hk_module_state.interceptor_stack
    out = forward.apply(*args)
    allclose(out[0] if stateful else out, g.value("out[0]" if stateful else "out"))
    # called from a function of your own: its names under the call
    g2 = js.trace(lambda *a: forward.apply(*a), *args)
    allclose(g2.value("forward.apply/h"), h)


def test_values_linen_captures_after_a_method_returns_are_named_by_their_own_module():
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(4)(x))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = Inner()(x)
            return nn.Dense(3)(jnp.sin(h))

    x = jax.random.normal(jax.random.key(0), (2, 4))
    variables = Outer().init(jax.random.key(1), x)

    def f(v, x):
        return Outer().apply(v, x, capture_intermediates=True, mutable=["intermediates"])

    g = js.trace(f, variables, x)
    p = variables["params"]
    dense = p["Inner_0"]["Dense_0"]
    pre = x @ dense["kernel"] + dense["bias"]
    allclose(g.value("Outer/Inner_0/Dense_0/__call__"), pre)  # flax's path of each capture
    allclose(g.value("Outer/Inner_0/__call__"), jnp.tanh(pre))
    assert g["Outer/Dense_0/__call__"] is g["Outer/__call__"] is g.outputs[0]


def test_a_rebound_parameter_of_a_cell_under_nn_scan_and_nn_remat_is_binding_zero():
    """Inside ``nn.remat`` in ``nn.scan`` the cell's parameter (made outside its module)
    is completed to the module's path like what the method binds: ``x#0`` is the
    parameter and ``x#1`` the rebinding, as without the scan (the parameter was
    ``cell/x@t``, so ``Net/cell/x@t`` picked the rebinding without a word)."""

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            x = x + jnp.sin(x)
            return x * 2.0, None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            y, _ = nn.scan(nn.remat(Cell), length=3)(name="cell")(x, None)
            return y.sum()

    x = jnp.linspace(-1.0, 1.0, 2)
    by_hand = [x]
    for _ in range(3):
        by_hand.append((by_hand[-1] + jnp.sin(by_hand[-1])) * 2.0)

    def trained(x):  # under a derivative too (its recomputation is not a place of it)
        return jax.value_and_grad(lambda x: Net().apply({}, x))(x)

    for g in (js.trace(Net().apply, {}, x), js.trace(trained, x)):
        allclose(g.value("Net/cell/x#0@1"), by_hand[1])
        allclose(g.value("Net/cell/x#1@1"), by_hand[1] + jnp.sin(by_hand[1]))
        with pytest.raises(js.SelectionError, match="ambiguous"):
            g["Net/cell/x@1"]


@jax.jit
def _jitted_helper(x):
    pre = jnp.cos(x) * 2.0
    return jnp.tanh(pre)


def test_a_jitted_helper_in_an_nn_scan_cell_and_after_the_scan_names_each_call():
    """A ``jax.jit`` helper called in an ``nn.scan`` cell and after the scan: the cell's
    first trace (the one Flax makes to find what it broadcasts, on jax 0.10 by partial
    evaluation) leaves no equation, so it names nothing; the calls JAX serves from its
    cache afterwards take what its body reported (the call after the scan's ``pre`` was
    ``Net/cell#0/lay/pre``, and the scan's iterations had no ``pre@t``)."""

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, h, t):
            d = nn.Dense(3, use_bias=False)(h)
            v = _jitted_helper(d + t)
            return v, v

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            cell = nn.scan(
                Cell, variable_broadcast="params", split_rngs={"params": False}, length=3
            )
            h, _ = cell(name="cell")(x, jnp.arange(3.0))
            return _jitted_helper(h * 10.0)

    x = jnp.array([0.5, -0.1, 0.2])
    variables = Net().init(jax.random.key(0), x)
    g = js.trace(Net().apply, variables, x)
    kernel = variables["params"]["cell"]["Dense_0"]["kernel"]
    h, pres = x, []
    for t in range(3):
        pres.append(jnp.cos(h @ kernel + t) * 2.0)
        h = jnp.tanh(pres[-1])
    allclose(g.value("Net/_jitted_helper/pre"), jnp.cos(h * 10.0) * 2.0)
    # (jax 0.12 numbers the cell's frame: its first trace is a call of its own there)
    inside = g.select("Net/cell/_jitted_helper/pre@*")
    assert len(inside) == 3
    for name, want in zip(inside.names, pres):
        allclose(g.value(name), want)


class EqxNet(eqx.Module):
    lin: eqx.nn.Linear

    def __init__(self, key):
        self.lin = eqx.nn.Linear(3, 2, key=key)

    def __call__(self, x):
        pre = self.lin(x)
        act = jnp.tanh(pre)
        return act


def test_a_module_given_to_equinox_filter_vmap_names_what_its_call_binds():
    def forward(model, x):
        y = eqx.filter_vmap(model)(x)
        return (y**2).sum()

    model, x = EqxNet(jax.random.key(0)), jax.random.normal(jax.random.key(1), (4, 3))
    g = js.trace(forward, model, x)
    pre = x @ model.lin.weight.T + model.lin.bias
    allclose(g.value("model/pre"), pre)  # the batch, as under jax.vmap
    allclose(g.value("model/act"), jnp.tanh(pre))
    allclose(g.as_function()(model, x), forward(model, x))
    grads = g.grads(g.outputs[0], "model/pre")["model/pre"]
    allclose(grads, 2 * jnp.tanh(pre) * (1 - jnp.tanh(pre) ** 2), rtol=1e-5)


class HkActBlock(hk.Module):
    def act(self, z):
        return jax.nn.gelu(z)

    def __call__(self, x):
        pre = hk.Linear(4)(x)
        post = self.act(pre)  # Haiku's scope of act's values: hk_act_block/act/hk_act_block
        return post * 2.0


def test_a_name_bound_from_a_haiku_helper_method_is_in_its_modules_scope():
    f = hk.without_apply_rng(hk.transform(lambda x: HkActBlock()(x)))
    x = jax.random.normal(jax.random.key(0), (2, 3))
    params = f.init(jax.random.key(1), x)
    g = js.trace(f.apply, params, x)
    q = params["hk_act_block/linear"]
    allclose(g.value("hk_act_block/post"), jax.nn.gelu(x @ q["w"] + q["b"]))
    assert not any("hk_act_block/act/hk_act_block/post" in n for n in g.names())


def test_a_jitted_module_bound_or_returned_names_none_of_the_modules_arrays():
    """``f = eqx.filter_jit(model)`` holds the model's arrays in Equinox's wrapper: ``f``
    is a function, not a value (the arrays keep their own names)."""

    def forward(model, x):
        f = eqx.filter_jit(model)
        y1 = f(x)
        y2 = f(x * 2.0)
        return (y1 * y2).sum()

    model, x = EqxNet(jax.random.key(0)), jax.random.normal(jax.random.key(1), (3,))
    g = js.trace(forward, model, x)
    assert not any("_dynamic_fun" in n for n in g.names())
    assert g["model.lin.weight"].aliases == ("%0", "input:0")
    allclose(g.value("f#1"), model(x * 2.0))
    allclose(g.as_function()(model, x), forward(model, x))


def test_the_body_given_to_haiku_scan_names_what_it_binds_per_iteration():
    def forward(xs):
        lin = hk.Linear(4)

        def step(c, x):
            pre = lin(x) + c
            h = jnp.tanh(pre)
            return h, h

        _, ys = hk.scan(step, jnp.zeros(4), xs)
        return ys.sum()

    f = hk.without_apply_rng(hk.transform(forward))
    xs = jax.random.normal(jax.random.key(0), (6, 3))
    params = f.init(jax.random.key(1), xs)
    g = js.trace(f.apply, params, xs)
    q, c = params["linear"], jnp.zeros(4)
    for t in range(3):
        c = jnp.tanh(xs[t] @ q["w"] + q["b"] + c)
        allclose(g.value(f"step/h@{t}"), c)
    allclose(g.as_function()(params, xs), f.apply(params, xs))
    before = g.value("step/h@0").sum() + g.value("step/h@1").sum()

    def rest(h):  # by hand: the steps after 2, from h@2
        total = before + h.sum()
        for t in range(3, 6):
            h = jnp.tanh(xs[t] @ q["w"] + q["b"] + h)
            total = total + h.sum()
        return total

    check_slice(g.slice("step/h@2", "out"), (c,), rest)


def hk_autoencoder():
    """An ``hk.multi_transform`` factory: a template and the functions to apply."""
    enc, dec = hk.Linear(4, name="enc"), hk.Linear(3, name="dec")

    def encode(x):
        code = jnp.tanh(enc(x))
        return code

    def decode(z):
        recon = jax.nn.relu(dec(z))
        return recon

    def template(x):
        return decode(encode(x))

    return template, (encode, decode)


def test_the_functions_an_haiku_multi_transform_factory_returns_name_what_they_bind():
    """``hk.multi_transform(f).apply`` runs a function ``f`` returns (Haiku calls it,
    not user code): the factory runs rewritten and so do the functions it returns."""
    auto = hk.multi_transform(hk_autoencoder)
    x = jax.random.normal(jax.random.key(0), (2, 5))
    p = auto.init(jax.random.key(1), x)
    encode, decode = auto.apply
    g = js.trace(encode, p, None, x)
    code = jnp.tanh(x @ p["enc"]["w"] + p["enc"]["b"])
    allclose(g.value("code"), code)
    assert not g.notes
    g2 = js.trace(decode, p, None, code)
    s = g2.slice("z", "recon")
    check_slice(s, (code,), lambda z: jax.nn.relu(z @ p["dec"]["w"] + p["dec"]["b"]))
    g3 = js.trace(auto.init, jax.random.key(1), x)  # the template, through init
    allclose(g3.value("encode/code"), code)
    # the factory's cell holds the factory again
    allclose(encode(p, None, x), code)


def logged_method(method):
    """A user's decorator on a module method."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return method(self, *args, **kwargs)

    return wrapper


class DecoratedBlock(nn.Module):
    @logged_method
    @nn.compact
    def __call__(self, x):
        hidden = nn.Dense(4)(x)
        act = jnp.tanh(hidden)
        return act


def test_a_linen_method_wrapped_by_a_users_decorator_names_what_it_binds():
    x = jnp.ones((2, 3))
    model = DecoratedBlock()
    variables = model.init(jax.random.key(0), x)
    g = js.trace(model.apply, variables, x)
    dense = variables["params"]["Dense_0"]
    hidden = x @ dense["kernel"] + dense["bias"]
    allclose(g.value("DecoratedBlock/hidden"), hidden)
    check_slice(g.slice("DecoratedBlock/hidden", "DecoratedBlock/act"), (hidden,), jnp.tanh)


def test_a_module_whose_source_cannot_be_read_says_so_in_the_notes():
    """A class made by ``exec`` of a string has no source to read names from: its
    scopes still name its modules, and the notes say why there are no Python names."""
    namespace = {"nn": nn, "jnp": jnp}
    exec(  # noqa: S102
        "class Exec(nn.Module):\n"
        "    @nn.compact\n"
        "    def __call__(self, x):\n"
        "        hidden = nn.Dense(4)(x)\n"
        "        return jnp.tanh(hidden)\n",
        namespace,
    )
    model = namespace["Exec"]()
    x = jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x)
    g = js.trace(model.apply, variables, x)
    assert g.notes == (
        "no Python variable names in a function it calls: the source of Exec.__call__ "
        "could not be rewritten (could not get source code)",
    )
    dense = variables["params"]["Dense_0"]
    allclose(g.value("Exec/Dense_0"), x @ dense["kernel"] + dense["bias"])


def hk_scaled(x, n=1):
    hf = hk.Linear(3)(x) * n
    return jnp.tanh(hf)


class HkEncoder(hk.Module):
    def encode(self, x):
        z = jnp.tanh(hk.Linear(3)(x))
        return z


def test_haiku_transforms_of_a_partial_and_of_module_methods_name_what_they_bind():
    """``hk.transform(functools.partial(f, n=2))`` runs the partial's function
    rewritten; ``hk.multi_transform`` returning a module's method runs it through
    Haiku's interceptor, without a note that it could not be rewritten."""
    x = jnp.ones((2, 4))
    t = hk.transform(functools.partial(hk_scaled, n=2))
    p = t.init(jax.random.key(0), x)
    g = js.trace(t.apply, p, None, x)
    lin = p["linear"]
    allclose(g.value("hf"), 2 * (x @ lin["w"] + lin["b"]))
    assert not g.notes

    def factory():
        enc = HkEncoder()
        return enc.encode, (enc.encode,)

    mt = hk.multi_transform(factory)
    p = mt.init(jax.random.key(0), x)
    g = js.trace(mt.apply[0], p, None, x)
    assert not g.notes
    lin = p["hk_encoder/~encode/linear"]
    allclose(g.value("encode/hk_encoder/z"), jnp.tanh(x @ lin["w"] + lin["b"]))


def test_methods_under_the_users_own_interceptor_run_as_they_are_and_a_note_says_so():
    """A pass-through ``nn.intercept_methods`` / ``hk.intercept_methods`` of the user's
    inside the traced function: jaxsurgery's interceptor is the outer one and stands
    aside (the user's must run), so the methods bind no names, values equal the model's
    and ``g.notes`` says why ``Net/Block_0/h`` is missing (it said nothing)."""

    def passthrough(next_fun, args, kwargs, context):
        return next_fun(*args, **kwargs)

    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x)
            return x + jnp.tanh(h)

    net = Inner()
    x = jnp.ones((2, 4))
    v = net.init(jax.random.key(0), x)

    def plain(v, x):
        return net.apply(v, x)

    def intercepted(v, x):
        with nn.intercept_methods(passthrough):
            return net.apply(v, x)

    assert "Inner/h" in js.trace(plain, v, x).names()
    g = js.trace(intercepted, v, x)
    assert "Inner/h" not in g.names() and "Inner/Dense_0" in g.names()
    assert any("Inner.__call__" in n and "nn.intercept_methods" in n for n in g.notes), g.notes
    allclose(g.value("out"), net.apply(v, x))

    class HkBlock(hk.Module):
        def __call__(self, x):
            h = hk.Linear(4)(x)
            return x + jnp.tanh(h)

    def forward(x):
        with hk.intercept_methods(passthrough):
            return HkBlock()(x)

    t = hk.transform(forward)
    p = t.init(jax.random.key(0), x)
    g = js.trace(t.apply, p, None, x)
    assert "hk_block/h" not in g.names() and "hk_block/linear" in g.names()
    assert any("HkBlock.__call__" in n and "hk.intercept_methods" in n for n in g.notes), g.notes
    allclose(g.value("out"), t.apply(p, None, x))
