"""The random-program generator shared by the fuzz tests (``test_fuzz``, ``test_fuzz_whole``).

A program is a list of ``(op, i, j)``: each op reads two earlier values (indices taken
modulo the number of values so far; values 0 and 1 are the arguments ``x`` and ``y``)
and appends one new ``SHAPE`` float32 value. Ops include ``cond`` (whose predicate
depends on the data) and ``fori_loop``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

SHAPE = (3, 4)

#: how many random programs ``test_fuzz`` draws (the other fuzz tests scale it): 120 in
#: ``make test``, which keeps CI's two runs under its time budget (200 took it past 15
#: minutes, with the set-up); ``make fuzz`` runs 5000
EXAMPLES = int(os.environ.get("JS_FUZZ_EXAMPLES", "120"))

OPS = [
    "sin",
    "tanh",
    "square",
    "add",
    "mul",
    "sub",
    "max",
    "dot",
    "reduce",
    "reshape",
    "concat",
    "select",
    "cond",
    "fori",
]


def apply_op(op: str, a, b):
    if op == "sin":
        return jnp.sin(a)
    if op == "tanh":
        return jnp.tanh(a * 0.7)
    if op == "square":
        return a * a * 0.3
    if op == "add":
        return a + b
    if op == "mul":
        return a * b
    if op == "sub":
        return a - b * 0.5
    if op == "max":
        return jnp.maximum(a, b)
    if op == "dot":
        return a @ (b.T @ b) * 0.2
    if op == "reduce":
        return jnp.broadcast_to(a.sum(axis=0, keepdims=True), SHAPE) * 0.3 + b
    if op == "reshape":
        return a.reshape(12)[::-1].reshape(4, 3).T + b
    if op == "concat":
        return jnp.concatenate([a[:, :2], b[:, 2:]], axis=1)
    if op == "select":
        return jnp.where(a > b, a, b * 0.5)
    if op == "cond":
        return jax.lax.cond(a.sum() > b.sum(), lambda t: jnp.sin(t), lambda t: t * 0.5, a + b)
    if op == "fori":
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c) * 0.9 + b * 0.1, a)
    raise ValueError(op)


def make_program(ops: list[tuple[str, int, int]], n_outputs: int):
    def program(x, y):
        values = [x, y]
        for op, i, j in ops:
            values.append(apply_op(op, values[i % len(values)], values[j % len(values)]))
        return tuple(values[-n_outputs:])

    return program


def run_values(ops, x, y, *, tag: bool = False, edit=None) -> list:
    """Every value of the program ``ops`` on ``(x, y)``, in order (``x``, ``y`` first).

    ``tag=True`` names value ``k`` ``"v<k>"`` with ``js.tag`` (for k >= 2); ``edit(k, value)``
    replaces each value as it is made (``x`` and ``y`` included): the hand-written
    substitution and perturbation references use it.
    """
    import jaxsurgery as js

    def made(k, value):
        if tag and k >= 2:
            value = js.tag(value, f"v{k}")
        return value if edit is None else edit(k, value)

    values = [made(0, x), made(1, y)]
    for op, i, j in ops:
        value = apply_op(op, values[i % len(values)], values[j % len(values)])
        values.append(made(len(values), value))
    return values


def make_named_program(ops: list[tuple[str, int, int]], n_outputs: int):
    """:func:`make_program` with its values tagged ``"v2"``, ``"v3"``, ..."""

    def program(x, y):
        return tuple(run_values(ops, x, y, tag=True)[-n_outputs:])

    return program


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


programs = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=7
)
