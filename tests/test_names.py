"""Names (SPEC §4 rules 1, 2, 3, 6): inputs, outputs, tags, Python variables, fallback."""

import contextlib
import functools
import linecache
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose, check_slice
from jax.ad_checkpoint import checkpoint_name

import jaxsurgery as js


def names_of(g):
    return [v.name for v in g.vars]


def test_input_names_follow_parameters_and_key_paths():
    def f(x, params, *args, scale, **extra):
        return x * params["w"] + params["b"][0] + args[1] * scale + extra["k"]

    g = js.trace(
        f,
        1.0,
        {"w": jnp.ones(2), "b": [jnp.zeros(2)]},
        2.0,
        3.0,
        scale=4.0,
        k=jnp.ones(2),
    )
    assert [v.name for v in g.inputs] == [
        "x",
        "params['b'][0]",
        "params['w']",
        "args[0]",
        "args[1]",
        "scale",
        "extra['k']",
    ]
    assert g["params['w']"] is g.inputs[2]


def test_output_aliases():
    def f(x):
        y = jnp.sin(x)
        return {"loss": y.sum(), "aux": (y, x)}

    g = js.trace(f, jnp.ones(3))
    assert g["out['loss']"] is g.outputs[2]  # dict keys in sorted order: aux, loss
    assert g["out['aux'][0]"] is g["y"]
    assert g["y"].name == "y"  # a Python name stays canonical; out[...] is an alias
    assert "out['aux'][0]" in g["y"].aliases
    assert g["out['aux'][1]"] is g["x"]
    h = js.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))
    assert h.outputs[0].name == "out"


def test_python_variable_names_tuple_targets_and_aliases():
    def f(x):
        a, (b, c) = jnp.sin(x), (jnp.cos(x), jnp.tan(x))
        alias = b
        d: jax.Array = a + alias
        d += c
        return d

    g = js.trace(f, jnp.ones(3))
    assert g["a"].primitive == "sin"
    assert g["b"].primitive == "cos" and g["c"].primitive == "tan"
    assert g["alias"] is g["b"]
    assert g["b"].name == "b" and "alias" in g["b"].aliases
    assert g["d#0"].primitive == "add" and g["d#1"].primitive == "add"
    assert g["d#1"] in g["d#1"].graph.outputs


def test_repeated_bindings_get_k_forms_and_bare_name_is_ambiguous():
    def f(x):
        h = x
        for _ in range(3):
            h = jnp.sin(h)
        return h

    g = js.trace(f, jnp.ones(2))
    # h#0 is the input x (a plain alias), then three sin outputs
    assert g["h#0"] is g["x"]
    assert [g[f"h#{k}"].primitive for k in (1, 2, 3)] == ["sin"] * 3
    assert g.select("h").names == ("x", "h#1", "h#2", "h#3")
    with pytest.raises(
        js.SelectionError,
        match=r"'h' is ambiguous: it matches h#0 \(= x\), h#1, h#2, h#3; pick one",
    ):
        g["h"]


def test_parameter_rebinding_counts_parameter_as_binding_zero():
    def f(x):
        x = jnp.sin(x)
        x = jnp.cos(x)
        return x

    g = js.trace(f, jnp.ones(2))
    # the parameter is binding #0 like any rebound name: the bare name is ambiguous
    assert names_of(g) == ["x#0", "x#1", "x#2"]
    assert g["x#0"] is g.inputs[0]
    with pytest.raises(js.SelectionError, match=r"'x' is ambiguous: it matches x#0, x#1, x#2"):
        g["x"]
    assert g.select("x").names == ("x#0", "x#1", "x#2")
    assert g.select("x").matched == ("x", "x", "x")


def test_pytree_values_assigned_to_a_name():
    def f(x):
        pair = {"s": jnp.sin(x), "c": jnp.cos(x)}
        return pair["s"] + pair["c"]

    g = js.trace(f, jnp.ones(2))
    assert g["pair['s']"].primitive == "sin"
    assert g["pair['c']"].primitive == "cos"


def test_tags_and_checkpoint_names():
    def f(x):
        y = js.tag(jnp.sin(x), "feature")
        z = checkpoint_name(jnp.cos(y), "cosine")
        pair = js.tag({"a": y * 2, "b": z * 3}, "pair")
        return pair["a"] + pair["b"]

    g = js.trace(f, jnp.ones(2))
    assert g["feature"].primitive == "sin"
    assert g["feature"].name == "feature" and "y" in g["feature"].aliases
    assert g["cosine"].primitive == "cos"
    assert g["pair['a']"].primitive == "mul"
    # tags are identities: no `name` equation stays in the graph
    assert "name" not in {v.primitive for v in g.vars}


def test_fallback_names_and_primitive_aliases():
    g = js.trace(lambda x: jnp.sin(jnp.cos(x)), jnp.ones(2))
    assert names_of(g) == ["x", "%1", "out"]
    assert g["%1"] is g[1] is g["cos:1"]
    assert g["%2"] is g["sin:2"] is g[-1]


def test_every_canonical_name_is_unique_and_selects_its_var():
    def f(x, y):
        a = js.tag(x * y, "a")
        b = a + 1.0
        a = jnp.sin(b)  # a Python name that collides with a tag
        return a

    g = js.trace(f, jnp.ones(2), jnp.ones(2))
    names = names_of(g)
    assert len(set(names)) == len(names)
    for v in g.vars:
        assert g[v.name] is v


