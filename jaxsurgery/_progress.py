"""Progress feedback for long work (tracing, unrolling loops, drawing): a line on stderr
once the work has run for :data:`DELAY` seconds, silent before.

``with progress("tracing f") as p:`` around the work; inside, the work sets what it is
doing and how far it is (``p.phase = "indexing"``, ``p.update(done, total)``): plain
attribute writes, no clock reads, so calling them every few thousand items costs
nothing measurable. One background thread for the process (started when progress is
first shown, asleep while no work runs) reads them and draws the line:

* on a terminal or in a notebook, one line redrawn in place every
  :data:`REDRAW` seconds (``jaxsurgery: tracing f: indexing 40000/99001 (4.1 s)``);
* elsewhere (a log file), a line every :data:`LOG_EVERY` seconds;
* when the work ends after showing anything, a last line with the total time.

A ``progress(...)`` opened inside another one only names a phase of the outer one (the
trace that a drawing runs shows in the drawing's line).

Enabled unless ``JAXSURGERY_PROGRESS=0`` (or ``false``/``off``); silent under pytest
(``PYTEST_CURRENT_TEST`` is set, also in the processes a test starts) unless
``JAXSURGERY_PROGRESS=1``; ``progress(..., enabled=False)`` silences one piece of work.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> with progress("counting", delay=0.0, enabled=True, stream=out) as p:
    ...     for i in range(3):
    ...         p.update(i + 1, total=3)
    >>> out.getvalue().splitlines()[-1].startswith("jaxsurgery: counting: done in")
    True
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

T = TypeVar("T")

#: Seconds of work before anything is shown.
DELAY = 2.0
#: Seconds between redraws on a terminal or in a notebook.
REDRAW = 0.25
#: Seconds between lines in a log (a stream that cannot redraw a line).
LOG_EVERY = 10.0
#: Seconds the drawing thread keeps waking by itself after work was last watched.
IDLE = 60.0
ENV = "JAXSURGERY_PROGRESS"

_active = threading.local()


def enabled_by_default() -> bool:
    """``JAXSURGERY_PROGRESS`` says (``0``/``1``); unset: on, except under pytest."""
    value = (_environment(ENV) or "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    return _environment("PYTEST_CURRENT_TEST") is None


def _environment(name: str) -> str | None:
    """``os.environ.get(name)`` without the ``KeyError`` it raises and catches inside
    when ``name`` is unset (asked at the start of every trace; cold, that costs more
    than the rest of starting to watch the work). CPython's ``os.environ`` keeps its
    encoded items in ``_data``; elsewhere, ``get``."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if not isinstance(data, dict):
        return environ.get(name)
    raw = data.get(environ.encodekey(name))
    return None if raw is None else environ.decodevalue(raw)


def _redraws(stream: IO[str]) -> bool:
    """Whether ``stream`` can redraw a line in place (``\\r``): a terminal or a notebook."""
    isatty = getattr(stream, "isatty", None)
    try:
        if isatty is not None and isatty():
            return True
    except ValueError:  # a closed stream
        return False
    return type(stream).__module__.startswith("ipykernel")


class Progress:
    """The state of one piece of work, read by the drawing thread.

    Attributes:
        what: what the work is (``"tracing f"``).
        phase: what it is doing now (``"indexing"``), or ``""``.
        done, total: how far it is, when it counts (``total`` None: unknown).
        count: optional callable giving a live count while ``done`` is not updated
            (e.g. the values a trace has named so far), shown as ``count_label``.
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        count: Callable[[], int] | None = None,
        count_label: str = "",
    ) -> None:
        self.what, self.total, self.count, self.count_label = what, total, count, count_label
        self.phase = ""
        self.done: int | None = None

    def update(self, done: int, total: int | None = None, phase: str | None = None) -> None:
        """Record progress (cheap: no clock, no output)."""
        self.done = done
        if total is not None:
            self.total = total
        if phase is not None:
            self.phase = phase

    def text(self, elapsed: float) -> str:
        """The line shown: ``jaxsurgery: what: phase done/total (3.2 s)``."""
        parts = [f"jaxsurgery: {self.what}"]
        if self.phase:
            parts.append(f": {self.phase}")
        if self.done is not None:
            parts.append(f" {self.done}" + (f"/{self.total}" if self.total else ""))
        elif self.count is not None:
            parts.append(f" ({self.count()} {self.count_label})".rstrip())
        return "".join(parts) + f" ({elapsed:.1f} s)"


class _Phase:
    """A nested ``progress(...)``: names a phase of the outer work, then restores it."""

    def __init__(self, outer: Progress, what: str, total: int | None) -> None:
        self.outer, self.what = outer, what
        self.saved = (outer.phase, outer.done, outer.total)
        outer.phase, outer.done, outer.total = what, None, total

    def update(self, done: int, total: int | None = None, phase: str | None = None) -> None:
        self.outer.update(done, total, None if phase is None else f"{self.what}: {phase}")

    def restore(self) -> None:
        self.outer.phase, self.outer.done, self.outer.total = self.saved


def phase(text: str, count: Callable[[], int] | None = None, count_label: str = "") -> None:
    """Name the phase of the work in progress (nothing when none is shown), with an
    optional live count: ``phase("running f", count=lambda: len(items), count_label="items")``.
    """
    state = getattr(_active, "progress", None)
    if state is not None:
        state.phase, state.done = text, None
        if count is not None:
            state.count, state.count_label = count, count_label


def reported(fn: Callable[..., T], what: str) -> Callable[..., T]:
    """``fn`` run inside ``progress(what)`` (for work started later, such as unrolling)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with progress(what):
            return fn(*args, **kwargs)

    return wrapper


