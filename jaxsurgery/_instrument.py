"""Python names: rewrite the traced function so assignments and calls report themselves.

``js.trace`` runs a copy of the user's function whose assignments are followed by a
mark ``z1 = __js_mark__("z1", z1)``, and whose calls ``f2(x)`` become
``__js_call__("f2", f2)(x)``. A mark records which traced value a name holds; a call
wrapper opens a *frame* (so names inside are qualified, ``f2/h``), runs a rewritten
copy of the callee when it is user code, and records what the call returned. Neither
adds an **equation** to the program (but under a transform, below), so tracing costs the
same as ``jax.make_jaxpr`` plus a few Python calls per statement.

Which calls open a frame: calls of anything that is not JAX itself, numpy or a
builtin: user functions, methods (``self.l1(x)`` is the call ``l1``), callable
objects (``nn.Dense(4)(x)`` is ``Dense``), library modules. Only *user code* (a
function whose file is not in site-packages or the standard library) is rewritten,
so names reach inside user functions, ``jax.jit``-ed user functions (jitted again around
the rewritten body with the same options) and user ``custom_jvp``/``custom_vjp``
functions (rebuilt around the rewritten body with the same rules). Library code
(Flax, Haiku, Equinox internals) runs untouched inside its frame; its values are
named by scopes instead.

A JAX transform applied inside the traced function (``jax.vmap(model)(x)``,
``jax.value_and_grad(loss)(w, x)``, ``jax.checkpoint``, ``jax.jvp``, Equinox's
``filter_vmap``/``filter_value_and_grad``, NNX's ``nnx.value_and_grad``...) transforms
the rewritten copy of a user function, so the names inside are recorded: a name holds
the batch under ``vmap`` and the forward value under a derivative
(:func:`jaxsurgery._compat.tracer_atom`). The call of a derivative names what the
function binds, not what the call returns. Such a transform remakes whole the
sub-programs traced inside it (a ``jit`` call, a loop body, a ``cond`` branch): there a
mark returns its value tagged with a token (:meth:`Recorder._named`), which the remade
program keeps and :class:`~jaxsurgery._program.Program` finds (marks are assignments,
``h = __js_mark__("h", h)``, so the tagged value is the one the code goes on with).

A ``jax.jit``-ed user function gets one rewritten twin per function object, so JAX's
trace cache serves its repeated calls as it would the original's: a layer called 24
times is traced once. A call served from the cache does not run the body, so the
twin keeps, per traced jaxpr, what the body reported when it ran (names, calls,
results, as vars of that jaxpr), and the call's frame replays it. The flat program
holds one copy of the jaxpr's vars per call; each frame names only the copies of its
own call (:class:`_CallSites`), so ``layer#5/pre`` is call 5's value.

Why not equation source lines? The source span of an equation cannot tell loop
iterations apart (``x = jnp.sin(x)`` in a loop has the same traceback every time) and
misses plain aliases (``a = h`` makes no equation). A marked assignment sees both.

The rewriting itself (what is marked, how the copy is compiled): :mod:`jaxsurgery._rewrite`.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import functools
import inspect
import itertools
import operator
import os
import re
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from . import _compat as C
from ._frameworks import (
    as_pytree_call,
    copied_path,
    haiku_rewritten,
    keyed_paths,
    library_rejit,
    named_array_data,
    reads_as_attribute,
    scoped_module,
    submodule_paths,
    swapped,
    wraps_it,
)
from ._rewrite import (
    _DERIVATIVE,
    _RUNS,
    _SAME,
    _TRANSFORM_KINDS,
    CALL,
    MARK,
    _plain_partial,
    instrument,
)
from ._scopes import backward_prefix, scope_parts, scope_path
from ._tag import MARK_PREFIX

_state = threading.local()
#: numbers of the tokens that name values under transforms (unique in the process: a
#: jaxpr JAX keeps in its cache keeps its tokens)
_TOKENS = itertools.count()


class Recorder:
    """Collects what one trace's marks and call wrappers report.

    Attributes:
        frames: ``(label, parent frame or -1)`` per call, in call order.
        bindings: ``(frame, name, atom)`` per assignment, in the order they ran
            (frame -1 is the traced function itself).
        returns: ``(frame, key path, atom)`` per traced value a call returned.
        state: atoms of values a library stored as module state (BatchNorm
            statistics; see :meth:`note_state`).
    """

    def __init__(self) -> None:
        self.frames: list[tuple[str, int]] = []
        #: the names of the traced function's arguments' leaves (``batch['x']``)
        self.input_names: frozenset[str] = frozenset()
        self.callees: list[Any] = []  # per frame: what was called
        #: per frame: the results of the ``jit`` equation it made (None: not a jit call)
        self.sites: list[tuple[Any, ...] | None] = []
        self._paths: dict[int, dict[int, str] | None] = {}
        #: per id(called object): (it, what runs in its place, its cached jit twin)
        self.targets: dict[int, tuple[Any, Any, _Jitted | None]] = {}
        self.bindings: list[tuple[int, str, Any]] = []
        #: per (frame, name): the atom its last binding bound, and the items of the
        #: list or tuple it was last bound to (see record, _grown)
        self._bound: dict[tuple[int, str], Any] = {}
        self._lists: dict[tuple[int, str], tuple[list[Any], bool | None]] = {}
        #: per frame opened by a call: the JAX trace running when it was entered
        self._entered: dict[int, Any] = {}
        self.returns: list[tuple[int, str, Any]] = []
        self.state: list[Any] = []
        #: names bound to loop constants, which name no iteration (see qualified)
        self.invariant_names: list[str] = []
        #: per binding given in a name stack: (the name stack, the name), see record
        self.scoped: dict[int, tuple[str, str]] = {}
        self._scope_cache: tuple[Any, set[tuple[str, ...]]] | None = None
        #: the program and every start of its scope paths (see _whole_scope)
        self._starts: tuple[Any, set[tuple[str, ...]]] | None = None
        self._stack: list[int] = []
        #: the traces running when the transforms now running were called, outermost
        #: first: values of the first one's jaxpr stay in the program (see _named)
        self._transforms: list[Any] = []
        #: how many of those are derivatives, under which JAX runs a custom_jvp's or
        #: custom_vjp's rule, not its body
        self._derivatives = 0
        #: the open frames of custom_jvp / custom_vjp calls
        self._rules: set[int] = set()
        #: inside checkpoints whose policy saves named values, which a tag would change
        self._untagged = 0
        #: frames of library module methods (Flax linen, Haiku), whose names are scoped
        self._scoped_frames: set[int] = set()
        #: why user functions called while tracing could not be rewritten (no source)
        self.unrewritten: list[str] = []
        #: frames a loop's body runs in, and whether the index keeps that loop whole
        #: (a scan's: its values in the loop's template) or may unroll it (a
        #: while_loop's: its values in the flat program, each trip's copy)
        self.loop_frames: dict[int, bool] = {}
        #: ``(frame, name, array)`` of names bound to concrete arrays (a global weight,
        #: a numpy mask): named where the traced jaxpr holds them as constants
        self.constants: list[tuple[int, str, Any]] = []

    def __enter__(self) -> Recorder:
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _state.stack.pop()

    def let_go(self) -> None:
        """Drop what the traced function called, once it returned: a module whose
        leaves are the trace's tracers (an Equinox layer's bias, a linen scope's
        variables) kept alive by the graph, a leak to ``jax.checking_leaks``."""
        self.targets.clear()
        self._bound.clear()
        self._lists.clear()
        self._entered.clear()
        self.callees = [None] * len(self.callees)

    @property
    def frame(self) -> int:
        return self._stack[-1] if self._stack else -1

    def record(self, name: str, value: Any, scope: str = "", method: Callable | None = None) -> Any:
        """Note that ``name`` holds ``value``; returns the value to hold (see :meth:`_named`).

        ``scope``: a name stack the name is given in (a Flax module's, for what it
        ``sow``s), which starts again inside a lifted transform (``nn.remat``): the
        name becomes ``scope/name`` with the scope completed from the value's own
        scope when names are assigned (see :meth:`_anchored`). ``method``: the library
        method naming the value (NNX's ``sow``): called from user code, it runs in a
        frame of its own, and the name is given in its caller's (``model/feats``, not
        ``model/sow/feats``).
        """
        frame = self._stack[-1] if self._stack else -1
        if method is not None and frame >= 0:
            callee = self.callees[frame]  # (a bound method, or the class's called unbound)
            if getattr(callee, "__func__", callee) is method:
                frame = self.frames[frame][1]
        if (  # the common case, written for speed: one array, no transform, no scope
            type(value) is C.JAXPR_TRACER
            and not scope
            and not self._transforms
            and frame not in self._scoped_frames
        ):
            self.bindings.append((frame, name, value.val))
            return value
        if self._unseen():
            return value
        atoms = None
        if type(value) in (list, tuple) and not scope and frame not in self._scoped_frames:
            atoms = self._grown(frame, name, value)  # (scoped: bound again, each counts)
        if atoms is None:
            value, atoms = self._named(value)
        if not scope and frame in self._scoped_frames:  # a name in a linen/Haiku method
            scope = C.current_scope()
        scope = scope_path(scope) if scope else ""  # no transform marks: vmap(Block_0)
        if scope:
            self.scoped.update((len(self.bindings) + k, (scope, name)) for k in range(len(atoms)))
            name = f"{scope}/{name}"
        if len(atoms) > 1 and not scope:
            # a container's items bound again to what they hold add nothing (each
            # binding costs naming work, as each value does)
            bound = self._bound
            for path, atom in atoms:
                if bound.get(key := (frame, name + path)) is not atom:
                    bound[key] = atom
                    self.bindings.append((frame, name + path, atom))
        else:
            for path, atom in atoms:  # (a loop: a comprehension costs a call)
                self.bindings.append((frame, name + path, atom))
        if not atoms and isinstance(value, (jax.Array, np.ndarray)) and not scope:
            self.constants.append((frame, name, value))
        return value

    def _grown(self, frame: int, name: str, value: Any) -> list[tuple[str, Any]] | None:
        """The atoms of the items a list or tuple of arrays bound to ``name`` again adds
        at the end of those it held when last bound (``hs += [h]`` or ``hs = hs + [h]``
        in a loop): the others are bound already. None where that is not so: items a
        function can change in place (a list, a dict, a module: what they hold is named
        again), a tuple under a transform (which tags each item). Without it, a loop of
        n trips took n² / 2 bindings (2 000 trips: 2 million, 5 s)."""
        if type(value) is tuple and self._transforms and not self._untagged:
            return None
        key = (frame, name)
        last, items = self._lists.pop(key, None), list(value)
        if last is None:  # bound the first time (most lists): whether its items change
            self._lists[key] = items, None  # in place is asked if it is bound again
            return None
        last, unchanging = last
        if unchanging is None:
            unchanging = all(map(_unchanging, last))
        if unchanging and len(items) >= len(last) and all(map(operator.is_, items, last)):
            new = range(len(last), len(items))
            if all(_unchanging(items[i]) for i in new):
                self._lists[key] = items, True
                return [(f"[{i}]{path}", atom) for i in new for path, atom in _atoms(items[i])]
        self._lists[key] = items, None
        return None

    def name_constants(self, closed: Any) -> None:
        """Bind the names :meth:`record` gave concrete arrays to the constants of the
        traced jaxpr that hold them (``w = W`` of a global ``W``, ``mask = np.tril(...)``,
        which JAX takes as a view)."""
        if not self.constants:
            return
        held: dict[int, list[Any]] = {}
        whole: set[tuple[int, Any]] = set()  # (array, constant) holding all of it as it is
        for value, var in zip(closed.consts, closed.jaxpr.constvars):
            held.setdefault(id(value), []).append(var)
            whole.add((id(value), var))
            base = getattr(value, "base", None)
            while isinstance(base, np.ndarray):  # a view's constant holds what it views
                held.setdefault(id(base), []).append(var)
                if _whole_view(value, base):  # (all of it as it is: not m.T, nor m[0])
                    whole.add((id(base), var))
                base = base.base
        inner = _inner_constants(closed.jaxpr)
        for frame, name, value in self.constants:
            found = held.get(id(value), [])
            # one constant holding all of it: every use reads that one (an alias's
            # semantics); several, a part or a transpose of it (``m.T``: naming it gave
            # ``m`` the transpose's value), or a copy of it (a jitted function's own, its
            # backward pass's), and which one the name is cannot be told: unnamed
            # rather than misplaced
            others = [c for c, v in zip(closed.consts, closed.jaxpr.constvars) if v not in found]
            if (
                len(found) == 1
                and (id(value), found[0]) in whole
                and not _holds_equal(value, [*others, *inner])
            ):
                self.bindings.append((frame, name, found[0]))
        self.constants.clear()

    def _anchored(self, binding: int, name: str, full: str, program: Any) -> str:
        """``name`` of a binding given in a name stack (:meth:`record`), with the scope
        completed from ``full``, the scope its value was made in: a name stack inside
        ``nn.remat`` starts at ``CheckpointBlock_0``, while the value's scope is
        ``Net/CheckpointBlock_0/Dense_0``; the name is ``Net/CheckpointBlock_0/...``.
        A value made outside the module (what it was called with) takes the one path
        of ``program`` holding that name stack, if there is one."""
        scope, own = self.scoped[binding]
        parts, rel = scope_parts(full), scope_parts(scope)
        starts = [k for k in range(len(parts) - len(rel) + 1) if parts[k : k + len(rel)] == rel]
        if starts:  # (a stack that starts the value's scope is whole: Haiku's
            # block/act/block of method act holds block twice)
            prefix = [] if starts[0] == 0 else parts[: starts[-1]]
        else:  # made outside the module (its input): the one place the program has it
            prefix = self._only_prefix(rel, program)
        if not prefix:
            return name
        k = name.rfind(f"{scope}/{own}")
        anchored = "/".join([*prefix, *rel])
        return f"{name[:k]}{anchored}{name[k + len(scope) :]}"

    def _whole_scope(self, scope: str, program: Any) -> str:
        """``scope``, a name stack seen while tracing, completed as the one path of
        ``program`` it ends (inside ``nn.remat`` the stack starts again at
        ``CheckpointBlock_0``: the path is ``Net/CheckpointBlock_0``); as it is when
        the program starts with it or has no single such path."""
        rel = scope_parts(scope)
        if self._starts is None or self._starts[0] is not program:
            paths = self._scopes(program)
            self._starts = (program, {p[:k] for p in paths for k in range(1, len(p) + 1)})
        if not rel or tuple(rel) in self._starts[1]:  # the common case: whole already
            return scope
        prefix = self._only_prefix(rel, program)
        return "/".join([*prefix, *rel]) if prefix else scope

    def _only_prefix(self, rel: list[str], program: Any) -> list[str]:
        """The scope parts before ``rel`` in the one place ``program``'s scope paths
        hold it, or ``[]`` (none, several, or at the start)."""
        found = {
            tuple(p[:k])
            for p in self._scopes(program)
            for k in range(len(p) - len(rel) + 1)
            if list(p[k : k + len(rel)]) == rel
        }
        return list(next(iter(found))) if len(found) == 1 else []

    def _scopes(self, program: Any) -> set[tuple[str, ...]]:
        """The scope paths of ``program``'s equations, also in its folded loop bodies
        (computed once per program)."""
        if self._scope_cache is None or self._scope_cache[0] is not program:
            paths = {
                tuple(scope_parts(C.scope_of(e.source_info)))
                for e in program.jaxpr.eqns
                if C.has_scope(e.source_info)
            }
            paths.update(  # and those of folded loop bodies (a linen nn.scan's cell),
                # calls in them inlined (nn.scan(nn.remat(Cell)): a checkpoint's body)
                tuple(scope_parts(f.body_scope(e)))
                for f in program.folded
                if not f.backward  # (its recomputation, in rematted_computation)
                for e in f.template.jaxpr.eqns
                if C.has_scope(e.source_info)
            )
            self._scope_cache = (program, paths)
        return self._scope_cache[1]

    def note_state(self, value: Any) -> Any:
        """Note that a library stores ``value`` as module state (a Flax linen variable
        write, ``hk.set_state``, an Equinox ``State.set``); returns the value to store
        (see :meth:`_named`)."""
        value, atoms = self._named(value)
        self.state.extend(atom for _, atom in atoms)
        return value

    def state_vars(self, program: Any) -> frozenset[int]:
        """Indices of the flat ``program``'s vars that a library stored as state."""
        return frozenset(i for atom in self.state for i, _ in program.locate(atom))

    @contextlib.contextmanager
    def untagged(self) -> Iterator[None]:
        """While a checkpoint whose policy saves named values runs (no mark tags there:
        its values under a transform keep no names)."""
        self._untagged += 1
        try:
            yield
        finally:
            self._untagged -= 1

    @contextlib.contextmanager
    def transformed(self, derivative: bool = False) -> Iterator[None]:
        """While a JAX transform that remakes the jaxprs it is given (``vmap``, a
        derivative) runs a user function."""
        self._transforms.append(C.current_trace())
        self._derivatives += derivative
        try:
            yield
        finally:
            self._transforms.pop()
            self._derivatives -= derivative

    def _named(self, value: Any) -> tuple[Any, list[tuple[str, Any]]]:
        """``(value, [(key path, atom)])`` for a value named: as it is outside a
        transform (or inside a checkpoint whose policy saves named values), else:

        A transform remakes whole the sub-programs traced inside it (a ``jit`` call, a
        loop body, a ``cond`` branch, a ``checkpoint``): their vars are not in the
        program. Such a value is returned tagged (``checkpoint_name``) with a token
        name of its own, which the transform keeps in the program it makes, and the
        token (a ``str`` atom) stands for it; :class:`~jaxsurgery._program.Program`
        finds its copies. Tuples of values are tagged item by item; other containers
        (a module, a list) are left as they are (what they hold keeps its atoms).
        """
        if not self._transforms or self._untagged:
            return value, _atoms(value)
        keep = self._transforms[0]
        atoms: list[tuple[str, Any]] = []

        def named(x: Any, path: str) -> Any:
            atom = C.tracer_atom(x)
            if atom is not None:
                if C.tracer_jaxpr_trace(x) is not keep:
                    atom = f"{MARK_PREFIX}{next(_TOKENS)}"
                    x = checkpoint_name(x, atom)
                atoms.append((path, atom))
                return x
            if type(x) is tuple:
                items = tuple(named(item, f"{path}[{i}]") for i, item in enumerate(x))
                return x if all(a is b for a, b in zip(items, x)) else items
            atoms.extend((path + p, a) for p, a in _atoms(x))
            return x

        return named(value, ""), atoms

    def label(self, label: str | None, fn: Any) -> str:
        """A call's name: its call-site label, or a submodule path, or its own name."""
        if label is not None and not label.isidentifier():
            return label  # an attribute or subscript: already a path
        found = self.place(fn, label) or label or _callable_name(fn)
        return "" if found == "<lambda>" else found  # an anonymous frame: see qualified

    def place(self, fn: Any, label: str | None = None) -> str | None:
        """``fn``'s path in the module whose call is running (``layers[2]``), if any;
        ``label``: the name it is called by (``self.attn(x)``: an attribute of that
        module is its path, found without walking the module's submodules)."""
        if not self._stack:
            return None
        parent = self.callees[self._stack[-1]]
        owner = getattr(parent, "__self__", parent)  # a bound method: its module
        attributes = getattr(owner, "__dict__", None)
        if isinstance(attributes, dict) and parent is not None:
            if label is not None and attributes.get(label) is fn:
                return label
            if label is None:  # (a library module calling one of its own: self.query)
                found = next((k for k, v in attributes.items() if v is fn), None)
                if found is not None and wraps_it(owner, found):
                    return ""  # (jax.vmap(self.mlp) running: an anonymous frame, see label)
                if found is not None and found.isidentifier():
                    return found
        if id(parent) not in self._paths:
            self._paths[id(parent)] = submodule_paths(parent)
        return (self._paths[id(parent)] or {}).get(id(fn))

    def enter(self, label: str, fn: Any = None) -> int:
        self.callees.append(fn)
        self.sites.append(None)
        self.frames.append((label, self.frame))
        self._stack.append(len(self.frames) - 1)
        self._entered[self._stack[-1]] = C.current_trace()
        if isinstance(fn, (jax.custom_jvp, jax.custom_vjp)):
            self._rules.add(self._stack[-1])
        return self._stack[-1]

    def _unseen(self) -> bool:
        """Whether what is named now is in a custom_jvp's or custom_vjp's body under a
        derivative, where JAX runs the rule: the body's values are not in the program,
        and names of them took other calls' copies of a value the body shares."""
        return bool(self._derivatives and self._rules)

    def size(self) -> tuple[int, int, int]:
        """How much was recorded so far (to tell whether a call's body ran)."""
        return len(self.frames), len(self.bindings), len(self.returns)

    def jit_called(
        self, frame: int, start: tuple[int, int, int], jitted: _Jitted, inputs: Any, out: Any
    ) -> None:
        """After a call of a cached ``jit`` (``frame`` opened when ``size()`` was
        ``start``): note its equation; remember what its body reported, or, when JAX
        served the call from its cache and the body did not run, replay that."""
        site = _jit_site(inputs, out)
        if site is not None and self._transforms and not self._kept(out):
            site = None  # an equation in a sub-program the transform remakes
        if site is None:  # under a transform (vmap, grad), or all results forwarded
            if self._transforms:
                self._jit_called_transformed(frame, start, jitted, inputs)
            elif jax.config.jax_disable_jit:  # its body ran in the program, op by op
                return
            elif self.size() != start and isinstance(jitted, _Jitted):
                # (a transform JAX caches, nnx.scan: its results come from no jit)
                self._jit_called_elsewhere(frame, start, jitted, inputs)
            return
        closed, self.sites[frame] = site
        ran = self.size() != start
        known = jitted.bodies.get(id(closed))
        if known is not None and known[0] is not closed:
            known = None  # a jaxpr that died, its id reused
        # under a transform its names are tokens, which a call the transform batches
        # (or differentiates) keeps in its copy: such calls replay it by types too
        key = _types_key(inputs) if self._transforms else None
        if ran and known is None:
            recording = self._subtree(frame, start)
            jitted.remember(closed, recording)
            if key is not None:
                jitted.remember_types(key, recording)
        elif not ran and len(self.frames) == frame + 1:
            if known is not None:
                self._replay(frame, known[1])
            elif (key := key or _types_key(inputs)) is not None and key in jitted.by_types:
                # first called transformed, or in a trace that left no equation
                self._replay(frame, jitted.by_types[key])

    def _jit_called_elsewhere(
        self, frame: int, start: tuple[int, int, int], jitted: _Jitted, inputs: Any
    ) -> None:
        """:meth:`jit_called` for a call whose body ran in a trace that leaves no ``jit``
        equation in the program (a Flax ``nn.scan`` traces its cell once to find what it
        broadcasts, on jax 0.10 by partial evaluation; every result forwarded): the
        calls JAX then serves from its cache replay what the body reported, by the
        arguments' types, and this call names nothing. Its names are vars of the cached
        body, which every call of it shares: kept, they named another call's copies
        (the call after the scan's ``pre`` was ``Net/cell/lay/pre``)."""
        key = _types_key(inputs)
        if key is not None:
            jitted.remember_types(key, self._subtree(frame, start))
        _, b0, r0 = start
        del self.bindings[b0:], self.returns[r0:]

    def _kept(self, out: Any) -> bool:
        """Whether a call's results belong to the jaxpr the transforms keep (not to a
        sub-program one remakes: a jit body traced inside it)."""
        traces = map(C.tracer_jaxpr_trace, jax.tree_util.tree_leaves(out))
        return next((t for t in traces if t is not None), None) is self._transforms[0]

    def _jit_called_transformed(
        self, frame: int, start: tuple[int, int, int], jitted: _Jitted, inputs: Any
    ) -> None:
        """:meth:`jit_called` under a transform, which leaves no equation of the call's
        own to know its jaxpr by: what the body reported is kept by the types of the
        arguments (JAX's cache key, static arguments aside), and replayed by calls it
        serves. A replay whose tokens the program lacks names nothing."""
        key = _types_key(inputs)
        if key is None:
            return
        if self.size() != start:
            jitted.remember_types(key, self._subtree(frame, start))
        elif len(self.frames) == frame + 1 and key in jitted.by_types:
            self._replay(frame, jitted.by_types[key])

    def _subtree(self, frame: int, start: tuple[int, int, int]) -> _Recording:
        """What ``frame`` and the frames inside it reported, frames relative to it."""
        f0, b0, r0 = start
        return _Recording(
            tuple((label, parent - frame) for label, parent in self.frames[f0:]),
            tuple(self.sites[f0:]),
            tuple((f - frame, name, atom) for f, name, atom in self.bindings[b0:]),
            tuple((f - frame, path, atom) for f, path, atom in self.returns[r0:]),
            tuple(sorted((f - f0, kept) for f, kept in self.loop_frames.items() if f >= f0)),
            tuple(
                k
                for k, callee in enumerate(self.callees[f0:])
                if isinstance(callee, (jax.custom_jvp, jax.custom_vjp))
            ),
            tuple(sorted(f - f0 for f in self._scoped_frames if f >= f0)),
        )

    def _replay(self, frame: int, rec: _Recording) -> None:
        """Report again, for ``frame``, what another call of the same jaxpr reported;
        under a derivative, not what a ``custom_jvp``'s or ``custom_vjp``'s body reported
        (JAX runs the rule there: its values are not in the program, and names of them
        took another call's copies: ``block#1/soft/x`` was block#0's)."""
        if rec.frames:
            self.loop_frames.update((len(self.frames) + k, kept) for k, kept in rec.loops)
            self._scoped_frames.update(len(self.frames) + k for k in rec.scoped)
            self.frames += [(label, frame + parent) for label, parent in rec.frames]
            self.callees += [None] * len(rec.frames)  # only a running frame's is read
            self.sites += rec.sites
        gone = _inside(rec, rec.rules) if self._derivatives and rec.rules else set()
        # (what such a call returns is tagged outside it, where the rule's result is: not
        # for one inside another's body)
        inner = gone - {k + 1 for k in rec.rules if rec.frames[k][1] not in gone}
        self.returns += [(frame + f, path, atom) for f, path, atom in rec.returns if f not in inner]
        self.bindings += [
            (frame + f, name, atom) for f, name, atom in rec.bindings if f not in gone
        ]

    def qualified(self, program: Any) -> Qualified:
        """The names of the flat ``program``'s values (see :class:`Qualified`).

        Names bound in the traced function come first, then what calls returned
        (outer calls first), then names bound inside calls (outer first). A value in a
        loop body names each iteration's copy, ``name@t``. A call made more than once
        under the same parent is ``label#k``, k in call order, counting only calls that
        left a value in the program: a body JAX traced twice, or a call that returned no
        array, takes no number. A value inside a ``jit`` call names only the copies the
        program made for that call, not those of other calls of the same jaxpr.
        """
        calls = _CallSites(program, self)
        scope = calls.scopes()
        frames, select = self.frames, calls.select
        own = [select(atom, scope[f] if f >= 0 else None) for f, _, atom in self.bindings]
        back = [
            select(atom, scope[p] if (p := frames[f][1]) >= 0 else None)
            for f, _, atom in self.returns
        ]
        own_t, back_t, constants = self._in_templates(program, scope)
        in_loop = self._in_loop_frames()
        for records, flat, looped in ((self.bindings, own, own_t), (self.returns, back, back_t)):
            _split_by_loops(records, flat, looped, in_loop)
        for records, found_per in ((self.bindings, own), (self.returns, back)):
            _share_tokens(records, found_per)
        for records, found_per in ((self.bindings, own_t), (self.returns, back_t)):
            _share_tokens(records, found_per)
        live = [False] * len(frames)
        for records, found_per in (
            (self.bindings, own),
            (self.returns, back),
            (self.bindings, own_t),
            (self.returns, back_t),
        ):
            for (frame, _, _), found in zip(records, found_per):
                while frame >= 0 and found and not live[frame]:
                    live[frame] = True
                    frame = frames[frame][1]
        # an anonymous frame (a lambda given to a transform or loop, called by no name)
        # adds nothing: what it calls is named, and numbered, as if called where it is
        if self._scoped_frames:  # module methods' frames, named by their whole scope path
            frames = list(frames)
            for f in self._scoped_frames:
                frames[f] = (self._whole_scope(frames[f][0], program), frames[f][1])
        named_parent: list[int] = []  # the nearest frame above with a name (or -1)
        for _, parent in frames:
            anonymous = parent >= 0 and not frames[parent][0]
            named_parent.append(named_parent[parent] if anonymous else parent)
        counts: dict[tuple[int, str], int] = {}
        for (label, _), parent, ok in zip(frames, named_parent, live):
            if ok and label:
                counts[parent, label] = counts.get((parent, label), 0) + 1
        seen: dict[tuple[int, str], int] = {}
        paths: list[str] = []
        depths: list[int] = []
        absolute = self._scoped_frames  # a module method's frame: its module's path
        for f, ((label, parent), above, ok) in enumerate(zip(frames, named_parent, live)):
            k = seen[above, label] = seen.get((above, label), -1) + ok
            own_label = label if counts.get((above, label), 0) <= 1 else f"{label}#{k}"
            outer = paths[above] if above >= 0 and f not in absolute else ""
            paths.append("/".join(p for p in (outer, own_label) if p))
            depths.append(0 if parent < 0 else depths[parent] + 1)
        scoped, anchored = self.scoped, self._anchored

        def path(b: int, f: int, n: str) -> str:
            """A binding's name in its frame; a name given in a module's name stack
            (what a Flax module sows) is a path of modules, as the module's own name
            is, whichever Python call it was made in (``net.apply``)."""
            return n if f < 0 or b in scoped or not paths[f] else f"{paths[f]}/{n}"

        invariant = constants | program.invariant_ids
        self.invariant_names = [
            path(b, f, n)
            for b, ((f, n, atom), found, inside) in enumerate(zip(self.bindings, own, own_t))
            if not found and not inside and id(atom) in invariant
        ]
        named = [  # (name, copies, binding or -1 for a return, the frame's depth)
            (n, found, b, -1)
            for b, ((f, n, _), found) in enumerate(zip(self.bindings, own))
            if f < 0
        ]
        # (a module method's results, named by their paths where they are several
        # arrays, rank as its scope does: after every Python name, see Recorder.leave)
        modules = self._scoped_frames
        returns, results = (
            sorted(
                (
                    (depths[f], paths[f] + path, found, -1)
                    for (f, path, _), found in zip(self.returns, back)
                    # (an anonymous frame's result is its caller's)
                    if found and frames[f][0] and (f in modules) is module
                ),
                key=lambda t: t[0],
            )
            for module in (False, True)
        )
        inner = sorted(
            (
                (depths[f], path(b, f, n), found, b)
                for b, ((f, n, _), found) in enumerate(zip(self.bindings, own))
                if f >= 0 and found
            ),
            key=lambda t: t[0],
        )
        named += [(n, found, b, d) for d, n, found, b in returns]
        named += [(n, found, b, d) for d, n, found, b in inner]

        def flat_names(named: list) -> list[tuple[str, int]]:
            flat, looped = [], []
            for k, (name, found, b, depth) in enumerate(named):
                for i, its in found:
                    scoped_name = (
                        anchored(b, name, _made_in(program, i), program) if b in scoped else name
                    )
                    if not its:
                        flat.append((scoped_name, i))
                        continue
                    # a copy in an iteration of an unrolled loop: named as a folded
                    # loop's template names it (what the body binds before what a call
                    # in it returns), and where it is made (step t's `nv`) before where
                    # the next iteration takes it (step t+1's parameter `c[1]`)
                    key = (its, b < 0, depth, k)
                    looped.append((key, scoped_name + "".join(f"@{t}" for t in its), i))
            return flat + [(name, i) for _, name, i in sorted(looped, key=lambda t: t[0])]

        from ._loop_index import Template

        # (name, template var, the value it is: a nested var, per loop)
        def in_body(b: int, name: str, k: int, ti: int) -> str:  # see _anchored
            if b not in scoped:
                return name
            loop = program.folded[k]
            made_in = _made_in(loop.template, ti)
            prefix = backward_prefix(loop.scope)[0]
            return anchored(b, name, f"{prefix}/{made_in}" if prefix else made_in, program)

        def depth(f: int) -> int:
            return depths[f] if f >= 0 else -1

        def placed(at: tuple, atom: Any) -> tuple[Template, tuple]:
            """A hit ``(loop, template var, inner iterations)``: its template, and the
            value it is (the loop's place in the nested program, the traced atom)."""
            loop = program.folded[at[0]]
            return Template(*at, loop.iterations), (loop.key, atom)

        # ranked as in an unrolled loop's iterations: what the body binds, outer frames
        # first, then what calls in it return
        bound = sorted(
            (
                (depth(f), in_body(b, path(b, f, n), *at[:2]), *placed(at, atom))
                for b, ((f, n, atom), hit, inside) in enumerate(zip(self.bindings, own, own_t))
                if not hit
                for at in inside
            ),
            key=lambda t: t[0],
        )
        returned, module_results = (
            sorted(
                (
                    (depth(f), paths[f] + p, *placed(at, atom))
                    for (f, p, atom), hit, inside in zip(self.returns, back, back_t)
                    if f >= 0 and not hit and frames[f][0] and (f in modules) is module
                    for at in inside
                ),
                key=lambda t: t[0],
            )
            for module in (False, True)
        )
        return Qualified(
            flat_names(named),
            [t[1:] for t in (*bound, *returned)],
            [(i, n) for n, i in flat_names([(n, found, b, d) for d, n, found, b in results])],
            [t[1:] for t in module_results],
        )

    def _in_loop_frames(self) -> list[bool | None]:
        """Per frame, whether it runs inside a loop's body (its own or a frame above):
        True in a loop the index keeps whole, False in one it may unroll, None
        outside loops (the innermost loop decides)."""
        inside: list[bool | None] = []
        for f, (_, parent) in enumerate(self.frames):
            kept = self.loop_frames.get(f)
            inside.append(kept if kept is not None else inside[parent] if parent >= 0 else None)
        return inside

    def _in_templates(
        self, program: Any, outer: list[_Scope | None]
    ) -> tuple[list, list, set[int]]:
        """Per binding and per return: ``[(loop, template var, iterations)]``, where
        the value lies in the bodies of folded loops (see :mod:`jaxsurgery._loop_index`).

        Each body is a flat program of its own: a ``jit`` call in it is scoped to
        its copies there, as in the whole program. Also returns the ids of atoms that
        are a body's constant inputs (one value for every iteration: no copies).
        """
        own: list[list] = [[] for _ in self.bindings]
        back: list[list] = [[] for _ in self.returns]
        frames = self.frames
        constants: set[int] = set()  # ids of atoms that are a body's constant input
        for k, loop in enumerate(program.folded):
            calls = _CallSites(loop.template, self)
            scope = calls.scopes(body=True)
            # the body's constant inputs (a carry JAX found passed on unchanged is one)
            # are one value for every iteration: no name per iteration
            constant = loop.carry_layout()[0]
            for found, records, frame_of in (
                (own, self.bindings, lambda f: f),
                (back, self.returns, lambda f: frames[f][1]),
            ):
                for i, (f, _, atom) in enumerate(records):
                    if loop.backward and type(atom) is str:
                        continue  # a mark a checkpoint recomputes (as _program drops)
                    at = frame_of(f)
                    if not _holds_loop(outer[at] if at >= 0 else None, loop):
                        continue  # a jit call's frame: not another call's loop
                    for ti, its in calls.select(atom, scope[at] if at >= 0 else None):
                        if ti < constant:
                            constants.add(id(atom))
                        else:
                            found[i].append((k, ti, its))
        self._in_own_loops(own, back)
        return own, back, constants

    def _in_own_loops(self, own: list[list], back: list[list]) -> None:
        """Keep a frame inside a kept loop's body to the copies in that loop's body
        (in place): a jitted layer called in two scans' bodies has one jaxpr, a copy
        in each body, and each call's frame found both (``s1/lay/pre#1@0`` was
        s2's value). A body's loop is told by where the body's own values are."""
        frames, kept = self.frames, self.loop_frames
        home: dict[int, set[int]] = {}  # the loops a body's own values are in
        depth: dict[int, set[int]] = {}  # and how many inner iterations their copies have
        for (f, _, atom), found in zip(self.bindings, own):
            if kept.get(f) and type(atom) is not str:  # (a token is any call's)
                home.setdefault(f, set()).update(k for k, _, _ in found)
                depth.setdefault(f, set()).update(len(its) for _, _, its in found)
        if not home:
            return
        nearest: list[int] = []  # per frame: the innermost kept loop body holding it
        innermost: list[int] = []  # and the innermost loop body of any kind
        for f, (_, parent) in enumerate(frames):
            nearest.append(f if f in home else nearest[parent] if parent >= 0 else -1)
            innermost.append(f if f in kept else innermost[parent] if parent >= 0 else -1)
        for records, found_per, frame_of in (
            (self.bindings, own, lambda f: f),
            (self.returns, back, lambda f: frames[f][1]),
        ):
            for i, (f, _, _) in enumerate(records):
                at = frame_of(f)
                loop = nearest[at] if at >= 0 else -1
                if loop < 0 or not home[loop]:
                    continue
                # in that body itself: copies as deep in inner iterations as its own; in
                # a loop inside it (unrolled in the body; kept whole there: no copies),
                # deeper ones
                levels, inner = depth[loop], innermost[at] != loop
                found_per[i] = [
                    c
                    for c in found_per[i]
                    if c[0] in home[loop]
                    and (len(c[2]) > max(levels) if inner else len(c[2]) in levels)
                ]

    def leave(self, frame: int, value: Any) -> Any:
        """Close ``frame``, which returned ``value``; returns the value to return (see
        :meth:`_named`)."""
        self._stack.pop()
        self._rules.discard(frame)  # (a rule's result is tagged outside it: named)
        if self._unseen():
            return value
        if frame in self._scoped_frames:  # a module method's: its module's scope names
            # it; a result of several arrays (an LSTM's output and state), which the
            # scope names together, also by their paths: `lstm[1].cell`
            atoms = _atoms(value) if not self._transforms else []
            if len({id(atom) for _, atom in atoms}) > 1:  # (hk.GRU's (h, h): one)
                self.returns.extend((frame, path, atom) for path, atom in atoms)
            return value
        value, atoms = self._named(value)
        for path, atom in atoms:
            self.returns.append((frame, path, atom))
        return value