def test_names_work_for_source_registered_like_a_notebook_cell():
    source = "def cell_fn(x):\n    hidden = jnp.tanh(x)\n    return hidden * 2\n"
    filename = "<ipython-input-7-abc>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"jnp": jnp}
    exec(compile(source, filename, "exec"), namespace)
    g = js.trace(namespace["cell_fn"], jnp.ones(2))
    assert g["hidden"].primitive == "tanh"
    assert g["hidden"].source == f"{filename}:2"


def test_no_source_means_fallback_names_and_a_note():
    namespace = {"jnp": jnp}
    exec("def nosrc(x):\n    q = jnp.sin(x)\n    return q\n", namespace)
    g = js.trace(namespace["nosrc"], jnp.ones(2))
    assert g.notes and "no Python variable names" in g.notes[0]
    assert g.outputs[0].name == "out"


def test_closures_defaults_and_decorated_functions():
    scale = jnp.asarray(3.0)

    @jax.jit
    def f(x, offset=1.0):
        shifted = x + offset
        scaled = shifted * scale
        return scaled

    g = js.trace(f, jnp.ones(2))
    assert g["scaled"].primitive == "mul"
    assert float(g.value("scaled")[0]) == pytest.approx(6.0)


def test_static_arguments_are_not_inputs():
    def f(x, n, mode="sin"):
        y = x
        for _ in range(n):
            y = jnp.sin(y) if mode == "sin" else jnp.cos(y)
        return y

    g = js.trace(f, jnp.ones(2), 2, static_argnums=1, mode="cos", static_argnames="mode")
    assert [v.name for v in g.inputs] == ["x"]
    assert [g[f"y#{k}"].primitive for k in (1, 2)] == ["cos", "cos"]


def test_a_walrus_target_is_named():
    def f(x):
        y = (b := jnp.sin(x)) * 2  # noqa: F841 (b is named)
        total = sum(t := jnp.tanh(v) for v in (y, x))
        return total + t

    x = jnp.linspace(0.1, 1.0, 3)
    g = js.trace(f, x)
    allclose(g.value("b"), jnp.sin(x))
    allclose(g.value("t#0"), jnp.tanh(2 * jnp.sin(x)))
    allclose(g.value("t#1"), jnp.tanh(x))
    assert g["b"].primitive == "sin"


@contextlib.contextmanager
def exp_of(x):
    yield jnp.exp(x), jnp.cos(x)


def test_a_with_target_is_named():
    """``with cm as (e, c):`` names what the context manager gives (it was unnamed, a
    slice from it needed its ``%i``)."""

    def f(x):
        with exp_of(x) as (e, c):
            h = e * c
        return h

    x = jnp.linspace(0.1, 1.0, 3)
    g = js.trace(f, x)
    allclose(g.value("e"), jnp.exp(x))
    allclose(g.value("c"), jnp.cos(x))
    check_slice(g.slice("e", "h"), (x,), lambda e: e * jnp.cos(x))


def test_a_list_growing_as_it_is_bound_again_names_each_item_and_what_replaced_one():
    """``hs += [h]`` and ``hs = hs + [h]`` in a loop name each item once (each trip
    bound every item again: n² / 2 bindings, 2 000 trips 5 s); an item replaced in
    place is named again when the list is bound again."""

    def f(x):
        hs, gs = [], ()
        h = x
        for _ in range(40):
            h = jnp.sin(h)
            hs += [h]
            gs = gs + (2 * h,)
        hs[0] = hs[0] * 3
        hs += [jnp.cos(h)]
        return hs[0] + hs[-1] + gs[39]

    x = jnp.linspace(0.1, 1.0, 3)
    g = js.trace(f, x)
    h, want = x, []
    for _ in range(40):
        h = jnp.sin(h)
        want.append(h)
    for t in (0, 7, 39):
        allclose(g.value(f"hs[{t}]#0" if t == 0 else f"hs[{t}]"), want[t])
        allclose(g.value(f"gs[{t}]"), 2 * want[t])
    allclose(g.value("hs[0]#1"), 3 * want[0])  # replaced in place, then bound again
    allclose(g.value("hs[40]"), jnp.cos(want[-1]))
    assert {"hs[0]#0", "hs[0]#1", *(f"hs[{t}]" for t in range(1, 41))} <= set(g.names())
    assert not [n for n in g.names() if n.startswith("hs[") and n.endswith("#2")]


