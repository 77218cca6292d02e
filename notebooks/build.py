"""Write the tutorial notebooks and execute them so they are committed with outputs.

Run from the repository root: ``.venv/bin/python notebooks/build.py [03 ...]`` (all notebooks, or
those whose names start with the given prefixes). The test suite
executes every notebook again (tests/test_notebooks.py), so they cannot rot.
"""

import pathlib

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def md(text):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text):
    return nbformat.v4.new_code_cell(text.strip())


WALKTHROUGH = [
    md("""
# 1. JAX issue 12782: the JVP between two intermediates

[jax-ml/jax#12782](https://github.com/jax-ml/jax/issues/12782) asks for `(∂z2/∂z1)·v`
between two layers of an MLP, and for `∂x3/∂x1` of "the rest of the function". The usual
answer is to rewrite the function with a zero perturbation at `z1` for every pair.
jaxsurgery reads the intermediates from the traced program instead.
"""),
    code("""
import jax, jax.numpy as jnp
import jaxsurgery as js

def f(x, params_1, params_2, params_3):
    z1 = jnp.tanh(jnp.dot(params_1[0], x) + params_1[1])
    z2 = jnp.tanh(jnp.dot(params_2[0], z1) + params_2[1])
    z3 = jnp.tanh(jnp.dot(params_3[0], z2) + params_3[1])
    return z3

k = jax.random.split(jax.random.key(0), 7)
x = jax.random.normal(k[0], (3,))
p1 = (jax.random.normal(k[1], (4, 3)), jax.random.normal(k[2], (4,)))
p2 = (jax.random.normal(k[3], (5, 4)), jax.random.normal(k[4], (5,)))
p3 = (jax.random.normal(k[5], (2, 5)), jax.random.normal(k[6], (2,)))
g = js.trace(f, x, p1, p2, p3)
g   # every var, named from f's source
"""),
    md("The names `z1`, `z2`, `z3` come from `f`'s own assignments. Cut `z1 ↦ z2`:"),
    code("""
s = g.slice("z1", "z2")
print(s)
s.jaxpr
"""),
    code("s.draw()   # the slice's input (green), window (blue), output (orange), context (grey)"),
    code("""
z1, v = g.value("z1"), jnp.ones(4)
z2, dz2 = jax.jvp(s, (z1,), (v,))

def f_perturbed(eps):   # the zero-tangent trick from the thread, for comparison
    z1 = jnp.tanh(jnp.dot(p1[0], x) + p1[1]) + eps
    return jnp.tanh(jnp.dot(p2[0], z1) + p2[1])

_, reference = jax.jvp(f_perturbed, (jnp.zeros(4),), (v,))
print(dz2)
print("max |difference|:", float(jnp.max(jnp.abs(dz2 - reference))))
"""),
    md("## The rest of the function\n\nThe thread's second case: `g(x0)` built from `f1, f2, f3`."),
    code("""
def f1(x): return jnp.sin(x) * 0.5
def f2(x): return jnp.cumsum(x) * 0.3 + 0.1 * x**2
def f3(x): return jnp.tanh(x[::-1] * x + x)

def chain(x0):
    x1 = f1(x0)
    x2 = f2(x1)
    x3 = f3(x2)
    return x3

h = js.trace(chain, jnp.array([1.0, 2.0, 4.0]))
for start in ["x0", "x1", "x2"]:
    print(f"∂x3/∂{start} =", h.jacobian(start, "x3").round(3).tolist())
h.select("f2", "f2/*")   # the call f2 names its result; its parameter x is "f2/x"
"""),
    md("Everything JAX does with functions works on a slice:"),
    code("""
x1 = h.value("x1")
rest = h.slice("x1", "x3")
print(jax.jit(rest)(x1))
print(jax.vmap(rest)(jnp.stack([x1, 2 * x1])))
print(jax.jacfwd(rest)(x1).shape, jax.jacrev(rest)(x1).shape)
"""),
]

