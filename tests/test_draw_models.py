"""Pictures of real models (Haiku ResNet50, Flax linen, Equinox, Flax NNX, penzai) and of
long chains: they draw, have no cycle, show the model's blocks as boxes, stay small;
``highlight`` takes a Slice or any selector. Checks read the DOT text and the SVG."""

import re
import xml.etree.ElementTree as ET

import flax.linen as nn
import jax
import jax.numpy as jnp
import networkx as nx
import optax
import pytest
from draw_models import BLOCKS, MODELS, chain, equinox_transformer, flax_transformer, picture
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js
from jaxsurgery._draw import roles
from jaxsurgery._hierarchy import MAX_CHILDREN, hierarchy

SVG = "{http://www.w3.org/2000/svg}"


def dot_graph(dot: str) -> tuple[dict[str, str], nx.DiGraph]:
    """Labels (first line) per node, and the edges, read back from DOT text."""
    labels = dict(re.findall(r'^  (\w+) \[label="((?:[^"\\]|\\.)*?)\\n', dot, re.M))
    edges = re.findall(r"^  (\w+) -> (\w+);", dot, re.M)
    graph = nx.DiGraph(edges)
    graph.add_nodes_from(labels)
    return labels, graph


@pytest.mark.parametrize("name", MODELS)
def test_real_models_draw_without_cycles_at_every_depth(name):
    g = MODELS[name]()
    svg = ET.fromstring(g.draw(engine="builtin").svg)
    assert svg.tag == f"{SVG}svg" and svg.findall(f".//{SVG}rect")
    tree_depth = max(group.depth for group in hierarchy(g).walk())
    for depth in range(1, tree_depth + 2):
        labels, graph = dot_graph(g.to_dot(depth=depth))
        assert nx.is_directed_acyclic_graph(graph), (name, depth)
        assert len(labels) <= len(g.vars)


@pytest.mark.parametrize("name", MODELS)
def test_every_group_is_a_run_of_program_order(name):
    """What makes every collapsed picture acyclic: a group holds exactly the equations
    between its first and last (and inputs, which only feed it)."""
    g = MODELS[name]()
    producer = g._program.producer
    for group in hierarchy(g).walk():
        eqns = {producer[i] for i in group.all_vars()} - {-1}
        if eqns and group.kind != "root":
            made = {producer[v.index] for v in g.vars} - {-1}
            assert eqns == set(range(min(eqns), max(eqns) + 1)) & made, group


@pytest.mark.parametrize(
    "name, boxes",
    [
        ("flax", [f"Block_{k}" for k in range(BLOCKS)] + ["Dense_0", "args[0]"]),
        # (their paths in the model, as NNX modules', also in `for block in self.blocks`)
        ("equinox", [f"blocks[{k}]" for k in range(BLOCKS)] + ["x"]),
        ("penzai", [f"body.sublayers[{k}]" for k in range(4)]),
        (
            "haiku_resnet50",
            ["initial_conv", "initial_batchnorm", "logits", "x", "state (inputs)"]
            + [f"block_group_{k}" for k in range(4)],
        ),
    ],
)
def test_the_default_picture_shows_the_blocks(name, boxes):
    labels, _ = dot_graph(MODELS[name]().to_dot())
    assert set(boxes) <= set(labels.values()), labels.values()
    assert len(labels) <= len(boxes) + 4  # and a few loose values (ResNet's pooling)


def test_inside_a_block_and_an_nnx_model_by_depth():
    labels, _ = dot_graph(flax_transformer().to_dot(depth=3))
    for part in ("LayerNorm_0", "Attention_0", "LayerNorm_1", "Dense_0", "Dense_1"):
        assert sum(label.endswith(part) for label in labels.values()) == BLOCKS, part
    labels, _ = dot_graph(MODELS["nnx"]().to_dot(depth=2))
    assert {"l1", *(f"layers[{k}]" for k in range(BLOCKS))} <= set(labels.values())
    # Equinox: a layer's call and the scope it makes are one box, named by the call
    # (each block's, by its block: blocks[0]/ln1)
    labels, _ = dot_graph(equinox_transformer().to_dot(depth=3))
    for part in ("ln1", "attention", "ln2", "mlp"):
        boxes = [label for label in labels.values() if label.split("/")[-1] == part]
        assert len(boxes) == len(set(boxes)) > 1 and all("block" in b for b in boxes), boxes


