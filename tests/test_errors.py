"""The bad-input catalog: each mistake gets the right exception type and a message
that names the culprit and says what to do. Nothing the user passed is modified."""

import functools
import re
import tempfile
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import allclose
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js


def _collect_in_scratch(fn, batches):
    """``js.collect`` into a folder removed when it returns or raises (a folder made at
    import was left by each pytest-xdist worker, which imports every test module and
    runs no exit handlers)."""
    with tempfile.TemporaryDirectory() as scratch:
        return js.collect(scratch + "/a.zarr", fn, batches, progress=False)


class Scaled(eqx.Module):
    """A module with a static field (an eqx.field(static=True) is node data, not a leaf)."""

    w: jax.Array
    n: int = eqx.field(static=True)

    def __call__(self, x):
        return (self.w * x[..., :3]).sum() * self.n


def _nnx_step_args():
    """A model and an nnx.Optimizer, each call with a new optax transform."""
    import optax
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param), jnp.ones((4, 3))


def _nnx_step_graph():
    from flax import nnx

    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)
        return loss

    return js.trace(step, *_nnx_step_args())


def rnn(h0, xs):
    def step(h, x):
        h_new = jnp.tanh(h + x)
        return h_new, h_new

    h_last, _ = jax.lax.scan(step, h0, xs)
    return h_last


def scoped_rnn(h0, xs):
    def step(h, x):
        with jax.named_scope("cell"):
            h_new = jnp.tanh(h + x)
        return h_new, h_new

    h_last, _ = jax.lax.scan(step, h0, xs)
    return h_last


def fixed_point(a):
    def body(x):
        x_new = jnp.cos(a * x)
        return x_new

    return jax.lax.while_loop(lambda x: jnp.abs(x - jnp.cos(a * x)) > 1e-3, body, a)


def repeated(x):
    h = x
    for _ in range(3):
        h = jnp.sin(h)
    return h


def rebound(x):
    for _ in range(3):
        x = jnp.sin(x)
    return x


@pytest.fixture(scope="module")
def g():
    return js.trace(mlp_12782, *mlp_12782_args())


@pytest.fixture(scope="module")
def abstract():
    specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mlp_12782_args()
    )
    return js.trace(mlp_12782, *specs)


def int_graph():
    def f(x, n):
        m = n * 2
        return (x * m).sum()

    return js.trace(f, jnp.ones(3), jnp.arange(3))


def bool_false(v):
    return False


def key_and_index_graph():
    def f(x, key):
        c = (jnp.sin(x), jax.random.split(key)[0])
        idx = jnp.argmax(c[0])
        return (c[0] * jax.random.normal(c[1], (3,))).sum() + idx

    return js.trace(f, jnp.ones(3), jax.random.key(0))


def complex_graph():
    def f(x):
        z = x * (1 + 2j)
        w = jnp.sin(z)
        return jnp.real(w).sum(), w

    return js.trace(f, jnp.ones(3, jnp.complex64))


def generator(x):
    yield x


def returns_text(x):
    return "done"


def returns_a_set(x):
    return x * 2, {1, 2}


def python_branch(x):
    if x.sum() > 0:
        return x
    return -x


def keyed(p, x):
    return jnp.tanh(p["w"] * x) + p["b"]


def keyed_graph():
    return js.trace(keyed, {"b": jnp.ones(3), "w": jnp.ones(3)}, jnp.ones(3))


def masked_graph():
    """Traced with an options dict whose "mask" holds None."""
    return js.trace(lambda x, o: x * o["scale"], jnp.ones(2), {"scale": jnp.ones(2), "mask": None})


def flagged(x, train):
    return x * 2.0 if train else x


def mlp_graph(activation):
    import equinox as eqx

    mlp = eqx.nn.MLP(3, 2, 4, 1, activation=activation, key=jax.random.key(0))
    return mlp, js.trace(lambda m, x: m(x), mlp, jnp.ones(3))


def with_activation(activation):
    import equinox as eqx

    mlp, g = mlp_graph(jax.nn.relu)
    return g.as_function()(eqx.tree_at(lambda m: m.activation, mlp, activation), jnp.ones(3))


def scaled(x, s):
    return x * s


KEY = jax.random.key(0)


def defaulted(x, b=jnp.ones(3)):  # noqa: B008  (an array default, held fixed)
    y = x * b
    return y


def nested_scans(W, x):
    def outer(h, w):
        def inner(c, _):
            c2 = jnp.tanh(w @ c)
            return c2, None

        hh, _ = jax.lax.scan(inner, h, None, length=3)
        return hh + 1.0, None

    return jax.lax.scan(outer, x, W)[0]


