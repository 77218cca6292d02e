"""The rewritten copy of user code behaves as the original: ``js.trace`` runs a copy of
the function with its assignments marked and its calls framed, compiled from its source.
References: the function called directly."""

import contextlib
import functools
import importlib
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest
from conftest import allclose

import jaxsurgery as js


def same_as_direct(fn, *args):
    g = js.trace(fn, *args)
    allclose(g.as_function()(*args), fn(*args))
    return g


def test_a_module_edited_after_import_is_not_run_from_its_new_text(tmp_path, monkeypatch):
    """A file edited since it was imported (a notebook's module not reloaded): the
    function runs as loaded, unnamed, and the note says why (its new text ran)."""
    path = tmp_path / "edited_model.py"
    path.write_text("import jax.numpy as jnp\ndef model(x):\n    h = x * 2.0\n    return h\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("edited_model")
    path.write_text("import jax.numpy as jnp\ndef model(x):\n    h = x * 5.0\n    return h\n")
    importlib.invalidate_caches()
    import linecache

    linecache.checkcache(str(path))
    g = same_as_direct(module.model, jnp.ones(2))
    allclose(g.value("out"), 2.0 * jnp.ones(2))
    assert any("source is not the code that runs" in n for n in g.notes), g.notes
    del sys.modules["edited_model"]


class Texts:
    def scaled(self, x):
        s = """
        hello
        """
        return x * len(s)


def test_string_literals_of_an_indented_function_keep_their_text():
    """An indented method's multi-line strings are read where they are (dedenting the
    block shortened them: 23 characters became 15)."""
    t = Texts()
    g = same_as_direct(lambda x: t.scaled(x), jnp.ones(2))
    allclose(g.value("out"), 23.0 * jnp.ones(2))
    assert not g.notes


def annotated(x):
    def inner(y: jnp.ndarray) -> jnp.ndarray:
        return y

    return x * (1.0 if inner.__annotations__["y"] is jnp.ndarray else 7.0)


def test_a_rewritten_function_keeps_its_own_future_flags():
    """jaxsurgery's ``from __future__ import annotations`` is not the user's: nested
    annotations stay objects (they became strings: 7 instead of 1)."""
    allclose(same_as_direct(annotated, jnp.ones(2)).value("out"), jnp.ones(2))


def recurse(x, n):
    h = jnp.sin(x)
    return h if n == 0 else recurse(h, n - 1)


def test_a_recursive_function_is_rewritten_and_names_each_level():
    """A function calling itself (its name a global in its body) was never rewritten
    (KeyError 'recurse': the factory's own def took the name)."""
    g = js.trace(recurse, jnp.ones(2), 2, static_argnums=1)
    assert not g.notes
    allclose(g.value("recurse/recurse/h"), jnp.sin(jnp.sin(jnp.sin(jnp.ones(2)))))


def test_a_transform_called_with_keyword_arguments_named_label_or_self():
    """``jax.grad(loss)(w, x, label=y)``: the keyword reaches the function (the frame's
    own ``label`` parameter took it: 'got multiple values')."""

    def loss(w, x, label=0.0, self=1.0):
        err = (w * x - label) * self
        return (err**2).sum()

    def step(w, x, y):
        grad = jax.grad(loss)(w, x, label=y, self=2.0)
        return grad

    args = (jnp.ones(3), jnp.arange(3.0), jnp.ones(3))
    g = same_as_direct(step, *args)
    allclose(g.value("loss/err"), (args[0] * args[1] - args[2]) * 2.0)


def test_a_transformed_function_keeps_its_attributes_inside_a_trace():
    """``jax.grad(f).__name__`` and its signature inside a traced function are the
    transform's (AttributeError: '_Framed' has no '__name__')."""
    import inspect

    def f(w):
        return (w**2).sum()

    def step(w):
        g = jax.grad(f)
        scale = 1.0 if g.__name__ == "f" and list(inspect.signature(g).parameters) == ["w"] else 9.0
        return g(w) * scale

    allclose(same_as_direct(step, jnp.ones(2)).value("out"), 2.0 * jnp.ones(2))


def test_source_in_a_notebook_cell_with_an_indented_block():
    source = textwrap.dedent(
        """
        if True:
            def cell_fn(x):
                hidden = jnp.tanh(x)
                return hidden * 2
        """
    )
    import linecache

    filename = "<ipython-input-9-rewriting>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"jnp": jnp}
    exec(compile(source, filename, "exec"), namespace)
    g = same_as_direct(namespace["cell_fn"], jnp.ones(2))
    assert g["hidden"].primitive == "tanh"


def test_values_jax_cannot_flatten_are_left_unnamed():
    """A dict keyed by functions assigned to a name (keys JAX cannot sort) runs as it
    does; it raised ValueError from the name's pytree flattening."""

    def f(x):
        acts = {jnp.tanh: 1.0, jax.nn.relu: 2.0}
        mixed = {0: x, "a": x}
        return sum(fn(x) * w for fn, w in acts.items()) + mixed[0]

    same_as_direct(f, jnp.ones(2))


class Pair(NamedTuple):
    """A class a transform maps (jax.vmap(Pair)(a, b))."""

    a: jax.Array
    b: jax.Array


class StaticCall:
    @staticmethod
    def __call__(x):
        doubled = x * 2.0
        return doubled


class Half:
    """A user's wrapper around a jit, forwarding ``lower`` and ``__wrapped__``: its own
    ``__call__`` runs (it was taken for the jit it wraps)."""

    def __init__(self, fn):
        self.inner = jax.jit(fn)
        self.__wrapped__ = fn
        self.lower = self.inner.lower

    def __call__(self, x):
        return self.inner(x.astype(jnp.bfloat16)).astype(jnp.float32)


class Doubled(functools.partial):
    def __call__(self, *args, **kwargs):
        return 2.0 * super().__call__(*args, **kwargs)


class Strict:
    """Attributes it does not hold raise KeyError, not AttributeError."""

    def __init__(self):
        self._d = {}

    def __call__(self, x):
        return x * 2.0

    def __getattr__(self, name):
        return self._d[name]


def test_callables_of_every_kind_run_as_they_do():
    """A class under jax.vmap, a static ``__call__``, a user's wrapper of a jit, a
    functools.partial subclass with its own ``__call__``, an object whose attribute
    lookups raise KeyError: each ran otherwise, or crashed."""
    half, static, strict = Half(lambda x: x + 0.001), StaticCall(), Strict()
    doubled = Doubled(lambda x, w: x * w, w=3.0)

    def f(x):
        a, b = jax.vmap(Pair)(x, x)
        return static(a) + half(b) + doubled(x) + strict(x)

    g = same_as_direct(f, jnp.ones(2))
    allclose(g.value("static/doubled"), 2.0 * jnp.ones(2))


def test_the_standard_library_sees_the_callers_frame():
    """A warning raised by the traced function itself (``warnings.warn``, a standard
    library call) points at the user's line (it pointed at jaxsurgery's call wrapper,
    so module filters stopped matching), and ``inspect.currentframe`` is the user's."""
    import inspect
    import warnings

    def f(x):
        warnings.warn("careful", UserWarning, stacklevel=1)
        frame = inspect.currentframe()
        return x * (1.0 if frame.f_code.co_name == "f" else 5.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = same_as_direct(f, jnp.ones(2))
    assert {w.filename for w in caught} == {__file__}
    allclose(g.value("out"), jnp.ones(2))


def combine(x, w):
    return x * w


def test_locals_hold_only_the_functions_own_variables():
    """``locals()`` in a rewritten function is the original's (it held jaxsurgery's
    marker and call wrapper: ``combine(**locals())`` got ``__js_call__``)."""

    def f(x, w):
        together = combine(**locals())
        return together * len(locals())

    allclose(same_as_direct(f, jnp.ones(2), 2.0).value("out"), 6.0 * jnp.ones(2))


def test_a_users_package_named_like_a_standard_module_is_user_code(tmp_path, monkeypatch):
    """A project's own package ``trace`` (a standard-library name too) is rewritten: the
    standard library is told by where its files are, not by module names."""
    package = tmp_path / "trace"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text(
        "import jax.numpy as jnp\ndef block(x):\n    inner = jnp.sin(x) * 2\n    return inner\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {k: sys.modules.pop(k) for k in ("trace", "trace.helpers") if k in sys.modules}
    try:
        helpers = importlib.import_module("trace.helpers")

        def f(x):
            y = helpers.block(x)
            return y

        g = same_as_direct(f, jnp.ones(2))
        allclose(g.value("helpers.block/inner"), 2 * jnp.sin(jnp.ones(2)))
    finally:
        for k in ("trace", "trace.helpers"):
            sys.modules.pop(k, None)
        sys.modules.update(saved)


@pytest.mark.parametrize("layout", ["pip --target", "dist-packages", "a project folder"])
def test_packages_installed_outside_this_environment_are_library_code(
    layout, tmp_path, monkeypatch
):
    """Packages pip installed into a folder on PYTHONPATH (``pip install --target``:
    the ``RECORD`` of a ``*.dist-info`` there lists them) or into a ``dist-packages``
    folder (Debian's, Colab's) are library code, as in site-packages: not rewritten,
    their values unnamed (they were rewritten, so a Haiku installed so named
    ``f.apply/h`` for ``h``); the same package in a project folder is the user's, and
    so is the user's own code beside vendored packages (an AWS Lambda folder)."""
    root = tmp_path / "lib" / "python3" / "dist-packages" if layout == "dist-packages" else tmp_path
    name = "js_pkg_" + layout.split()[-1].replace("-", "_")
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(
        "import jax.numpy as jnp\ndef block(x):\n    inner = jnp.sin(x) * 2\n    return inner\n"
    )
    own = f"{name}_own"  # the user's module in the same folder
    (root / f"{own}.py").write_text("def twice(x):\n    doubled = x * 2\n    return doubled\n")
    if layout == "pip --target":
        (root / f"{name}-1.0.dist-info").mkdir()
        (root / f"{name}-1.0.dist-info" / "RECORD").write_text(
            f"{name}/__init__.py,sha256=abc,80\n{name}-1.0.dist-info/RECORD,,\n../../bin/x,,\n"
        )
    monkeypatch.syspath_prepend(str(root))
    try:
        module, mine = importlib.import_module(name), importlib.import_module(own)

        def f(x):
            y = module.block(x)
            return mine.twice(y)

        g = same_as_direct(f, jnp.ones(2))
        allclose(g.value("y"), 2 * jnp.sin(jnp.ones(2)))
        assert ("module.block/inner" in g.names()) == (layout == "a project folder"), g.names()
        if layout != "dist-packages":  # (there everything is installed)
            allclose(g.value("mine.twice/doubled"), 4 * jnp.sin(jnp.ones(2)))
        if layout == "pip --target":  # traced itself: the note says why it has no names
            assert any(f"pip installed {name} into" in n for n in js.trace(module.block, 1.0).notes)
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(own, None)


def layer(x, k):
    hid = x * k
    return hid


class Bound(functools.partial):
    """A partial subclass that adds nothing to calling."""


def test_a_partial_subclass_calling_as_partial_does_names_its_function():
    def f(x):
        p = Bound(layer, k=2.0)
        y = p(x)
        return y

    allclose(same_as_direct(f, jnp.ones(2)).value("p/hid"), 2.0 * jnp.ones(2))


GENERIC = """
import jax.numpy as jnp

def scaled[T](x, kind: type[T] = float):
    h = jnp.sin(x)
    factor = 2.0 if kind is float else 3.0
    return h * factor

class Layer:
    def __call__[T](self, x: T) -> T:
        pre = jnp.cos(x)
        return pre + 1.0
"""


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="def f[T] is Python 3.12 syntax (run by make test-all)"
)
def test_a_generic_function_is_rewritten(tmp_path, monkeypatch):
    """Python 3.12's ``def f[T]`` compiles inside a scope of its type parameters: the
    rewritten function is found there (it was run unnamed)."""
    (tmp_path / "generic_model.py").write_text(GENERIC)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("generic_model")
    x = jnp.linspace(0.0, 1.0, 3)
    g = same_as_direct(module.scaled, x)
    assert not g.notes and g["h"].shape == (3,)
    allclose(g.value("h"), jnp.sin(x))
    layer = module.Layer()
    g = same_as_direct(lambda x: layer(x), x)
    allclose(g.value("layer/pre"), jnp.cos(x))
    del sys.modules["generic_model"]


class _Doubling:
    """A proxy forwarding attributes to what it wraps (an EMA or logging wrapper)."""

    def __init__(self, fn):
        self.fn = fn

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, *args):
        return self.fn(*args) * 2


class _Tripling:
    def apply(self, v):
        pre = v * 3.0
        return pre


def test_a_proxy_forwarding_attributes_to_a_bound_method_runs_its_own_call():
    """Its forwarded __self__/__func__ made it a bound method: Model.apply ran in its
    place (half the value, silently), and js.trace(proxy) bound apply's signature."""
    p = _Doubling(_Tripling().apply)

    def f(x):
        y = p(x)
        return y

    x = jnp.arange(1.0, 5.0)
    g = same_as_direct(f, x)
    allclose(g.value("y"), 6.0 * x)
    allclose(g.value("p/fn/pre"), 3.0 * x)
    g = same_as_direct(p, x)
    allclose(g.value("fn/pre"), 3.0 * x)


def _yielding(v):
    y = v * 2
    yield y
    z = y + v
    yield z


class _Layers:
    def layers_of(self, x):
        for k in range(2):
            h = x * (k + 2.0)
            yield h


def test_what_a_generator_binds_is_named_in_its_own_frame():
    """A generator's body runs when iterated: it was named in the caller's frame (gen's
    `y` made the caller's `y` ambiguous, and its parameter `x` the input's name)."""

    def f(x):
        y = x + 1
        a, b = list(_yielding(y))
        total = sum(_Layers().layers_of(x))
        return a + b + total

    x = jnp.arange(1.0, 4.0)
    g = same_as_direct(f, x)
    allclose(g.value("y"), x + 1)
    allclose(g.value("_yielding/y"), (x + 1) * 2)
    allclose(g.value("_yielding/z"), (x + 1) * 3)
    allclose(g.value("layers_of/h#1"), x * 3.0)
    assert g.inputs[0].name == "x"

    def one_step(x):  # resumed once, closed early: as it runs directly
        gen = _yielding(x)
        first = next(gen)
        gen.close()
        return first

    allclose(same_as_direct(one_step, x).value("_yielding/y"), 2 * x)


@contextlib.contextmanager
def _scaled_by(v):
    s = jnp.exp(v)
    yield s * 2
    after = jnp.sin(s)  # noqa: F841 (runs when the block ends)


@contextlib.contextmanager
def _forgiving(v):
    try:
        yield v * 3
    except ValueError:
        pass


def test_what_a_user_context_manager_binds_is_named_in_its_frame():
    """``@contextlib.contextmanager`` on a user generator: its body ran unnamed (inside
    contextlib, library code). An exception in the block reaches it as it runs directly."""

    def f(x):
        with _scaled_by(x) as y:
            z = jnp.tanh(y)
        with _forgiving(z) as w:
            if w.shape == (3,):
                raise ValueError("swallowed by the context manager")
        return z + w

    x = jnp.arange(1.0, 4.0)
    g = same_as_direct(f, x)
    allclose(g.value("_scaled_by/s"), jnp.exp(x))
    allclose(g.value("y"), 2 * jnp.exp(x))
    assert "_scaled_by/after" in g.names()

    def raising(x):
        with _scaled_by(x) as y:
            raise KeyError("not caught")
        return y

    with pytest.raises(KeyError, match="not caught"):
        js.trace(raising, x)


def _register(fn):
    fn.scale = 3.0
    return fn


def _scaled(fn):
    @functools.wraps(fn)
    def wrapper(v):
        assert fn.__annotations__, "the wrapper reads the function's annotations"
        return fn(v) * fn.scale

    return wrapper


@_scaled
@_register
def _shifted(v: jax.Array) -> jax.Array:
    pre = v + 1
    return pre


def test_a_decorator_reads_the_attributes_and_annotations_of_its_function():
    """The rewritten copy lacked the function's attributes and annotations: a wrapper
    reading them raised (AttributeError: 'scale') where the function runs."""

    def f(x):
        out = _shifted(x)
        return out

    x = jnp.arange(1.0, 4.0)
    g = same_as_direct(f, x)
    allclose(g.value("_shifted/pre"), x + 1)


def test_a_function_exec_d_without_a_module_name_is_user_code():
    """Globals without __name__ (exec(src, {"jnp": jnp})): taken for a builtin, called
    with no frame and no note that it has no names."""
    namespace = {"jnp": jnp}
    exec("def shifted(v):\n    h = jnp.sin(v)\n    return h\n", namespace)  # noqa: S102
    shifted = namespace["shifted"]

    def f(x):
        out = shifted(x) * 2
        return out

    g = same_as_direct(f, jnp.arange(3.0))
    assert any("the source of shifted could not be rewritten" in n for n in g.notes), g.notes


def _nested_sines(v, n):
    if n == 0:
        return v
    h = jnp.sin(v)
    return _nested_sines(h, n - 1)


def test_a_recursion_past_pythons_limit_is_a_trace_error_saying_how_to_raise_it():
    """A bare RecursionError (sooner than plain JAX's: the frames add Python frames)."""
    with pytest.raises(js.TraceError, match=r"RecursionError.*sys\.setrecursionlimit"):
        js.trace(lambda x: _nested_sines(x, 5000), jnp.ones(2))
    g = same_as_direct(lambda x: _nested_sines(x, 50), jnp.ones(2))  # (a shallow one runs)
    allclose(g.value("_nested_sines/_nested_sines/h"), jnp.sin(jnp.sin(jnp.ones(2))))
