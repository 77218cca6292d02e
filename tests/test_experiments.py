"""Experiments as compiled functions: ``values_fn`` (capture), ``patch_fn`` (patches as
arguments, so a sweep is one ``vmap``) and ``attribution_fn`` (attribution patching),
on an Equinox MLP, checked against the same computations written by hand."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from conftest import allclose, work
from models import big_or_small

import jaxsurgery as js

WIDTH, DEPTH = 8, 3


@pytest.fixture
def mlp():
    return eqx.nn.MLP(4, 2, WIDTH, DEPTH, activation=jnp.tanh, key=jax.random.key(0))


def forward(model, x):
    return model(x)


def layers_by_hand(model, x):
    """The output of each Linear layer (before its activation), by hand."""
    outs, h = [], x
    for k, layer in enumerate(model.layers):
        h = layer.weight @ h + layer.bias
        outs.append(h)
        if k < len(model.layers) - 1:
            h = jnp.tanh(h)
    return outs


def layer_name(k):
    return f"eqx.nn.MLP/eqx.nn.Linear#{k}"


def new_args(mlp, seed):
    """Arguments other than the traced ones: new weights and a new input."""
    model = jax.tree_util.tree_map(
        lambda w: (
            w + 0.1 * jax.random.normal(jax.random.key(seed), w.shape) if eqx.is_array(w) else w
        ),
        mlp,
    )
    return model, jax.random.normal(jax.random.key(seed + 1), (4,))


# -- values_fn ------------------------------------------------------------------------------------
def test_values_fn_returns_intermediates_for_new_arguments(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    f = g.values_fn([layer_name(0), layer_name(2)])
    for seed in (1, 5):
        model, x = new_args(mlp, seed)
        ref = layers_by_hand(model, x)
        got = f(model, x)
        assert list(got) == [layer_name(0), layer_name(2)]  # keyed by the selectors passed
        allclose(got[layer_name(0)], ref[0], rtol=1e-5)
        allclose(got[layer_name(2)], ref[2], rtol=1e-5)
        allclose(eqx.filter_jit(f)(model, x), got)


def test_values_fn_keys_a_glob_by_the_names_it_matched(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    model, x = new_args(mlp, 2)
    got = g.values_fn("eqx.nn.MLP/eqx.nn.Linear#*")(model, x)
    assert list(got) == [layer_name(k) for k in range(DEPTH + 1)]
    for k, ref in enumerate(layers_by_hand(model, x)):
        allclose(got[layer_name(k)], ref, rtol=1e-5)


def test_a_path_naming_one_numbered_instance_is_keyed_as_written():
    """``lax.map(row, xs, batch_size=3)`` calls ``row`` twice (the batches' scan, then
    the remainder): "row/h@1" is "row#0/h@1", and the results say "row/h@1"."""

    def f(w, xs):
        def row(r):
            h = jnp.tanh(r @ w)
            return h * 2

        ys = jax.lax.map(row, xs, batch_size=3)
        return jnp.sum(ys**2)

    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    xs = jax.random.normal(jax.random.key(1), (7, 4))
    g = js.trace(f, w, xs)
    got = jax.jit(g.values_fn(["row/h@1", "row/h@0"]))(w, -xs)
    assert set(got) == {"row/h@1", "row/h@0"}
    allclose(got["row/h@1"], jnp.tanh(-xs[3:6] @ w), rtol=1e-5)
    grads = g.grads("out", ["row/h@1"])
    assert list(grads) == ["row/h@1"]
    allclose(grads["row/h@1"], 8 * jnp.tanh(xs[3:6] @ w), rtol=1e-5)  # d(sum (2h)^2)/dh


def test_values_fn_stops_after_the_last_selected_value(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    f = g.values_fn(layer_name(0))
    jaxpr = jax.make_jaxpr(lambda x: f(mlp, x))(jnp.ones(4)).jaxpr
    # the first layer's matmul only: nothing of layers 1..3 runs
    assert work(jaxpr, "dot_general") == 1 and work(jaxpr, "tanh") == 0
    whole = jax.make_jaxpr(lambda x: mlp(x))(jnp.ones(4)).jaxpr
    assert work(whole, "dot_general") == DEPTH + 1  # (the check can fail)


@pytest.mark.parametrize("both", [False, True], ids=["last_only", "with_ys"])
def test_values_fn_of_every_step_is_the_scans_stacked_result(both):
    """``{"h": "step/h_new@*"}``: the scan's stacked values (and its result for the last
    step when that is all it returns), not T row picks stacked (6002 equations at
    T = 3000, seconds to run and compile)."""

    def rnn(w, h0, xs):
        def step(h, x):
            h_new = jnp.tanh(w @ h + x)
            return h_new, h_new

        h_last, hs = jax.lax.scan(step, h0, xs)
        return (h_last, hs) if both else h_last

    T = 300
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    args = (w, jnp.zeros(4), jnp.linspace(-1, 1, T * 4).reshape(T, 4))
    fn = js.trace(rnn, *args).values_fn({"h": "step/h_new@*"})
    new = (2 * w, jnp.ones(4) * 0.1, args[2] * 0.5)
    allclose(jax.jit(fn)(*new)["h"], _hs(rnn, both, new))
    assert len(jax.make_jaxpr(lambda *a: fn(*a)["h"])(*new).jaxpr.eqns) < 20


def _hs(rnn, both, args):
    if both:
        return rnn(*args)[1]
    w, h0, xs = args
    return jax.lax.scan(lambda h, x: (jnp.tanh(w @ h + x),) * 2, h0, xs)[1]


def test_values_fn_under_vmap_and_grad(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    f = g.values_fn(layer_name(1))
    xs = jax.random.normal(jax.random.key(3), (5, 4))
    got = jax.vmap(lambda x: f(mlp, x)[layer_name(1)])(xs)
    allclose(got, jax.vmap(lambda x: layers_by_hand(mlp, x)[1])(xs), rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(f(mlp, x)[layer_name(1)] ** 2))(xs[0])
    ref = jax.grad(lambda x: jnp.sum(layers_by_hand(mlp, x)[1] ** 2))(xs[0])
    allclose(grad, ref, rtol=1e-5)


# -- patch_fn -------------------------------------------------------------------------------------
def patched_by_hand(model, x, k, value):
    """The model with layer k's output replaced by ``value``, by hand."""
    h = x
    for j, layer in enumerate(model.layers):
        h = value if j == k else layer.weight @ h + layer.bias
        if j < len(model.layers) - 1:
            h = jnp.tanh(h)
    return h


