"""The one module that touches JAX internals or version differences.

Everything else in jaxsurgery reaches JAX through public modules (``jax``,
``jax.extend.core``) or through the names defined here, so a JAX upgrade touches
this file alone. Tested with jax 0.10 and the newest release (0.12): see the README's
"Supported JAX versions".
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax._src import array as _array  # ArrayImpl, the type of a concrete jax.Array
from jax._src import callback as _callback  # io_callback's effects (see split_known)
from jax._src import config as _config  # eager_constant_folding (see staged_normally)
from jax._src import core as _core  # the running trace (trace_ctx)
from jax._src import dispatch as _dispatch  # eager jnp's compiled ops (primitive_op)
from jax._src import effects as _effects  # what partial evaluation keeps (split_known)
from jax._src import source_info_util as _source_info_util  # user_frame lives here only
from jax._src.interpreters import ad as _ad  # JVP tracers: their primal is named
from jax._src.interpreters import batching as _batching  # vmap tracers: their batch
from jax._src.interpreters import partial_eval as _pe  # the tracer type of make_jaxpr
from jax.extend import core as jex_core
from jax.extend import source_info_util as jex_source_info

#: the type of a concrete ``jax.Array`` (a check by type is faster than ``isinstance``)
ArrayImpl = _array.ArrayImpl
Var = jex_core.Var
Literal = jex_core.Literal
DropVar = jex_core.DropVar
Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr
JaxprEqn = jex_core.JaxprEqn
new_jaxpr_eqn = jex_core.new_jaxpr_eqn
check_jaxpr = jex_core.check_jaxpr
SourceInfo = jex_source_info.SourceInfo

#: Call primitives whose body is inlined into the flat program, and the parameter
#: holding the body. (``pjit`` and ``checkpoint`` are older names.) A slice that does
#: not cut through such a call keeps it as one equation, its rule intact.
CALL_PRIMITIVES = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
#: Calls that carry a custom differentiation rule.
CUSTOM_RULE_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
#: The identity primitive behind ``jax.ad_checkpoint.checkpoint_name`` and ``js.tag``.
TAG_PRIMITIVE = "name"


#: tracers of ``jax.jvp`` and of ``jax.grad``'s forward pass (``linearize``): a name
#: given under them names the primal value
_PRIMAL_TRACERS = tuple(
    t for t in (_ad.JVPTracer, getattr(_ad, "LinearizeTracer", None)) if t is not None
)


#: the tracer type of ``make_jaxpr`` (its ``val`` is the jaxpr var it stands for)
JAXPR_TRACER = _pe.DynamicJaxprTracer


def tracer_atom(x: Any) -> Any:
    """The jaxpr atom a ``make_jaxpr`` tracer stands for, or None for anything else.

    Inside ``jax.vmap`` a value is the batched array it carries, and inside a JVP
    (``jax.grad``'s forward pass) its primal: a name given there names that value.
    """
    carried = _jaxpr_tracer(x)
    return None if carried is None else carried.val


def tracer_jaxpr_trace(x: Any) -> Any:
    """The ``make_jaxpr`` trace (a jaxpr being built) whose var :func:`tracer_atom`
    gives, or None."""
    carried = _jaxpr_tracer(x)
    return None if carried is None else carried._trace


def _jaxpr_tracer(x: Any) -> Any:
    """The ``make_jaxpr`` tracer ``x`` is or carries (under ``vmap``, its batch; under a
    JVP, its primal), or None."""
    while True:
        if isinstance(x, _pe.DynamicJaxprTracer):
            return x
        if isinstance(x, _batching.BatchTracer):
            x = x.val
        elif isinstance(x, _PRIMAL_TRACERS):
            x = x.primal
        else:
            return None


def outside_transforms() -> bool:
    """Whether no transform is tracing now (JAX evaluates eagerly)."""
    return isinstance(_core.trace_ctx.trace, _core.EvalTrace)


def current_trace() -> Any:
    """The trace running now (the jaxpr being built, or a transform's trace)."""
    return _core.trace_ctx.trace


#: the name-stack marks of JAX's derivative transforms (``jax.grad``'s forward pass is
#: ``jvp``, its backward pass ``transpose(jvp)``)
_DERIVATIVE_TRANSFORMS = frozenset({"jvp", "transpose", "linearize"})


def policy_saves_names(policy: Any) -> bool:
    """Whether a ``jax.checkpoint`` policy saves a value for being named (as
    ``save_any_names_but_these`` does): then a tag would change what it saves."""
    if policy is None:
        return False
    from jax._src import ad_checkpoint

    try:
        saved = policy(ad_checkpoint.name_p, _core.ShapedArray((), "float32"), name="probe")
    except Exception:  # a policy that does not take a name: assume it may
        return True
    return saved if isinstance(saved, bool) else type(saved).__name__ != "RecomputeType"


def in_backward_pass(source_info: SourceInfo) -> bool:
    """Whether an equation with this context belongs to a derivative's backward pass
    (``transpose`` in its name stack: a ``checkpoint`` recomputes its forward values
    there)."""
    return "transpose" in _transform_marks(source_info)


def recomputed(source_info: SourceInfo) -> bool:
    """Whether an equation is a checkpoint's recomputation (``rematted_computation`` in
    its name stack: the forward values a backward pass computes again)."""
    return "rematted_computation" in str(source_info.name_stack)


def recomputes(eqn: JaxprEqn) -> bool:
    """Whether ``eqn`` is a checkpoint that a derivative's partial evaluation split off
    (``differentiated=True``: ``jax.linearize``'s linear function, a backward pass): the
    forward values inside it are computed again, their first copy outside it."""
    return eqn.primitive.name in ("remat2", "checkpoint") and bool(
        eqn.params.get("differentiated", False)
    )


def under_derivative(eqn: JaxprEqn) -> bool:
    """Whether a derivative transform (``jax.grad``, ``jax.jvp``, ``jacfwd``...)
    differentiates what ``eqn`` makes: the outermost derivative mark of its name stack
    is a forward one (``jvp``). A backward pass's equation (``transpose`` outermost: a
    gradient ``jax.grad`` returns) is made by one but not differentiated, unless a
    derivative around it is (``jvp(transpose(...))``, a Hessian)."""
    for s in eqn.source_info.name_stack.stack:
        name = getattr(s, "name", None) if type(s).__name__ == "Transform" else None
        if name in _DERIVATIVE_TRANSFORMS:
            return name != "transpose"
    return False


def _transform_marks(source_info: SourceInfo) -> set[str]:
    """The transforms an equation's name stack says made it (``jvp``, ``transpose``...)."""
    return {
        getattr(s, "name", None)
        for s in source_info.name_stack.stack
        if type(s).__name__ == "Transform"
    }


def made_by_call(x: Any) -> tuple[Any, tuple[Var, ...]] | None:
    """``(called jaxpr, results)`` of the ``jit`` or ``checkpoint`` equation that made
    tracer ``x``, or None.

    While ``make_jaxpr`` traces, a tracer keeps the equation that made it (its
    ``parent``); a call traced from JAX's cache reuses the jaxpr of the first.
    """
    eqn = getattr(x, "parent", None) if isinstance(x, _pe.DynamicJaxprTracer) else None
    if eqn is None or getattr(eqn.primitive, "name", None) not in _CACHED_CALLS:
        return None
    return eqn.params["jaxpr"], tuple(eqn.outvars)


#: calls whose jaxpr JAX traces once per function and argument types
_CACHED_CALLS = frozenset({"jit", "pjit", "checkpoint", "remat2"})


def called_jaxpr(eqn: JaxprEqn) -> ClosedJaxpr:
    """The closed jaxpr an inlinable call equation runs."""
    inner = eqn.params[CALL_PRIMITIVES[eqn.primitive.name]]
    if isinstance(inner, Jaxpr) and not hasattr(inner, "consts"):
        inner = ClosedJaxpr(inner, ())
    return inner


def call_name(eqn: JaxprEqn) -> str:
    """A readable name of a call equation: the called function's name if known."""
    name = eqn.params.get("name")
    if name is None:
        debug = getattr(called_jaxpr(eqn).jaxpr, "debug_info", None)
        name = getattr(debug, "func_name", None) or eqn.primitive.name
    return str(name)


def rebuild_custom_rule(fn: Any, fun: Any) -> Any:
    """A ``custom_jvp``/``custom_vjp`` like ``fn`` around another primal function."""
    if isinstance(fn, jax.custom_jvp):
        new = jax.custom_jvp(fun, nondiff_argnums=fn.nondiff_argnums)
        new.defjvp(fn.jvp, symbolic_zeros=getattr(fn, "symbolic_zeros", False))
        return new
    if isinstance(fn, jax.custom_vjp):
        new = jax.custom_vjp(fun, nondiff_argnums=fn.nondiff_argnums)
        new.defvjp(
            fn.fwd,
            fn.bwd,
            symbolic_zeros=getattr(fn, "symbolic_zeros", False),
            optimize_remat=getattr(fn, "optimize_remat", False),
        )
        return new
    return fn


def inlined_when_traced(fn: Any) -> bool:
    """Whether a ``jax.jit``-ed function's calls leave no ``jit`` equation in a jaxpr.

    jax 0.10 inlines a jit made with ``inline=True``; newer releases take ``True`` to mean
    ``Inline.JAX_LATE`` (kept in the jaxpr) and inline only ``Inline.JAX_EARLY``.
    """
    inline = getattr(getattr(fn, "_jit_info", None), "inline", False)
    return inline is True or getattr(inline, "name", None) == "JAX_EARLY"


def rejit(fn: Any, fun: Any) -> Any:
    """``jax.jit(fun)`` with the options ``fn`` (a ``jax.jit``-ed function) was made with."""
    info = getattr(fn, "_jit_info", None)
    if info is None:
        return jax.jit(fun)
    options: dict[str, Any] = {
        "static_argnums": info.static_argnums,
        "static_argnames": info.static_argnames,
        "keep_unused": info.keep_unused,
        # a jit inlined when traced (jax 0.10's inline=True) stays a call in the traced
        # program, which the index inlines: its body's vars are the program's, and the
        # copies of its calls are told apart (inlined by JAX, its names named nothing)
        "inline": False if inlined_when_traced(fn) else info.inline,
    }
    options.update(jit_shardings(fn))
    return jax.jit(fun, **options)


def jit_shardings(fn: Any) -> dict[str, Any]:
    """The ``in_shardings`` / ``out_shardings`` a ``jax.jit``-ed function was given
    (``{}``: none, or not a jit)."""
    info = getattr(fn, "_jit_info", None)
    found = {}
    for kind in ("in", "out") if info is not None else ():
        leaves = getattr(info, f"{kind}_shardings_leaves", ())
        if any(type(leaf).__name__ != "UnspecifiedValue" for leaf in leaves):
            treedef = getattr(info, f"{kind}_shardings_treedef")
            found[f"{kind}_shardings"] = jax.tree_util.tree_unflatten(treedef, leaves)
    return found


def scan_layout(eqn: JaxprEqn) -> tuple[int, int]:
    """``(number of consts, number of carry)`` operands of a ``scan`` equation.

    The operands are ``consts + carry + xs`` and the results ``carry + ys`` in every
    version; jax 0.10 states the counts as ``num_consts``/``num_carry``, newer
    releases as the flat trees ``ft_in = (consts, carry, xs)`` and ``ft_out``.
    """
    params = eqn.params
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)


def tag_name(eqn: JaxprEqn) -> str:
    """The name a ``checkpoint_name``/``js.tag`` equation gives its operand."""
    return str(eqn.params["name"])


def user_frame(source_info: SourceInfo | None) -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the innermost user frame that made an equation."""
    if source_info is None or source_info.traceback is None:
        return None
    frame = _source_info_util.user_frame(source_info.traceback)
    if frame is not None and frame.file_name.startswith(_OWN_FILES):
        # made while one of jaxsurgery's wrappers ran (a loop called with named
        # bodies): the user's frame is the next one out
        frame = next(
            (
                f
                for f in _source_info_util.user_frames(source_info.traceback)
                if not f.file_name.startswith(_OWN_FILES)
            ),
            None,
        )
    if frame is None:
        return None
    return frame.file_name, frame.start_line, frame.function_name


#: where jaxsurgery's own files are (never the user's frame)
_OWN_FILES = os.path.dirname(os.path.abspath(__file__)) + os.sep


def has_scope(source_info: SourceInfo | None) -> bool:
    """Whether an equation was made inside any name scope (cheaper than scope_of)."""
    return source_info is not None and bool(source_info.name_stack.stack)


def current_scope() -> str:
    """The name stack being traced now (``"CNN/Dense_0"`` inside a Flax module)."""
    return str(_source_info_util.current_name_stack())


def scope_of(source_info: SourceInfo | None) -> str:
    """The name-stack path of an equation, ``"MLP/Dense_0"`` or ``""``."""
    if not has_scope(source_info):
        return ""
    return str(source_info.name_stack)


def nest_source_info(outer: SourceInfo, inner: SourceInfo) -> SourceInfo:
    """Source info of an equation inlined from a call made at ``outer``."""
    if not outer.name_stack.stack:  # most calls: no scope to add
        return inner
    return inner.replace(name_stack=outer.name_stack + inner.name_stack)


def copied(x: Any) -> Any:
    """``x`` as a value of its own in the program being traced (JAX's ``copy``, which
    XLA elides): what JAX would otherwise pass on as ``x`` itself."""
    return jax.lax.copy_p.bind(x)


def identity_eqn(atom: Any, var: Var, source_info: SourceInfo) -> JaxprEqn:
    """``var = copy atom``: an equation that writes ``atom``'s value as a var of its own."""
    return new_jaxpr_eqn([atom], [var], jax.lax.copy_p, {}, frozenset(), source_info)


def copy_eqn(eqn: JaxprEqn, invars: Any, outvars: Any, source_info: SourceInfo) -> JaxprEqn:
    """``eqn`` reading ``invars`` and writing ``outvars``, with its own context.

    Without effects this is a plain copy (a third of the cost of ``new_jaxpr_eqn``,
    which flat programs of inlined calls pay per equation); effects may name inputs
    by position, so an effectful equation resolves them again for the new inputs.
    """
    if eqn.effects:
        return new_jaxpr_eqn(
            invars, outvars, eqn.primitive, eqn.params, eqn.effects, source_info, eqn.ctx
        )
    return eqn.replace(invars=invars, outvars=outvars, source_info=source_info)


def new_jaxpr(
    constvars: Any, invars: Any, outvars: Any, eqns: Any, label: str = "jaxsurgery"
) -> Jaxpr:
    """A ``Jaxpr`` with the effects of its equations and a debug-info label."""
    effects = frozenset().union(*(e.effects for e in eqns)) if eqns else frozenset()
    debug_info = jex_core.DebugInfo(
        "jaxsurgery",
        label,
        tuple(f"in{i}" for i in range(len(invars))),
        tuple(f"out{i}" for i in range(len(outvars))),
    )
    return Jaxpr(constvars, invars, outvars, eqns, effects, debug_info)


def jaxpr_as_fun(closed: ClosedJaxpr) -> Any:
    """A Python function that evaluates a closed jaxpr."""
    return jex_core.jaxpr_as_fun(closed)


def primitive_op(primitive: Any, params: dict) -> Any:
    """The compiled function JAX runs a primitive with, eagerly (``jnp.tanh(x)`` on an
    array calls it): a ``jax.jit`` of the bound primitive, kept by JAX per primitive,
    parameters and context, so that the ops a graph's values run share the compiles of
    the user's own eager calls (and of every graph). A primitive holding no program of
    its own only (its parameters bind as they are)."""
    return _dispatch.xla_primitive_callable(primitive, **params)


def context_key(eqn: JaxprEqn) -> tuple:
    """What of the context an equation was traced in changes what it computes (the
    PRNG's ``threefry_partitionable``, a compute type, XLA metadata), as a key."""
    ctx = getattr(eqn, "ctx", None)
    if ctx is None:
        return ()
    metadata = getattr(ctx, "xla_metadata", None)
    return (
        getattr(ctx, "threefry_partitionable", None),
        getattr(ctx, "compute_type", None),
        None if metadata is None else repr(metadata),
    )


def traced_context(eqn: JaxprEqn, partitionable: bool) -> Any:
    """The context ``eqn`` was traced in, to run it in, where it differs from the running
    one (whose ``jax_threefry_partitionable`` is ``partitionable``); else None."""
    if context_key(eqn) in ((), (partitionable, None, None)):
        return None
    return eqn.ctx.manager


_EAGER_DERIVATIVE_TRACERS = tuple(
    t for t in (getattr(_ad, "JVPTracer", None), getattr(_ad, "LinearizeTracer", None)) if t
)


def eager_derivative(values: Sequence[Any]) -> bool:
    """Whether the tracers among ``values`` are all a derivative's (``jax.grad``,
    ``jax.jvp``) of concrete arrays: the derivative runs eagerly, op by op."""
    for x in values:
        while isinstance(x, _EAGER_DERIVATIVE_TRACERS):
            x = x.primal
        if isinstance(x, jax.core.Tracer):
            return False
    return True


def eval_jaxpr(jaxpr: Jaxpr, consts: Any, *args: Any) -> list[Any]:
    """Evaluate a jaxpr; traceable (works on tracers of any transformation)."""
    return jax.core.eval_jaxpr(jaxpr, consts, *args)


def make_jaxpr(fn: Any, *args: Any) -> ClosedJaxpr:
    """``jax.make_jaxpr(fn)(*args)``, the arguments passed as one list (the jaxpr's
    inputs are the same): newer JAX handles each positional argument on its own, which
    costs a model with thousands of parameter leaves a tenth of its trace."""
    return jax.make_jaxpr(lambda flat: fn(*flat))(list(args))


def jax_traceback_filtering_off() -> bool:
    """Whether JAX's traceback filtering is off (``JAX_TRACEBACK_FILTERING=off``):
    jaxsurgery then keeps its own frames too."""
    try:
        return str(jax.config.jax_traceback_filtering).lower() == "off"
    except AttributeError:  # a JAX without that option
        import os

        return os.environ.get("JAX_TRACEBACK_FILTERING", "").lower() == "off"


def split_known(closed: ClosedJaxpr, unknowns: list[bool]) -> tuple[Jaxpr, list[Any], Jaxpr, int]:
    """JAX's partial evaluation: ``(known, known_consts, unknown, residuals)``.

    ``known(*known_consts, *known inputs)`` computes the residuals;
    ``unknown(*residuals, *unknown inputs)`` computes every output. Loops, conds and
    calls are split by their own rules (a scan stays one scan); a ``custom_jvp`` call
    is one unit, kept with its rule (jax 0.10 inlined the body of one reading an
    unknown input, dropping the rule: see :func:`_hold`). jax 0.10 takes and returns
    ``ClosedJaxpr`` s, newer JAX plain ``Jaxpr`` s with constants as inputs.
    """
    with _keeping_io_callbacks():
        known, known_consts, unknown, n = _split_known(
            ClosedJaxpr(_hold(closed.jaxpr), closed.consts), unknowns
        )
    return _unhold(known), known_consts, _unhold(unknown), n


_KEEPING = [0, threading.Lock()]  # (how many splits run, each keeping io_callbacks)


@contextlib.contextmanager
def _keeping_io_callbacks() -> Iterator[None]:
    """Partial evaluation keeps ``io_callback`` s, as it keeps debug callbacks: JAX
    keeps an equation whose results nothing reads only where its effect is one of
    ``partial_eval_kept_effects``, which lists debug callbacks and not io_callbacks
    (JAX does not differentiate those); a slice cut inside a loop ran none of them,
    nor did the context before it."""
    kept = _effects.partial_eval_kept_effects
    types = (_callback.IOEffect, _callback.OrderedIOEffect)
    with _KEEPING[1]:
        _KEEPING[0] += 1
        for t in types:
            kept.add_type(t)
    try:
        yield
    finally:
        with _KEEPING[1]:
            _KEEPING[0] -= 1
            if not _KEEPING[0]:
                for t in types:
                    kept._effect_types.discard(t)


def _split_known(closed: ClosedJaxpr, unknowns: list[bool]) -> tuple[Jaxpr, list[Any], Jaxpr, int]:
    jaxpr = _pe.convert_constvars_jaxpr(closed.jaxpr)
    flags = [False] * len(closed.consts) + list(unknowns)
    try:
        known, unknown, _, residuals = _pe.partial_eval_jaxpr_nounits(
            ClosedJaxpr(jaxpr, ()), flags, True
        )
    except (AttributeError, TypeError):  # newer JAX: an open Jaxpr
        known, unknown, _, residuals = _pe.partial_eval_jaxpr_nounits(jaxpr, flags, True)
    known_consts = list(closed.consts)
    if isinstance(known, ClosedJaxpr):
        if known.consts:
            known_consts = [*known.consts, *known_consts]
            known = _pe.convert_constvars_jaxpr(known.jaxpr)
        else:
            known = known.jaxpr
    if isinstance(unknown, ClosedJaxpr):
        assert not unknown.consts, "partial evaluation left constants in the unknown part"
        unknown = unknown.jaxpr
    return known, known_consts, unknown, len(residuals)


class _Held:
    """An equation :func:`_hold` keeps whole (a primitive's parameter: by identity)."""

    __slots__ = ("eqn",)

    def __init__(self, eqn: JaxprEqn):
        self.eqn = eqn


#: a stand-in for an equation through partial evaluation: staged whole when an input
#: is unknown, run as it is when all are known
_held_p = jex_core.Primitive("jaxsurgery_held")
_held_p.multiple_results = True


def _held_impl(*args: Any, held: _Held) -> list[Any]:
    eqn = held.eqn
    subfuns, params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


_held_p.def_impl(_held_impl)
_held_p.def_effectful_abstract_eval(
    lambda *avals, held: ([v.aval for v in held.eqn.outvars], held.eqn.effects)
)

#: the primitives whose bodies :func:`_hold` goes into (their partial evaluation
#: splits the bodies with the same rules)
_HOLD_INSIDE = frozenset({"pjit", "jit", "closed_call", "core_call", "scan", "while", "cond"})


def _hold(jaxpr: Jaxpr) -> Jaxpr:
    """``jaxpr`` with each ``custom_jvp_call`` (effects and all) a stand-in that holds
    it, also in the bodies of calls, loops and conds: partial evaluation stages it
    whole, rule and all (jax 0.10's inlines the body of a call reading an unknown
    input, assuming the split only builds linear functions: a slice from a loop value
    lost the rules after it)."""
    return _map_eqns(jaxpr, _hold_eqn)


def _hold_eqn(eqn: JaxprEqn) -> JaxprEqn:
    if eqn.primitive.name == "custom_jvp_call":
        params = {"held": _Held(eqn)}
        return new_jaxpr_eqn(eqn.invars, eqn.outvars, _held_p, params, eqn.effects, eqn.source_info)
    return _map_bodies(eqn, _hold)


def _unhold(jaxpr: Jaxpr) -> Jaxpr:
    """The equations :func:`_hold` held, back in place (reading and writing the
    stand-in's vars: partial evaluation made new ones)."""
    return _map_eqns(jaxpr, _unhold_eqn)


def _unhold_eqn(eqn: JaxprEqn) -> JaxprEqn:
    if eqn.primitive is _held_p:
        held = eqn.params["held"].eqn
        return new_jaxpr_eqn(
            eqn.invars, eqn.outvars, held.primitive, held.params, held.effects, eqn.source_info
        )
    return _map_bodies(eqn, _unhold)


def _map_eqns(jaxpr: Jaxpr, fn: Any) -> Jaxpr:
    eqns = [fn(e) for e in jaxpr.eqns]
    if all(a is b for a, b in zip(eqns, jaxpr.eqns)):
        return jaxpr
    return jaxpr.replace(eqns=eqns)


def _map_bodies(eqn: JaxprEqn, fn: Any) -> JaxprEqn:
    """``eqn`` with ``fn`` applied to the jaxprs of its bodies (see _HOLD_INSIDE)."""
    if eqn.primitive.name not in _HOLD_INSIDE:
        return eqn

    def one(p: Any) -> Any:
        if isinstance(p, ClosedJaxpr):
            inner = fn(p.jaxpr)
            return p if inner is p.jaxpr else ClosedJaxpr(inner, p.consts)
        if isinstance(p, Jaxpr):
            return fn(p)
        return p

    params = {
        k: tuple(one(x) for x in v) if isinstance(v, tuple) else one(v)
        for k, v in eqn.params.items()
    }
    if all(params[k] is v for k, v in eqn.params.items()):
        return eqn
    return eqn.replace(params=params)


def dce(jaxpr: Jaxpr) -> Jaxpr:
    """The jaxpr without equations no output needs (inputs kept)."""
    return _pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)[0]