def _claims(records: list[tuple[int, str, Any]]) -> list[list[int]]:
    """The records reporting each token (a transform's name for a value), by token."""
    claims: dict[str, list[int]] = {}
    for i, (_, _, atom) in enumerate(records):
        if type(atom) is str:
            claims.setdefault(atom, []).append(i)
    return list(claims.values())


def _split_by_loops(
    records: list[tuple[int, str, Any]],
    flat: list[list[Any]],
    looped: list[list[Any]],
    in_loop: list[bool | None],
) -> None:
    """A token reported by frames inside loops' bodies and by frames outside (a jitted
    layer called in a scan's body and after it, under a transform): each frame keeps
    the copies of its kind, in place. The body of a loop the index keeps whole takes
    the copies in loops' bodies (templates); the body of one it may unroll (a
    while_loop), the flat copies of an iteration; a frame outside loops, the flat
    copies of none. Each frame found all, and an outside call's name went to the
    body's value (and the other way round)."""
    for who in _claims(records):
        kinds = {in_loop[records[i][0]] if records[i][0] >= 0 else None for i in who}
        if len(kinds) < 2:
            continue
        for i in who:
            kind = in_loop[records[i][0]] if records[i][0] >= 0 else None
            if kind is True:
                flat[i] = []
            else:
                flat[i] = [c for c in flat[i] if bool(c[1]) == (kind is False)]
                if kind is None:
                    looped[i] = []


