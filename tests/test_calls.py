"""Calls: call-qualified names, and custom rules that survive unless a slice cuts inside."""

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import allclose, check_slice
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js


def relu_net(x, w):
    a = x * w
    r = jax.nn.relu(a)
    out = r * 3.0
    return out


def test_relu_custom_jvp_survives_a_slice_through_it():
    x = jnp.array([-1.0, 0.0, 2.0])
    g = js.trace(relu_net, x, jnp.ones(3))
    s = g.slice("a", "out")
    assert "custom_jvp_call" in [e.primitive.name for e in s.jaxpr.eqns]
    assert s.notes == ()
    # the custom rule's derivative at 0 is 0; max(x, 0)'s own derivative at the tie is 0.5
    _, t = jax.jvp(s, (jnp.zeros(3),), (jnp.ones(3),))
    allclose(t, jnp.zeros(3))
    check_slice(s, (g.value("a"),), lambda a: jax.nn.relu(a) * 3.0)


@jax.custom_jvp
def softplus(x):
    e = jnp.exp(x)
    return jnp.log1p(e)


# a deliberately scaled rule, so a test can tell the rule from the primal body
softplus.defjvp(lambda p, t: (softplus(p[0]), 100.0 * t[0]))


def test_cutting_inside_a_custom_jvp_bypasses_the_rule_and_says_so():
    def f(x):
        a = x * 2.0
        b = softplus(a)
        return b

    g = js.trace(f, jnp.ones(3))
    kept = g.slice("a", "b")
    allclose(jax.jvp(kept, (g.value("a"),), (jnp.ones(3),))[1], 100.0 * jnp.ones(3))
    assert kept.notes == ()
    inner = g.select(primitive="exp").one()  # made inside the custom_jvp function
    s = g.slice(inner, "b")
    assert "custom_jvp_call" not in [e.primitive.name for e in s.jaxpr.eqns]
    assert any("custom_jvp_call" in n and "bypassed" in n for n in s.notes)
    e = g.value(inner)
    allclose(jax.jvp(s, (e,), (jnp.ones(3),))[1], 1.0 / (1.0 + e))


@jax.custom_jvp
def printed_tanh(v):
    inner = jnp.tanh(v)
    jax.debug.print("inner {a}", a=inner[0])
    return inner


printed_tanh.defjvp(lambda p, t: (printed_tanh(p[0]), 10.0 * t[0]))


def test_a_slice_from_what_a_custom_jvp_call_returns_bypasses_no_rule(capfd):
    """The call's result is its body's last value: a slice from it keeps the body's
    print of it (an effect reading an input), and said that it bypassed the call's
    rule, which nothing it differentiates goes through."""

    def f(x):
        act = printed_tanh(x)
        return jnp.sin(act * 3.0)

    x = jnp.array([0.3, -0.2, 0.5])
    g = js.trace(f, x)
    s = g.slice("printed_tanh", "out")
    assert s.notes == ()
    check_slice(s, (jnp.tanh(x),), lambda a: jnp.sin(a * 3.0))


@jax.custom_vjp
def clipped_identity(x):
    return x


clipped_identity.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


def test_custom_vjp_rule_survives():
    def f(x):
        y = jnp.sin(x)
        z = clipped_identity(y)
        w = z * 10.0
        return w

    g = js.trace(f, jnp.ones(2))
    s = g.slice("y", "w")
    assert "custom_vjp_call" in [e.primitive.name for e in s.jaxpr.eqns]
    _, pullback = jax.vjp(s, g.value("y"))
    allclose(pullback(jnp.ones(2))[0], 0.1 * jnp.ones(2))  # the rule clipped 10 to 0.1


@jax.custom_vjp
def clipped_tagged(x):
    return js.tag(x, "clipped")  # an identity, through a tag


clipped_tagged.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


@jax.custom_vjp
def clipped_jitted(x):
    return jax.jit(lambda v: v)(x)  # an identity, through a call


clipped_jitted.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


