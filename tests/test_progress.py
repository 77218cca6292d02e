"""Progress lines (jaxsurgery/_progress.py): silent in tests and when disabled, shown past
the delay when on, redrawn in place on a terminal, nested work named as a phase."""

from __future__ import annotations

import io
import time

import jax.numpy as jnp
import pytest

import jaxsurgery as js
from jaxsurgery import _progress
from jaxsurgery._progress import progress


def f(x):
    h = jnp.sin(x)
    return h * 2.0


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(_progress, "DELAY", 0.0)


def test_silent_in_tests_by_default(no_delay, capsys):
    js.trace(f, jnp.ones(3))
    assert capsys.readouterr().err == ""


def test_forced_on_shows_the_trace(no_delay, capsys, monkeypatch):
    monkeypatch.setenv("JAXSURGERY_PROGRESS", "1")
    js.trace(f, jnp.ones(3))
    err = capsys.readouterr().err
    assert err.startswith("jaxsurgery: tracing f") and "done in" in err


@pytest.mark.parametrize("off", ["0", "off"])
def test_disabled_by_the_environment(no_delay, capsys, monkeypatch, off):
    monkeypatch.setenv("JAXSURGERY_PROGRESS", off)
    js.trace(f, jnp.ones(3))
    with progress("work", enabled=None):
        pass
    assert capsys.readouterr().err == ""


def test_short_work_is_silent_even_when_on(capsys, monkeypatch):
    monkeypatch.setenv("JAXSURGERY_PROGRESS", "1")
    js.trace(f, jnp.ones(3))  # well under the 2 s delay
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_counts_are_drawn_while_working(monkeypatch):
    monkeypatch.setattr(_progress, "LOG_EVERY", 0.02)
    log = io.StringIO()
    with progress("counting", total=10, delay=0.0, enabled=True, stream=log) as p:
        for i in range(10):
            p.update(i + 1)
            time.sleep(0.03)
    lines = log.getvalue().splitlines()
    assert len(lines) >= 3 and lines[-1].startswith("jaxsurgery: counting: done in")
    counts = [int(ln.split()[2].split("/")[0]) for ln in lines[:-1]]
    assert counts == sorted(counts) and all(ln.split()[2].endswith("/10") for ln in lines[:-1])

    monkeypatch.setattr(_progress, "REDRAW", 0.02)
    tty = Terminal()
    with progress("drawing", delay=0.0, enabled=True, stream=tty) as p:
        p.phase = "layout"
        time.sleep(0.1)
    out = tty.getvalue()
    *drawn, last = out.split("\r")[1:]
    assert len(drawn) >= 2 and all(d.startswith("jaxsurgery: drawing: layout (") for d in drawn)
    assert last.startswith("jaxsurgery: drawing: done in") and last.endswith("\n")
    assert len(last) - 1 >= len(drawn[-1])  # padded: clears the longer line it replaces


def test_nested_work_is_a_phase(monkeypatch):
    monkeypatch.setattr(_progress, "LOG_EVERY", 0.02)
    log = io.StringIO()
    with progress("drawing", delay=0.0, enabled=True, stream=log):
        js.trace(f, jnp.ones(3))  # names a phase of the drawing, no line of its own
        with progress("layout") as inner:
            inner.update(5, total=7)
            time.sleep(0.1)
    lines = log.getvalue().splitlines()
    assert all(ln.startswith("jaxsurgery: drawing") for ln in lines)
    assert any(ln.startswith("jaxsurgery: drawing: layout 5/7 (") for ln in lines)
    assert sum("done in" in ln for ln in lines) == 1