def test_patch_fn_runs_the_model_with_patched_values(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    p = g.patch_fn(layer_name(1))
    clean, corrupt = jnp.ones(4), -jnp.ones(4)
    a_clean = layers_by_hand(mlp, clean)[1]
    got = p({layer_name(1): a_clean}, mlp, corrupt)  # clean -> corrupt
    allclose(got, patched_by_hand(mlp, corrupt, 1, a_clean), rtol=1e-5)
    allclose(got, mlp(clean), rtol=1e-5)  # everything downstream is the clean run's
    allclose(p({}, mlp, corrupt), mlp(corrupt), rtol=1e-5)  # nothing patched
    with pytest.raises(js.SelectionError, match="nope"):
        p({"nope": a_clean}, mlp, corrupt)
    with pytest.raises(js.SliceError, match="shape"):
        p({layer_name(1): jnp.ones(3)}, mlp, corrupt)


def test_a_patch_sweep_is_one_vmap_and_differentiable(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    p = eqx.filter_jit(g.patch_fn(layer_name(1)))
    x = jax.random.normal(jax.random.key(4), (4,))
    patches = jax.random.normal(jax.random.key(5), (64, WIDTH))
    sweep = jax.vmap(lambda v: p({layer_name(1): v}, mlp, x))(patches)
    one_by_one = jnp.stack([patched_by_hand(mlp, x, 1, v) for v in patches])
    allclose(sweep, one_by_one, rtol=1e-5)
    grad = jax.grad(lambda v: jnp.sum(p({layer_name(1): v}, mlp, x)))(patches[0])
    ref = jax.grad(lambda v: jnp.sum(patched_by_hand(mlp, x, 1, v)))(patches[0])
    allclose(grad, ref, rtol=1e-5)
    grad_x = jax.grad(lambda x: jnp.sum(p({layer_name(2): patches[0][:WIDTH]}, mlp, x)))
    with pytest.raises(js.SelectionError):
        grad_x(x)  # only the selected vars can be patched


# -- attribution_fn -------------------------------------------------------------------------------
def test_attribution_fn_equals_attribution_patching_by_hand(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    wrt = [layer_name(0), layer_name(1), layer_name(2)]
    a = eqx.filter_jit(g.attribution_fn("out", wrt))
    clean, corrupt = (mlp, jnp.ones(4)), (mlp, jnp.linspace(-1.0, 1.0, 4))
    got = a(clean, corrupt)
    assert list(got) == wrt
    a_clean, a_corrupt = layers_by_hand(*clean), layers_by_hand(*corrupt)
    for k in range(3):

        def out_from(v, k=k):
            return jnp.sum(patched_by_hand(mlp, corrupt[1], k, v))

        grad = jax.grad(out_from)(a_corrupt[k])  # ∂sum(out)/∂a_k at the corrupt run
        allclose(got[layer_name(k)], (a_clean[k] - a_corrupt[k]) * grad, rtol=1e-4, atol=1e-6)


def test_attribution_fn_passes_keyword_arguments_to_both_runs():
    """A keyword-only parameter (or one passed by name) is given once, for both runs."""

    def f(x, *, scale):
        h = jnp.tanh(x * scale)
        return (h**2).sum()

    x_clean, x_corrupt, scale = jnp.ones(3), jnp.linspace(-1.0, 1.0, 3), jnp.float32(0.5)
    a = jax.jit(js.trace(f, x_clean, scale=scale).attribution_fn("out", "h"))
    got = a((x_clean,), (x_corrupt,), scale=scale)["h"]
    h_clean, h_corrupt = jnp.tanh(x_clean * scale), jnp.tanh(x_corrupt * scale)
    allclose(got, (h_clean - h_corrupt) * 2 * h_corrupt, rtol=1e-6)


def test_attribution_over_a_scan_runs_the_corrupted_pass_once():
    """The corrupted run's values come from the gradient's own forward pass: the
    corrupted forward pass ran twice (values, then gradients), and XLA merges no two
    scans (1.2-1.4x the hand-written attribution on a scanned stack). Equal to the
    stacked-perturbation trick by hand, every step."""

    def model(ws, x):
        def step(h, w):
            h = jnp.tanh(h @ w)
            return h, None

        h, _ = jax.lax.scan(step, x, ws)
        return (h**2).sum()

    def perturbed(eps, ws, x):
        def step(h, inp):
            h = jnp.tanh(h @ inp[0]) + inp[1]
            return h, h

        h, hs = jax.lax.scan(step, x, (ws, eps))
        return (h**2).sum(), hs

    ws = jax.random.normal(jax.random.key(0), (5, 3, 3)) / 2
    x, xc = jnp.ones((2, 3)), jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    g = js.trace(model, ws, x)
    wrt = {"h": "step/h#1@*"}
    a = g.attribution_fn("out", wrt)
    eps = jnp.zeros((5, 2, 3))
    grads, corrupt = jax.grad(perturbed, has_aux=True)(eps, ws, xc)
    allclose(jax.jit(a)((ws, x), (ws, xc))["h"], (perturbed(eps, ws, x)[1] - corrupt) * grads)

    def tanhs(fn, *args):  # the forward passes a function's program runs, by their tanh
        return str(jax.make_jaxpr(fn)(*args)).count("tanh")

    passes = tanhs(g.values_fn(wrt), ws, x) + tanhs(g.grads_fn("out", wrt), ws, xc)
    assert tanhs(a, (ws, x), (ws, xc)) == passes


def test_experiments_keyed_by_a_dict_stack_what_a_key_selects(mlp):
    """A dict key of several vars (``"eqx.nn.MLP/eqx.nn.Linear#*"``) is one stacked
    result, row k its k-th var: each row's attribution uses its own var's gradient, and a
    patch of that key is stacked the same way; a key of one var is that var's."""
    g = js.trace(forward, mlp, jnp.ones(4))
    inner = [layer_name(k) for k in range(DEPTH)]  # the hidden layers, all WIDTH wide
    clean, corrupt = (mlp, jnp.ones(4)), (mlp, jnp.linspace(-1.0, 1.0, 4))
    stacked = g.attribution_fn("out", {"hidden": inner})(clean, corrupt)["hidden"]
    one_by_one = g.attribution_fn("out", inner)(clean, corrupt)
    assert stacked.shape == (DEPTH, WIDTH)
    for k, name in enumerate(inner):
        allclose(stacked[k], one_by_one[name], rtol=1e-6)

    p = g.patch_fn({"act": layer_name(1), "hidden": inner[:2]})
    a = layers_by_hand(mlp, clean[1])
    allclose(p({"act": a[1]}, *corrupt), patched_by_hand(mlp, corrupt[1], 1, a[1]), rtol=1e-5)
    allclose(p({"hidden": jnp.stack(a[:2])}, *corrupt), mlp(clean[1]), rtol=1e-5)
    with pytest.raises(js.SliceError, match="leading axis 2"):
        p({"hidden": a[0]}, *corrupt)
    # a dict inside a list would lose its keys (each var keyed by its name): refused
    for make in (g.values_fn, g.patch_fn, lambda s: g.grads_fn("out", s)):
        with pytest.raises(js.SelectionError, match="a dict inside a list of selectors"):
            make([layer_name(0), {"hidden": inner}])


def test_new_arguments_of_other_shapes_are_a_slice_error_naming_the_argument(mlp):
    g = js.trace(forward, mlp, jnp.ones(4))
    with pytest.raises(
        js.SliceError, match=r"argument `x` is float32\[5\].*traced with float32\[4\]"
    ):
        g.values_fn(layer_name(0))(mlp, jnp.ones(5))
    with pytest.raises(js.SliceError, match="argument `x` is int32"):
        g.patch_fn(layer_name(0))({layer_name(0): jnp.ones(WIDTH)}, mlp, jnp.ones(4, jnp.int32))


# -- a model a library ships: haiku.nets.MLP -----------------------------------------------------
def test_values_and_patches_of_a_haiku_mlp_for_new_parameters():
    import haiku as hk

    mlp = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 8, 2])(x)))
    x = jax.random.normal(jax.random.key(0), (3, 4))
    g = js.trace(mlp.apply, mlp.init(jax.random.key(1), x), x)
    params = mlp.init(jax.random.key(2), x)  # new parameters and inputs
    x = jax.random.normal(jax.random.key(3), (3, 4))
    w = [params[f"mlp/~/linear_{k}"] for k in range(3)]
    h0 = x @ w[0]["w"] + w[0]["b"]
    h1 = jax.nn.relu(h0) @ w[1]["w"] + w[1]["b"]
    got = jax.jit(g.values_fn(["mlp/linear_0", "mlp/linear_1"]))(params, x)
    allclose(got["mlp/linear_0"], h0, rtol=1e-5)
    allclose(got["mlp/linear_1"], h1, rtol=1e-5)

    patched = g.patch_fn("mlp/linear_1")
    patches = jax.random.normal(jax.random.key(4), (16, 3, 8))
    sweep = jax.jit(jax.vmap(lambda v: patched({"mlp/linear_1": v}, params, x)))(patches)
    by_hand = jax.nn.relu(patches) @ w[2]["w"] + w[2]["b"]
    allclose(sweep, by_hand, rtol=1e-5)


