"""Naming: every var gets one unique canonical name and any number of aliases.

The rules, in priority order (SPEC §4); the canonical name is the first that applies
and is not already another var's canonical name, the rest are aliases:

1. inputs: parameter name + pytree key path (``x``, ``params['w']``, ``args[2]``);
2. tags: ``js.tag(x, "name")`` and ``checkpoint_name(x, "name")``;
3. Python variable names of the traced function (``z1 = ...``);
   Values inside called functions are qualified by the call (``f2/h``,
   ``layer#1/z``); the call name alone names what it returned (``layer#1``);
4. scopes: ``"MLP/Dense_0"`` names the outputs of a scope, ``"MLP/Dense_0/%i"``
   everything made inside it (:mod:`jaxsurgery._scopes`);
5. outputs: ``out``, ``out[0]``, ``out['loss']`` (aliases: an output that also has a
   Python name keeps the Python name as canonical);
6. fallback: ``%<index>`` (every var answers to it) and ``<primitive>:<index>``.

A name given to k > 1 distinct vars (a loop, a rebinding, a repeated tag) is
canonical in its ``name#k`` forms, in binding order, and the bare ``name`` is an
alias of all of them, so ``g.select("h")`` finds every binding and ``g["h"]`` says it
is ambiguous. A parameter that the function body rebinds is binding ``#0``: its
canonical name is ``x#0`` (the bare ``x`` is ambiguous there too).

Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> def f(x):
    ...     for _ in range(2):
    ...         x = jnp.sin(x)
    ...     return x
    >>> g = js.trace(f, jnp.ones(3))
    >>> [v.name for v in g.vars]
    ['x#0', 'x#1', 'x#2']
    >>> g["x#2"].aliases
    ('x', 'out', '%2', 'sin:2')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Names:
    """The result of naming: canonical names per var and the lookup table."""

    canonical: list[str]
    aliases: list[tuple[str, ...]]
    lookup: dict[str, list[int]] = field(default_factory=dict)
    by_canonical: dict[str, int] = field(default_factory=dict)
    #: what ``finalize`` chose from, kept so a derived graph can carry names over
    candidates: Sequence[Sequence[str]] = ()
    extras: Sequence[Sequence[str]] = ()
    protected: set[str] = field(default_factory=set)

    primitives: Sequence[str] = ()
    #: the argument path of each input (``params['w']``; its canonical name may be a
    #: label a library gives it), where known
    arguments: Sequence[str] = ()
    #: the number in each var's fallback names (``%7``, ``tanh:7``) where it is not the
    #: var's index: a graph ``g.replace`` spliced keeps the numbers of the graph it was
    #: made from (its ``%7`` is g's ``%7``), and its new values take numbers after them
    numbers: Sequence[int] | None = None
    #: names the traced function gives values the index has no var for (a js.tag inside
    #: a shard_map's body), with why: what selecting one says
    hidden: dict[str, str] = field(default_factory=dict)

    def number(self, i: int) -> int:
        """The number in var ``i``'s fallback names."""
        return i if self.numbers is None else self.numbers[i]

    def all_names(self) -> list[str]:
        """Every name that selects something, canonical names first."""
        rest = [n for n in self.lookup if n not in self.by_canonical]
        fallbacks = [n for i in range(len(self.canonical)) for n in self.fallbacks(i)]
        # an unnamed var's canonical name is its fallback %i: listed once
        return list(dict.fromkeys([*self.canonical, *rest, *fallbacks]))

    def fallbacks(self, i: int) -> tuple[str, str]:
        """``("%12", "tanh:12")``: names every var answers to, made when asked for."""
        k = self.number(i)
        return f"%{k}", f"{self.primitives[i]}:{k}"

    def aliases_of(self, i: int) -> tuple[str, ...]:
        chosen = self.canonical[i]
        return (*self.aliases[i], *(n for n in self.fallbacks(i) if n != chosen))

    def parse_fallback(self, name: str) -> int | None:
        """The var a ``%i`` or ``primitive:i`` name selects, or None."""
        head, sep, digits = name.rpartition(":") if ":" in name else ("", "%", name[1:])
        if not digits.isdigit() or (sep == "%" and not name.startswith("%")):
            return None
        i = self._by_number().get(int(digits))
        if i is None or (sep == ":" and self.primitives[i] != head):
            return None
        return i

    def _by_number(self) -> dict[int, int] | _Indices:
        """Var index by fallback number (a range: every number is its var's index)."""
        if self.numbers is None:
            return _Indices(len(self.canonical))
        found = self.__dict__.get("_numbered")
        if found is None:
            found = self.__dict__["_numbered"] = {k: i for i, k in enumerate(self.numbers)}
        return found


