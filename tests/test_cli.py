"""The command line (``python -m jaxsurgery show``): argument specs, real arguments from a
function, a highlighted slice, one-line errors."""

from __future__ import annotations

import doctest
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from draw_models import picture
from models import mlp_12782, mlp_12782_args

import jaxsurgery as js
import jaxsurgery.__main__ as cli
from jaxsurgery.__main__ import UsageError, main, parse_arg

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples" / "issue_12782.py")
MLP_ARGS = ["--arg", "f32[3]", "--arg", "(f32[4,3],f32[4])"]
MLP_ARGS += ["--arg", "(f32[5,4],f32[5])", "--arg", "(f32[2,5],f32[2])"]
S = jax.ShapeDtypeStruct


def test_docstring_examples_run():
    assert doctest.testmod(cli).failed == 0


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("f32[3]", S((3,), jnp.float32)),
        ("float32[3]", S((3,), jnp.float32)),
        ("jnp.float32[4, 3]", S((4, 3), jnp.float32)),
        ("int32[]", S((), jnp.int32)),
        ("np.uint8[2,]", S((2,), jnp.uint8)),
        ("bfloat16[2,2]", S((2, 2), jnp.bfloat16)),
        ("bool", S((), jnp.bool_)),
        (
            "{'params': {'w': f32[4,3], 'b': f32[4]}}",
            {"params": {"w": S((4, 3), jnp.float32), "b": S((4,), jnp.float32)}},
        ),
        (
            "[(f32[2], (i32[], bf16[1])), None, 3]",
            [(S((2,), jnp.float32), (S((), jnp.int32), S((1,), jnp.bfloat16))), None, 3],
        ),
        # only a dtype's empty brackets are a scalar: an empty list stays one, and a
        # string keeps its brackets
        ("[]", []),
        ("{'a': [], 'k[]': i32[ ]}", {"a": [], "k[]": S((), jnp.int32)}),
        ("('ab[]', f32[])", ("ab[]", S((), jnp.float32))),
        # numbers as they are, negative ones too (a unary minus in Python's grammar)
        ("-0.5", -0.5),
        ("[-1, +2, -1j]", [-1, 2, -1j]),
    ],
)
def test_argument_specs(spec, expected):
    assert parse_arg(spec) == expected


def test_negative_numbers_follow_arg_as_they_are():
    """argparse reads ``-1e-3``, ``-1j``, ``-inf`` after --arg as options of their own."""
    from jaxsurgery.__main__ import _attached

    argv = ["show", "m.py:f", "--arg", "f32[3]", "--arg", "-1e-3", "--arg", "-1j", "--dot", "x"]
    assert _attached(argv) == [
        *["show", "m.py:f", "--arg", "f32[3]", "--arg=-1e-3", "--arg=-1j", "--dot", "x"]
    ]
    assert parse_arg("-1e-3") == -1e-3 and parse_arg("-1j") == -1j


def test_a_64_bit_dtype_without_x64_says_how_to_get_it():
    """Without JAX_ENABLE_X64 JAX would trace f64[3] as float32, silently."""
    with pytest.raises(UsageError, match=r"f64\[3\]'.*\(JAX would trace it as float32\).*X64=1"):
        parse_arg("f64[3]")
    with pytest.raises(UsageError, match="i64 needs JAX's 64-bit mode"):
        parse_arg("i64")


def test_an_unquoted_dict_key_in_a_spec_says_to_quote_it():
    with pytest.raises(UsageError, match=r"a dict key must be quoted: 'w', not w; write"):
        parse_arg("{w: f32[3,2]}")


