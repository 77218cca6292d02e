"""Views: text and HTML tables, DOT and SVG pictures (the command line: test_cli.py)."""

import html.parser
import pathlib
import re
import sys
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import nbformat
import pytest
from models import mlp_12782, mlp_12782_args
from nbclient import NotebookClient

import jaxsurgery as js

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def g():
    return js.trace(mlp_12782, *mlp_12782_args())


class _Cells(html.parser.HTMLParser):
    """The rows of an HTML table as lists of cell texts (header row first)."""

    def __init__(self):
        super().__init__()
        self.rows, self.tables, self.inputs, self._cell = [], 0, 0, None

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        self.inputs += tag == "input" and ("type", "search") in attrs
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None


def cells(markup):
    parser = _Cells()
    parser.feed(markup)
    return parser


def test_html_tables(g):
    table = cells(g._repr_html_())
    assert table.tables == 1 and table.inputs == 1
    header, *rows = table.rows
    assert header[:2] == ["index", "name"] and len(rows) == len(g.vars)
    assert [r[1] for r in rows] == [v.name for v in g.vars]
    assert {"params_2[0]", "z1", "z3"} <= {r[1] for r in rows}
    assert cells(g.select("z?")._repr_html_()).rows[1:] == [
        r for r in rows if r[1] in {"z1", "z2", "z3"}
    ]


def test_slice_table_has_roles(g):
    s = g.slice("z1", "z2")
    header, *rows = cells(s._repr_html_()).rows
    assert header[:3] == ["index", "role", "name"]
    roles = {r[2]: r[1] for r in rows}
    expected = {"z1": "input", "z2": "output", "params_2[0]": "context", "params_2[1]": "context"}
    window = {n for n, r in roles.items() if r == "window"}
    assert {n: r for n, r in roles.items() if r != "window"} == expected
    # z2 = tanh(params_2[0] @ z1 + params_2[1]): the dot and the add make the window
    assert sorted(g[n].primitive for n in window) == ["add", "dot_general"]
    assert len(window) == len(s.jaxpr.eqns) - 1
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
    both = cells(g.slice("z1", ["z1", "z2"])._repr_html_()).rows
    assert {r[2]: r[1] for r in both[1:]}["z1"] == "input, output"


def test_long_names_are_cut_between_keys_so_that_rows_and_boxes_stay_apart():
    """Deep parameter names were cut from the right in ``print(g)`` (the leaf lost: six
    rows alike) and from the left in pictures (the block lost: boxes alike)."""

    def f(params, x):
        for k in range(3):
            p = params[f"block_{k}"]["attention"]["query"]
            x = jnp.tanh(x @ p["kernel"] + p["bias"])
        return x

    leaf = {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}
    params = {f"block_{k}": {"attention": {"query": leaf}} for k in range(3)}
    g = js.trace(f, params, jnp.ones(4))
    names = [line.split()[1] for line in repr(g).splitlines()[2:8]]
    assert len(set(names)) == 6 and names[0] == "params['block_0']…['query']['bias']"
    dot = g.to_dot(depth=1)
    labels = [label for k in range(3) for label in (f"params['block_{k}']…['bias']",)]
    assert all(label in dot for label in labels), dot
    boxes = [b for b in re.findall(r'label="([^"\\]*)', dot) if "params" in b or "…" in b]
    assert len(boxes) == len(set(boxes)) == 6, boxes  # the kernels apart too


def test_long_html_table_is_one_filterable_table():
    def deep(x):
        for _ in range(500):
            x = jnp.sin(x)
        return x

    g = js.trace(deep, jnp.ones(2))
    markup = g._repr_html_()
    table = cells(markup)
    assert table.tables == 1 and table.inputs == 1 and "<summary" not in markup
    header, *rows = table.rows
    assert len(rows) == len(g.vars) + 1  # every var, and the fold row
    assert "461 more rows" in rows[30][0] and f">{len(g.vars)} rows<" in markup
    assert all(len(r) == len(header) for r in rows if r is not rows[30])
    assert "#fff" not in markup.lower() and "#f6f8fa" not in markup  # no light-theme colours

    def deeper(x):
        for _ in range(3000):
            x = jnp.sin(x)
        return x

    big = js.trace(deeper, jnp.ones(2))._repr_html_()
    assert big.count("<tr>") < 50 and "select them with g.select" in big


def test_graph_title_is_short_for_flax():
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Dense(3)(x))

    model = CNN()
    variables = model.init(jax.random.key(0), jnp.ones(2))
    g = js.trace(model.apply, variables, jnp.ones(2))
    title = str(g).splitlines()[0]
    assert (
        title == f"Graph CNN.apply: {len(g.vars)} vars, {len(g.jaxpr.eqns)} equations, outputs CNN"
    )
    assert f"<b>{title}</b>" in g._repr_html_()