class _Indices:
    """``{i: i for i in range(n)}`` without building it."""

    def __init__(self, n: int):
        self.n = n

    def get(self, k: int) -> int | None:
        return k if 0 <= k < self.n else None


def is_generated(name: str) -> bool:
    """Whether jaxsurgery made a name up (``%12``, ``tanh:12``, ``MLP/%12``).

    Tables do not list such aliases, and suggestions for a user's word skip them.
    """
    return _GENERATED.search(name) is not None or (":" in name and name.rsplit(":", 1)[1].isdigit())


#: ``%12`` or ``scope/%12`` (a fallback name), ``loop0%4`` (a folded loop's body value),
#: at an iteration or not: a ``%`` a user wrote (``out['acc%']``) is not one
_GENERATED = re.compile(r"(?:^|/)(?:loop\d+)?%\d+(?:@\d+)*$")


def _group(
    bindings: Iterable[tuple[str, int]], first: dict[str, tuple[int, ...]]
) -> dict[int, list[str]]:
    """Per var, the names a binding sequence gives it, ``#k`` forms where needed.

    ``first`` gives vars that are bindings ``#0``, ``#1``... of a name before the
    sequence starts (parameters the body rebinds, then tags of their names).
    """
    order: dict[str, dict[int, None]] = {}  # name -> its distinct vars, in binding order
    for name, var in bindings:
        vs = order.get(name)
        if vs is None:
            vs = order[name] = dict.fromkeys(first[name]) if name in first else {}
        vs[var] = None
    names: dict[int, list[str]] = {}
    for name, var_set in order.items():
        vs = list(var_set)
        if len(vs) == 1:
            if name not in first:
                names.setdefault(vs[0], []).append(name)
            continue
        base, at, iterations = name.partition("@")  # _numbered, inlined: every binding
        for k, var in enumerate(vs):
            numbered = f"{base}#{k}{at}{iterations}"
            got = names.get(var)
            if got is None:
                names[var] = [numbered, name]
            else:
                got += (numbered, name)
    return names


def _one_numbering(
    shared: set[str],
    first: dict[str, tuple[int, ...]],
    tagged: Sequence[tuple[str, int]],
    bindings: Sequence[tuple[str, int]],
) -> dict[str, tuple[int, ...]]:
    """For names both tags and Python names (or arguments) give: their vars in one
    order, the bindings' (``h#1`` is what the code binds second, also where it binds an
    older value, ``h = a``), a tag no Python name binds before the first binding of a
    later value (tags are in program order). Names of one var are left out (``h =
    js.tag(y, "h")``: a name of its own, as any name bound once)."""
    order: dict[str, list[int]] = {n: list(first.get(n, ())) for n in shared}
    for name, var in bindings:
        if name in shared and var not in order[name]:
            order[name].append(var)
    skip = {n: len(first.get(n, ())) for n in shared}  # (an argument stays #0)
    for name, var in tagged:
        if name in shared and var not in order[name]:
            vs = order[name]
            at = next((k for k in range(skip[name], len(vs)) if vs[k] > var), len(vs))
            vs.insert(at, var)
    return {n: (*vs,) for n, vs in order.items() if len(vs) > 1}


def _unnumbered(name: str) -> str:
    """``name`` without its ``#k`` numbers (``blk#1/h#2`` is ``blk/h``)."""
    return _NUMBER.sub("", name) if "#" in name else name


_NUMBER = re.compile(r"#\d+")


