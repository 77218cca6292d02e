"""``js.trace``: run a function once under ``jax.make_jaxpr`` and build its Graph.

Steps: bind the arguments to the function's signature (input names come from the
parameter names and pytree key paths), rewrite the function so assignments report
their names (:mod:`jaxsurgery._instrument`), trace it to a closed jaxpr, flatten the
nested calls (:mod:`jaxsurgery._program`) and name every var (:mod:`jaxsurgery._names`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import re
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from . import _select
from ._errors import SliceError, TraceError, short_list, warn
from ._errors import short_repr as _short
from ._frameworks import (
    haiku_rewritten,
    in_place_objects,
    keyed_paths,
    library_calls,
    library_names,
    parameter_labels,
    scoped_module,
    swapped,
    variable_paths,
)
from ._gc import gc_paused
from ._graph import Graph
from ._instrument import (
    Recorder,
    call_in_frame,
    call_method,
    framed_module,
    is_jit,
    is_user_function,
    note_state,
    note_unnamed,
    record,
    rewritten,
)
from ._loop_index import index_templates, template_names
from ._names import assign_names, shadowed_outputs
from ._program import IN_SHARD_MAP, Program
from ._progress import phase, progress, reported
from ._promotion import (
    Decision,
    a_or_an,
    as_traced,
    computed_with,
    guessed,
    held,
    holds,
    out_of_range,
    weak_type_decides,
)
from ._rewrite import _plain_partial
from ._scopes import scope_names


def trace(
    fn: Callable[..., Any],
    *args: Any,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    **kwargs: Any,
) -> Graph:
    """Trace ``fn(*args, **kwargs)`` into a :class:`Graph` of named intermediates.

    Args:
        fn: any function JAX can trace (a ``jax.jit``-ed function is traced through,
            its static arguments static).
        *args, **kwargs: pytrees of arrays, Python scalars, or ``jax.ShapeDtypeStruct``
            (then the graph is abstract: slices must be bound before use). Other
            leaves (strings, functions, an Equinox module's activation) are held
            static, as ``equinox.filter_jit`` does; a bound slice keeps the trace's.
        static_argnums, static_argnames: arguments passed through as Python values,
            as for ``jax.jit``.

    Example:
        >>> import jax.numpy as jnp, jaxsurgery as js
        >>> def f(x, params):
        ...     h = jnp.tanh(x @ params["w"])
        ...     return h.sum()
        >>> g = js.trace(f, jnp.ones((2, 3)), {"w": jnp.ones((3, 4))})
        >>> [v.name for v in g.inputs]
        ['x', "params['w']"]
        >>> g["h"].shape
        (2, 4)
    """
    return _reported_trace(fn, args, kwargs, static_argnums, static_argnames)


#: one trace at a time in the process: while tracing, library classes are patched
#: (see _frameworks.library_calls) and put back after; two traces in threads that
#: overlapped put back each other's patches as the originals, for good
_TRACING = threading.RLock()  # (reentrant: js.trace inside a traced function)


@gc_paused  # saves about a third of the time on 10k-equation programs
def _reported_trace(fn: Callable[..., Any], *rest: Any) -> Graph:
    """:func:`_trace` with its progress line, the collector paused for both (the line's
    end allocates: a collection it set off would land in the trace)."""
    with _TRACING, progress(f"tracing {_name(fn)}"):
        return _trace(fn, *rest)


def _trace(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    static_argnums: int | Sequence[int],
    static_argnames: str | Sequence[str],
) -> Graph:
    """The work of :func:`trace`."""
    target = _unwrap(fn)
    static_argnums, static_argnames = _jit_statics(fn, target, static_argnums, static_argnames)
    binder = _ArgBinder(target, static_argnums, static_argnames)
    bound, leaves, in_names, in_labels, in_aliases = binder.bind(args, kwargs)
    # abstract (a ShapeDtypeStruct), or traced inside a transform (js.trace under
    # jax.jit: the values are the transform's tracers, which decide no cond or loop)
    kinds = {type(x) for x in leaves}
    concrete = not any(issubclass(t, jax.ShapeDtypeStruct) for t in kinds)
    deciding = concrete and not any(issubclass(t, jax.core.Tracer) for t in kinds)

    run, reason = rewritten(target)
    haiku = haiku_rewritten(target, rewritten) if reason else None
    if haiku is not None:  # hk.transform(f).apply: f runs rewritten, as the traced function
        cell, inner, reason = haiku
        haiku_run = swapped(cell, inner)
    else:
        haiku_run = contextlib.nullcontext()
    recorder = Recorder()
    recorder.input_names = frozenset(in_names)
    out_info: dict[str, Any] = {}

    def flat_fn(*flat: Any) -> list[Any]:
        call = binder.rebuild(bound, flat)
        try:
            out = run(*call.args, **call.kwargs)
        finally:
            recorder.let_go()
        out_leaves, tree = jax.tree_util.tree_flatten_with_path(out)
        keyed = keyed_paths(out, [p for p, _ in out_leaves])
        paths = ["out" + jax.tree_util.keystr(p) for p in keyed]
        in_module = _module_leaves(out)
        arrays, statics = [], {}
        for k, (path, (_, x)) in enumerate(zip(paths, out_leaves)):
            if isinstance(x, (jax.Array, *_ARRAYS[1:])) or (
                # a Python number is an array, as jax.jit returns it, but not an Equinox
                # module's field (its dropout p), which stays as it is (as filter_jit)
                isinstance(x, (int, float, complex)) and k not in in_module
            ):
                arrays.append((path, x))
                continue
            try:  # another leaf is held static, as in arguments (an Equinox activation)
                hash(x)
            except TypeError:
                raise TraceError(
                    f"{_name(target)} returned {type(x).__name__} at {path!r}, which is "
                    "neither an array nor a hashable value to return as it is; js.trace "
                    "needs a function returning arrays (a pytree of them)"
                ) from None
            statics[k] = x
        if statics and not arrays:
            k, x = next(iter(statics.items()))
            raise TraceError(
                f"{_name(target)} returned {type(x).__name__} at {paths[k]!r} and no array; "
                "js.trace needs a function returning arrays (a pytree of them)"
            )
        if not arrays:  # None, {}, (): a graph of no outputs, no slice ends anywhere
            raise TraceError(
                f"{_name(target)} returned {_short(out)}, which holds no array; js.trace "
                "needs a function returning arrays (a pytree of them): return the values "
                "you want to look at"
            )
        out_info["tree"] = _select.OutputTree(tree, statics) if statics else tree
        out_info["paths"] = [path for path, _ in arrays]
        out_info["statics"] = [paths[k] for k in statics]
        return [x for _, x in arrays]

    if inspect.isgeneratorfunction(target):
        raise TraceError(
            f"{_name(target)} is a generator function; js.trace needs a function that "
            "returns arrays (collect what it yields and return it)"
        )
    for name, leaf in zip(in_names, leaves):
        _check_leaf(name, leaf)
    phase("running the function", lambda: len(recorder.bindings), "values named")
    try:
        with (
            recorder,
            haiku_run,
            library_calls(
                call_in_frame, call_method, framed_module, is_user_function, note_unnamed
            ),
            library_names(record, note_state),
        ):
            closed = C.make_jaxpr(flat_fn, *leaves)
        recorder.name_constants(closed)
    except RecursionError as e:
        raise TraceError(
            f"tracing {_name(target)} failed: RecursionError: {e} — the rewritten calls of "
            "user functions run in frames of jaxsurgery's (more Python frames for each "
            "call), so a deep recursion reaches Python's limit sooner than a plain "
            f"jax.make_jaxpr; raise it (sys.setrecursionlimit, now {sys.getrecursionlimit()})"
        ) from None
    except _TRACER_ERRORS as e:
        first = str(e).strip().splitlines()[0]
        raise TraceError(
            f"tracing {_name(target)} failed: {type(e).__name__}: {first} — a traced "
            "argument is used where Python needs a concrete value; pass it with "
            "static_argnums/static_argnames (or as a non-array leaf, held static)"
        ) from e
    if reason and scoped_module(target) and (recorder.bindings or recorder.unrewritten):
        reason = None  # a linen module's apply: its modules' methods named what they bind
    notes = [f"no Python variable names in the traced function: {reason}"] if reason else []
    shardings = list(C.jit_shardings(_outer_jit(fn)))
    if shardings:  # (the jit's own options are not in its traced body: hunt U)
        notes.append(
            f"{_name(target)} is a jax.jit given {' and '.join(shardings)}, which the graph "
            "traced through: the functions it returns compute where their arguments lie, "
            "as the function's body does; jit them with yours "
            f"(jax.jit(g.as_function(), {', '.join(f'{k}=...' for k in shardings)}))"
        )
    notes += [
        f"no Python variable names in a function it calls: {why}"
        for why in dict.fromkeys(recorder.unrewritten)
        if why != reason
    ]
    if jax.config.jax_disable_jit:
        notes.append(
            "traced under jax.disable_jit(): JAX runs jit calls and loops op by op then (a "
            "scan's steps are unrolled, named body#k/h where a scan kept whole names "
            "body/h@k), so the graph holds none of them; trace outside it to keep them"
        )
    shadowing = [n for n in in_names if n == "out" or n.startswith(("out[", "out."))]
    if out_info["statics"]:
        notes.append(
            f"{short_list(out_info['statics'])} of the outputs are not arrays: they are held "
            "static, and the functions this graph returns give them back as traced"
        )
    in_place = in_place_objects(bound[0].arguments)
    if in_place:
        notes.append(
            f"{', '.join(in_place)} {'holds' if len(in_place) == 1 else 'hold'} Flax NNX "
            "objects, which the function may update in "
            "place (an optimizer step, BatchNorm statistics, Rngs counts): the functions "
            "this graph returns are pure and do not update the objects passed to them; "
            "return what changes (nnx.state(model)), or trace a function of nnx.split "
            "states that merges them"
        )
    title = f"{_title_name(target)}{binder.signature_text()}"
    # what values are computed from when first asked
    kept = [held(x, aval.dtype) for x, aval in zip(leaves, closed.in_avals)]

    @functools.cache
    def decides() -> dict[int, list[Decision]]:  # looked at when first called
        return weak_type_decides(closed)

    # traced with x64 on, the program takes its inputs' dtypes (float64) as they are:
    # arguments are checked against them, not as JAX makes them when called
    wide = [v.aval.dtype for v in closed.jaxpr.invars] if C.x64_enabled() else None

    def build(fold: bool = True) -> Graph:
        """The graph of the traced jaxpr; ``fold=False`` unrolls every loop in the index."""
        phase(f"indexing {len(closed.jaxpr.eqns)} equations")
        program = Program(closed, kept if deciding else None, fold)
        phase("naming the values")
        bindings, templates, results, body_results = recorder.qualified(program)
        outputs = list(zip(program.outputs, out_info["paths"]))
        scoped, inside = scope_names(program, state=recorder.state_vars(program))
        shadowed = shadowed_outputs(outputs, bindings, program.tags)
        names = assign_names(
            len(program.vars),
            program.primitives,
            in_names,
            [(var, name) for var, name in outputs if name not in shadowed],
            program.tags,
            bindings,
            [*scoped, *results],  # (a module's results by their paths: after its scope)
            inside,
            input_labels=in_labels,
            input_aliases=in_aliases,
        )
        names.hidden = dict.fromkeys(program.sharded_tags, IN_SHARD_MAP)
        tags, scopes = index_templates(program, recorder.state_vars)
        invariant = recorder.invariant_names
        name_notes = []
        if shadowing and _selected(names, "out") in range(len(in_names)):
            # inputs come first: "out" selects the argument (unless the function
            # rebinds it and returns that: then the output takes the name)
            name_notes.append(
                f"the argument {shadowing[0]!r} shadows the outputs' alias: 'out' selects "
                "the argument; select the outputs by their other names or as g.outputs"
            )
            out_info.setdefault("shadowing", name_notes[-1])
        name_notes += (
            [
                f"{short_list(invariant)} name a constant of a loop (what its body closes "
                "over, or a carry it passes on unchanged, which JAX makes one): it is one "
                "value for every iteration, so it has no name per iteration; select it "
                "where it is made, outside the loop"
            ]
            if invariant
            else []
        )
        if shadowed:
            one = len(shadowed) == 1
            # (bound several times, by none the output: ambiguous, g["out"] says so)
            takes = "selects it" if _selected(names, shadowed[0]) is not None else "is ambiguous"
            name_notes.append(
                f"{short_list([repr(n) for n in shadowed])} "
                + ("names a value" if one else "name values")
                + " of the traced function (a Python variable or a tag) other than the "
                + (f"output of that name, and {takes}" if one else "outputs of those names")
                + "; select the outputs as g.outputs"
            )
            out_info.setdefault("shadowing", name_notes[-1])  # (an argument's said first)

        def flatten_args(*a: Any, **k: Any) -> list[Any]:
            return binder.same_call(bound, leaves, in_names, a, k, decides, wide)

        # (the functions a graph makes take the traced function's parameters: jax.jit's
        # static_argnames and donate_argnames find them by name)
        flatten_args.__signature__ = binder.signature  # type: ignore[attr-defined]
        graph = Graph(
            program,
            names,
            flatten_args,
            kept if concrete else None,
            title,
            [*notes, *program.notes, *name_notes],
            out_info["tree"],
            templates=template_names([*tags, *templates], [*scopes, *body_results]),
        )
        graph._rebuild = reported(build, f"unrolling the loops of {_name(target)}")
        return graph

    graph = build()
    if "shadowing" in out_info:  # g.grads("out", ...) would take the value: said now
        warn(out_info["shadowing"])
    return graph


def _selected(names: Any, name: str) -> int | None:
    """The var ``g[name]`` is (None: no var, or several)."""
    found = names.by_canonical.get(name)
    if found is None:
        hits = names.lookup.get(name, ())
        found = hits[0] if len(hits) == 1 else None
    return found


def same_avals(
    flat: list[Any],
    traced: list[Any],
    names: Sequence[str],
    decides: Callable[[], dict[int, list[Decision]]] = dict,
    wide: Sequence[Any] | None = None,
) -> list[Any]:
    """``flat``, checked against the shapes and dtypes the graph was traced with.

    A graph runs the program it traced, whose shapes are fixed: new arguments must
    have the traced shapes and dtypes (under ``jax.vmap``, per example). A Python
    number or bool, or a weakly typed array (what JAX makes of one), of a kind the
    traced dtype holds (an ``int`` where a float was traced) is converted to it; a
    ``float`` where an ``int`` was traced is not. Where a Python number traced
    decided a dtype promotion (``decides()``, see :mod:`jaxsurgery._promotion`), an
    array given for it is refused where ``jax.jit`` would trace another program: where
    its dtype promotes to another than the one decided (a float32 array where
    ``x_bf16 * 2.5`` computed in bfloat16; an int32 array where ``x_bf16 * (n / 1000)``
    did, the int made a float32 on the way); one that promotes to it (a bfloat16
    array) computes what the number did, and is converted to the traced dtype exactly.
    """
    out = []
    array = C.ArrayImpl
    for k, (name, new, old) in enumerate(zip(names, flat, traced)):
        if isinstance(new, jax.ShapeDtypeStruct):  # (an abstract graph's own inputs)
            raise SliceError(
                f"argument `{name}` is a jax.ShapeDtypeStruct, which holds no values: the "
                "functions a graph returns, and bind, need arrays; for shapes alone, call "
                "them under jax.eval_shape"
            )
        if wide is None and type(new) is array and type(old) is array:
            # the common case, an array of the traced type: taken as it is (an eager
            # call of a 200-leaf model checked each leaf at about 8 µs)
            a, b = new.aval, old.aval
            if a.shape == b.shape and a.dtype == b.dtype and a.weak_type == b.weak_type:
                out.append(new)
                continue
        shape, dtype = np.shape(new), _dtype(new)
        # a Python number was traced as the array JAX makes of it (10: int32[])
        traced_dtype = _dtype(old) or jax.dtypes.canonicalize_dtype(jnp.result_type(old))
        if wide is not None:  # traced with x64 on: its dtypes, whatever x64 is now
            traced_dtype = wide[k]
            C.refuses_x64(new, traced_dtype, f"argument `{name}`")
            dtype = new.dtype if isinstance(new, jax.Array) else dtype
        weak = dtype is None or getattr(getattr(new, "aval", new), "weak_type", False)
        was_weak = _dtype(old) is None or getattr(getattr(old, "aval", old), "weak_type", False)
        decisions = decides().get(k, ()) if was_weak and not weak else ()
        decided = computes = None
        for decision in decisions:  # (the first one it would compute otherwise)
            decided, computes = decision[0], computed_with(dtype, traced_dtype, decision)
            if computes != decided:
                break
        if decided is not None and computes != decided:
            would = (
                f"make the function compute in {computes} instead"
                if computes
                else f"not be promoted with {decided} (jax.jit(f) refuses it)"
            )
            if guessed(dtype, traced_dtype, decision):  # (s / 1000 or s * 2: not told)
                would = (
                    "run another program than the traced one: what the function computes "
                    f"from `{name}` before that would run on {dtype}, which jnp makes a "
                    f"{computes} of in `{name} / 1000` or `jnp.sqrt({name})` (computing in "
                    f"{computes}), and keeps {a_or_an(str(dtype))} in `{name} * 2`"
                )
            raise SliceError(
                f"argument `{name}` was traced as a Python number (weakly typed "
                f"{traced_dtype}), which the traced program computes with as {decided}; "
                f"an array of {dtype} would {would}. Pass a Python number (or a weakly "
                "typed array), or trace with an array to call it with arrays"
            )
        exact = decided is not None and jnp.can_cast(dtype, traced_dtype, casting="safe")
        if dtype != traced_dtype and (exact or (weak and holds(traced_dtype, new))):
            # (a Python number for one traced: weakly typed, as jax.jit takes it)
            new = as_traced(new, traced_dtype) if was_weak else jnp.asarray(new, traced_dtype)
            dtype = traced_dtype
        if shape != np.shape(old) or dtype != traced_dtype:
            was = f"{traced_dtype}{list(np.shape(old))}"
            given = type(new).__name__ if dtype is None else f"{dtype}{list(shape)}"
            outside = out_of_range(traced_dtype, new)
            given += f" ({outside})" if outside else ""
            if not all(isinstance(d, int) for d in np.shape(old)):  # jax.export's "b"
                why = (
                    "its symbolic dimensions are another scope's (each "
                    "jax.export.symbolic_shape call makes new ones): pass the "
                    "ShapeDtypeStructs the graph was traced with, or make both in one scope"
                    if given == was  # (printed alike)
                    else "a graph traced with symbolic dimensions runs where they are "
                    "symbolic: under jax.export.export with the ShapeDtypeStructs traced"
                )
                raise SliceError(
                    f"argument `{name}` is {given}, and the graph was traced with {was}: {why}"
                )
            raise SliceError(
                f"argument `{name}` is {given}, but the graph was traced with {was}: a graph "
                "runs the program it traced, for arguments of the traced shapes and dtypes. "
                "Trace with these (js.trace(f, *new_args)), or trace one example and jax.vmap "
                "the function you build from it (where examples do not interact: not under a "
                "BatchNorm in training mode, whose statistics are then each example's own)"
            )
        out.append(as_traced(new, traced_dtype))
    return out


def _dtype(x: Any) -> Any:
    """``x``'s dtype as JAX computes with it (None for a Python number); a typed PRNG
    key's dtype (``key<fry>``) as it is."""
    dtype = getattr(x, "dtype", None)
    return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype, True)


_TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


def _label(key: str, labelled: dict[str, str]) -> str | None:
    """The label of the leaf at ``key`` (``[0].value.data_array``) if it lies in a
    labelled value (``[0].value``): the label, and the rest of the path if any."""
    if not labelled:
        return None
    i = key.find(".value")
    while i >= 0:
        end = i + len(".value")
        label = labelled.get(key[:end])
        rest = key[end:]
        if label is not None and (not rest or rest[0] in ".["):
            return label if rest in ("", ".data_array") else label + rest
        i = key.find(".value", i + 1)
    return None


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _title_name(fn: Any) -> str:
    """``CNN.apply`` for a bound method (its class, not ``Module.apply``), else ``_name``."""
    if inspect.ismethod(fn) and not isinstance(fn.__self__, type):
        return f"{type(fn.__self__).__name__}.{fn.__name__}"
    return _name(fn)


def _check_leaf(name: str, leaf: Any) -> None:
    """A TraceError naming the argument when JAX cannot take ``leaf`` as an array (an
    integer past int32/int64, an object array)."""
    if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
        return  # (a jax.Array is one: the common case, checked first)
    try:
        jax.typeof(leaf)
    except (TypeError, OverflowError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise TraceError(
            f"argument {name} is not an array JAX can trace ({type(e).__name__}: {first}); "
            "pass an array of a JAX dtype, or hold it static (static_argnums/static_argnames)"
        ) from None


def _jit_statics(
    fn: Any, target: Any, nums: int | Sequence[int], names: str | Sequence[str]
) -> tuple:
    """``(static_argnums, static_argnames)``: those given, and those of the ``jax.jit``
    (or jits) ``fn`` was made with (``@partial(jax.jit, static_argnums=1)``), also
    through a ``functools.partial``, a bound method or a decorator's wrapper, for
    ``target``'s parameters."""
    nums, names = _statics(nums, names)
    if type(fn) is types.FunctionType and getattr(fn, "__wrapped__", None) is None:
        return tuple(nums), tuple(names)  # a plain function: no jit around it
    try:
        parameters = _signature(target).parameters
    except (TypeError, ValueError):
        parameters = {}
    # the target's positional parameters: a jit's static position the partial binds by
    # keyword (partial(jitted, n=2)) is no position of the target's
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in parameters.values() if p.kind in kinds]
    star = any(p.kind is p.VAR_POSITIONAL for p in parameters.values())  # jit's *args
    varkw = any(p.kind is p.VAR_KEYWORD for p in parameters.values())  # its **kwargs keys
    shift = 0  # positions the partials and bound methods on the way take
    for _ in range(16):
        if _plain_partial(fn):  # functools.partial(jitted, ...): its arguments come first
            shift += len(fn.args)
            fn = fn.func
        elif isinstance(fn, types.MethodType):  # a jitted method, bound: self comes first
            shift += 1
            fn = fn.__func__
        elif is_jit(fn) and hasattr(fn, "__wrapped__"):
            info = getattr(fn, "_jit_info", None)
            found = [  # (a negative number counts from the end, which nothing binds)
                n if n < 0 else n - shift
                for n in getattr(info, "static_argnums", ())
                if n < 0 or n - shift in range(len(positional)) or (star and n >= shift)
            ]
            nums += [n for n in found if n not in nums]
            found = getattr(info, "static_argnames", ())
            names += [n for n in found if n not in names and (n in parameters or varkw)]
            fn = fn.__wrapped__
        elif isinstance(fn, types.FunctionType) and hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__  # a decorator's wrapper (functools.wraps) around a jit
        elif not isinstance(fn, (type, types.FunctionType)) and is_jit(
            getattr(type(fn), "__call__", None)  # noqa: B004
        ):  # an object whose __call__ is jitted: as its bound method (self first)
            static = isinstance(inspect.getattr_static(type(fn), "__call__"), staticmethod)
            shift += 0 if static else 1
            fn = type(fn).__call__  # noqa: B004
        else:
            break
    return tuple(nums), tuple(names)