@pytest.mark.parametrize(
    "clip, batched",
    [(clipped_identity, True), (clipped_tagged, False), (clipped_jitted, False)],
    ids=["identity-under-vmap", "tag", "jit"],
)
def test_a_custom_rule_whose_body_passes_its_input_on_is_kept(clip, batched):
    """A custom rule call whose body returns its input through a tag (a name mark, as
    jaxsurgery adds under jax.vmap) or a call stays one equation: inlined, its result
    would be its operand and the rule would be gone from slices, jvp and vjp."""

    def per_row(r):
        h = jnp.sin(r) * 2
        c = clip(h)
        return jnp.sum(c**2)

    def f(x):
        v = jax.vmap(per_row)(x) if batched else per_row(x)
        out = jnp.sum(v)
        return out

    x = jnp.array([[0.1, 0.5, 2.0], [1.0, -1.0, 0.3]])
    x = x if batched else x[0]
    g = js.trace(f, x)
    s = g.slice("x", "out")
    allclose(jax.grad(s)(x), jax.grad(f)(x))
    allclose(g.vjp("x", "out", jnp.asarray(1.0))[1], jax.grad(f)(x))
    allclose(jax.jit(jax.grad(s))(2 * x), jax.grad(f)(2 * x))
    assert "custom_vjp_call" in {e.primitive.name for e in s.jaxpr.eqns}


def test_values_after_an_opaque_custom_rule_call():
    """A custom_jvp whose body is the identity (lineax's _asarray) stays one equation;
    values after it are computed op by op, binding the call as JAX's eval does."""

    @jax.custom_jvp
    def ident(x):
        return x

    ident.defjvp(lambda p, t: (p[0], 2.0 * t[0]))

    def f(x):
        y = ident(x)
        z = jnp.sin(y)
        return z

    x = jnp.ones(3)
    g = js.trace(f, x)
    allclose(g.value("z"), jnp.sin(x))
    allclose(g.value("y"), x)
    allclose(g.jvp("x", "z", jnp.ones(3))[1], 2.0 * jnp.cos(x))


def test_library_jit_and_remat_calls_are_kept_whole_when_not_cut():
    def f(x):
        a = x + 1.0
        b = jnp.clip(a, 0.5, 1.5)  # jax.numpy's clip is a jitted function
        c = jax.checkpoint(lambda t: jnp.sin(t) ** 2)(b)
        return c

    g = js.trace(f, jnp.linspace(-1.0, 1.0, 3))
    s = g.slice("a", "c")
    assert [e.primitive.name for e in s.jaxpr.eqns] == ["jit", "remat2"]
    check_slice(s, (g.value("a"),), lambda a: jnp.sin(jnp.clip(a, 0.5, 1.5)) ** 2, eqns=2)
    inner = g.select(primitive=("max", "min"))[0]  # made inside clip
    cut = g.slice(inner, "c")  # starts inside the jit: the jit is inlined, remat kept
    assert "jit" not in [e.primitive.name for e in cut.jaxpr.eqns]
    assert cut.jaxpr.eqns[-1].primitive.name == "remat2"
    assert cut.notes == ()


def _block(x, w):
    h = x @ w
    act = jnp.tanh(h)
    return act


@pytest.mark.parametrize(
    "make",
    [
        lambda: jax.jit(jax.vmap(_block, (0, None))),
        lambda: jax.jit(jax.checkpoint(_block)),
        lambda: jax.jit(jax.jit(_block)),
    ],
    ids=["jit(vmap)", "jit(checkpoint)", "jit(jit)"],
)
def test_a_jit_of_a_transform_or_of_a_jit_names_what_the_function_binds(make):
    """``jax.jit(jax.vmap(f))`` (also of a checkpoint, of a jit) is a call like
    ``jax.jit(f)``: its values are named per call (only the call's result was named)."""
    b = make()

    def model(x, w):
        y = b(x, w)
        z = b(y, w)
        return z.sum()

    x, w = jnp.linspace(0.1, 1.0, 6).reshape(2, 3), jnp.eye(3) * 0.7
    g = js.trace(model, x, w)
    allclose(g.value("b#0/act"), jnp.tanh(x @ w))
    allclose(g.value("b#1/h"), jnp.tanh(x @ w) @ w)
    patched = g.patch_fn("b#1/act")({"b#1/act": jnp.ones((2, 3))}, x, w)
    allclose(patched, 6.0)
    allclose(jax.jit(g.as_function())(x, 2 * w), model(x, 2 * w))