CATALOG = [
    # (case, action on (g, abstract graph), exception, message pattern)
    (
        "gradients of no output",
        lambda g, a: g.grads([], wrt=["z1"]),
        js.SliceError,
        r"no output to differentiate: \[\] selected no var; name the value whose sum the "
        r"gradients are of",
    ),
    (
        "a patch of a Python number the function returns",
        lambda g, a: js.trace(lambda x: (jnp.sin(x), 3.0), jnp.ones(2)).replace("out[1]", 5.0),
        js.SliceError,
        r"'out\[1\]' is a constant \(float32\[\]: a Python number the function "
        r"returns as it is\), not a value the program computes",
    ),
    (
        "a replacement of another shape (broadcast silently before)",
        lambda g, a: js.trace(lambda x: jnp.sin(x).sum(), jnp.ones((2, 3))).replace(
            "%1", jnp.zeros(3)
        ),
        js.SliceError,
        r"the replacement for '%1' \(float32\[2, 3\]\) has shape \(3,\); give one value for "
        r"every element \(a scalar\) or an array of shape \(2, 3\)",
    ),
    (
        "a value under two keys of a patch function",
        lambda g, a: g.patch_fn({"first": "z1", "again": "z1"})(
            {"first": g.value("z1"), "again": g.value("z1")}, *mlp_12782_args()
        ),
        js.SelectionError,
        r"the patches for 'first' and 'again' both patch 'z1': a value is patched once",
    ),
    (
        "js.collect of a function that returns an array, not a dict",
        lambda g, a: _collect_in_scratch(lambda x: x * 2, [jnp.ones((2, 3))]),
        js.SelectionError,
        r"fn returned \w*Array\w*; js.collect needs a dict \{key: array\} per batch",
    ),
    (
        "js.collect of a function that returns a nested dict",
        lambda g, a: _collect_in_scratch(lambda x: {"a": {"b": x}}, [jnp.ones((2, 3))]),
        js.SelectionError,
        r"fn returned dict at 'a'; js.collect needs a flat dict \{key: array\} per batch",
    ),
    (
        "a patch that is not an array",
        lambda g, a: g.patch_fn("z1")({"z1": None}, *mlp_12782_args()),
        js.SliceError,
        r"the patch for 'z1' is NoneType, not an array: give one of the var's shape",
    ),
    (
        "a highlight selected from another graph (one line, not its table)",
        lambda g, a: g.draw(highlight=js.trace(mlp_12782, *mlp_12782_args()).select("z*")),
        js.SelectionError,
        r"^highlight=Selection of 3 vars\.\.\.: Var\(z1: .* belongs to another graph; "
        r"select it from this graph by name: g\['z1'\]; highlight takes a Slice",
    ),
    (
        "a pattern whose outputs are independent",
        lambda g, a: g.match(lambda x, wq, wk: (x @ wq, x @ wk), *(jnp.ones((2, 2)),) * 3),
        js.SliceError,
        r"the pattern's output 1 is not computed on the way to its output 0",
    ),
    (
        "a key replaced by its data",
        lambda g, a: js.trace(jax.random.split, jax.random.key(0)).replace(
            "out", jnp.zeros((2, 2), jnp.uint32)
        ),
        js.SliceError,
        r"the replacement for 'out' \(key<fry>\[2\]\) is uint32; give a key of its kind",
    ),
    (
        "an array where a Python number decided a promotion",
        lambda g, a: js.trace(scaled, jnp.ones(2, jnp.bfloat16), 2.5).as_function()(
            jnp.ones(2, jnp.bfloat16), jnp.float32(3.1)
        ),
        js.SliceError,
        r"argument `s` was traced as a Python number \(weakly typed float32\), which the "
        r"traced program computes with as bfloat16; an array of float32 would make the function "
        r"compute in float32 instead",
    ),
    (
        "a Python number for a slice input that is not a scalar",
        lambda g, a: js.trace(lambda x: jnp.sin(x) * 2.0, jnp.ones(3)).slice("%1", "out")(2.0),
        js.SliceError,
        r"input '%1' expects float32\[3\], got a Python float; pass a value shaped like "
        r"g\.value\('%1'\)",
    ),
    (
        "a Python float for an integer slice input",
        lambda g, a: js.trace(lambda n, x: n * 3 + x, jnp.int32(2), 1.0).slice("n", "out")(2.7),
        js.SliceError,
        r"input 'n' expects int32\[\], got a Python float",
    ),
    (
        "an inner iteration past the inner loop's end",
        lambda g, a: js.trace(nested_scans, jnp.ones((4, 3, 3)), jnp.ones(3))["outer/inner/c2@2@3"],
        js.SelectionError,
        r"no var named 'outer/inner/c2@2@3': in iteration 2 of its folded loop, "
        r"'outer/inner/c2' is 'outer/inner/c2@2@0' \.\. 'outer/inner/c2@2@2'",
    ),
    (
        "a float constant replacing an integer value",
        lambda g, a: js.trace(lambda x, n: x * (n * 2), jnp.ones(2), 3).replace("%2", 2.7),
        js.SliceError,
        r"the replacement for '%2' \(int32\[\]\) is a float value, which int32 does not "
        r"hold: it would be truncated",
    ),
    (
        "new arguments of another tree structure (other keys)",
        lambda g, a: keyed_graph().as_function()({"a": jnp.ones(3), "b": jnp.ones(3)}, 1.0),
        js.SliceError,
        r"argument `p` is a tree of another structure than the one traced \(no array at "
        r"\['w'\], an array at \['a'\]\): a graph runs the program it traced",
    ),
    (
        "new arguments with fewer leaves",
        lambda g, a: keyed_graph().values_fn(["out"])({"w": jnp.ones(3)}, jnp.ones(3)),
        js.SliceError,
        r"argument `p` is a tree of another structure than the one traced \(no array at "
        r"\['b'\] \(traced with one there\)\)",
    ),
    (
        "None where an array was traced",
        lambda g, a: keyed_graph().as_function()(None, jnp.ones(3)),
        js.SliceError,
        r"argument `p` is a tree of another structure than the one traced \(no array \(traced "
        r"with 2\)\)",
    ),
    (
        "an array where None was traced",
        lambda g, a: masked_graph().as_function()(
            jnp.ones(2), {"scale": jnp.ones(2), "mask": jnp.ones(2)}
        ),
        js.SliceError,
        r"argument `o` is a tree of another structure than the one traced \(an array at "
        r"\['mask'\] \(traced with none there: None, or static data\)\)",
    ),
    (
        "a string where nothing was traced is not called an array",
        lambda g, a: masked_graph().as_function()(jnp.ones(2), {"scale": jnp.ones(2), "mask": "x"}),
        js.SliceError,
        r"argument `o` is a tree of another structure than the one traced \('x' at "
        r"\['mask'\] \(traced with none there",
    ),
    (
        "a function made again where one was traced",
        lambda g, a: js.trace(
            lambda x, fn: fn(x), jnp.ones(2), functools.partial(jnp.multiply, 2.0)
        ).as_function()(jnp.ones(2), functools.partial(jnp.multiply, 2.0)),
        js.SliceError,
        r"they print alike, but such objects are equal only to themselves .*: pass the "
        r"object traced with",
    ),
    (
        "an optax optimizer made again where one was traced",
        lambda g, a: js.trace(lambda x, opt: x.sum(), jnp.ones(2), optax.adam(1e-3)).as_function()(
            jnp.ones(2), optax.adam(1e-3)
        ),
        js.SliceError,
        r"`opt.init` is <function .*they print alike",
    ),
    (
        "an integer argument past int32",
        lambda g, a: js.trace(lambda a, b: a * b, 2**40, 2.0),
        js.TraceError,
        r"argument a is not an array JAX can trace \(OverflowError: .*\); pass an array "
        r"of a JAX dtype, or hold it static",
    ),
    (
        "a dict key holding None left out",
        lambda g, a: masked_graph().as_function()(jnp.ones(2), {"scale": jnp.ones(2)}),
        js.SliceError,
        r"argument `o` is a tree of another structure than the one traced \(no \['mask'\] "
        r"\(a key without arrays: None, or static data\)\)",
    ),
    (
        "an Equinox module whose static field differs from the traced one",
        lambda g, a: js.trace(
            lambda p, x: p["block"](x), {"block": Scaled(jnp.ones(3), 1)}, jnp.ones(3)
        ).as_function()({"block": Scaled(jnp.ones(3), 2)}, jnp.ones(3)),
        js.SliceError,
        r"argument `p` is a tree of another structure than the one traced \(the Scaled at "
        r"\['block'\] holds other static data .*: traced 1, given 2\)",
    ),
    (
        "an NNX optimizer of another optax transform than the traced one",
        lambda g, a: _nnx_step_graph().as_function()(*_nnx_step_args()),
        js.SliceError,
        r"the Optimizer holds other static data .*: traced <function chain.<locals>.init_fn "
        r".*, given <function chain.<locals>.init_fn",
    ),
    (
        "a tuple where a list was traced",
        lambda g, a: js.trace(
            lambda ps, x: sum(jnp.tanh(x @ w) for w in ps).sum(), [jnp.eye(3)] * 2, jnp.ones(3)
        ).as_function()((jnp.eye(3), jnp.eye(3)), jnp.ones(3)),
        js.SliceError,
        r"argument `ps` is a tree of another structure than the one traced \(a tuple where a "
        r"list was traced\)",
    ),
    (
        "another value of a static argument",
        lambda g, a: js.trace(flagged, jnp.ones(2), True, static_argnums=1).as_function()(
            jnp.ones(2), False
        ),
        js.SliceError,
        r"static argument `train` is False, but the graph was traced with True",
    ),
    (
        "rewrite of a pattern that is only in a cond branch the traced arguments do not take",
        lambda g, a: js.trace(
            lambda x, p: jax.lax.cond(p > 0, jnp.cos, jnp.tanh, x), jnp.ones(2), 1.0
        ).rewrite(jnp.tanh, jnp.sin, jnp.ones(2)),
        js.SliceError,
        r"the pattern 'tanh' occurs where the index lists no value, at branch 0 of the cond at "
        r"test_errors\.py:\d+: g\.match does not list these and g\.rewrite does not change "
        r"them \(they run as they are; the index lists no occurrence to change\)$",
    ),
    (
        "a static argument traced under jax.jit",
        lambda g, a: jax.jit(js.trace(flagged, jnp.ones(2), True, static_argnums=1).as_function())(
            jnp.ones(2), True
        ),
        js.SliceError,
        r"static argument `train` is .*Tracer.*, but the graph was traced with True: .*; under "
        r"jax\.jit, pass it as a static argument of the jit \(static_argnums or static_argnames\)",
    ),
    (
        "another non-array part of an argument (an Equinox MLP's activation)",
        lambda g, a: with_activation(jnp.tanh),
        js.SliceError,
        r"`m\.activation` is .*tanh.*, but the graph was traced with .*\(a part of an "
        r"argument that is not an array is held static\)",
    ),
    (
        "trace of a generator function",
        lambda g, a: js.trace(generator, jnp.ones(2)),
        js.TraceError,
        r"generator is a generator function; js\.trace needs a function that returns arrays",
    ),
    (
        "trace of a function returning a non-array",
        lambda g, a: js.trace(returns_text, jnp.ones(2)),
        js.TraceError,
        r"returns_text returned str at 'out' and no array; js\.trace needs a function "
        r"returning arrays",
    ),
    (
        "trace of a function returning nothing",
        lambda g, a: js.trace(lambda x: {"none": None, "empty": ()}, jnp.ones(2)),
        js.TraceError,
        r"<lambda> returned \{'none': None, 'empty': \(\)\}, which holds no array; js\.trace "
        r"needs a function returning arrays",
    ),
    (
        "trace of a function returning an unhashable non-array",
        lambda g, a: js.trace(returns_a_set, jnp.ones(2)),
        js.TraceError,
        r"returns_a_set returned set at 'out\[1\]', which is neither an array nor a hashable "
        r"value to return as it is",
    ),
    (
        "Python control flow on a traced argument",
        lambda g, a: js.trace(python_branch, jnp.ones(2)),
        js.TraceError,
        r"tracing python_branch failed: TracerBoolConversionError: .* pass it with "
        r"static_argnums/static_argnames",
    ),
    (
        "unknown name",
        lambda g, a: g["z9"],
        js.SelectionError,
        r"no var named 'z9'; did you mean .*'z1'.*\(g\.names\(\) lists all\)",
    ),
    (
        "ambiguous name",
        lambda g, a: js.trace(repeated, jnp.ones(2))["h"],
        js.SelectionError,
        r"'h' is ambiguous: it matches h#0 \(= x\), h#1, h#2, h#3; pick one",
    ),
    (
        "ambiguous name, one binding the parameter",
        lambda g, a: js.trace(rebound, jnp.ones(2))["x"],
        js.SelectionError,
        r"'x' is ambiguous: it matches x#0, x#1, x#2, x#3; pick one",
    ),
    (
        "index out of range",
        lambda g, a: g[100],
        js.SelectionError,
        r"index 100 is out of range: the graph has 16 vars \(0\.\.15, or -16\.\.-1 from the end\)",
    ),
    (
        "a pytree key globbed as a path",
        lambda g, a: keyed_graph().select("p/*"),
        js.SelectionError,
        r"no var matches the pattern 'p/\*'; a pytree key is not a call or scope: did you "
        r"mean 'p\[\*\]'\?",
    ),
    (
        "glob matching nothing",
        lambda g, a: g.select("w*"),
        js.SelectionError,
        r"no var matches the pattern 'w\*' \(g\.names\(\) lists all\)",
    ),
    (
        "selector of the wrong type",
        lambda g, a: g[2.5],
        js.SelectionError,
        r"2\.5 is not a selector of one var: use an int, a name, a glob, a re\.Pattern or a Var",
    ),
    (
        "var of another graph",
        lambda g, a: g.slice(a["z1"], "z2"),
        js.SelectionError,
        r"belongs to another graph; select it from this graph by name: g\['z1'\]",
    ),
    (
        ".one() on several vars",
        lambda g, a: g.select("z?").one(),
        js.SelectionError,
        r"expected exactly one var, but the selection has 3: z1, z2, z3; use \.one\(\) only when",
    ),
    (
        "loop value without iteration",
        lambda g, a: js.trace(rnn, jnp.zeros(2), jnp.ones((4, 2)))["step/h_new"],
        js.SelectionError,
        r"'step/h_new' is inside a loop: add the iteration, 'step/h_new@0' \.\. 'step/h_new@3', or 'step/h_new@\*' for all",
    ),
    (
        "input downstream of every output",
        lambda g, a: g.slice("z3", "z1"),
        js.SliceError,
        r"output 'z1' does not depend on any input \(z3\)",
    ),
    (
        "input computed after the outputs",
        lambda g, a: g.slice(("z1", "z3"), "z2"),
        js.SliceError,
        r"input 'z3' is computed after every output \(z2\); pick an input upstream",
    ),
    (
        "input reaching no output",
        lambda g, a: g.slice(("z1", "params_3[1]"), "z2"),
        js.SliceError,
        r"input 'params_3\[1\]' does not reach any output \(z2\).*allow_unconnected=True",
    ),
    (
        "unconnected output",
        lambda g, a: g.slice("z2", ("z3", "z1")),
        js.SliceError,
        r"output 'z1' does not depend on any input \(z2\); pick an output downstream of the inputs, or pass allow_unconnected=True",
    ),
    (
        "duplicate input",
        lambda g, a: g.slice(("z1", "z1"), "z2"),
        js.SliceError,
        r"'z1' is selected twice as an input; select each input once",
    ),
    (
        "wrong shape to a slice",
        lambda g, a: g.slice("z1", "z2")(jnp.ones(5)),
        js.SliceError,
        r"input 'z1' expects float32\[4\], got float32\[5\]; pass a value shaped like g\.value\('z1'\)",
    ),
    (
        "wrong dtype to a slice",
        lambda g, a: g.slice("z1", "z2")(jnp.ones(4, jnp.int32)),
        js.SliceError,
        r"input 'z1' expects float32\[4\], got int32\[4\]",
    ),
    (
        "wrong argument count",
        lambda g, a: g.slice(("z1", "x"), "z2")(jnp.ones(4)),
        js.SliceError,
        r"takes 2 arguments \(z1, x\), got 1",
    ),
    (
        "wrong argument structure",
        lambda g, a: g.slice({"h": "z1"}, "z2")([jnp.ones(4)]),
        js.SliceError,
        r"expects its inputs structured as \{'h': \*\}, got \[\*\] \(\* is an array\)$",
    ),
    (
        "a slice called with keywords",
        lambda g, a: g.slice("z1", "z2")(z1=jnp.ones(4)),
        js.SliceError,
        r"takes its inputs by position, got keyword z1; pass them in the order \(z1\)",
    ),
    (
        "non-array argument to a slice",
        lambda g, a: g.slice("z1", "z2")("four"),
        js.SliceError,
        r"input 'z1' expects an array float32\[4\], got str",
    ),
    (
        "unbound slice of an abstract trace",
        lambda g, a: a.slice("z1", "z2")(jnp.ones(4)),
        js.SliceError,
        r"is unbound: its graph was traced with abstract arguments.*call s\.bind\(\*args, \*\*kwargs\)",
    ),
    (
        "value of an abstract trace",
        lambda g, a: a.value("z1"),
        js.SliceError,
        r"g\.value needs values, but this graph was traced with abstract arguments",
    ),
    (
        "bind with wrong shapes",
        lambda g, a: g.slice("z1", "z2").bind(jnp.ones(7), *mlp_12782_args()[1:]),
        js.SliceError,
        r"argument `x` is float32\[7\], but the graph was traced with float32\[3\]",
    ),
    (
        "bind with missing arguments",
        lambda g, a: g.slice("z1", "z2").bind(jnp.ones(3)),
        js.TraceError,
        r"the arguments do not fit f\(x, params_1, params_2, params_3\): missing a required argument",
    ),
    (
        "trace of a non-function",
        lambda g, a: js.trace(42, jnp.ones(2)),
        js.TraceError,
        r"js\.trace needs a function, got int: 42",
    ),
    (
        "static_argnums out of range",
        lambda g, a: js.trace(mlp_12782, *mlp_12782_args(), static_argnums=7),
        js.TraceError,
        r"static_argnums=7 is out of range for f",
    ),
    (
        "static_argnames naming no parameter",
        lambda g, a: js.trace(flagged, jnp.ones(2), train=True, static_argnames="trian"),
        js.TraceError,
        r"static_argnames='trian' names no parameter of flagged\(x, train\); "
        r"name one of \['x', 'train'\]",
    ),
    (
        "static_argnums given as a string",
        lambda g, a: js.trace(flagged, jnp.ones(2), True, static_argnums="1"),
        js.TraceError,
        r"static_argnums takes an int or a sequence of ints .* got static_argnums='1'",
    ),
    (
        "static_argnames given as an int",
        lambda g, a: js.trace(flagged, jnp.ones(2), True, static_argnames=1),
        js.TraceError,
        r"static_argnames a str or a sequence of strs .* static_argnames=1$",
    ),
    (
        "unknown jacobian mode",
        lambda g, a: g.jacobian("z1", "z2", mode="sideways"),
        js.SliceError,
        r"unknown jacobian mode 'sideways'; use 'auto', 'fwd' or 'rev'",
    ),
    (
        "gradient of an integer var",
        lambda g, a: int_graph().grads("out", ["m"]),
        js.SliceError,
        r"cannot differentiate with respect to 'm' \(int32\): gradients are of "
        r"floating-point values: pick a float var, or cast it in your function",
    ),
    (
        "gradient at a PRNG key a glob selects",
        lambda g, a: key_and_index_graph().grads("out", "c*"),
        js.SliceError,
        r"cannot differentiate with respect to 'c\[1\]' \(key<fry>\): a PRNG key has "
        r"no gradient: leave it out of wrt; 'c\*' selects it with float vars: keep those "
        r"with g.select\('c\*'\).where\(lambda v: jnp.issubdtype\(v.dtype, "
        r"jnp.inexact\)\)",
    ),
    (
        "gradient at PRNG keys alone a glob selects",
        lambda g, a: key_and_index_graph().grads("out", "c[1]*"),
        js.SliceError,
        r"cannot differentiate with respect to 'c\[1\]' \(key<fry>\): a PRNG key has "
        r"no gradient: leave it out of wrt$",
    ),
    (
        "a dict entry of wrt selecting nothing",
        lambda g, a: key_and_index_graph().grads("out", {"h": g.select("z*").where(bool_false)}),
        js.SliceError,
        r"wrt\['h'\] selects no var: give it a name or pattern that does",
    ),
    (
        "gradient of an integer output",
        lambda g, a: key_and_index_graph().grads("idx", "c[0]"),
        js.SliceError,
        r"cannot take gradients of the output 'idx' \(int32\): they are of the sum of "
        r"floating-point outputs \(a loss\); name a float output",
    ),
    (
        "replacement of the wrong shape",
        lambda g, a: g.replace("z1", lambda z: z[:2]),
        js.SliceError,
        r"the replacement for 'z1' must give float32\[4\], got float32\[2\]",
    ),
    (
        "a replacement returning None",
        lambda g, a: g.replace("z1", lambda z: None),
        js.SliceError,
        r"the replacement for 'z1' must give float32\[4\], got nothing \(no array\)",
    ),
    (
        "rewrite matching nothing",
        lambda g, a: g.rewrite(jnp.cos, jnp.sin, jnp.ones(4)),
        js.SliceError,
        r"matches nothing in this graph; check it with g\.match",
    ),
    (
        "primitive filter of the wrong type",
        lambda g, a: g.select(primitive=5),
        js.SelectionError,
        r"primitive=5 is not a primitive name: pass a str such as 'tanh' or a list of them",
    ),
    (
        "primitive not in the graph",
        lambda g, a: g.select(primitive="tahn"),
        js.SelectionError,
        r"no var is made by the primitive 'tahn'; did you mean 'tanh'\? \(this graph's "
        r"primitives: .*dot_general.*tanh\)",
    ),
    (
        "scope filter of the wrong type",
        lambda g, a: g.select(scope=3),
        js.SelectionError,
        r"scope=3 is not a scope path: pass a str such as 'MLP/Dense_0'",
    ),
    (
        "scope not in the graph",
        lambda g, a: g.select(scope="MLP/Dense_0"),
        js.SelectionError,
        r"no var is in the scope 'MLP/Dense_0' \(this graph has no scopes\)",
    ),
    (
        "where filter that is not a function",
        lambda g, a: g.select("z?", where=2),
        js.SelectionError,
        r"where=2 is not a function: pass a predicate such as lambda v: v\.ndim == 2",
    ),
    (
        "tag name that is not a string",
        lambda g, a: js.tag(jnp.ones(2), 3),
        js.TraceError,
        r"js\.tag needs a non-empty string name, got int: 3; call it as js\.tag\(value, 'name'\)",
    ),
    (
        "tag of a non-array",
        lambda g, a: js.tag({"a": jnp.ones(2), "b": "text"}, "pair"),
        js.TraceError,
        r"js\.tag\('pair'\) can only name arrays, got str at \['b'\]",
    ),
    (
        "jvp tangent of the wrong shape",
        lambda g, a: g.jvp("z1", "z2", jnp.ones(5)),
        js.SliceError,
        r"the tangent for input 'z1' must be float32\[4\], got float32\[5\]; pass a tangent "
        r"shaped like g\.value\('z1'\)",
    ),
    (
        "jvp tangents of the wrong structure",
        lambda g, a: g.jvp(("z1", "x"), "z2", (jnp.ones(4),)),
        js.SliceError,
        r"the tangents must be structured like the inputs \(z1, x\)",
    ),
    (
        "vjp cotangent of the wrong dtype",
        lambda g, a: g.vjp("z1", "z2", jnp.ones(5, jnp.int32)),
        js.SliceError,
        r"the cotangent for output 'z2' must be float32\[5\], got int32\[5\]",
    ),
    (
        "jvp on an abstract trace",
        lambda g, a: a.jvp("z1", "z2", jnp.ones(4)),
        js.SliceError,
        r"g\.jvp needs values, but this graph was traced with abstract arguments",
    ),
    (
        "abstract while_loop iteration",
        lambda g, a: js.trace(fixed_point, jax.ShapeDtypeStruct((), jnp.float32)).slice(
            "body/x_new@2", "out"
        ),
        js.SliceError,
        r"names a value inside a loop iteration, but the graph's while_loop could not be unrolled",
    ),
    (
        "an iteration of a value outside the abstract while_loop",
        lambda g, a: js.trace(fixed_point, jax.ShapeDtypeStruct((), jnp.float32))["a@2"],
        js.SelectionError,
        r"no var named 'a@2'; did you mean 'a'\?",
    ),
    (
        "an outer iteration past the outer loop's end",
        lambda g, a: js.trace(nested_scans, jnp.ones((4, 3, 3)), jnp.ones(3))["outer/inner/c2@4@1"],
        js.SelectionError,
        r"'outer/inner/c2' is inside a loop of 4 iterations, 0 \.\. 3 \('outer/inner/c2@0@0' "
        r"\.\. 'outer/inner/c2@3@2'\)",
    ),
    (
        "a pattern returning one of its arguments as it is",  # (said "output 0 ... output 0")
        lambda g, a: js.trace(lambda x: jnp.tanh(x), jnp.ones(3)).match(
            lambda x: (x, jnp.tanh(x)), jnp.ones(3)
        ),
        js.SliceError,
        r"the pattern's output 0 is one of its arguments as it is",
    ),
    (
        "a replacement of the right shape in another dtype",  # (said "shaped like")
        lambda g, a: js.trace(lambda x: jnp.tanh(x), jnp.ones(3)).replace(
            "out", lambda h: h.astype(jnp.float16)
        ),
        js.SliceError,
        r"must give float32\[3\], got float16\[3\]; cast it \(\.astype\('float32'\)\)",
    ),
    (
        "a flag left to its default when traced, given traced under jax.jit",
        lambda g, a: jax.jit(
            js.trace(lambda x, training=True: x * 2 if training else x, jnp.ones(2)).as_function()
        )(jnp.ones(2), False),
        js.SliceError,
        r"left to its default \(True\).*under jax.jit, pass it as a static argument of the "
        r"jit \(static_argnums or static_argnames\)",
    ),
    (
        "an array for a patch function's dict, under jax.jit",  # (said DynamicJaxprTracer)
        lambda g, a: jax.jit(js.trace(lambda x: jnp.tanh(x) * 2, jnp.ones(3)).patch_fn("%1"))(
            jnp.ones(3), jnp.ones(3)
        ),
        js.SliceError,
        r"patches must be a dict \{selector: value\}, got an array \(float32\[3\], traced\)",
    ),
    (
        "an unnamed body value past the loop's end",  # (no range was said)
        lambda g, a: js.trace(rnn, jnp.zeros(2), jnp.ones((50, 2)))["loop0%0@70"],
        js.SelectionError,
        r"'loop0%0' is inside a loop of 50 iterations, 0 \.\. 49 \('loop0%0@0' \.\. 'loop0%0@49'\)",
    ),
    (
        "a loop value's name without its body's path",
        lambda g, a: js.trace(rnn, jnp.zeros(2), jnp.ones((50, 2)))["h_new@3"],
        js.SelectionError,
        r"no var named 'h_new@3'; did you mean 'step/h_new@3'\?",
    ),
    (
        "a glob over a misspelt loop value",
        lambda g, a: js.trace(rnn, jnp.zeros(2), jnp.ones((50, 2))).select("step/h_nw@*"),
        js.SelectionError,
        r"no var matches the pattern 'step/h_nw@\*'; names close to it: 'step/h_new@\*'",
    ),
    (
        "a glob whose only wildcard is before the iteration, in a misspelt loop body",
        lambda g, a: js.trace(rnn, jnp.zeros(2), jnp.ones((50, 2))).select("stpe/*@3"),
        js.SelectionError,
        r"no var matches the pattern 'stpe/\*@3'; names close to it: 'step/",
    ),
    (
        "a glob of more iterations than the loops have",
        lambda g, a: js.trace(rnn, jnp.zeros(2), jnp.ones((50, 2))).select("step/h_new@*@*"),
        js.SelectionError,
        r"^no var matches the pattern 'step/h_new@\*@\*' \(g.names\(\) lists all\)$",
    ),
    (
        "a scope only inside a folded scan",
        lambda g, a: js.trace(scoped_rnn, jnp.zeros(2), jnp.ones((50, 2))).select(scope="cell"),
        js.SelectionError,
        r"the scope 'cell' is inside a loop the index keeps folded, whose values are per "
        r"iteration: select its outputs with g\.select\('cell@\*'\)",
    ),
    (
        "jacobian of complex values",
        lambda g, a: complex_graph().jacobian("z", "w"),
        js.SliceError,
        r"g\.jacobian differentiates real floating-point values; 'z' is complex64\. For a "
        r"complex, holomorphic slice take jax\.jacfwd\(s, holomorphic=True\)",
    ),
    (
        "jacobian of an integer value",
        lambda g, a: int_graph().jacobian("n", "m"),
        js.SliceError,
        r"'n' is int32.*for an integer value there is no derivative",
    ),
    (
        "an array default given another value",  # (said its parts "that are not arrays")
        lambda g, a: js.trace(defaulted, jnp.ones(3)).as_function()(jnp.ones(3), jnp.zeros(3)),
        js.SliceError,
        r"left to its default \(Array\(\[1\., 1\., 1\.\].*\), which the program holds fixed "
        r"\(a default is not one of the graph's inputs\); pass `b` to js.trace to make it one",
    ),
    (
        "a static array given other values",
        lambda g, a: js.trace(scaled, jnp.ones(3), np.ones(3), static_argnums=1).as_function()(
            jnp.ones(3), np.zeros(3)
        ),
        js.SliceError,
        r"static argument `s` is array\(\[0\., 0\., 0\.\]\), but the graph was traced with "
        r"array\(\[1\., 1\., 1\.\]\)",
    ),
    (
        "a patch keyed by the glob its patch function was made with",  # (said: select it)
        lambda g, a: js.trace(rnn, jnp.zeros(2), jnp.ones((3, 2))).patch_fn("step/h_new@*")(
            {"step/h_new@*": jnp.zeros((3, 2))}, jnp.zeros(2), jnp.ones((3, 2))
        ),
        js.SelectionError,
        r"patches 'step/h_new@0', 'step/h_new@1', 'step/h_new@2'; a glob given alone keys "
        r"each var it matches by its name; .*g\.patch_fn\(\{'name': 'step/h_new@\*'\}\)",
    ),
    (
        "g.replace given patch_fn's dict",  # (Python's missing argument 'value_or_fn')
        lambda g, a: g.replace({"z1": 0.0}),
        js.SliceError,
        r"g\.replace takes a selector and what to put there.*got \{'z1': 0\.0\} alone",
    ),
    (
        "g.replace given a list of strings",  # (a TypeError from jnp.asarray)
        lambda g, a: g.replace("z1", ["a", "b", "c", "d"]),
        js.SliceError,
        r"the replacement for 'z1' \(float32\[4\]\) is \['a', 'b', 'c', 'd'\], which holds "
        r"no numbers",
    ),
    (
        "g.replace given a ragged list",  # (NumPy's ValueError)
        lambda g, a: g.replace("z1", [[1.0], [2.0, 3.0]]),
        js.SliceError,
        r"is \[\[1\.0\], \[2\.0, 3\.0\]\], which is no array",
    ),
    (
        "g.replace given None",  # (said None "would be truncated")
        lambda g, a: g.replace("z1", None),
        js.SliceError,
        r"the replacement for 'z1' \(float32\[4\]\) is a NoneType, neither a value nor a "
        r"function",
    ),
    (
        "allow_unconnected given a string",  # ("no" is true: the slice was allowed)
        lambda g, a: g.slice("z1", "z2", allow_unconnected="no"),
        js.SliceError,
        r"allow_unconnected must be True or False, got 'no'",
    ),
    (
        "a tag name holding an iteration's @",
        lambda g, a: js.trace(lambda x: js.tag(x * 2, "h@1").sum(), jnp.ones(2)),
        js.TraceError,
        r"js\.tag name 'h@1' holds '@', which selectors read",
    ),
    (
        "a tag named like an index",  # (g["%1"] and g[1] were two vars)
        lambda g, a: js.tag(jnp.ones(2), "%1"),
        js.TraceError,
        r"js\.tag name '%1' holds '%'",
    ),
    (
        "an Equinox layer's name without its scope path",  # (suggested 'eqx.nn.MLP')
        lambda g, a: mlp_graph(jax.nn.relu)[1]["eqx.nn.Linear#1"],
        js.SelectionError,
        r"no var named 'eqx\.nn\.Linear#1'; did you mean 'eqx\.nn\.MLP/eqx\.nn\.Linear#1'",
    ),
    (
        "an Equinox layer's class name alone",  # (no suggestion)
        lambda g, a: mlp_graph(jax.nn.relu)[1]["Linear#1"],
        js.SelectionError,
        r"no var named 'Linear#1'; did you mean 'eqx\.nn\.MLP/eqx\.nn\.Linear#1'\?",
    ),
    (
        "gradient of a complex output",
        lambda g, a: complex_graph().grads("out[1]", ["z"]),
        js.SliceError,
        r"cannot take the gradient of 'w' \(complex64\): the sum of a complex output "
        r"is not a real loss",
    ),
    (
        "an argument that is a pytree, selected whole (no var named 'params_1' before)",
        lambda g, a: g.grads("z3", wrt="params_1"),
        js.SelectionError,
        r"'params_1' is a pytree of several values, not one: its leaves are "
        r"'params_1\[0\]', 'params_1\[1\]'; select them all with 'params_1\[\*\]\*'",
    ),
    (
        "a static argument given as one value where a list was traced (linen's mutable)",
        lambda g, a: js.trace(_with_mutable, jnp.ones(3), mutable=["stats"]).as_function()(
            jnp.ones(3)
        ),
        js.SliceError,
        r"argument `mutable` is a tree of another structure than the one traced \(False where "
        r"\['stats'\] was traced\)",
    ),
    (
        "a value of the branch of a cond the traced arguments did not take",
        lambda g, a: js.trace(_branchy, 1.0, 0.5)["small/k"],
        js.SelectionError,
        r"no var named 'small/k' .*the graph holds the branch of each cond the traced "
        r"arguments took: the values of its other branches have no names",
    ),
    (
        "a replacement function that fails to trace names it, not jaxsurgery's wrapper",
        lambda g, a: g.replace("z1", lambda z: "not an array"),
        js.SliceError,
        r"the replacement for 'z1' \(float32\[\d+\]\) failed to trace: function <lambda> "
        r"traced for jit",
    ),
    (
        "a replacement function giving a ShapeDtypeStruct (taken as a value before)",
        lambda g, a: g.replace("z1", lambda z: jax.ShapeDtypeStruct(z.shape, z.dtype)),
        js.SliceError,
        r"the replacement for 'z1' must give float32\[\d+\], got a jax.ShapeDtypeStruct, a "
        r"shape and dtype with no values",
    ),
    (
        "a patch of an int var outside its range (JAX's OverflowError before)",
        lambda g, a: _int_graph().patch_fn("k")({"k": 2**40}, jnp.ones(3), 2),
        js.SliceError,
        r"the patch for 'k' \(int32\): 1099511627776 is outside int32's range, .* where "
        r"it would wrap around",
    ),
    (
        "a NumPy int patch outside the var's range (wrapped around silently before)",
        lambda g, a: _int_graph().patch_fn("k")({"k": np.int64(2**32 + 5)}, jnp.ones(3), 2),
        js.SliceError,
        r"the patch for 'k' \(int32\): 4294967301 is outside int32's range",
    ),
    (
        "a finite float patch a float16 var cannot hold (became inf silently before)",
        lambda g, a: _half_graph().replace("h", jnp.full(3, 1e6)),
        js.SliceError,
        r"the replacement for 'h' \(float16\[3\]\): 1000000.0 is outside float16's range, "
        r"-65504.0 .. 65504.0, where it would become inf",
    ),
    (
        "the same as a list of Python floats (cast before the check: inf, silently)",
        lambda g, a: _half_graph().replace("h", [7e4, 1.0, 1.0]),
        js.SliceError,
        r"the replacement for 'h' \(float16\[3\]\): 70000.0 is outside float16's range",
    ),
    (
        "a Python int past int32 as a patch of a float var (JAX's OverflowError before)",
        lambda g, a: g.patch_fn("z1")({"z1": 2**62}, *mlp_12782_args()),
        js.SliceError,
        r"the patch for 'z1' is the Python int 4611686018427387904, which JAX takes as an "
        r"int32 and which that does not hold",
    ),
    (
        "the same, as a patch_fn patch (bfloat16's 999424)",
        lambda g, a: _half_graph().patch_fn("h")(
            {"h": jnp.full(3, 1e6, jnp.bfloat16)}, jnp.ones(3)
        ),
        js.SliceError,
        r"the patch for 'h' \(float16\): 999424.0 is outside float16's range",
    ),
    (
        "a Python int a float16 var cannot hold, as a replacement (became inf silently before)",
        lambda g, a: _half_graph().replace("h", 10**50),
        js.SliceError,
        r"the replacement for 'h' \(float16\[3\]\): 1e\+50 is outside float16's range",
    ),
    (
        "a list holding a Python int past int32 as a patch (called 'the Python int' before)",
        lambda g, a: g.patch_fn("z1")({"z1": [2**62, 1]}, *mlp_12782_args()),
        js.SliceError,
        r"the patch for 'z1' \(\[4611686018427387904, 1\]\) holds a Python int, which JAX "
        r"takes as an int32",
    ),
    (
        "a finite complex number a complex64 var cannot hold (became inf silently before)",
        lambda g, a: _complex_graph().replace("h", np.full(3, 1e300 + 1j)),
        js.SliceError,
        r"the replacement for 'h' \(complex64\[3\]\): \(1e\+300\+1j\) is outside complex64's "
        r"range \(each part\), .* where it would become inf",
    ),
    (
        "the same in its imaginary part, as a Python complex patch",
        lambda g, a: _complex_graph().patch_fn("h")({"h": 1e300j}, jnp.ones(3)),
        js.SliceError,
        r"the patch for 'h' \(complex64\): 1e\+300j is outside complex64's range",
    ),
]