def test_long_labels_keep_their_tail_and_pytree_keys_stay_whole():
    g = MODELS["haiku_resnet50"]()
    dot = g.to_dot(depth=4)
    assert "\\n" in dot and "['res_net50\\n" not in dot
    labels, _ = dot_graph(dot)
    clipped = [label for label in labels.values() if label.startswith("…")]
    assert clipped  # the long names: their tails are kept
    names = set(g.names()) | {group.label for group in hierarchy(g).walk()}
    for label in clipped:
        assert any(n.endswith(label[1:]) for n in names), label


def test_an_argument_a_binding_also_names_stays_a_box_of_its_own():
    """``pair = (x, y)`` gives ``x`` the alias ``pair[0]``: ``x`` and ``y`` were taken
    for leaves of one argument ``pair`` and hidden in the box that reads them."""

    def f(x, y):
        pair = (x, y)
        with jax.named_scope("blk"):
            h = jnp.sin(pair[0]) * pair[1]
            h = jnp.tanh(h) + 1.0
        return h * 2.0

    labels, _ = dot_graph(js.trace(f, jnp.ones(3), jnp.ones(3)).to_dot(depth=1))
    assert sorted(labels.values()) == ["blk", "out", "x", "y"]


def test_segment_labels_name_two_different_ends_and_keep_both_when_cut():
    """A segment whose one named value is its first was labelled ``y#3 … y#3``; a long
    label cut from the left lost its first end (``… … state[0].mu['b']#0``)."""

    def f(x):
        y = x
        for _ in range(60):
            y = jnp.sin(y) * 2.0 + 1.0
        long_name_of_a_value_at_the_end = y * 3.0
        return long_name_of_a_value_at_the_end

    g = js.trace(f, jnp.ones(2))
    labels, _ = dot_graph(g.to_dot())
    segments = [label.split(" … ") for label in labels.values() if " … " in label]
    assert segments and all(head != tail for head, tail in segments), segments
    assert all(head and not head.startswith("…") for head, _ in segments), segments


def test_a_slash_inside_a_pytree_key_is_not_a_call():
    """A Haiku training step returns gradients keyed ``'mlp/~/linear_2'``: those output
    names are not calls, and the forward and backward passes are the boxes."""
    import haiku as hk
    import jax
    import jax.numpy as jnp

    f = hk.transform(lambda x: hk.nets.MLP([8, 8, 2])(x))
    x = jnp.ones((4, 3))
    params = f.init(jax.random.key(1), x)

    def step(params, x):
        return jax.grad(lambda q: f.apply(q, None, x).sum())(params)

    g = js.trace(step, params, x)
    groups = re.findall(r'label="((?:[^"\\]|\\.)*?)\\n\d+ vars"', g.to_dot(depth=1))
    assert sorted(groups) == ["grad(mlp)", "mlp"], groups


def test_a_100k_var_chain_draws_under_a_megabyte():
    g = chain(50_000)  # 100 001 vars
    assert len(g.vars) == 100_001
    svg = g.draw(engine="builtin").svg
    assert len(svg) < 1_000_000
    boxes = ET.fromstring(svg).findall(f".//{SVG}rect")
    assert 2 <= len(boxes) <= MAX_CHILDREN
    labels, graph = dot_graph(g.to_dot())
    assert nx.is_directed_acyclic_graph(graph) and nx.is_weakly_connected(graph)
    assert next(iter(labels.values())).startswith("x#0 … ")
    assert any(label.endswith(" … x#50000") for label in labels.values())


@pytest.fixture(scope="module")
def mlp():
    return js.trace(mlp_12782, *mlp_12782_args())


def node_colours(dot: str) -> dict[str, str]:
    return dict(re.findall(r'^  (\w+) \[.*?, color="(#\w+)"', dot, re.M))


@pytest.mark.parametrize("selector", ["z1", "z?", 4, ["z1", "z3"]])
def test_highlight_takes_any_selector(mlp, selector):
    chosen = {f"v{v.index}" for v in mlp.select(selector)}
    colours = node_colours(mlp.to_dot(highlight=selector))
    assert {k for k, c in colours.items() if c == "#9334e6"} == chosen  # purple
    assert ET.fromstring(mlp.draw(highlight=selector, engine="builtin").svg).findall(
        f".//{SVG}g[@class='legend']"
    )


def test_highlight_takes_a_selection_and_a_slice(mlp):
    selection = mlp.select("z*")
    colours = node_colours(mlp.to_dot(highlight=selection))
    assert sum(c == "#9334e6" for c in colours.values()) == len(selection)
    s = mlp.slice("z1", "z2")
    colours = node_colours(mlp.to_dot(highlight=s))
    assert (
        colours[f"v{mlp['z1'].index}"] == "#1e8e3e" and colours[f"v{mlp['z2'].index}"] == "#e8710a"
    )
    assert picture(s.draw().svg) == picture(mlp.draw(highlight=s).svg)