def test_item_targets_name_their_values_by_the_key_they_have_then():
    """``acts[name] = layer(...)`` in a loop over blocks (a set's order changes with the
    hash seed: only call numbers named these values, and they moved); ``hs[i] = h``;
    a key that no name can hold (a slash, a tuple) names nothing."""
    blocks = ("enc", "mid", "dec")

    def layer(w, h):
        z = w @ h
        return jnp.tanh(z)

    def f(params, x):
        acts, hs, other, odd = {}, [None, None], {}, {}
        for name in blocks:
            acts[name] = layer(params[name], x)
        for i in range(2):
            hs[i] = jnp.sin(x) * (i + 1)
        i = -1
        hs[i] = hs[i] * 1.0  # (a negative index names nothing: hs[-1] is no glob's)
        for name in blocks:  # an argument's leaf updated in place keeps its name
            params[name] = params[name] * 0.5
        other["a/b"] = x * 3
        odd[1, 2] = x * 4
        acts["enc"] = acts["enc"] * 2  # bound again
        return acts, hs, other["a/b"] + odd[1, 2]

    params = {n: jnp.full((2, 2), k + 1.0) for k, n in enumerate(blocks)}
    x = jnp.asarray([0.5, -1.0])
    g = js.trace(f, params, x)
    assert [v.name for v in g.inputs][:3] == [f"params['{n}']" for n in sorted(blocks)]
    allclose(g.value("acts['mid']"), layer(params["mid"], x))
    allclose(g.value("acts['enc']#0"), layer(params["enc"], x))
    allclose(g.value("acts['enc']#1"), 2 * layer(params["enc"], x))
    allclose(g.value("hs[1]"), 2 * jnp.sin(x))
    assert not [n for n in g.names() if n.startswith(("other", "odd", "hs[-"))]
    assert not [n for n in g.names() if n.startswith("params[") and "#" in n]
    allclose(g.value("params['enc']"), params["enc"])

    def keyed_by_the_value(x):  # the key as it is once the value is computed, as Python
        d = {}
        k = "a"
        d[k] = jnp.sin(x) + len(k := "b")
        return d

    h = js.trace(keyed_by_the_value, x)
    allclose(h.value("d['b']"), jnp.sin(x) + 1)
    assert "d['a']" not in h.names()
    dec = g.grads("out[0]['dec']", wrt=["acts['dec']"])["acts['dec']"]
    allclose(dec, jnp.ones(2))


def test_what_items_of_a_list_bound_again_hold_after_changing_in_place_is_named():
    """Items a function changes in place (an inner list, a dict) hold new values when
    their list is bound again: named again (the regression hunt of the list speed-up
    found them unnamed, and a dict item's name kept the value it replaced)."""

    def f(x):
        hist, h = [], x
        for _ in range(2):
            row = []
            hist += [row]
            for k in range(2):
                h = jnp.sin(h) + k
                row.append(h)
        hs = [{"w": x}]
        hs = hs + [{"w": 3 * x}]
        hs[1]["w"] = 4 * x
        hs = hs + [{"w": 5 * x}]
        return h + hs[1]["w"]

    x = jnp.linspace(0.1, 1.0, 3)
    g = js.trace(f, x)
    allclose(g.value("hist[0][1]"), jnp.sin(jnp.sin(x)) + 1)
    assert "hist[1][0]" not in g.names()  # (appended after hist was last bound)
    allclose(g.value("hs[1]['w']#1"), 4 * x)
    with pytest.raises(js.SelectionError, match="ambiguous"):
        g["hs[1]['w']"]


def test_what_a_match_case_captures_is_named():
    """``case [s, *rest]:``, ``case {"h": h, **others}:`` and ``case ... as whole``
    name their captures (they were unnamed; the syntax hunt's find)."""

    def f(x, d):
        match (jnp.sin(x), jnp.cos(x), jnp.tanh(x)):
            case [s, *rest]:
                r = s * rest[1]
        match d:
            case {"h": h, **others}:
                q = h + others["k"]
        match r * 2:
            case whole:
                pass
        return r + q + whole

    x = jnp.linspace(0.1, 1.0, 3)
    d = {"h": x * 3, "k": x * 4}
    g = js.trace(f, x, d)
    allclose(g.value("s"), jnp.sin(x))
    allclose(g.value("rest[1]"), jnp.tanh(x))
    allclose(g.value("h"), 3 * x)
    allclose(g.value("whole"), 2 * jnp.sin(x) * jnp.tanh(x))
    check_slice(g.slice("s", "r"), (x,), lambda s: s * jnp.tanh(x))
    allclose(g.as_function()(x, d), f(x, d))


def test_static_argnames_naming_keys_of_kwargs_hold_them_static():
    """``static_argnames`` naming a key of ``**kwargs`` holds that item static, as
    ``jax.jit`` does (also a jit's own ``static_argnames``): it was accepted, then traced
    (a TraceError where Python reads it: ``range(cfg["n"])``), and calls with another
    value were not checked."""

    @functools.partial(jax.jit, static_argnames=("n",))
    def jitted(x, w, **cfg):
        h = x @ w
        for _ in range(cfg["n"]):
            h = jnp.tanh(h)
        return h.sum()

    def scaled(x, w, **cfg):
        return (jnp.tanh(x @ w) * cfg["scale"]).sum()

    x, w = jnp.ones((2, 3)), jnp.full((3, 3), 0.1)
    g = js.trace(jitted, x, w, n=2)
    allclose(g.as_function()(x, 2 * w, n=2), jitted(x, 2 * w, n=2))
    with pytest.raises(js.SliceError, match=r"static argument `n` \(of \*\*cfg\) is 3"):
        g.as_function()(x, w, n=3)
    g = js.trace(scaled, x, w, scale=2.0, static_argnames="scale")
    assert [v.name for v in g.inputs] == ["x", "w"]
    allclose(g.as_function()(x, w, scale=2.0), scaled(x, w, scale=2.0))
    with pytest.raises(js.SliceError, match=r"`scale` \(of \*\*cfg\) is 3.0"):
        g.as_function()(x, w, scale=3.0)
    with pytest.raises(js.SliceError, match=r"`scale` \(of \*\*cfg\) is left out"):
        g.as_function()(x, w)
    g = js.trace(scaled, x, w, scale=2.0, static_argnames=("scale", "mode"))
    with pytest.raises(
        js.SliceError, match=r"`mode` \(of \*\*cfg\) is 'a', but the graph was traced without it"
    ):
        g.as_function()(x, w, scale=2.0, mode="a")


