"""Views: text and HTML tables, DOT and SVG pictures, the command line."""

import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import pytest
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js
from jaxsurgery.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def g():
    return js.trace(mlp_12782, *mlp_12782_args())


def test_html_tables(g):
    html = g._repr_html_()
    assert html.count("<tr>") == len(g.vars) + 1
    assert "params_2[0]" in html and "dot_general" in html
    s = g.slice("z1", "z2")
    assert "context: params_2[0], params_2[1]" in s._repr_html_()
    assert g.select("z?")._repr_html_().count("<tr>") == 4


def test_long_html_table_is_collapsed_and_filterable():
    def deep(x):
        for _ in range(500):
            x = jnp.sin(x)
        return x

    g = js.trace(deep, jnp.ones(2))
    html = g._repr_html_()
    assert "<details>" in html and "oninput" in html and "461 more rows" in html

    def deeper(x):
        for _ in range(3000):
            x = jnp.sin(x)
        return x

    big = js.trace(deeper, jnp.ones(2))._repr_html_()
    assert big.count("<tr>") < 50 and "select them with g.select" in big


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
    assert len(collapsed.findall(".//{http://www.w3.org/2000/svg}rect")) == 81  # x + 80 calls


def test_readme_picture_is_what_the_code_draws():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from readme_picture import PICTURE, picture
    finally:
        sys.path.pop(0)
    assert PICTURE.read_text() == picture()
    assert "docs/issue_12782_slice.svg" in (ROOT / "README.md").read_text()


def test_command_line_show(capsys, tmp_path):
    args = ["--arg", "f32[3]", "--arg", "(f32[4,3],f32[4])", "--arg", "(f32[5,4],f32[5])"]
    args += ["--arg", "(f32[2,5],f32[2])", "--dot", str(tmp_path / "g.dot")]
    assert main(["show", str(ROOT / "examples" / "issue_12782.py:f"), *args]) == 0
    out = capsys.readouterr().out
    assert "z1" in out and "params_3[1]" in out
    assert (tmp_path / "g.dot").read_text().startswith("digraph")


def test_command_line_bad_argument_is_one_line():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxsurgery",
            "show",
            "examples/issue_12782.py:f",
            "--arg",
            "f32[3x]",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bad --arg 'f32[3x]'" in result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "jaxsurgery", "show", "examples/nope.py:f"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
