"""Running equations on concrete values, op by op, each with a compiled function.

JAX dispatches a bound primitive (``jax.core.eval_jaxpr`` on arrays) through its
Python path, several times an eager ``jnp`` call: on a model of many small ops an
eager call of a function a graph made cost 4-7x the function itself. Each equation
here runs a ``jax.jit`` of its primitive and parameters, kept per primitive,
parameters and context (:func:`compiled_op`), which takes JAX's C++ fast path; the values are
those of the function run eagerly (one op at a time: XLA rewrites nothing across
ops). Used for the graph's values (``g.value``) and for eager calls of what a graph
makes (:func:`eval_jaxpr`), also under a derivative taken eagerly (``jax.grad`` of
``g.as_function()``, ``g.grads``): there a primitive's compiled op is linearized by
JAX's rule for ``jit``, kept per op, where a bound primitive went through JAX's
fallback (jvp and partial evaluation) at every equation, 2.5x the function's own
``jax.grad`` on a 600-layer MLP; its derivative rounds as under ``jax.jit`` (within an
ulp or two of an eager ``jax.grad``). Equations holding a program (calls, loops) are
bound there as JAX binds them, and so are all under other transformations
(``jax.jit``, ``jax.vmap``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax

from . import _compat as C


def op_key(eqn: C.JaxprEqn) -> tuple:
    """What :func:`compiled_op` keeps a compiled op by (the context a ``random_bits`` was traced
    in decides its bits: ``jax.threefry_partitionable``)."""
    return eqn.primitive, tuple(eqn.params.items()), C.context_key(eqn)


OPS: dict[Any, Any] = {}


def compiled_op(eqn: C.JaxprEqn) -> Any:
    """A compiled function running ``eqn``'s primitive with its parameters, kept per
    primitive and parameters (JAX's own dispatch of a bound primitive costs several
    times an eager ``jnp`` call); None for effects or parameters that do not hash, and
    for an equation holding a program (see :func:`body_op`), but a ``shard_map``'s or
    Pallas kernel's, which JAX traces again where it runs."""
    try:  # (an op made before: most of a program's, no body to look for)
        key = op_key(eqn)
        fn = OPS.get(key)
    except TypeError:  # parameters that do not hash: JAX's own dispatch
        return None
    if fn is None:
        if eqn.effects or (holds_body(eqn) and not C.retraced([eqn])):
            return None
        if len(OPS) > 4096:
            OPS.clear()
        if holds_body(eqn):
            # (lowered, a Pallas kernel run, outside the folding too)
            fn = functools.partial(_evaluated_staged, body_op(eqn))
        else:  # (JAX's own: what the function run eagerly compiled is compiled)
            fn = C.primitive_op(eqn.primitive, eqn.params)
        OPS[key] = fn
    return fn


def body_op(eqn: C.JaxprEqn) -> Any:
    """A compiled function running ``eqn``, which holds a program (a call, loop, cond,
    custom rule or ``shard_map``), bound as ``eval_jaxpr`` binds it (its body a function)
    and staged as JAX stages it by default, also in ``ensure_compile_time_eval``.

    Not kept in :data:`OPS`: it holds the constants its body closes over, which a
    global cache kept after the graph was gone (a ``jit`` closing over 16 MB kept 30 MB a
    trace); see :func:`lasting_op`. (JAX's own dispatch of a call costs about 15 µs more
    a call.)
    """
    # a var of its own per operand: run gives a literal's value as an argument, and a
    # call given one value twice (sub(x, x)) is kept for its body, which a later call
    # (sub(x, y)) shares: read by position, not by the first's vars
    ins = [C.Var(a.aval) for a in eqn.invars]
    eqn = eqn.replace(invars=ins)
    one = C.new_jaxpr([], ins, list(eqn.outvars), [eqn], "op")
    return jax.jit(functools.partial(staged, one))


def lasting_op(eqn: C.JaxprEqn) -> Any:
    """The compiled op of ``eqn`` for a program run again and again, which its caller
    keeps as long as that program: :func:`compiled_op`, or for an equation holding a
    program, its op of :func:`_body_op_of` (None for effects)."""
    fn = compiled_op(eqn)
    if fn is not None or eqn.effects or not holds_body(eqn) or C.retraced([eqn]):
        return fn
    return _body_op_of(eqn, make=True)