def _share_tokens(records: list[tuple[int, str, Any]], found_per: list[list[Any]]) -> None:
    """Give each of the frames that report one token its own copies of the value.

    A ``jit`` body that ran under a transform reports tokens (:meth:`Recorder._named`),
    and its calls served from JAX's cache replay them: k frames report a token whose
    value has k runs of copies in the program, in call order. The k-th frame takes
    the k-th run (in place, in ``found_per``).
    """
    for who in _claims(records):
        who = [i for i in who if found_per[i]]  # (none here: a loop's, _split_by_loops)
        if len(who) < 2:
            continue
        # a frame placed in its call's equation (a call the transform kept as it is)
        # holds its copies alone; the frames of calls the transform remade (a batched
        # call: no equation of its own to place them by) share the rest
        every = set().union(*(found_per[i] for i in who))
        if any(set(found_per[i]) == every for i in who):
            placed = {c for i in who if set(found_per[i]) < every for c in found_per[i]}
            for i in who:
                if set(found_per[i]) == every:
                    found_per[i] = [c for c in found_per[i] if c not in placed]
        # the frames that found the same copies (the calls of one kind: outside loops,
        # in one loop's body...) share them, the k-th taking the k-th run
        groups: dict[tuple, list[int]] = {}
        for i in who:
            groups.setdefault(tuple(found_per[i]), []).append(i)
        for found, members in groups.items():
            k = len(members)
            if k < 2 or not found or len(found) % k:
                continue
            n = len(found) // k
            for j, i in enumerate(members):
                found_per[i] = list(found[j * n : (j + 1) * n])