def inner_jaxprs(eqn: JaxprEqn) -> list[Jaxpr]:
    """The jaxprs an equation holds in its params (bodies, branches, rules)."""
    found = []
    for p in eqn.params.values():
        for sub in p if isinstance(p, tuple) else (p,):
            inner = getattr(sub, "jaxpr", sub)
            if isinstance(inner, Jaxpr):
                found.append(inner)
    return found


#: the modules of the effects of host callbacks (``jax.debug.print``/``callback``,
#: ``io_callback``), the same in every supported JAX version
_CALLBACK_EFFECT_MODULES = ("jax._src.debugging", "jax._src.callback")


def _is_callback(effect: Any) -> bool:
    return type(effect).__module__ in _CALLBACK_EFFECT_MODULES


def callbacks_only(effects: Any) -> bool:
    """Whether every effect of an equation is a host callback's (printing, logging):
    one that no value of the program reads."""
    return all(map(_is_callback, effects))


def calls_back(effects: Any) -> bool:
    """Whether an equation (a loop, with what its body does) calls back to the host."""
    return any(map(_is_callback, effects))


def calls_io_back(effects: Any) -> bool:
    """Whether an equation or a program (with what its bodies do) holds an
    ``io_callback``, which JAX does not differentiate."""
    return any(isinstance(e, (_callback.IOEffect, _callback.OrderedIOEffect)) for e in effects)