def _statics(nums: Any, names: Any) -> tuple[list[int], list[str]]:
    """``static_argnums`` and ``static_argnames`` as lists (one given alone, as jax.jit
    takes it), or a TraceError saying what they take."""
    try:
        found = (
            [nums] if isinstance(nums, int) else list(nums),
            [names] if isinstance(names, str) else list(names),
        )
    except TypeError:
        found = None
    if (
        found is None
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in found[0])
        or not all(isinstance(n, str) for n in found[1])
    ):
        raise TraceError(
            "static_argnums takes an int or a sequence of ints (positions), static_argnames "
            "a str or a sequence of strs (parameter names), as for jax.jit; got "
            f"static_argnums={nums!r}, static_argnames={names!r}"
        )
    return found


def _outer_jit(fn: Any) -> Any:
    """The ``jax.jit``-ed function ``fn`` is, also bound as a method (else ``fn``)."""
    return fn.__func__ if isinstance(fn, types.MethodType) and is_jit(fn.__func__) else fn


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The Python function behind a ``jax.jit``-ed one (same semantics, readable source),
    also bound as a method (``obj.jitted_method``: its function, bound)."""
    method = isinstance(fn, types.MethodType) and is_jit(fn.__func__)
    owner, fn = (fn.__self__, fn.__func__) if method else (None, fn)
    while is_jit(fn) and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    if method:
        fn = types.MethodType(fn, owner)
    if not callable(fn):
        raise TraceError(f"js.trace needs a function, got {type(fn).__name__}: {fn!r}")
    return fn


_ARRAYS = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _is_array_leaf(x: Any) -> bool:
    """Whether a leaf is traced: arrays and Python numbers; a Python ``bool`` is a flag
    (``inference=True``), held static."""
    return isinstance(x, (*_ARRAYS, int, float, complex)) and not isinstance(x, bool)


def _module_leaves(tree: Any) -> set[int]:
    """Positions among ``tree``'s leaves of those inside an Equinox module."""
    is_module = _module_test()
    if is_module is None:
        return set()
    found, at = set(), 0
    for top in jax.tree_util.tree_leaves(tree, is_leaf=is_module):
        n = len(jax.tree_util.tree_leaves(top)) if is_module(top) else 1
        if is_module(top):
            found.update(range(at, at + n))
        at += n
    return found


