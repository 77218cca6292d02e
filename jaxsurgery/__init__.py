"""jaxsurgery: look inside JAX functions, name intermediates, and cut them apart.

>>> import jax, jax.numpy as jnp, jaxsurgery as js
>>> def f(x):
...     z1 = jnp.tanh(x)
...     z2 = jnp.sin(z1)
...     return z2.sum()
>>> g = js.trace(f, jnp.ones(3))
>>> s = g.slice("z1", "z2")
>>> jax.jvp(s, (g.value("z1"),), (jnp.ones(3),))[1].shape
(3,)
"""

from . import _traceback
from ._collect import collect as collect
from ._errors import SelectionError as SelectionError
from ._errors import SliceError as SliceError
from ._errors import SurgeryError as SurgeryError
from ._errors import TraceError as TraceError
from ._experiments import AttributionFunction as _AttributionFunction
from ._experiments import PatchFunction as _PatchFunction
from ._experiments import ValuesFunction as _ValuesFunction
from ._grads import GradsFunction as _GradsFunction
from ._graph import Graph as Graph
from ._graph import Var as Var
from ._graph import WholeFunction as _WholeFunction
from ._select import Selection as Selection
from ._slice import Slice as Slice
from ._tag import tag as tag
from ._trace import trace as trace

# errors leave the public entry points without jaxsurgery's frames (see _traceback)
_traceback.install(
    Graph,
    Slice,
    Selection,
    _GradsFunction,
    _ValuesFunction,
    _PatchFunction,
    _AttributionFunction,
    _WholeFunction,
)
trace = _traceback.boundary(trace)  # noqa: F811
tag = _traceback.boundary(tag)  # noqa: F811
collect = _traceback.boundary(collect)  # noqa: F811

__version__ = "0.1.0"

__all__ = [
    "Graph",
    "Selection",
    "SelectionError",
    "Slice",
    "SliceError",
    "SurgeryError",
    "TraceError",
    "Var",
    "collect",
    "tag",
    "trace",
]
