"""What jaxsurgery knows about neural-network libraries beyond their name scopes.

Flax linen, Haiku and Equinox name their values through ``jax.named_scope``
(:mod:`jaxsurgery._scopes`). Flax NNX modules push no scope, so a call of an NNX
submodule is named by its attribute path in the calling module: in
``for layer in self.layers: x = layer(x)`` the calls are ``layers[0]``, ``layers[1]``...
rather than ``layer#0``, ``layer#1``. Equinox modules are named so too (their scopes,
``eqx.nn.MLP/eqx.nn.Linear#1``, stay aliases), also where the library's code calls them
(``eqx.nn.MultiheadAttention``'s ``query_proj``).

Values libraries name themselves become names too: NumPyro sample and deterministic
sites (``"w"``, ``"obs"``), and what Flax linen modules ``sow`` (``"CNN/Dense_0/act"``:
the module's scope and the sown name), and NNX modules (``"model/attn/attention_weights"``:
the module call's frame and the sown name); see :func:`library_names`. What libraries store
as module state (BatchNorm statistics) is noted, so that a module's scope names its
value, not also the state it returns (:mod:`jaxsurgery._scopes`).

Library containers call their items in library code, which is never rewritten: while
``js.trace`` runs, ``eqx.nn.Sequential``, ``nnx.Sequential`` and penzai's groups call
each item in a frame of its own, named by its path in the module whose call is running
(an NNX attribute path; for penzai, the layer's path as treescope shows it,
``body.sublayers[1]``), else by its place (``layers[k]``, ``sublayers[k]``) or, for a
penzai ``NamedGroup``, its name (:func:`library_calls`). Penzai parameters
are named by their labels (:func:`parameter_labels`).
"""

from __future__ import annotations

import contextlib
import functools
import keyword
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax

from ._compat import tracer_jaxpr_trace


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")  # never import a framework the user did not


def wraps_it(owner: Any, attribute: str) -> bool:
    """Whether ``owner.attribute`` is what a transform's function wraps
    (``jax.vmap(self.mlp)``'s ``__wrapped__``, ``eqx.filter_vmap(self.mlp)``'s ``_fun``):
    no part of a path (the module it wraps is named where the transform is called)."""
    return attribute == "__wrapped__" or (
        attribute == "_fun" and type(owner).__module__.startswith("equinox")
    )


def submodule_paths(parent: Any) -> dict[int, str] | None:
    """``id(submodule) -> "layers[2]"`` for an NNX module or a penzai layer (its
    sublayers at any depth: ``"body.sublayers[1]"``), or None for anything else."""
    nnx = _nnx()
    parent = getattr(parent, "__self__", parent)  # a bound method: its module
    penzai = sys.modules.get("penzai.nn.layer")
    layer = getattr(penzai, "Layer", None)
    if isinstance(layer, type) and isinstance(parent, layer):
        return _pytree_paths(parent, layer)
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(parent, eqx.Module):
        return _pytree_paths(parent, eqx.Module)
    if nnx is None or not isinstance(parent, nnx.Module):
        return None
    paths: dict[int, str] = {}
    for path, node in nnx.iter_graph(parent):
        if path and isinstance(node, nnx.Module) and id(node) not in paths:
            paths[id(node)] = format_path(path)
    return paths


def copied_path(parent: Any, module: Any, entered: Any) -> str | None:
    """For a Flax NNX module that an NNX transform made from one of ``parent``'s
    submodules (``nnx.RNN`` scans its ``cell``: the loop's body runs a copy merged from
    the cell's state): that submodule's path, when exactly one submodule of ``parent``
    has the copy's type and structure (``nnx.graphdef``), and the copy's state is of a
    trace begun inside ``parent``'s call (``entered``: the trace running when it began),
    the transform's: a module passed in, whose state is concrete or of a trace running
    before, is no copy; else None."""
    nnx = _nnx()
    parent = getattr(parent, "__self__", parent)
    if nnx is None or not isinstance(module, nnx.Module) or not isinstance(parent, nnx.Module):
        return None
    inside = _trace_of_state(nnx, module)
    if inside is None or entered is None:
        return None
    while entered is not None and entered is not inside:  # the traces running then
        entered = getattr(entered, "parent_trace", None)
    if entered is inside:
        return None
    structure = nnx.graphdef(module)
    found = {
        format_path(path)
        for path, node in nnx.iter_graph(parent)
        if path
        and type(node) is type(module)
        and nnx.graphdef(node) == structure
        and _trace_of_state(nnx, node) is not inside
    }
    return found.pop() if len(found) == 1 else None


def _trace_of_state(nnx: Any, module: Any) -> Any:
    """The trace (a jaxpr being built) of an NNX module's traced state, or None."""
    traces = map(tracer_jaxpr_trace, jax.tree_util.tree_leaves(nnx.state(module)))
    return next((t for t in traces if t is not None), None)