def test_sources_name_notebook_cells_as_ipython_does():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import jax.numpy as jnp, jaxsurgery as js"),
        nbformat.v4.new_code_cell("def f(x):\n    h = jnp.sin(x)\n    return h * 2\n"),
        nbformat.v4.new_code_cell("g = js.trace(f, jnp.ones(2))\nprint(g['h'].source)\nprint(g)"),
    ]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    out = nb.cells[2].outputs[0]["text"]
    assert "ipykernel_" in out.splitlines()[0]  # the var's source is the cell's temp file
    table = out.split("\n", 1)[1]
    assert "Cell In[2], line 2" in table and "Cell In[2], line 3" in table
    assert "ipykernel_" not in table
    assert js._table.source_label("/tmp/ipykernel_9/123.py:4") == "cell, line 4"  # other kernel
    assert js._table.source_label("/home/me/model.py:12") == "model.py:12"


def test_dot_marks_the_slice(g):
    s = g.slice("z1", "z2")
    dot = g.to_dot(highlight=s)
    lines = {ln.split()[0]: ln for ln in dot.splitlines() if "[label" in ln}
    assert "#1e8e3e" in lines[f"v{g['z1'].index}"]  # input: green
    assert "#e8710a" in lines[f"v{g['z2'].index}"]  # output: orange
    assert "dashed" in lines[f"v{g['params_2[0]'].index}"]  # context
    assert dot.count("->") >= len(g.jaxpr.eqns)


def test_svg_is_well_formed_and_large_graphs_collapse_by_scope():
    svg = js.trace(mlp_12782, *mlp_12782_args()).draw().svg
    root = ET.fromstring(svg)
    assert (
        root.tag.endswith("svg") and len(root.findall(".//{http://www.w3.org/2000/svg}rect")) == 16
    )

    @jax.jit
    def block(h):
        return jnp.tanh(h) * 2.0 + 1.0

    def many(x):
        for _ in range(80):
            x = block(x)
        return x

    g = js.trace(many, jnp.ones(2))
    assert len(g.vars) > 150
    collapsed = ET.fromstring(g.draw().svg)
    # x + 80 calls: past 40 boxes, runs of 3 consecutive calls fold into one segment
    assert len(collapsed.findall(".//{http://www.w3.org/2000/svg}rect")) == 27
    texts = [t.text for t in collapsed.iter("{http://www.w3.org/2000/svg}text")]
    assert "x#0 … block#1" in texts and "block#77 … block#79" in texts


def test_segments_of_one_functions_calls_read_apart():
    """Calls of a library's jit that no frame numbers (diffrax's prevbefore) folded into
    segments each labelled "softplus …": 20 boxes alike."""
    step = jax.jit(jax.nn.softplus)

    def chain(x):
        for _ in range(100):
            x = jax.tree_util.tree_map(step, x)  # called by JAX's code: no frame of ours
        return x

    labels = re.findall(r'label="([^"\\]*)', js.trace(chain, jnp.ones(3)).to_dot())
    segments = [label for label in labels if label.startswith("softplus")]
    assert len(segments) > 20 and len(set(segments)) == len(segments), segments
    assert "softplus … x#100" in segments  # where the last one ends


def test_drawings_in_one_page_keep_their_own_ids_and_say_what_they_are():
    """Every drawing's arrowhead was id="arrow": in a notebook page, all but the first
    pointed at the first one's."""
    g = js.trace(mlp_12782, *mlp_12782_args())
    drawings = [g.draw(engine="builtin"), g.draw(highlight=g.slice("z1", "z2"), engine="builtin")]
    ids = [re.findall(r' id="([^"]+)"', d.svg) for d in drawings]
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    for d, (own,) in zip(drawings, ids):
        assert d.svg.count(f"url(#{own})") == d.svg.count("marker-end=")
    assert re.fullmatch(r"<Drawing: SVG, \d+ x \d+ px, \d+ KB; .*>", repr(drawings[0]))
    with pytest.raises(js.SelectionError, match="expand must be True or False, got 'yes'"):
        g.draw(expand="yes")


def test_readme_picture_is_what_the_code_draws():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from readme_picture import PICTURE, picture
    finally:
        sys.path.pop(0)
    assert PICTURE.read_text() == picture()
    assert "docs/issue_12782_slice.svg" in (ROOT / "README.md").read_text()


def test_a_collapsed_picture_groups_conds_and_while_loops():
    """A cond's taken branch and an unrolled while_loop are regions of the index: the
    collapsed picture shows each as a group, named after the branch function or the
    primitive (it raised a KeyError asking them for a called function's name)."""

    def f(p, y):
        def big(y):
            h = jnp.sin(y)
            return h * 2

        z = jax.lax.cond(p > 0, big, jnp.cos, y)
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.5), (0, z))[1]

    g = js.trace(f, 1.0, 0.5)
    dot = g.to_dot(depth=1)  # the branch is grouped under its function's name
    assert 'label="big\\n' in dot and 'label="while\\n' in dot
    ET.fromstring(g.draw(depth=1).svg)