def test_show_prints_the_table_and_writes_dot(capsys, tmp_path):
    assert main(["show", f"{EXAMPLE}:f", *MLP_ARGS, "--dot", str(tmp_path / "g.dot")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == str(js.trace(mlp_12782, *mlp_12782_args())).strip()
    assert (tmp_path / "g.dot").read_text().startswith("digraph")


def test_slice_is_highlighted_as_the_api_does(capsys, tmp_path):
    dot, svg = tmp_path / "g.dot", tmp_path / "g.svg"
    argv = ["show", f"{EXAMPLE}:f", *MLP_ARGS, "--slice", "z1", "z2"]
    assert main([*argv, "--dot", str(dot), "--svg", str(svg)]) == 0
    g = js.trace(mlp_12782, *mlp_12782_args())
    s = g.slice("z1", "z2")
    assert repr(s) in capsys.readouterr().out
    assert dot.read_text() == g.to_dot(highlight=s)
    assert dot.read_text() != g.to_dot()
    assert picture(svg.read_text()) == picture(g.draw(highlight=s).svg)
    # an output upstream of the input: the fix the error gives is the command line's
    assert main(["show", f"{EXAMPLE}:f", *MLP_ARGS, "--slice", "z2", "z1"]) != 0
    assert "pass --allow-unconnected to hold it constant" in capsys.readouterr().err
    assert (
        main(["show", f"{EXAMPLE}:f", *MLP_ARGS, "--slice", "z2", "z1", "--allow-unconnected"]) == 0
    )
    assert repr(g.slice("z2", "z1", allow_unconnected=True)) in capsys.readouterr().out
    # a name it does not have: where the command line lists them (it has no g)
    assert main(["show", f"{EXAMPLE}:f", *MLP_ARGS, "--slice", "z1", "zz"]) != 0
    said = capsys.readouterr().err
    assert "no var named 'zz'" in said and "the table, without --slice, lists all" in said


FLAX_MODEL = """
import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


model = MLP()


def forward(params, x):
    return model.apply({"params": params}, x)


def example():
    x = jnp.ones(3)
    return model.init(jax.random.key(0), x)["params"], x
"""


def test_flax_model_from_real_and_spelled_arguments(capsys, tmp_path):
    path = tmp_path / "flax_model.py"
    path.write_text(FLAX_MODEL)
    assert main(["show", f"{path}:forward", "--args-from", ":example"]) == 0
    real = capsys.readouterr().out
    # Dense(2) is made first: Dense_0 (4 -> 2), then Dense(4): Dense_1 (3 -> 4)
    spec = "{'Dense_0': {'kernel': f32[4,2], 'bias': bfloat16[2]}, "
    spec += "'Dense_1': {'kernel': f32[3,4], 'bias': f32[4]}}"
    assert main(["show", f"{path}:forward", "--arg", spec, "--arg", "float32[3]"]) == 0
    spelled = capsys.readouterr().out
    for name in ("params['Dense_0']['kernel']", "params['Dense_1']['bias']", "MLP/Dense_0"):
        assert name in real and name in spelled
    assert "bf16[2]" in spelled and "bf16[2]" not in real  # the bias dtype was read
    same = spec.replace("bfloat16", "f32")  # the shapes and dtypes of the real arguments
    assert main(["show", f"{path}:forward", "--arg", same, "--arg", "jnp.float32[3]"]) == 0
    assert capsys.readouterr().out == real
    # the attribute path of a bound method is a target too
    argv = ["show", f"{path}:model.apply", "--arg", "{'params': " + spec + "}", "--arg", "f32[3]"]
    assert main(argv) == 0
    assert "variables['params']['Dense_1']['kernel']" in capsys.readouterr().out


def one_error(capsys, argv, code=2):
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_errors_are_one_line(capsys, tmp_path):
    err = one_error(capsys, ["show", f"{EXAMPLE}:ff", *MLP_ARGS])
    assert "has no 'ff'; did you mean 'f'?" in err
    err = one_error(capsys, ["show", f"{EXAMPLE}:f", *MLP_ARGS, "--svg", "/no/such/dir/f.svg"])
    assert "cannot write --svg '/no/such/dir/f.svg'" in err
    err = one_error(capsys, ["show", f"{EXAMPLE}:f", *MLP_ARGS, "--slice", "z9", "z2"])
    g = js.trace(mlp_12782, *mlp_12782_args())
    with pytest.raises(js.SelectionError) as raised:
        g.slice("z9", "z2")
    said = str(raised.value).splitlines()[0]  # where the command line lists the names
    assert said.replace("g.names() lists all", "the table, without --slice, lists all") in err
    err = one_error(capsys, ["show", f"{EXAMPLE}:f", "--arg", "flot32[3]"])
    assert "did you mean 'float32'?" in err
    err = one_error(capsys, ["show", f"{EXAMPLE}:f", "--args-from", ":nothing"])
    assert "has no 'nothing'" in err
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_module_anywhere\n")
    err = one_error(capsys, ["show", f"{bad}:f"])
    assert "ModuleNotFoundError" in err


def test_a_bad_argument_is_one_line_without_a_traceback():
    argv = [sys.executable, "-m", "jaxsurgery", "show", "examples/issue_12782.py:f"]
    result = subprocess.run(
        [*argv, "--arg", "f32[3x]", "--svg", "/no/such/dir/f.svg"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "--svg" in result.stderr
    result = subprocess.run([*argv, "--arg", "f32[3x]"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "bad --arg 'f32[3x]'" in result.stderr


def test_output_paths_an_args_from_failure_and_a_script_reading_argv(capsys, tmp_path):
    """A folder for --dot, an empty --svg, an --args-from function that raises: each a
    usage error saying so (a folder read 'no folder /tmp'; '' wrote nothing, silently;
    the raise was a crash, exit 1). A target file parsing its own command line at import
    sees its own path, not jaxsurgery's options."""
    err = one_error(capsys, ["show", f"{EXAMPLE}:f", *MLP_ARGS, "--dot", str(tmp_path)])
    assert f"cannot write --dot {str(tmp_path)!r}: it is a folder" in err
    err = one_error(capsys, ["show", f"{EXAMPLE}:f", *MLP_ARGS, "--svg", ""])
    assert "--svg needs a file name" in err
    script = tmp_path / "model.py"
    script.write_text(
        "import argparse, sys\n"
        "import jax.numpy as jnp\n"
        "OPTIONS = argparse.ArgumentParser().parse_args()\n"
        "ARGV = list(sys.argv)\n"
        "def f(x):\n"
        "    h = jnp.sin(x)\n"
        "    return h\n"
        "def boom():\n"
        "    raise RuntimeError('no data here')\n"
    )
    assert main(["show", f"{script}:f", "--arg", "f32[2]"]) == 0
    assert " h " in capsys.readouterr().out
    err = one_error(capsys, ["show", f"{script}:f", "--args-from", ":boom"])
    assert "--args-from :boom failed: RuntimeError: no data here" in err


def test_an_args_from_list_and_an_option_without_its_slice_say_so(capsys, tmp_path):
    """A list from --args-from is one argument (said only as the function's missing
    argument); --allow-unconnected without --slice was ignored."""
    script = tmp_path / "two.py"
    script.write_text(
        "import jax.numpy as jnp\n"
        "def f(x, p):\n"
        "    h = jnp.sin(x) * p\n"
        "    return h\n"
        "def args():\n"
        "    return [jnp.ones(2), jnp.ones(2)]\n"
        "def g(xs):\n"
        "    return js.tag(xs[0] * 2, 'h#1')\n"
        "import jaxsurgery as js\n"
    )
    err = one_error(capsys, ["show", f"{script}:f", "--args-from", ":args"])
    assert "(--args-from returned a list, which is one argument: return a tuple" in err
    err = one_error(capsys, ["show", f"{script}:g", "--args-from", ":args"])  # a list it takes
    assert "js.tag name 'h#1' holds '#'" in err and "--args-from returned" not in err
    err = one_error(capsys, ["show", f"{EXAMPLE}:f", *MLP_ARGS, "--allow-unconnected"])
    assert "--allow-unconnected is an option of --slice IN OUT" in err


def test_a_file_importing_a_module_beside_it_loads_from_anywhere(capsys, tmp_path, monkeypatch):
    """The target file runs as ``python path`` runs it: its folder is on the import path
    (a model file importing its layers from the next file failed unless run there)."""
    (tmp_path / "layers.py").write_text(
        "import jax.numpy as jnp\n\ndef layer(x):\n    h = jnp.tanh(x)\n    return h * 2\n"
    )
    (tmp_path / "entry.py").write_text(
        "from layers import layer\n\ndef f(x):\n    y = layer(x)\n    return y.sum()\n"
    )
    monkeypatch.chdir(os.path.dirname(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["show", f"{tmp_path / 'entry.py'}:f", "--arg", "f32[3]"]) == 0
    assert "layer/h" in capsys.readouterr().out