def _once_op(eqn: C.JaxprEqn) -> Any:
    """The op of ``eqn``, which holds a program, in a program made for one run (see
    :func:`eval_jaxpr`): :func:`_body_op_of` without making one, else None (bound as
    JAX binds it). (``values_fn`` after ``as_function`` bound the calls as JAX does: JAX
    compiled them again.)"""
    return None if eqn.effects else _body_op_of(eqn, make=False)


def _body_op_of(eqn: C.JaxprEqn, make: bool) -> Any:
    """The op of ``eqn``, which holds a program: a custom rule's body run op by op (see
    :func:`_inlined`), or the :func:`body_op` equal equations share while a program
    keeps one (``make``: made where none is; never a ``shard_map``'s or Pallas kernel's,
    see :func:`lasting_op`). Shared: a layer jitted once and called 24 times is one op,
    compiled once for every graph made while one holds it (made per equation, each
    graph's first eager call compiled 24 of them, 1.2 s for 2 ms)."""
    if eqn.primitive.name in C.CUSTOM_RULE_PRIMITIVES:
        return _inlined(eqn)
    try:
        key = op_key(eqn)
        fn = _BODY_OPS.get(key)
    except TypeError:  # parameters that do not hash
        return body_op(eqn) if make else None
    if fn is None and make:
        fn = _BODY_OPS[key] = body_op(eqn)
    return fn


def _inlined(eqn: C.JaxprEqn) -> Any:
    """A custom rule's call (``jax.nn.relu``, a ``custom_vjp``), run outside any
    derivative: its body, op by op with the compiled ops of its primitives (which every
    graph shares; each trace makes the call's body anew, so a compiled op of the call
    compiled again for every graph: 24 compiles, 1.1-1.7 s, at the first eager call of
    each graph of a 24-layer relu MLP)."""
    body = eqn.params[C.CALL_PRIMITIVES[eqn.primitive.name]]
    jaxpr, consts = (body.jaxpr, body.consts) if isinstance(body, C.ClosedJaxpr) else (body, ())
    return functools.partial(eval_jaxpr, jaxpr, consts)


#: :func:`body_op` s by :func:`op_key`, while a program running them keeps them (weakly:
#: an entry, and the body its key holds, goes with the last program that ran it)
_BODY_OPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def holds_body(eqn: C.JaxprEqn) -> bool:
    """Whether ``eqn`` holds a program of its own (a call, loop, cond, custom rule)."""
    return any(isinstance(p, (C.Jaxpr, C.ClosedJaxpr)) for p in eqn.params.values())


def last_uses(eqns: Sequence[C.JaxprEqn], keep: set[Any]) -> list[list[Any]]:
    """Per equation, the vars made by ``eqns`` that it is the last to read (and that
    are not kept)."""
    made = {v for eqn in eqns for v in eqn.outvars}
    last: dict[Any, int] = {}
    Literal = C.Literal
    for k, eqn in enumerate(eqns):
        for a in eqn.invars:
            if type(a) is not Literal:
                last[a] = k
    frees: list[list[Any]] = [[] for _ in eqns]
    for v, k in last.items():
        if v in made and v not in keep:
            frees[k].append(v)
    return frees


def run_eqns(
    eqns: Sequence[C.JaxprEqn], ops: Sequence[Any], env: dict, frees: Sequence[list[Any]]
) -> None:
    """Run equations on concrete values op by op (``eval_jaxpr`` with each one's
    compiled function from :func:`compiled_op`, about 4× faster on long programs), reading
    and writing ``env``. A value is dropped after its last read (``frees``), as an
    eager run drops it: holding 100k live arrays slows every later op."""
    Literal = C.Literal
    partitionable = jax.config.jax_threefry_partitionable
    for eqn, op, dead in zip(eqns, ops, frees):
        ins = [a.val if type(a) is Literal else env[a] for a in eqn.invars]
        context = C.traced_context(eqn, partitionable)  # (as traced: a PRNG's bits)
        if context is None:
            out = bind(eqn.primitive, eqn.params, *ins) if op is None else op(*ins)
        else:
            with context:
                out = bind(eqn.primitive, eqn.params, *ins) if op is None else op(*ins)
        if eqn.primitive.multiple_results:
            env.update(zip(eqn.outvars, out))
        else:
            env[eqn.outvars[0]] = out
        for v in dead:
            del env[v]