_F = TypeVar("_F", bound=Callable[..., Any])


def cached_per_mesh(maxsize: int) -> Callable[[_F], _F]:
    """``functools.lru_cache`` of a function that traces a small jaxpr from shapes and
    dtypes, keyed also by the mesh in context: what is traced under ``jax.set_mesh``
    holds that mesh in its types, and reused under another mesh (or none) it fails
    (an add of two gradients: "context mesh ... should match the aval mesh")."""

    def wrap(fn: _F) -> _F:
        cached = functools.lru_cache(maxsize)(lambda mesh, *args: fn(*args))

        @functools.wraps(fn)
        def per_mesh(*args: Any) -> Any:
            return cached(jax.sharding.get_abstract_mesh(), *args)

        return per_mesh  # type: ignore[return-value]

    return wrap


def explicit_sharding(aval: Any) -> Any:
    """``aval``'s sharding where it has one of an Explicit mesh (part of the type of a
    value there), else None."""
    sharding = getattr(aval, "sharding", None)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or getattr(mesh, "empty", True) or all(s is None for s in spec):
        return None
    return sharding


def spec_of(aval: Any, weak: bool = False) -> jax.ShapeDtypeStruct:
    """A ``ShapeDtypeStruct`` of ``aval`` to trace with: its shape and dtype, and its
    sharding where that is part of its type (an Explicit mesh's); ``weak``: its weak
    type too (a value computed from a Python number)."""
    sharding = explicit_sharding(aval)
    weak_type = weak and getattr(aval, "weak_type", False)
    if sharding is None:
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=weak_type)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding, weak_type=weak_type)