@pytest.mark.parametrize(
    "highlight, words",
    [
        ("z9", ["'z9'", "did you mean"]),
        ("nothing*", ["'nothing*'", "matches"]),
        (3.5, ["3.5", "not a selector"]),
    ],
)
def test_a_bad_highlight_is_a_selection_error(mlp, highlight, words):
    for call in (mlp.draw, mlp.to_dot):
        with pytest.raises(js.SelectionError) as e:
            call(highlight=highlight)
        assert all(w in str(e.value) for w in words) and "highlight" in str(e.value)


def test_a_slice_of_another_graph_or_a_bad_depth_is_an_error(mlp):
    other = js.trace(mlp_12782, *mlp_12782_args()).slice("z1", "z2")
    with pytest.raises(js.SelectionError, match="another graph"):
        mlp.draw(highlight=other)
    with pytest.raises(js.SelectionError, match="depth=0"):
        mlp.to_dot(depth=0)
    for bad in ("x", 0, 0.5, True):  # (a str reached a raw TypeError in a comparison)
        for call in (mlp.draw, mlp.to_dot):
            with pytest.raises(js.SelectionError, match=f"max_nodes={bad!r} is not a number"):
                call(max_nodes=bad)
    assert mlp.to_dot(max_nodes=float("inf")) == mlp.to_dot(max_nodes=10_000)  # never boxes
    with pytest.raises(js.SelectionError, match="unknown engine 'neato': use 'auto'"):
        mlp.draw(engine="neato")


def test_a_slice_marks_the_blocks_it_touches_and_can_open_them():
    g = flax_transformer()
    s = g.slice("Transformer/Block_2", "Transformer/Block_3")  # Block_3 is the window
    labels, _ = dot_graph(g.to_dot(highlight=s))
    colours = node_colours(g.to_dot(highlight=s))
    by_label = {label: colours[key] for key, label in labels.items()}
    assert by_label["Block_2"] == "#1e8e3e"  # holds the input
    assert by_label["Block_3"] == "#e8710a"  # holds the output
    assert by_label["Block_0"] == by_label["Block_5"] == "#e0e0e0"  # faded
    opened, _ = dot_graph(g.to_dot(highlight=s, expand=True))
    assert "Block_2" not in opened.values() and "Block_3" not in opened.values()
    # Block_3's output, by its canonical name (the Python name `x` in Transformer.__call__)
    assert "Block_1" in opened.values() and g["Transformer/Block_3"].name in opened.values()


def test_a_slice_from_inside_a_folded_loop_to_its_result_draws_the_result_as_output():
    def rnn(w, h0, xs):
        def step(h, x):
            h_new = jnp.tanh(w @ h + x)
            return h_new, h_new

        h_last, _ = jax.lax.scan(step, h0, xs)
        return h_last

    g = js.trace(rnn, jnp.eye(4) / 2, jnp.zeros(4), jnp.ones((20, 4)))
    s = g.slice("step/h_new@5", "h_last")
    dot = g.to_dot(highlight=s)
    labels, _ = dot_graph(dot)
    key = next(k for k, label in labels.items() if label == "h_last")
    assert node_colours(dot)[key] == "#e8710a"  # the slice's output, not its input
    assert g.view(highlight=s).data()["vars"][g["h_last"].index]["role"] == "output"
    # the loop's other result (the stacked ys) is no part of the slice: not its input
    shown = {g[i].name: r for i, r in roles(g, s).items()}
    assert shown["h_last"] == "output" and "_" not in shown
    # a slice inside the loop: its results hold the output (they were both "input")
    inside = roles(g, g.slice("step/h_new@5", "step/h_new@9"))
    assert {inside[g[n].index] for n in ("h_last", "_")} == {"output"}


