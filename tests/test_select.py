"""Selectors: index, exact name, glob, regex, Var, Selection, filters, and their errors."""

import re

import jax
import jax.numpy as jnp
import pytest

import jaxsurgery as js


def layers(x):
    z1 = jnp.tanh(x * 2.0)
    z2 = jnp.tanh(z1 * 3.0)
    z3 = jnp.sin(z2)
    out_mat = jnp.outer(z3, z3)
    return out_mat.sum()


@pytest.fixture
def g():
    return js.trace(layers, jnp.ones(3))


def test_index_and_negative_index(g):
    assert g[0] is g.inputs[0]
    assert g[-1] is g.outputs[0]
    assert g[g[2].index] is g[2]
    with pytest.raises(
        js.SelectionError, match=r"index 99 is out of range: the graph has \d+ vars"
    ):
        g[99]


def test_exact_name_glob_regex_var(g):
    assert g["z1"].primitive == "tanh"
    assert g.select("z?").names == ("z1", "z2", "z3")
    assert g.select(re.compile(r"z[23]")).names == ("z2", "z3")
    assert g.select(g["z2"], "z1").names == ("z1", "z2")  # program order, no duplicates
    assert g[g["z3"]] is g["z3"]
    assert g["out_m*"].name == "out_mat"  # a glob matching one var works with g[...]
    # a dict, as a slice takes it: the vars of its values (the README's selectors)
    assert g.select({"a": "z3", "b": ["z1", g["z2"]]}).names == ("z1", "z2", "z3")


def test_filters(g):
    assert g.select(primitive="tanh").names == ("z1", "z2")
    assert g.select(primitive=("tanh", "sin")).names == ("z1", "z2", "z3")
    assert g.select(where=lambda v: v.ndim == 2)[-1].name == "out_mat"
    assert g.select("z?", where=lambda v: v.primitive == "sin").one().name == "z3"
    assert g.select("z1", primitive="sin") == ()  # a primitive of the graph: filters to none
    with pytest.raises(js.SelectionError, match="no var is made by the primitive 'conv'"):
        g.select(primitive="conv")  # not in the graph at all: a typo, not an empty result


def test_selection_is_an_immutable_tuple_with_loud_helpers(g):
    sel = g.select("z?")
    assert isinstance(sel, tuple) and isinstance(sel, js.Selection)
    assert sel.assert_count_is(3) is sel
    with pytest.raises(js.SelectionError, match="expected 2 vars, the selection has 3: z1, z2, z3"):
        sel.assert_count_is(2)
    with pytest.raises(js.SelectionError, match=r"exactly one var.*has 3: z1, z2, z3.*\.where"):
        sel.one()
    with pytest.raises(TypeError):
        sel[0] = None
    assert "Selection of 3 vars" in repr(sel)


def test_misses_suggest_close_names(g):
    with pytest.raises(
        js.SelectionError,
        match=r"no var named 'z4'; did you mean 'z3', 'z2' or 'z1'\? \(g.names\(\) lists all\)",
    ):
        g["z4"]
    with pytest.raises(js.SelectionError, match="no var named 'nothing_like_it' \\(g.names"):
        g.select("nothing_like_it")
    with pytest.raises(js.SelectionError, match="no var matches the pattern 'q\\*'"):
        g.select("q*")


def test_ambiguous_glob_in_single_var_context(g):
    with pytest.raises(
        js.SelectionError, match="'z\\*' is ambiguous: it matches z1, z2, z3; pick one"
    ):
        g["z*"]


def test_selectors_of_the_wrong_kind(g):
    with pytest.raises(js.SelectionError, match="not a selector of one var"):
        g[1.5]
    with pytest.raises(js.SelectionError, match="not a selector"):
        g.select(1.5)


def test_vars_from_another_graph_are_rejected(g):
    other = js.trace(layers, jnp.ones(3))
    with pytest.raises(js.SelectionError, match=r"belongs to another graph.*g\['z1'\]"):
        g.slice(other["z1"], "z2")


def test_glob_leaf_in_a_slice_is_a_tuple(g):
    s = g.slice("z1", "z[23]")
    assert s.outputs == (g["z2"], g["z3"])
    out = s(g.value("z1"))
    assert isinstance(out, tuple) and len(out) == 2
    values = g.value({"a": "z1", "rest": ["z2", "z3"]})
    assert set(values) == {"a", "rest"} and len(values["rest"]) == 2


def test_names_lists_every_name(g):
    names = g.names()
    assert names[: len(g.vars)] == [v.name for v in g.vars]
    assert "mul:1" in names and "%1" in names and "out" in names
    for name in names:
        assert g.select(name)