def test_a_jitted_functions_static_arguments_stay_static():
    """``@partial(jax.jit, static_argnums=1)``: js.trace takes the jit's static
    arguments as its own (they were traced, so the loop's bound failed)."""

    @functools.partial(jax.jit, static_argnums=1, static_argnames="mode")
    def f(x, n, mode="sin"):
        y = x
        for _ in range(n):
            y = jnp.sin(y) if mode == "sin" else jnp.cos(y)
        return y

    g = js.trace(f, jnp.ones(2), 2, mode="cos")
    assert [v.name for v in g.inputs] == ["x"]
    assert [g[f"y#{k}"].primitive for k in (1, 2)] == ["cos", "cos"]
    allclose(g.as_function()(jnp.zeros(2), 2, mode="cos"), jnp.cos(jnp.cos(jnp.zeros(2))))


def test_a_static_position_past_the_named_parameters_is_an_item_of_args():
    """``static_argnums=2`` of ``f(x, *a)`` is ``a[1]``, as jax.jit takes it (it was
    refused as out of range): held static, a new value for it a SliceError."""

    def f(x, *a):
        y = x * a[1]
        for _ in range(a[1]):  # a Python loop: a[1] must be static
            y = jnp.sin(y)
        return y.sum() + a[0]

    x = jnp.linspace(0.1, 1.0, 3)
    for g in (
        js.trace(f, x, 1.0, 2, static_argnums=2),
        js.trace(jax.jit(f, static_argnums=2), x, 1.0, 2),
        # a negative position counts from the end of the arguments given, as jax.jit's
        js.trace(jax.jit(f, static_argnums=-1), x, 1.0, 2),
    ):
        assert [v.name for v in g.inputs] == ["x", "a[0]"]
        allclose(g.value("y#0"), 2 * x)
        run = g.as_function()
        allclose(run(x, 3.0, 2), f(x, 3.0, 2))
        with pytest.raises(js.SliceError, match=r"static argument `a\[1\]` is 3, but .* 2"):
            run(x, 1.0, 3)
    with pytest.raises(js.TraceError, match="static_argnums=1 is out of range"):
        js.trace(lambda x: x, x, static_argnums=1)


class _JittedMethods:
    k = 2.0

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def scaled(self, x, n):
        h = x * self.k * n
        return h


def test_a_jitted_function_through_a_partial_or_a_bound_method_keeps_its_statics():
    """``functools.partial(jitted, mode=...)`` and ``obj.jitted_method``: the jit's
    static arguments, shifted past what the partial or the method binds (they were
    traced: JAX's raw "Non-hashable static arguments"), and the method's names."""

    def f(x, n, mode="a"):
        h = x * n
        return jnp.sin(h) if mode == "a" else jnp.cos(h)

    jf = jax.jit(f, static_argnums=1, static_argnames="mode")
    x = jnp.linspace(0.1, 1.0, 3)
    g = js.trace(functools.partial(jf, mode="b"), x, 3)
    allclose(g.value("h"), 3 * x)
    allclose(g.value("out"), jnp.cos(3 * x))
    for _ in range(2):  # the second trace too (JAX's trace cache ran no body there)
        g = js.trace(_JittedMethods().scaled, x, 3)
        allclose(g.value("h"), 6 * x)
        assert [v.name for v in g.inputs] == ["x"]
    # a static argument the partial binds by keyword, a negative static position
    g = js.trace(functools.partial(jax.jit(f, static_argnums=1), n=2), x)
    allclose(g.value("h"), 2 * x)
    g = js.trace(jax.jit(f, static_argnums=-1), x, 3, "b")
    allclose(g.value("out"), jnp.cos(3 * x))


def test_methods_are_traced_with_names():
    class Model:
        def __init__(self):
            self.w = jnp.eye(2)

        def __call__(self, x):
            hidden = x @ self.w
            return jnp.tanh(hidden)

    g = js.trace(Model(), jnp.ones(2))  # a callable object: its __call__ is not rewritten
    assert g.outputs[0].primitive == "tanh"
    m = Model()
    g2 = js.trace(m.__call__, jnp.ones(2))
    assert g2["hidden"].primitive == "dot_general"


def test_nested_jit_is_inlined_and_its_result_named():
    @jax.jit
    def inner(a):
        return jnp.sin(a) * 2.0

    def f(x):
        y = inner(x)
        z = inner(y)
        return z

    g = js.trace(f, jnp.ones(2))
    assert "jit" not in {v.primitive for v in g.vars}
    assert g["y"].primitive == "mul" and g["z"].primitive == "mul"
    assert g["z"].producers[0].producers[0] is g["y"]


