"""The dtype matrix: slices with inputs, outputs and context of every common dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose

import jaxsurgery as js

FLOATS = [jnp.float16, jnp.bfloat16, jnp.float32]


def float_program(x, w):
    a = jnp.sin(x) * w
    b = jnp.tanh(a) + x
    return b.sum()


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: jnp.dtype(d).name)
def test_float_dtypes(dtype):
    x = jnp.linspace(-1, 1, 4).astype(dtype)
    w = jnp.asarray(0.5, dtype)
    g = js.trace(float_program, x, w)
    s = g.slice("a", "b")
    a = g.value("a")
    assert a.dtype == dtype and s(a).dtype == dtype
    tol = 1e-2 if dtype != jnp.float32 else 1e-6
    allclose(s(a).astype(jnp.float32), (jnp.tanh(a) + x).astype(jnp.float32), rtol=tol, atol=tol)
    _, t = jax.jvp(s, (a,), (jnp.ones_like(a),))
    allclose(t.astype(jnp.float32), (1 - jnp.tanh(a) ** 2).astype(jnp.float32), rtol=tol, atol=tol)
    ct = jax.vjp(s, a)[1](jnp.ones_like(a))[0]
    assert ct.dtype == dtype


def test_float64_with_x64():
    with jax.enable_x64(True):
        x = jnp.linspace(-1, 1, 4, dtype=jnp.float64)
        g = js.trace(float_program, x, 0.5)
        s = g.slice("a", "b")
        a = g.value("a")
        assert a.dtype == jnp.float64
        jac = jax.jacfwd(s)(a)
        np.testing.assert_allclose(np.diag(jac), 1 - np.tanh(np.asarray(a)) ** 2, rtol=1e-12)


def test_a_float64_var_takes_values_past_float32s_range():
    """With x64 on, 1e300 for a float64 var is in its range: the range check refused it
    (it looked at the value as a float32), as a replacement and as a patch."""
    with jax.enable_x64(True):
        g = js.trace(lambda x: (jnp.sin(x) * 2).sum(), jnp.ones(3, jnp.float64))
        h = g.vars[1].name
        assert g.replace(h, 1e300).value(h).tolist() == [1e300] * 3
        patched = g.patch_fn(h)({h: jnp.full(3, 1e300)}, jnp.ones(3))
        np.testing.assert_allclose(patched, 6e300)
        with pytest.raises(
            js.SliceError, match="a Python int of 310 digits is outside float64's range"
        ):
            g.replace(h, 10**309)  # (a Python int past float64's range: inf)


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")  # (JAX's, for the value)
def test_gradients_of_an_x64_graph_with_x64_switched_off_say_to_switch_it_on():
    """They raised JAX's TypeError (lax.add of float64 and float32: zeros made without
    x64 are float32); values and slices of such a graph run in float64 as before."""

    def f(x, w):
        h = jnp.tanh(w @ x)
        return jnp.sin(h).sum()

    with jax.enable_x64(True):
        x, w = jnp.linspace(0, 1, 3, dtype=jnp.float64), jnp.ones((4, 3), jnp.float64) * 0.3
        g = js.trace(f, x, w)
        inside = g.grads("out", ["h"])["h"]
    allclose(inside, jnp.cos(jnp.tanh(w @ x)))
    with pytest.raises(js.SliceError, match="traced with x64 on.*jax.enable_x64"):
        g.grads("out", ["h"])
    assert g.value("h").dtype == jnp.float64


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")  # (JAX's)
def test_values_given_for_64_bit_values_with_x64_off_say_to_switch_it_on():
    """A model computing part of its work inside ``jax.enable_x64``, traced and used with
    x64 off: what a user gives for a float64 value (an input, an argument, a patch, a
    tangent, a cotangent, a replacement) would become float32, and JAX's TypeError
    (lax.add of float32 and float64) came from deep inside; a SliceError says to switch
    x64 on. A float64 JAX array, which JAX keeps, runs as before."""

    def model(w, x):
        h = jnp.tanh(x @ w)
        with jax.enable_x64(True):
            h64 = h.astype(jnp.float64)
            acc = jnp.sum(h64**2)
        return acc.astype(jnp.float32) * 2.0

    w, x = jnp.ones((4, 3)) / 4, jnp.ones((5, 4))
    g = js.trace(model, w, x)
    s = g.slice("h64", "acc")
    h64 = g.value("h64")
    assert h64.dtype == jnp.float64
    allclose(s(h64), jnp.sum(h64**2))
    allclose(g.as_function()(w, x), model(w, x))
    switch = "jax_enable_x64 is off now.*jax.enable_x64"
    for attempt in (
        lambda: s(np.ones((5, 3))),
        lambda: g.jvp("h64", "acc", np.ones((5, 3))),
        lambda: g.vjp("h64", "acc", 1.0),
        lambda: g.patch_fn("h64")({"h64": jnp.ones((5, 3))}, w, x),
        lambda: g.replace("acc", 3.0),
        lambda: g.replace("h64", lambda v: v * 2),
    ):
        with pytest.raises(js.SliceError, match=switch):
            attempt()
    with jax.enable_x64(True):
        allclose(s(np.ones((5, 3))), 15.0)
        allclose(g.replace("acc", 3.0).as_function()(w, x), 6.0)

    with jax.enable_x64(True):  # traced wholly with x64 on
        g64 = js.trace(lambda v: (jnp.sin(v) * 2).sum(), jnp.ones(3, jnp.float64))
    for made in (g64.as_function(), g64.values_fn("out")):
        with pytest.raises(js.SliceError, match="argument `v` must be float64.*" + switch):
            made(np.ones(3))


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")  # (JAX's)
def test_a_graph_traced_with_x64_on_takes_float64_arrays_with_x64_off():
    """Traced with x64 on, used with x64 off: float64 JAX arrays (which JAX keeps) run the
    float64 program as they are (they were made float32 on the way in, silently: 0.0
    for 0.5 below); NumPy arrays and Python numbers, which JAX would make float32,
    are a SliceError saying to switch x64 on (JAX's TypeError from deep inside). A
    float64 array traced with x64 off (a program that computes in float32) still takes
    float32 arrays."""

    def f(x, y):
        h = x + y
        return h - y

    with jax.enable_x64(True):
        x, y = jnp.full(2, 0.5, jnp.float64), jnp.float64(1e8)
        g = js.trace(f, x, y)
        from_numpy = js.trace(f, np.full(2, 0.5), 1e8)
    for result in (
        g.as_function()(x, y),
        g.values_fn("out")(x, y)["out"],
        g.patch_fn("h")({}, x, y),
        g.slice("x", "out").bind(x, y)(x),
    ):
        assert result.dtype == jnp.float64
        np.testing.assert_array_equal(result, [0.5, 0.5])
    for attempt in (
        lambda: from_numpy.as_function()(np.full(2, 0.5), 1e8),
        lambda: from_numpy.values_fn("h")(np.full(2, 0.5), 1e8),
        lambda: from_numpy.value("h"),
    ):
        with pytest.raises(js.SliceError, match="must be float64, and jax_enable_x64 is off"):
            attempt()

    with jax.enable_x64(True):
        wide = jnp.ones(3, jnp.float64)
    narrow = js.trace(lambda v: (jnp.sin(v) * 2).sum(), wide)  # x64 off: float32 inside
    allclose(narrow.as_function()(jnp.ones(3)), 2 * jnp.sin(jnp.ones(3)).sum())


def test_complex64():
    def f(z):
        u = z * (1.0 + 2.0j)
        v = jnp.exp(u) + jnp.conj(z)
        return v

    z = jnp.asarray([0.1 + 0.2j, -0.3 + 0.1j], jnp.complex64)
    g = js.trace(f, z)
    s = g.slice("u", "v")
    u = g.value("u")
    allclose(s(u), jnp.exp(u) + jnp.conj(z))
    _, t = jax.jvp(s, (u,), (jnp.ones_like(u),))
    allclose(t, jnp.exp(u), rtol=1e-5)  # conj(z) is context


def test_int32_and_bool_inputs_outputs_and_context():
    def f(x, n, mask):
        m = n * 3
        keep = mask & (m > 2)
        y = jnp.where(keep, x * m, 0.0)
        return y, m, keep

    x, n, mask = jnp.ones(4), jnp.arange(4), jnp.array([True, True, False, True])
    g = js.trace(f, x, n, mask)
    # int input -> int and bool outputs
    s = g.slice("n", ("m", "keep"))
    m, keep = s(jnp.array([0, 1, 2, 3]))
    allclose(m, jnp.array([0, 3, 6, 9]))
    assert keep.dtype == jnp.bool_ and keep.tolist() == [False, True, False, True]
    # float input with int and bool context; float0 tangents for the int input
    s2 = g.slice(("x", "m"), "y")
    assert {v.name for v in s2.context_vars} >= {"mask"}
    out, t = jax.jvp(s2, (x, g.value("m")), (jnp.ones(4), np.zeros(4, jax.dtypes.float0)))
    allclose(t, jnp.where(g.value("keep"), g.value("m"), 0.0))
    # bool input
    s3 = g.slice("keep", "y")
    allclose(s3(jnp.array([True, False, False, False])), jnp.array([0.0, 0.0, 0.0, 0.0]))


def test_prng_key_arrays():
    def f(key, scale):
        k1, k2 = jax.random.split(key)
        noise = jax.random.normal(k1, (3,))
        y = noise * scale
        return y, k2

    key = jax.random.key(0)
    g = js.trace(f, key, 2.0)
    # a key as a slice input
    s = g.slice("k1", "y")
    allclose(s(g.value("k1")), g.value("y"))
    other = s(jax.random.key(7))
    assert other.shape == (3,) and not jnp.allclose(other, g.value("y"))
    # a key as a slice output, and as context
    s_out = g.slice("key", "k2")
    assert jax.random.key_data(s_out(key)).tolist() == jax.random.key_data(g.value("k2")).tolist()
    allclose(jax.grad(lambda c: g.slice("scale", "y")(c).sum())(3.0), g.value("noise").sum())

    # a key as context: the window folds a traced step number into it
    def step(key, n):
        m = n + 1
        k = jax.random.fold_in(key, m)
        draw = jax.random.uniform(k, (2,))
        return draw

    h = js.trace(step, key, jnp.asarray(3))
    s_ctx = h.slice("n", "draw")
    assert [v.name for v in s_ctx.context_vars] == ["key"]
    allclose(s_ctx(jnp.asarray(3)), h.value("draw"))
    allclose(s_ctx(jnp.asarray(4)), step(key, jnp.asarray(4)))


def test_a_typed_key_argument_runs_every_whole_function():
    """A function of a typed key (``jax.random.key``, as blackjax steps take) runs
    through every function built from its graph for another key; a legacy uint32 key
    in its place is a SliceError naming the argument."""

    def f(x, key):
        y = jnp.tanh(x + jax.random.normal(key, (2,)))
        return (y * 2).sum()

    x, key, other = jnp.ones(2), jax.random.key(0), jax.random.key(1)
    g = js.trace(f, x, key)
    y_other = jnp.tanh(x + jax.random.normal(other, (2,)))
    allclose(g.as_function()(x, other), f(x, other))
    allclose(jax.jit(g.as_function())(x, other), f(x, other))
    allclose(jax.grad(g.as_function())(x, other), jax.grad(f)(x, other))
    allclose(g.values_fn("y")(x, other)["y"], y_other)
    allclose(g.grads_fn("out", ["y"])(x, other)["y"], 2 * jnp.ones(2))
    allclose(g.slice("x", "out").bind(x, other)(x), f(x, other))
    allclose(g.patch_fn("y")({"y": y_other * 0}, x, other), 0.0)
    attribution = g.attribution_fn("out", "y")((x, key), (x, other))["y"]
    allclose(attribution, (g.value("y") - y_other) * 2)
    with pytest.raises(js.SliceError, match="argument `key` is uint32"):
        g.as_function()(x, jax.random.PRNGKey(1))


def test_python_number_arguments_take_arrays_of_their_dtype_also_under_jit():
    def f(x0, n, s):
        def body(i, h):
            return jnp.sin(h * s) + 0.01 * i

        return jax.lax.fori_loop(0, n, body, x0).sum()

    x = jnp.array([0.3, -0.2, 1.0])
    g = js.trace(f, x, 10, 2.0)  # n and s traced as the arrays JAX makes of them
    fn = g.as_function()
    assert jnp.allclose(jax.jit(fn)(x, 5, 1.5), f(x, 5, 1.5))
    assert jnp.allclose(fn(x, jnp.int32(3), jnp.float32(0.5)), f(x, 3, 0.5))
    assert jnp.allclose(jax.jit(g.values_fn("out"))(x, 7, 2.0)["out"], f(x, 7, 2.0))
    with pytest.raises(
        js.SliceError, match=r"argument `n` is float32\[\], but the graph was traced with int32\[\]"
    ):
        fn(x, jnp.float32(5.0), 2.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn], ids=["bf16", "f8"])
def test_bfloat16_and_float8_values_take_python_numbers_and_arrays_of_their_kind(dtype):
    """bfloat16 and float8 are floats (NumPy calls their kind 'V'): a Python float or
    a float array replaces such a value, feeds a slice and calls the whole function
    as for float16 (they were refused: 'which bfloat16 does not hold')."""

    def f(x, s):
        h = jnp.sin(x) * s
        c = h.sum()
        return c.astype(jnp.float32)

    x = jnp.ones(3, dtype)
    g = js.trace(f, x, dtype(2.0))
    replaced = g.replace("h", 0.5).as_function()(x, dtype(2.0))
    allclose(replaced, jnp.full(3, 0.5, dtype).sum().astype(jnp.float32))
    array = g.replace("h", jnp.arange(3.0)).as_function()(x, dtype(2.0))  # float32 -> dtype
    allclose(array, jnp.arange(3.0).astype(dtype).sum().astype(jnp.float32))
    allclose(g.slice("c", "out")(0.5), 0.5)
    # (both jitted: a GPU fuses the jitted sum and rounds once, eager ops round each)
    allclose(jax.jit(g.as_function())(x, 3.0), jax.jit(f)(x, 3.0))
    with pytest.raises(js.SliceError, match="does not hold"):
        g.replace("h", 1 + 2j)


def _drawn(key, x):
    k1, k2 = jax.random.split(key)
    y = jax.random.normal(k1, (3,)) * x
    return y.sum()


def test_a_key_is_replaced_by_a_key():
    """``g.replace(key_var, jax.random.key(5))`` is the callable replacement's number (it
    raised AttributeError); a value of another kind is a SliceError naming the key."""

    args = (jax.random.key(0), jnp.ones(3))
    g = js.trace(_drawn, *args)
    by_value = g.replace("k1", jax.random.key(5)).as_function()(*args)
    allclose(by_value, jax.random.normal(jax.random.key(5), (3,)).sum())
    allclose(by_value, g.replace("k1", lambda k: jax.random.key(5)).as_function()(*args))
    for wrong in (jnp.zeros(2, jnp.uint32), 3):
        with pytest.raises(js.SliceError, match="key"):
            g.replace("k1", wrong)


def test_a_python_number_returned_is_a_value_of_its_traced_dtype():
    """``return a, 3.0``: its value is float32, as the function returns it (g.value and
    values_fn gave NumPy float64)."""
    g = js.trace(lambda x: (jnp.sin(x), 3.0), jnp.ones(2))
    assert g.value("out[1]").dtype == jnp.float32
    assert g.values_fn("out[1]")(jnp.ones(2))["out[1]"].dtype == jnp.float32
    assert g.as_function()(jnp.ones(2))[1].dtype == jnp.float32


def test_a_slice_under_jit_takes_a_python_number_as_it_does_eagerly():
    """``jax.jit(s)(3)`` for a float32 input: JAX traces the 3 as a weakly typed int32,
    which the slice takes as the Python number it is (it raised 'expects float32[],
    got int32[]', where ``s(3)`` worked); an int32 array is still refused."""
    g = js.trace(lambda x: jnp.sin(x) * 2.0, jnp.float32(1.5))
    s = g.slice("%1", "out")
    allclose(jax.jit(s)(3), s(3))
    allclose(jax.jit(s)(3), 6.0)
    with pytest.raises(js.SliceError, match="expects float32"):
        s(jnp.int32(3))


def test_an_int_enum_replaces_an_integer_value():
    """An ``IntEnum`` member is an int (it was refused: 'int32 does not hold a Mode')."""
    import enum

    class Mode(enum.IntEnum):
        TRIPLE = 3

    g = js.trace(lambda x, m: x * m, jnp.ones(2), 2)
    allclose(g.replace("m", Mode.TRIPLE).as_function()(jnp.ones(2), 2), 3.0 * jnp.ones(2))


def test_a_python_int_outside_a_small_int_dtype_is_refused_by_name():
    """300 for a uint8 input: a SliceError naming the input and the range (JAX's raw
    OverflowError came through); an int within the range is converted, as before."""

    def f(u, x):
        a = u * 2
        return x * a.astype(jnp.float32)

    g = js.trace(f, jnp.uint8(100), jnp.float32(1.5))
    s = g.slice("u", "out")
    for bad in (300, -1):
        with pytest.raises(js.SliceError, match=rf"input 'u'.*{bad} is outside uint8's range"):
            s(bad)
    with pytest.raises(js.SliceError, match=r"argument `u` is int \(300 is outside uint8's"):
        g.as_function()(300, 1.5)
    with pytest.raises(js.SliceError, match=r"argument `u` is int \(300 is outside uint8's"):
        g.values_fn("a")(300, 1.5)
    allclose(s(200), f(jnp.uint8(200), jnp.float32(1.5)))  # 400 wraps as uint8 does
    allclose(g.as_function()(7, 1.5), 21.0)


def test_an_integer_constant_outside_the_vars_range_is_refused():
    """``replace`` of a uint8 value by 300 (a Python int, a NumPy int64 or an int32
    array): it would wrap to 44, silently (NumPy values did)."""

    def f(x):
        y = x * 2
        return y.astype(jnp.float32)

    g = js.trace(f, jnp.array([1, 2, 3], jnp.uint8))
    for value in (300, np.int64(300), np.full(3, 300, np.int32)):
        with pytest.raises(js.SliceError, match=r"300 is outside uint8's range, 0 \.\. 255"):
            g.replace("y", value)
    with pytest.raises(js.SliceError, match=r"outside uint8's range"):
        g.replace("y", 2**70)  # past int64 too: the range, not "not of its kind"
    allclose(g.replace("y", np.int64(200)).as_function()(jnp.array([1, 2, 3], jnp.uint8)), 200.0)


def test_a_python_complex_tangent_for_a_real_var_is_refused_by_name():
    """``g.jvp("x", "y", 1j)`` for a float32 ``x``: a SliceError naming the input, as
    ``s(1j)`` says (NumPy's TypeError 'float() argument must be ...' came through);
    a Python number the dtype holds is still a tangent."""

    def f(x):
        y = jnp.sin(x) * 2
        return y

    g = js.trace(f, jnp.float32(0.5))
    with pytest.raises(
        js.SliceError, match=r"tangent for input 'x' must be float32\[\], got a Python complex"
    ):
        g.jvp("x", "y", 1j)
    with pytest.raises(
        js.SliceError, match=r"cotangent for output 'y' must be float32\[\], got a Python complex"
    ):
        g.vjp("x", "y", 1j)
    allclose(g.jvp("x", "y", 1)[1], 2 * jnp.cos(0.5))
    allclose(g.vjp("x", "y", 1.0)[1], 2 * jnp.cos(0.5))


def test_a_value_is_not_replaced_by_a_key():
    """``g.replace`` of a raw uint32 key (``jax.random.PRNGKey``) or a float value by a
    typed key: a SliceError asking for a value of the var's dtype (a raw key took
    NumPy's TypeError 'JAX array with PRNGKey dtype cannot be converted', a float
    value 'float32 does not hold: it would be truncated')."""

    args = (jax.random.PRNGKey(0), jnp.ones(3))
    g = js.trace(_drawn, *args)
    with pytest.raises(
        js.SliceError,
        match=r"'k1' \(uint32\[2\]\) is key<fry>; give a uint32 value, not a key \(jax\.random\.key_data",
    ):
        g.replace("k1", jax.random.key(5))
    with pytest.raises(
        js.SliceError, match=r"'y' \(float32\[3\]\) is key<fry>; give a float32 value, not a key$"
    ):
        g.replace("y", jax.random.key(5))
    data = jax.random.key_data(jax.random.key(5))
    allclose(g.replace("k1", data).as_function()(*args), jax.random.normal(data, (3,)).sum())


def test_a_replacement_function_returning_a_python_number_is_taken_as_the_value_is():
    """``g.replace("c", lambda c: 0)`` for a float32 var: the 0 is taken for every
    element, as ``g.replace("c", 0)`` takes it (it was refused: 'must give float32[],
    got int32[]'); a number the dtype does not hold is refused by its Python type."""

    def f(x):
        c = jnp.sum(x) * 2.0
        n = x.astype(jnp.uint8) * 2
        return c + n.sum()

    x = jnp.ones(3)
    g = js.trace(f, x)
    allclose(g.replace("c", lambda c: 0).as_function()(x), g.replace("c", 0).as_function()(x))
    allclose(g.replace("c", lambda c: 0).as_function()(x), 6.0)
    allclose(g.replace("n", lambda n: 7).as_function()(x), 27.0)
    with pytest.raises(
        js.SliceError, match=r"'n' must give uint8\[3\], got a Python float \(which"
    ):
        g.replace("n", lambda n: 2.5)
    with pytest.raises(js.SliceError, match=r"got a Python int \(300 is outside uint8's range"):
        g.replace("n", lambda n: 300)


def test_the_value_of_an_input_is_what_the_function_saw():
    """NumPy float64 and int64 arguments and a Python float (x64 off): the inputs'
    values are float32 and int32 arrays, as the function saw them, from g.value and
    values_fn, eagerly as under jax.jit (they were the arguments as passed)."""

    def h(x, n, a):
        return jnp.sin(x) * n * a

    args = (np.ones(3), np.int64(3), 2.5)
    g = js.trace(h, *args)
    want = {"x": jnp.float32, "n": jnp.int32, "a": jnp.float32}
    assert {v.name: v.dtype for v in g.inputs} == want
    assert {k: g.value(k).dtype for k in want} == want
    for values_fn in (g.values_fn(list(want)), jax.jit(g.values_fn(list(want)))):
        assert {k: v.dtype for k, v in values_fn(*args).items()} == want
    allclose(g.value("x"), np.ones(3))


def test_eager_calls_keep_python_numbers_weakly_typed_as_jit_does():
    """A Python number for an argument traced as one stays weakly typed in eager calls
    of what a graph makes, as under ``jax.jit`` (it became a float32 array: ``t`` below
    then promoted a bfloat16 value to float32 downstream, only when not jitted)."""

    def f(x, s):
        t = s * 2.0
        return x * 2, t

    x, bf16 = jnp.ones(3), jnp.ones(2, jnp.bfloat16)
    g = js.trace(f, x, 2.0)
    assert jax.jit(f)(x, 3.0)[1].weak_type
    for s in (3.0, 3):  # (an int for the float traced too, as jax.jit takes it)
        for t in (
            g.as_function()(x, s)[1],
            g.values_fn("t")(x, s)["t"],
            g.slice("s", "t")(s),
            jax.jit(g.as_function())(x, s)[1],
        ):
            allclose(t, 6.0)
            assert t.weak_type and (bf16 * t).dtype == jnp.bfloat16


def test_an_array_that_promotes_as_the_python_number_did_is_taken():
    """``f(x_bf16, 2.5)`` computes ``x * s`` in bfloat16: a bfloat16 array for ``s``
    computes the same program under jax.jit, and the whole function takes it (it was
    refused, in a message naming float32); an array that promotes otherwise is
    refused by its own dtype."""

    def f(x, s):
        return jnp.sin(x * s)

    x = jnp.ones(3, jnp.bfloat16)
    g = js.trace(f, x, 2.5)
    got = g.as_function()(x, jnp.bfloat16(1.5))
    assert got.dtype == jnp.bfloat16
    allclose(got.astype(jnp.float32), jax.jit(f)(x, jnp.bfloat16(1.5)).astype(jnp.float32))
    with pytest.raises(
        js.SliceError, match=r"an array of float16 would make the function compute in float32"
    ):
        g.as_function()(x, jnp.float16(1.5))
    with pytest.raises(js.SliceError, match=r"an array of float8_e4m3fn would not be promoted"):
        g.as_function()(x, jnp.float8_e4m3fn(1.5))


@pytest.mark.parametrize(
    "f",
    [lambda x, n: x * (n / 1000), lambda x, n: x + jnp.sqrt(n), lambda x, n: x * jnp.cos(n)],
    ids=["step_over_1000", "sqrt", "cos"],
)
def test_an_int_array_where_a_python_int_made_a_float_on_the_way_is_refused(f):
    """``x_bf16 * (step / 1000)`` traced with a Python int ``step``: the number becomes a
    weak float32, which bfloat16 takes; an int32 array for it becomes a float32 that
    promotes ``x``, so ``jax.jit(f)`` computes in float32: refused (it ran the bfloat16
    program silently, as int32 promotes with bfloat16 to bfloat16: hunt U). A Python
    int, or the int a program that meets the int itself takes, is still taken."""
    x = jnp.full(3, 1.001, jnp.bfloat16)
    g = js.trace(f, x, 7)
    assert jax.jit(f)(x, jnp.int32(7)).dtype == jnp.float32  # (what an array computes)
    for make in (g.as_function, lambda: jax.jit(g.as_function())):
        with pytest.raises(
            js.SliceError, match="an array of int32 would make the function compute in float32"
        ):
            make()(x, jnp.int32(7))
        got = make()(x, 7)
        assert got.dtype == jnp.bfloat16
        allclose(got.astype(jnp.float32), f(x, 7).astype(jnp.float32))
    with pytest.raises(js.SliceError, match="compute in float32"):
        g.values_fn(["out"])(x, jnp.int32(7))
    if f(x, jnp.asarray(True)).dtype == jnp.bfloat16:  # (a bool / 1000: a weak float)
        got = g.as_function()(x, jnp.asarray(True))
        assert got.dtype == jnp.bfloat16  # (refused once: hunt W)

    def plus(x, n):  # an int meeting bfloat16 itself: int32 + bfloat16 is bfloat16
        return x + n

    got = js.trace(plus, x, 3).as_function()(x, jnp.int32(3))
    assert got.dtype == jax.jit(plus)(x, jnp.int32(3)).dtype == jnp.bfloat16


def test_a_replacement_of_a_weakly_typed_value_computes_weakly_as_the_hand_edit():
    """``u = jnp.sin(s * 2)`` with ``s`` a Python float is weakly typed: a replacement of
    ``u`` gets it so, and the patched function returns it so, as the same edit by hand
    does (it got a strong float32, which promoted ``bf16 * u`` to float32: hunt U)."""

    def f(x, s):
        u = jnp.sin(s * 2)
        return x * u, u

    def edited(x, s):
        u = jnp.sin(s * 2) * 2
        return x * u, u

    x = jnp.ones(3, jnp.bfloat16)
    seen = []
    patched = js.trace(f, x, 2.0).replace("u", lambda u: seen.append(u.weak_type) or u * 2)
    assert seen == [True]
    for run in (patched.as_function(), jax.jit(patched.as_function())):
        got, want = run(x, 2.0)[1], edited(x, 2.0)[1]
        assert got.weak_type and want.weak_type
        assert (x * got).dtype == (x * want).dtype == jnp.bfloat16
        allclose(got, want)
    # a replacement that makes another dtype of the weak value (bfloat16) is traced on
    # the strong value, as before, and cast back (it was refused: hunt W)
    half = js.trace(f, x, 2.0).replace("u", lambda u: u * jnp.bfloat16(0.5))
    allclose(half.as_function()(x, 2.0)[1], jnp.sin(4.0) * 0.5)


def test_an_int_array_where_a_python_float_traced_was_computed_with_is_refused():
    """``x_bf16 * (s / 1000)`` traced with ``s = 2.5``: an int8 array for ``s`` becomes a
    float32 in ``s / 1000``, which promotes ``x`` (``jax.jit(f)`` computes in float32);
    it was taken as an exact cast, running the bfloat16 program (hunt W). Where the
    number itself meets ``x`` (``x_bf16 * s``), an int8 array promotes to bfloat16, as
    the number did: taken."""
    x = jnp.full(3, 1.001, jnp.bfloat16)
    n = jnp.int8(5)

    def scaled(x, s):
        return x * (s / 1000)

    def times(x, s):
        return x * s

    assert jax.jit(scaled)(x, n).dtype == jnp.float32
    with pytest.raises(js.SliceError, match="an array of int8 would run another program"):
        js.trace(scaled, x, 2.5).as_function()(x, n)
    got = js.trace(times, x, 2.5).as_function()(x, n)
    assert got.dtype == jax.jit(times)(x, n).dtype == jnp.bfloat16
    allclose(got.astype(jnp.float32), times(x, n).astype(jnp.float32))


def test_a_python_number_argument_is_weakly_typed_as_jax_jit_takes_it():
    """The values of the inputs are converted as ``jax.jit`` takes them: a Python
    number weakly typed, so what is computed from it with a bfloat16 array stays
    bfloat16 (``g.value`` gave a strong float32 array, and float32 results)."""

    def f(s, v):
        y = s * 2
        z = y * v
        return z.sum()

    v = jnp.ones(3, jnp.bfloat16)
    g = js.trace(f, 0.5, v)
    y = g.value("y")
    want = jax.jit(lambda s: s * 2)(0.5)
    assert y.dtype == want.dtype and y.weak_type == want.weak_type
    assert (y * v).dtype == jnp.bfloat16
    assert g.value("s").weak_type


def test_a_message_names_an_int_value_with_its_article():
    """(It said 'give a int32 value'.)"""

    def f(i, x):
        j = i * 2
        return x * j

    g = js.trace(f, jnp.int32(3), jnp.ones(2))
    with pytest.raises(js.SliceError, match=r"give an int32 value, not a key \(jax"):
        g.replace("j", jax.random.key(1))


def test_gradients_at_a_python_number_are_weakly_typed_as_jax_grads():
    """jax.grad at a Python number gives a weakly typed gradient (a bfloat16 step
    p - lr * g stays bfloat16); grads_fn and g.grads gave a float32 one."""

    def f(x, s):
        h = x * s
        return jnp.sum(h)

    x = jnp.arange(3.0)
    g = js.trace(f, x, 2.5)
    expected = jax.grad(f, argnums=1)(x, 2.5)
    for got in (g.grads_fn("out", wrt=["s"])(x, 2.5)["s"], g.grads("out", wrt=["s"])["s"]):
        assert got.dtype == expected.dtype and got.weak_type == expected.weak_type is True
        allclose(got, expected)
        assert (jnp.ones(2, jnp.bfloat16) - got).dtype == jnp.bfloat16
    assert not g.grads("out", wrt=["x"])["x"].weak_type  # (an array: strongly typed)