def _pytree_paths(parent: Any, kind: type) -> dict[int, str]:
    """``id(node) -> key path`` of the ``kind`` nodes inside a pytree, at any depth."""
    import jax

    paths: dict[int, str] = {}
    tied: set[str] = set()  # the paths of layers found at two places
    stack = [(parent, "")]
    while stack:
        node, prefix = stack.pop()
        while wraps_it(node, "_fun") and isinstance(getattr(node, "_fun", None), kind):
            node = node._fun  # (eqx.filter_vmap(mlp): the layers of mlp, no `_fun.`)
        found, _ = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x, node=node: x is not node and isinstance(x, (kind, _Item))
        )
        for path, child in found:
            child = child.item if isinstance(child, _Item) else child  # a container running
            if not isinstance(child, kind):
                continue
            if id(child) in paths:  # one layer at two places (tied): no path names it
                tied.add(paths[id(child)])
                continue
            text = prefix + jax.tree_util.keystr(path)
            paths[id(child)] = text.lstrip(".")
            stack.append((child, text))
    if tied:  # nor what it holds (its first place's path under it)
        paths = {k: p for k, p in paths.items() if not any(_under(p, t) for t in tied)}
    return paths


def _under(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or a path inside it (``top.layers[0]``, ``top[1]``)."""
    return path == top or (path.startswith(top) and path[len(top)] in ".[")


def reads_as_attribute(key: str) -> bool:
    """Whether ``key`` reads as an attribute in a path (``.w``; not ``.enc/0``, ``.1``,
    ``.class``: those are subscripted, ``['enc/0']``)."""
    return key.isidentifier() and not keyword.iskeyword(key)


def format_path(path: tuple[Any, ...]) -> str:
    """``("blocks", 0, "attn") -> "blocks[0].attn"``; a key that is no identifier is
    subscripted, ``("heads", "enc/0") -> "heads['enc/0']"`` (a ``/`` would split the
    name's path)."""
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        elif not reads_as_attribute(str(key)):
            text += f"[{str(key)!r}]"
        else:
            text += f".{key}" if text else str(key)
    return text


def _containers() -> tuple[tuple[type, str, Callable[[Any], bool], Callable[[int, Any], str]], ...]:
    """``(container class, attribute of its items, whether an item must stay as it is,
    an item's label)`` for the containers of the imported libraries."""
    return _containers_of(sys.modules.get("equinox"), _nnx(), sys.modules.get("penzai.nn.grouping"))


@functools.cache
def _containers_of(
    eqx: Any, nnx: Any, grouping: Any
) -> tuple[tuple[type, str, Callable[[Any], bool], Callable[[int, Any], str]], ...]:
    """:func:`_containers` of these modules (None: not imported), the same functions
    every time (they key the wrappers :func:`_once` keeps)."""
    found = []
    by_place = lambda attr: lambda k, item: f"{attr}[{k}]"  # noqa: E731
    never = lambda item: False  # noqa: E731
    if eqx is not None:
        stateful = eqx.nn.StatefulLayer  # Sequential passes these a state: keep their type
        found.append(
            (eqx.nn.Sequential, "layers", lambda i: isinstance(i, stateful), by_place("layers"))
        )
    if nnx is not None:
        found.append((nnx.Sequential, "layers", never, by_place("layers")))
    if grouping is not None:  # a NamedGroup item is named by its name

        def penzai_label(k: int, item: Any) -> str:
            name = getattr(item, "name", None)
            return name if isinstance(name, str) and name else f"sublayers[{k}]"

        for cls_name in ("Sequential", "NamedGroup", "CheckedSequential"):
            cls = getattr(grouping, cls_name, None)
            if isinstance(cls, type) and "__call__" in vars(cls):
                found.append((cls, "sublayers", never, penzai_label))
    return tuple(found)


T = TypeVar("T")

#: what :func:`_once` made, by how it was made
_MADE: dict[tuple, Any] = {}


def _once(make: Callable[..., T], *args: Any) -> T:
    """``make(*args)``, made the first time and kept: the wrappers (and a NumPyro
    handler's class) that tracing patches in are the same at every trace, where
    ``functools.wraps`` and a class statement cost more than the rest of patching
    (patching took 70 us a trace with Flax, Equinox and Haiku imported, now 40)."""
    key = (make, *args)
    found = _MADE.get(key)
    if found is None:
        found = _MADE[key] = make(*args)
    return found


def library_calls(
    call: Callable[[str, Any], Any],
    method: Callable[[Any, Any, tuple, dict], Any],
    framed: Callable[[Any], Callable | None],
    user: Callable[[Any], bool],
    unnamed: Callable[[str], None],
) -> contextlib.AbstractContextManager:
    """While tracing: library containers call each item as ``call("layers[k]", item)``
    returns it (a function that runs the item in a named frame), Equinox layers
    that inherit their base's scope (``eqx.nn.Conv2d`` runs in ``eqx.nn.Conv``) get
    their own (``eqx.nn.Conv2d``), Flax linen runs its modules' methods as
    ``method(function, module, args, kwargs)`` (through ``nn.intercept_methods``),
    and so does Haiku (``hk.intercept_methods``), and a Flax NNX module of the
    library that another module of the library calls (``nnx.MultiHeadAttention``'s
    ``self.query``) runs as ``framed(module)`` returns it, in a frame named by its
    attribute path, when there is one (see :func:`_framed_call`), and so does an
    Equinox layer that another of the library calls; while an NNX one runs, so does
    a module of the user's (its ``__call__`` a ``user`` function) that it holds (the
    cell ``nnx.RNN`` scans, a user's: see :func:`_framing`).
    A user's module method that runs under an interceptor of the traced function's own
    (its ``nn.intercept_methods``) runs as it is, and ``unnamed(reason)`` says so.

    A container's ``layers`` are swapped for named items during its own call and put
    back after it (the container object is otherwise untouched); the classes are
    restored and the interceptor removed when tracing ends.
    """
    patched = [
        (cls, _once(_itemized, cls.__call__, call, attr, keep, label))
        for cls, attr, keep, label in _containers()
    ]
    containers = {cls for cls, _ in patched}
    eqx = sys.modules.get("equinox")
    if eqx is not None:
        patched += [(cls, run) for cls, run in _eqx_patches(eqx, framed) if cls not in containers]
    nnx = _nnx()
    if nnx is not None:
        patched += [
            (cls, _once(_framed_call, cls.__call__, framed, user))
            for cls in _nnx_library_modules(nnx)
            if cls not in containers
        ]
    stack = contextlib.ExitStack()
    if patched:
        stack.enter_context(_patched(patched))

    def aside(kind: str) -> Callable[[Any], None]:
        def note(fn: Any) -> None:
            if user(fn):
                unnamed(
                    f"{getattr(fn, '__qualname__', fn)} runs under an interceptor of the "
                    f"traced function's own ({kind}), as it is: the names it binds are not "
                    "recorded (its module's scope still names its values)"
                )

        return note

    linen = sys.modules.get("flax.linen")
    if linen is not None:
        intercept = functools.partial(
            _module_method, _linen_alone, method, aside("nn.intercept_methods")
        )
        stack.enter_context(linen.intercept_methods(intercept))
    haiku = sys.modules.get("haiku._src.module")
    if haiku is not None:
        intercept = functools.partial(
            _module_method, _haiku_alone, method, aside("hk.intercept_methods")
        )
        stack.enter_context(haiku.intercept_methods(intercept))
    return stack


def haiku_rewritten(
    fn: Any, rewritten: Callable[[Any], tuple[Any, str | None]]
) -> tuple[Any, Any, str | None] | None:
    """For the ``apply`` (or ``init``) of a Haiku transformed function: ``(cell, inner,
    reason)``, the closure cell holding the user's function it runs (found through
    Haiku's functions wrapping it: ``hk.transform``'s, ``hk.without_apply_rng``'s) and
    what to put there while it runs, the function ``rewritten``. For
    ``hk.multi_transform(f)``, the cell holds the factory ``f``, and ``inner`` is the
    rewritten factory that rewrites the functions it returns (Haiku calls them, not
    user code). None for anything else."""
    if "haiku" not in sys.modules or not _haiku_function(fn):
        return None
    original = getattr(fn, "_original_fn", None)  # what hk.transform was given (a
    # function, a functools.partial, a callable object)
    todo, seen = [fn], 0
    while todo and seen < 8:
        holder, seen = todo.pop(), seen + 1
        for cell in getattr(holder, "__closure__", None) or ():
            try:
                item = cell.cell_contents
            except ValueError:  # a cell not yet filled
                continue
            if original is not None and item is original and not _haiku_function(item):
                return (cell, *rewritten(item))
            if isinstance(item, tuple):  # a Transformed the function wraps
                todo += [
                    i for i in (getattr(item, "apply", None), getattr(item, "init", None)) if i
                ]
            elif _haiku_function(item):
                todo.append(item)
            elif isinstance(item, types.FunctionType):  # the first function of the user's
                inner, reason = rewritten(item)
                if holder.__qualname__.startswith("multi_transform"):
                    inner = functools.partial(_rewritten_factory, inner, rewritten)
                return cell, inner, reason
    return None


def _rewritten_factory(factory: Callable, rewritten: Callable) -> Any:
    """What a rewritten ``hk.multi_transform`` factory returns, its functions rewritten."""
    init, functions = factory()
    # a module's methods run through Haiku's interceptor, which runs them rewritten
    return jax.tree_util.tree_map(
        lambda f: f if scoped_module(f) else rewritten(f)[0], (init, functions)
    )


def _haiku_function(fn: Any) -> bool:
    return isinstance(fn, types.FunctionType) and (fn.__module__ or "").startswith("haiku.")


@contextlib.contextmanager
def swapped(cell: Any, value: Any) -> Iterator[None]:
    """A closure cell holding ``value`` while the context lasts."""
    original = cell.cell_contents
    cell.cell_contents = value
    try:
        yield
    finally:
        cell.cell_contents = original


def as_pytree_call(module: Any, rewritten: Callable[[Any], tuple[Any, str | None]]) -> Any:
    """An Equinox module whose ``__call__`` is user code, as a pytree of the same
    leaves that runs the rewritten ``__call__`` (``eqx.Partial``): Equinox's transforms
    (``eqx.filter_vmap(model)``) take a module's arrays as they would the module's;
    None for anything else."""
    eqx = sys.modules.get("equinox")
    if eqx is None or not isinstance(module, eqx.Module):
        return None
    bound, reason = rewritten(module)
    if reason:
        return None
    if isinstance(bound, functools.partial) and bound.args and bound.args[-1] is module:
        # a decorated __call__: the decorator's wrapper, run with the module last
        run = functools.partial(bound.func, *bound.args[:-1], **bound.keywords)
        return eqx.Partial(run, module)
    body = getattr(bound, "__func__", None)
    if body is None or getattr(bound, "__self__", None) is not module:
        return None
    return eqx.Partial(body, module)


def scoped_module(fn: Any) -> bool:
    """Whether ``fn`` is a Flax linen or Haiku module, or a method bound to one: the
    library runs it, its scopes name its values, and its own methods run through
    the interceptors (:func:`_module_method`)."""
    owner = getattr(fn, "__self__", fn)
    for name in ("flax.linen", "haiku"):
        module = getattr(sys.modules.get(name), "Module", None)
        if isinstance(module, type) and isinstance(owner, module):
            return True
    return False


def _module_method(
    alone: Callable[[Any, Any], bool],
    method: Callable[[Any, Any, tuple, dict], Any],
    aside: Callable[[Any], None],
    next_fun: Callable,
    args: tuple,
    kwargs: dict,
    context: Any,
) -> Any:
    """A Flax linen or Haiku method interceptor: the module's own method runs as
    ``method`` runs it; under a user's interceptor (added inside the traced function:
    ``alone(next_fun, own)`` is false), as it is, and ``aside(function)`` is told (our
    interceptor is the outer one: running the method rewritten would skip the user's)."""
    own = context.orig_method  # functools.partial(the function, the module)
    if not isinstance(own, functools.partial) or len(own.args) != 1:
        return next_fun(*args, **kwargs)
    if not alone(next_fun, own):
        aside(own.func)
        return next_fun(*args, **kwargs)
    return method(own.func, own.args[0], args, kwargs)


def _linen_alone(next_fun: Any, own: Any) -> bool:
    return next_fun is own  # (linen wraps the user's interceptors inside ours)


def _haiku_alone(next_fun: Any, own: Any) -> bool:
    return len(sys.modules["haiku._src.module"].interceptor_stack) == 1  # (ours is first)


@contextlib.contextmanager
def _patched(patched: list[tuple[type, Callable]]) -> Iterator[None]:
    """The classes' ``__call__`` replaced while the context lasts."""
    saved = [(cls, cls.__dict__.get("__call__")) for cls, _ in patched]
    for cls, method in patched:
        cls.__call__ = method
    try:
        yield
    finally:
        for cls, original in saved:
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original


def _eqx_patches(eqx: Any, framed: Callable) -> list[tuple[type, Callable]]:
    """``(class, its framed __call__)`` for the Equinox layers (see :func:`_eqx_layers`),
    made again only when a class's ``__call__`` changed (every trace patches them: the
    check costs a lookup a class)."""
    key = (framed, *(vars(cls).get("__call__") for _, cls in _eqx_classes(eqx)))
    found = _EQX_PATCHES.get(key)
    if found is None:
        if len(_EQX_PATCHES) > 16:
            _EQX_PATCHES.clear()
        found = _EQX_PATCHES[key] = [
            (cls, _once(_framed_call, run, framed)) for cls, run in _eqx_layers(eqx)
        ]
    return found


#: :func:`_eqx_patches` by the classes' ``__call__``
_EQX_PATCHES: dict[tuple, list[tuple[type, Callable]]] = {}


def _eqx_layers(eqx: Any) -> list[tuple[type, Callable]]:
    """``(class, the __call__ it runs)`` for the layers of Equinox: their own (as it is
    now: one the user patched too), or, for a layer whose ``__call__`` is its base's,
    scoped with the base's name (``eqx.nn.Conv2d`` runs in ``eqx.nn.Conv``), the base's
    in a scope named after the layer. None of a class a trace running has patched."""
    found = []
    for name, cls in _eqx_classes(eqx):
        own = vars(cls).get("__call__")
        if own is not None:
            if own not in _FRAMED:  # (js.trace inside a traced function: patched)
                found.append((cls, own))
            continue
        inner = getattr(cls.__call__, "__wrapped__", None)  # under the base's named_scope
        if inner is not None:
            found.append((cls, _scoped(name, inner)))
    return found


@functools.cache
def _eqx_classes(eqx: Any) -> tuple[tuple[str, type], ...]:
    """The layer classes of one Equinox module, by name (its classes do not change)."""
    return tuple(
        (name, cls)
        for name, cls in vars(eqx.nn).items()
        if isinstance(cls, type) and issubclass(cls, eqx.Module)
    )


@functools.cache
def _scoped(name: str, call: Callable) -> Callable:
    """``call`` in the scope ``eqx.nn.<name>`` (made once: the same function each trace)."""
    import jax

    return jax.named_scope(f"eqx.nn.{name}")(call)


@functools.cache
def _nnx_library_modules(nnx: Any) -> tuple[type, ...]:
    """The Flax NNX module classes of the library with a ``__call__`` of their own
    (``nnx.Linear``, ``nnx.MultiHeadAttention``, ``nnx.LSTMCell``...)."""
    found, todo = [], [nnx.Module]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("flax.nnx") and "__call__" in vars(cls):
            found.append(cls)
    return tuple(dict.fromkeys(found))


def _framed_call(
    original: Callable,
    framed: Callable[[Any], Callable | None],
    user: Callable[[Any], bool] | None = None,
) -> Callable:
    """``original``, an NNX module's or Equinox layer's ``__call__``, run as
    ``framed(module)`` returns it (a function running the module in a frame named by its
    path in the module running: ``query`` in ``nnx.MultiHeadAttention``, ``query_proj``
    in ``eqx.nn.MultiheadAttention``, ``layers[1]`` in ``eqx.nn.MLP``) or, when that is
    None (no such path, or the frame is already open: user code called it), as it is.
    With ``user`` (an NNX library module's), the user modules it holds are framed alike
    while it runs."""

    @functools.wraps(original)
    def library_module_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        run = framed(self)
        if run is not None:
            return run(*args, **kwargs)
        held = _user_module_classes(self, user) if user is not None else None
        if not held:
            return original(self, *args, **kwargs)
        with _framing(held, framed):
            return original(self, *args, **kwargs)

    _FRAMED.add(library_module_call)
    return library_module_call


#: the wrappers :func:`_framed_call` made (while they live)
_FRAMED: weakref.WeakSet[Callable] = weakref.WeakSet()


def _user_module_classes(module: Any, user: Callable[[Any], bool]) -> dict[type, tuple]:
    """The classes of the user modules a library NNX module holds (``nnx.RNN``'s
    ``cell``, a user's), whose ``__call__`` is a ``user`` function that library code
    calls: ``{class: (its own __call__ or None: inherited, the one it runs)}``."""
    nnx = _nnx()
    found: dict[type, tuple] = {}
    for value in vars(module).values():
        kind = type(value)
        if kind in found or not isinstance(value, nnx.Module):
            continue
        call = getattr(kind, "__call__", None)  # noqa: B004 (the class attribute)
        if isinstance(call, types.FunctionType) and call not in _FRAMING and user(call):
            found[kind] = kind.__dict__.get("__call__"), call
    return found


@contextlib.contextmanager
def _framing(held: dict[type, tuple], framed: Callable[[Any], Callable | None]) -> Iterator[None]:
    """While a library NNX module runs: the classes of the user modules it holds
    (:func:`_user_module_classes`) run them as :func:`_framed_call` does, in a frame
    named by their path (also the copies an NNX transform makes of them: ``nnx.RNN``
    scans a copy). The frame runs the user's ``__call__`` rewritten (the wrapper is a
    decorator's, whose wrapped function a frame swaps for its rewritten copy); the
    classes are put back after the call."""
    for kind, (_, call) in held.items():
        framing = _framed_call(call, framed)
        _FRAMING.add(framing)  # (a library module inside it holding one too: framed once)
        kind.__call__ = framing  # type: ignore[method-assign]
    try:
        yield
    finally:
        for kind, (own, _) in held.items():
            _FRAMING.discard(kind.__dict__.get("__call__"))
            if own is None:  # inherited: the base's again
                del kind.__call__
            else:
                kind.__call__ = own  # type: ignore[method-assign]


#: the wrappers :func:`_framing` put in place, while they are
_FRAMING: set[Callable] = set()


def _itemized(
    original: Callable,
    call: Callable[[str, Any], Any],
    attr: str,
    keep: Callable[[Any], bool],
    label: Callable[[int, Any], str],
) -> Callable:
    @functools.wraps(original)
    def container_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        items = getattr(self, attr)
        named = [
            item if keep(item) else _Item(call, label(k, item), item)
            for k, item in enumerate(items)
        ]
        object.__setattr__(self, attr, tuple(named) if isinstance(items, tuple) else named)
        try:
            return original(self, *args, **kwargs)
        finally:
            object.__setattr__(self, attr, items)

    return container_call


class _Item:
    """An item of a container, called in a frame named by its place."""

    __slots__ = ("call", "label", "item")

    def __init__(self, call: Callable[[str, Any], Any], label: str, item: Any):
        self.call, self.label, self.item = call, label, item

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.label, self.item)(*args, **kwargs)


def library_rejit(fn: Any) -> Callable[[Any], Any] | bool | None:
    """For a library's jit of a user function, what jits another function the same way:
    Equinox's ``filter_jit`` holds non-array arguments static where ``jax.jit`` would
    trace them; Flax's ``nnx.jit`` carries a module's state updates out of the call,
    which ``jax.jit`` would drop. None for anything else (``jax.jit`` itself); False
    when it cannot be done (an ``nnx.jit`` with shardings: the function runs as it is).
    """
    eqx = sys.modules.get("equinox")
    jit_wrapper = getattr(getattr(eqx, "_jit", None), "_JitWrapper", None)
    if jit_wrapper is not None and isinstance(fn, jit_wrapper):
        donate = {(True, True): "all", (False, True): "all-except-first"}
        how = donate.get((bool(fn.donate_first), bool(fn.donate_rest)), "none")
        if how != "none" and fn.filter_warning:
            how = "warn" if how == "all" else "warn-except-first"
        return functools.partial(eqx.filter_jit, donate=how)
    nnx = sys.modules.get("flax.nnx")
    nnx_jit = getattr(getattr(nnx, "transforms", None), "compilation", None)
    if nnx_jit is not None and isinstance(fn, nnx_jit.JitWrapped):
        info = getattr(fn.jitted_fn, "_jit_info", None)
        if info is None or fn.in_shardings is not None or fn.out_shardings is not None:
            return False
        return functools.partial(
            nnx.jit,
            static_argnums=info.static_argnums,
            static_argnames=info.static_argnames,
            keep_unused=info.keep_unused,
        )
    return None


def in_place_objects(arguments: dict[str, Any]) -> list[str]:
    """The arguments that hold Flax NNX objects (modules, optimizers, ``Rngs``), which a
    function may update in place."""
    pytreelib = sys.modules.get("flax.nnx.pytreelib")
    base = getattr(pytreelib, "Pytree", None)
    if base is None:
        return []

    def holds(value: Any) -> bool:
        try:
            leaves = jax.tree_util.tree_leaves(value, is_leaf=lambda x: isinstance(x, base))
        except Exception:  # (a static dict of keys JAX cannot sort: {1: .., "a": ..})
            return False
        return any(isinstance(x, base) for x in leaves)

    return [name for name, value in arguments.items() if holds(value)]


def library_names(
    record: Callable[..., None], note_state: Callable[[Any], Any]
) -> contextlib.AbstractContextManager:
    """While tracing, ``record(name, value)`` for values libraries name: NumPyro sites
    (a handler at the bottom of NumPyro's stack: it sees the value each site ends with)
    and Flax linen and NNX ``sow`` calls; and ``note_state(value)`` (which returns the value to
    store) for what a library stores as module state: Flax linen variable writes
    (BatchNorm statistics, sown values), ``hk.set_state``, Equinox ``State.set``."""
    modules = [
        sys.modules.get(m) for m in ("numpyro", "flax.linen", "haiku", "equinox", "flax.nnx")
    ]
    if not any(modules):
        return contextlib.nullcontext()
    return _recording_names(*modules, record, note_state)


@contextlib.contextmanager
def _recording_names(
    numpyro: Any,
    linen: Any,
    haiku: Any,
    equinox: Any,
    nnx: Any,
    record: Callable[..., None],
    note_state: Callable[[Any], Any],
) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if numpyro is not None:
            stack.enter_context(_once(_site_recorder, numpyro, record)())
        if linen is not None:
            stack.enter_context(_sow_recorder(linen.Module, record))
            scope = sys.modules["flax.core.scope"].Scope
            stack.enter_context(_wrapped_store(scope, "put_variable", 3, note_state))
        if equinox is not None:
            stack.enter_context(_wrapped_store(equinox.nn.State, "set", 2, note_state))
        if nnx is not None and callable(getattr(nnx.Module, "sow", None)):
            stack.enter_context(_sow_recorder(nnx.Module, record, _nnx_sow))
        if haiku is not None:
            setters = getattr(sys.modules.get("haiku._src.base"), "state_setter_stack", None)
            if setters is not None:  # hk.custom_setter's stack, which needs no transform

                def noted(next_setter: Callable, value: Any, context: Any) -> Any:
                    return note_state(next_setter(value))

                stack.enter_context(setters(noted))
        yield


@contextlib.contextmanager
def _wrapped_store(
    owner: type, method: str, position: int, note_state: Callable[[Any], Any]
) -> Iterator[None]:
    """``owner.method`` noting its argument at ``position`` (counting ``self``) as
    state, while tracing."""
    original = getattr(owner, method)
    setattr(owner, method, _once(_store, original, position, note_state))
    try:
        yield
    finally:
        setattr(owner, method, original)


def _store(original: Callable, position: int, note_state: Callable[[Any], Any]) -> Callable:
    """``original`` noting its argument at ``position`` as state."""

    @functools.wraps(original)
    def store(*args: Any, **kwargs: Any) -> Any:
        if len(args) > position:
            args = (*args[:position], note_state(args[position]), *args[position + 1 :])
        return original(*args, **kwargs)

    return store


def _site_recorder(numpyro: Any, record: Callable[[str, Any], None]) -> type:
    """A NumPyro handler class recording the sites' values (one instance per trace)."""

    unit = getattr(numpyro.distributions, "Unit", None)

    class SiteNames(numpyro.primitives.Messenger):
        def postprocess_message(self, msg: dict) -> None:
            if msg.get("type") in ("sample", "deterministic", "param") and msg.get("name"):
                fn, value = msg.get("fn"), msg.get("value")
                for _ in range(8):  # (a factor masked, or expanded by a plate)
                    if not isinstance(unit, type) or isinstance(fn, unit):
                        break
                    fn = getattr(fn, "base_dist", None)
                if isinstance(unit, type) and isinstance(fn, unit):
                    # a factor (numpyro.factor, a transform's _w_log_det): its value is
                    # an empty array; its log factor is what was given to numpyro.factor
                    value = fn.log_factor
                record(msg["name"], value)

    return SiteNames


@contextlib.contextmanager
def _sow_recorder(
    module: type, record: Callable[..., None], recording: Callable | None = None
) -> Iterator[None]:
    """``module.sow`` recording what it sows while tracing (``recording``: the
    wrapper's maker, linen's :func:`_sow` by default)."""
    original = module.__dict__.get("sow")
    if original is None:  # (a version of the library that moved it)
        yield
        return
    module.sow = _once(recording or _sow, original, record)
    try:
        yield
    finally:
        module.sow = original


def _sow(original: Callable, record: Callable[..., None]) -> Callable:
    """linen's ``Module.sow`` recording what it sows."""
    from . import _compat as C

    @functools.wraps(original)
    def sow(self: Any, col: str, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        record(name, value, _sown_in(self, C.current_scope()))
        return original(self, col, name, value, *args, **kwargs)

    return sow


def _nnx_sow(original: Callable, record: Callable[..., None]) -> Callable:
    """NNX's ``Module.sow`` recording what it sows, named in the frame of the module's
    call (NNX modules push no scope): ``self.sow(nnx.Intermediate, "feats", h)`` in
    ``model``'s ``__call__`` names ``model/feats``, and ``nnx.MultiHeadAttention``'s
    ``sow_weights=True`` its weights, ``model/attn/attention_weights``."""

    @functools.wraps(original)
    def sow(self: Any, variable_type: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, str) and name:
            record(name, value, method=sow)  # (in the frame of the user's call of it)
        return original(self, variable_type, name, value, *args, **kwargs)

    return sow


def _sown_in(module: Any, scope: str) -> str:
    """The scope of a value ``module`` sows while ``scope`` is the name stack: ``scope``,
    or, when the module's own scope has been left (what ``capture_intermediates`` sows
    after a method returns), ``scope`` with the module's name after it."""
    from ._scopes import scope_path

    own = module.name or type(module).__name__  # linen's scope name for it
    last = scope_path(scope).rsplit("/", 1)[-1]  # (no transform marks: vmap(Block_0))
    if last == own or last.startswith(f"{own}."):  # in it (or in one of its methods)
        return scope
    return f"{scope}/{own}" if scope else own


def parameter_labels(value: Any) -> dict[str, str]:
    """``{key path of a parameter's value: its label}`` for penzai parameter values
    (``params[0].value`` -> ``"mlp/Affine_0/Linear.weights"``) in an argument."""
    variables = sys.modules.get("penzai.core.variables")
    if variables is None:
        return {}
    import jax

    kinds = tuple(
        k
        for k in (
            getattr(variables, "ParameterValue", None),
            getattr(variables, "StateVariableValue", None),
        )
        if isinstance(k, type)
    )
    if not kinds:
        return {}
    nodes, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda x: isinstance(x, kinds))
    return {
        jax.tree_util.keystr(path) + ".value": node.label
        for path, node in nodes
        if isinstance(node, kinds) and isinstance(getattr(node, "label", None), str)
    }


def variable_paths(value: Any) -> set[str]:
    """The key paths of the Flax NNX variables in an argument (``.lin.kernel``, whose
    value's leaf is at ``.lin.kernel.value``)."""
    nnx = _nnx()
    kind = getattr(nnx, "Variable", None)
    if not isinstance(kind, type):
        return set()
    import jax

    nodes, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda x: isinstance(x, kind))
    return {jax.tree_util.keystr(path) for path, node in nodes if isinstance(node, kind)}