def test_non_array_leaves_are_static_and_bad_arguments_are_trace_errors():
    def f(x, mode, options):
        return jnp.sin(x) if mode == "sin" else options["fn"](x) * options["scale"]

    g = js.trace(f, jnp.ones(2), "cos", {"fn": jnp.cos, "scale": jnp.ones(2)})
    assert [v.name for v in g.inputs] == ["x", "options['scale']"]
    assert g.outputs[0].primitive == "mul"
    with pytest.raises(js.TraceError, match="do not fit"):
        js.trace(lambda x: x, jnp.ones(2), jnp.ones(2))


def test_named_scopes_name_outputs_and_transform_marks_are_not_scopes():
    def f(x):
        with jax.named_scope("block"):
            h = jnp.sin(x) * 2.0
        g = jax.grad(lambda t: jnp.sum(jnp.tanh(t)))(h)
        return h + g

    g = js.trace(f, jnp.ones(2))
    assert g["block"] is g["h"]
    assert {v.scope for v in g.select("block/*")} == {"block"}
    assert not [n for n in g.names() if n.startswith(("jvp()", "transpose("))]


def test_a_scope_yields_its_name_to_a_variable_tag_or_argument_of_that_name():
    """Names rank Python variables, tags and arguments above scopes: the variable bound
    after `with jax.named_scope("enc")` to `enc` was `%4 (enc)`, and `g["enc"]` was
    ambiguous; a scope named like an argument added its output to g.select("x"), so
    gradients "wrt x" had a key too many. The scope's values stay found by scope=."""

    def f(x, w):
        with jax.named_scope("enc"):
            z = jnp.sin(x) * 2
        enc = jnp.cos(z) + x
        with jax.named_scope("x"):
            y = jnp.sin(enc * w) + 1
        with jax.named_scope("key"):
            k = jnp.tanh(y)
        k = js.tag(k * 3, "key")
        return jnp.sum(k * x)

    x, w = jnp.array([0.1, 0.2]), jnp.float32(1.5)
    g = js.trace(f, x, w)
    np.testing.assert_allclose(g.value("enc"), jnp.cos(jnp.sin(x) * 2) + x, rtol=1e-6)
    assert [v.name for v in g.select("enc")] == ["enc"]
    assert g["z"].scope == "enc" and g["z"] in g.select(scope="enc")
    assert [v.name for v in g.select("x")] == ["x"] and g["y"] in g.select(scope="x")
    assert [v.name for v in g.select("key")] == ["key"] and g["key"].primitive == "mul"
    grads = g.grads("out", ["x", "enc"])
    assert sorted(grads) == ["enc", "x"]
    np.testing.assert_allclose(grads["x"], jax.grad(f)(x, w), rtol=1e-6)

    def twice(x):  # a scope entered twice ("h", "h#1"), a variable bound twice
        with jax.named_scope("h"):
            a = jnp.sin(x) * 3
        h = a * 2
        with jax.named_scope("h"):
            c = jnp.tanh(jnp.cos(h)) * 3
        h = c + 1
        return h * 5

    g = js.trace(twice, x)
    assert [g[n].primitive for n in ("h#0", "h#1")] == ["mul", "add"]
    assert g.select("h").names == ("h#0", "h#1")


def test_names_lists_each_name_once_unnamed_vars_included():
    g = js.trace(lambda x: jnp.sin(jnp.cos(x)).sum(), jnp.ones(3))  # no Python names
    names = g.names()
    assert len(names) == len(set(names)) and "%1" in names and "cos:1" in names


def test_an_argument_named_out_says_it_shadows_the_outputs_alias():
    def f(x, out):
        y = x + out
        return y * 2

    with pytest.warns(UserWarning, match="the argument 'out' shadows the outputs' alias"):
        g = js.trace(f, jnp.ones(2), jnp.ones(2))
    assert g["out"] is g.inputs[1]
    assert any("the argument 'out' shadows the outputs' alias" in n for n in g.notes)
    allclose(g.grads(g.outputs[0], "x")["x"], jnp.full(2, 2.0))


def test_a_tag_given_an_arguments_name_rebinds_it_as_a_python_name_does():
    def tagged(x):
        y = js.tag(jnp.sin(x) * 2, "x")
        return y.sum()

    def rebound(x):
        x = jnp.sin(x) * 2
        return x.sum()

    x = jnp.arange(3.0)
    for f in (tagged, rebound):
        g = js.trace(f, x)
        with pytest.raises(js.SelectionError, match="'x' is ambiguous: it matches x#0, x#1"):
            g["x"]  # noqa: B018  (the input answered, and g.select("x") took both)
        assert g["x#0"] is g.inputs[0] and g["x#1"].primitive == "mul"
        assert g.select("x").names == ("x#0", "x#1")
        grads = g.grads("out", wrt=["x"])  # each binding, by its own name
        allclose(grads["x#0"], jax.grad(f)(x))
        allclose(grads["x#1"], jnp.ones(3))

    def both(x):  # a tag and a Python name of the argument's name: one numbering
        h = js.tag(x * 2, "x")
        x = jnp.sin(x)
        return (h + 3 * x).sum()

    g = js.trace(both, x)
    assert [g[f"x#{k}"].primitive for k in range(3)] == ["input", "mul", "sin"]
    assert g.select("x").names == ("x#0", "x#1", "x#2")

    def in_order(x):  # numbered as the code binds them (the tag was numbered first)
        x = x * 2
        x = js.tag(x + 1, "x")
        return x * 3

    g = js.trace(in_order, x)
    assert [g[f"x#{k}"].primitive for k in range(3)] == ["input", "mul", "add"]

    def local(x):  # a tag and a Python name of a name no argument has: numbered too
        h = jnp.sin(x)
        t = js.tag(h * 2, "h")
        return t.sum()

    g = js.trace(local, x)
    assert g["h#0"].primitive == "sin" and g["h#1"] is g["t"]

    def once(x):  # the same var: its name, no number
        h = js.tag(jnp.sin(x), "h")
        return h.sum()

    assert js.trace(once, x)["h"].name == "h"

    def rebound(x):  # binding order, not the vars' (a constant's var comes first)
        h = jnp.sin(x)
        h = js.tag(h * 2, "h")
        h = jnp.array([1.0, 2.0, 3.0])
        return x + h

    g = js.trace(rebound, x)
    assert [g[f"h#{k}"].primitive for k in range(3)] == ["sin", "mul", "const"]

    def older(x):  # rebound to an older value: the second binding
        a = jnp.sin(x)
        h = js.tag(jnp.cos(x) * 2, "h")
        h = a
        return h + 1

    g = js.trace(older, x)
    assert g["h#0"].primitive == "mul" and g["h#1"] is g["a"]