def _module_test() -> Callable[[Any], bool] | None:
    """What tells an Equinox module (whose non-array leaves are held static), or None
    when Equinox is not imported (then no value is one)."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return None
    module = eqx.Module
    return lambda x: isinstance(x, module)


def _flat(value: Any) -> tuple[list[tuple[Any, Any, bool]], Any]:
    """``[(key path, leaf, traced?)]`` of an argument, and what rebuilds it.

    Inside an Equinox module only arrays are traced, as ``equinox.filter_jit`` does
    (its Python numbers are hyperparameters: ``num_heads``, a dropout ``p``).
    """
    if isinstance(value, _ARRAYS[:3]):  # the common case: an array argument
        return [((), value, True)], (_LEAF, None)
    is_module = _module_test()
    top, treedef = jax.tree_util.tree_flatten_with_path(value, is_leaf=is_module)
    if is_module is None:
        return [(path, x, _is_array_leaf(x)) for path, x in top], (treedef, None)
    out, parts = [], []
    for path, x in top:
        if is_module(x):
            inner, inner_def = jax.tree_util.tree_flatten_with_path(x)
            out += [(path + p, leaf, isinstance(leaf, _ARRAYS)) for p, leaf in inner]
            parts.append((inner_def, len(inner)))
        else:
            out.append((path, x, _is_array_leaf(x)))
            parts.append((None, 1))
    if all(inner is None for inner, _ in parts):  # no module: as without Equinox
        return out, (treedef, None)
    return out, (treedef, parts)


_LEAF = jax.tree_util.tree_structure(0)


def _unflat(how: Any, leaves: list[Any]) -> Any:
    """The inverse of :func:`_flat` for a list of leaves."""
    treedef, parts = how
    if parts is None:
        return jax.tree_util.tree_unflatten(treedef, leaves)
    it = iter(leaves)
    top = [
        next(it)
        if inner is None
        else jax.tree_util.tree_unflatten(inner, [next(it) for _ in range(n)])
        for inner, n in parts
    ]
    return jax.tree_util.tree_unflatten(treedef, top)


_ANY_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


_SIGNATURES: dict[types.CodeType, tuple[tuple, inspect.Signature]] = {}


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, kept per code object for plain functions.

    A model function is often made afresh for each trace (a closure over its config);
    the signature is the same as long as its code, defaults and annotations are, and
    working it out again costs, cold, as much as the rest of a small trace's own work.
    """
    if not isinstance(fn, (type, types.FunctionType, types.MethodType, functools.partial)):
        call = inspect.getattr_static(type(fn), "__call__", None)
        if isinstance(call, staticmethod):  # (inspect drops its first parameter as self's)
            return inspect.signature(call.__func__)
        if isinstance(call, types.FunctionType) and hasattr(type(fn), "__getattr__"):
            # a proxy forwarding attributes (to a bound method it wraps): inspect reads
            # the wrapped function's __code__ through it, its __call__ is what runs
            return inspect.signature(types.MethodType(call, fn))
    if (
        type(fn) is not types.FunctionType
        or getattr(fn, "__signature__", None) is not None
        or getattr(fn, "__wrapped__", None) is not None
    ):  # (not fn.__dict__, which a function makes when first asked for it)
        return inspect.signature(fn)
    annotations = fn.__annotations__
    parts = (
        _NO_PARTS
        if fn.__defaults__ is None and fn.__kwdefaults__ is None and not annotations
        else (
            fn.__defaults__ or (),
            tuple((fn.__kwdefaults__ or {}).items()),
            tuple(annotations.items()),
        )
    )
    known = _SIGNATURES.get(fn.__code__)
    if known is not None and (known[0] is parts or _same_objects(known[0], parts)):
        return known[1]
    signature = inspect.signature(fn)
    if not _plain(parts):  # kept, a default (a jitted layer, an array) would stay alive
        return signature
    if len(_SIGNATURES) > 256:
        _SIGNATURES.clear()
    _SIGNATURES[fn.__code__] = (parts, signature)  # holds the parts: ids stay theirs
    return signature


