"""``Graph`` and ``Var``: the traced program, its vars and their names.

A :class:`Graph` is immutable. It wraps a flat :class:`~jaxsurgery._program.Program`
(the jaxpr is the source of truth), the names of its vars, and, when traced with
concrete arrays, the arguments of the trace so that values and slices are available.

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def f(x, w):
    ...     h = jnp.tanh(x @ w)
    ...     return jnp.sum(h ** 2)
    >>> g = js.trace(f, jnp.ones((2, 3)), jnp.ones((3, 4)))
    >>> g["h"]
    Var(h: f32[2,4] = tanh, index 3)
    >>> [v.name for v in g.inputs], [v.name for v in g.outputs]
    (['x', 'w'], ['out'])
    >>> g.value("h").shape
    (2, 4)
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from . import _select
from ._control_flow import LOOP_PRIMITIVES
from ._copying import Identical
from ._errors import (
    SelectionError,
    SliceError,
    check_like,
    jax_derivative_refusals,
    short_repr,
    warn,
)
from ._made import TakesArguments, one
from ._names import Names
from ._program import Program
from ._promotion import alive, as_traced, deleted, returned
from ._scopes import scope_path
from ._structured import (
    Edit,
    Row,
    Site,
    Step,
    Structured,
    check_hits,
    gathered,
    into_last_iteration,
    loop_value,
    row_value,
)

if TYPE_CHECKING:
    import networkx as nx

    from ._draw import Drawing
    from ._experiments import AttributionFunction, PatchFunction, ValuesFunction
    from ._grads import GradsFunction
    from ._interactive import View
    from ._match import Match
    from ._select import Selection
    from ._slice import Slice


#: the most bytes of computed values a graph keeps (what ``g.value`` computed and its
#: checkpoints; a slice keeps its own context); past it, those asked longest ago go,
#: computed again when asked (a notebook reading every value of a 1 GB-activation
#: model kept them all)
KEPT_VALUES_BYTES = 1 << 30


class _Kept(dict):
    """Computed values by var index, least recently asked first, counting their bytes:
    the rows of one stacked result (an unrolled while_loop's trips) count its bytes once,
    while any is kept; a folded scan's rows (:meth:`loop_row`) count in
    ``LoopIndex.kept_iterations``, which keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0
        self._stacks: dict[int, int] = {}  # id of a stacked result: its rows kept
        self._elsewhere: set[int] = set()  # keys of rows counted by the loop index

    def __setitem__(self, key: int, value: Any) -> None:
        if key in self:
            del self[key]
        super().__setitem__(key, value)
        if type(value) is Row:  # (its rows hold the stack: its id stays its own)
            rows = self._stacks[id(value.array)] = self._stacks.get(id(value.array), 0) + 1
            self.nbytes += _nbytes(value.array) if rows == 1 else 0
        else:
            self.nbytes += _nbytes(value)

    def __delitem__(self, key: int) -> None:
        value = self[key]
        super().__delitem__(key)
        if key in self._elsewhere:
            self._elsewhere.discard(key)
        elif type(value) is Row:
            self._stacks[id(value.array)] -= 1
            if not self._stacks[id(value.array)]:
                del self._stacks[id(value.array)]
                self.nbytes -= _nbytes(value.array)
        else:
            self.nbytes -= _nbytes(value)

    def loop_row(self, key: int, row: Row) -> None:
        """Keep ``row``, of a folded scan's rows the graph keeps (not counted here)."""
        if key in self:
            del self[key]
        super().__setitem__(key, row)
        self._elsewhere.add(key)

    def update(self, items: Any = (), /) -> None:  # type: ignore[override]
        for key, value in dict(items).items():
            self[key] = value

    def asked(self, keys: Collection[int]) -> None:
        """``keys`` were asked now: last to go; then the values asked longest ago go
        until what is kept fits :data:`KEPT_VALUES_BYTES` (``keys`` stay)."""
        for key in keys:
            if key in self:  # (not a transform's tracer, dropped: see _forget_traced)
                super().__setitem__(key, super().pop(key))
        if self.nbytes <= KEPT_VALUES_BYTES:
            return
        for key in [k for k in self if k not in keys]:
            del self[key]
            if self.nbytes <= KEPT_VALUES_BYTES:
                return


def _nbytes(x: Any) -> int:
    return 0 if isinstance(x, jax.core.Tracer) else int(getattr(x, "nbytes", 0) or 0)


#: what a missing argument is (None may be a value: g.replace's)
_NOTHING = object()


class Var(Identical):
    """One value of the program: an input, a constant, or an equation output.

    Vars are hashable and compare by identity; a Var belongs to one Graph.
    """

    __slots__ = ("_graph", "index")

    def __init__(self, graph: Graph, index: int):
        self._graph = graph
        self.index = index

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def name(self) -> str:
        """The unique canonical name."""
        return self._graph._names.canonical[self.index]

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other names that select this var."""
        return self._graph._names.aliases_of(self.index)

    @property
    def aval(self) -> Any:
        return self._graph._program.vars[self.index].aval

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def dtype(self) -> Any:
        return self.aval.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def primitive(self) -> str:
        """The producing primitive; ``"input"`` or ``"const"`` for leaves."""
        return self._graph._program.primitives[self.index]

    @property
    def scope(self) -> str:
        """Name-stack path of the producing equation (``"MLP/Dense_0"``), or ``""``."""
        eqn = self._graph._eqn_of(self.index)
        return "" if eqn is None else scope_path(C.scope_of(eqn.source_info))

    @property
    def source(self) -> str | None:
        """``"file.py:12"`` of the user code that made this var, or None (see
        ``Program.source``)."""
        return self._graph._program.source(self.index)

    @property
    def producers(self) -> tuple[Var, ...]:
        """The vars the producing equation reads."""
        p = self._graph._program
        e = p.producer[self.index]
        return () if e < 0 else tuple(self._graph._vars[i] for i in dict.fromkeys(p.eqn_in[e]))

    @property
    def users(self) -> tuple[Var, ...]:
        """The vars written by equations that read this one."""
        p = self._graph._program
        outs = (i for e in p.users[self.index] for i in p.eqn_out[e])
        return tuple(self._graph._vars[i] for i in dict.fromkeys(outs))

    def __repr__(self) -> str:
        return f"Var({self.name}: {short_type(self.aval)} = {self.primitive}, index {self.index})"


#: primitives seen holding no jaxpr in their parameters (a primitive's parameters
#: are of fixed kinds): _holds_loop skips them without reading their parameters
_FIRST_ORDER: set[Any] = set()


def _holds_loop(jaxpr: C.Jaxpr, loops: Collection[str] = LOOP_PRIMITIVES) -> bool:
    """Whether a jaxpr runs one of ``loops`` (a scan or while_loop) anywhere inside."""
    for eqn in jaxpr.eqns:
        primitive = eqn.primitive
        if primitive.name in loops:
            return True
        if primitive in _FIRST_ORDER:
            continue
        inner = C.inner_jaxprs(eqn)
        if not inner:
            _FIRST_ORDER.add(primitive)
        elif any(_holds_loop(j, loops) for j in inner):
            return True
    return False


def _in_loop(site: Site | None) -> bool:
    return site is not None and any(s.iteration is not None for s in site.steps)


def short_type(aval: Any) -> str:
    """``f32[2,3]`` for an aval."""
    try:
        return aval.str_short(short_dtypes=True)
    except (AttributeError, TypeError):
        return str(aval)


Selector = Any  # int | str | re.Pattern | Var | Selection | a list/tuple/dict of these


class Graph(Identical):
    """The traced program of a function, with named, selectable vars.

    Made by :func:`jaxsurgery.trace`; never mutated.
    """

    def __init__(
        self,
        program: Program,
        names: Names,
        flatten_args: Callable[..., list[Any]],
        flat_args: Sequence[Any] | None,
        title: str,
        notes: Sequence[str] = (),
        out_tree: Any = None,
        structure: Structured | None = None,
        site: Callable[[int], Site | None] | None = None,
        unpatched: dict[int, int] | None = None,
        templates: dict[str, Any] | None = None,
        patched_sites: dict[Site, str | Var] | None = None,
        edited_apart: bool = False,
        unlifted_site: Callable[[int], Site | None] | None = None,
    ):
        from ._loop_index import LoopIndex

        self._program = program
        #: what runs for new arguments: the nested program with this graph's edits
        self._structure = (
            Structured(program.closed, while_trips=program.while_trips)
            if structure is None
            else structure
        )
        self._flat_site = program.site if site is None else site
        #: a flat var's site as deep as its equation (see Program.unlifted_site)
        self._unlifted_site = program.unlifted_site if unlifted_site is None else unlifted_site
        #: body values of loops the index keeps folded (see _loop_index)
        self._loop_index = LoopIndex(self, templates or {})
        #: ``fold=False`` -> this graph with every loop unrolled (set by js.trace)
        self._rebuild: Callable[..., Graph] | None = None
        #: vars holding a value from before a patch: before which (see Site.before)
        self._unpatched = unpatched or {}
        #: sites patched in the structured program only (a graph with folded loops:
        #: its index is its parent's, see _patch_graph.derive), with the patched names
        #: (or the vars: named when asked)
        self._patched_sites = patched_sites or {}
        #: the running program holds edits its index lacks (patched or rewritten in the
        #: running program only): values and slices come from the running program
        self._edited_apart = edited_apart or bool(self._patched_sites)
        #: values inside the matches a g.rewrite replaced, which nothing reads now: by
        #: name (a folded loop's body value by (loop, template var)), the match's
        #: output (see _match.rewritten_away)
        self._rewritten_away: dict[Any, str] = {}
        self._names = names
        self._flatten_args = flatten_args
        self._given_args = None if flat_args is None else tuple(flat_args)
        self._converted_args: tuple | None = None
        #: the functions made from it, one per computation (see _made.one)
        self._made: dict[Any, Any] = {}
        self._title = title
        self._vars = tuple(Var(self, i) for i in range(len(program.vars)))
        self._values = _Kept()  # (see KEPT_VALUES_BYTES)
        #: per template var of a folded scan that ran whole: its stacked values
        self._loop_rows: dict[Any, Any] = {}
        self._loops: bool | None = None  # see _has_loops
        self._given_notes = tuple(notes)
        self._notes: tuple[str, ...] | None = None
        self._out_tree = out_tree

    @property
    def notes(self) -> tuple[str, ...]:
        """What the user should know of this graph: functions run without names, loops
        kept as one equation in the index (and how to name their values), ..."""
        if self._notes is None:
            note = self._loop_index.note()
            # what the bodies of folded loops keep whole (a cond there), once each
            bodies = [n for loop in self._program.folded for n in loop.template.notes]
            found = [*self._given_notes, *([note] if note else []), *bodies]
            self._notes = tuple(dict.fromkeys(found))
        return self._notes

    # -- vars ---------------------------------------------------------------------------
    @property
    def vars(self) -> tuple[Var, ...]:
        """All vars in program order: inputs, constants, then equation outputs."""
        return self._vars

    @property
    def inputs(self) -> tuple[Var, ...]:
        return self._vars[: self._program.num_inputs]

    @property
    def outputs(self) -> tuple[Var, ...]:
        return tuple(self._vars[i] for i in self._program.outputs)

    @property
    def jaxpr(self) -> C.Jaxpr:
        """The flat jaxpr (nested ``jit`` calls inlined); constants are its constvars."""
        return self._program.jaxpr

    @property
    def _function_name(self) -> str:
        """The traced function's name (``loss``, also for ``make.<locals>.loss``;
        ``lambda`` for a lambda), which the functions made from it take."""
        return self._title.split("(")[0].rsplit(".", 1)[-1].strip("<>") or "function"

    @property
    def _signature(self) -> inspect.Signature | None:
        """The traced function's signature (its bound method's, without ``self``), which
        the functions made from it that take its arguments have; None if unknown."""
        return getattr(self._flatten_args, "__signature__", None)

    @property
    def is_concrete(self) -> bool:
        """True when traced with concrete arrays (values and bound slices available)."""
        return self._given_args is not None

    def __len__(self) -> int:
        return len(self._vars)

    def __iter__(self):
        return iter(self._vars)

    def __getitem__(self, selector: int | str | Any) -> Var:
        """One var by index, exact name, glob/regex matching one var, or Var."""
        return _select.one(self, selector)

    def names(self) -> list[str]:
        """Every name that selects something, canonical names first: ``g[name]`` one var,
        or ``g.select(name)`` the several vars a name can have (the outputs of a scope
        instance, ``grad(MLP)/Dense_0``; each binding of a variable bound several times,
        ``c`` of ``c#0`` and ``c#1``, where ``g["c"]`` says it is ambiguous). Values of a
        loop the index keeps whole (a scan, a ``while_loop``) have a name per iteration,
        ``step/h@t``, which this list leaves out (a 10 000-step scan would list each
        10 000 times; ``g.notes`` says which loops): ``g.select("step/h@*")`` selects them."""
        from ._patch_graph import unpatched_names

        return [*self._names.all_names(), *unpatched_names(self)]

    def select(
        self,
        *selectors: Selector,
        primitive: str | Sequence[str] | None = None,
        scope: str | None = None,
        where: Callable[[Var], bool] | None = None,
    ) -> Selection:
        """Vars matching any of ``selectors`` (all vars if none) and every filter.

        Example:
            >>> import jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     z1 = jnp.tanh(x)
            ...     z2 = jnp.tanh(z1)
            ...     return jnp.sin(z2)
            >>> g = js.trace(f, jnp.ones(3))
            >>> g.select("z?").names
            ('z1', 'z2')
            >>> g.select(primitive="tanh", where=lambda v: v.name != "z1").names
            ('z2',)
        """
        return _select.select(self, selectors, primitive=primitive, scope=scope, where=where)

    # -- slicing and derivatives ----------------------------------------------------------
    def slice(
        self, inputs: Selector, outputs: Selector, *, allow_unconnected: bool = False
    ) -> Slice:
        """The sub-computation ``inputs ↦ outputs`` as a JAX function (SPEC §5).

        Example:
            >>> import jax, jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     z1 = jnp.tanh(x)
            ...     z2 = jnp.sin(z1) + x
            ...     return z2
            >>> g = js.trace(f, jnp.ones(3))
            >>> s = g.slice("z1", "z2")        # x is context: held fixed
            >>> jax.jvp(s, (g.value("z1"),), (jnp.ones(3),))[1]
            Array([0.72..., 0.72..., 0.72...], dtype=float32)
        """
        from ._slice import Slice

        if not (isinstance(allow_unconnected, (bool, np.bool_)) or allow_unconnected in (0, 1)):
            raise SliceError(
                f"allow_unconnected must be True or False, got {short_repr(allow_unconnected)}"
            )
        return Slice._build(self, inputs, outputs, allow_unconnected=bool(allow_unconnected))

    def value(self, selector: Selector) -> Any:
        """The traced value of the selected var(s), mirroring the selector's structure."""
        structure, flat = _select.tree(self, selector)
        for v in flat:  # a body value of a loop already run: a row of its stacked values
            rows = self._loop_rows.get(getattr(v, "template", None))
            if rows is not None and v.index not in self._values:
                self._values.loop_row(v.index, Row(rows, v.iteration))
        missing = list(dict.fromkeys(v.index for v in flat if v.index not in self._values))
        if missing:
            args = self._require_args("g.value", check=False)
            # values inside loops: the loop runs once as a loop, exposing them (the
            # flat index would replay every unrolled iteration before them, op by op);
            # so do values after an unrolled loop, and all values of a graph patched in
            # its running program only (its flat index is unpatched)
            after_loop = self._has_loops()
            looped = [
                i
                for i in missing
                if self._edited_apart
                or ((site := self._site(i)) is not None and (after_loop or _in_loop(site)))
            ]
            rest = [i for i in missing if i not in set(looped)]
            every = bool(looped)  # (the running program reads every argument)
            if every:
                alive(args, self.inputs)

            def read(inputs: list[int]) -> None:  # (those the other values are computed
                # from: per request, not every leaf of a 4 000-layer model's each time)
                if not every:
                    alive([args[i] for i in inputs], [self._var(i) for i in inputs])

            whole = {i: site for i in looped if (site := self._whole_loop_site(i)) is not None}
            whole = self._kept_within_budget(whole)
            looped = self._with_other_iterations([i for i in looped if i not in whole])
            with C.compile_time_eval(args, self._program.retraced):
                if whole:
                    self._run_loop_rows(whole, args)
                if rest:
                    self._values.update(self._program.evaluate(rest, args, self._values, read))
                if looped:  # a loop's values stay rows of one stacked result until read
                    vars_ = [self._var(i) for i in looped]
                    try:
                        found = self._values_at(vars_, args, rows=True)
                    except SliceError:  # not made on the traced path: say which, and why
                        raise self._unreached(vars_) from None
                    self._values.update(zip(looped, found))
        values = self._values
        with jax.ensure_compile_time_eval():  # a row taken eagerly, also under a jit trace
            for v in flat:  # (a JAX array of a NumPy constant or argument: see returned)
                values[v.index] = returned(row_value(values[v.index]))
        found = [values[v.index] for v in flat]
        if missing and C.holds_tracer(found):  # (only what was computed now can be one)
            self._forget_traced()
        values.asked({v.index for v in flat})
        return _select.unflatten(structure, found)

    @property
    def _flat_args(self) -> tuple | None:
        """The traced arguments as the function saw them (:func:`as_traced`), converted
        when first needed (js.trace keeps a copy of a NumPy array: see ``held``); one
        deleted before then (donated to a jit: see ``alive``) is left as it is:
        :meth:`_require_args` and ``Program.evaluate`` check the arguments a computation
        reads at each computation (not here: a slice built reads them, and a value that
        reads none of the deleted ones is computed)."""
        if self._given_args is None:
            return None
        if self._converted_args is not None:
            return self._converted_args
        for x, v in zip(self._given_args, self.inputs):  # (traced with x64 on, used off)
            C.refuses_x64(x, v.dtype, f"traced argument {v.name!r}")
        with jax.ensure_compile_time_eval():  # (also when first asked under jax.jit)
            found = tuple(
                x if deleted(x) else as_traced(x, v.dtype)
                for x, v in zip(self._given_args, self.inputs)
            )
        if not C.holds_tracer(found):  # (a transform's tracers, as traced: not kept)
            self._converted_args = found
        return found

    def _forget_traced(self) -> None:
        """Drop the kept values that are a transform's tracers (computed inside
        ``jax.jit``, or from a tracer the function closes over): kept, a later call
        outside that trace raised UnexpectedTracerError."""
        for cache in (self._values, self._loop_rows):
            for k in [k for k, x in cache.items() if C.holds_tracer(x)]:
                del cache[k]
                if cache is self._loop_rows:
                    self._loop_index.forget_kept(k)

    def jvp(self, inputs: Selector, outputs: Selector, tangents: Any) -> tuple[Any, Any]:
        """``(outputs, (∂outputs/∂inputs)·tangents)`` at the traced values, as ``jax.jvp``.

        ``tangents`` are structured like ``inputs``, each shaped like its input (a
        SliceError names the input that is not).
        """
        self._require_args("g.jvp")
        s = self._differentiable_slice(inputs, outputs)
        if s._positional and isinstance(tangents, list):
            tangents = tuple(tangents)
        flat = check_like(tangents, s._in_tree, s.in_vars, "tangent", "input")
        primals = s.input_values()
        with jax_derivative_refusals():
            return jax.jvp(s, primals, s._as_args(_select.unflatten(s._in_tree, flat)))

    def vjp(self, inputs: Selector, outputs: Selector, cotangents: Any) -> tuple[Any, Any]:
        """``(outputs, cotangentsᵀ·∂outputs/∂inputs)`` at the traced values.

        ``cotangents`` are structured like ``outputs``, each shaped like its output.
        """
        self._require_args("g.vjp")
        s = self._differentiable_slice(inputs, outputs)
        flat = check_like(cotangents, s._out_tree, s.out_vars, "cotangent", "output")
        with jax_derivative_refusals():
            out, pullback = jax.vjp(s, *s.input_values())
            return out, s._from_args(pullback(_select.unflatten(s._out_tree, flat)))

    def _differentiable_slice(self, inputs: Selector, outputs: Selector) -> Slice:
        """``self.slice(inputs, outputs)`` for a derivative: a SliceError where it keeps an
        io_callback, which JAX does not differentiate (its error named no value)."""
        from ._slice import IO_CALLBACK_NOTE

        s = self.slice(inputs, outputs)
        if IO_CALLBACK_NOTE in s.notes:
            raise SliceError(f"no derivative of {s!r}: {IO_CALLBACK_NOTE}")
        return s

    def jacobian(
        self, inputs: Selector, outputs: Selector, mode: Literal["auto", "fwd", "rev"] = "auto"
    ) -> Any:
        """``∂outputs/∂inputs`` at the traced values.

        ``mode="auto"`` uses forward mode when the inputs have no more elements than the
        outputs, or when the slice runs a ``while_loop`` (JAX has no reverse mode for
        it), reverse mode otherwise. The result is structured as ``jax.jacfwd``'s with
        ``argnums`` over the slice's positional inputs.
        """
        self._require_args("g.jacobian")
        s = self._differentiable_slice(inputs, outputs)
        for v in (*s.in_vars, *s.out_vars):
            if not jnp.issubdtype(v.dtype, jnp.floating):
                raise SliceError(
                    f"g.jacobian differentiates real floating-point values; {v.name!r} is "
                    f"{v.dtype}. For a complex, holomorphic slice take "
                    "jax.jacfwd(s, holomorphic=True) of s = g.slice(...); for an integer "
                    "value there is no derivative (cast it to float in your function)"
                )
        if mode == "auto":
            n_in = sum(v.size for v in s.in_vars)
            n_out = sum(v.size for v in s.out_vars)
            mode = "fwd" if n_in <= n_out or _holds_loop(s.jaxpr, ("while",)) else "rev"
        if mode not in ("fwd", "rev"):
            raise SliceError(f"unknown jacobian mode {mode!r}; use 'auto', 'fwd' or 'rev'")
        jac = jax.jacfwd if mode == "fwd" else jax.jacrev
        args = s.input_values()
        argnums = tuple(range(len(args)))
        with jax_derivative_refusals(fix=", or mode='fwd'"):
            result = jac(s, argnums=argnums)(*args)
        return s._from_args_tree(result)

    # -- surgery ------------------------------------------------------------------------------
    def grads(self, out: Selector, wrt: Selector) -> dict[str, Any]:
        """``d(sum of out)/d(var)`` for every var in ``wrt``, in ONE backward pass.

        ``wrt`` is a selector or a list/dict of them; the result is a dict keyed by the
        selector strings as given (a var's canonical name otherwise). For the same
        gradients with new arguments each step (inside ``jax.jit``), use
        :meth:`grads_fn`.

        Example:
            >>> import jax.numpy as jnp, jaxsurgery as js
            >>> def f(x, w):
            ...     z1 = jnp.sin(x * w)
            ...     z2 = z1 ** 2
            ...     return z2.sum()
            >>> g = js.trace(f, jnp.ones(2), 3.0)
            >>> sorted(g.grads("out", wrt=["z1", "w"]))
            ['w', 'z1']
        """
        fn = self.grads_fn(out, wrt)
        args = self._require_args("g.grads")
        found = fn.at_flat(args)
        for note in [*fn.bypassed, *fn._selection_notes]:
            warn(f"g.grads: {note}")
        concrete = not C.holds_tracer(found)
        if fn.dropped and concrete and any(not jnp.any(g) for g in found.values()):
            for note in fn.dropped:  # a zero (one scalar each): say if a custom rule
                warn(f"g.grads: {note}")  # dropped it (not what the math says)
        return found

    def grads_fn(self, out: Selector, wrt: Selector) -> GradsFunction:
        """A function of the traced function's arguments giving :meth:`grads`' dict.

        The perturbed program is built once; the function is traceable, so it runs
        inside a jitted training step with new parameters every call.

        Example:
            >>> import jax, jax.numpy as jnp, jaxsurgery as js
            >>> def loss(w, x):
            ...     h = jnp.tanh(x @ w)
            ...     return (h ** 2).mean()
            >>> g = js.trace(loss, jnp.eye(2), jnp.ones((3, 2)))
            >>> monitor = jax.jit(g.grads_fn("out", ["h", "w"]))
            >>> monitor(2 * jnp.eye(2), jnp.ones((3, 2)))["h"].shape
            (3, 2)
        """
        from ._grads import GradsFunction

        return one(GradsFunction(self, out, wrt))

    # -- experiments (see _experiments) ----------------------------------------------
    def values_fn(self, selector: Selector) -> ValuesFunction:
        """``f(*args, **kwargs) -> {key: value}``: the selected intermediates for new
        arguments of the traced function.

        Keys are the selector strings passed (a glob or regex: the names it matched);
        a dict ``{key: selector}`` keys by its own keys, stacking what a selector
        selects on a new leading axis (``{"h": "step/h@*"}``: one row per iteration).
        Only the ancestors of the selected values run (nothing after the last one);
        ``jax.jit``, ``jax.vmap`` and ``jax.grad`` run on it.

        Example:
            >>> import jax, jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     h = jnp.sin(x)
            ...     return jnp.exp(h).sum()
            >>> g = js.trace(f, jnp.zeros(2))
            >>> jax.jit(g.values_fn(["h"]))(jnp.zeros(2))
            {'h': Array([0., 0.], dtype=float32)}
        """
        from ._experiments import ValuesFunction

        return one(ValuesFunction(self, selector))

    def patch_fn(self, selector: Selector) -> PatchFunction:
        """``p(patches, *args, **kwargs) -> outputs``: the function with the selected
        vars replaced by ``patches[key]`` (keys as in :meth:`values_fn`; a key left out
        is not patched).

        The patches are arguments: ``jax.vmap`` over them runs a sweep as one
        compiled call, and gradients flow to patches and arguments alike.

        Example:
            >>> import jax, jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     h = jnp.sin(x)
            ...     return (2 * h).sum()
            >>> p = js.trace(f, jnp.zeros(2)).patch_fn("h")
            >>> jax.vmap(lambda v: p({"h": v}, jnp.zeros(2)))(jnp.eye(2)).tolist()
            [2.0, 2.0]
        """
        from ._experiments import PatchFunction

        return one(PatchFunction(self, selector))

    def attribution_fn(self, out: Selector, wrt: Selector) -> AttributionFunction:
        """``a(clean_args, corrupt_args, **kwargs) -> {key: (a_clean − a_corrupt) ·
        ∂sum(out)/∂a}``, the gradient taken at the corrupted run: attribution patching,
        the linear estimate of what patching ``a`` from the clean run into the
        corrupted one changes, for every ``wrt`` var from one backward pass (at a complex
        value, the real part of that product: the change of the real output).

        ``clean_args`` and ``corrupt_args`` are tuples of the traced function's
        positional arguments; keyword arguments (a keyword-only parameter, parameters
        passed by name) go to both runs alike. Keys as in :meth:`values_fn`.

        Example:
            >>> import jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     h = 3 * x
            ...     return (h ** 2).sum()
            >>> a = js.trace(f, jnp.ones(2)).attribution_fn("out", "h")
            >>> a((jnp.ones(2),), (jnp.zeros(2),))["h"].tolist()  # (3 - 0) * 2 * 0
            [0.0, 0.0]
        """
        from ._experiments import AttributionFunction

        return one(AttributionFunction(self, out, wrt))

    def replace(self, selector: Selector, value_or_fn: Any = _NOTHING) -> Graph:
        """A new Graph whose program uses ``value`` (or ``fn(old)``) at the selected var(s).

        Activation patching: every equation after the var, and the outputs, see the new
        value. The patched var keeps the var's names; the old value stays available as
        ``<name>.unpatched`` (a gradient or slice there goes through the patch).
        Compose with :meth:`as_function` and ``jax.grad``. A value inside a loop
        (``step/h@t``) is patched at that iteration of the running loop; a graph with
        loops kept folded keeps its index (nothing is unrolled).

        Example:
            >>> import jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     h = jnp.tanh(x)
            ...     return (h * 2.0).sum()
            >>> g = js.trace(f, jnp.ones(3))
            >>> ablated = g.replace("h", lambda h: h.at[0].set(0.0))
            >>> float(ablated.as_function()(jnp.ones(3)))
            3.04...
        """
        from ._patch_graph import replace

        if value_or_fn is _NOTHING:  # g.replace({"z1": 0.0}), as patch_fn's patches are given
            raise SliceError(
                f"g.replace takes a selector and what to put there, g.replace('z1', 0.0), got "
                f"{short_repr(selector)} alone; for several patches, chain the calls "
                "(g.replace('z1', 0.0).replace('z2', fn)) or use g.patch_fn"
            )
        return replace(self, selector, value_or_fn)

    def match(self, pattern_fn: Callable[..., Any], *args: Any) -> tuple[Match, ...]:
        """Occurrences of ``pattern_fn``'s computation, by dataflow and primitives.

        ``args`` are example arrays (or ``jax.ShapeDtypeStruct``) for tracing the
        pattern. Each :class:`~jaxsurgery._match.Match` has ``.inputs``, ``.outputs``
        and ``.vars`` usable in :meth:`slice`. See :mod:`jaxsurgery._match`.

        Example:
            >>> import jax.numpy as jnp, jaxsurgery as js
            >>> def f(x):
            ...     return jnp.tanh(jnp.tanh(x * 2.0) * 2.0)
            >>> g = js.trace(f, jnp.ones(3))
            >>> [m.inputs[0].index for m in g.match(lambda a: jnp.tanh(a * 2.0), jnp.ones(3))]
            [0, 2]
        """
        from ._match import match

        return match(self, pattern_fn, *args)

    def rewrite(
        self, pattern_fn: Callable[..., Any], replacement_fn: Callable[..., Any], *args: Any
    ) -> Graph:
        """A new Graph where each match's output is ``replacement_fn(*match.inputs)``."""
        from ._match import rewrite

        return rewrite(self, pattern_fn, replacement_fn, *args)

    def as_function(self) -> Callable[..., Any]:
        """The (patched) whole function, with the original signature; jittable."""

        return one(WholeFunction(self))  # (one: jax.jit of it in a loop compiles once)

    # -- views ----------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """A networkx view: nodes are var indices, edges dataflow labelled by equation.

        An edge links each input of an equation to each of its outputs: a loop the index
        keeps as one equation (a scan, a ``while_loop``) links every operand to every
        result, also where one result reads only some operands (``a`` of a scan carrying
        ``(sin(a), cos(b))`` has an edge from ``b``'s start): the dependence of each
        result is not split inside it. Edges the equation does not read are
        ``control=True``: what decides an inlined ``cond`` or ``while_loop`` (its
        predicate, index or carry) links to every equation inside it, and its operands
        to its results (another branch or trip count may read them), as for windows and
        connectivity; the others are ``control=False``."""
        import networkx as nx

        p = self._program
        graph = nx.DiGraph()
        for v in self._vars:
            graph.add_node(
                v.index,
                name=v.name,
                shape=v.shape,
                dtype=str(v.dtype),
                primitive=v.primitive,
            )
        Literal, index = C.Literal, p.index
        for e, (ins, outs) in enumerate(zip(p.eqn_in, p.eqn_out)):
            eqn = p.jaxpr.eqns[e]
            reads = {index.get(a) for a in eqn.invars if type(a) is not Literal}
            graph.add_edges_from(
                (i, o, {"eqn": e, "primitive": eqn.primitive.name, "control": i not in reads})
                for i in ins
                for o in outs
            )
        return graph

    def to_dot(
        self,
        highlight: Slice | Selector | None = None,
        max_nodes: int = 150,
        *,
        depth: int | None = None,
        expand: bool = False,
    ) -> str:
        """Graphviz DOT text of the graph; ``highlight`` a Slice or any selector.

        Past ``max_nodes`` vars (or with ``depth=``) groups are boxes (see
        :mod:`jaxsurgery._draw`); ``expand=True`` opens the groups the highlight ends in.
        """
        from ._draw import to_dot

        return to_dot(self, highlight, max_nodes, depth, expand)

    def draw(
        self,
        highlight: Slice | Selector | None = None,
        max_nodes: int = 150,
        engine: str = "auto",
        *,
        depth: int | None = None,
        expand: bool = False,
    ) -> Drawing:
        """An SVG picture (shown inline in notebooks); arguments as for :meth:`to_dot`."""
        from ._draw import draw

        return draw(self, highlight, max_nodes, engine, depth, expand)

    def view(self, highlight: Slice | Selector | None = None, *, depth: int | None = None) -> View:
        """An interactive picture for notebooks (pan, zoom, open groups, search), or a
        standalone page with ``.save("g.html")`` (see :mod:`jaxsurgery._interactive`)."""
        from ._interactive import View

        return View(self, highlight, depth)

    def __repr__(self) -> str:
        from ._table import graph_table

        return graph_table(self)

    def _repr_html_(self) -> str:
        from ._table import graph_title, var_table_html

        return var_table_html(list(self.vars), graph_title(self), "; ".join(self.notes))

    # -- internals ------------------------------------------------------------------------
    def _site(self, i: int) -> Site | None:
        """Where var ``i`` (a virtual one too) lives in the nested program."""
        n = len(self._program.vars)
        if i >= n:
            return self._loop_index.vars[i - n].site()
        site = self._flat_site(i)
        if site is not None and i in self._unpatched:  # a value before a patch there
            site = site.at(self._unpatched[i])
        return site

    def _patches_at(self, site: Site | None) -> int:
        """How many patches (``replace``, ``rewrite``) this graph made at ``site``."""
        counts = self.__dict__.get("_patch_counts")
        if counts is None:  # (counted once: per site, a glob over 10 000 patched
            # iterations counted every edit for each, 25 s)
            counts = self._patch_counts = collections.Counter(
                e.site for e in self._structure.edits if e.kind == "apply"
            )
        return counts.get(site, 0)

    def _order(self, i: int) -> tuple[int, ...]:
        """Program order of var ``i``: a folded loop's values just before its results, by
        iteration, then body position (not by when they were first asked for); a result
        that is the last iteration's carry sorts as that iteration's value, so that
        ``step/h@*`` comes in iteration order, also for a reverse scan."""
        n = len(self._program.vars)
        if i < n:
            return self._loop_index.result_order(i) or (i, 0)
        return self._loop_index.vars[i - n].order()

    def _run_order(self, i: int) -> tuple[int, ...]:
        """When var ``i`` is computed: a value that runs later cannot depend on it (a
        folded loop's iterations in the order they run: a reverse scan's backwards)."""
        n = len(self._program.vars)
        if i < n:
            return (i, 0)
        return self._loop_index.vars[i - n].order(run=True)

    def _virtual(self, i: int) -> bool:
        return i >= len(self._program.vars)

    def _site_of(self, var: Var) -> Site:
        """The var's place in the nested program, or a SliceError."""
        site = self._site(var.index)
        if site is None and var.primitive == "const" and var.index in self._program.outputs:
            raise SliceError(
                f"{var.name!r} is a constant ({var.aval.str_short()}: a Python number the "
                "function returns as it is), not a value the program computes: there is no "
                "computation to patch there, and its gradient is zero; patch or "
                "differentiate a value the program computes"
            )
        if site is None:
            raise SliceError(
                f"{var.name!r} is a value jaxsurgery's index made up (a loop input or "
                "output slice, or a value inside a patch), not one of the program's: "
                "select the value it was made from instead"
            )
        return site

    def _sites_of(self, vars_: Sequence[Var], edits: Sequence[Edit] = ()) -> list[Site]:
        """Each var's site (:meth:`_site_of`); a scan's result, the carry its last
        iteration returns, asked with other iterations of that value (``step/h@*``),
        where that iteration makes it (``_structured.into_last_iteration``), so the
        loop runs once for them all. Not where an edit is at the result after the loop
        (of ``edits``, the run's others: a perturbation of the result alone), or in a
        patched graph (a patch of the result runs there): what is read of it after
        such an edit must stay after it."""
        sites = [self._site_of(v) for v in vars_]
        loops = {loop_value(s) for s in sites} - {None}
        if self._structure.edits or not loops:  # (no other iteration asked: as they are)
            return sites
        after = {e.site for e in edits}
        closed = self._structure.closed
        moved = []
        for site in sites:
            found = None
            if loop_value(site) is None and site not in after:
                found = into_last_iteration(closed, site)
            moved.append(found if found is not None and loop_value(found) in loops else site)
        return moved

    def _exposing(self, vars_: Sequence[Var], edits: Sequence[Edit] = ()) -> tuple:
        """The structured program exposing ``vars_`` (after ``edits``), and its guards.

        Returns ``(structured, value edits in the order of vars_, guard edits)``; a
        guard is a hit edit that must be reached (the var's cond branch or while trip
        exists). A var holding a value from before a patch is exposed before that
        patch (see ``Site.before``).
        """
        exposures, guards = [], []
        for site in self._sites_of(vars_, edits):
            exposures.append(Edit(site, "expose"))
            if site.path_bound:
                guards.append(Edit(Site(site.steps, ()), "hit"))
        structured = self._structure.with_edits(*edits, *exposures, *guards)
        return structured, exposures, guards

    def _values_at(
        self,
        vars_: Sequence[Var],
        flat_args: Sequence[Any],
        path: Sequence[tuple[Edit, bool]] = (),
        what: Sequence[Var] = (),
        rows: bool = False,
    ) -> list[Any]:
        """Values of ``vars_`` for new function arguments, from the structured program.

        Traceable. Raises a SliceError (under ``jit``: when run) if a var lives on a
        path (a cond branch, a while trip) the arguments do not take, or if a ``path``
        hit is not as expected (``what`` names the vars that need that path).
        ``rows=True`` leaves a loop's values as rows of its stacked result (see
        ``_structured.row_value``).
        """
        # a value the index made inside a patch (the broadcast of a bias a rewrite's
        # replacement adds, its `.at[1]` index) has no place in the nested program: it
        # is computed from the flat index, from the values with a place it reads (none
        # for a constant, the same for every argument)
        made_up = {v.index for v in vars_ if self._site(v.index) is None}
        frontier = self._placed_ancestors(made_up)
        placed = [v for v in vars_ if v.index not in made_up]
        placed += [self._var(i) for i in frontier if i not in {v.index for v in placed}]
        structured, exposures, guards = self._exposing(placed, [e for e, _ in path])
        _, exposed = structured.run(flat_args, outputs=False, callbacks=False)
        # the vars that need the path (a slice's own) first: the context only follows
        message = self._path_message(list(dict.fromkeys([*what, *vars_])))
        check_hits(
            [(h, True, message) for h in gathered([exposed.raw(h) for h in guards])]
            + [(exposed[e], expected, message) for e, expected in path]
        )
        found = {v.index: exposed.raw(e) if rows else exposed[e] for v, e in zip(placed, exposures)}
        if made_up:
            known = {i: found[i] for i in frontier}
            found.update(self._program.evaluate(sorted(made_up), flat_args, known))
        return [found[v.index] for v in vars_]

    def _placed_ancestors(self, made_up: set[int]) -> list[int]:
        """The nearest ancestors with a place in the nested program of flat vars that
        have none (the values a patch's replacement reads), program inputs aside."""
        p = self._program
        found: dict[int, None] = {}
        stack, seen = list(made_up), set(made_up)
        while stack:
            e = p.producer[stack.pop()]
            for i in p.eqn_in[e] if e >= 0 else ():
                if i in seen or i < p.num_inputs + p.num_consts:
                    continue
                seen.add(i)
                if self._site(i) is None:
                    stack.append(i)
                else:
                    found[i] = None
        return list(found)

    def _whole_loop_site(self, i: int) -> Site | None:
        """For a body value of a folded loop (a virtual var), its site at every iteration
        at once (a range; see ``_structured.Step``; a while_loop's traced trips, see
        ``LoopIndex.kept_iterations``), or None where that is not how it is computed (a
        cond or loop around it). In a patched graph it is exposed after the patches
        there, at every iteration: one run of the patched loop for all (each iteration
        asked ran the loop up to it, compiled again: 200 ms a value at 1 000 steps)."""
        from ._loop_index import VirtualVar

        v = self._loop_index.vars[i - len(self._program.vars)] if self._virtual(i) else None
        if not isinstance(v, VirtualVar):  # (a value before a patch: at its iteration)
            return None
        loop = v._loop
        length = self._loop_index.kept_iterations(v)
        if v.template.inner or length is None or length < 2:
            return None
        site, depth = v.site(), len(loop.steps)
        if (
            site is None
            or site.path_bound not in ((), (depth,))  # (a while_loop's trips: all reached)
            or len(site.steps) <= depth
            or site.steps[depth].iteration != v.iteration
        ):
            return None
        if any(s.iteration is not None for s in (*site.steps[:depth], *site.steps[depth + 1 :])):
            return None  # loops around it or inside it
        place = [(s.eqn, s.branch) for s in site.steps[: depth + 1]]
        if not loop.is_scan and any(
            [(s.eqn, s.branch) for s in e.site.steps[: depth + 1]] == place
            for e in self._structure.edits
        ):
            return None  # a patch in a while_loop's body may change its trips (each asked
            # is then checked reached): its traced count does not hold
        at = site.steps[depth]
        steps = (
            *site.steps[:depth],
            Step(at.eqn, at.branch, range(length)),
            *site.steps[depth + 1 :],
        )
        return Site(steps, site.vars)

    def _kept_within_budget(self, whole: dict[int, Site]) -> dict[int, Site]:
        """The values of ``whole`` (see :meth:`_whole_loop_site`) whose values at every
        iteration the graph keeps now, counting them (``LoopIndex.kept_iterations``: a
        value past the graph's budget runs the loop up to its iteration)."""
        index, n = self._loop_index, len(self._program.vars)
        return {
            i: site
            for i, site in whole.items()
            if index.kept_iterations(index.vars[i - n], keep=True) is not None
        }

    def _run_loop_rows(self, sites: dict[int, Site], flat_args: Sequence[Any]) -> None:
        """Values of body values of folded scans (by index, with their whole-loop sites):
        each template's values at every iteration from one run of the loop, kept stacked
        (a later ``name@t`` is a row), with no var made per iteration."""
        n = len(self._program.vars)
        edits: dict[Any, Edit] = {}
        for i, site in sites.items():
            v = self._loop_index.vars[i - n]
            if v.template not in edits:
                edits[v.template] = Edit(site, "expose")
        structured = self._structure.with_edits(*edits.values())
        _, exposed = structured.run(flat_args, outputs=False, callbacks=False)
        for template, edit in edits.items():
            self._loop_rows[template] = exposed.raw(edit)
        for i in sites:
            v = self._loop_index.vars[i - n]
            self._values.loop_row(i, Row(self._loop_rows[v.template], v.iteration))

    def _with_other_iterations(self, looped: list[int]) -> list[int]:
        """``looped`` and the other iterations of the same body values, not yet cached.

        One run of a loop exposes a body value at every iteration as one stacked
        result, so a later ``g.value("step/h@7")`` is a lookup.
        """
        program = self._program
        if not looped or self._structure.edits or not hasattr(program, "closed"):
            return looped
        more = dict.fromkeys(looped)
        for i in looped:
            if self._virtual(i):
                virtual = self._loop_index.vars[i - len(program.vars)]
                more.update((v.index, None) for v in self._loop_index.other_iterations(virtual))
                continue
            found = program.locations.get(program.vars[i])
            if found is not None:
                more.update((j, None) for j, _ in program.locate(found[1]))
        asked = set(looped)
        return [
            j for j in more if j in asked or (j not in self._values and _in_loop(self._site(j)))
        ]

    def _unreached(self, vars_: Sequence[Var]) -> Exception:
        """The error for values the traced arguments do not make (a folded while_loop's
        iteration past its trip count, or a value on a path they do not take)."""
        for v in vars_:
            loop = getattr(v, "_loop", None)
            if loop is None or loop.is_scan:
                continue
            n = self._loop_index.length(loop, need=True)
            if n is not None and v.iteration >= n:
                last = f"; its iterations are @0 to @{n - 1}" if n else ""
                return SelectionError(
                    f"{v.name!r} is never made: its while_loop runs {n} time"
                    f"{'s' if n != 1 else ''} for the traced arguments{last}"
                )
        names = ", ".join(v.name for v in vars_[:4]) + (", ..." if len(vars_) > 4 else "")
        return SliceError(
            f"{names}: not made for the traced arguments (they take another branch of a "
            "cond, or fewer trips of a while_loop, than the one that makes it)"
        )

    def _path_message(self, vars_: Sequence[Var]) -> str:
        """The error for arguments that leave the path ``vars_`` (some made on it)
        were traced on, naming those made on it only (not inputs, made on every path)."""
        bound = [v for v in vars_ if getattr(self._site(v.index), "path_bound", ())]
        vars_ = bound or vars_
        names = ", ".join(v.name for v in vars_[:4]) + (", ..." if len(vars_) > 4 else "")
        return (
            f"the arguments take another path through a cond or while_loop than the "
            f"traced ones, and some of {names} exist only on the traced path; use "
            "arguments that take the same branch / trip count, or cut outside the "
            "cond / loop"
        )

    def _has_loops(self) -> bool:
        """Whether the nested program holds a scan or while_loop (anywhere)."""
        if self._loops is None:
            self._loops = _holds_loop(self._structure.closed.jaxpr)
        return self._loops

    def _var(self, i: int) -> Var:
        """Var ``i``, a virtual one too."""
        n = len(self._vars)
        return self._vars[i] if i < n else self._loop_index.vars[i - n]

    def _eqn_of(self, i: int) -> C.JaxprEqn | None:
        e = self._program.producer[i]
        return None if e < 0 else self._program.jaxpr.eqns[e]

    def _require_args(self, what: str, check: bool = True) -> tuple[Any, ...]:
        """The traced arguments, checked alive (``check=False``: by the caller, those
        it reads)."""
        if self._flat_args is None:
            raise SliceError(
                f"{what} needs values, but this graph was traced with abstract "
                "arguments (jax.ShapeDtypeStruct); trace with concrete arrays, or "
                "bind a slice to arguments with s.bind(*args)"
            )
        return alive(self._flat_args, self.inputs) if check else self._flat_args


class WholeFunction(Identical, TakesArguments):
    """``g.as_function()``: the (patched) whole function, named and called as the traced
    one (its ``__name__``, signature, arguments and output tree); a copy is itself, as
    a function's is (``jax.jit`` of a copy compiles nothing again).

    Example:
        >>> import jax, jax.numpy as jnp, jaxsurgery as js
        >>> def f(x):
        ...     h = jnp.sin(x)
        ...     return h * 2.0
        >>> fn = js.trace(f, jnp.ones(2)).replace("h", 1.0).as_function()
        >>> fn.__name__, jax.jit(fn)(jnp.zeros(2)).tolist()
        ('f', [2.0, 2.0])
    """

    _kind = "function"

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return self.graph._function_name

    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.graph._flatten_args(*args, **kwargs)
        outs, _ = self.graph._structure.run(flat)
        return _select.unflatten(self.graph._out_tree, outs)