def test_user_jit_functions_are_named_per_call():
    @jax.jit
    def layer(p, h):
        pre = jnp.dot(p[0], h) + p[1]
        z = jnp.tanh(pre)
        return z

    def f(x, p1, p2, p3):
        z1 = layer(p1, x)
        z2 = layer(p2, z1)
        z3 = layer(p3, z2)
        return z3

    args = mlp_12782_args()
    g = js.trace(f, *args)
    assert g["layer#1"] is g["z2"] and g["layer#1/z"] is g["z2"]
    assert g["layer#1/pre"].primitive == "add"
    assert g.select("layer#?").names == ("z1", "z2", "z3")
    s = g.slice("layer#0", "layer#1")
    ref = js.trace(mlp_12782, *args).slice("z1", "z2")
    z1 = g.value("z1")
    allclose(jax.jvp(s, (z1,), (jnp.ones(4),)), jax.jvp(ref, (z1,), (jnp.ones(4),)))
    assert [e.primitive.name for e in s.jaxpr.eqns] == ["jit"]  # the call is kept whole
    check_slice(s, (z1,), lambda z: jnp.tanh(jnp.dot(args[2][0], z) + args[2][1]), eqns=1)
    inside = g.slice("layer#1/pre", "layer#2/pre")  # cuts inside two calls: both inlined
    assert "jit" not in [e.primitive.name for e in inside.jaxpr.eqns]


def helper(x, w):
    h = jnp.sin(x) * w
    return jnp.cos(h)


class Block:
    def __init__(self, w):
        self.w = w

    def part(self, x):
        inner = helper(x, self.w)
        return inner * 2.0

    def __call__(self, x):
        a = self.part(x)
        return self.part(a)


def test_call_qualified_names_compose():
    def f(x):
        first = helper(x, 2.0)
        block = Block(3.0)
        out = block(first)
        return out

    g = js.trace(f, jnp.ones(2))
    assert g["helper"] is g["first"]
    assert g["helper/h"].primitive == "mul"
    assert g["block/part#1/helper/h"].primitive == "mul"
    assert g["block/part#0"] is g["block/a"]
    assert g["block"] is g["out"]
    # without its call number, the path is every call's (as a bare name is)
    with pytest.raises(js.SelectionError, match="'block/part/helper/h' is ambiguous"):
        g["block/part/helper/h"]
    assert g.select("block/part/helper/h").names == (
        "block/part#0/helper/h",
        "block/part#1/helper/h",
    )
    s = g.slice("block/part#0", "block/part#1/helper/h")
    check_slice(s, (g.value("block/a"),), lambda a: jnp.sin(a) * 3.0, eqns=2)


def partial_layer(scale, x):
    pre = jnp.tanh(x * scale)
    return pre + 1.0


def test_a_functools_partial_of_a_user_function_is_a_named_call():
    """``f = functools.partial(layer, p); f(x)`` calls ``layer``: its values are named
    under the call's name (they were unnamed), also for a partial made in the call."""

    def f(x):
        first = functools.partial(partial_layer, 2.0)
        h = first(x)
        return functools.partial(partial_layer, 3.0)(x=h)

    x = jnp.linspace(-1.0, 1.0, 3)
    g = js.trace(f, x)
    assert g["first"] is g["h"]
    allclose(g.value("first/pre"), jnp.tanh(2.0 * x))
    h = jnp.tanh(2.0 * x) + 1.0
    allclose(g.value("partial_layer/pre"), jnp.tanh(3.0 * h))
    check_slice(
        g.slice("first/pre", "out"), (jnp.tanh(2.0 * x),), lambda p: partial_layer(3.0, p + 1.0)
    )


