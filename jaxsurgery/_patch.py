"""Splicing: a new program with small jaxprs inserted after chosen vars.

The one mechanism behind patching (``g.replace``: readers of a var see ``fn(old)``),
one-pass gradients (``g.grads``: a zero perturbation added at each var) and rewriting
(``g.rewrite``: a matched output recomputed by a replacement). Each :class:`Edit`
names a target var and a closed jaxpr computing its new value from vars of the
program (or from new inputs appended to the program's inputs); equations after the
edit read the new value, equations before it the old one.

Calls and loops kept as regions survive when no edit lands strictly inside them; a
region with an edit inside is dropped (its body stays inlined, so a slice of the
new program cannot fold it back).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat as C
from ._errors import SliceError, type_of
from ._gc import gc_paused
from ._program import Program, Region, _Inliner
from ._promotion import held, holds, out_of_range

if TYPE_CHECKING:
    from ._graph import Var


@dataclass(frozen=True)
class Extra:
    """The k-th new input of a spliced program (appended after the original inputs)."""

    k: int


def spec_of(var: Var) -> jax.ShapeDtypeStruct:
    """What a replacement is traced on: the var's type, weakly typed where the var is (a
    value computed from a Python number: ``u * 2`` stays so, as in the function; where
    that makes another dtype, ``u * jnp.bfloat16(0.5)``, it is traced again on the
    strongly typed value, whose result the target's dtype takes)."""
    return C.spec_of(var.aval, weak=True)


#: how JAX names the function ``_compat.make_jaxpr`` traces, in its messages
_WRAPPER = re.compile(r"function <lambda> at \S*_compat\.py:\d+")


def replacement_jaxpr(
    fn: Callable[..., Any], inputs: Sequence[Var], target: Var, what: str
) -> C.ClosedJaxpr:
    """``fn`` traced on the inputs' types, checked to give one value of the target's type.

    A Python number ``fn`` returns is taken as ``g.replace(var, 0)`` takes it: when the
    target's dtype holds it (``_promotion.holds``: ``0`` for a float32 var, not ``2.5``
    for an int32 one), as that value for every element (JAX traces it as a weakly
    typed int32 or float32, which the check of the target's type refused).
    ``what`` names the replacement in messages (``"the replacement for 'z1'"``).
    """
    for v in (target, *inputs):  # (fn would be traced, and give, in 32 bits)
        if C.narrowed(v.dtype):
            said = f"must give {type_of(v)}" if v is target else f"reads {v.name!r}, {type_of(v)}"
            raise C.x64_refusal(f"{what} {said}")
    returned: list[Any] = []

    def refused(got: str, fix: str = f"return a value shaped like {target.name!r}") -> SliceError:
        return SliceError(f"{what} must give {type_of(target)}, got {got}; {fix}")

    def one_array(*args: Any) -> Any:
        out = fn(*args)
        returned.append(out)
        if isinstance(out, (bool, int, float, complex)) and not hasattr(out, "dtype"):
            if not holds(target.dtype, out):  # 2.5 for an int var would run as 2
                said = out_of_range(target.dtype, out) or f"which {target.dtype} does not hold"
                raise refused(
                    f"a Python {type(out).__name__} ({said})",
                    "return a value of its kind (cast it yourself if a cast is what you mean)",
                )
            return jnp.full(target.shape, out, target.dtype)
        if isinstance(out, jax.ShapeDtypeStruct):  # (its shape matched: taken as a value)
            raise refused("a jax.ShapeDtypeStruct, a shape and dtype with no values")
        if getattr(out, "shape", None) == target.shape:  # (of the target's sharding type)
            return C.resharded_like(out, target.aval)
        return out

    try:
        closed = C.make_jaxpr(one_array, *[spec_of(v) for v in inputs])
        if closed.out_avals and closed.out_avals[0].dtype != target.dtype:
            # computed weakly, another dtype (u * a bfloat16 scalar): as the value is
            # strongly typed, which the target's dtype takes back, as before
            returned.clear()
            closed = C.make_jaxpr(one_array, *[C.spec_of(v.aval) for v in inputs])
    except (TypeError, ValueError) as e:
        if returned and isinstance(e, SliceError):
            raise  # one_array's, for the Python number fn returned
        # (JAX names the function it traced: jaxsurgery's wrapper of yours)
        said = _WRAPPER.sub(f"function {getattr(fn, '__name__', type(fn).__name__)}", str(e))
        raise SliceError(f"{what} ({type_of(target)}) failed to trace: {said}") from None
    out = closed.out_avals
    # a list or dict of one array is not the value itself
    container = not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(returned[0]))
    if (
        container
        or len(out) != 1
        or tuple(out[0].shape) != target.shape
        or out[0].dtype != target.dtype
    ):
        got = ", ".join(f"{a.dtype}{list(a.shape)}" for a in out) or "nothing (no array)"
        got = f"{type(returned[0]).__name__} of {got}" if container else got
        if not container and len(out) == 1 and tuple(out[0].shape) == target.shape:
            # the shape is right, the dtype is not: say what to do of that
            raise refused(got, f"cast it (.astype({str(target.dtype)!r})) in the replacement")
        raise refused(got)
    consts = [held(c, c.dtype) if isinstance(c, np.ndarray) else c for c in closed.consts]
    if any(a is not b for a, b in zip(consts, closed.consts)):
        # a NumPy array given (or closed over) is copied, as js.trace copies arguments (a
        # view of a writeable buffer too): a buffer refilled afterwards (a data loader's)
        # changed the patched graph. (One a jitted helper in the patch closes over is in
        # that call's program, not copied.)
        closed = C.ClosedJaxpr(closed.jaxpr, consts)
    return closed