def keyed_paths(value: Any, paths: list[tuple]) -> list[tuple]:
    """``paths``, the key paths of ``value``'s leaves in order, with the children of
    nodes that flatten without keys (JAX's path says only their position, ``<flat
    index 1>``) keyed where the node tells what they are: an Equinox ``eqx.nn.State``'s
    items by their markers (``state['Net.bn.ema_state_index'][0]``), a NumPyro
    distribution's, transform's or constraint's by their fields (``d.base_dist.loc``:
    NumPyro orders a distribution's fields by a set, so positions change with the hash
    seed, names do not), JAX's ``Partial`` and sparse ``BCOO``/``BCSR`` arrays by
    theirs (``fn.args[0]``, ``m.data``); the same list where there is none.

    Example:
        >>> import jax, equinox as eqx
        >>> _, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
        >>> paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        >>> [jax.tree_util.keystr(p) for p in keyed_paths(state, paths)]
        ["['BatchNorm.batch_counter']", "['BatchNorm.batch_state_index'][0]", "['BatchNorm.batch_state_index'][1]"]
    """
    import jax

    flat_index = jax.tree_util.FlattenedIndexKey
    if not any(type(k) is flat_index for path in paths for k in path):
        return paths
    kinds = _keyless_kinds()
    if not kinds:
        return paths
    keyed: dict[tuple, tuple] = {}  # a node's path (JAX's) -> its children's keys
    _find_keyed(value, (), kinds, keyed)
    if not keyed:
        return paths
    out = []
    for path in paths:
        new = list(path)
        for n, k in enumerate(path):
            keys = keyed.get(path[:n]) if type(k) is flat_index else None
            if keys is not None and k.key < len(keys):
                new[n] = keys[k.key]
        out.append(tuple(new))
    return out