def _numbered(name: str, k: int) -> str:
    """``h#k``, with the ``#k`` before an iteration suffix: ``step/h#1@3``."""
    base, at, iterations = name.partition("@")
    return f"{base}#{k}{at}{iterations}"


def assign_names(
    num_vars: int,
    primitives: Sequence[str],
    inputs: Sequence[str],
    outputs: Sequence[tuple[int, str]],
    tags: Sequence[tuple[int, str]],
    bindings: Sequence[tuple[str, int]],
    scopes: Sequence[tuple[int, str]] = (),
    extra_aliases: Sequence[tuple[int, str]] = (),
    input_labels: Sequence[tuple[int, str]] = (),
    input_aliases: Sequence[tuple[int, str]] = (),
) -> Names:
    """Names for ``num_vars`` vars, the first ``len(inputs)`` being the inputs.

    Args:
        primitives: the producing primitive of each var (``"input"``, ``"const"``, ...).
        inputs: the name of each input var.
        outputs: ``(var, name)`` for each output leaf.
        tags: ``(var, name)`` in program order.
        bindings: ``(name, var)`` of Python assignments and call results, in naming
            priority order.
        scopes: ``(var, name)`` of scope outputs (never ``#k``).
        extra_aliases: ``(var, name)`` that are never canonical (``scope/%i``).
        input_labels: ``(input, label)`` a library gives an input (a penzai
            parameter's label), canonical before its argument path.
        input_aliases: ``(input, alias)``, never canonical (a Flax NNX variable's
            path without the ``.value`` of its tree path).
    """
    candidates: list[list[str]] = [[] for _ in range(num_vars)]
    for i, name in enumerate(inputs):
        candidates[i].append(name)
    for i, label in input_labels:
        candidates[i].insert(0, label)
    # a tag or a Python name given an input's name rebinds it (the input is #0 of it),
    # and a name both tags and Python names give is one numbering (x#1 is one var)
    first = {name: (i,) for i, name in enumerate(inputs)}
    tagged = [(n, v) for v, n in tags]
    bound, tag_names = {n for n, _ in bindings}, {n for n, _ in tagged}
    shared = tag_names & (bound | first.keys())
    if shared:
        first.update(_one_numbering(shared, first, tagged, bindings))
    for var, names in _group(tagged, first).items():
        candidates[var].extend(names)
    for var, names in _group(bindings, first).items():
        candidates[var].extend(names)
    # a scope's name yields to an input, tag, Python variable or call of that name (rules
    # 1-3 rank first): `with jax.named_scope("enc"): z = ...` then `enc = ...` is the
    # variable's name alone (a scope named like an argument: the argument's), also where
    # both are numbered (a scope entered twice, "h" and "h#1"; a variable bound twice)
    higher: dict[str, set[int]] = {_unnumbered(n): set(vs) for n, vs in first.items()}
    for name, var in (*bindings, *tagged):
        higher.setdefault(_unnumbered(name), set()).add(var)
    for var, name in scopes:
        if var in higher.get(_unnumbered(name), (var,)):
            candidates[var].append(name)
    for var, name in outputs:
        candidates[var].append(name)
    if any(name in bound or name in tag_names for _, name in outputs):
        _outputs_take_their_names(candidates, outputs, bindings, tags)

    extras: list[list[str]] = [[] for _ in range(num_vars)]
    for var, name in extra_aliases:
        extras[var].append(name)
    for var, name in input_aliases:
        if name not in bound and name not in tag_names:  # (a tag "m.kernel" keeps it)
            extras[var].append(name)
    names = finalize(candidates, extras, primitives, {*inputs, *(n for _, n in input_labels)})
    names.arguments = list(inputs)
    return names


def _outputs_take_their_names(
    candidates: list[list[str]],
    outputs: Sequence[tuple[int, str]],
    bindings: Sequence[tuple[str, int]],
    tags: Sequence[tuple[int, str]],
) -> None:
    """An output whose name a Python variable bound several times (``out = layer(x);
    out = out + x; return out``) takes the bare name (``out``): the other bindings keep
    their ``out#k`` (in place). The outputs' names were ambiguous there."""
    wanted = {name: var for var, name in outputs}
    for name, other in (*bindings, *((n, v) for v, n in tags)):
        if wanted.get(name, other) != other and name in candidates[other]:
            # (a shadowing variable, the output not among its bindings, was left out)
            candidates[other] = [c for c in candidates[other] if c != name]


