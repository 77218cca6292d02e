"""Models shared by several test files: the demo's, so the tests check what `make demo` shows."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp

_path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "issue_12782.py"
_spec = importlib.util.spec_from_file_location("issue_12782", _path)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

#: the issue-12782 MLP, f(x, params_1, params_2, params_3) with z1, z2, z3
mlp_12782 = demo.f
#: the thread's second case: chain(x0) = f3(f2(f1(x0))) with x1, x2, x3
f1, f2, f3, chain = demo.f1, demo.f2, demo.f3, demo.g


def mlp_12782_args(key=None):
    return demo.make_params(jax.random.key(0) if key is None else key)


def nnx_mlp_module(layers: int = 3):
    """A Flax NNX MLP holding its hidden layers in an ``nnx.List`` (named ``layers[k]``)."""
    from flax import nnx

    class NNXMLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 8, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(layers)])
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.l1(x))
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return self.head(x)

    return NNXMLP(nnx.Rngs(0))


def penzai_llama_config():
    """A small penzai llama-like transformer configuration (2 decoder blocks)."""
    from penzai.models.transformer.variants import llamalike_common as llama

    return llama.LlamalikeTransformerConfig(
        num_kv_heads=2,
        query_head_multiplier=1,
        embedding_dim=16,
        projection_dim=8,
        mlp_hidden_dim=32,
        num_decoder_blocks=2,
        vocab_size=50,
        mlp_variant="geglu_approx",
        tie_embedder_and_logits=False,
    )


def ode_field(t, y, theta):
    """dy/dt = -θ·y + sin(t)·y[::-1]: the ODE the diffrax tests solve."""
    return -theta * y + jax.numpy.sin(t) * y[::-1]


def diffrax_solution(y0, theta, ts, **options):
    """An adaptive diffrax Tsit5 solve of :func:`ode_field` from t = 0 to 1 saved at
    ``ts``: a while_loop whose trip count depends on the state and the parameter.
    ``options`` go to ``diffeqsolve`` (an ``adjoint``)."""
    import diffrax

    return diffrax.diffeqsolve(
        diffrax.ODETerm(ode_field),
        diffrax.Tsit5(),
        t0=0.0,
        t1=1.0,
        dt0=0.1,
        y0=y0,
        args=theta,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-6),
        max_steps=64,
        **options,
    )


# -- a scan RNN long enough that the index keeps it folded (test_loop_index, test_patch_loops)
RNN_STEPS = 1000


def rnn(h, xs, w):
    def step(h, x):
        a = h @ w + x
        h_new = jnp.tanh(a)
        return h_new, h_new

    h_last, hs = jax.lax.scan(step, h, xs)
    return jnp.sum(h_last**2) + 0.1 * jnp.sum(hs[::100] ** 2)


def rnn_state_after(h0, xs, w, t):
    """The state after steps 0..t (hand-written: a scan over the prefix)."""
    return jax.lax.scan(lambda h, x: (jnp.tanh(h @ w + x),) * 2, h0, xs[: t + 1])[0]


def rnn_args():
    h0 = jax.random.normal(jax.random.key(1), (4,))
    xs = jax.random.normal(jax.random.key(2), (RNN_STEPS, 4))
    w = 0.6 * jax.random.normal(jax.random.key(3), (4, 4))
    return h0, xs, w


def big_or_small(p, y):
    """``cond(p > 0, ...)`` whose first branch names ``h``: ``2 sin(y)`` or ``3 cos(y)``."""

    def big(y):
        h = jnp.sin(y)
        return h * 2

    def small(y):
        return jnp.cos(y) * 3

    return jax.lax.cond(p > 0, big, small, y)