def resharded_like(x: Any, aval: Any, stacked: bool = False) -> Any:
    """``x``, a value given for one of type ``aval`` (a patch), with ``aval``'s sharding
    where that is part of its type (an Explicit mesh's; ``stacked``: rows of such values
    on a new leading axis): a replicated patch of a sharded value made a ``cond``'s
    branches differ in type."""
    sharding = explicit_sharding(aval)
    if sharding is None:
        return x
    spec = jax.sharding.PartitionSpec(None, *sharding.spec) if stacked else sharding.spec
    if getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) == spec:
        return x
    return jax.sharding.reshard(x, spec)


def weak_cast(x: Any, dtype: Any) -> Any:
    """``x`` converted to ``dtype``, weakly typed (what ``jax.jit`` makes of a Python
    number); ``astype`` and ``jnp.asarray`` make a strongly typed array."""
    from jax._src.lax import lax as lax_internal

    return lax_internal._convert_element_type(x, dtype, weak_type=True)


def x64_enabled() -> bool:
    """Whether ``jax_enable_x64`` is on now (also inside ``jax.enable_x64``)."""
    return bool(jax.config.jax_enable_x64)


#: the dtypes JAX makes no arrays of with x64 off
_WIDE = frozenset(map(jnp.dtype, ("float64", "int64", "uint64", "complex128")))