def test_var_attributes(g):
    v = g["z2"]
    assert v.shape == (3,) and v.ndim == 1 and v.size == 3
    assert str(v.dtype) == "float32"
    assert v.primitive == "tanh" and v.scope == ""
    assert v.source.endswith("test_select.py:14")
    assert v.producers[0].primitive == "mul"
    assert v.users == (g["z3"],)
    assert g["x"].primitive == "input" and g["x"].source is None
    assert {v} == {g["z2"]} and v != g["z1"]


def test_a_value_made_inside_a_library_jit_has_its_calls_line():
    """JAX cuts a jitted library function's traceback at the jit (jax.nn.relu,
    jnp.linalg.norm): its values, and what they name, have the line of the call."""

    def f(x):
        a = jax.nn.relu(x)
        b = jnp.linalg.norm(a)
        return a * b

    g = js.trace(f, jnp.ones(3))
    line = f.__code__.co_firstlineno
    assert g["a"].source.endswith(f"test_select.py:{line + 1}")
    inside_norm = [v for v in g.vars if v.primitive == "reduce_sum"]
    assert inside_norm and inside_norm[0].source.endswith(f"test_select.py:{line + 2}")
    assert g["b"].source.endswith(f"test_select.py:{line + 2}")
    assert f"test_select.py:{line + 2}" in str(g)

    def looped(x, xs):  # the same in a folded scan's body
        def step(h, xt):
            r = jax.nn.relu(h + xt)
            n = jnp.linalg.norm(r)
            return r / n, None

        return jax.lax.scan(step, x, xs)[0].sum()

    g = js.trace(looped, jnp.ones(3), jnp.ones((4, 3)))
    line = looped.__code__.co_firstlineno
    assert g["step/r@1"].source.endswith(f"test_select.py:{line + 2}")
    assert g["step/n@1"].source.endswith(f"test_select.py:{line + 3}")


def inner(h):
    a = jnp.sin(h)
    return a * 2.0


def outer(h):
    b = inner(h)
    return jnp.cos(b)


def nested(x, params_2, params):
    y = outer(x * params_2[0] + params_2[1])
    k = y @ params["dense"]["kernel"] + params["dense"]["bias"]
    return k.sum()


@pytest.fixture
def n():
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    return js.trace(nested, jnp.ones(3), [jnp.ones(3), jnp.ones(3)], params)


def test_star_stays_within_one_level_and_double_star_crosses(n):
    one_level = n.select("outer/*")
    assert n["outer/b"] in one_level and n["outer/h"] in one_level
    assert n["outer/inner/a"] not in one_level  # '*' does not cross the '/'
    assert not any(m.count("/") > 1 for m in one_level.matched)
    assert n["outer/inner/a"] in n.select("outer/**")
    assert n.select("**/a").names == ("outer/inner/a",)
    with pytest.raises(
        js.SelectionError,
        match=r"no var matches the pattern 'o\*/a'; '\*' stops at '/' \(one level of a "
        r"path\): did you mean 'o\*\*/a', which matches 1 var\?",
    ):
        n.select("o*/a")


def test_pytree_key_brackets_are_literal_in_globs(n):
    assert n.select("params_2[*]").names == ("params_2[0]", "params_2[1]")
    assert n.select("params_2[?]").names == ("params_2[0]", "params_2[1]")
    assert set(n.select("params['dense']*").names) == {
        "params['dense']['bias']",
        "params['dense']['kernel']",
    }
    assert n.select("params['dense']['k*']").names == ("params['dense']['kernel']",)
    assert n.select("params['d*']['bias']").names == ("params['dense']['bias']",)
    assert set(n.select("params['dense']*").names) < set(n.select("params*").names)
    # a bracket of digits only is either the key or a character class
    assert n.select("params_2[1]*").names == ("params_2[1]",)
    # (no glob character: told as a name, with the names close to it)
    with pytest.raises(
        js.SelectionError, match=r"no var named 'params_2\[5\]'; did you mean 'params_2\[1\]'"
    ):
        n.select("params_2[5]")


def test_character_classes_still_work(g):
    assert g.select("z[23]").names == ("z2", "z3")
    assert g.select("z[!1]").names == ("z2", "z3")
    assert g.select("z[1-2]").names == ("z1", "z2")


def scoped(x):
    for _ in range(2):
        with jax.named_scope("block"):
            h = jnp.sin(x) * 2.0
        x = h + 1.0
    return x