def shadowed_outputs(
    outputs: Sequence[tuple[int, str]],
    bindings: Sequence[tuple[str, int]],
    tags: Sequence[tuple[int, str]],
) -> list[str]:
    """The output names (``out``, ``out[0]``) that a Python variable or a tag of the
    traced function gives another value (``out = model(x); return out.sum()``): the
    variable keeps its name, which then selects it, not the output."""
    named: dict[str, set[int]] = {}
    for name, var in bindings:
        named.setdefault(name, set()).add(var)
    for var, name in tags:
        named.setdefault(name, set()).add(var)
    return [name for var, name in outputs if name in named and var not in named[name]]


def finalize(
    candidates: Sequence[Sequence[str]],
    extras: Sequence[Sequence[str]],
    primitives: Sequence[str],
    protected: set[str],
    numbers: Sequence[int] | None = None,
) -> Names:
    """Choose canonical names from each var's candidates, in order.

    A candidate is canonical unless another var took it already or several vars
    answer to it (``protected`` names, the inputs', are canonical even then, unless
    the input is binding ``#0`` of that name: a parameter the body rebinds is
    ``x#0``, so the bare ``x`` is ambiguous like any name bound several times).
    ``extras`` are aliases that are never canonical; ``numbers``: see
    :attr:`Names.numbers`.
    """
    multi = _multi_names(candidates)
    taken: set[str] = set()
    canonical: list[str] = []
    aliases: list[tuple[str, ...]] = []
    lookup: dict[str, list[int]] = {}
    by_canonical: dict[str, int] = {}
    made_up: list[str] = []
    # one pass over every var, written for speed (it names every value of a program)
    for i, cands in enumerate(candidates):
        extra = extras[i]
        if not cands and not extra:  # most vars: nothing but the fallback
            canonical.append(f"%{i if numbers is None else numbers[i]}")
            aliases.append(())
            continue
        chosen = None
        for c in cands:
            if c in taken or (c in multi and (c not in protected or _numbered(c, 0) in cands)):
                continue
            chosen = c
            break
        unique = dict.fromkeys(cands)
        if chosen is None:  # the fallback %i: derived on demand, not stored in the tables
            canonical.append(f"%{i if numbers is None else numbers[i]}")
        else:
            taken.add(chosen)
            canonical.append(chosen)
            by_canonical[chosen] = i
            del unique[chosen]
            lookup.setdefault(chosen, []).append(i)  # listed first
            if chosen[:1] == "%":  # a name made up like a fallback: see below
                made_up.append(chosen)
        for n in unique:
            found = lookup.get(n)
            if found is None:
                lookup[n] = [i]
            else:
                found.append(i)
        for n in extra:
            lookup.setdefault(n, []).append(i)
        aliases.append((*unique, *extra) if extra else tuple(unique))
    # a fallback ``%k`` some var answers to selects var k, also where an earlier var
    # took ``%k`` as its canonical name (a tag named "%3")
    names = Names(canonical, aliases, lookup, by_canonical, numbers=numbers)
    for n in [*made_up, *(lookup.keys() - by_canonical.keys())]:
        k = names.parse_fallback(n) if n[:1] == "%" else None
        if k is not None and canonical[k] == n:
            by_canonical[n] = max(k, by_canonical.get(n, -1))
    names.candidates, names.extras, names.protected = candidates, extras, protected
    names.primitives = primitives
    return names


def _multi_names(candidates: Sequence[Sequence[str]]) -> set[str]:
    """Names that more than one var answers to (never canonical, except inputs)."""
    seen: dict[str, int] = {}
    multi: set[str] = set()
    for i, cands in enumerate(candidates):
        for c in cands:
            if seen.setdefault(c, i) != i:
                multi.add(c)
    return multi