class Qualified(NamedTuple):
    """What :meth:`Recorder.qualified` names, in naming priority order: ``flat``, ``(name,
    var index)`` pairs of the flat program's values; ``templates``, ``(name, Template,
    value)`` triples of values of its folded loops (see ``_loop_index.template_names``);
    ``results`` and ``body_results``, the same of the results of modules' methods by
    their paths (``lstm[1].cell``), which rank with the scopes (after them), as
    ``(var index, name)`` pairs and triples."""

    flat: list[tuple[str, int]]
    templates: list[tuple[str, Any, Any]]
    results: list[tuple[int, str]]
    body_results: list[tuple[str, Any, Any]]


class _Recording(NamedTuple):
    """What one run of a ``jit`` body reported: its frames (parents relative to the
    call's frame, 0) and their ``jit`` results, and bindings and returns by relative
    frame. Atoms are vars of the body's jaxpr, the same for every call of it."""

    frames: tuple[tuple[str, int], ...]
    sites: tuple[tuple[Any, ...] | None, ...]
    bindings: tuple[tuple[int, str, Any], ...]
    returns: tuple[tuple[int, str, Any], ...]
    #: which of its frames are a loop's body (positions in ``frames``), each with
    #: whether the index keeps that loop whole (see ``Recorder.loop_frames``)
    loops: tuple[tuple[int, bool], ...] = ()
    #: which of its frames (positions in ``frames``) ran a custom_jvp's or custom_vjp's body
    rules: tuple[int, ...] = ()
    #: which of its frames (positions in ``frames``) ran a module's method (see
    #: ``Recorder._scoped_frames``)
    scoped: tuple[int, ...] = ()


def _inside(rec: _Recording, roots: tuple[int, ...]) -> set[int]:
    """The frames of a recording, as its bindings number them (the call's own 0, the
    frame at position k of ``rec.frames`` k + 1), that are one of ``roots`` (positions)
    or inside one (a frame's parent comes before it)."""
    found = {k + 1 for k in roots}
    for k, (_, parent) in enumerate(rec.frames):
        if parent in found:
            found.add(k + 1)
    return found