def test_static_jit_and_remat_user_functions_are_calls():
    @functools.partial(jax.jit, static_argnums=1)
    def power(x, n):
        y = x
        for _ in range(n):
            y = y * x
        return y

    @jax.checkpoint
    def block(h):
        inner = jnp.sin(h)
        return inner * 2.0

    def f(x):
        a = power(x, 2)
        b = block(a)
        return b

    x = jnp.array([0.5, 1.0, 2.0])
    g = js.trace(f, x)
    assert g["power/y#2"] is g["a"] and g["power/y#0"] is g["x"]
    assert g["block"] is g["b"]  # remat'd: named as a call, run as it is
    allclose(g.value("block/inner"), jnp.sin(x**3))  # made by jax.checkpoint elsewhere
    s = g.slice("a", "b")
    assert [e.primitive.name for e in s.jaxpr.eqns] == ["remat2"]
    check_slice(s, (g.value("a"),), lambda a: jnp.sin(a) * 2.0, eqns=1)
    check_slice(g.slice("x", "power"), (x,), lambda t: t**3)


class Base:
    def __call__(self, x):
        base_out = jnp.tanh(x)
        return base_out


class Child(Base):
    def __call__(self, x):
        pre = x * 2.0
        return super().__call__(pre) + 1.0


def test_calls_through_super_and_computed_subscripts_are_named_at_run_time():
    def f(x):
        m = Child()
        fns = [jnp.sin, helper]
        r = m(x)
        for i in range(2):
            r = fns[i](r, 2.0) if i else fns[i](r)
        return r

    g = js.trace(f, jnp.ones(2))
    assert g["m/__call__/base_out"].primitive == "tanh"  # super().__call__ -> its name
    assert g["helper/h"].primitive == "mul"  # fns[i] -> the function's own name


def test_a_folded_call_computes_its_operands_that_depend_on_the_inputs():
    @jax.jit
    def pair(p, q):
        return p * 2.0, q * 3.0

    def f(x):
        a, b = pair(jnp.sin(x), jnp.cos(x))
        return a + b

    x = jnp.array([0.3, -0.7])
    g = js.trace(f, x)
    # the jit stays one equation, so the window grows to compute cos(x), which it reads
    s = g.slice("x", "a")
    names = [e.primitive.name for e in s.jaxpr.eqns]
    assert names in (["sin", "cos", "jit"], ["sin", "cos", "pjit"])  # jax 0.12 / 0.10
    check_slice(s, (x,), lambda x: jnp.sin(x) * 2.0)


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
def remat_block(h):
    u = jnp.sin(h)
    return u * h


def test_a_module_level_checkpointed_function_is_a_call_with_its_policy():
    """``@jax.checkpoint`` applied where the function is defined (not inside the traced
    one): made again around the rewritten function, with its options, so its values
    are named per call and the policy is the one given."""

    def f(x):
        a = remat_block(x)
        b = remat_block(a)
        return b.sum()

    x = jnp.array([0.5, 1.0, 2.0])
    g = js.trace(f, x)
    a = jnp.sin(x) * x
    allclose(g.value("remat_block#0/u"), jnp.sin(x))
    allclose(g.value("remat_block#1/u"), jnp.sin(a))
    remats = [e for e in g._structure.closed.jaxpr.eqns if e.primitive.name.startswith("remat")]
    assert [e.params["policy"] for e in remats] == [jax.checkpoint_policies.nothing_saveable] * 2
    allclose(jax.grad(g.as_function())(x), jax.grad(f)(x))
    check_slice(
        g.slice("remat_block#0/u", "out"), (jnp.sin(x),), lambda u: (jnp.sin(u * x) * u * x).sum()
    )