def test_a_glob_reports_the_alias_it_matched():
    g = js.trace(scoped, jnp.ones(2))
    sel = g.select("block#*")  # the scope instances' outputs, not what is inside them
    assert sel.matched == ("block#0", "block#1")
    assert sel.names == ("h#0", "h#1")  # canonical names do not match the glob
    assert len(g.select("block#*/*")) > len(sel)
    assert sel.where(lambda v: v.name == "h#1").matched == ("block#1",)
    with pytest.raises(
        js.SelectionError,
        match=r"'block#\*' is ambiguous: it matches h#0 \(as block#0\), h#1 \(as block#1\)",
    ):
        g["block#*"]
    assert g.select("h#0", "block#*").matched == ("h#0", "block#1")  # first selector wins
    assert g.select(re.compile("block#1")).matched == ("block#1",)


def scopes_in_a_row(x):
    with jax.named_scope("a"):
        u = jnp.exp(x)
    with jax.named_scope("b"):
        v = jnp.tanh(u)
    with jax.named_scope("a"):
        y = jnp.sin(v)
    with jax.named_scope("a"):  # right after the last: one instance with two outputs
        z = jnp.cos(v)
    return y * z


def test_an_alias_two_values_share_is_ambiguous_by_their_canonical_names():
    # (penzai: two sublayers of one name stack in a row, "2/0/1/0#2" on both)
    g = js.trace(scopes_in_a_row, jnp.ones(3))
    assert g.select("a#1").names == ("y", "z")
    with pytest.raises(js.SelectionError, match=r"'a#1' is ambiguous: it matches y, z; pick one"):
        g["a#1"]
    assert g["a#0"] is g["u"]


def test_glob_misses_suggest_names(g):
    with pytest.raises(
        js.SelectionError,
        match=r"no var matches the pattern 'out_mta\*'; names close to it: 'out_mat'",
    ):
        g.select("out_mta*")
    with pytest.raises(js.SelectionError, match=r"no var matches the regex re\.compile\('q\+'\)"):
        g.select(re.compile("q+"))


def rebinds(x):
    for _ in range(3):
        x = jnp.sin(x)
    return x


def test_a_rebound_parameter_is_binding_zero_and_the_bare_name_is_ambiguous():
    g = js.trace(rebinds, jnp.ones(2))
    assert [v.name for v in g.inputs] == ["x#0"]
    assert g["x#0"] is g.inputs[0]
    with pytest.raises(
        js.SelectionError, match=r"'x' is ambiguous: it matches x#0, x#1, x#2, x#3; pick one"
    ):
        g["x"]
    assert g.select("x").names == ("x#0", "x#1", "x#2", "x#3")
    assert g.select("x").matched == ("x",) * 4
    with pytest.raises(js.SelectionError, match="ambiguous"):
        g.slice("x", "out")  # a single-var leaf
    assert g.slice("x#0", "out")(jnp.zeros(2)).shape == (2,)


def test_filters_reject_what_cannot_match(g):
    with pytest.raises(js.SelectionError, match=r"did you mean 'tanh'\?"):
        g.select(primitive="tahn")
    with pytest.raises(js.SelectionError, match=r"no var is made by the primitive 'conv'"):
        g.select(primitive=("tanh", "conv"))
    with pytest.raises(js.SelectionError, match="is not a primitive name"):
        g.select(primitive=["tanh", 3])
    with pytest.raises(js.SelectionError, match="is not a scope path"):
        g.select(scope=3)
    s = js.trace(scoped, jnp.ones(2))
    assert len(s.select(scope="block")) > 0
    with pytest.raises(
        js.SelectionError, match=r"no var is in the scope 'blok'; did you mean 'block'\?"
    ):
        s.select(scope="blok")


def _inner(h):
    a = jnp.cos(h)
    return a * 2


def _attn_block(x, w):
    attn = jnp.tanh(x @ w)
    mlp = jnp.sin(attn)
    return mlp


def test_a_glob_with_one_part_misspelt_suggests_the_glob_spelt_right():
    """``*/atn`` suggested ``*[atn]`` (a class of three letters, matching any name ending
    in a, t or n, as a pytree key); ``block#*/atn``, names sharing none of its parts."""

    def model(x, ws):
        for w in ws:
            x = _attn_block(x, w)
        return x.sum()

    g = js.trace(model, jnp.ones(3), [jnp.eye(3)] * 2)
    for typo, meant in [("*/atn", "*/attn"), ("_attn_block#*/mpl", "_attn_block#*/mlp")]:
        with pytest.raises(js.SelectionError, match=re.escape(f"did you mean {meant!r}?")):
            g.select(typo)
        assert len(g.select(meant)) == 2