def test_the_picture_of_a_training_step_keeps_the_model_and_its_backward_pass_as_boxes():
    """An optimizer's many loose updates around the model are folded into segments, while
    the forward scope and the backward one stay boxes of their own."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(4):
                x = nn.relu(nn.Dense(8)(x))
            return nn.Dense(2)(x)

    model, x, y = MLP(), jnp.ones((4, 3)), jnp.ones((4, 2))
    params = model.init(jax.random.key(0), x)
    opt = optax.adam(1e-3)

    def step(params, opt_state, x, y):
        def loss_fn(p):
            pred = model.apply(p, x)
            return jnp.mean((pred - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    g = js.trace(step, params, opt.init(params), x, y)
    labels, _ = dot_graph(g.to_dot())
    assert {"MLP", "grad(MLP)"} <= set(labels.values()), sorted(labels.values())
    assert len(labels) <= MAX_CHILDREN


def test_a_slice_cut_from_a_running_loop_shows_its_window_and_context():
    """A slice to or from a folded loop's value is cut from the running program: its
    picture showed its two ends only, every value it computes or reads faded."""

    def f(x, w):
        a = jnp.sin(x) @ w
        grown = a * 2.0

        def step(c, _):
            c2 = jnp.tanh(c @ w) + 0.1
            return c2, c2 * 2

        c, ys = jax.lax.scan(step, grown, None, length=5)
        e = ys.sum(0) + c * 3.0
        return e.sum()

    g = js.trace(f, jnp.ones((2, 3)), jnp.eye(3) * 0.5)
    into = {g[i].name: r for i, r in roles(g, g.slice("x", "step/c2@4")).items()}
    assert into["a"] == into["grown"] == "window" and into["w"] == "context"
    assert into["c"] == into["ys"] == "output"  # the loop holds the output
    out_of = {g[i].name: r for i, r in roles(g, g.slice("step/c2@1", "e")).items()}
    # (the loop holding the input is drawn as it, though the slice computes its results)
    assert out_of["c"] == out_of["ys"] == "input" and out_of["e"] == "output"
    assert "window" in out_of.values()  # ys.sum(0), c * 3.0
    assert "x" not in out_of and out_of["w"] == "context"


def test_builtin_picture_labels_stay_apart_as_dots_do():
    """Without Graphviz (a plain pip install) the built-in layout draws: two Flax-style
    parameter paths that end alike must not read the same (they did at 22 characters)."""
    from flax.core import freeze

    def model(params, x):
        h = x @ params["encoder"]["Dense_0"]["kernel"]
        return h @ params["decoder"]["Dense_0"]["kernel"]

    w = jnp.ones((3, 3))
    params = freeze({"encoder": {"Dense_0": {"kernel": w}}, "decoder": {"Dense_0": {"kernel": w}}})
    g = js.trace(model, params, jnp.ones(3))
    svg = ET.fromstring(g.draw(engine="builtin").svg)
    labels = [t.text for t in svg.iter(f"{SVG}text") if t.get("font-size") == "12"]
    kernels = [label for label in labels if "kernel" in label]
    assert len(kernels) == 2 and len(set(kernels)) == 2, kernels
    assert set(kernels) == set(dot_graph(g.to_dot())[0].values()) & set(kernels)
    widths = {float(r.get("width")) for r in svg.iter(f"{SVG}rect") if r.get("rx") == "6"}
    assert len(widths) == 1 and widths.pop() >= 150  # boxes widened to hold them

    # names alike but for a few characters deep inside: boxes widen only so far
    layers = {f"{k:03d}_layer" + "x" * 60: jnp.ones(3) for k in range(30)}
    g = js.trace(lambda p: sum(jnp.sin(v) for v in p.values()), layers)
    svg = ET.fromstring(g.draw(engine="builtin").svg)
    widths = {float(r.get("width")) for r in svg.iter(f"{SVG}rect") if r.get("rx") == "6"}
    assert max(widths) <= 7 * 40


def test_boxes_and_labels_alike_but_for_their_paths_read_apart():
    """Groups of one label under different parents (Haiku's block_0 in every block
    group) read by as much of their paths as tells them apart; a parameter path that a
    cut at the built-in layout's widest label leaves alike but for its middle (each
    block's BatchNorm statistics), by its tail."""

    def blocks(x):
        for b in range(2):
            with jax.named_scope(f"group_{b}"):
                for k in range(2):
                    with jax.named_scope(f"block_{k}"):
                        x = jnp.sin(x) * 2.0 + 1.0
        return x

    g = js.trace(blocks, jnp.ones(3))
    labels = sorted(dot_graph(g.to_dot(depth=2))[0].values())
    assert labels == [f"group_{b}/block_{k}" for b in range(2) for k in range(2)] + ["x#0"]

    stats = {f"ResNetBlock_{k}": {"BatchNorm_0": {"mean": jnp.ones(3)}} for k in range(3)}
    g = js.trace(
        lambda v, x: sum(x * s["BatchNorm_0"]["mean"] for s in v.values()), stats, jnp.ones(3)
    )
    svg = ET.fromstring(g.draw(engine="builtin").svg)
    means = [t.text for t in svg.iter(f"{SVG}text") if "mean" in (t.text or "")]
    assert len(means) == 3 and len(set(means)) == 3, means
