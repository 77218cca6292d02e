"""The interactive view's data and page (the browser side: test_browser_view.py)."""

import json
import re

import jax.numpy as jnp
import pytest
from draw_models import BLOCKS, MODELS, flax_transformer
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js
from jaxsurgery._hierarchy import hierarchy
from jaxsurgery._interactive import NAMED_ELSEWHERE


def test_the_data_holds_every_var_once_in_its_group():
    g = flax_transformer()
    data = g.view().data()
    assert [v["index"] for v in data["vars"]] == [v.index for v in g.vars]
    groups = {row["key"]: row for row in data["groups"]}
    for group in hierarchy(g).walk():  # each var's group is the tree's
        for i in group.vars:
            assert data["vars"][i]["group"] == group.key
    # edges are the program's dataflow
    program = g._program
    want = {(i, o) for ins, outs in zip(program.eqn_in, program.eqn_out) for i in ins for o in outs}
    assert {tuple(e) for e in data["edges"]} == want
    # open at first: the root's one child (Transformer), so the blocks show as boxes
    assert [groups[k]["label"] for k in data["expanded"]] == ["Transformer"]
    blocks = [r["label"] for r in data["groups"] if r["parent"] == data["expanded"][0]]
    assert blocks[:BLOCKS] == [f"Block_{k}" for k in range(BLOCKS)]
    card = data["vars"][g["Transformer/Block_0/Dense_1"].index]
    assert card["scope"] == "Transformer/Block_0/Dense_1" and card["type"] == "f32[1,6,8]"
    assert card["source"].endswith(".py:" + card["source"].rsplit(":", 1)[1])


@pytest.mark.parametrize("name", ["penzai", "nnx", "equinox"])
def test_a_group_card_selector_selects_inside_its_group(name):
    """A call group's card offers ``g.select(["<path>", "<path>/**"])`` only where it
    selects values of the group, never a selector that fails: its result (which the
    glob alone missed) and the values named inside it, also those a library's scope
    names (an NNX attention's einsums, Equinox's ``eqx.nn.Linear#0``), where few."""
    g = MODELS[name]()
    groups = {group.key: group for group in hierarchy(g).walk()}
    calls = 0
    for row in g.view().data()["groups"]:
        selected = set()
        if row["glob"]:
            selected = {v.index for v in g.select(row["glob"])}  # no SelectionError
            group = groups[row["key"]]
            assert selected & set(group.all_vars()), row["glob"]
            if row["kind"] == "call" and group.path in g.names():
                calls += 1
                assert g[group.path].index in selected, row["glob"]
        if row["kind"] == "call":  # every value named inside: also by a library's scope
            named = [
                v
                for v in (g.vars[i] for i in groups[row["key"]].all_vars())
                if not v.name.startswith("%") and v.primitive not in ("input", "const")
            ]
            elsewhere = [v for v in named if not v.name.startswith(row["path"] + "/")]
            if len(elsewhere) <= NAMED_ELSEWHERE:
                missed = [v.name for v in named if v.index not in selected]
                assert not missed, (row["glob"], missed)
    assert calls


def test_the_page_is_offline_and_standalone(tmp_path):
    g = js.trace(mlp_12782, *mlp_12782_args())
    view = g.view(highlight=g.slice("z1", "z2"))
    path = tmp_path / "g.html"
    view.save(str(path))
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "dagre" in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)  # nothing fetched
    call = r"jaxsurgeryView\(document.getElementById\('jsv-[0-9a-f]+-\d+'\), (\{.*\})\);</script>"
    payload = json.loads(re.search(call, page, re.S)[1])
    assert payload == json.loads(json.dumps(view.packed()))  # the packed data, whole
    strings, columns = payload["strings"], payload["columns"]
    roles = {strings[n]: strings[r] for n, r in zip(columns["name"], columns["role"])}
    assert roles["z1"] == "input" and roles["z2"] == "output" and roles["x"] == "faded"
    assert "</script>" not in json.dumps(payload)  # names cannot close the script
    fragment = view._repr_html_()
    assert "<!DOCTYPE" not in fragment and fragment.count('class="jsv"') == 1
    ids = re.findall(r'class="jsv" id="(jsv-[0-9a-f]+-\d+)"', fragment + g.view()._repr_html_())
    assert len(set(ids)) == 2  # two views in one notebook do not share ids


def test_the_view_takes_what_draw_takes(tmp_path):
    g = js.trace(mlp_12782, *mlp_12782_args())
    roles = {v["name"]: v["role"] for v in g.view(highlight="z?").data()["vars"]}
    assert {n for n, r in roles.items() if r == "selected"} == {"z1", "z2", "z3"}
    with pytest.raises(js.SelectionError, match="'z9'"):
        g.view(highlight="z9")
    assert g.view(depth=2).data()["expanded"] == []  # no groups in a 16-var MLP's tree
    for bad in (0, -1, 1.5, "2", True):  # as g.draw says (0 drew the default before)
        for make in (g.draw, g.view):
            with pytest.raises(js.SelectionError, match=f"depth={bad!r} is not a depth"):
                make(depth=bad)
    import numpy as np

    assert g.view(depth=np.int64(2)).data() == g.view(depth=2).data()  # a NumPy int is one


def test_a_name_that_opens_an_html_comment_leaves_the_script_whole():
    key = "<!--<script>&"  # raw, it would make HTML read the view's </script> as text
    g = js.trace(lambda p: jnp.sin(p[key]) * 2, {key: jnp.ones(3)})
    page = g.view().html(standalone=True)
    call = r"jaxsurgeryView\(document.getElementById\('jsv-[0-9a-f]+-\d+'\), (\{.*?\})\);</script>"
    script = re.search(call, page, re.S)[1]
    assert not set("<>&") & set(script)  # the data as JSON escapes
    assert f"p[{key!r}]" in json.loads(script)["strings"]  # the name, whole


def test_html_ids_differ_between_processes():
    """Outputs of two kernels share one document (a notebook re-run in part after a
    restart, two notebooks in one JupyterLab page): their ids must differ, or a new
    view draws into an old output and a table's fold opens another table's rows."""
    import subprocess
    import sys

    code = (
        "import jax.numpy as jnp, jaxsurgery as js\n"
        "g = js.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))\n"
        "print(g.view()._repr_html_()); print(g._repr_html_())\n"
    )
    ids = re.compile(r'\bid="((?:jsv-|js)[0-9a-f]+-\d+)"')
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    g = js.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))
    here = set(ids.findall(g.view()._repr_html_() + g._repr_html_()))
    there = set(ids.findall(other.stdout))
    assert len(here) == 2 and len(there) == 2 and not here & there