def test_a_typed_key_is_patched_with_a_key():
    def noisy(key, x):
        k1, _ = jax.random.split(key)
        noise = jax.random.normal(k1, x.shape)
        return jnp.sum(x + noise)

    key, x = jax.random.key(0), jnp.ones(3)
    p = js.trace(noisy, key, x).patch_fn("k1")
    new = jax.random.key(5)
    allclose(p({"k1": new}, key, x), jnp.sum(x + jax.random.normal(new, x.shape)))
    with pytest.raises(js.SliceError, match="give a key of the var's kind"):
        p({"k1": jnp.zeros((), jnp.uint32)}, key, x)


def test_a_value_is_not_patched_with_a_key():
    """A typed key for a float value: the SliceError asks for a float32 value (it said
    'give a key of the var's kind', of a float32 var)."""
    p = js.trace(lambda x: jnp.sin(x).sum(), jnp.ones(3)).patch_fn("%1")
    with pytest.raises(
        js.SliceError, match=r"is key<fry>, the var is float32; give a float32 value"
    ):
        p({"%1": jax.random.split(jax.random.key(0), 3)}, jnp.ones(3))


def test_a_patch_sweep_inside_a_branch_applies_where_the_branch_runs():
    """patch_fn at a value of a cond branch, as g.replace: the patch applies when the
    branch runs; arguments that take the other branch leave it unused (also under
    jax.vmap over predicates that take both)."""

    def f(p, y):
        return (big_or_small(p, y) ** 2).sum()

    def by_hand(h, p, y):
        return (jax.lax.cond(p > 0, lambda y: h * 2, lambda y: jnp.cos(y) * 3, y) ** 2).sum()

    y, h = jnp.array([0.3, 0.4]), jnp.ones(2)
    g = js.trace(f, 1.0, y)
    sweep = g.patch_fn("big_or_small/big/h")
    ps = jnp.array([1.0, -1.0, 2.0])
    got = jax.vmap(lambda p: sweep({"big_or_small/big/h": h}, p, y))(ps)
    allclose(got, jnp.stack([by_hand(h, p, y) for p in ps]))
    allclose(
        sweep({"big_or_small/big/h": h}, -1.0, y),
        g.replace("big_or_small/big/h", h).as_function()(-1.0, y),
    )


