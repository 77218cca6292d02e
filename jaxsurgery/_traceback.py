"""Tracebacks without jaxsurgery's own frames, the way JAX hides its internals.

Every public entry point (``js.trace``, ``js.tag``, the public methods of ``Graph``,
``Slice``, ``Selection`` and of the function ``g.grads_fn`` returns) is wrapped by
:func:`boundary`. When an exception leaves the outermost boundary, the frames of
files inside the ``jaxsurgery`` package are cut from its traceback, so the user sees
their own call line and the message; the exception itself (type, message, cause)
is unchanged. The boundary's own frame stays (Python adds the frame that re-raises);
frames of JAX and of user code called back (a traced function, a ``replace``
function) stay too. Errors that are not a ``js.SurgeryError`` get a note saying how
to see the removed frames, since those may be a bug worth reporting.

Set ``JAXSURGERY_TRACEBACK_FILTERING=off`` (read when an error happens) to keep
every frame; ``JAX_TRACEBACK_FILTERING=off`` turns it off too.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from collections.abc import Callable
from typing import Any, TypeVar

from . import _compat as C
from ._errors import SurgeryError

F = TypeVar("F", bound=Callable[..., Any])

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
ENV = "JAXSURGERY_TRACEBACK_FILTERING"
_NOTE = f"jaxsurgery removed its internal frames from this traceback; set {ENV}=off to see them"


def filtering() -> bool:
    """Whether tracebacks are filtered now (the environment variables are read each time)."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    return not C.jax_traceback_filtering_off()


def _internal(frame: types.FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_PACKAGE)


def _under_boundary(frame: types.FrameType | None) -> bool:
    """Whether a boundary is active further up the stack (it will filter)."""
    while frame is not None:
        if frame.f_code is _reraise_code:
            return True
        frame = frame.f_back
    return False


def filter_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without the frames of jaxsurgery's files."""
    kept = []
    while tb is not None:
        if not _internal(tb.tb_frame):
            kept.append(tb)
        tb = tb.tb_next
    out = None
    for entry in reversed(kept):
        out = types.TracebackType(out, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return out


def boundary(fn: F) -> F:
    """``fn`` whose exceptions leave without jaxsurgery's frames (see the module doc)."""
    if getattr(fn, "_jaxsurgery_boundary", False):
        return fn

    @functools.wraps(fn)
    def reraise_with_filtered_traceback(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # noqa: F841  (IPython and pytest hide this frame)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if _under_boundary(sys._getframe(1)) or not filtering():
                raise
            e.with_traceback(filter_traceback(e.__traceback__))
            if not isinstance(e, SurgeryError) and hasattr(e, "add_note"):
                if _NOTE not in getattr(e, "__notes__", ()):
                    e.add_note(_NOTE)
            raise

    reraise_with_filtered_traceback._jaxsurgery_boundary = True  # type: ignore[attr-defined]
    return reraise_with_filtered_traceback  # type: ignore[return-value]


_reraise_code = boundary(lambda: None).__code__


def install(*classes: type) -> None:
    """Wrap the public methods (and ``__getitem__``/``__call__``) of ``classes``."""
    for cls in classes:
        for name, attr in list(vars(cls).items()):
            public = not name.startswith("_") or name in ("__getitem__", "__call__")
            if public and isinstance(attr, types.FunctionType):
                setattr(cls, name, boundary(attr))