#: the defaults, keyword defaults and annotations of a function that has none
_NO_PARTS: tuple = ((), (), ())


def _plain(parts: tuple) -> bool:
    """Whether a function's defaults (of ``(defaults, kwdefaults items, annotation
    items)``) are only small immutable values (numbers, strings, None, types), which a
    cache may keep (annotations are types: kept too)."""
    defaults, kwdefaults, _ = parts
    values = [*defaults, *(v for _, v in kwdefaults)]
    return all(v is None or isinstance(v, (bool, int, float, complex, str, type)) for v in values)


def _same_objects(a: tuple, b: tuple) -> bool:
    """Whether two ``(defaults, kwdefaults items, annotation items)`` hold the same
    objects (``is``) under the same names."""
    (da, ka, aa), (db, kb, ab) = a, b
    return (
        len(da) == len(db)
        and all(x is y for x, y in zip(da, db))
        and all(
            len(x) == len(y) and all(p[0] == q[0] and p[1] is q[1] for p, q in zip(x, y))
            for x, y in ((ka, kb), (aa, ab))
        )
    )


class _Parameters(NamedTuple):
    """What binding arguments needs of a signature, worked out once per signature."""

    positional: list[str]  # the names of the positional parameters
    #: the parameter names when every one is a plain positional one without a default
    #: (then positional arguments bind by position alone), else None
    plain: tuple[str, ...] | None
    text: str  # ``(x, params)``, for the graph's title
    star: str | None  # the var-positional parameter (``*args``), if any
    varkw: str | None  # the var-keyword parameter (``**kwargs``), if any


_PARAMETERS: dict[int, tuple[inspect.Signature, _Parameters]] = {}


def _parameters(signature: inspect.Signature) -> _Parameters:
    """:class:`_Parameters` of a signature (kept while :func:`_signature` keeps it)."""
    known = _PARAMETERS.get(id(signature))
    if known is not None and known[0] is signature:
        return known[1]
    params = signature.parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    plain = all(
        p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params
    )
    found = _Parameters(
        [p.name for p in params if p.kind in kinds],
        tuple(signature.parameters) if plain else None,
        str(signature),
        next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None),
        next((p.name for p in params if p.kind is p.VAR_KEYWORD), None),
    )
    if not all(_plain(((p.default,), (), ())) for p in params if p.default is not p.empty):
        return found  # (see _signature: what a default holds is not kept)
    if len(_PARAMETERS) > 256:
        _PARAMETERS.clear()
    _PARAMETERS[id(signature)] = (signature, found)
    return found