def narrowed(dtype: Any) -> bool:
    """Whether ``dtype`` is 64-bit and JAX, with x64 off now, makes no arrays of it."""
    return dtype in _WIDE and not x64_enabled()


def x64_refusal(lead: str) -> Exception:
    """The SliceError for a 64-bit value (``lead``: "input 'h' must be float64") met
    with x64 off: a graph traced with x64 on (or inside ``jax.enable_x64``) computes in
    64 bits there, and JAX would make 32-bit arrays of what is given for it."""
    from ._errors import SliceError

    return SliceError(
        f"{lead}, and jax_enable_x64 is off now: the graph was traced with x64 on there "
        "(its program computes in 64 bits), and JAX makes no 64-bit arrays without it; "
        "switch it on again (jax.config.update('jax_enable_x64', True), or "
        "`with jax.enable_x64():`)"
    )


def refuses_x64(x: Any, dtype: Any, what: str) -> None:
    """Raise :func:`x64_refusal` unless ``x`` can be ``what`` (a value of ``dtype``) now:
    any value while x64 is on or ``dtype`` is not 64-bit, else a JAX array of ``dtype``."""
    if narrowed(dtype) and not (isinstance(x, jax.Array) and x.dtype == dtype):
        raise x64_refusal(f"{what} must be {dtype}")