@dataclass(frozen=True)
class Edit:
    target: int
    closed: C.ClosedJaxpr
    reads: tuple[int | Extra, ...]


@gc_paused
def splice(
    program: Program,
    edits: Sequence[Edit],
    extra_avals: Sequence[Any] = (),
    flat_args: Sequence[Any] | None = None,
) -> tuple[Program, list[int], dict[int, int]]:
    """The program with ``edits`` applied.

    Returns ``(new program, var map, patched)``: ``var map[i]`` is the new index of old
    var ``i`` (its unpatched value); ``patched[i]`` the new index of an edited target's
    new value.
    """
    inl = _Inliner(flat_args if not extra_avals else None)
    inl.rewired = True  # edits map vars to new values
    env: dict[Any, Any] = {}
    top = program.num_inputs + program.num_consts
    invars = inl.keep_top_level(
        program.vars[: program.num_inputs],
        program.vars[program.num_inputs : top],
        program.consts,
        env,
    )
    extra = [C.Var(aval) for aval in extra_avals]
    invars += extra

    at: dict[int, list[Edit]] = {}
    for edit in edits:
        reads = [r for r in edit.reads if not isinstance(r, Extra)]
        pos = max(program.producer[i] for i in (edit.target, *reads))
        at.setdefault(pos, []).append(edit)
    new_values: dict[int, Any] = {}

    def apply(pos: int) -> None:
        for edit in at.get(pos, ()):
            atoms = [
                extra[r.k] if isinstance(r, Extra) else env[program.vars[r]] for r in edit.reads
            ]
            eqn = program.jaxpr.eqns[pos] if pos >= 0 else None
            source_info = None if eqn is None else eqn.source_info
            new = inl._inline(edit.closed, atoms, source_info)[0]
            if isinstance(new, C.Literal):  # a constant (``0.0``): a constant var, as outputs
                new = inl._new_const(np.asarray(new.val, new.aval.dtype), new.aval)
            new_values[edit.target] = new
            env[program.vars[edit.target]] = new_values[edit.target]

    starts = {r.start: [] for r in program.regions}
    for r in program.regions:
        starts[r.start].append(r)
    carried: list[tuple[Region, list[Any]]] = []
    new_index: list[int] = []
    apply(-1)
    for e, eqn in enumerate(program.jaxpr.eqns):
        for r in starts.get(e, ()):
            carried.append((r, [inl._read(a, env) for a in r.ins]))
        new_index.append(len(inl.eqns))
        inl._copy_eqn(eqn, env, None)
        apply(e)
    outvars = [inl._read(a, env) for a in program.jaxpr.outvars]

    for region, ins in carried:
        if any(region.start <= pos < region.end - 1 for pos in at):
            continue
        new = Region(new_index[region.start], region.eqn, ins, region.source_info)
        new.end = new_index[region.end - 1] + 1
        new.outs = [_unpatched(inl, a) for a in region.outs]
        new.cut_note = region.cut_note
        new.taken = region.taken
        inl.regions.append(new)

    jaxpr = C.new_jaxpr(inl.constvars, invars, outvars, inl.eqns, "program")
    new_program = Program.__new__(Program)
    new_program._index(inl, jaxpr, inl.consts)
    var_map = [new_program.index[_unpatched(inl, v)] for v in program.vars]
    patched = {t: new_program.index[a] for t, a in new_values.items() if isinstance(a, C.Var)}
    return new_program, var_map, patched


def _unpatched(inl: _Inliner, atom: Any) -> Any:
    """The copy of an old atom made when its equation was copied (before any edit)."""
    if isinstance(atom, C.Literal):
        return atom
    found = inl.origin.get(id(atom))
    return atom if found is None else found[0][0]  # kept as it is, or copied
