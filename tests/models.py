"""Models shared by several test files: the demo's, so the tests check what `make demo` shows."""

import importlib.util
import pathlib

import jax

_path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "issue_12782.py"
_spec = importlib.util.spec_from_file_location("issue_12782", _path)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

#: the issue-12782 MLP, f(x, params_1, params_2, params_3) with z1, z2, z3
mlp_12782 = demo.f
#: the thread's second case: chain(x0) = f3(f2(f1(x0))) with x1, x2, x3
f1, f2, f3, chain = demo.f1, demo.f2, demo.f3, demo.g


def mlp_12782_args(key=None):
    return demo.make_params(jax.random.key(0) if key is None else key)
