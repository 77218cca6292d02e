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
    md(
        "A large graph draws collapsed along the model: one box per block (the first level "
        "with several groups; parameters sit in the box that reads them)."
    ),
    code("g.draw()"),
    md(
        "`depth=3` opens the blocks; a highlighted slice colours the boxes it touches "
        "(`g.view()` gives an interactive picture: click a box to open it, search, hover)."
    ),
    code("g.draw(highlight=s, depth=3)"),
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


PATCHING = [
    md("""
# 4. Activation patching at scale

Train a small transformer on a toy task, then ask which activations carry the answer:
a patching sweep over every layer × position as one compiled call, attribution patching
(its linear estimate, from one backward pass) next to it, and the activations of a
dataset collected to disk. The model is plain Flax; nothing in it is written for
jaxsurgery.
"""),
    code("""
import tempfile
import jax, jax.numpy as jnp, numpy as np, optax
import flax.linen as nn
import matplotlib.pyplot as plt
import jaxsurgery as js

VOCAB, LENGTH, WIDTH = 8, 6, 32

class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h, mask=causal)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(WIDTH)(nn.relu(nn.Dense(4 * WIDTH)(h)))

class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, WIDTH)(tokens) + self.param(
            "position", nn.initializers.normal(0.02), (LENGTH, WIDTH))
        for _ in range(2):
            x = Block()(x)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))

def sample(key, n):
    return jax.random.randint(key, (n, LENGTH), 0, VOCAB)

print(sample(jax.random.key(0), 2))   # two sequences of the task
"""),
    md("""
The task: at the last position, predict the *first* token. With a causal mask the answer
has to travel from position 0 to position 5 through attention.
"""),
    code("""
model = Transformer()
variables = model.init(jax.random.key(0), sample(jax.random.key(1), 2))
optimizer = optax.adam(3e-3)
state = optimizer.init(variables)

def loss(variables, tokens):
    logits = model.apply(variables, tokens)[:, -1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 0]).mean()

@jax.jit
def train_step(variables, state, key):
    value, grads = jax.value_and_grad(loss)(variables, sample(key, 64))
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(variables, updates), state, value

for key in jax.random.split(jax.random.key(2), 200):
    variables, state, value = train_step(variables, state, key)
test = sample(jax.random.key(3), 1000)
accuracy = (model.apply(variables, test)[:, -1].argmax(-1) == test[:, 0]).mean()
print(f"loss {value:.4f}, test accuracy {accuracy:.1%}")
"""),
    md("""
Clean inputs, and corrupted ones whose first token is changed. The metric is the logit
difference between the clean answer and the corrupted one at the last position. We trace
the metric itself, so patched runs return it directly.
"""),
    code("""
def logit_difference(variables, tokens, answer, wrong):
    logits = model.apply(variables, tokens)[:, -1]
    rows = jnp.arange(len(tokens))
    return (logits[rows, answer] - logits[rows, wrong]).mean()

clean = sample(jax.random.key(4), 32)
shift = 1 + jax.random.randint(jax.random.key(5), (32,), 0, VOCAB - 1)
corrupt = clean.at[:, 0].set((clean[:, 0] + shift) % VOCAB)
clean_args = (variables, clean, clean[:, 0], corrupt[:, 0])
corrupt_args = (variables, corrupt, clean[:, 0], corrupt[:, 0])

g = js.trace(logit_difference, *clean_args)
layers = ["Transformer/Embed_0", "Transformer/Block_0", "Transformer/Block_1"]
print(g.select(layers))
m_clean, m_corrupt = float(logit_difference(*clean_args)), float(logit_difference(*corrupt_args))
print(f"clean {m_clean:.2f}, corrupted {m_corrupt:.2f}")
"""),
    md("""
**The sweep.** `g.values_fn` captures the residual stream of both runs (and runs nothing
after the last layer it needs); `g.patch_fn(name)` takes the patch as an argument, so
`jax.vmap` over positions patches every position at once. One `jax.jit` holds the whole
layer × position grid.
"""),
    code("""
values = g.values_fn(layers)
patchers = {name: g.patch_fn(name) for name in layers}

@jax.jit
def sweep(clean_args, corrupt_args):
    clean_acts, corrupt_acts = values(*clean_args), values(*corrupt_args)
    rows = []
    for name, patched in patchers.items():
        def at(position, name=name, patched=patched):
            value = corrupt_acts[name].at[:, position].set(clean_acts[name][:, position])
            return patched({name: value}, *corrupt_args)
        rows.append(jax.vmap(at)(jnp.arange(LENGTH)))
    return jnp.stack(rows)

effect = (sweep(clean_args, corrupt_args) - m_corrupt) / (m_clean - m_corrupt)
print(np.round(effect, 2))
"""),
    md("""
**Attribution patching** estimates the same grid linearly: `(a_clean − a_corrupt) ·
∂metric/∂a` at the corrupted run, for every layer from one forward pass per run and one
backward pass. Summed over the width, one number per (layer, position).
"""),
    code("""
attribute = jax.jit(g.attribution_fn("out", layers))
attribution = attribute(clean_args, corrupt_args)
estimate = np.stack([attribution[name].sum(axis=(0, 2)) for name in layers])
estimate /= m_clean - m_corrupt
correlation = np.corrcoef(effect.ravel(), estimate.ravel())[0, 1]
print(np.round(estimate, 2))
print(f"correlation between attribution and real patching: {correlation:.3f}")

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
image = left.imshow(effect, cmap="RdBu", vmin=-1, vmax=1)
left.set(xlabel="position", yticks=range(len(layers)), yticklabels=[n.split("/")[-1] for n in layers],
         title="patching: share of the metric restored")
fig.colorbar(image, ax=left)
right.scatter(effect.ravel(), estimate.ravel())
right.set(xlabel="real patching", ylabel="attribution patching",
          title=f"one point per (layer, position), r = {correlation:.2f}")
plt.tight_layout()
"""),
    md("""
The answer sits at position 0 up to `Block_0`; `Block_1` moves it to the last position.
Attribution gets the picture right and the size of the saturated effects low, as a
linear estimate does.

**Collecting a dataset's activations.** `js.collect` streams a function's outputs over
batches to a Zarr store: bounded memory, resumable after an interruption, batches sharded
over the devices. Here the residual stream of 2048 sequences, then a linear probe per
layer reading the first token from the last position.
"""),
    code("""
def residuals(tokens):
    return values(variables, tokens, tokens[:, 0], tokens[:, 0])

batches = [sample(k, 32) for k in jax.random.split(jax.random.key(6), 64)]  # the traced shape
scratch = tempfile.TemporaryDirectory()  # (removed when the kernel exits)
store = js.collect(scratch.name + "/residuals.zarr", residuals, batches)
tokens = np.concatenate(batches)
for name in layers:
    last = store[name][:, -1]                     # [2048, WIDTH] read back from disk
    features = np.c_[last, np.ones(len(last))]
    weights = np.linalg.lstsq(features[:1536], np.eye(VOCAB)[tokens[:1536, 0]], rcond=None)[0]
    probe = (features[1536:] @ weights).argmax(-1) == tokens[1536:, 0]
    print(f"{name:22s} {store[name].shape}  probe accuracy at the last position: {probe.mean():.0%}")
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
    "04_activation_patching.ipynb": PATCHING,
}

if __name__ == "__main__":
    import sys

    # `build.py` rebuilds every notebook; `build.py 03` only those whose name starts so
    wanted = sys.argv[1:]
    for name, cells in NOTEBOOKS.items():
        if not wanted or any(name.startswith(w) for w in wanted):
            build(name, cells)