def _types_key(inputs: Any) -> Any:
    """The structure and types of a call's arguments (None when one does not hash)."""
    leaves, tree = jax.tree_util.tree_flatten(inputs)
    key = (tree, tuple(getattr(x, "aval", x) for x in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _jit_site(inputs: Any, out: Any) -> tuple[Any, tuple[Any, ...]] | None:
    """``(called jaxpr, results)`` of the ``jit`` equation a call's results come from.

    A result that is one of the call's operands (forwarded) says nothing of the call.
    """
    given = None
    atom = C.tracer_atom
    for x in [out] if atom(out) is not None else jax.tree_util.tree_leaves(out):
        site = C.made_by_call(x)
        if site is None:
            continue
        if given is None:  # the operands' atoms (None for a non-tracer: never a result's;
            # a literal, an operand JAX folded, jnp.float32(3): never one, nor hashable)
            given = {a for a in map(atom, jax.tree_util.tree_leaves(inputs)) if _hashable(a)}
        if not _hashable(found := atom(x)) or found not in given:
            return site
    return None


def _hashable(atom: Any) -> bool:
    """Whether a tracer's atom is a var (a literal does not hash)."""
    return not isinstance(atom, C.Literal)


def _holds_loop(scope: _Scope | None, loop: Any) -> bool:
    """Whether a frame scoped to ``scope`` (its ``jit`` call's inlined copies; None:
    anywhere) holds folded ``loop``: a loop in a jitted function called twice is one
    loop per call, each named by its own call's frames."""
    if scope is None or loop.flat_eqn < 0 or not scope.regions:
        return True  # (no regions: a call inside a loop body, which the template scopes)
    return any(r.start <= loop.flat_eqn < r.end for r in scope.regions)


class _Scope:
    """Where the values of a frame inside a ``jit`` call live: the inlined calls
    (``Region`` s) of its ``jit`` equation, and what picks their copies of a var."""

    __slots__ = ("regions", "ranks", "copies", "own", "params")

    def __init__(self, regions: list[Any], sites: _CallSites) -> None:
        self.regions = regions
        body = C.called_jaxpr(regions[0].eqn).jaxpr if regions else None
        self.ranks = [sites.rank[id(r)] for r in regions]  # each one's place among all
        self.copies = len(sites.copies.get(id(body), ()))  # inlined calls of the body
        self.own, self.params = sites.own_vars(body) if regions else (set(), {})


class _CallSites:
    """Which flat copies of a traced value belong to which call.

    JAX traces a ``jit``-ed function once per argument types, so its k calls share one
    jaxpr and the program holds k copies of each of its vars (``Program.locate`` lists
    them, in program order). A frame of such a call (and the frames inside it) is
    *scoped* to the inlined calls of its own ``jit`` equation: one, or one per
    iteration of an enclosing loop, or per copy of an enclosing call.
    """

    def __init__(self, program: Any, recorder: Recorder) -> None:
        self.program = program
        self.recorder = recorder
        self.by_result: dict[int, list[Any]] = {}  # id(call result var) -> its regions
        self.copies: dict[int, list[Any]] = {}  # id(called jaxpr) -> its regions
        self.rank: dict[int, int] = {}  # id(region) -> its place in copies
        self._starts: dict[int, list[int]] = {}
        self._own: dict[int, tuple[set[int], dict[int, int]]] = {}

    def scopes(self, body: bool = False) -> list[_Scope | None]:
        """Per frame: where its values live, or None (anywhere: not in a ``jit`` call).

        For the ``body`` of a folded loop, a call that is not in it (one around the
        loop) leaves its frames unscoped.
        """
        recorder = self.recorder
        if all(s is None for s in recorder.sites):
            return [None] * len(recorder.frames)
        self._index()
        scope: list[_Scope | None] = []
        for (_, parent), site in zip(recorder.frames, recorder.sites):
            outer = scope[parent] if parent >= 0 else None
            if site is None:
                scope.append(outer)
                continue
            regions = next((self.by_result[id(v)] for v in site if id(v) in self.by_result), [])
            if not regions and body and outer is None:
                scope.append(None)  # a call around the loop: its body is in scope
                continue
            if outer is not None:
                regions = self._within(regions, outer.regions)
            scope.append(_Scope(regions, self))
        return scope

    def _index(self) -> None:
        if self.rank or not self.program.regions:
            return  # indexed already (or nothing to index)
        for r in self.program.regions:
            if r.primitive not in C.CALL_PRIMITIVES:
                continue
            copies = self.copies.setdefault(id(C.called_jaxpr(r.eqn).jaxpr), [])
            self.rank[id(r)] = len(copies)
            copies.append(r)
            for v in r.eqn.outvars:
                if isinstance(v, C.Var) and not isinstance(v, C.DropVar):
                    self.by_result.setdefault(id(v), []).append(r)

    def _within(self, regions: list[Any], outer: list[Any]) -> list[Any]:
        """The regions nested in one of ``outer`` (both sorted by start)."""
        if not regions or not outer:
            return []
        starts = self._starts.get(id(regions))  # regions: a list of by_result, kept
        if starts is None:
            starts = self._starts[id(regions)] = [r.start for r in regions]
        found = []
        for a in outer:
            lo, hi = bisect.bisect_left(starts, a.start), bisect.bisect_left(starts, a.end)
            found.extend(r for r in regions[lo:hi] if r.end <= a.end)
        return found

    def select(self, atom: Any, scope: _Scope | None) -> list[tuple[int, tuple[int, ...]]]:
        """The flat copies ``(index, iterations)`` of ``atom`` that lie in ``scope``."""
        copies = self.program.locate(atom)
        if scope is None or not copies:
            return copies
        if len(copies) == scope.copies and id(atom) in scope.own:
            # a var of the body itself: one copy per inlined call, in program order
            return [copies[k] for k in scope.ranks]
        # a var of a loop or branch inside the call, or one with no copy in some calls
        producer, index = self.program.producer, self.program.index
        pos = scope.params.get(id(atom))
        found = []
        for r in scope.regions:
            if pos is not None:  # a parameter: the operand of this call
                a = r.ins[pos]
                i = index.get(a) if isinstance(a, C.Var) else None
                if i is not None:
                    found.append(next((c for c in copies if c[0] == i), (i, ())))
            else:
                found.extend(c for c in copies if r.start <= producer[c[0]] < r.end)
        return found

    def own_vars(self, body: Any) -> tuple[set[int], dict[int, int]]:
        """ids of a jaxpr's own vars, and the positions of its parameters."""
        found = self._own.get(id(body))
        if found is None:
            own = {id(v) for v in (*body.invars, *body.constvars)}
            own.update(id(v) for e in body.eqns for v in e.outvars)
            found = self._own[id(body)] = (own, {id(v): i for i, v in enumerate(body.invars)})
        return found


def _inner_constants(jaxpr: Any) -> list[Any]:
    """The constants of the closed jaxprs inside ``jaxpr`` (a jitted function's)."""
    found, stack = [], [jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, C.ClosedJaxpr):
                        found += sub.consts
                        stack.append(sub.jaxpr)
                    elif isinstance(sub, C.Jaxpr):
                        stack.append(sub)
    return found


def _whole_view(view: Any, base: np.ndarray) -> bool:
    """Whether NumPy array ``view`` shows all of ``base`` as it is: same data, shape,
    dtype and strides (JAX's constant for ``mask``; ``mask.T``'s is not ``mask``)."""
    return (
        isinstance(view, np.ndarray)
        and view.shape == base.shape
        and view.dtype == base.dtype
        and view.strides == base.strides
        and view.__array_interface__["data"][0] == base.__array_interface__["data"][0]
    )


def _holds_equal(value: Any, constants: list[Any]) -> bool:
    """Whether one of ``constants`` is an array equal to ``value`` (a copy of it)."""
    shape, dtype = np.shape(value), getattr(value, "dtype", None)
    return any(
        np.shape(c) == shape
        and getattr(c, "dtype", None) == dtype
        and (c is value or np.array_equal(np.asarray(c), np.asarray(value)))
        for c in constants
    )


def _made_in(program: Any, index: int) -> str:
    """The scope path var ``index`` of a flat ``program`` was made in ('' for an input)."""
    e = program.producer[index]
    return "" if e < 0 else C.scope_of(program.jaxpr.eqns[e].source_info)


def _atoms(value: Any) -> list[tuple[str, Any]]:
    """``(key path, jaxpr atom)`` of each traced leaf of ``value``."""
    atom = C.tracer_atom(value)
    if atom is not None:  # the common case: one array
        return [("", atom)]
    if (
        isinstance(value, (int, float, complex, bool, str, type(None), types.GeneratorType))
        or is_jit(value)
        or (type(value).__name__ in ("Partial", "VJP") and type(value).__module__.startswith("jax"))
    ):
        # (a jitted function, eqx.filter_jit(model), holds arrays but is none; the
        # function jax.vjp or jax.linearize returns holds their residuals)
        return []
    value = named_array_data(value)  # a penzai NamedArray is its array
    try:
        leaves, tree = jax.tree_util.tree_flatten(value)
    except Exception:  # not a pytree JAX can flatten (a dict keyed by functions): unnamed
        return []
    try:
        paths = _PATHS.get(tree)
    except (TypeError, ValueError):  # node data that cannot be hashed or compared
        paths, tree = None, None
    if paths is None:
        with_path = jax.tree_util.tree_flatten_with_path(value)[0]
        paths = [_key_path(path) for path in keyed_paths(value, [p for p, _ in with_path])]
        if tree is not None and len(_PATHS) < 4096:
            _PATHS[tree] = paths
    out = []
    for path, leaf in zip(paths, leaves):
        atom = C.tracer_atom(leaf)
        if atom is not None:
            out.append((path, atom))
    return out


#: what holds the same values for as long as it lives
_IMMUTABLE = (jax.Array, int, float, complex, str, type(None))


def _unchanging(item: Any) -> bool:
    """Whether an item of a list holds the same values for as long as it lives: an array
    (a tracer), a number, or a tuple of them (not a list, dict or module)."""
    return isinstance(item, _IMMUTABLE) or (
        type(item) is tuple and all(isinstance(i, _IMMUTABLE) for i in item)
    )


def _key_path(path: tuple[Any, ...]) -> str:
    """JAX's ``keystr`` of a leaf's key path, but an attribute that is no identifier
    subscripted (an ``nnx.Dict`` key: ``heads['enc/0']``, whose ``/`` would split the
    name's path), as :func:`~jaxsurgery._frameworks.format_path` writes it."""
    if all(type(k) is not jax.tree_util.GetAttrKey or reads_as_attribute(k.name) for k in path):
        return jax.tree_util.keystr(path)
    return "".join(
        f"[{k.name!r}]"
        if isinstance(k, jax.tree_util.GetAttrKey) and not reads_as_attribute(k.name)
        else jax.tree_util.keystr((k,))
        for k in path
    )


#: key paths of a tree's leaves (``['w']``), by its structure: a layer's parameters
#: are the same tree at every call, and spelling the paths costs more than flattening
_PATHS: dict[Any, list[str]] = {}


def _current() -> Recorder | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


def _mark(name: str | tuple[str, Any], value: Any) -> Any:
    recorder = _current()
    if recorder is None:
        return value
    if type(name) is tuple:  # an item target, (container, key): d['enc']
        name = _item_name(recorder, *name)
        if name is None:
            return value
    return recorder.record(name, value)


#: what a string key of an item target may hold to name it (no selector characters)
_ITEM_KEY = re.compile(r"[A-Za-z_][\w.\-]*")


def _item_name(recorder: Recorder, container: str, key: Any) -> str | None:
    """The name of ``container[key]`` (``acts['enc']``, ``hs[3]``; ``key`` a lambda
    giving it, for a name), None for a key of another kind (a tuple, an object, a
    negative int, a string holding a selector's characters) and for an argument's leaf
    the traced function updates in place (``batch['x'] = batch['x'] / 255`` keeps
    ``batch['x']`` the argument's name)."""
    if type(key) is types.FunctionType:
        key = key()
    if not ((type(key) is int and key >= 0) or (type(key) is str and _ITEM_KEY.fullmatch(key))):
        return None
    name = f"{container}[{key!r}]"
    if recorder.frame < 0 and name in recorder.input_names:
        return None
    return name


#: the library and builtin functions found to run as they are (JAX's, NumPy's, the
#: standard library's: no frame), by id, kept across traces (see _lasting)
_AS_THEY_ARE: dict[int, Any] = {}


def _lasting(fn: Any) -> Any:
    """What decides how ``fn`` runs, where that lives as long as its module: ``fn``
    for a module's function (defined at its top level, of no closure, its defaults
    plain values) or builtin; a method's function for a method of a JAX array
    (``h.sum``, made anew at each read); the function of a JAX jit of such a function
    (``jax.jit(jnp.einsum)`` made per call is not kept, its function is); None for
    anything else (a function made per call, whose defaults may hold tracers; a bound
    method of another object, which a cache would keep alive with its object:
    ``hs.append`` of a list of tracers)."""
    kind = type(fn)
    if kind is types.MethodType:
        return fn.__func__ if isinstance(fn.__self__, jax.Array) else None
    if kind is types.BuiltinFunctionType:
        return fn if isinstance(fn.__self__, types.ModuleType) else None
    if kind is _PJIT_FUNCTION:
        fn = getattr(fn, "__wrapped__", None)
    if type(fn) is not types.FunctionType or fn.__closure__ is not None:
        return None
    if "<locals>" in fn.__code__.co_qualname:  # (its code's: functools.wraps leaves it)
        return None
    defaults = (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values())
    return fn if all(type(d) in _PLAIN_TYPES for d in defaults) else None


#: the types of default values a function kept across traces may have
_PLAIN_TYPES = frozenset({type(None), bool, int, float, complex, str})


_PJIT_FUNCTION = type(jax.jit(abs))


def _call(label: str | None, fn: Any, always: bool = False) -> Any:
    """``fn``, or a wrapper that runs it (rewritten if user code) inside a frame;
    ``always``: JAX functions and builtins get a frame too (run as they are)."""
    recorder = _current()
    if recorder is None:
        return fn
    if type(fn) is _Framed:  # a transformed user function: its frame, named at the call
        return functools.partial(fn.call, label)
    known = recorder.targets.get(id(fn))
    if known is None or known[0] is not fn:
        lasting = _lasting(fn)
        if lasting is not None and _AS_THEY_ARE.get(id(lasting)) is lasting:
            known = (fn, None, None)
        else:
            try:
                target_of = _call_target(fn)
            except Exception:  # an object whose attributes raise (a __getattr__ of its own)
                target_of = (None, None)  # runs as it is
            known = (fn, *target_of)
            if lasting is not None and target_of == (None, None):
                if len(_AS_THEY_ARE) > 4096:
                    _AS_THEY_ARE.clear()
                _AS_THEY_ARE[id(lasting)] = lasting
        # (not a bound method: made anew at each attribute read, it is never found
        # again, and kept it would keep its object alive: a tracer's `h.sum`, a leak
        # to jax.checking_leaks)
        if type(fn) is not types.MethodType:
            recorder.targets[id(fn)] = known
    _, target, jitted = known
    if target is None and not always:  # JAX itself, numpy or a builtin: no frame
        return fn
    if type(target) is _Framed:  # a function jax.checkpoint made: its frame, named here
        return functools.partial(target.call, label)
    target = fn if target is None else target
    if target is _CONTROL_FLOW:
        return _with_named_bodies(fn, _control_flow_bodies()[id(fn)], _loops().get(id(fn), ""))
    if target is _TRANSFORM:
        if isinstance(fn, functools.partial):  # functools.partial(jax.grad, has_aux=True)
            transform = _with_rewritten_function(fn.func, *_transform(fn.func))
            return functools.partial(transform, *fn.args, **fn.keywords)
        return _with_rewritten_function(fn, *_transform(fn))
    name = recorder.label(label, fn)

    def run(*args: Any, **kwargs: Any) -> Any:
        frame = recorder.enter(name, fn)
        start = recorder.size()
        out = None
        try:
            if jitted is not None and recorder._transforms:
                out = jitted.transformed(*args, **kwargs)  # its cache holds tagged bodies
            else:
                out = target(*args, **kwargs)
                if type(out) is types.GeneratorType:  # its body runs when iterated
                    out = _in_frame(recorder, frame, out)
                elif type(out) is _GENERATOR_CONTEXT and type(out.gen) is types.GeneratorType:
                    out.gen = _in_frame(recorder, frame, out.gen)  # entered, then exited
            if jitted is not None:
                owner = getattr(jitted, "owner", None)  # a jitted __call__: its object first
                inputs = (args if owner is None else (owner, *args), kwargs)
                recorder.jit_called(frame, start, jitted, inputs, out)
        finally:
            out = recorder.leave(frame, out)
        return out

    return run


# The rewritten code reaches the marker and the call wrapper as builtins, not as
# closure cells: a function's free variables are locals to locals(), vars() and dir()
# (``combine(**locals())`` got ``__js_call__``)
setattr(builtins, MARK, _mark)
setattr(builtins, CALL, _call)


def record(name: str, value: Any, scope: str = "", method: Callable | None = None) -> None:
    """Name ``value`` in the frame being traced (a name a library gives it, in the name
    stack ``scope``, or by a ``method`` of a library's: see :meth:`Recorder.record`)."""
    recorder = _current()
    if recorder is not None:
        recorder.record(name, value, scope, method)


def note_unnamed(reason: str) -> None:
    """Say in the graph's notes that a user function ran as it is (``reason``), its names
    not recorded."""
    recorder = _current()
    if recorder is not None:
        recorder.unrewritten.append(reason)


def note_state(value: Any) -> Any:
    """Note that a library stores ``value`` as module state; the value to store."""
    recorder = _current()
    return value if recorder is None else recorder.note_state(value)


def call_in_frame(label: str, fn: Any) -> Any:
    """:func:`_call`, with a frame named ``label`` also for JAX functions and builtins
    (an item of a library container, ``nnx.relu``, is named by its place too)."""
    recorder = _current()
    if recorder is not None:
        label = recorder.place(fn, label) or label  # its path in the running module
    return _call(label, fn, always=True)


def framed_module(module: Any) -> Any:
    """For a module of a library that library code calls (``self.query`` in Flax NNX's
    attention): a function running it in a frame named by its path in the module
    running (``query``), or None where it is not one of that module's (a module the user
    passed in), or its frame is open (user code called it: its frame runs it). A copy an
    NNX transform made of one of its modules (the cell ``nnx.RNN`` scans) is named as
    that module is (see :func:`copied_path`)."""
    recorder = _current()
    if recorder is None or not recorder._stack:
        return None
    frame = recorder._stack[-1]
    running = recorder.callees[frame]
    if running is module:
        return None
    label = recorder.place(module)  # ("" for what a transform's function wraps)
    if label is None:
        label = copied_path(running, module, recorder._entered.get(frame))
    return None if label is None else _call(label, module, always=True)


def call_method(method: Any, module: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``method(module, *args, **kwargs)``, a method of a library module that a
    library calls (a Flax linen or Haiku module's ``__call__``, run by ``apply``): when it is
    user code, rewritten, in a frame named by the module's name stack whatever calls
    it: ``h`` in ``Block_0.__call__`` is ``Net/Block_0/h`` (completed as ``sow``
    names are, see :meth:`Recorder.record`), ``y`` in a function it calls
    ``Net/Block_0/helper/y``; the frame's results are named by the module's scope,
    not by it. Library code runs as it is, in a frame opened after it (naming nothing
    but its results where they are several arrays, see :meth:`Recorder.leave`: an
    ``hk.LSTM``'s ``lstm[1].cell``); every method runs as it is while nothing is traced."""
    recorder = _current()
    user = is_user_function(method)
    if recorder is None:
        return method(module, *args, **kwargs)
    if not user:  # its results by their paths where there are several (see leave)
        out = method(module, *args, **kwargs)
        frame = recorder.enter(scope_path(C.current_scope()), method)
        recorder._scoped_frames.add(frame)
        return recorder.leave(frame, out)
    run, _ = rewritten(method)
    frame = recorder.enter(scope_path(C.current_scope()), method)
    recorder._scoped_frames.add(frame)
    out = None
    try:
        out = run(module, *args, **kwargs)
    finally:
        out = recorder.leave(frame, out)
    return out


def _run_swapped(cell: Any, inner: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with closure ``cell`` holding ``inner`` meanwhile."""
    with swapped(cell, inner):
        return fn(*args, **kwargs)


_CONTROL_FLOW = object()
_TRANSFORM = object()


def _call_target(fn: Any) -> tuple[Any, _Jitted | None]:
    """``(what to run, the cached jit twin or None)`` for a call of ``fn``; what to run
    is None for JAX itself, numpy, a builtin or a ``functools.partial`` of one (no
    frame), and ``_CONTROL_FLOW`` for a ``lax`` loop or conditional."""
    if id(fn) in _control_flow_bodies():
        return _CONTROL_FLOW, None
    if _transform(fn.func if isinstance(fn, functools.partial) else fn):
        return _TRANSFORM, None
    framed = _transformed(fn) or _transformed_method(fn)
    if framed is not None:  # jax.vmap(f) or @jax.checkpoint elsewhere: made again, rewritten
        return framed, None
    jitted = _jitted_call(fn) if isinstance(fn, functools.partial) else None  # an nnx.jit method
    if jitted is None and _plain_partial(fn):
        # functools.partial(layer, p): the user function it calls, rewritten, in a frame
        # (a partial of a jitted, transformed or library function runs as it is)
        inner, inner_jitted = _call_target(fn.func)
        if inner is None or inner_jitted is not None or not _is_user_function(fn.func):
            return None, None
        return functools.partial(inner, *fn.args, **fn.keywords), None
    if jitted is None and is_jit(fn):  # (a jit of a partial has functools' __module__)
        jitted = _jitted(fn)
    if jitted is None and _user_context_manager(fn):
        # @contextlib.contextmanager on a user generator function: the context manager
        # of its rewritten copy, whose steps run in the call's frame (see _call)
        return contextlib.contextmanager(rewritten(fn.__wrapped__)[0]), None
    if jitted is None and (_is_jax_or_builtin(fn) or scoped_module(fn)):
        return None, None  # a linen/Haiku module's own methods run as call_method runs them
    haiku = haiku_rewritten(fn, rewritten) if jitted is None else None
    if haiku is not None:  # f.apply of hk.transform(f): f runs rewritten, in the call's frame
        cell, inner, reason = haiku
        if not reason:
            return functools.partial(_run_swapped, cell, inner, fn), None
    jitted = jitted or _jitted(fn) or _jitted_call(fn)
    if jitted is None:
        return rewritten(fn)[0], None
    return jitted.jit, jitted if jitted.cached else None


def _run_fresh(wrapped: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``wrapped``, a ``jax.jit`` or a JAX transform of user code that a decorator
    holds (``@deco @jax.jit``), made again around the rewritten function at each call:
    its body runs every time, in the decorator's frame (JAX's cache would serve a call
    the body does not run in, and a call the decorator makes of it, its result
    changed or called twice, is no call equation whose names a replay could place)."""
    framed = _transformed(wrapped)
    if framed is not None:
        return framed.unframed(*args, **kwargs)
    if library_rejit(wrapped) is False:  # a library's jit that cannot be remade
        return wrapped(*args, **kwargs)
    return _Jitted(wrapped, cached=False).jit(*args, **kwargs)


def _posing(run: Any, original: Any) -> Any:
    """``run`` with ``original``'s name and docstring: a decorator may read them from the
    function its cell holds (``fn.__name__``) while the cell holds ``run``."""
    return functools.update_wrapper(functools.partial(run), original)


#: JAX's functions that its transforms return, by code name: ``(named, remakes)``,
#: whether the call's value is the function's (not a derivative's) and whether the
#: transform remakes the jaxprs traced inside it (see :class:`_Framed`)
_MADE_BY_TRANSFORM = {
    "vmap_f": (True, True),
    "fun_remat": (True, False),
    "value_and_grad_f": (False, True),
    "grad_f": (False, True),
    "grad_f_aux": (False, True),
    "jacfun": (False, True),
    "checked_fun": (False, True),  # checkify's: (error, result)
}
#: the closure cells through which those functions reach the function they transform
_TRANSFORMED_CELLS = ("fun", "value_and_grad_f", "f")


def _transformed(fn: Any) -> _Framed | None:
    """For a function a JAX transform made of user code elsewhere (``batched =
    jax.vmap(f)`` at module level, ``js.trace(jax.grad(loss), w)``, ``@jax.checkpoint``
    on a module-level function), the same transform of the rewritten user function;
    None for anything else.

    JAX's transforms return closures holding the function and the options (JAX's
    traceback filter around them); the same chain of closures is made again around the
    rewritten function, every option as it was, and ``fn`` itself is left unchanged.
    """
    chain, f, kinds = [], fn, []
    while isinstance(f, types.FunctionType) and "/jax/_src/" in f.__code__.co_filename.replace(
        os.sep, "/"
    ):
        code = f.__code__
        if code.co_name in _MADE_BY_TRANSFORM:
            kinds.append(_MADE_BY_TRANSFORM[code.co_name])
        elif code.co_name != "reraise_with_filtered_traceback" or len(chain) > 8:
            return None
        try:
            cells = {n: c.cell_contents for n, c in zip(code.co_freevars, f.__closure__ or ())}
        except ValueError:  # an empty cell
            return None
        key = next((k for k in _TRANSFORMED_CELLS if callable(cells.get(k))), None)
        if key is None:
            return None
        chain.append((f, key, cells))
        f = cells[key]
    if not kinds:
        return None
    inner, reason = rewritten(f)
    if reason:
        return None
    remade = inner
    for made, key, _ in reversed(chain):
        closure = tuple(
            types.CellType(remade) if name == key else cell
            for name, cell in zip(made.__code__.co_freevars, made.__closure__)
        )
        remade = functools.update_wrapper(
            types.FunctionType(
                made.__code__, made.__globals__, made.__name__, made.__defaults__, closure
            ),
            made,
            assigned=("__module__", "__qualname__", "__doc__", "__kwdefaults__"),
        )
    untagged = any(
        C.policy_saves_names(cells.get("policy"))
        for made, _, cells in chain
        if made.__code__.co_name == "fun_remat"
    )
    named = all(n for n, _ in kinds)
    remakes = any(r for _, r in kinds)
    derivative = any(
        not n and made.__code__.co_name != "checked_fun"
        for (n, _), (made, _, _) in zip(kinds, chain)
    )
    return _Framed(remade, f, named, remakes, untagged, derivative)


def _transformed_method(fn: Any, bound: bool = True) -> Any:
    """:func:`_transformed` of a method a JAX transform decorated (``@jax.checkpoint``
    on a module's ``__call__``, ``@partial(jax.vmap, in_axes=(None, 0))`` on a method),
    bound to its object: ``obj.method`` or ``obj`` itself; None for anything else.
    ``bound=False``: the method, run in the caller's frame, bound to the object (as
    ``rewritten`` gives a method: Equinox's transforms take its object as a pytree)."""
    if isinstance(fn, (types.FunctionType, type, functools.partial)):
        return None
    func, owner = _own_attr(fn, "__func__"), _own_attr(fn, "__self__")
    if func is None or owner is None:  # an object: its class's __call__
        func, owner = getattr(type(fn), "__call__", None), fn  # noqa: B004
    framed = _transformed(func) if isinstance(func, types.FunctionType) else None
    if framed is None:
        return None
    if not bound:
        return types.MethodType(framed.unframed, owner)
    run = functools.partial(framed.fn, owner)
    return _Framed(run, framed.of, framed.named, framed.remakes, framed.untagged)


def _jitted_call(fn: Any) -> _BoundJitted | None:
    """For a method that is a jitted user function (``@eqx.filter_jit`` on an Equinox
    module's method), or an object whose class's ``__call__`` is one (``@jax.jit``,
    ``@eqx.filter_jit`` or ``@nnx.jit`` on a module's ``__call__``), its twin bound to
    the object; None for anything else."""
    func, owner = _own_attr(fn, "__func__"), _own_attr(fn, "__self__")
    args = getattr(fn, "args", None)
    if (
        func is None
        and isinstance(args, tuple)
        and len(args) == 1
        and not getattr(fn, "keywords", 1)
    ):
        func, owner = getattr(fn, "func", None), args[0]  # a bound Equinox or NNX jit method
    if func is not None and owner is not None and not isinstance(func, types.FunctionType):
        jitted = _jitted(func)
        return None if jitted is None else _BoundJitted(jitted, owner)
    if isinstance(fn, (types.FunctionType, types.MethodType, functools.partial)):
        return None
    jitted = _jitted(getattr(type(fn), "__call__", None))  # noqa: B004 (the class attribute)
    return None if jitted is None else _BoundJitted(jitted, fn)


def _control_flow_bodies() -> dict[int, tuple[tuple[int, str], ...]]:
    """``lax`` control-flow functions (and Flax NNX's and Haiku's control flow,
    once imported), and the higher-order functions that call what they are given
    (``jax.tree.map``, ``map``, ``functools.reduce``), with their function arguments
    (position, name): each function given runs in a frame, rewritten if user code."""
    return _bodies_of("flax.nnx" in sys.modules, "haiku" in sys.modules)


@functools.cache
def _bodies_of(nnx_loaded: bool, haiku_loaded: bool) -> dict[int, tuple[tuple[int, str], ...]]:
    lax = jax.lax
    bodies = {
        id(lax.scan): ((0, "f"),),
        id(lax.map): ((0, "f"),),
        id(lax.fori_loop): ((2, "body_fun"),),
        id(lax.while_loop): ((0, "cond_fun"), (1, "body_fun")),
        id(lax.cond): ((1, "true_fun"), (2, "false_fun")),
        id(lax.switch): ((1, "branches"),),
        id(lax.associative_scan): ((0, "fn"),),
        id(jax.tree_util.tree_map): ((0, "f"),),
        id(jax.tree_util.tree_map_with_path): ((0, "f"),),
        id(map): ((0, "func"),),
        id(functools.reduce): ((0, "function"),),
    }
    for name in ("map", "map_with_path"):  # jax.tree.map: its own function in some versions
        found = getattr(getattr(jax, "tree", None), name, None)
        if found is not None:
            bodies.setdefault(id(found), ((0, "f"),))
    if nnx_loaded:
        nnx = sys.modules["flax.nnx"]
        for name in ("fori_loop", "while_loop", "cond", "switch"):  # lax's parameters
            bodies[id(getattr(nnx, name))] = bodies[id(getattr(lax, name))]
    if haiku_loaded:  # hk.scan(f, ...) and the rest take their functions where lax does
        hk = sys.modules["haiku"]
        for name in ("scan", "map", "fori_loop", "while_loop", "cond", "switch"):
            found = getattr(hk, name, None)
            if found is not None:
                bodies[id(found)] = bodies[id(getattr(lax, name))]
    return bodies


#: transforms that stage the jaxprs traced inside them as they are (the program inlines
#: them, so their values keep their vars)
_STAGE_AS_THEY_ARE = frozenset({"checkpoint", "remat", "named_call", "filter_checkpoint", "scan"})

#: libraries with transforms of their own, once imported (they rewrite plain functions)
_TRANSFORM_LIBRARIES = ("equinox", "flax.nnx", "jax.experimental.checkify")


@functools.cache
def _transforms(libraries: tuple[str, ...]) -> dict[int, tuple[str, str]]:
    """``id(transform) -> (kind, its function parameter)`` for the transforms of
    :data:`_TRANSFORM_KINDS` in JAX and the imported ``libraries``."""
    modules = [jax, *(sys.modules[name] for name in libraries)]
    found = {}
    for kind, names in _TRANSFORM_KINDS.items():
        for module in modules:
            for name in names:
                t = getattr(module, name, None)
                if t is not None and id(t) not in found:
                    try:
                        param = next(iter(inspect.signature(t).parameters))
                    except (TypeError, ValueError, StopIteration):
                        param = "fun"
                    found[id(t)] = (kind, param)
    return found


def _transform(fn: Any) -> tuple[str, str] | None:
    """``(kind, function parameter)`` if ``fn`` is a transform of :data:`_TRANSFORM_KINDS`."""
    loaded = tuple(name for name in _TRANSFORM_LIBRARIES if name in sys.modules)
    return _transforms(loaded).get(id(fn))


class _Framed:
    """A transform of a rewritten user function (``jax.vmap(model)``), which runs in a
    frame of its own: named at its call (``pred = jax.vmap(model)(x)`` is the call
    ``model``, ``grad_fn(w)`` the call ``grad_fn``), else after the function. ``named``:
    what the call returns is the function's value (a batch of it), not a derivative."""

    __slots__ = ("fn", "of", "named", "remakes", "memory", "untagged", "derivative", "__weakref__")

    def __init__(
        self,
        fn: Any,
        of: Any,
        named: bool,
        remakes: bool,
        untagged: bool,
        derivative: bool | None = None,
    ) -> None:
        self.fn, self.of, self.named, self.untagged = fn, of, named, untagged
        #: a derivative (under which JAX runs a custom_jvp's rule, not its body): what
        #: is not named, but checkify's (it runs the bodies)
        self.derivative = not named if derivative is None else derivative
        #: the transform remakes the jaxprs traced inside it (vmap, a derivative; not
        #: checkpoint, which stages them as they are): see Recorder._named
        self.remakes = remakes
        #: a checkpoint's calls are served from JAX's cache as a jit's are
        self.memory = None if remakes else _Memory()

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self.call(None, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # __name__, __wrapped__...: the transform's
        if name in _Framed.__slots__:  # not set yet
            raise AttributeError(name)
        return getattr(self.fn, name)

    def call(self, label: str | None, /, *args: Any, **kwargs: Any) -> Any:
        recorder = _current()
        if recorder is None:
            return self.fn(*args, **kwargs)
        frame = recorder.enter(recorder.label(label, self.of), self.of)
        start = recorder.size()
        out = None
        try:
            with self._context(recorder):
                out = self.fn(*args, **kwargs)
            if self.memory is not None:
                recorder.jit_called(frame, start, self.memory, (args, kwargs), out)
        finally:
            recorder.leave(frame, out if self.named else None)
        return out

    def unframed(self, /, *args: Any, **kwargs: Any) -> Any:
        """Run in the caller's frame: the function traced is this transform
        (``js.trace(jax.vmap(f), xs)`` names ``f``'s values as ``js.trace(f, x)`` does)."""
        recorder = _current()
        if recorder is None:
            return self.fn(*args, **kwargs)
        with self._context(recorder):
            return self.fn(*args, **kwargs)

    def _context(self, recorder: Recorder) -> Any:
        if self.remakes:
            return recorder.transformed(derivative=self.derivative)
        return recorder.untagged() if self.untagged else contextlib.nullcontext()


def _with_rewritten_function(transform: Any, kind: str, param: str) -> Any:
    """``transform`` (``jax.vmap``, ``jax.grad``...) applied to the rewritten copy of its
    function when that is user code (a function, method, callable object or
    ``functools.partial`` of one), so that the names inside are recorded, in the frame
    of the transformed function's call (:class:`_Framed`).

    A transform that runs the function at once (``jax.jvp``) runs it in a frame of its
    own, as a loop runs its body. Equinox's and NNX's transforms rewrite plain
    functions, and Equinox modules as pytrees of the same leaves that run their
    rewritten ``__call__`` (a module is a pytree to them; see ``as_pytree_call``); other
    objects run as they are. A decorator factory
    (``eqx.filter_grad(has_aux=True)``) gives a decorator that does the same.
    """
    if kind == _RUNS:  # (jvp, vjp, linearize: derivatives)
        return _transforming(_with_named_bodies(transform, ((0, param),)))
    from_jax = transform.__module__.split(".", 1)[0] == "jax"

    def run(*args: Any, **kwargs: Any) -> Any:
        if args:
            fun, args = args[0], args[1:]
        else:
            fun = kwargs.pop(param, None)
        if isinstance(fun, type) and from_jax:  # jax.vmap(MyNamedTuple): a class, as it is
            return transform(fun, *args, **kwargs)
        if fun is None or isinstance(fun, type) or not callable(fun):  # a factory
            if fun is not None:  # a sentinel for "no function" (flax's Missing)
                args = (fun, *args)
            return lambda f: run(f, *args, **kwargs)
        plain = (
            isinstance(fun, types.FunctionType)
            or (isinstance(fun, functools.partial) and isinstance(fun.func, types.FunctionType))
            or _jitted(fun) is not None  # eqx.filter_grad(jitted loss): its rewritten twin
        )
        if isinstance(fun, _Framed):  # jax.grad(jax.checkpoint(loss)): made here, rewritten
            inner, reason = fun.unframed, None
        elif from_jax or plain:
            inner, reason = rewritten(fun)
        else:  # an Equinox module, given to filter_vmap: still a pytree of its arrays
            inner, reason = as_pytree_call(fun, rewritten), None
            if inner is None:
                inner, reason = fun, "library"
        if reason and scoped_module(fun):  # jax.grad(net.apply): linen runs its methods,
            inner, reason = fun, None  # rewritten through its interceptors, under the grad
        if reason and kind == _SAME:
            return transform(fun, *args, **kwargs)
        if reason:  # run as it is, but a derivative's call is not named after `fun`
            remade = transform(fun, *args, **kwargs)
            return _Framed(remade, fun, False, True, C.policy_saves_names(kwargs.get("policy")))
        of = fun.of if isinstance(fun, _Framed) else fun
        while isinstance(of, functools.partial):
            of = of.func
        remakes = kind != _SAME or getattr(transform, "__name__", "") not in _STAGE_AS_THEY_ARE
        untagged = C.policy_saves_names(kwargs.get("policy"))
        named = kind == _SAME and (fun.named if isinstance(fun, _Framed) else True)
        derivative = (
            kind == _DERIVATIVE and "checkify" not in getattr(transform, "__name__", "")
        ) or (isinstance(fun, _Framed) and fun.derivative)
        return _Framed(transform(inner, *args, **kwargs), of, named, remakes, untagged, derivative)

    return run


def _transforming(fn: Any) -> Any:
    """``fn`` (a transform that runs the function at once) run as a transform that
    remakes the jaxprs traced inside it (see :meth:`Recorder._named`)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        recorder = _current()
        if recorder is None:
            return fn(*args, **kwargs)
        with recorder.transformed(derivative=True):
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def _context_helper() -> Iterator[None]:
    yield


#: what ``@contextlib.contextmanager`` makes of a generator function, and what that
#: returns when called
_CONTEXT_HELPER_CODE = _context_helper.__code__
_GENERATOR_CONTEXT = type(_context_helper())


def _user_context_manager(fn: Any) -> bool:
    """Whether ``fn`` is ``@contextlib.contextmanager`` on a user generator function."""
    return (
        type(fn) is types.FunctionType
        and fn.__code__ is _CONTEXT_HELPER_CODE
        and _is_user_function(getattr(fn, "__wrapped__", None))
        and inspect.isgeneratorfunction(fn.__wrapped__)
    )


def _in_frame(recorder: Recorder, frame: int, gen: Any) -> Any:
    """``gen``, a generator a user function returned, with each of its steps run in the
    function's frame (what it binds is named there, not in the frame iterating it)."""
    send: Any = None
    throw: BaseException | None = None
    while True:
        recorder._stack.append(frame)
        try:
            item = gen.send(send) if throw is None else gen.throw(throw)
        except StopIteration as stop:
            return stop.value
        finally:
            recorder._stack.pop()
        send, throw = None, None
        try:
            send = yield item
        except GeneratorExit:
            gen.close()
            raise
        except BaseException as e:  # noqa: BLE001 (thrown into the generator, as yield from)
            throw = e


def _with_named_bodies(fn: Any, bodies: tuple[tuple[int, str], ...], loop: str = "") -> Any:
    """``fn`` (a lax loop or conditional) with its function arguments run in frames;
    ``loop`` (``"scan"``, ``"fori_loop"``, ``"while_loop"``): the frames are a loop's
    body, noted (:attr:`Recorder.loop_frames`) with whether the index keeps it whole."""

    def frame(body: Any) -> Any:
        if isinstance(body, (list, tuple)):  # switch's branches
            return type(body)(frame(b) for b in body)
        if not callable(body):
            return body
        framed = _call(None, body)
        if rows is not None:
            framed = _rows_returned_anew(framed, rows == "map")
        return _in_loop(framed, folded) if loop else framed

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal folded
        # (a loop the index keeps whole: a scan, also a fori_loop of static bounds; a
        # while_loop may be unrolled, its values then in the flat program)
        folded = loop == "scan" or (
            loop == "fori_loop" and all(isinstance(a, int) for a in args[:2])
        )
        args = list(args)
        for pos, name in bodies:
            if pos < len(args):
                args[pos] = frame(args[pos])
            elif name in kwargs:
                kwargs[name] = frame(kwargs[name])
        return fn(*args, **kwargs)

    folded = False
    rows = _row_loops().get(id(fn))

    return run


def _row_loops() -> dict[int, str]:
    """lax's and Haiku's ``scan`` and ``map`` by id (their bodies return rows of ``ys``):
    ``"scan"`` (a body of ``(carry, x)``) or ``"map"`` (of ``x``)."""
    found = {id(jax.lax.scan): "scan", id(jax.lax.map): "map"}
    haiku = sys.modules.get("haiku")
    for name in ("scan", "map"):
        if getattr(haiku, name, None) is not None:
            found[id(getattr(haiku, name))] = name
    return found


def _rows_returned_anew(body: Any, mapped: bool) -> Any:
    """``body``, a scan's (``mapped``: a map's), returning a copy of a row of ``xs`` it
    returns as it is in ``ys``: JAX takes such a ``ys`` from ``xs`` outside the loop,
    so the row in the body (``step/x@3``) would reach no reader of ``ys``, and a
    slice, gradient or patch from it missed them (``return c + sin(x), x``: the
    derivative of ``sum(ys ** 2)``)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        out = body(*args, **kwargs)
        if kwargs or len(args) != (1 if mapped else 2):
            return out
        if not mapped and not (isinstance(out, (tuple, list)) and len(out) == 2):
            return out  # ((carry, y), or [carry, y]: JAX takes any pair)
        rows = {
            id(x) for x in jax.tree_util.tree_leaves(args[-1]) if isinstance(x, jax.core.Tracer)
        }
        ys = out if mapped else out[1]
        if not any(id(y) in rows for y in jax.tree_util.tree_leaves(ys)):
            return out
        ys = jax.tree_util.tree_map(lambda y: C.copied(y) if id(y) in rows else y, ys)
        if mapped:
            return ys
        kind = type(out)
        return kind._make((out[0], ys)) if hasattr(kind, "_make") else kind((out[0], ys))

    return run


def _in_loop(body: Any, kept: bool) -> Any:
    """``body``, a loop's, noting the frame it runs in as a loop body's (``kept``: of a
    loop the index keeps whole)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        recorder = _current()
        first = len(recorder.frames) if recorder is not None else 0
        out = body(*args, **kwargs)
        if recorder is not None and len(recorder.frames) > first:
            recorder.loop_frames[first] = kept
        return out

    return run


def _loops() -> dict[int, str]:
    """The loop functions among :func:`_control_flow_bodies`' (lax's, Haiku's, Flax
    NNX's), by id: ``"scan"`` (``scan``, ``map``), ``"fori_loop"``, ``"while_loop"``."""
    return _loops_of(*(name in sys.modules for name in _LOOP_LIBRARIES))


_LOOP_LIBRARIES = ("haiku", "flax.nnx")
_LOOP_KINDS = {"scan": "scan", "map": "scan", "fori_loop": "fori_loop", "while_loop": "while_loop"}


@functools.cache
def _loops_of(*loaded: bool) -> dict[int, str]:
    libs = [sys.modules.get(m) if here else None for m, here in zip(_LOOP_LIBRARIES, loaded)]
    return {
        id(getattr(lib, name)): kind
        for lib in (jax.lax, *libs)
        for name, kind in _LOOP_KINDS.items()
        if getattr(lib, name, None) is not None
    }


_SKIP_MODULES = ("jax", "jaxlib", "numpy", "jaxsurgery", "builtins", "functools", "operator")


def _own_attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, but None where only a ``__getattr__`` of its class
    gives it: a proxy forwarding attributes to a bound method it wraps (an EMA or
    logging wrapper around ``model.apply``) is no bound method, its own ``__call__`` runs."""
    if hasattr(type(obj), "__getattr__"):  # (else getattr finds only its own: fast)
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            return None
    return getattr(obj, name, None)


def _module_of(fn: Any) -> str:
    inner = _own_attr(fn, "__func__") or fn
    for candidate in (getattr(inner, "fun", None), getattr(inner, "__wrapped__", None)):
        if candidate is not None and _is_user_function(candidate):
            return getattr(candidate, "__module__", "") or ""
    module = getattr(inner, "__module__", None)
    if module is None or not isinstance(module, str):
        # (a function exec'd in globals without __name__ has none: user code)
        module = "" if isinstance(inner, types.FunctionType) else type(fn).__module__
    return module


def _is_jax_or_builtin(fn: Any) -> bool:
    if isinstance(fn, (type, types.BuiltinFunctionType, types.BuiltinMethodType)):
        return True  # constructing an object, or a C function: no frame
    if _module_of(fn).split(".", 1)[0] in _SKIP_MODULES:
        return True
    # the standard library runs as it is, with no frame of ours in between: a
    # warnings.warn(stacklevel=2), a logging record or inspect.stack() sees the caller
    # (told by where its code is: a user's package may be named `trace` or `copy`)
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is not None and _is_stdlib_file(code.co_filename)


#: folders that hold installed packages wherever they are: this environment's, the
#: system's beside a venv, the user site, Debian's and Colab's ``dist-packages``
_INSTALLED_FOLDERS = frozenset({"site-packages", "dist-packages"})


def _is_user_file(filename: str) -> bool:
    return _library_kind(filename) is None


@functools.lru_cache(maxsize=1024)
def _library_kind(filename: str) -> str | None:
    """Why code in ``filename`` is a library's (never rewritten: no names inside), or
    None where it is the user's: the standard library and this environment's
    packages, a ``site-packages`` or ``dist-packages`` folder anywhere, and what pip
    installed into a folder on ``sys.path`` (``pip install --target``, vendored
    dependencies beside a project: the packages its ``*.dist-info`` list). A user's
    editable install is the user's (its files are in the project)."""
    if filename.startswith("<frozen") or not filename:
        return "frozen"
    if filename.startswith(_library_prefixes()):
        return "it is in this environment's standard library or site-packages"
    if not _INSTALLED_FOLDERS.isdisjoint(filename.split(os.sep)[:-1]):
        return "it is in a site-packages or dist-packages folder"
    for entry in sys.path:
        root = os.path.abspath(entry)  # ('' is the working directory)
        if filename.startswith(root + os.sep):
            top = filename[len(root) + 1 :].split(os.sep, 1)[0]
            if top in _installed_names(root):
                return f"pip installed {top} into {root} (a *.dist-info there lists it)"
    return None


@functools.cache
def _prefixes(*kinds: str) -> tuple[str, ...]:
    """The folders of this environment's ``sysconfig`` paths of these kinds."""
    paths = sysconfig.get_paths()
    return tuple({paths[k] + os.sep for k in kinds})


def _library_prefixes() -> tuple[str, ...]:
    return _prefixes("stdlib", "platstdlib", "purelib", "platlib")


@functools.lru_cache(maxsize=256)
def _installed_names(folder: str) -> frozenset[str]:
    """The top-level packages and modules pip installed into ``folder``: what the
    ``RECORD`` of each ``*.dist-info`` there lists (``haiku``, ``six.py``)."""
    try:
        infos = [n for n in os.listdir(folder) if n.endswith(".dist-info")]
    except OSError:
        return frozenset()
    names = set()
    for info in infos:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(os.path.join(folder, info, "RECORD"), encoding="utf-8") as record:
                names.update(line.split(",", 1)[0].split("/", 1)[0] for line in record)
    return frozenset(
        n for n in names if n not in ("", "..") and not n.endswith((".dist-info", ".data"))
    )


@functools.lru_cache(maxsize=1024)
def _is_stdlib_file(filename: str) -> bool:
    stdlib, installed = _prefixes("stdlib", "platstdlib"), _prefixes("purelib", "platlib")
    return filename.startswith(stdlib) and not filename.startswith(installed)


def is_user_function(fn: Any) -> bool:
    """Whether ``fn`` is a function of the user's (not a library's, not ours), or a
    decorator's wrapper around one (``functools.wraps``), which tracing runs rewritten."""
    return _is_user_function(fn) or _wrapped_user_function(fn) is not None


def _is_user_function(fn: Any) -> bool:
    return (
        isinstance(fn, types.FunctionType)
        and not hasattr(fn, "__wrapped__")
        and _is_user_file(fn.__code__.co_filename)
        and not fn.__code__.co_filename.startswith(_OWN_FILES)  # ours, also uninstalled
    )


#: where jaxsurgery's own functions are (a doctest's functions, though in its modules, are not)
_OWN_FILES = os.path.dirname(os.path.abspath(__file__)) + os.sep


def rewritten(fn: Any) -> tuple[Any, str | None]:
    """The callable to run in place of ``fn``: a rewritten copy when it is user code.

    Returns ``(callable, None)``, or ``(fn, reason)`` when nothing was rewritten.
    """
    if _plain_partial(fn):  # a subclass's own __call__ runs (below)
        inner, reason = rewritten(fn.func)
        return functools.partial(inner, *fn.args, **fn.keywords), reason
    if _is_user_function(fn) or (
        isinstance(fn, types.MethodType) and _is_user_function(fn.__func__)
    ):
        run, reason = instrument(fn)
        recorder = _current()
        if reason and recorder is not None:
            recorder.unrewritten.append(reason)
        return run, reason
    owner = _own_attr(fn, "__self__")
    if owner is not None and _is_user_function(_own_attr(fn, "__func__")):
        # a bound method of another kind (Equinox's, a pytree of its module): rebound
        return instrument(types.MethodType(fn.__func__, owner))
    jitted = _jitted(fn)
    if jitted is not None:  # a jax.jit-ed user function, given to a transform (jax.grad):
        # a twin of its own, whose body runs (JAX would serve a cached twin's jaxpr, and
        # nothing replays the names of a call a transform makes)
        if jitted.cached:
            jitted = _Jitted(fn, cached=False)
        return jitted.jit, jitted.reason
    if _is_user_function(getattr(fn, "fun", None)):  # a user custom_jvp / custom_vjp
        body, reason = instrument(fn.fun)
        return C.rebuild_custom_rule(fn, body), reason
    call = getattr(type(fn), "__call__", None)  # noqa: B004 (the class attribute)
    if (
        not isinstance(fn, (types.FunctionType, types.MethodType))
        and is_jit(call)
        and is_user_function(call.__wrapped__)
    ):  # a jitted __call__, traced (or transformed) itself: its function, as _unwrap's
        body, reason = rewritten(call.__wrapped__)
        if isinstance(inspect.getattr_static(type(fn), "__call__"), staticmethod):
            return body, reason
        return types.MethodType(body, fn), reason
    if not isinstance(fn, (types.FunctionType, types.MethodType)) and _is_user_function(call):
        body, reason = instrument(call)
        kind = inspect.getattr_static(type(fn), "__call__", None)
        if isinstance(kind, staticmethod):
            return body, reason
        return types.MethodType(body, type(fn) if isinstance(kind, classmethod) else fn), reason
    framed = _transformed(fn)
    if framed is not None:  # js.trace(jax.vmap(f), xs): f's values, batched
        return framed.unframed, None
    method = _transformed_method(fn, bound=False)
    if method is not None:  # js.trace(obj) of a checkpointed __call__
        return method, None
    wrapped = _wrapped_user_function(fn)
    if wrapped is None and not isinstance(fn, (types.FunctionType, types.MethodType)):
        wrapped = _wrapped_user_function(getattr(type(fn), "__call__", None))  # noqa: B004
    if wrapped is not None:  # a decorator's wrapper runs as it is, the function rewritten
        cell, user = wrapped
        if not _is_user_function(user):  # @deco over @jax.jit or @jax.checkpoint
            inner = _posing(functools.partial(_run_fresh, user), user)
            return functools.partial(_run_swapped, cell, inner, fn), None
        inner, reason = instrument(user)
        if not reason:
            return functools.partial(_run_swapped, cell, inner, fn), None
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    kind = None if code is None else _library_kind(code.co_filename)
    if kind is not None and kind != "frozen":
        return fn, f"{_callable_name(fn)} is library code ({kind}), so it runs as it is"
    return fn, f"{_callable_name(fn)} is not user code (or is wrapped), so it runs as it is"


def _wrapped_user_function(fn: Any) -> tuple[Any, Any] | None:
    """For a function a decorator wrapped (``functools.wraps``: ``__wrapped__``), also
    a bound method of one: ``(cell, wrapped)``, the closure cell of the innermost
    wrapper that holds what it wraps, when that is the user's function, a ``jax.jit``
    of it (``@deco @jax.jit``) or a JAX transform of it (``@deco @jax.checkpoint``);
    None if there is none. Swapping the cell runs the decorator's code as it is around
    the rewritten function (or its jit, its transform)."""
    wrapper = getattr(fn, "__func__", fn)
    for _ in range(8):
        inner = getattr(wrapper, "__wrapped__", None)
        if not isinstance(wrapper, types.FunctionType) or inner is None:
            return None
        if (
            _is_user_function(inner)
            or (is_jit(inner) and _is_user_function(getattr(inner, "__wrapped__", None)))
            or _transformed(inner) is not None
        ):
            for cell in wrapper.__closure__ or ():
                with contextlib.suppress(ValueError):  # a cell not yet filled
                    if cell.cell_contents is inner:
                        return cell, inner
            return None
        wrapper = inner
    return None


class _Memory:
    """What the body of a call JAX caches (a ``jit``, a ``checkpoint``) reported when it
    ran, for the calls JAX serves from its cache to replay (:meth:`Recorder.jit_called`):
    ``bodies`` per traced jaxpr, ``by_types`` per argument types (under a transform)."""

    __slots__ = ("bodies", "by_types")

    #: jaxprs remembered per function (the oldest is forgotten first)
    MAX_BODIES = 64

    def __init__(self) -> None:
        self.bodies: dict[int, tuple[Any, _Recording]] = {}
        self.by_types: dict[Any, _Recording] = {}

    def remember(self, closed: Any, recording: _Recording) -> None:
        if len(self.bodies) >= self.MAX_BODIES:
            del self.bodies[next(iter(self.bodies))]
        self.bodies[id(closed)] = (closed, recording)

    def remember_types(self, key: Any, recording: _Recording) -> None:
        if len(self.by_types) >= self.MAX_BODIES:
            del self.by_types[next(iter(self.by_types))]
        self.by_types[key] = recording


class _Jitted(_Memory):
    """A ``jax.jit``-ed user function's rewritten twin: the rewritten body jitted with the
    same options, made once per function object (:func:`_jitted`).

    Being one jit object, it hits JAX's trace cache as the original does: a second call
    with the same argument types reuses the jaxpr without running the body. ``bodies``
    keeps, per jaxpr, what the body reported the time it ran, for such calls to replay.

    Calls under a transform run a second twin, ``transformed``: there the body tags
    the values it names (``Recorder._named``), so a jaxpr cached from a call outside
    a transform, which has no tags, must not serve them (nor the other way round).
    """

    __slots__ = ("jit", "reason", "cached", "_fn", "_transformed")

    def __init__(self, fn: Any, cached: bool = True) -> None:
        super().__init__()
        body, self.reason = _jit_body(fn.__wrapped__)
        self.jit = _rejit(fn, body)
        self.cached = cached  # False: a twin for one call, whose body runs
        # (weakly: _JITTED keys twins by their functions, which they must not keep alive
        # with what they close over; a function that died is called no more)
        self._fn, self._transformed = weakref.ref(fn), None

    @property
    def transformed(self) -> Any:
        """The twin that calls under a transform run (made when first needed, around a
        body of its own: JAX keeps one trace cache per function, not per jit)."""
        if self._transformed is None:
            fn = self._fn()
            self._transformed = _rejit(fn, _jit_body(fn.__wrapped__)[0])
        return self._transformed


def _user_callable(fn: Any) -> bool:
    """Whether ``fn`` is a user function, a method of one bound to an object
    (``jax.jit(self._layer)``) or a ``functools.partial`` of one."""
    if isinstance(fn, types.MethodType):
        return _is_user_function(fn.__func__)
    return _is_user_function(fn.func if _plain_partial(fn) else fn)


def _jit_body(fn: Any) -> tuple[Any, str | None]:
    """What a jit's twin runs in place of the function it jits: the rewritten function
    (bound to the same object, which the twin holds weakly where it can: the object
    holding the jit would keep its twin's cache entry alive for good), or a decorator's
    wrapper around it (``@jax.jit @deco``)."""
    if not _user_callable(fn):
        return rewritten(fn)
    if not isinstance(fn, types.MethodType):
        return instrument(fn)
    func, reason = instrument(fn.__func__)
    try:
        owner = weakref.ref(fn.__self__)
    except TypeError:  # not weakly referenceable: held
        return types.MethodType(func, fn.__self__), reason

    @functools.wraps(fn.__func__)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return func(owner(), *args, **kwargs)

    return bound, reason


def _rejit(fn: Any, body: Any) -> Any:
    """``body`` jitted as ``fn`` is: by ``jax.jit`` with its options, or by the library
    whose jit made ``fn`` (Equinox's ``filter_jit``, Flax's ``nnx.jit``)."""
    library = library_rejit(fn)
    return C.rejit(fn, body) if library is None else library(body)


class _BoundJitted:
    """The twin of a jitted ``__call__`` bound to one object: its ``jit`` and
    ``transformed`` take the object first; the rest is the twin's (``bodies``...)."""

    __slots__ = ("of", "owner")

    def __init__(self, of: _Jitted, owner: Any) -> None:
        self.of, self.owner = of, owner

    @property
    def jit(self) -> Any:
        return functools.partial(self.of.jit, self.owner)

    @property
    def transformed(self) -> Any:
        return functools.partial(self.of.transformed, self.owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.of, name)


_JITTED: weakref.WeakKeyDictionary[Any, _Jitted] = weakref.WeakKeyDictionary()


def _jitted(fn: Any) -> _Jitted | None:
    """The rewritten twin of a ``jax.jit``-ed user function (cached per function), or None."""
    inner = getattr(fn, "__wrapped__", None)
    if not is_jit(fn) or not (
        _user_callable(inner)
        or _wrapped_user_function(inner)
        # a JAX transform or another jit of user code: jax.jit(jax.vmap(f))
        or _transformed(inner) is not None
        or _jitted(inner) is not None
    ):
        return None
    if library_rejit(fn) is False:  # a library's jit made so that it cannot be remade
        return None
    try:
        found = _JITTED.get(fn)
        if found is None:
            found = _JITTED[fn] = _Jitted(fn)
    except TypeError:  # not weakly referenceable
        return _Jitted(fn, cached=False)
    return found


#: the packages whose jit wrappers (``jax.jit``'s, ``eqx.filter_jit``'s, ``nnx.jit``'s)
#: are remade around the rewritten function
_JIT_PACKAGES = frozenset({"jax", "jaxlib", "equinox", "flax"})


def is_jit(fn: Any) -> bool:
    """Whether ``fn`` is a jitted function of JAX, Equinox or Flax (a user's own object
    with ``lower`` and ``__wrapped__``, a wrapper casting around a jit, is not: its
    ``__call__`` runs)."""
    return hasattr(fn, "lower") and type(fn).__module__.split(".")[0] in _JIT_PACKAGES


def _callable_name(fn: Any) -> str:
    """The function's name (a ``functools.partial``'s function's), or the class name of
    a callable object (``Dense``)."""
    while _plain_partial(fn):
        fn = fn.func
    if isinstance(fn, (types.FunctionType, types.MethodType)) or hasattr(fn, "__wrapped__"):
        name = getattr(getattr(fn, "__func__", fn), "__name__", None)
        if isinstance(name, str):
            return name
    return type(fn).__name__
