"""Property-based whole-function semantics (SPEC §5): random programs at NEW arguments.

The programs are ``test_fuzz``'s (:mod:`fuzz_programs`: elementwise ops, dot, reduce,
reshape, concatenate, select, ``cond`` and ``fori_loop``), each with at least one
``cond``, their values tagged ``"v2"``, ``"v3"``, ... Each example traces one at some
arguments and calls what jaxsurgery returns at other random arguments, chosen so that a
``cond`` takes the other branch (the ``event`` statistics count how many do). The
references are the program itself, run by hand in plain JAX (eagerly, ``cond`` as a
Python ``if``):

* ``g.as_function()(*new)`` equals ``program(*new)`` (also under ``jax.jit``);
* ``g.grads_fn(out, wrt)(*new)`` equals ``jax.grad`` of the program with a perturbation
  ``eps_k`` added to each chosen value ``k`` as it is made, at ``eps = 0``;
* ``s.bind(*new)(*z)`` for a slice between top-level values (never inside a ``cond``
  branch or a loop body) equals the program with each input value ``k`` *replaced* by
  ``z_k`` as it is made: the slice's contract (context from the new arguments, inputs
  shielding each other, conds in the window deciding again), with its JVP and VJP.

The run is deterministic (``derandomize``); ``JS_FUZZ_EXAMPLES`` scales it as in
``test_fuzz`` (here 4/25 of it, at least 20: 20 by default, 800 for ``JS_FUZZ_EXAMPLES=5000``;
each example compiles). ``JS_FUZZ_SHRINK=1`` shrinks a failing example (minutes).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from fuzz_programs import EXAMPLES as FUZZ_EXAMPLES
from fuzz_programs import OPS, SHAPE, make_named_program, run_values
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import jaxsurgery as js

EXAMPLES = max(20, FUZZ_EXAMPLES * 4 // 25)
# shrinking a failure here takes minutes (every step compiles); JS_FUZZ_SHRINK=1 turns it on
PHASES = [Phase.explicit, Phase.generate] + (
    [Phase.shrink] if os.environ.get("JS_FUZZ_SHRINK") else []
)


def names(ops):
    return ["x", "y", *(f"v{k}" for k in range(2, 2 + len(ops)))]


def random_args(seed):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 2.0)
    return tuple(jnp.asarray(rng.normal(size=SHAPE) * scale, jnp.float32) for _ in range(2))


def predicates(ops, x, y):
    """The predicate of each ``cond`` of the program at ``(x, y)``, by hand."""
    values = run_values(ops, x, y)
    preds = [jnp.array(False)]
    for k, (op, i, j) in enumerate(ops):
        if op == "cond":
            preds.append(values[i % (k + 2)].sum() > values[j % (k + 2)].sum())
    return jnp.stack(preds)


def new_arguments(ops, traced, seed, candidates=8):
    """Of ``candidates`` random argument draws, the one whose conds differ most from
    ``traced``'s, and how many differ."""
    draws = [random_args(seed + c) for c in range(candidates)]
    with jax.disable_jit():  # plain Python: each cond is an ``if``, no compiling
        before = np.asarray(predicates(ops, *traced))
        flips = [int((np.asarray(predicates(ops, *d)) != before).sum()) for d in draws]
    best = int(np.argmax(flips))
    return draws[best], flips[best]


def perturbed_loss(ops, out, wrt, args):
    """``eps -> sum(value out)`` with ``eps[k]`` added to value ``wrt[k]`` as it is made."""

    def loss(eps):
        where = dict(zip(wrt, eps))
        values = run_values(ops, *args, edit=lambda k, v: v + where[k] if k in where else v)
        return jnp.sum(values[out])

    return loss


def substituted(ops, inputs, outputs, args):
    """``(*z) -> outputs``: the program with value ``inputs[k]`` replaced by ``z[k]``."""

    def run(*z):
        where = dict(zip(inputs, z))
        values = run_values(ops, *args, edit=lambda k, v: where.get(k, v))
        return tuple(values[k] for k in outputs)

    return run


def check(what, ours, theirs):
    la, ta = jax.tree_util.tree_flatten(ours)
    lb, tb = jax.tree_util.tree_flatten(theirs)
    assert ta == tb, f"{what}: structures differ: {ta} vs {tb}"
    for a, b in zip(la, lb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5, err_msg=what)