class _ArgBinder:
    """Maps the function's arguments to named flat leaves and back."""

    def __init__(self, fn: Callable[..., Any], static_argnums: Any, static_argnames: Any):
        self.fn = fn
        try:
            self.signature = _signature(fn)
        except (TypeError, ValueError):  # a builtin or C function: name leaves args[i]
            self.signature = _ANY_SIGNATURE
        self.parameters = _parameters(self.signature)
        nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self.static_names = set(names)
        unknown = [n for n in names if n not in self.signature.parameters]
        if unknown and self.parameters.varkw is None:
            raise TraceError(
                f"static_argnames={unknown[0]!r} names no parameter of "
                f"{getattr(fn, '__name__', 'fn')}{self.signature}; "
                f"name one of {list(self.signature.parameters)}"
            )
        positional = self.parameters.positional
        #: the var-keyword parameter (``**kwargs``), and its keys held static (names in
        #: static_argnames that no parameter has, as jax.jit takes them)
        self.varkw, self.static_keys = self.parameters.varkw, set(unknown)
        self.static_names.difference_update(unknown)
        #: the var-positional parameter (``*args``), and its items held static (a static
        #: position past the named ones, as jax.jit takes it)
        self.star, self.static_star = self.parameters.star, set()
        #: negative positions, counted from the end of the arguments of the call (as
        #: jax.jit counts them) when ``*args`` makes that end unknown until then
        self.from_end = [n for n in nums if n < 0] if self.star is not None else []
        for n in nums:
            if self.star is not None and (n >= len(positional) or n < 0):
                if n >= 0:
                    self.static_star.add(n - len(positional))
                continue
            if not -len(positional) <= n < len(positional):
                raise TraceError(
                    f"static_argnums={n} is out of range for {getattr(fn, '__name__', 'fn')}"
                    f"{self.signature} ({len(positional)} positional parameters)"
                )
            self.static_names.add(positional[n])

    def signature_text(self) -> str:
        return self.parameters.text

    def bind(
        self, args: tuple, kwargs: dict
    ) -> tuple[Any, list[Any], list[str], list[tuple[int, str]], list[tuple[int, str]]]:
        """``(bound arguments, flat dynamic leaves, leaf names, (leaf, label) of leaves
        a library labels: penzai parameters, (leaf, alias) of Flax NNX variables' values:
        ``m.lin.kernel`` for ``m.lin.kernel.value``)``."""
        for n in self.from_end:  # the arguments' end is known now
            at = len(args) + n
            if 0 <= at < len(self.parameters.positional):
                self.static_names.add(self.parameters.positional[at])
            elif at >= 0:
                self.static_star.add(at - len(self.parameters.positional))
            else:
                raise TraceError(
                    f"static_argnums={n} is out of range for the {len(args)} positional "
                    f"arguments given to {getattr(self.fn, '__name__', 'fn')}{self.signature}"
                )
        bound_obj = self._arguments(args, kwargs)
        items = [
            (name, value, self._flat(name, value))
            for name, value in bound_obj.arguments.items()
            if name not in self.static_names
        ]
        leaves: list[Any] = []
        names: list[str] = []
        labels: list[tuple[int, str]] = []
        aliases: list[tuple[int, str]] = []
        for name, value, (flat, _) in items:
            labelled = parameter_labels(value)
            variables: set[str] | None = None  # found when a key first ends in .value
            paths = keyed_paths(value, [p for p, _, _ in flat])
            for path, (_, leaf, traced) in zip(paths, flat):
                if traced:
                    key = jax.tree_util.keystr(path) if path else ""
                    label = _label(key, labelled)
                    if label:
                        labels.append((len(leaves), label))
                    if key.endswith(".value"):
                        variables = variable_paths(value) if variables is None else variables
                        if key[: -len(".value")] in variables:
                            aliases.append((len(leaves), name + key[: -len(".value")]))
                    leaves.append(leaf)
                    names.append(name + key)
        return (bound_obj, items), leaves, names, labels, aliases

    def _flat(self, name: str, value: Any) -> tuple[list[tuple[Any, Any, bool]], Any]:
        """:func:`_flat` of an argument, the static items of ``*args`` held static."""
        flat, how = _flat(value)
        if name == self.star and self.static_star:
            flat = [(p, x, t and p[0].idx not in self.static_star) for p, x, t in flat]
        if name == self.varkw and self.static_keys:
            flat = [(p, x, t and p[0].key not in self.static_keys) for p, x, t in flat]
        return flat, how

    def _arguments(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        plain = self.parameters.plain
        try:
            if plain is not None and not kwargs and len(args) == len(plain):
                return inspect.BoundArguments(self.signature, dict(zip(plain, args)))
            return self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TraceError(
                f"the arguments do not fit {getattr(self.fn, '__name__', 'fn')}"
                f"{self.signature}: {e}; pass the arguments you would pass to the function"
            ) from None

    @functools.cached_property
    def _defaults(self) -> dict[str, Any]:
        """What each parameter is when a call leaves it out."""
        found: dict[str, Any] = {}
        for p in self.signature.parameters.values():
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                found[p.name] = ()
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                found[p.name] = {}
            elif p.default is not inspect.Parameter.empty:
                found[p.name] = p.default
        return found

    def same_call(
        self,
        traced: Any,
        leaves: list[Any],
        names: Sequence[str],
        args: tuple,
        kwargs: dict,
        decides: Callable[[], dict[int, list[Decision]]] = dict,
        wide: Sequence[Any] | None = None,
    ) -> list[Any]:
        """The flat dynamic leaves of new arguments, checked against the traced call
        (``traced``: what :meth:`bind` gave for it, ``leaves`` and ``names`` its leaves;
        ``wide``: the program's input dtypes, when traced with x64 on).

        The program was traced for one call: the same arguments, each of the same
        structure, its held-static parts (static arguments, Python bools, an Equinox
        module's non-array fields, its activation say) the same, and its array leaves
        of the same shapes and dtypes (:func:`same_avals`). Anything else is a
        :class:`SliceError`, not a run of the traced program on other inputs.
        """
        old_obj, old_items = traced
        new_obj = self._arguments(args, kwargs)
        defaults = self._defaults
        given = new_obj.arguments

        def traced_value(name: str) -> Any:
            return old_obj.arguments.get(name, defaults.get(name, _MISSING))

        # an argument left to its default in one call and passed in the other is the
        # same call when the value passed is the default
        for name, value in given.items():
            if name not in old_obj.arguments and not _same_static(traced_value(name), value):
                raise SliceError(
                    f"argument `{name}` is {_short(value)}, but the graph was traced with it "
                    f"left to its default ({_short(traced_value(name))}), which the program "
                    "holds fixed (a default is not one of the graph's inputs); pass "
                    f"`{name}` to js.trace to make it one"
                    f"{_UNDER_JIT if _is_tracer(value) else ''}"
                )
        for name in sorted(self.static_names):
            old, new = traced_value(name), given.get(name, defaults.get(name, _MISSING))
            if not _same_static(old, new):
                raise SliceError(
                    f"static argument `{name}` is {_short(new)}, but the graph was traced with "
                    f"{_short(old)}: {_FIXED}{_UNDER_JIT if _is_tracer(new) else ''}"
                )
        star = (traced_value(self.star), given.get(self.star, ())) if self.static_star else ((), ())
        for k in sorted(self.static_star):
            if k < min(map(len, star)) and not _same_static(star[0][k], star[1][k]):
                raise SliceError(
                    f"static argument `{self.star}[{k}]` is {_short(star[1][k])}, but the graph "
                    f"was traced with {_short(star[0][k])}: {_FIXED}"
                    f"{_UNDER_JIT if _is_tracer(star[1][k]) else ''}"
                )
        keys = (
            (traced_value(self.varkw), given.get(self.varkw, {})) if self.static_keys else ({}, {})
        )
        for key in sorted(self.static_keys):
            old, new = (k.get(key, _MISSING) for k in keys)
            if not _same_static(old, new):
                raise SliceError(
                    f"static argument `{key}` (of **{self.varkw}) is "
                    f"{'left out' if new is _MISSING else _short(new)}, but the graph was "
                    f"traced {'without it' if old is _MISSING else 'with ' + _short(old)}: "
                    f"{_FIXED}"
                    f"{_UNDER_JIT if _is_tracer(new) else ''}"
                )
        flat: list[Any] = []
        for name, _, (old, old_how) in old_items:
            if name not in given and name not in defaults:
                raise SliceError(f"argument `{name}` is missing: {_FIXED}")
            new, new_how = self._flat(name, given[name] if name in given else defaults[name])
            flat += _same_tree(name, old, old_how, new, new_how)
        return same_avals(flat, leaves, names, decides, wide)

    def rebuild(self, bound: Any, flat: Sequence[Any]) -> Any:
        """The bound arguments with the array leaves replaced by ``flat``."""
        bound_obj, items = bound
        it = iter(flat)
        new_values = {}
        for name, _, (old, how) in items:
            new_values[name] = _unflat(how, [next(it) if t else x for _, x, t in old])
        rebuilt = inspect.BoundArguments(bound_obj.signature, dict(bound_obj.arguments))
        rebuilt.arguments.update(new_values)
        return rebuilt


#: why new arguments must fit the traced call, and what to do instead
_FIXED = (
    "a graph runs the program it traced, which fixed the structure of the arguments, "
    "the static ones and their parts that are not arrays; trace with these "
    "(js.trace(f, *new_args))"
)


_MISSING = object()
_UNDER_JIT = (
    "; under jax.jit, pass it as a static argument of the jit (static_argnums or "
    "static_argnames) or close over it"
)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _same_tree(
    name: str, old: list[tuple[Any, Any, bool]], old_how: Any, new: list[tuple], new_how: Any
) -> list[Any]:
    """The new leaves of argument ``name`` the traced call traced, checked: the same
    structure, and its held-static leaves the same. Where the traced call had an array
    a Python number or bool is that array's value (JAX takes it so)."""
    if len(old) != len(new) or not _same_static(old_how, new_how):
        raise SliceError(
            f"argument `{name}` is a tree of another structure than the one traced "
            f"({_tree_difference(old, new, old_how, new_how)}): {_FIXED}"
        )
    leaves = []
    for (path, x, traced), (_, y, _) in zip(old, new):
        if traced:
            leaves.append(y)
        elif not _same_static(x, y):
            where = name + (jax.tree_util.keystr(path) if path else "")
            raise SliceError(
                f"`{where}` is {_short(y)}, but the graph was traced with {_short(x)} (a part "
                f"of an argument that is not an array is held static){_alike(x, y)}: {_FIXED}"
                f"{_UNDER_JIT if _is_tracer(y) else ''}"
            )
    return leaves


def _first_difference(a: Any, b: Any) -> tuple[Any, Any]:
    """The first parts in which two static data differ (in tuples, lists and dicts of
    the same shape, the first unequal items): what a message shows of them."""
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        for x, y in zip(a, b):
            if not _same_static(x, y):
                return _first_difference(x, y)
    if isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b):
        for k in a:
            if not _same_static(a[k], b[k]):
                return _first_difference(a[k], b[k])
    return a, b