class _Shown:
    """A top-level piece of work being watched: its state, where and when to draw it."""

    def __init__(self, state: Progress, out: IO[str], delay: float) -> None:
        self.state, self.out = state, out
        self.start = time.monotonic()
        self.due = self.start + delay  # when to draw next
        self.width = -1  # of the last line drawn; -1: none yet
        self.closed = False  # the work ended

    @functools.cached_property
    def redraw(self) -> bool:  # asked when first drawing (most work ends before)
        return _redraws(self.out)

    def write(self, text: str, last: bool = False) -> None:
        if self.redraw:
            pad = " " * max(0, self.width - len(text))
            self.out.write("\r" + text + pad + ("\n" if last else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.width = len(text)


class _Watcher:
    """One daemon thread for the process, drawing the work that is due.

    Starting and ending work that stays short (most of it) costs no lock and no
    thread switch: the list of watched work changes atomically under the GIL, and
    the thread wakes by itself every :data:`DELAY` seconds for :data:`IDLE` seconds
    after work was last watched, so work started in that time is seen in time
    without a signal (a trace in a loop does not wake it). Work due before the
    thread wakes next (or while it sleeps until signalled) signals it.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.watched: list[_Shown] = []
        self.added = 0  # counts additions (the thread looks again if it changed)
        self.thread: threading.Thread | None = None
        self.wakes = math.inf  # when the thread wakes next by itself
        self.last = 0.0  # when work was last watched

    def add(self, shown: _Shown) -> None:
        self.watched.append(shown)
        self.added += 1
        if shown.due < self.wakes:  # the thread would wake too late, or is not there
            with self.cond:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self._run, name="jaxsurgery-progress")
                    self.thread.daemon = True
                    self.thread.start()
                self.cond.notify()

    def remove(self, shown: _Shown) -> None:
        """Stop watching; the last line, if anything was drawn or the delay passed."""
        shown.closed = True  # before reading the clock: the thread draws only what is due
        self.watched.remove(shown)
        now = self.last = time.monotonic()
        if shown.width < 0 and now < shown.due:
            return  # never drawn, and now never will be
        with self.cond:
            state = shown.state
            with contextlib.suppress(Exception):
                shown.write(f"jaxsurgery: {state.what}: done in {now - shown.start:.1f} s", True)

    def _run(self) -> None:
        with self.cond:
            while True:
                seen, now = self.added, time.monotonic()
                self.wakes = wakes = self._draw(now)
                if self.added != seen:
                    continue  # work added meanwhile may not have signalled: look again
                self.cond.wait(None if wakes == math.inf else wakes - now)

    def _draw(self, now: float) -> float:
        """Draw the work that is due; when to wake next. (A method, so that the thread
        keeps no work it looked at while it sleeps: a finished trace's progress holds a
        count of the trace's recorder, which holds what the traced function called.)"""
        watched = [w for w in list(self.watched) if not w.closed]
        if not watched:
            poll = max(DELAY, 0.1)
            return now + poll if now < self.last + IDLE else math.inf
        self.last = now
        for shown in watched:
            if now >= shown.due and not shown.closed:
                with contextlib.suppress(Exception):  # a closed stream, a bad count
                    shown.write(shown.state.text(now - shown.start))
                shown.due = now + (REDRAW if shown.redraw else LOG_EVERY)
        return max(now + 0.01, min(w.due for w in watched))

    def forget_thread(self) -> None:
        """In a forked child: the thread is not there (the next work starts one)."""
        self.cond = threading.Condition()
        self.watched, self.thread, self.wakes = [], None, math.inf


_watcher = _Watcher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watcher.forget_thread)


def progress(
    what: str,
    total: int | None = None,
    *,
    count: Callable[[], int] | None = None,
    count_label: str = "",
    enabled: bool | None = None,
    delay: float | None = None,
    stream: IO[str] | None = None,
) -> _Work:
    """Show progress of the work in the ``with`` block once it passes ``delay`` seconds.

    Args:
        what: what the work is, shown first (``"drawing 99001 vars"``).
        total: how many items it has, when known (then ``p.update(done)`` counts them).
        count, count_label: a live count to show while nothing calls ``update``.
        enabled: None: :func:`enabled_by_default`; True or False to decide.
        delay: seconds before the first line (default :data:`DELAY`).
        stream: where to write (default ``sys.stderr`` at the time of the call).

    Returns:
        A context manager giving an object with ``update(done, total=None,
        phase=None)`` and a ``phase`` attribute.
    """
    return _Work(what, total, count, count_label, enabled, delay, stream)


class _Work:
    """The context manager :func:`progress` returns (a class, not a generator: every
    trace enters one, and cold, a generator's machinery costs more)."""

    def __init__(self, what: str, total: int | None, *options: Any) -> None:
        self.what, self.total, self.options = what, total, options
        self.phase: _Phase | None = None
        self.shown: _Shown | None = None

    def __enter__(self) -> Progress | _Phase:
        outer = getattr(_active, "progress", None)
        if outer is not None:  # a phase of the work already shown
            self.phase = _Phase(outer, self.what, self.total)
            return self.phase
        count, count_label, enabled, delay, stream = self.options
        state = Progress(self.what, self.total, count=count, count_label=count_label)
        if not (enabled_by_default() if enabled is None else enabled):
            return state
        self.shown = _Shown(
            state, sys.stderr if stream is None else stream, DELAY if delay is None else delay
        )
        _active.progress = state
        _watcher.add(self.shown)
        return state

    def __exit__(self, *exc: object) -> None:
        if self.phase is not None:
            self.phase.restore()
        elif self.shown is not None:
            _active.progress = None
            _watcher.remove(self.shown)
