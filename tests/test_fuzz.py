"""Property-based correctness: random programs, random cuts, an independent oracle.

Each example builds a random program (elementwise ops, dot, reduce + broadcast,
reshape/transpose, concatenate, select, ``cond`` and ``fori_loop``), traces it, picks
random slice inputs and outputs among its vars, and checks the slice against an oracle
that shares none of the slicing code: it re-runs the graph's jaxpr equation by
equation, replacing each chosen input var ``v`` by ``stop_gradient(v) + eps_v``, and
differentiates the whole run with respect to the ``eps`` at zero. That is the
zero-tangent trick with every other value following the full computation, which is
exactly the slice's contract (context held fixed, inputs shielding each other).

The run is deterministic (``derandomize``); ``make fuzz`` runs many more examples
(``JS_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from fuzz_programs import EXAMPLES, SHAPE, close, make_program, programs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jax.extend.core import DropVar, Literal, check_jaxpr

import jaxsurgery as js
from jaxsurgery._compat import new_jaxpr  # a plain Jaxpr constructor


def oracle(graph, inputs, outputs, flat_args):
    """``eps -> outputs``: the graph's jaxpr re-run with ``v := stop_gradient(v) + eps_v``."""
    jaxpr, program = graph.jaxpr, graph._program
    perturbed = {program.vars[v.index]: k for k, v in enumerate(inputs)}

    def run(eps):
        env = {}

        def write(var, value):
            if var in perturbed:
                value = jax.lax.stop_gradient(value) + eps[perturbed[var]]
            env[var] = value

        for var, value in zip(jaxpr.invars, flat_args):
            write(var, value)
        for var, value in zip(jaxpr.constvars, program.consts):
            write(var, value)
        for eqn in jaxpr.eqns:
            operands = [a.val if isinstance(a, Literal) else env[a] for a in eqn.invars]
            for var, value in zip(eqn.outvars, eval_equation(eqn, operands)):
                if not isinstance(var, DropVar):
                    write(var, value)
        return tuple(env[program.vars[v.index]] for v in outputs)

    return run


def eval_equation(eqn, operands):
    """One equation evaluated on its operand values, through a one-equation jaxpr."""
    invars, values = [], {}
    for a, value in zip(eqn.invars, operands):
        if not isinstance(a, Literal) and a not in values:
            values[a] = value
            invars.append(a)
    outvars = [v for v in eqn.outvars if not isinstance(v, DropVar)]
    one = new_jaxpr([], invars, outvars, [eqn])
    outs = iter(jax.core.eval_jaxpr(one, [], *[values[v] for v in invars]))
    return [None if isinstance(v, DropVar) else next(outs) for v in eqn.outvars]


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(ops=programs, n_outputs=st.integers(1, 2), data=st.data())
def test_random_slices_match_the_oracle(ops, n_outputs, data):
    program = make_program(ops, n_outputs)
    rng = np.random.default_rng(len(ops))
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    y = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    g = js.trace(program, x, y)
    flat_args = [x, y]
    # the flat program computes what the function computes
    for ours, theirs in zip(g.as_function()(x, y), program(x, y)):
        close(ours, theirs)
    candidates = [v for v in g.vars if v.dtype == jnp.float32 and v.shape == SHAPE]
    n_in = data.draw(st.integers(1, min(2, len(candidates))))
    inputs = data.draw(
        st.lists(st.sampled_from(candidates), min_size=n_in, max_size=n_in, unique=True)
    )
    outputs = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=2, unique=True))
    s = g.slice(tuple(inputs), tuple(outputs), allow_unconnected=True)
    check_jaxpr(s.jaxpr)
    primals = s.input_values()
    run = oracle(g, inputs, outputs, flat_args)
    zeros = tuple(jnp.zeros(SHAPE) for _ in inputs)
    # values
    for ours, theirs in zip(s(*primals), run(zeros)):
        close(ours, theirs)
    # JVP
    tangents = tuple(jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in inputs)
    _, t_ours = jax.jvp(s, primals, tangents)
    _, t_oracle = jax.jvp(run, (zeros,), (tangents,))
    event("connected" if any(bool(jnp.any(t != 0)) for t in t_oracle) else "unconnected")
    for a, b in zip(t_ours, t_oracle):
        close(a, b)
    # VJP
    cotangents = tuple(jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in outputs)
    ct_ours = jax.vjp(s, *primals)[1](cotangents)
    ct_oracle = jax.vjp(run, zeros)[1](cotangents)[0]
    for a, b in zip(ct_ours, ct_oracle):
        close(a, b)