def test_a_partial_given_to_a_loop_or_cond_is_named_after_its_function():
    """A partial called by ``lax.scan``/``lax.cond`` has no call-site name: its frame is
    named after its function (it was named ``partial``, its type)."""

    def body(c, a, q):
        c2 = c * q + a
        return c2, c2 * 2

    def f(p, x):
        c, ys = jax.lax.scan(functools.partial(body, q=p), x, jnp.stack([x, x, x]))
        return c + ys.sum(0)

    def g_cond(p, x):
        return jax.lax.cond(x[0] < 0, functools.partial(partial_layer, p), lambda x: x * 2.0, x)

    p, x = jnp.arange(3.0) + 0.5, jnp.linspace(-1.0, 1.0, 3)
    allclose(js.trace(f, p, x).value("body/c2@1"), (x * p + x) * p + x)
    allclose(js.trace(g_cond, p, x).value("partial_layer/pre"), jnp.tanh(x * p))


def counted(fn):
    """A user's decorator (``functools.wraps``): counts the calls, then runs ``fn``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        COUNTED.append(fn.__name__)
        return fn(*args, **kwargs)

    return wrapper


COUNTED: list[str] = []


@counted
def counted_block(x, w):
    pre = x @ w
    return jnp.tanh(pre)


def test_a_function_a_decorator_wrapped_is_named_and_its_wrapper_still_runs():
    """A decorator's wrapper runs as it is around the rewritten function (the cell that
    holds the function is swapped while it runs): what the function binds is named,
    called or traced itself, and the decorator's code runs (it counted the calls)."""

    def net(x, w):
        h = counted_block(x, w)
        return counted_block(h, w).sum()

    x, w = jnp.ones((2, 3)), jnp.eye(3) * 0.5
    COUNTED.clear()
    g = js.trace(net, x, w)
    assert COUNTED == ["counted_block", "counted_block"] and not g.notes
    pre0 = x @ w
    allclose(g.value("counted_block#0/pre"), pre0)
    check_slice(
        g.slice("counted_block#0/pre", "counted_block#1/pre"),
        (pre0,),
        lambda p: jnp.tanh(p) @ w,
    )
    g2 = js.trace(counted_block, x, w)
    allclose(g2.value("pre"), pre0)
    assert counted_block.__closure__[0].cell_contents is counted_block.__wrapped__  # put back


def test_a_function_given_to_tree_map_map_or_reduce_names_what_it_binds():
    """Higher-order functions that call what they are given (``jax.tree.map``,
    ``map``, ``functools.reduce``) run each function given in a frame, rewritten: the
    values inside were unnamed (``%3``)."""

    def f(x):
        def inner(v):
            hidden = jnp.sin(v)
            return hidden * 2

        a = jax.tree.map(inner, {"p": x})
        b = functools.reduce(lambda acc, _: inner(acc), range(2), x)
        (c,) = map(inner, [x])
        return a["p"] + b + c

    x = jnp.linspace(-1.0, 1.0, 3)
    g = js.trace(f, x)
    allclose(g.value("inner#0/hidden"), jnp.sin(x))
    allclose(g.value("inner#2/hidden"), jnp.sin(2 * jnp.sin(x)))
    allclose(g.value("inner#3/hidden"), jnp.sin(x))
    check_slice(g.slice("inner#1/hidden", "b"), (jnp.sin(x),), lambda h: 2 * jnp.sin(2 * h))


def test_the_function_given_to_associative_scan_names_what_it_binds():
    def f(x):
        def combine(a, b):
            cmb = a * b + a
            return cmb * 1.0

        return jax.lax.associative_scan(combine, x).sum()

    x = jnp.linspace(0.1, 1.0, 8)
    g = js.trace(f, x)
    allclose(g.value("combine#0/cmb"), x[0::2] * x[1::2] + x[0::2])  # the first level
    allclose(g.value("out"), f(x))


class CountedLayer:
    """A callable object whose ``__call__`` a user's decorator wrapped."""

    def __init__(self, w):
        self.w = w

    @counted
    def __call__(self, x):
        pre = x @ self.w
        return jnp.tanh(pre)