def _same_static(old: Any, new: Any) -> bool:
    """Whether a held-static value is the one traced (the same object, or equal; an
    array held static, of the same shape, dtype and values, NaN equal to NaN; a dict,
    list, tuple, OrderedDict or NamedTuple item by item, a dict's keys in order; an
    object of another class by its own ``==``)."""
    if old is new:
        return True
    arrays = (np.ndarray, jax.Array)
    if isinstance(old, arrays) or isinstance(new, arrays):  # both, or not the same
        if not (isinstance(old, arrays) and isinstance(new, arrays)):
            return False  # (a list for an array: a * 2 repeats it, no number doubles)
        return _same_array(old, new)
    plain = type(old) is type(new) and (
        type(old) in (dict, list, tuple, collections.OrderedDict)
        or (isinstance(old, tuple) and hasattr(old, "_fields"))
    )  # (a NamedTuple: its fields; another subclass's == may read more than its items)
    if not plain:
        try:
            return bool(old == new)
        except Exception:  # an == that is no truth value (arrays inside, another's)
            if type(old) is not type(new) or not isinstance(old, (dict, list, tuple)):
                return False
    if isinstance(old, dict):  # (in order: code may read the order, d.values())
        return list(old) == list(new) and all(_same_static(old[k], new[k]) for k in old)
    return len(old) == len(new) and all(map(_same_static, old, new))