def staged(jaxpr: C.Jaxpr, *args: Any) -> Any:
    """``jaxpr``'s one equation run on ``args``, staged normally (see :func:`compiled_op`)."""
    with C.staged_normally():
        out = C.eval_jaxpr(jaxpr, [], *args)
    return out if jaxpr.eqns[0].primitive.multiple_results else out[0]


def _evaluated_staged(op: Any, *args: Any) -> Any:
    """``op(*args)`` in :func:`C.evaluated_staged`."""
    with C.evaluated_staged(args):
        return op(*args)


def bind(primitive: Any, params: dict, *args: Any) -> Any:
    """``primitive`` applied to ``args`` as an equation holds it (a call's body and
    rule are its parameters, which it binds as functions: ``get_bind_params``)."""
    return primitive.bind(*args, **primitive.get_bind_params(params))


def eval_jaxpr(jaxpr: C.Jaxpr, consts: Sequence[Any], *args: Any, once: bool = False) -> list[Any]:
    """``jax.core.eval_jaxpr``: on concrete arrays, op by op with compiled ops (see the
    module); on tracers (under a transformation), as JAX evaluates it. ``once``: a
    program made for this run only, whose equations holding a program take no compiled
    op of their own (see :func:`_once_op`: made here, it would compile at every run)."""
    Tracer = jax.core.Tracer
    derivative = False
    if any(isinstance(x, Tracer) for x in args) or any(isinstance(x, Tracer) for x in consts):
        if not C.eager_derivative([*consts, *args]):
            return C.eval_jaxpr(jaxpr, consts, *args)
        derivative = True
    if C.retraced(jaxpr.eqns):  # (a shard_map's or Pallas kernel's body: as JAX stages it)
        return C.eval_jaxpr(jaxpr, consts, *args)
    plan = _plan(jaxpr)
    frees, ops = plan[0], plan[1]
    if once and not derivative:
        ops = [_once_op(e) if op is None else op for e, op in zip(jaxpr.eqns, ops)]
    elif not derivative:
        if plan[2] is None:
            plan[2] = [lasting_op(e) if op is None else op for e, op in zip(jaxpr.eqns, ops)]
        ops = plan[2]
    # (a derivative binds equations holding a program of their own as JAX binds them:
    # linearized, a call's compiled op, kept in OPS, held its body's constants compiled
    # in and ran them again; a jit closing over 16 MB made every trace's gradient keep
    # 33 MB, and ran 2.5x slower)
    # (as eval_jaxpr takes them: the consts then the arguments, for the constvars then
    # the invars; newer JAX's programs may have no constvars and take both as invars)
    env: dict[Any, Any] = dict(
        zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True)
    )
    run_eqns(jaxpr.eqns, ops, env, frees)
    return [o.val if isinstance(o, C.Literal) else env[o] for o in jaxpr.outvars]


_PLANS: dict[int, tuple[Any, Any]] = {}


def _plan(jaxpr: C.Jaxpr) -> list[Any]:
    """``[frees, primitive ops, ops]``, kept per jaxpr while it lives (a made function
    called in a loop works them out once): the vars dead after each equation, the
    compiled ops of equations holding no program of their own (None for the others),
    and every equation's compiled op, made when first needed (None until then)."""

    def plan() -> list[Any]:
        keep = {o for o in jaxpr.outvars if not isinstance(o, C.Literal)}
        primitive = [None if holds_body(e) else compiled_op(e) for e in jaxpr.eqns]
        return [last_uses(jaxpr.eqns, keep), primitive, None]

    return per_jaxpr(_PLANS, jaxpr, plan)


def per_jaxpr(cache: dict[int, tuple[Any, Any]], jaxpr: Any, make: Callable[[], Any]) -> Any:
    """``make()``, kept in ``cache`` for ``jaxpr`` while it lives (by a weak reference:
    a graph's program, dropped, is not kept alive by this cache, and its entry goes)."""
    key = id(jaxpr)
    found = cache.get(key)
    if found is not None and found[0]() is jaxpr:
        return found[1]
    if len(cache) > 256:  # the oldest half (clearing all dropped the ops live programs share)
        for old in list(cache)[:128]:
            del cache[old]

    def gone(ref: Any) -> None:
        if cache.get(key, (None,))[0] is ref:
            del cache[key]

    value = make()
    cache[key] = (weakref.ref(jaxpr, gone), value)
    return value