def test_a_callable_objects_decorated_call_names_what_it_binds():
    layer = CountedLayer(jnp.eye(3) * 0.5)
    x = jnp.linspace(-1.0, 1.0, 3)

    def loss(x):
        out = layer(x)
        return out.sum()

    allclose(js.trace(loss, x).value("layer/pre"), 0.5 * x)
    allclose(js.trace(layer, x).value("pre"), 0.5 * x)


@counted
@jax.jit
def counted_jit_block(x, w):
    pre = x @ w
    return jnp.tanh(pre)


@jax.jit
@counted
def jit_counted_block(x, w):
    pre = x @ w
    return jnp.tanh(pre)


@counted
@jax.checkpoint
def counted_remat_block(x, w):
    pre = x @ w
    return jnp.tanh(pre)


@counted
@functools.partial(jax.jit, static_argnums=2)
def counted_static_block(x, w, n):
    pre = x @ w * n
    return jnp.tanh(pre)


@pytest.mark.parametrize(
    "block", [counted_jit_block, jit_counted_block, counted_remat_block], ids=lambda b: b.__name__
)
def test_a_decorator_combined_with_jit_or_checkpoint_names_what_the_function_binds(block):
    """``@deco @jax.jit``, ``@jax.jit @deco`` and ``@deco @jax.checkpoint``: the
    decorator's wrapper runs around the jit's (the checkpoint's) rewritten twin, so
    each call is still one call equation JAX serves from its cache, and its values are
    named in every call (they were all unnamed), also under a transform."""
    name = block.__name__

    def net(x, w):
        h = block(x, w)
        h = block(h, w)
        return block(h, w).sum()

    x, w = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), jnp.eye(3) * 0.5 + 0.1
    COUNTED.clear()
    g = js.trace(net, x, w)
    # (a decorator inside the jit runs when JAX traces the jit: once, as it does for JAX)
    assert COUNTED == [name] * (1 if block is jit_counted_block else 3) and not g.notes
    calls = [e.primitive.name for e in jax.make_jaxpr(net)(x, w).jaxpr.eqns]
    assert [e for e in calls if e in ("pjit", "jit", "remat2", "checkpoint")] == [calls[0]] * 3
    h0 = jnp.tanh(x @ w)
    h1 = jnp.tanh(h0 @ w)
    allclose(g.value("block#0/pre"), x @ w)
    allclose(g.value("block#2/pre"), h1 @ w)  # a call JAX served from its cache
    check_slice(
        g.slice("block#0/pre", "block#2/pre"), (x @ w,), lambda p: jnp.tanh(jnp.tanh(p) @ w) @ w
    )
    rest = jax.grad(lambda p: jnp.tanh(jnp.tanh(p) @ w).sum())
    allclose(g.grads("out", wrt=["block#1/pre"])["block#1/pre"], rest(h0 @ w), atol=1e-6)

    def loss(w):  # under a transform
        return jax.vmap(lambda r: net(r[None], w))(x).sum()

    gl = js.trace(jax.grad(loss), w)
    assert "block#2/pre" in gl.names() or any(n.endswith("block#2/pre") for n in gl.names())
    allclose(gl.value("out"), jax.grad(loss)(w))
    allclose(js.trace(block, x, w).value("pre"), x @ w)


def test_a_decorated_jit_keeps_its_static_arguments_static():
    x, w = jnp.ones((2, 3)), jnp.eye(3)
    g = js.trace(counted_static_block, x, w, 2)
    assert [v.name for v in g.inputs] == ["x", "w"]  # n is static, as for the jit
    allclose(g.value("pre"), 2 * x)

    def net(x, w):
        return counted_static_block(x, w, 3).sum()

    allclose(js.trace(net, x, w).value("counted_static_block/pre"), 3 * x)


def plus_one(fn):
    """A decorator that changes what the function returns."""

    @functools.wraps(fn)
    def wrapper(x):
        return fn(x) + 1.0

    return wrapper


def twice(fn):
    """A decorator that calls the function twice."""

    @functools.wraps(fn)
    def wrapper(x):
        return fn(fn(x))

    return wrapper


