"""Shared checks: every slice in the tests goes through ``check_slice``."""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

# XLA's CPU backend optimisations off for the tests (unless XLA_FLAGS says otherwise):
# compiling dominates the suite, and this saves about a fifth of its CPU time. On jaxlib
# 0.10 also XLA's (then new) MLIR fusion emitters, which made its compiles ~1.5x as slow
# as jaxlib 0.12's (the flag is gone from later jaxlibs): without them a compile-bound
# test takes ~30 % less time there. Results are compared with references computed in the
# same process, HLO equality is checked before the backend, and the benchmarks run with
# XLA's defaults. Notebook kernels and scripts a test starts inherit it.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    + (" --xla_cpu_use_fusion_emitters=false" if version("jaxlib").startswith("0.10.") else ""),
)

# Compiled programs cached on disk for the run (JAX's persistent compilation cache, in a
# fresh folder per test process, removed at exit, which the notebook kernels and scripts
# a test starts share): many tests compile the same program again (a slice and its
# hand-written reference, the same model in several tests), which then costs a file
# read. One folder per pytest-xdist worker: JAX read an entry another worker was
# writing (a warning, "incomplete or truncated stream", that tests of warnings see).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or os.environ.get("JAXSURGERY_TESTS_CACHE"):
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsurgery-tests-xla-")
    os.environ["JAXSURGERY_TESTS_CACHE"] = "1"  # (a worker inherits it: makes its own)
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
    atexit.register(shutil.rmtree, _OWN_CACHE, True)  # (pytest-xdist's workers run no
    # atexit handlers: also at the end of the session, see pytest_unconfigure)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import check_jaxpr

# CPU unless JAXSURGERY_TEST_PLATFORMS names another (the GPU check of benchmarks/GPU.md)
jax.config.update("jax_platforms", os.environ.get("JAXSURGERY_TEST_PLATFORMS", "cpu"))
# (also where a plugin imported jax before this file set the variable)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

RTOL, ATOL = 1e-5, 1e-6


def pytest_unconfigure(config):
    """Remove this process's compile cache (a pytest-xdist worker exits without running
    atexit handlers: each full run left its workers' folders in /tmp)."""
    own = globals().get("_OWN_CACHE")
    if own:
        import shutil

        shutil.rmtree(own, True)


def allclose(a, b, rtol=RTOL, atol=ATOL):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"structures differ: {ta} vs {tb}"
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _random_like(key, args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    )


def assert_at_callers_line(warned) -> None:
    """Every warning jaxsurgery gave in ``pytest.warns(...) as warned`` points at the
    test's own line (the user's call), not at jaxsurgery or JAX internals."""
    here = sys._getframe(1).f_code.co_filename
    places = [(w.filename, w.lineno) for w in warned]
    assert places and all(f == here for f, _ in places), places


def check_slice(s, args, reference=None, *, eqns=None):
    """Check a slice end to end against a reference function of the same inputs.

    * its jaxpr type-checks and, when ``eqns`` is given, holds exactly that many equations;
    * ``s(*args)`` equals ``reference(*args)`` (if given), also under ``jax.jit``;
    * ``jax.jvp`` and ``jax.vjp`` equal the reference's;
    * ``jax.vmap`` over a batch of 3 equals stacking three calls.
    """
    check_jaxpr(s.jaxpr)
    if eqns is not None:
        assert len(s.jaxpr.eqns) == eqns, f"{s}: {len(s.jaxpr.eqns)} equations, expected {eqns}"
    out = s(*args)
    jitted = jax.jit(s)
    allclose(jitted(*args), out)
    tangents = _random_like(jax.random.key(1), args)
    primal, tangent = jax.jvp(s, args, tangents)
    allclose(primal, out)
    out_vjp, pullback = jax.vjp(s, *args)
    cotangent = _random_like(jax.random.key(2), out_vjp)
    cts = pullback(cotangent)
    if reference is not None:
        # (one compiled program: eagerly, each op compiles its own, a tenth of the suite)
        ref_out, ref_tangent, ref_cts = jax.jit(_transformed, static_argnums=0)(
            reference, args, tangents, cotangent
        )
        allclose(out, ref_out)
        allclose(tangent, ref_tangent)
        allclose(cts, ref_cts)
    batch = [_random_like(jax.random.key(10 + i), args) for i in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batch)
    expected = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[jitted(*b) for b in batch])
    allclose(jax.vmap(s)(*stacked), expected, rtol=1e-4, atol=1e-5)
    return out


def _transformed(f, args, tangents, cotangent):
    """``f(*args)``, its JVP along ``tangents`` and its VJP of ``cotangent``."""
    _, tangent = jax.jvp(f, args, tangents)
    out, pullback = jax.vjp(f, *args)
    return out, tangent, pullback(cotangent)


@pytest.fixture
def key():
    return jax.random.key(0)


def work(jaxpr, primitive):
    """How many times ``primitive`` runs in ``jaxpr``: equations inside a scan count once
    per iteration, those inside calls once per call (branches: the most of any)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            total += 1
        if eqn.primitive.name == "cond":
            total += max(work(b.jaxpr, primitive) for b in eqn.params["branches"])
            continue
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * work(inner, primitive)
    return total


# real-browser fixtures for the HTML views (headless Chromium via Playwright): tests/browser.py
from browser import browser, open_page  # noqa: E402, F401


def run_script(name: str, marker: str) -> None:
    """Run ``tests/<name>`` in a fresh Python process (a device count is fixed when JAX
    starts) and check that it succeeded and printed ``marker``."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).with_name(name)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker in result.stdout