def _complex_graph():
    def f(x):
        h = jnp.exp(1j * x)
        return jnp.abs(h * 2).sum()

    return js.trace(f, jnp.ones(3))


def _half_graph():
    def f(x):
        h = jnp.sin(x).astype(jnp.float16)
        return (h * 2).astype(jnp.float32).sum()

    return js.trace(f, jnp.ones(3))


def _branchy(p, y):
    def big(y):
        h = jnp.sin(y)
        return h * 2

    def small(y):
        k = jnp.cos(y)
        return k

    return jax.lax.cond(p > 0, big, small, y)


def _with_mutable(x, mutable=False):
    return jnp.sin(x).sum() * (2.0 if mutable else 1.0)


def _int_graph():
    def f(x, n):
        k = n * 3
        return x * k

    return js.trace(f, jnp.ones(3), 2)


@pytest.mark.parametrize("case, action, error, pattern", CATALOG, ids=[c[0] for c in CATALOG])
def test_bad_input(g, abstract, case, action, error, pattern):
    with pytest.raises(error) as info:
        action(g, abstract)
    assert isinstance(info.value, js.SurgeryError)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_catalog_size():
    assert len(CATALOG) >= 20


def test_arrays_held_static_are_compared_by_value_and_numpy_ints_select():
    """A static array or an array default given again (another object of the same
    values) ran; it was refused, the message printing two equal arrays. An index from
    NumPy (np.argmax's) was refused: "use an int"."""
    static = js.trace(scaled, jnp.ones(3), np.ones(3), static_argnums=1).as_function()
    allclose(static(jnp.arange(3.0), np.ones(3)), jnp.arange(3.0))
    allclose(
        js.trace(defaulted, jnp.ones(3)).as_function()(jnp.arange(3.0), jnp.ones(3)),
        jnp.arange(3.0),
    )
    nan = np.array([1.0, np.nan])
    allclose(
        js.trace(scaled, jnp.ones(2), nan, static_argnums=1).as_function()(jnp.ones(2), nan.copy()),
        nan,
    )
    held = js.trace(lambda x, d: x * d["m"], jnp.ones(2), {"m": np.ones(2)}, static_argnums=1)
    allclose(held.as_function()(jnp.ones(2), {"m": np.ones(2)}), jnp.ones(2))
    # keys JAX cannot sort (it raised), and a PRNG key default (refused, two equal keys)
    mixed = {1: np.ones(2), "a": 3.0}
    held = js.trace(lambda x, d: x * d[1] + d["a"], jnp.ones(2), mixed, static_argnums=1)
    allclose(held.as_function()(jnp.ones(2), {1: np.ones(2), "a": 3.0}), jnp.full(2, 4.0))

    def noisy(x, key=KEY):
        return x + jax.random.normal(key, x.shape)

    allclose(
        js.trace(noisy, jnp.ones(2)).as_function()(jnp.ones(2), jax.random.key(0)),
        noisy(jnp.ones(2)),
    )
    with pytest.raises(js.SliceError, match="left to its default"):
        js.trace(noisy, jnp.ones(2)).as_function()(jnp.ones(2), jax.random.key(1))

    class Config(NamedTuple):  # (a tuple's subclass: refused, two equal values printed)
        scale: np.ndarray
        shift: float

    def configured(x, c):
        return x * c.scale + c.shift

    held = js.trace(configured, jnp.ones(2), Config(np.ones(2) * 2, 1.0), static_argnums=1)
    allclose(held.as_function()(jnp.ones(2), Config(np.ones(2) * 2, 1.0)), jnp.full(2, 3.0))

    class Scaled(dict):  # a subclass's own == (more than its items) decides
        def __init__(self, *a, scale=1.0, **k):
            super().__init__(*a, **k)
            self.scale = scale

        def __eq__(self, other):
            return isinstance(other, Scaled) and self.scale == other.scale and super().__eq__(other)

        __hash__ = None

    held = js.trace(
        lambda x, c: x * c.scale + c["b"], jnp.ones(2), Scaled(b=1.0, scale=2.0), static_argnums=1
    ).as_function()
    allclose(held(jnp.ones(2), Scaled(b=1.0, scale=2.0)), jnp.full(2, 3.0))
    with pytest.raises(js.SliceError, match="static argument `c`"):
        held(jnp.ones(2), Scaled(b=1.0, scale=5.0))  # (ran the traced 2.0: 3, not 6)
    first = js.trace(
        lambda x, d: x * list(d.values())[0], jnp.ones(2), {"a": 2.0, "b": 3.0}, static_argnums=1
    ).as_function()
    with pytest.raises(js.SliceError, match="static argument `d`"):
        first(jnp.ones(2), {"b": 3.0, "a": 2.0})  # keys in another order: another value
    half = np.array([1.0, np.nan], jnp.bfloat16)  # (NaN in a dtype NumPy has no kind for)
    held = js.trace(scaled, jnp.ones(2), half, static_argnums=1).as_function()
    assert held(jnp.ones(2), half.copy()).shape == (2,)

    # a list is no array of its values (a * 2 repeats it): refused either way
    def doubled(x, a):
        b = a * 2
        return x.sum() * b[1]

    as_list = js.trace(doubled, jnp.ones(2), [1.0, 2.0, 3.0], static_argnums=1).as_function()
    as_array = js.trace(doubled, jnp.ones(2), np.array([1.0, 2.0, 3.0]), static_argnums=1)
    for function, other in (
        (as_list, np.array([1.0, 2.0, 3.0])),
        (as_array.as_function(), [1.0, 2.0, 3.0]),
    ):
        with pytest.raises(js.SliceError, match="static argument `a`"):
            function(jnp.ones(2), other)
    g = js.trace(mlp_12782, *mlp_12782_args())
    assert g[np.int64(3)] is g[3] and g.select([np.int32(3)]).names == (g[3].name,)
    assert g.slice(np.int64(3), "out").inputs is g[3]
    assert g[jnp.argmax(jnp.array([0, 0, 0, 1]))] is g[3]  # jnp's too
    with pytest.raises(js.SelectionError, match="is not a selector of one var"):
        g[jax.random.key(0)]  # noqa: B018  (no index: it raised NumPy's TypeError)


def test_no_internal_errors_escape_for_odd_selectors(g):
    for selector in (None, object(), b"z1", True, 1j, {"a": 1.5}, [2.5]):
        with pytest.raises(js.SurgeryError):
            g.slice(selector, "z2")


def test_nothing_the_user_passes_is_modified():
    args = mlp_12782_args()
    snapshot = jax.tree_util.tree_map(np.array, args)
    code, globals_keys = mlp_12782.__code__, set(mlp_12782.__globals__)
    g = js.trace(mlp_12782, *args)
    s = g.slice("z1", "z3")
    jax.jvp(s.bind(*args), (g.value("z1"),), (jnp.ones(4),))
    g.replace("z2", 0.0).as_function()(*args)
    g.grads("out", ["z1"])
    assert mlp_12782.__code__ is code and set(mlp_12782.__globals__) == globals_keys
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, snapshot, jax.tree_util.tree_map(np.array, args)
    )
