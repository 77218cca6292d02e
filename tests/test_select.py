"""Selectors: index, exact name, glob, regex, Var, Selection, filters, and their errors."""

import re

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


def test_filters(g):
    assert g.select(primitive="tanh").names == ("z1", "z2")
    assert g.select(primitive=("tanh", "sin")).names == ("z1", "z2", "z3")
    assert g.select(where=lambda v: v.ndim == 2)[-1].name == "out_mat"
    assert g.select("z?", where=lambda v: v.primitive == "sin").one().name == "z3"
    assert g.select(primitive="conv") == ()


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
    with pytest.raises(js.SelectionError, match="no var named 'q\\*'"):
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
    assert v.source.endswith("test_select.py:13")
    assert v.producers[0].primitive == "mul"
    assert v.users == (g["z3"],)
    assert g["x"].primitive == "input" and g["x"].source is None
    assert {v} == {g["z2"]} and v != g["z1"]