def _keyless_kinds() -> tuple[type, ...]:
    """The imported node types whose children :func:`_child_keys` can key."""
    eqx, numpyro = sys.modules.get("equinox"), sys.modules.get("numpyro.distributions")
    kinds = (
        getattr(getattr(eqx, "nn", None), "State", None),
        getattr(numpyro, "Distribution", None),
        getattr(getattr(numpyro, "transforms", None), "Transform", None),
        getattr(getattr(numpyro, "constraints", None), "Constraint", None),
        *_fields_of_jax_nodes(),
    )
    return tuple(k for k in kinds if isinstance(k, type))


def _fields_of_jax_nodes() -> dict[type, tuple[str, ...]]:
    """JAX's own nodes flattening without keys, with their children's fields."""
    import jax

    fields: dict[type, tuple[str, ...]] = {jax.tree_util.Partial: ("args", "keywords")}
    sparse = sys.modules.get("jax.experimental.sparse")
    for kind, names in (("BCOO", ("data", "indices")), ("BCSR", ("data", "indices", "indptr"))):
        if isinstance(getattr(sparse, kind, None), type):
            fields[getattr(sparse, kind)] = names
    return fields


def _find_keyed(value: Any, at: tuple, kinds: tuple[type, ...], keyed: dict) -> None:
    """Note in ``keyed`` the keys of the children of each node of ``kinds`` in
    ``value`` (``at`` its path), nodes inside such nodes too."""
    import jax

    nodes, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda x: isinstance(x, kinds))
    for path, node in nodes:
        if not isinstance(node, kinds):
            continue
        keys = _child_keys(node)
        if keys is None:
            continue
        keyed[(*at, *path)] = keys
        children, _ = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x, n=node: x is not n
        )
        for child_path, child in children:
            _find_keyed(child, (*at, *path, *child_path), kinds, keyed)