@pytest.mark.parametrize("deco", [plus_one, twice])
@pytest.mark.parametrize("transform", [jax.jit, jax.checkpoint], ids=["jit", "checkpoint"])
def test_a_decorator_changing_results_around_a_jit_names_every_call(deco, transform):
    """A wrapper adding to the jit's result (or calling it twice) left the call with no
    call equation of its own: the names went to the first call (``layer#0/pa#1``), and
    a second trace, served from JAX's cache, named nothing."""

    @deco
    @transform
    def layer(x):
        pa = jnp.sin(x)
        return pa * 3

    def f(x):
        a = layer(x)
        return layer(a)

    x = jnp.linspace(-1.0, 1.0, 3)
    inner = [x]
    for _ in range(2 if deco is plus_one else 4):
        inner.append(jnp.sin(inner[-1]) * 3 + (1.0 if deco is plus_one else 0.0))
    for _ in range(2):  # the second trace too
        g = js.trace(f, x)
        if deco is plus_one:
            allclose(g.value("layer#0/pa"), jnp.sin(inner[0]))
            allclose(g.value("layer#1/pa"), jnp.sin(inner[1]))
        else:  # two calls of the jit in each call of the wrapper
            allclose(g.value("layer#1/pa#1"), jnp.sin(inner[3]))
        allclose(g.value("out"), f(x))


def test_a_jitted_call_given_a_scalar_made_inside_the_function_traces():
    """``sub(x, jnp.float32(3))``: JAX folds the scalar into a literal operand, which
    the call's results were checked against (a TypeError, unhashable Literal: the
    regression hunt); make_jaxpr and jax.jit take it."""

    @jax.jit
    def sub(a, b):
        return a - b

    def f(x):
        d = sub(x, jnp.float32(3))
        return jnp.sin(d)

    x = jnp.arange(4.0)
    g = js.trace(f, x)
    allclose(g.as_function()(x + 1), f(x + 1))
    allclose(g.value("d"), x - 3)
    check_slice(g.slice("d", "out"), (x - 3,), jnp.sin)


def test_a_custom_jvp_returning_a_python_number_traces_and_keeps_its_rule():
    """``return jnp.sin(x), 2.0`` from a ``custom_jvp``: its body returns a literal (a
    constant it passes on), so the call stays one equation, keeping its rule (the check
    hashed the literal: an internal TypeError, hunt W)."""

    @jax.custom_jvp
    def cj(x):
        return jnp.sin(x), 2.0

    @cj.defjvp
    def cj_jvp(primals, tangents):
        (x,), (tx,) = primals, tangents
        return cj(x), (3.0 * jnp.cos(x) * tx, 0.0)  # a rule other than the body's

    def f(x):
        a, b = cj(x)
        return (a * b).sum()

    x = jnp.arange(3.0)
    g = js.trace(f, x)
    allclose(g.value("b"), 2.0)
    want = jax.grad(f)(x)  # (the rule's 3 cos x, times b)
    allclose(want, 6.0 * jnp.cos(x))
    allclose(jax.grad(g.as_function())(x), want)
    allclose(g.grads("out", ["x"])["x"], want)
    allclose(jax.grad(g.slice("x", "out"))(x), want)


def test_a_slice_from_a_constant_a_jitted_body_closes_over_cuts_the_call():
    """A jitted layer closing over an array: its body's constant is a var of the graph
    (``%1``); a slice from it cuts the call (folded back, the call read its operands
    only, and the slice ignored its input, silently: hunt W)."""
    w = jnp.arange(3.0)

    @jax.jit
    def layer(x):
        return jnp.sin(x * w)

    def f(x):
        h = layer(x)
        return (h**2).sum()

    x = jnp.arange(3.0) * 0.1 + 1
    g = js.trace(f, x)
    (const,) = g.select(primitive="const")
    s = g.slice(const, "out")
    for new in (w, w + 1):
        allclose(s(new), (jnp.sin(x * new) ** 2).sum())
    allclose(jax.grad(s)(w + 1), jax.grad(lambda v: (jnp.sin(x * v) ** 2).sum())(w + 1))