def test_an_output_rebound_under_its_name_takes_the_bare_name():
    """``out = layer(x); out = out + x; return out``: 'out' was ambiguous (out#0,
    out#1), the outputs' alias lost; the output takes it, no warning."""

    def residual(x):
        out = jnp.sin(x)
        out = out + x
        return out

    x = jnp.arange(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = js.trace(residual, x)
    assert g["out"] is g.outputs[0] is g["out#1"] and g["out#0"].primitive == "sin"
    allclose(g.value("out"), residual(x))
    assert g.select("out").names == (g.outputs[0].name,)

    def argument(x, out):  # an argument rebound and returned: no note that it shadows
        out = out + x
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = js.trace(argument, x, x)
    assert g["out"] is g.outputs[0] and not g.notes

    def tagged(x):  # a tag of the name, then the output rebound: the output takes it
        out = jnp.sin(x)
        y = js.tag(out * 2, "out")
        out = y + x
        return out

    g = js.trace(tagged, x)
    assert g["out"] is g.outputs[0]

    def ambiguous(x, out):  # rebound, the output another value: said ambiguous
        out = out + x
        return out * 2

    with pytest.warns(UserWarning, match="other than the output of that name, and is ambiguous"):
        g = js.trace(ambiguous, x, x)
    with pytest.raises(js.SelectionError, match="'out' is ambiguous"):
        g["out"]  # noqa: B018


def test_a_local_variable_named_out_keeps_its_name_over_the_outputs_alias():
    def forward(x):
        out = jnp.sin(x)  # common: out = model(x); return out.sum()
        return (out * 3.0).sum()

    x = jnp.arange(3.0)
    # a warning, not only a note: g.grads("out", ...) would differentiate the variable
    with pytest.warns(UserWarning, match="'out' names a value of the traced function"):
        g = js.trace(forward, x)
    assert g["out"].name == "out" and g["out"].primitive == "sin"
    allclose(g.value("out"), jnp.sin(x))
    allclose(g.grads(g.outputs[0], "out")["out"], jnp.full(3, 3.0))
    allclose(g.slice("out", g.outputs[0])(jnp.ones(3)), 9.0)
    assert any("'out' names a value of the traced function" in n for n in g.notes)

    # the same name for the output itself is no clash: no note
    def returned(x):
        out = jnp.sin(x).sum()
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g2 = js.trace(returned, x)
    assert g2["out"] is g2.outputs[0]
    assert not any("names a value of the traced function" in n for n in g2.notes)


def layer(x, w):
    pre = x @ w
    act = jnp.tanh(pre)
    return act


def test_a_lambda_is_rewritten_so_the_functions_it_calls_name_their_values():
    """``js.trace(lambda x: layer(x, w), x)``, the usual way to close over parameters,
    names what ``layer`` binds (it named nothing); so does a lambda called inside,
    through a variable (a call named by it) or as a loop body (no name of its own: what
    it calls is named as if called in the loop); two lambdas on one line are told
    apart."""
    x, w = jnp.arange(6.0).reshape(2, 3) / 6, jnp.ones((3, 3)) * 0.5
    g = js.trace(lambda x: layer(x, w) * 2.0, x)
    assert not g.notes, g.notes
    allclose(g.value("layer/pre"), x @ w)
    allclose(g.value("layer/act"), jnp.tanh(x @ w))
    allclose(g.as_function()(x + 1.0), jnp.tanh((x + 1.0) @ w) * 2.0)

    def model(x, w):
        first, second = (lambda h: layer(h, w)), (lambda h: layer(h, 2.0 * w))  # noqa: E731
        h = first(x)
        _, hs = jax.lax.scan(lambda c, _: (second(c), c), h, None, length=2)
        return hs.sum()

    g = js.trace(model, x, w)
    allclose(g.value("first/layer/act"), jnp.tanh(x @ w))
    h1 = jnp.tanh(jnp.tanh(x @ w) @ (2.0 * w))
    allclose(g.value("second/layer/act@1"), jnp.tanh(h1 @ (2.0 * w)))
    allclose(g.value("second/layer/pre@0"), jnp.tanh(x @ w) @ (2.0 * w))


def test_a_lambda_without_source_runs_as_it_is_and_says_so():
    namespace = {"layer": layer}
    exec("f = lambda x, w: layer(x, w)\n", namespace)
    g = js.trace(namespace["f"], jnp.ones(3), jnp.ones((3, 3)))
    assert g.notes and "could not be rewritten" in g.notes[0]
    allclose(g.value("out"), jnp.tanh(jnp.ones(3) @ jnp.ones((3, 3))))


def test_lambdas_alike_on_one_line_each_run_their_own_body():
    """Two branches on one line, one ignoring a parameter: each runs its own body
    (the other one's ran, silently: [6, 6, 6] for [1, 1, 1])."""

    def f(p, x, y):
        return jax.lax.cond(p > 0, lambda x, y: x, lambda x, y: x + y, x, y)

    def g2(a, b):
        scale, mix = lambda a, b: a * 2, lambda a, b: a * b * 2  # noqa: E731
        return scale(a, b) + 10 * mix(a, b)

    x, y = jnp.ones(3), 5 * jnp.ones(3)
    g = js.trace(f, 1.0, x, y)
    allclose(g.value("out"), x)
    allclose(g.as_function()(-1.0, x, y), x + y)
    allclose(js.trace(g2, 1.0, 5.0).value("out"), 2.0 + 10 * 10.0)


def test_a_lambdas_parameters_name_nothing_in_its_caller():
    """``cond(p, lambda x: ..., lambda x: ..., y)`` in ``f(x)``: ``x`` stays the input
    and ``y`` the caller's value (they became ``x#0`` and ``x#1``)."""

    def f(x):
        y = jnp.cos(x)
        z = jax.lax.cond(y.sum() > 0, lambda x: jnp.sin(x) * 2, lambda x: -x, y)
        return z

    g = js.trace(f, jnp.ones(3))
    assert [v.name for v in g.inputs] == ["x"] and g["y"].name == "y"
    allclose(g.value("z"), jnp.sin(jnp.cos(jnp.ones(3))) * 2)


def cell(x):
    h = jnp.sin(x)
    return h


def test_calls_inside_anonymous_lambdas_are_numbered_and_named_where_they_are():
    """A lambda given to a transform adds no name: the calls inside it are numbered
    among their caller's (``cell#0`` is the first call, it was ``cell``, and
    ``cell#0`` the second), and its result is not named after the caller."""

    def model(x):
        a = jax.checkpoint(lambda y: cell(y))(x)
        bc = jax.checkpoint(lambda y: cell(y * 3) + cell(y * 5))(x)
        return a + bc

    def f(x):
        out1 = model(x)
        return out1 * 3

    x = jnp.full(2, 0.1)
    g = js.trace(f, x)
    for k, scale in enumerate((1, 3, 5)):
        allclose(g.value(f"model/cell#{k}/h"), jnp.sin(x * scale))
    allclose(g.value("model"), jnp.sin(x) + jnp.sin(3 * x) + jnp.sin(5 * x))
    assert g["model"].name == "out1"


class Scaler:
    """Reads a private attribute (Python mangles ``self.__w`` by the class's name)."""

    def __init__(self):
        self.__w = 3.0
        self.apply = lambda y: y * self.__w

    def __call__(self, x):
        scaled = x * self.__w
        return scaled


def test_private_attributes_read_in_a_class_are_mangled_as_python_does():
    """A lambda and a method reading ``self.__w`` are rewritten in their class's name
    (both raised AttributeError: '__w')."""
    s = Scaler()

    def f(x):
        return s.apply(x) + s(x)

    g = js.trace(f, jnp.ones(3))
    allclose(g.value("out"), 6.0 * jnp.ones(3))
    allclose(g.value("s/scaled"), 3.0 * jnp.ones(3))


def test_a_percent_sign_a_user_wrote_is_not_a_generated_name():
    """``out['acc%']`` and a scope ``top5%`` are the user's names: the table and the
    view list them (any name with a '%' was hidden as a made-up ``%12``)."""

    def f(x):
        loss = jnp.sum(x**2)
        with jax.named_scope("top5%"):
            acc = jnp.mean(x > 0)
        return {"loss": loss, "acc%": acc}

    g = js.trace(f, jnp.ones(3))
    row = next(line for line in repr(g).splitlines() if " acc " in line)
    assert "out['acc%']" in row and "top5%" in row
    card = next(r for r in g.view().data()["vars"] if r["index"] == g["acc"].index)
    assert card["aliases"] == ["top5%", "out['acc%']"]


def test_a_tag_named_like_a_fallback_is_refused():
    """``%3`` selects var 3 (SPEC §4.6): a tag named "%3" (which took it where var 3 had
    no name, until the index was made to win) is refused, as are the other characters
    selectors read."""

    def f(x):
        a = js.tag(jnp.sin(x), "%3")
        return jnp.exp(jnp.cos(jnp.tan(a)))

    with pytest.raises(js.TraceError, match="js.tag name '%3' holds '%'"):
        js.trace(f, jnp.ones(2))
    for name in ("h@2", "h#1", "h*", "h?"):
        with pytest.raises(js.TraceError, match="which selectors read"):
            js.tag(jnp.ones(2), name)
    assert js.tag(jnp.ones(2), "top5%").shape == (2,)  # (not leading: a name as any)


GLOBAL_W = jnp.eye(3) * 2.0
CAUSAL = np.tril(np.ones((3, 3), np.float32))


def test_names_bound_to_captured_arrays_name_their_constants():
    """``wc = GLOBAL_W`` (a global jax array) and ``mask = CAUSAL`` (numpy) name the
    constants the traced jaxpr holds them as (they kept ``%1``, ``%2``), also in a
    function it calls."""

    def layer(x):
        wl = GLOBAL_W
        return jnp.tanh(x @ wl)

    def f(x):
        wc = GLOBAL_W
        mask = CAUSAL
        z = layer(x @ wc)
        return (z * mask).sum()

    x = jnp.linspace(-1.0, 1.0, 9).reshape(3, 3)
    g = js.trace(f, x)
    assert g["wc"].primitive == g["mask"].primitive == "const"
    assert g["layer/wl"] is g["wc"]
    allclose(g.value("mask"), CAUSAL)
    check_slice(g.slice("wc", "out"), (GLOBAL_W,), lambda w: (jnp.tanh(x @ w @ w) * CAUSAL).sum())


@jax.jit
def _layer_reading_global_w(x):
    w = GLOBAL_W
    return jnp.tanh(w @ x)


def test_a_captured_array_held_as_several_constants_is_not_named_on_the_wrong_one():
    """Under ``jax.grad`` a jitted function's copy of a global array is a constant of
    its own: ``f/layer/w`` named the helper's constant, and a slice from it perturbed
    the wrong uses (wrong Jacobians). Such a name is left off."""

    def helper(x):
        u = GLOBAL_W
        return jnp.sin(u @ x)

    def f(x):
        layer = _layer_reading_global_w
        return layer(helper(x)).sum()

    x = jnp.array([0.3, -0.2, 0.5])
    g = js.trace(jax.grad(f), x)
    assert not [n for n in g.names() if n.endswith(("/w", "/u"))]
    allclose(g.value("out"), jax.grad(f)(x))


MASK = np.array([[1.0, 0, 0], [1, 1, 0], [1, 1, 1]], np.float32)


def test_a_name_on_a_numpy_array_whose_view_is_another_constant_is_left_off():
    """``m = MASK`` then ``m[0]``: the view is a constant of its own, and the name went
    to another use's constant (the slice from ``m`` differentiated the wrong use)."""

    def helper(y):
        return jnp.sin(MASK @ y)

    def f(x):
        m = MASK
        y = x * m[0]
        return helper(y).sum()

    g = js.trace(f, jnp.array([0.3, -0.2, 0.5]))
    assert "m" not in g.names()


def test_a_name_on_a_numpy_array_whose_transpose_alone_is_a_constant_is_left_off():
    """``m = np.tril(...)`` then ``m.T @ x``: JAX's constant is the view ``m.T``, whose
    base is ``m``: ``m`` named it, and its value, and slices from it, were the
    transpose (found by the syntax hunt)."""

    def f(x):
        m = np.tril(np.ones((3, 3), np.float32))
        h = m.T @ x
        return h

    x = jnp.array([0.3, -0.2, 0.5])
    g = js.trace(f, x)
    assert "m" not in g.names()
    allclose(g.value("h"), MASK.T @ x)


def test_every_listed_name_selects_and_the_bare_name_of_a_rebound_variable_its_bindings():
    def f(x):
        c = (jnp.sin(x), jnp.cos(x))
        c = (c[0] * 2, c[1] * 3)
        return c[0] + c[1]

    g = js.trace(f, jnp.ones(3))
    names = g.names()
    assert {"c[0]#0", "c[0]#1", "c[0]"} <= set(names)
    assert g.select("c[0]").names == ("c[0]#0", "c[0]#1")
    with pytest.raises(js.SelectionError, match=r"'c\[0\]' is ambiguous: .*pick one"):
        g["c[0]"]
    for name in names:
        assert len(g.select(name)) >= 1


@jax.jit
def _jit_tanh_layer(w, h):
    pre = w * h
    return jnp.tanh(pre)


def test_names_inside_jitted_calls_traced_under_disable_jit():
    """Under jax.disable_jit() a jit's body runs in the program op by op: its names were
    dropped (taken for a body traced elsewhere); the notes say what disable_jit changes."""

    def f(w, x):
        a = _jit_tanh_layer(w, x)
        b = _jit_tanh_layer(w, a)

        def body(c, _):
            h = jnp.sin(c)
            return h, None

        c, _ = jax.lax.scan(body, b, None, length=3)
        return c

    x = jnp.arange(3.0)
    with jax.disable_jit():
        g = js.trace(f, 2.0, x)
    a = jnp.tanh(2.0 * x)
    allclose(g.value("_jit_tanh_layer#0/pre"), 2.0 * x)
    allclose(g.value("_jit_tanh_layer#1/pre"), 2.0 * a)
    allclose(g.value("body#1/h"), jnp.sin(jnp.sin(jnp.tanh(2.0 * a))))
    assert any("traced under jax.disable_jit()" in n for n in g.notes), g.notes
    assert not any("disable_jit" in n for n in js.trace(f, 2.0, x).notes)