def _with_a_cond(parts):
    before, (_, i, j), after = parts
    n = 2 + len(before)  # values the cond can read
    if i % n == j % n:  # cond(v > v) never changes branch
        j = i + 1
    return [*before, ("cond", i, j), *after]


# test_fuzz's programs, each with at least one cond comparing two different values (most
# examples then have a cond that changes branch at the new arguments)
_op = st.tuples(st.sampled_from(OPS), st.integers(0, 30), st.integers(0, 30))
whole_programs = st.tuples(
    st.lists(_op, min_size=0, max_size=5), _op, st.lists(_op, min_size=0, max_size=2)
).map(_with_a_cond)


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    phases=PHASES,
)
@given(ops=whole_programs, n_outputs=st.integers(1, 2), data=st.data())
def test_random_programs_at_new_arguments(ops, n_outputs, data):
    program = make_named_program(ops, n_outputs)
    traced = random_args(len(ops))
    g = js.trace(program, *traced)
    new, flipped = new_arguments(ops, traced, data.draw(st.integers(100, 10_000), label="seed"))
    event(f"conds taking another branch: {min(flipped, 2)}{'+' if flipped > 2 else ''}")
    vars_ = names(ops)

    def pick(lo, hi, label):
        indices = st.integers(0, len(vars_) - 1)
        return data.draw(st.lists(indices, min_size=lo, max_size=hi, unique=True), label=label)

    out = data.draw(st.integers(2, len(vars_) - 1), label="grads out")
    wrt = pick(1, 3, "grads wrt")
    inputs, outputs = pick(1, 2, "slice inputs"), pick(1, 2, "slice outputs")
    rng = np.random.default_rng(len(ops) + 7)
    noise = lambda: jnp.asarray(rng.normal(size=SHAPE), jnp.float32)  # noqa: E731
    z_noise = tuple(0.3 * noise() for _ in inputs)
    tangents = tuple(noise() for _ in inputs)
    cotangents = tuple(noise() for _ in outputs)

    def reference(new, z_noise, tangents, cotangents):  # plain JAX only
        at_new = run_values(ops, *new)
        z = tuple(at_new[k] + dz for k, dz in zip(inputs, z_noise))  # off the new run
        zeros = [jnp.zeros(SHAPE, jnp.float32) for _ in wrt]
        grads = jax.grad(perturbed_loss(ops, out, wrt, new))(zeros)
        sliced = substituted(ops, inputs, outputs, new)
        values, jvp = jax.jvp(sliced, z, tangents)
        vjp = jax.vjp(sliced, *z)[1](cotangents)
        return z, (
            tuple(at_new[-n_outputs:]),
            dict(zip([vars_[k] for k in wrt], grads)),
            values,
            jvp,
            vjp,
        )

    whole = g.as_function()
    grads_fn = g.grads_fn(vars_[out], [vars_[k] for k in wrt])
    s = g.slice(
        tuple(vars_[k] for k in inputs), tuple(vars_[k] for k in outputs), allow_unconnected=True
    )

    @jax.jit
    def ours(new, z, tangents, cotangents):
        bound = s.bind(*new)
        values, jvp = jax.jvp(bound, z, tangents)
        vjp = jax.vjp(bound, *z)[1](cotangents)
        return whole(*new), grads_fn(*new), values, jvp, vjp

    with jax.disable_jit():  # eagerly, op by op: a cond is a Python ``if``, a loop a loop
        z, expected = reference(new, z_noise, tangents, cotangents)
    # eagerly (one of the three per example: each compiles its conds and loops anew)
    eager = data.draw(st.sampled_from(["as_function", "grads_fn", "bound slice"]), label="eager")
    if eager == "as_function":
        check("as_function", whole(*new), expected[0])
    elif eager == "grads_fn":
        check("grads_fn", grads_fn(*new), expected[1])
    else:
        check("bound slice", s.bind(*new)(*z), expected[2])
    # under jax.jit, with JVP and VJP of the bound slice
    what = ["jit(as_function)", "jit(grads_fn)", "jit(bound slice)", "jvp", "vjp"]
    for label, a, b in zip(what, ours(new, z, tangents, cotangents), expected):
        check(label, a, b)
