"""Scope names: ``jax.named_scope``, Flax linen module paths, Haiku and Equinox scopes.

Every equation carries a name-stack path (``"MLP/Dense_0"``). A *scope instance* is a
run of consecutive equations inside the same scope; a scope entered k > 1 times under
the same parent instance is ``name#k`` (k in program order), like a repeated call.
Transformation marks in the name stack (``jvp()``, ``vmap()``) are not scopes.

Names given (SPEC §4.5):
    * ``"MLP/Dense_0"`` on each **output** of the instance: a value made inside and
      read outside it (or returned by the function);
    * ``"MLP/Dense_0/%<index>"`` on every value made inside, so the glob
      ``"MLP/Dense_0/*"`` selects the instance's inside; in a loop, with the
      iterations last (``"blk/%12@3"``), so that ``"blk/*@3"`` selects what ``blk``
      holds in iteration 3 (a folded loop's body values take ``"blk/loop0%12@3"``,
      see :func:`jaxsurgery._loop_index.index_templates`).

Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     with jax.named_scope("block"):
    ...         h = jnp.sin(x) * 2.0
    ...     return h + 1.0
    >>> g = js.trace(f, jnp.ones(2))
    >>> g["block"] is g["h"]
    True
    >>> g.select("block/*").names
    ('%1', 'h')
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from . import _compat as C
from ._structured import iterations


def scope_names(
    program: Any,
    iterations: bool = True,
    saved: frozenset[int] = frozenset(),
    state: frozenset[int] = frozenset(),
    numbers: Sequence[int] | None = None,
    steps: Callable[[int], tuple | None] | None = None,
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(var index, name)`` pairs: outputs of scope instances, and their insides.

    A scope entered once per iteration of an unrolled loop is named by the iteration,
    as a Python name is (``cell/wh@8``), not numbered; ``iterations=False`` leaves the
    suffix off (a folded loop's template: its names take the iterations later).
    ``saved``: outputs of the program that only a backward pass reads (a folded loop's
    residuals, see :class:`_Backward`). ``state``: values a library stored as module
    state (BatchNorm statistics, ``hk.set_state``): returning them does not make them
    an instance's outputs, unless nothing else leaves it, so that under
    ``mutable=["batch_stats"]`` (or ``transform_with_state``) ``"Net/Block_0"`` is the
    block's value, not also its statistics. ``numbers``: the number of each var's
    ``scope/%k`` name where it is not the var's index (see ``Names.numbers``);
    ``steps``: where var ``v`` is in the nested program (a patched graph's program
    knows it from the graph it was made from), else ``program.locations``.
    """
    eqns = program.jaxpr.eqns
    parents: list[int] = []  # per instance: its parent instance, or -1
    labels: list[str] = []
    its: list[tuple[int, ...]] = []  # per instance: the loop iterations it runs in
    chains: list[tuple[int, ...]] = []  # per equation: its instances, outermost first
    suffixes: list[str] = []  # per equation: the iterations it runs in, as a name's suffix
    stack: list[tuple[str, int]] = []  # (component, instance)
    for e, eqn in enumerate(eqns):
        if not stack and not C.has_scope(eqn.source_info):
            chains.append(())  # the common case outside any scope
            suffixes.append("")
            continue
        parts = scope_parts(C.scope_of(eqn.source_info))
        at = _iterations(program, e, steps)
        suffixes.append("".join(f"@{t}" for t in at) if iterations else "")
        keep = 0
        while (
            keep < min(len(stack), len(parts))
            and stack[keep][0] == parts[keep]
            and its[stack[keep][1]] == at[: len(its[stack[keep][1]])]
        ):
            keep += 1
        del stack[keep:]
        for part in parts[keep:]:
            parents.append(stack[-1][1] if stack else -1)
            labels.append(part)
            its.append(at)
            stack.append((part, len(labels) - 1))
        chains.append(tuple(inst for _, inst in stack))
    if not labels:
        return [], []
    plain = _instance_paths(parents, labels, its)
    paths = [p + "".join(f"@{t}" for t in at) for p, at in zip(plain, its)] if iterations else plain

    names: list[tuple[int, str]] = []
    inside: list[tuple[int, str]] = []
    outputs = set(program.outputs)
    backward = _Backward(eqns)
    residuals: dict[int, list[int]] = {}  # per instance: values only the backward pass reads
    named: set[int] = set()  # instances with an output
    for e, chain in enumerate(chains):
        if not chain:
            continue
        forward = not backward[e]
        for v in program.eqn_out[e]:
            stored = v in saved or v in state
            leaving = set(chain) if v in outputs and not stored else set()
            kept = set(chain) if stored else set()
            for u in program.users[v]:
                left = set(chain) - set(chains[u])
                # module state read outside (hk.scan threads the whole state through
                # its loop) is still state
                (kept if (forward and backward[u]) or v in state else leaving).update(left)
            for inst in chain:
                if inst in leaving:
                    names.append((v, paths[inst]))
                    named.add(inst)
                elif inst in kept:
                    residuals.setdefault(inst, []).append(v)
                # the iterations last, as in every name of a value per iteration:
                # "blk/*@3" is what blk holds in iteration 3
                k = v if numbers is None else numbers[v]
                inside.append((v, f"{plain[inst]}/%{k}{suffixes[e]}"))
    names.extend((v, paths[i]) for i, vs in residuals.items() if i not in named for v in vs)
    return names, inside


