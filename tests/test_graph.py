"""The Graph: flat program, values, views (text table, networkx)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allclose
from jax.extend.core import check_jaxpr
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js


def test_vars_are_inputs_then_equation_outputs():
    g = js.trace(mlp_12782, *mlp_12782_args())
    assert len(g.inputs) == 7 and g.vars[:7] == g.inputs
    assert len(g.vars) == 7 + len(g.jaxpr.eqns)
    assert [v.index for v in g.vars] == list(range(len(g.vars)))
    check_jaxpr(g.jaxpr)


def test_values_match_eager_evaluation():
    args = mlp_12782_args()
    x, p1, p2, p3 = args
    g = js.trace(mlp_12782, *args)
    z1 = jnp.tanh(jnp.dot(p1[0], x) + p1[1])
    np.testing.assert_allclose(g.value("z1"), z1, rtol=1e-6)
    np.testing.assert_allclose(g.value(g.outputs[0]), mlp_12782(*args), rtol=1e-6)
    pair = g.value(("z1", "x"))
    assert isinstance(pair, tuple)
    np.testing.assert_array_equal(pair[1], x)


def _many_ops(x, w):
    """A short program of many distinct ops (a real model's first value compiles them)."""
    a = jnp.sin(x) @ w
    b = jnp.cos(a) * jnp.exp(-(a**2))
    c = jnp.log1p(jnp.abs(b)) + jnp.tanh(b).T @ jnp.ones((4, 4))
    d = jnp.sqrt(jnp.maximum(c, 0.1)) / (1.0 + jnp.arctan(c))
    e = jnp.cumsum(d, axis=0) - jnp.max(d, axis=1, keepdims=True)
    return jnp.sort(e, axis=1).sum() + jnp.linalg.norm(e) + jnp.sinh(a).mean()


def _fresh_caches(monkeypatch):
    """No op or window compiled before (the caches of values and of eager calls)."""
    from jaxsurgery import _eager, _program

    for module, cache in ((_program, "_RAN"), (_eager, "OPS"), (_program, "_WINDOWS")):
        monkeypatch.setattr(module, cache, type(getattr(module, cache))())


@pytest.mark.parametrize("whole", [True, False], ids=["compiled whole", "op by op"])
def test_first_values_compiled_whole_or_op_by_op(whole, monkeypatch):
    """A first value of a short prefix of many ops not run before is one compiled
    function; otherwise (or past ``COMPILE_WHOLE`` equations) the prefix runs op by op
    with values dropped after their last read. Both give the function's values, and
    later values start from the checkpoints of the first."""
    from jaxsurgery import _program

    _fresh_caches(monkeypatch)  # (no op or window run before)
    if not whole:
        monkeypatch.setattr(_program, "COMPILE_WHOLE", 0)
    ran, real_run = [], _program.run_eqns

    def run(*args):
        ran.append(1)
        return real_run(*args)

    monkeypatch.setattr(_program, "run_eqns", run)
    x = jnp.linspace(-1, 1, 12).reshape(4, 3)
    w = jnp.arange(12.0).reshape(3, 4) / 10
    g = js.trace(_many_ops, x, w)
    a = jnp.sin(x) @ w
    b = jnp.cos(a) * jnp.exp(-(a**2))
    c = jnp.log1p(jnp.abs(b)) + jnp.tanh(b).T @ jnp.ones((4, 4))
    np.testing.assert_allclose(g.value("out"), _many_ops(x, w), rtol=1e-5)
    assert bool(ran) is not whole
    np.testing.assert_allclose(g.value("c"), c, rtol=1e-5)
    np.testing.assert_allclose(g.value("b"), b, rtol=1e-5)


def _layer_of_many_ops(h, w):
    a = jnp.tanh(h @ w)
    b, c = jnp.sin(a), jnp.cos(a)
    d = jnp.exp(-c * c)
    e = jnp.sqrt(jnp.log1p(d) + 1.0)
    f = jnp.minimum(jnp.maximum(jnp.abs(e - a), b), c)
    o = f / (jnp.sum(f, -1, keepdims=True) + 1.0)
    r = jax.nn.sigmoid(o - jnp.mean(o, -1, keepdims=True)) ** 2
    return jnp.arctan(jnp.tan(0.1 * (r - jnp.max(r, -1, keepdims=True)))) + h


def _walked(ws, x):
    h = x
    for w in ws:
        h = _layer_of_many_ops(h, w)
    return h


def test_values_asked_layer_by_layer_compile_one_layer_once(monkeypatch, caplog):
    """Each next layer's value compiled its window whole again (0.3 s a layer), and the
    layer after a long first value too (its ops all compiled): a window like one compiled
    before runs that function, and ops a long run compiled count as run."""
    from jaxsurgery import _program

    _fresh_caches(monkeypatch)
    ws = [jax.random.normal(jax.random.key(k), (8, 8)) / 3 for k in range(6)]
    x = jnp.ones((2, 8))
    g = js.trace(_walked, ws, x)
    h = x
    caplog.set_level("WARNING", logger="jax")
    for k, w in enumerate(ws):
        h = _layer_of_many_ops(h, w)
        caplog.clear()
        with jax.log_compiles():
            np.testing.assert_allclose(g.value(f"_layer_of_many_ops#{k}"), h, rtol=1e-5)
        compiled = [r for r in caplog.records if r.getMessage().startswith("Compiling")]
        assert len(compiled) == (1 if k == 0 else 0), (k, [r.getMessage()[:50] for r in compiled])
    # the layer after a long first value (run op by op): its ops are compiled
    monkeypatch.setattr(_program, "COMPILE_WHOLE", 40)
    g = js.trace(_walked, ws, x)
    g.value("_layer_of_many_ops#4")  # (its prefix is longer: op by op)
    caplog.clear()
    with jax.log_compiles():
        np.testing.assert_allclose(g.value("_layer_of_many_ops#5"), h, rtol=1e-5)
    assert not [r for r in caplog.records if r.getMessage().startswith("Compiling")]


def _over(c):
    def f(x):
        h = jnp.sin(x) * c
        out = 1.0 / h
        return out

    return f


@pytest.mark.parametrize("whole", [True, False], ids=["compiled whole", "op by op"])
def test_values_compute_with_the_literals_and_the_context_traced(whole, monkeypatch):
    """The compiled windows were kept by literals as Python compares them (-0.0 == 0.0:
    one graph's -inf read +inf from another's window) and took none of an array literal
    (a ValueError); and ops ran in the running context, not the traced one (a PRNG traced
    under threefry_partitionable(False) gave other bits)."""
    from jaxsurgery import _program

    _fresh_caches(monkeypatch)
    monkeypatch.setattr(_program, "_mostly_new", lambda eqns: whole)
    x = jnp.ones(3)
    for c in (0.0, -0.0):
        np.testing.assert_array_equal(js.trace(_over(c), x).value("out"), _over(c)(x))
    table = np.arange(3.0, dtype=np.float32) + 1
    jax.config.update("jax_use_simplified_jaxpr_constants", True)
    try:
        np.testing.assert_allclose(js.trace(_over(table), x).value("out"), _over(table)(x))
    finally:
        jax.config.update("jax_use_simplified_jaxpr_constants", False)

    def noise(key):
        u = jax.random.uniform(key, (5,))
        out = u * 2
        return out

    key = jax.random.key(0)
    with jax.threefry_partitionable(False):
        g = js.trace(noise, key)
        traced = noise(key)
    assert not np.allclose(traced, noise(key))  # (the two contexts differ here)
    np.testing.assert_array_equal(g.value("out"), traced)


def test_the_values_a_graph_keeps_stay_within_its_budget(monkeypatch):
    """Reading every value of a model one by one kept them all (a 1 GB-activation model
    kept 1 GB more, growing with batch and length): past ``KEPT_VALUES_BYTES`` the values
    asked longest ago go, and asked again they are computed again, equal."""
    import jaxsurgery._graph as graph_module

    monkeypatch.setattr(graph_module, "KEPT_VALUES_BYTES", 4 * 64 * 256 * 4)  # 4 values

    def chain(x):
        h = x
        for _ in range(30):
            h = jnp.tanh(h * 1.01)
        return h.sum()

    x = jax.random.normal(jax.random.key(0), (64, 256))
    g = js.trace(chain, x)
    names = [v.name for v in g.vars if v.shape == (64, 256) and v.name != "x"]
    expected, h = [], x
    for _ in range(30):
        expected += [h * 1.01, h := jnp.tanh(h * 1.01)]
    assert len(names) == len(expected) == 60
    for name, ref in zip(names, expected):
        allclose(g.value(name), ref)
        assert g._values.nbytes <= 4 * 64 * 256 * 4
    assert len(g._values) <= 4
    allclose(g.value(names[0]), expected[0])  # (gone: computed again)
    allclose(g.value(names[-1]), expected[-1])

    def trips(x):  # an unrolled while_loop: each trip's value kept as a row of a stack
        def body(c):
            i, h = c
            new = jnp.tanh(h * 1.01)
            return i + 1, new

        return jax.lax.while_loop(lambda c: c[0] < 20, body, (0, x))[1].sum()

    g = js.trace(trips, x)
    assert "body/new@19" in g.names()
    allclose(g.value("body/new@5"), expected[11])
    # (the 20 trips' stack, 1.3 MB, counted once, is past the budget: not kept; its
    # rows counted nothing before, and stayed)
    assert g._values.nbytes <= 4 * 64 * 256 * 4
    assert sum(a.nbytes for a in {id(r.array): r.array for r in _rows(g)}.values()) == 0
    allclose(g.value("body/new@19"), expected[39])


def _rows(g):
    from jaxsurgery._structured import Row

    return [x for x in g._values.values() if type(x) is Row]


def test_values_are_concrete_inside_jit():
    g = js.trace(mlp_12782, *mlp_12782_args())

    @jax.jit
    def f(v):
        return v * g.value("z2").sum()

    assert np.isfinite(float(f(1.0)))
    assert not isinstance(g.value("z2"), jax.core.Tracer)


def test_constant_and_literal_outputs_become_const_vars():
    captured = np.arange(3.0, dtype=np.float32)

    def f(x):
        return x + captured, 1.0

    g = js.trace(f, jnp.ones(3))
    assert g.outputs[1].primitive == "const"
    assert float(g.value("out[1]")) == 1.0
    check_jaxpr(g.jaxpr)


def test_a_constant_a_jitted_call_returns_is_a_value_its_name_selects():
    """``a, b = layer(x)`` where the jitted layer returns ``1.0``: JAX makes that result a
    literal of the call's jaxpr; inlined, it is a value the call writes, named ``b`` (and
    ``layer[1]``), not a name that selects nothing. A slice from it inside a ``cond``
    branch cuts the branch (as a constant, the slice ignored its input: hunt W)."""

    @jax.jit
    def layer(x):
        return x * 2, 1.0

    def f(x):
        a, b = layer(x)
        c = a + b
        return (c**2).sum()

    x = jnp.arange(3.0)
    g = js.trace(f, x)
    assert g["b"] == g["layer[1]"]
    assert float(g.value("b")) == 1.0
    check_jaxpr(g.jaxpr)
    # the constant held fixed in a slice, and a slice from it (d out / d b = sum 2c)
    s = g.slice("a", "out")
    allclose(s(2 * x), f(x))
    s_b = g.slice("b", "out")
    allclose(jax.grad(s_b)(1.0), jax.grad(lambda b: ((2 * x + b) ** 2).sum())(1.0))
    allclose(g.as_function()(x + 1), f(x + 1))
    allclose(jax.jit(g.grads_fn("out", wrt=["b"]))(x)["b"], 2 * (2 * x + 1).sum())

    def in_branch(x, p, b=None):
        def branch(x):
            a, c = layer(x)
            return jnp.sin(a * (c if b is None else b))

        return jax.lax.cond(p > 0, branch, jnp.sin, x).sum()

    g = js.trace(in_branch, x, 1.0)
    s = g.slice("branch/c", "out")
    allclose(s(2.0), in_branch(x, 1.0, b=2.0))
    allclose(jax.grad(s)(1.0), jax.grad(lambda b: in_branch(x, 1.0, b=b))(1.0))


def test_networkx_view_is_an_index_of_the_jaxpr():
    g = js.trace(mlp_12782, *mlp_12782_args())
    nxg = g.to_networkx()
    assert nxg.number_of_nodes() == len(g.vars)
    assert nxg.nodes[g["z1"].index]["name"] == "z1"
    edge = nxg.edges[g["z1"].index, g["z2"].producers[0].producers[0].index]
    assert edge["primitive"] == "dot_general"
    import networkx as nx

    assert nx.is_directed_acyclic_graph(nxg)
    assert nx.has_path(nxg, g["x"].index, g["z3"].index)
    assert not any(control for _, _, control in nxg.edges(data="control"))


def test_networkx_marks_the_edges_a_conditional_adds_as_control():
    def f(p, x):
        y = jax.lax.cond(p > 0, jnp.sin, jnp.cos, x)
        return y * 2

    g = js.trace(f, 1.0, jnp.ones(3))
    nxg = g.to_networkx()
    sin = g.select(primitive="sin")[0].index
    (decider,) = g.select(primitive="convert_element_type")  # (the predicate as an index)
    # the branch's sin reads x; the predicate decides it, which it does not read
    assert nxg.edges[g["x"].index, sin]["control"] is False
    assert nxg.edges[decider.index, sin]["control"] is True
    # what the jaxpr reads is exactly the edges not marked control
    for e, eqn in enumerate(g.jaxpr.eqns):
        outs = {g._program.index[v] for v in eqn.outvars}
        reads = {g._program.index[a] for a in eqn.invars if not hasattr(a, "val")}
        found = {i for i, o, c in nxg.edges(data="control") if o in outs and not c}
        assert found == reads, (e, eqn)


def test_text_table():
    g = js.trace(mlp_12782, *mlp_12782_args())
    text = repr(g)
    assert text.splitlines()[0].startswith("Graph f: 16 vars, 9 equations")
    assert "z3 (out)" in text and "dot_general" in text and "issue_12782.py:" in text

    def deep(x):
        for _ in range(100):
            x = jnp.sin(x)
        return x

    big = repr(js.trace(deep, jnp.ones(2)))
    assert "(61 more)" in big and len(big.splitlines()) < 50


def test_copies_share_the_traced_program_and_pickling_says_what_to_save():
    """copy/deepcopy (a dataclass of experiment state, a config copied whole) give
    working objects; pickle is a TypeError naming the object and what to save."""
    import copy
    import pickle

    import equinox as eqx

    model = eqx.nn.MLP(3, 2, width_size=8, depth=2, key=jax.random.key(0))
    x = jnp.linspace(-1.0, 1.0, 3)

    def loss(model, x):
        y = model(x)
        return jnp.sum(y**2)

    g = js.trace(loss, model, x)
    h = g["eqx.nn.MLP/eqx.nn.Linear#1"]  # the second layer's output, before its relu
    s = g.slice(h, "out")
    state = {"graph": g, "var": h, "slice": s, "grads": g.grads_fn("out", wrt=[h])}
    state["values"] = g.values_fn([h])
    kept = copy.deepcopy(state)
    assert kept["graph"] is g and kept["var"] is h and copy.copy(h) is h
    assert kept["graph"][h.name] is h
    model2 = eqx.nn.MLP(3, 2, width_size=8, depth=2, key=jax.random.key(1))
    np.testing.assert_allclose(kept["slice"](g.value(h)), loss(model, x), rtol=1e-6)
    grads = eqx.filter_jit(kept["grads"])(model2, x)[h.name]
    ref = jax.grad(lambda e: jnp.sum(model2.layers[2](jax.nn.relu(e)) ** 2))(
        model2.layers[1](jax.nn.relu(model2.layers[0](x)))
    )
    np.testing.assert_allclose(grads, ref, rtol=1e-5)
    shallow = copy.copy(s)
    assert shallow is not s and float(shallow(g.value(h))) == float(s(g.value(h)))
    whole = g.as_function()
    made = (g, h, s, state["grads"], state["values"], g.select("out"), whole)
    kinds = ("Graph", "Var", "Slice", "GradsFunction", "ValuesFunction", "Selection")
    for obj, kind in zip(made, (*kinds, "WholeFunction")):
        with pytest.raises(TypeError, match=rf"cannot pickle a jaxsurgery {kind}: .*serialize\(\)"):
            pickle.dumps(obj)  # (the whole function: was Python's AttributeError, a closure)
    assert copy.deepcopy(g.select("out")) == g.select("out") and copy.deepcopy(whole) is whole
    assert copy.copy(whole) is whole  # (as a function's: jax.jit of it compiles nothing again)
    assert copy.deepcopy(whole)(model2, x) == loss(model2, x)
    assert jax.export.deserialize(s.export().serialize()).call(g.value(h)) == s(g.value(h))


MASK = np.tril(np.ones((3, 3), np.float32))


def test_values_handed_out_are_never_the_graphs_or_the_callers_numpy_arrays():
    # g.value of a NumPy constant the function closes over, or of an argument given as
    # NumPy, and s.context, handed out the graph's own writeable array (an edit in place
    # changed every later result, and the caller's global); values_fn of an argument
    # gave back the caller's own array
    def f(w, x):
        mask = MASK
        h = jnp.tanh(x @ (w * mask))
        return h.sum()

    w, x = np.ones((3, 3), np.float32), np.ones((2, 3), np.float32)
    g = js.trace(f, w, x)
    expected = float(f(w, x))
    for value in (g.value("mask"), g.value("w"), *g.slice("x", "out").context.values()):
        assert isinstance(value, jax.Array)
    acts = g.values_fn(["w", "h"])(w, x)
    assert isinstance(acts["w"], jax.Array) and acts["w"] is not w
    assert float(g.value("out")) == expected and MASK[0, 0] == 1.0
    allclose(g.as_function()(w, x), expected)