def zeros_of(aval: Any, stacked: int | None = None, sharded: bool = True) -> Any:
    """Zeros of ``aval``'s shape and dtype (``stacked`` of them on a new leading axis),
    with its sharding where it has one of an Explicit mesh (the type of a value there)
    unless not ``sharded``."""
    shape = aval.shape if stacked is None else (stacked, *aval.shape)
    if narrowed(aval.dtype):
        raise x64_refusal(f"a value of this graph is {aval.dtype}")
    sharding = explicit_sharding(aval) if sharded else None
    if sharding is None:
        return jnp.zeros(shape, aval.dtype)
    spec, mesh = sharding.spec, sharding.mesh
    if stacked is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec))
    return jnp.zeros(shape, aval.dtype, out_sharding=sharding)


def holds_tracer(values: Any) -> bool:
    """Whether ``values`` (a pytree; a loop's ``Row`` counts by its array) hold a tracer:
    a value computed under a transform (``g.value`` inside ``jax.jit``, or from a
    tracer the function closes over), which belongs to that trace and is not kept."""
    return any(
        isinstance(getattr(x, "array", x), _core.Tracer) for x in jax.tree_util.tree_leaves(values)
    )


def staged_normally() -> Any:
    """A context in which JAX stages what it traces as it does by default, also inside
    ``jax.ensure_compile_time_eval`` (whose eager constant folding runs a ``pvary`` of a
    constant in a ``shard_map`` body outside the ``shard_map``, which fails)."""
    return _config.eager_constant_folding(False)