def _same_array(old: Any, new: Any) -> bool:
    """:func:`_same_static` of two arrays (PRNG keys by their data and kind)."""
    if _is_tracer(old) or _is_tracer(new) or old.shape != new.shape:
        return False
    keys = [jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in (old, new)]
    if any(keys):
        if not all(keys) or old.dtype != new.dtype:
            return False
        old, new = jax.random.key_data(old), jax.random.key_data(new)
    try:
        a, b = np.asarray(old), np.asarray(new)
    except Exception:  # (an object numpy cannot read)
        return False
    if jax.dtypes.canonicalize_dtype(a.dtype) != jax.dtypes.canonicalize_dtype(b.dtype):
        return False
    return bool(np.array_equal(a, b, equal_nan=jnp.issubdtype(a.dtype, jnp.inexact)))


def _differing_node(
    old_how: Any, new_how: Any, paths: list[tuple]
) -> tuple[str, str, str, Any, Any] | None:
    """``(key path, type name, the other's type name, its data, the other's data)`` of
    the first node of two flattened arguments (:func:`_flat`) of the same shape whose
    types (a list, a tuple) or node data differ (an Equinox module's static fields), or
    None. ``paths``: the first one's leaves' key paths."""

    def walk(a: Any, b: Any, start: int, depth: int) -> tuple[str, str, str, Any, Any] | None:
        """In the nodes ``a``, ``b`` at ``depth`` (a key per level), holding the leaves
        from ``start`` on."""
        try:
            da, db = a.node_data(), b.node_data()
        except Exception:  # a structure JAX cannot take apart
            return None
        if da is None or db is None:  # leaves
            return None
        if da[0] is not db[0] or not _same_static(da[1], db[1]):
            path = paths[start][:depth] if a.num_leaves else ()
            return jax.tree_util.keystr(tuple(path)), da[0].__name__, db[0].__name__, da[1], db[1]
        for ca, cb in zip(a.children(), b.children()):
            found = walk(ca, cb, start, depth + 1)
            if found is not None:
                return found
            start += ca.num_leaves
        return None

    def first_leaf_depth(tree: Any) -> int:
        depth = 0
        while tree.node_data() is not None and tree.children():
            tree, depth = tree.children()[0], depth + 1
        return depth

    (a, a_parts), (b, b_parts) = old_how, new_how
    if a_parts is None or b_parts is None:
        return walk(a, b, 0, 0)
    start = 0  # the modules inside, each flattened on its own below its place
    for (inner_a, n), (inner_b, _) in zip(a_parts, b_parts):
        if inner_a is not None and inner_b is not None and n:
            found = walk(inner_a, inner_b, start, len(paths[start]) - first_leaf_depth(inner_a))
            if found is not None:
                return found
        start += n
    return walk(a, b, 0, 0)


#: where an object's repr shows its address (which differs for an object made again)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _alike(a: Any, b: Any) -> str:
    """A hint for two static parts that print alike but differ (a function or a partial
    made again: compared by identity)."""
    if _ADDRESS.sub("", _short(a)) != _ADDRESS.sub("", _short(b)):
        return ""
    return (
        "; they print alike, but such objects are equal only to themselves (a function, "
        "a functools.partial or an optimizer made again is another one): pass the object "
        "traced with"
    )


def _tree_difference(old: list[tuple], new: list[tuple], old_how: Any, new_how: Any) -> str:
    """What tells two flattened trees apart: a leaf one has and the other lacks, else
    where their structures first differ."""
    old_keys = [jax.tree_util.keystr(p) for p, *_ in old]
    new_keys = [jax.tree_util.keystr(p) for p, *_ in new]
    missing = [k for k in old_keys if k not in new_keys]
    extra = [k for k in new_keys if k not in old_keys]
    if not new_keys and old_keys:  # (None given)
        return f"no array (traced with {'one' if len(old_keys) == 1 else len(old_keys)})"
    if (new_keys == [""]) != (old_keys == [""]) and not any(
        hasattr(x, "shape") for _, x, *_ in (*old, *new)
    ):  # one side is one value, the other a tree of them, and no array: both as they
        # are (mutable=False where ["batch_stats"] was traced, not "no array at [0]")
        new_value = _unflat(new_how, [y for _, y, *_ in new])
        return f"{_short(new_value)} where {_short(_unflat(old_how, [x for _, x, *_ in old]))} was traced"
    if missing or extra:
        parts = [f"no array{' at ' + missing[0] if missing[0] else ''}"] if missing else []
        if extra:  # (what is there: an array, or static data, a string)
            x = next(x for k, (_, x, *_) in zip(new_keys, new) if k == extra[0])
            what = "an array" if hasattr(x, "shape") else _short(x)
            parts.append(f"{what}{' at ' + extra[0] if extra[0] else ''}")
        if missing and extra:
            return ", ".join(parts)
        there = " there" if (missing or extra)[0] else ""
        why = (
            f"traced with one{there}"
            if missing
            else f"traced with none{there}: None, or static data"
        )
        return f"{parts[0]} ({why})"
    found = _differing_node(old_how, new_how, [p for p, *_ in old])
    if found is not None:
        path, kind, other, a, b = found
        at = f" at {path}" if path else ""
        if kind != other:
            return f"a {other}{at} where a {kind} was traced"
        missing = [k for k in a if k not in b] if kind in ("dict", "OrderedDict") else []
        extra = [k for k in b if k not in a] if kind in ("dict", "OrderedDict") else []
        if missing or extra:  # keys holding no array (None), so not told apart above
            parts = [f"no {path}[{missing[0]!r}]"] if missing else []
            parts += [f"an extra {path}[{extra[0]!r}]"] if extra else []
            return ", ".join(parts) + " (a key without arrays: None, or static data)"
        a, b = _first_difference(a, b)
        return (
            f"the {kind}{at} holds other static data (its parts that are not arrays: an "
            f"eqx.field(static=True), an NNX object's attributes, a function it holds): "
            f"traced {_short(a)}, given {_short(b)}{_alike(a, b)}"
        )
    a, b = str(old_how[0]), str(new_how[0])
    if a == b:
        a, b = str(old_how), str(new_how)
    k = next((i for i, (c, d) in enumerate(zip(a, b)) if c != d), min(len(a), len(b)))
    start = max(0, k - 30)
    return (
        f"the same leaves in other nodes: traced ...{a[start : k + 40]}..., "
        f"given ...{b[start : k + 40]}..."
    )