def test_a_call_path_given_as_a_scope_points_to_its_glob():
    """A call's path (a box of the view) is no scope: the error says how to select it."""

    def outer(x):
        with jax.named_scope("s"):
            h = jnp.sin(x)
        return _inner(h)

    g = js.trace(outer, jnp.ones(2))
    with pytest.raises(
        js.SelectionError,
        match=r"scopes: s\); '_inner' is a path of names, not a scope \(a name stack entry\): "
        r"the values named under it are g\.select\('_inner/\*\*'\), the value it names "
        r"g\['_inner'\]",
    ):
        g.select(scope="_inner")
    assert g.select("_inner/**").names == ("h", "_inner/a")  # its parameter, its value


def test_a_primitive_only_inside_a_folded_loop_says_which_names_it_makes():
    """``g.select(primitive="tanh")`` where tanh runs only in a scan's body: a
    SelectionError naming the per-iteration names, which select those values (it was
    an empty selection, silently)."""

    def rnn(h0, xs):
        def step(h, x):
            y = jnp.tanh(h + x)
            return y, jax.nn.sigmoid(y)

        return jax.lax.scan(step, h0, xs)[1].sum()

    g = js.trace(rnn, jnp.zeros(3), jnp.ones((5, 3)))
    with pytest.raises(js.SelectionError, match=r"made by tanh: .* names, step/y@\*"):
        g.select(primitive="tanh")
    with pytest.raises(js.SelectionError, match=r"made by logistic: .* names, step\[1\]@\*"):
        g.select(primitive="logistic")
    assert len(g.select("step/y@*", primitive="tanh")) == 5
    assert len(g.select("step[1]@*", primitive="logistic")) == 5


def _layer(x, w):
    h = jnp.tanh(x @ w)
    return h * 2.0


def _block(x, w, eps=(0.0, 0.0)):
    with jax.named_scope("qk"):
        a = jnp.sin(x)
    y = _layer(a, w) + eps[0]  # (the reference adds eps at each layer's h * 2.0)
    return _layer(y, w) + eps[1]


def _blocks(x, w):
    u = _block(x, w)
    return _block(u, w).sum()


def test_a_path_without_call_numbers_selects_every_numbered_instance():
    x, w = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), jnp.eye(3) * 0.7
    g = js.trace(_blocks, x, w)
    every = tuple(f"_block#{i}/_layer#{j}/h" for i in (0, 1) for j in (0, 1))
    assert g.select("_block/_layer/h").names == every
    assert g.select("_block#1/_layer/h").names == every[2:]
    assert len(g.select("_block/_layer")) == 4  # what each call returned
    assert len(g.select("qk")) == 2  # a scope entered once in each block
    # the insides of every instance, by a glob that matches nothing as written
    assert set(every) <= set(g.select("_block/_layer/*").names)
    assert g.select("_block/**/_layer/h").names == every  # "**/": any levels, or none
    assert g.select("**/_layer/h").names == every
    # values: the layers' own, computed by hand
    h, hs = x, []
    for _ in range(2):
        a = jnp.sin(h)
        for _ in range(2):
            hs.append(jnp.tanh(a @ w))
            a = hs[-1] * 2.0
        h = a
    for name, want in zip(every, hs):
        assert jnp.allclose(g.value(name), want)
    # where one var is needed, it is ambiguous like a bare name several bindings share
    with pytest.raises(
        js.SelectionError,
        match=r"'_block/_layer/h' is ambiguous: it matches _block#0/_layer#0/h, _block#0/_layer#1/h",
    ):
        g["_block/_layer/h"]
    assert g["_block#1/_layer#0/h"] is g.select("_block/_layer/h")[2]
    # keyed by the names they matched: one gradient per instance, as one key each
    grads = g.grads("out", wrt="_block/_layer")
    assert list(grads) == [f"_block#{i}/_layer#{j}" for i in (0, 1) for j in (0, 1)]

    def perturbed(eps):
        u = _block(x, w, eps[:2])
        return _block(u, w, eps[2:]).sum()

    zeros = [jnp.zeros_like(x)] * 4
    for got, want in zip(grads.values(), jax.grad(perturbed)(zeros)):
        assert jnp.allclose(got, want, atol=1e-6)
    with pytest.raises(js.SelectionError, match=r"no var named '_block/_layr/h'"):
        g.select("_block/_layr/h")