def _child_keys(node: Any) -> tuple | None:
    """Keys for the children of ``node`` (an Equinox State, a NumPyro distribution or
    transform), in its flattening's order; None where it has no text to key by."""
    import jax

    eqx = sys.modules.get("equinox")
    state = getattr(node, "_state", None)
    if isinstance(node, getattr(getattr(eqx, "nn", None), "State", ())) and isinstance(state, dict):
        if all(isinstance(k, (str, int)) for k in state):  # (object() markers: none)
            return tuple(map(jax.tree_util.DictKey, state))
        return None
    known = _fields_of_jax_nodes().get(type(node))
    if known is not None:
        return tuple(map(jax.tree_util.GetAttrKey, known))
    try:
        children, aux = node.tree_flatten()
        fields = getattr(type(node), "gather_pytree_data_fields", None)  # a distribution's
        if fields is not None and not _numpyros_flattening(node):
            return None  # (its own: in which order, nothing says)
        # (a transform's and a constraint's field names lead its flattening's aux data)
        names = fields() if fields is not None else aux[0] if isinstance(aux, tuple) else None
    except Exception:
        return None
    if not isinstance(names, tuple) or len(names) != len(children):
        return None
    if not all(isinstance(n, str) and _field(node, n) is c for n, c in zip(names, children)):
        return None  # (a flattening of its own, in another order than the fields')
    return tuple(map(jax.tree_util.GetAttrKey, names))


def _numpyros_flattening(node: Any) -> bool:
    """Whether a NumPyro distribution flattens as NumPyro's distributions do, its
    fields in ``gather_pytree_data_fields`` order (NumPyro's ``Distribution``'s, or a
    NumPyro class's changing some: ``MaskedDistribution``); a user's flattening of its
    own may take them in another order, which matches that one for some hash seeds."""
    flatten = getattr(type(node), "tree_flatten", None)
    return getattr(flatten, "__module__", "").startswith("numpyro.")


def _field(node: Any, name: str) -> Any:
    """``node``'s attribute ``name`` as stored, None where none is (read without
    running a property: a NumPyro lazy one would be computed and kept)."""
    return getattr(node, "__dict__", {}).get(name)


def named_array_data(value: Any) -> Any:
    """A penzai ``NamedArray``'s array (names of values it holds need no
    ``.data_array``); anything else as it is."""
    named_axes = sys.modules.get("penzai.core.named_axes")
    kind = getattr(named_axes, "NamedArray", None)
    if isinstance(kind, type) and isinstance(value, kind):
        return value.data_array
    return value