def test_patch_fn_of_a_run_of_steps_is_one_edit_of_the_scan():
    """``{"h": "step/h_new@*"}`` (or steps 5..9): the stacked patch is the scan's rows,
    one edit (an edit per step made a program growing with T), equal to a scan that
    writes the patch at those steps."""

    def rnn(w, h0, xs):
        def step(h, x):
            h_new = jnp.tanh(w @ h + x)
            return h_new, h_new

        _, hs = jax.lax.scan(step, h0, xs)
        return jnp.sum(hs**2)

    def patched_by_hand(w, h0, xs, start, rows):
        def step(c, x):
            h, t = c
            h_new = jnp.tanh(w @ h + x)
            inside = (t >= start) & (t < start + rows.shape[0])
            h_new = jnp.where(inside, rows[jnp.clip(t - start, 0, rows.shape[0] - 1)], h_new)
            return (h_new, t + 1), h_new

        _, hs = jax.lax.scan(step, (h0, 0), xs)
        return jnp.sum(hs**2)

    T = 200
    w = jax.random.normal(jax.random.key(0), (4, 4)) / 2
    args = (w, jnp.zeros(4), jnp.linspace(-1, 1, T * 4).reshape(T, 4))
    g = js.trace(rnn, *args)
    for selector, start, n in (
        ("step/h_new@*", 0, T),
        ([f"step/h_new@{t}" for t in range(5, 10)], 5, 5),
    ):
        p = g.patch_fn({"h": selector})
        rows = jax.random.normal(jax.random.key(2), (n, 4))
        allclose(jax.jit(p)({"h": rows}, *args), patched_by_hand(*args, start, rows), rtol=1e-5)
        assert len(jax.make_jaxpr(lambda r, p=p: p({"h": r}, *args))(rows).jaxpr.eqns) < 20
    with pytest.raises(js.SliceError, match=r"give a value of a row per var, shape \(200, 4\)"):
        g.patch_fn({"h": "step/h_new@*"})({"h": jnp.ones((T, 3))}, *args)