MONITORING = [
    md("""
# 2. Monitoring `dL/dz_i` and layer-to-layer JVPs while training

A Flax MLP trained with optax. Every few steps we record, without a second copy of the
model: the norm of `dL/dz_i` for every hidden layer (one backward pass, `g.grads_fn`),
and the norm of the JVP `(∂z_{i+1}/∂z_i)·v` between adjacent layers (`s.bind`).
"""),
    code("""
import jax, jax.numpy as jnp, optax
import flax.linen as nn
import matplotlib.pyplot as plt
import jaxsurgery as js

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (32, 32, 32):
            x = nn.tanh(nn.Dense(width)(x))
        return nn.Dense(1)(x)

model = MLP()
x = jax.random.uniform(jax.random.key(0), (128, 1), minval=-3, maxval=3)
y = jnp.sin(2 * x)
params = model.init(jax.random.key(1), x)

def loss_fn(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)

g = js.trace(loss_fn, params, x, y)
layers = ["MLP/Dense_0", "MLP/Dense_1", "MLP/Dense_2"]
[g[name] for name in layers]
"""),
    code("""
monitor = g.grads_fn("out", wrt=layers)                       # built once, traced once
jvps = [g.slice(a, b) for a, b in zip(layers, layers[1:])]   # layer-to-layer slices
optimizer = optax.adam(3e-3)

@jax.jit
def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state)
    dl_dz = {k: jnp.linalg.norm(v) for k, v in monitor(params, x, y).items()}
    jvp_norms = []
    for s in jvps:
        bound = s.bind(params, x, y)                  # context recomputed for these params
        z = bound.input_values()[0]
        _, t = jax.jvp(bound, (z,), (jnp.ones_like(z),))
        jvp_norms.append(jnp.linalg.norm(t))
    return optax.apply_updates(params, updates), opt_state, loss, dl_dz, jvp_norms

opt_state = optimizer.init(params)
history = []
for i in range(300):
    params, opt_state, loss, dl_dz, jvp_norms = step(params, opt_state)
    if i % 10 == 0:
        history.append((i, float(loss), {k: float(v) for k, v in dl_dz.items()},
                        [float(n) for n in jvp_norms]))
print("final loss", float(loss))
"""),
    code("""
steps = [h[0] for h in history]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].semilogy(steps, [h[1] for h in history]); axes[0].set_title("loss")
for name in layers:
    axes[1].semilogy(steps, [h[2][name] for h in history], label=name)
axes[1].set_title("‖dL/dz_i‖ (one backward pass)"); axes[1].legend(fontsize=7)
for k in range(len(jvps)):
    axes[2].plot(steps, [h[3][k] for h in history], label=f"{layers[k]} → {layers[k + 1]}")
axes[2].set_title("‖(∂z_{i+1}/∂z_i)·1‖"); axes[2].legend(fontsize=7)
for ax in axes: ax.set_xlabel("step")
plt.tight_layout(); plt.show()
"""),
    md("Check one recorded value against separate VJPs at the final parameters:"),
    code("""
final = js.trace(loss_fn, params, x, y)
one_pass = final.grads("out", wrt=layers)
for name in layers:
    _, separate = final.vjp(name, "out", jnp.ones(()))
    print(name, float(jnp.max(jnp.abs(one_pass[name] - separate))))
"""),
]

TRANSFORMER = [
    md("""
# 3. Surgery on a small transformer

Select by scope and by structural pattern, slice between modules, and patch an
attention head: all on a Flax linen transformer, without editing it.
"""),
    code("""
import jax, jax.numpy as jnp
import flax.linen as nn
import jaxsurgery as js

class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=2)(h, h)
        x = x + h
        h = nn.LayerNorm()(x)
        h = nn.Dense(32)(h)
        h = nn.gelu(h)
        return x + nn.Dense(x.shape[-1])(h)

class Transformer(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = Block()(x)
        return nn.Dense(4)(x)

model = Transformer()
x = jax.random.normal(jax.random.key(0), (1, 6, 8))
variables = model.init(jax.random.key(1), x)
g = js.trace(model.apply, variables, x)
print(len(g.vars), "vars")
g.select("Transformer/Block_1/*", primitive="dot_general")
"""),
    md("Scopes name module outputs; `scope/*` selects the inside:"),
    code("""
attn = g["Transformer/Block_0/MultiHeadDotProductAttention_0"]
out0 = g["Transformer/Block_0"]
print(attn, out0, sep="\\n")
s = g.slice(attn, out0)     # attention output -> block output; the residual x is context
print(s)
"""),
    code("g.draw(max_nodes=60)   # a large graph draws collapsed, one box per top-level module"),
    md(
        "Structural patterns find every softmax-attention weight computation, whatever it is called:"
    ),
    code("""
softmaxes = g.match(lambda a: jax.nn.softmax(a, axis=-1), jnp.ones((1, 2, 6, 6)))
print(len(softmaxes), "matches:", [m.outputs[0].name for m in softmaxes])
"""),
    md("Patch: zero-ablate attention head 1 of block 0 and see how much the output moves."),
    code("""
attention = "Transformer/Block_0/MultiHeadDotProductAttention_0"
print([g[f"{attention}/{part}"].shape for part in ("query", "key", "value")])
weighted = g[f"{attention}/...hqk,...khd->...qhd"]   # Flax's einsum, named by its scope
print(weighted, weighted.shape)                     # [batch, length, heads, head_dim]
ablated = g.replace(weighted, lambda v: v.at[:, :, 1, :].set(0.0))
run = jax.jit(ablated.as_function())
print("change in output:", float(jnp.max(jnp.abs(run(variables, x) - model.apply(variables, x)))))
print("gradient flows:", jax.tree_util.tree_map(
    jnp.shape, jax.grad(lambda v: run(v, x).sum())(variables)["params"]["Dense_0"]))
"""),
]


def build(name, cells):
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    nbformat.write(nb, HERE / name)
    print("wrote", name)


NOTEBOOKS = {
    "01_issue_12782.ipynb": WALKTHROUGH,
    "02_monitoring_training.ipynb": MONITORING,
    "03_transformer_surgery.ipynb": TRANSFORMER,
}

if __name__ == "__main__":
    import sys

    # `build.py` rebuilds every notebook; `build.py 03` only those whose name starts so
    wanted = sys.argv[1:]
    for name, cells in NOTEBOOKS.items():
        if not wanted or any(name.startswith(w) for w in wanted):
            build(name, cells)