class _Backward:
    """Whether equation ``e`` is in a derivative's backward pass, computed once each.

    A forward scope instance's value that only the backward pass reads (a residual:
    the mask of a ``relu``, kept for its derivative) is not an output of the instance,
    unless nothing else leaves it: under ``jax.grad``, ``"MLP/Block_1"`` is the block's
    value, not also its ``relu`` mask.
    """

    def __init__(self, eqns: list) -> None:
        self.eqns, self.known = eqns, {}

    def __getitem__(self, e: int) -> bool:
        found = self.known.get(e)
        if found is None:
            found = self.known[e] = C.in_backward_pass(self.eqns[e].source_info)
        return found


def scope_parts(path: str) -> list[str]:
    """The scope labels of a name stack, without JAX's transformation marks.

    ``jvp()``, ``vmap()`` alone are not scopes; a transform around a scope keeps the
    scope (``jvp(MLP)`` is ``MLP``), and the backward pass of ``jax.grad`` is marked:
    ``transpose(jvp(MLP))/Dense_0`` is ``grad(MLP)/Dense_0``, so the backward instance
    of a layer reads apart from its forward one (``MLP/Dense_0``).
    """
    return _parts(path)[0]


def backward_prefix(path: str) -> tuple[str, bool]:
    """The scope path of a name stack, and whether it ends in a bare backward-pass mark
    (``transpose(jvp())``, the name stack of a loop that ``jax.grad`` transposed): the
    scopes of such a loop's body are the backward pass's, ``grad(cell)``."""
    parts, backward = _parts(path)
    return "/".join(parts), backward


def _parts(path: str) -> tuple[list[str], bool]:
    parts, backward = _parsed(path)
    return list(parts), backward


@functools.lru_cache(maxsize=4096)
def _parsed(path: str) -> tuple[tuple[str, ...], bool]:
    """:func:`_parts`, parsed once per name stack (every equation of a model's layer
    has the same one: parsed a character at a time, 0.2 ms a trace of an Equinox
    GRU cell's scan)."""
    parts, depth, start, backward = [], 0, 0, False
    for i, ch in enumerate(path + "/"):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "/" and depth == 0:
            label, marked = _label(path[start:i])
            backward = backward or marked
            if label:
                parts.append(f"grad({label})" if backward and not marked else label)
                backward = False
            start = i + 1
    return tuple(parts), backward


#: the name JAX gives a checkpoint's recomputation in a backward pass, named
#: ``recomputed`` (``recomputed#1/%15``: the forward values a checkpoint computes again
#: there; they were ``grad(rematted_computation)#1/%15``, JAX's word, and not a
#: backward pass's values)
_RECOMPUTED, _RECOMPUTED_LABEL = "rematted_computation", "recomputed"


def _label(part: str) -> tuple[str, bool]:
    """A name-stack component as a scope label ('' for a bare transformation mark), and
    whether a backward-pass mark (``transpose``) wraps it."""
    backward = False
    while True:
        head, paren, inner = part.partition("(")
        if not (paren and part.endswith(")") and head.isidentifier()):
            break
        backward = backward or head == "transpose"
        part = inner[:-1]
    if part == _RECOMPUTED:  # forward values, recomputed: not the backward pass's own
        return _RECOMPUTED_LABEL, True  # (marked: no grad() around it)
    if not part:
        return "", backward
    scope = "/".join(scope_parts(part)) if "/" in part else part
    return (f"grad({scope})" if backward and scope else scope), backward


def scope_path(path: str) -> str:
    """A name stack as the scope path of a var (``Var.scope``)."""
    return "/".join(scope_parts(path))


def _instance_paths(parents: list[int], labels: list[str], its: list[tuple[int, ...]]) -> list[str]:
    """Full paths with ``#k`` where a scope repeats under the same parent in the same
    loop iterations (once per iteration is one scope, told apart by the iteration).

    In a backward pass (``grad(MLP)/...``, and a checkpoint's ``recomputed`` values
    there) the instances run in reverse: they are numbered from the last, so that
    ``grad(eqx.nn.MLP)/eqx.nn.Linear#0`` is the backward pass of
    ``eqx.nn.MLP/eqx.nn.Linear#0``."""
    counts: dict[tuple, int] = {}
    for parent, label, at in zip(parents, labels, its):
        counts[parent, label, at] = counts.get((parent, label, at), 0) + 1
    repeated = {(p, label) for (p, label, _), n in counts.items() if n > 1}
    seen: dict[tuple, int] = {}
    paths: list[str] = []
    backward: list[bool] = []
    for parent, label, at in zip(parents, labels, its):
        k = seen[parent, label, at] = seen.get((parent, label, at), -1) + 1
        # (a checkpoint's recomputation runs in the backward pass, in its order too)
        backward.append(
            label.startswith("grad(")
            or label == _RECOMPUTED_LABEL
            or (parent >= 0 and backward[parent])
        )
        if backward[-1]:
            k = counts[parent, label, at] - 1 - k
        own = f"{label}#{k}" if (parent, label) in repeated else label
        # a parent's path holds no iterations: they follow the whole name
        paths.append(own if parent < 0 else f"{paths[parent]}/{own}")
    return paths


def _iterations(
    program: Any, e: int, steps: Callable[[int], tuple | None] | None = None
) -> tuple[int, ...]:
    """The iterations of the unrolled loops equation ``e`` runs in (none: top level)."""
    for v in program.eqn_out[e]:
        if steps is not None:
            found = steps(v)
            if found is not None:
                return iterations(found)
            continue
        found = program.locations.get(program.vars[v])  # top-level vars have none
        if found is not None:
            return iterations(found[0])
    return ()