def test_attribution_at_a_complex_value_is_the_real_change_of_the_output():
    # JAX's gradient at a complex value is ∂f/∂x − i·∂f/∂y: a change times it is a change
    # of the (real) output in its real part; the imaginary part was returned too, as big
    w = jnp.array([1 + 2j, -0.5 + 1j, 2 - 1j, 0.3 + 0.1j], jnp.complex64)

    def f(x):
        y = jnp.fft.fft(x) * w
        return (jnp.real(y) ** 2).sum()

    clean, corrupt = jnp.arange(4.0), jnp.arange(4.0) * 1.1
    a = js.trace(f, corrupt).attribution_fn("out", "y")((clean,), (corrupt,))["y"]
    y_clean, y_corrupt = jnp.fft.fft(clean) * w, jnp.fft.fft(corrupt) * w
    d = y_clean - y_corrupt  # by hand: the derivative along d, element by element
    per_element = [
        jax.jvp(lambda t, k=k: f_of_y(y_corrupt.at[k].add(t * d[k])), (0.0,), (1.0,))[1]
        for k in range(4)
    ]
    assert a.dtype == jnp.float32
    allclose(a, jnp.array(per_element), rtol=1e-5)


def f_of_y(y):
    return (jnp.real(y) ** 2).sum()


def test_the_functions_a_graph_makes_name_the_programs_jit_compiles():
    # jax.jit names its program by the function's __name__: jit(<unnamed function>) was
    # every compile log, profile and StableHLO module of them
    def loss(w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(h**2)

    w, x = jnp.ones((3, 2)), jnp.ones((4, 3))
    g = js.trace(loss, w, x)
    made = {
        "loss_grads": (g.grads_fn("out", ["h"]), (w, x)),
        "loss_values": (g.values_fn(["h"]), (w, x)),
        "loss_attribution": (g.attribution_fn("out", "h"), ((w, x), (w, x))),
        "loss_slice": (g.slice("h", "out"), (jnp.ones((4, 2)),)),
    }
    for name, (fn, args) in made.items():
        assert fn.__name__ == name
        assert jax.jit(fn).lower(*args).as_text().startswith(f"module @jit_{name}")
    assert repr(made["loss_grads"][0]).startswith("<loss_grads: GradsFunction of ")
    assert repr(made["loss_grads"][0]).endswith("loss(w, x)>")
    assert repr(made["loss_attribution"][0]).startswith("<loss_attribution: AttributionFunction")


def test_jit_of_a_function_asked_again_compiles_once(caplog):
    # a training loop calling jax.jit(g.grads_fn(...)) each step: the same computation asked
    # again is the same function object, whose compiled program JAX keeps (it compiled at
    # every step); another computation is another function
    def loss(w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(h**2)

    w, x = jnp.ones((3, 2)), jnp.ones((4, 3))
    g = js.trace(loss, w, x)
    assert g.grads_fn("out", ["h"]) is g.grads_fn("out", ["h"])
    assert g.grads_fn("out", {"hidden": "h"}) is not g.grads_fn("out", ["h"])  # other keys
    assert g.values_fn(["h"]) is g.values_fn(["h"])
    assert g.attribution_fn("out", "h") is g.attribution_fn("out", "h")
    # (slices and the whole function too: they were made anew at each call)
    assert g.as_function() is g.as_function()
    assert g.slice("h", "out") is g.slice("h", "out")
    assert g.slice("h", "out") is not g.slice(["h"], "out")  # another structure
    caplog.set_level("WARNING", logger="jax")
    h = jnp.ones((4, 2))
    with jax.log_compiles():
        for _ in range(3):
            w = w - 0.1
            got = jax.jit(g.grads_fn("out", ["h"]))(w, x)["h"]
            allclose(got, 2 * jnp.tanh(x @ w))
            allclose(jax.jit(g.as_function())(w, x), loss(w, x))
            allclose(jax.jit(g.slice("h", "out"))(h), 8.0)
    for name in ("loss_grads", "loss", "loss_slice"):
        compiles = [
            r for r in caplog.records if r.getMessage().startswith(f"Compiling jit({name})")
        ]
        assert len(compiles) == 1, [r.getMessage()[:60] for r in compiles]