#: calls whose bodies JAX traces again when it runs or lowers them, which eager constant
#: folding breaks: a ``shard_map`` (see :func:`staged_normally`), a Pallas kernel in
#: interpret mode (``pl.program_id`` has no eager rule)
RETRACED_PRIMITIVES = frozenset({"shard_map", "pallas_call"})


def retraced(eqns: Any) -> bool:
    """Whether one of ``eqns``, or an equation in their bodies, is one of
    :data:`RETRACED_PRIMITIVES`."""
    todo = list(eqns)
    bodied = _HOLDS_BODIES
    while todo:
        eqn = todo.pop()
        primitive = eqn.primitive
        if primitive.name in RETRACED_PRIMITIVES:
            return True
        holds = bodied.get(primitive)
        if holds is None:  # a primitive's params are of one kind: those of a body or not
            holds = bodied[primitive] = bool(inner_jaxprs(eqn))
        if holds:
            for inner in inner_jaxprs(eqn):
                todo += inner.eqns
    return False


#: per primitive, whether its equations hold jaxprs (what :func:`retraced` walks into)
_HOLDS_BODIES: dict[Any, bool] = {}


def staged_where_retraced(values: Any, eqns: Any) -> Any:
    """Inside ``jax.ensure_compile_time_eval``, where ``eqns`` are :func:`retraced`, the
    context to run them on ``values`` in (:func:`evaluated_staged`); else none."""
    return evaluated_staged(values) if retraced(eqns) else contextlib.nullcontext()


def compile_time_eval(values: Any, retraced_eqns: bool) -> Any:
    """``jax.ensure_compile_time_eval()`` to compute ``values``' consequences eagerly,
    also when asked under a ``jax.jit`` trace; for a program holding
    :func:`retraced` equations (``retraced_eqns``), :func:`evaluated_staged` instead
    where ``values`` are concrete (a scan whose body holds a Pallas kernel is lowered
    when it runs: under the folding, the kernel's ``program_id`` failed)."""
    if retraced_eqns and not holds_tracer(values):
        return evaluated_staged(values)
    return jax.ensure_compile_time_eval()


@contextlib.contextmanager
def evaluated_staged(values: Any) -> Any:
    """Inside ``jax.ensure_compile_time_eval``, a context to run :func:`retraced`
    equations on concrete ``values`` in: staged normally, evaluated (not staged into a
    ``jax.jit`` the value is asked under). On tracers, staged normally only."""
    with staged_normally():
        if holds_tracer(values):
            yield
        else:
            with _core.eval_context():
                yield
