"""A robustness sweep over models that public packages ship (SPEC §5 "whole-function
semantics", §6): each model is traced with arguments A and every function jaxsurgery
returns is evaluated at NEW arguments B of the same shapes and dtypes (other parameters,
inputs, keys) and compared with an independent reference: the model itself, ``jax.grad``
of the model, the zero-perturbation trick written by hand, or the model's own sub-layers
applied by hand. Small widths and random initialisation keep each test fast.

Models: ``haiku.nets.MLP``; Equinox ``eqx.nn.MLP``, ``eqx.nn.GRUCell`` under
``jax.lax.scan`` and ``eqx.nn.MultiheadAttention``; a Flax linen ``nn.scan(nn.remat(...))``
RNN; a Flax NNX residual network; a penzai llama-like transformer; a diffrax adaptive
Tsit5 solve saved at given times; a NumPyro model's potential energy; a jraph
``GraphNetwork``; an optax Adam step; blackjax HMC and NUTS steps.
"""

import functools

import blackjax
import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import jraph
import numpyro
import numpyro.distributions as dist
import optax
from conftest import allclose
from flax import nnx
from models import diffrax_solution, penzai_llama_config
from numpyro.infer.util import potential_energy
from penzai import pz

import jaxsurgery as js


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


# -- Haiku: hk.nets.MLP ------------------------------------------------------------------------
haiku_mlp = hk.transform(lambda x: hk.nets.MLP([8, 8, 2])(x).sum())


@functools.cache
def haiku_case():
    """``(x, params A, params B, x B)`` of ``haiku_mlp``, made when first asked: every
    pytest-xdist worker imports every test module, and made at import they cost each a
    second."""
    x = jax.random.normal(jax.random.key(0), (4, 3))
    params_a = haiku_mlp.init(jax.random.key(1), x)
    params_b = haiku_mlp.init(jax.random.key(2), x)
    return x, params_a, params_b, jax.random.normal(jax.random.key(3), (4, 3))


def test_haiku_mlp_as_function_and_its_gradient_at_new_params():
    """``as_function`` of a traced ``hk.nets.MLP`` equals ``apply`` at other parameters and
    inputs, and so do its gradients (eager and jitted). With the first layer zeroed every
    pre-activation is exactly 0, where ``jax.nn.relu``'s custom_jvp rule says 0: the
    gradient w.r.t. the first bias is then 0 (an inlined ``max`` would give 0.5 per unit)."""
    HX, HP_A, HP_B, HX_B = haiku_case()
    g = js.trace(haiku_mlp.apply, HP_A, None, HX)
    whole = g.as_function()
    zero_first = dict(
        HP_B, **{"mlp/~/linear_0": jax.tree.map(jnp.zeros_like, HP_B["mlp/~/linear_0"])}
    )
    for params in (HP_B, zero_first):
        allclose(whole(params, None, HX_B), haiku_mlp.apply(params, None, HX_B))
        expected = jax.grad(haiku_mlp.apply, argnums=(0, 2))(params, None, HX_B)
        allclose(jax.grad(whole, argnums=(0, 2))(params, None, HX_B), expected)
        allclose(jax.jit(jax.grad(whole, argnums=(0, 2)))(params, None, HX_B), expected)
    db = jax.grad(whole)(zero_first, None, HX_B)["mlp/~/linear_0"]["b"]
    allclose(db, jnp.zeros(8))
    # the same rule in g.grads of a graph traced at the tie
    gz = js.trace(haiku_mlp.apply, zero_first, None, HX)
    allclose(gz.grads("out", wrt=["mlp/linear_0"])["mlp/linear_0"], jnp.zeros((4, 8)))


def test_haiku_mlp_grads_slices_values_and_replace():
    """``g.grads`` at layer outputs equals the zero-perturbation trick written with the
    Haiku parameters; a slice between two layers equals the layer applied by hand, also
    bound to new parameters; ``values_fn`` under jit equals the layers by hand at B; a
    replaced layer output equals the MLP with that layer halved by hand."""
    HX, HP_A, HP_B, HX_B = haiku_case()
    g = js.trace(haiku_mlp.apply, HP_A, None, HX)

    def by_hand(p, x, eps0=0.0, eps1=0.0, scale1=1.0):
        l0, l1, l2 = (p[f"mlp/~/linear_{k}"] for k in range(3))
        z0 = x @ l0["w"] + l0["b"] + eps0
        z1 = (jax.nn.relu(z0) @ l1["w"] + l1["b"]) * scale1 + eps1
        return (jax.nn.relu(z1) @ l2["w"] + l2["b"]).sum(), (z0, z1)

    zero = jnp.zeros((4, 8))
    ref = jax.grad(lambda e0, e1: by_hand(HP_A, HX, e0, e1)[0], argnums=(0, 1))(zero, zero)
    grads = g.grads("out", wrt=["mlp/linear_0", "mlp/linear_1", "x"])
    allclose(grads["mlp/linear_0"], ref[0])
    allclose(grads["mlp/linear_1"], ref[1])
    allclose(grads["x"], jax.grad(haiku_mlp.apply, argnums=2)(HP_A, None, HX))
    # grads_fn at B against the trick at B
    ref_b = jax.grad(lambda e0, e1: by_hand(HP_B, HX_B, e0, e1)[0], argnums=(0, 1))(zero, zero)
    got = jax.jit(g.grads_fn("out", wrt=["mlp/linear_0", "mlp/linear_1"]))(HP_B, None, HX_B)
    allclose(got["mlp/linear_0"], ref_b[0])
    allclose(got["mlp/linear_1"], ref_b[1])

    s = g.slice("mlp/linear_0", "mlp/linear_1")
    l1a, l1b = HP_A["mlp/~/linear_1"], HP_B["mlp/~/linear_1"]
    z0a, z1a = by_hand(HP_A, HX)[1]
    allclose(s(z0a), g.value("mlp/linear_1"))
    allclose(s(z0a), z1a)
    v = jax.random.normal(jax.random.key(5), (4, 8))
    allclose(jax.jvp(s, (z0a,), (v,)), g.jvp("mlp/linear_0", "mlp/linear_1", v))
    allclose(
        jax.jvp(s, (z0a,), (v,))[1], jax.jvp(lambda z: jax.nn.relu(z) @ l1a["w"], (z0a,), (v,))[1]
    )
    z0b, z1b = by_hand(HP_B, HX_B)[1]
    bound = s.bind(HP_B, None, HX_B)
    allclose(bound(z0b), z1b)
    allclose(jax.jit(lambda p, x, z: s.bind(p, None, x)(z))(HP_B, HX_B, z0b), z1b)
    allclose(
        jax.grad(lambda z: bound(z).sum())(z0b),
        jax.grad(lambda z: (jax.nn.relu(z) @ l1b["w"]).sum())(z0b),
    )

    values = jax.jit(g.values_fn(["mlp/linear_0", "mlp/linear_1"]))(HP_B, None, HX_B)
    allclose(values, {"mlp/linear_0": z0b, "mlp/linear_1": z1b})

    patched = g.replace("mlp/linear_1", lambda old: old * 0.5).as_function()
    allclose(patched(HP_B, None, HX_B), by_hand(HP_B, HX_B, scale1=0.5)[0])
    allclose(
        jax.grad(patched)(HP_B, None, HX_B),
        jax.grad(lambda p: by_hand(p, HX_B, scale1=0.5)[0])(HP_B),
    )


# -- Equinox: eqx.nn.MLP -------------------------------------------------------------------------
def eqx_forward(model, x):
    return model(x)


def test_equinox_mlp_whole_function_grads_slices_and_replace():
    """An ``eqx.nn.MLP`` (its activation held static): ``as_function`` and its
    ``eqx.filter_grad`` at another model and input equal the model's; with the first layer
    zeroed relu's rule (derivative 0 at 0) holds; ``g.grads`` at a layer output equals the
    trick by hand; a slice bound to the other model equals its layer; a halved layer
    output equals the layers applied by hand."""
    k = keys(4)
    ma, mb = eqx.nn.MLP(3, 2, 8, 2, key=k[0]), eqx.nn.MLP(3, 2, 8, 2, key=k[1])
    xa, xb = jax.random.normal(k[2], (3,)), jax.random.normal(k[3], (3,))
    g = js.trace(eqx_forward, ma, xa)
    whole = g.as_function()
    loss = lambda fn: lambda m, x: fn(m, x).sum()  # noqa: E731
    zeroed = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias), mb, replace_fn=jnp.zeros_like
    )
    for m in (mb, zeroed):
        allclose(whole(m, xb), eqx_forward(m, xb))
        allclose(eqx.filter_jit(whole)(m, xb), eqx_forward(m, xb))
        expected = eqx.filter_grad(loss(eqx_forward))(m, xb)
        allclose(eqx.filter_grad(loss(whole))(m, xb), expected)
        allclose(eqx.filter_jit(eqx.filter_grad(loss(whole)))(m, xb), expected)
    allclose(eqx.filter_grad(loss(whole))(zeroed, xb).layers[0].bias, jnp.zeros(8))

    names = [f"eqx.nn.MLP/eqx.nn.Linear#{i}" for i in range(3)]
    L = ma.layers
    z0a = L[0](xa)
    rest = lambda z: L[2](jax.nn.relu(L[1](jax.nn.relu(z)))).sum()  # noqa: E731
    grads = g.grads("out", wrt=[names[0], "x", "model.layers[1].weight"])
    allclose(grads[names[0]], jax.grad(rest)(z0a))
    allclose(grads["x"], jax.grad(lambda x: eqx_forward(ma, x).sum())(xa))
    allclose(
        grads["model.layers[1].weight"], eqx.filter_grad(loss(eqx_forward))(ma, xa).layers[1].weight
    )

    s = g.slice(names[0], names[1])
    allclose(s(z0a), g.value(names[1]))
    v = jnp.linspace(-1.0, 1.0, 8)
    allclose(jax.jvp(s, (z0a,), (v,)), jax.jvp(lambda z: L[1](jax.nn.relu(z)), (z0a,), (v,)))
    z0b = mb.layers[0](xb)
    allclose(s.bind(mb, xb)(z0b), mb.layers[1](jax.nn.relu(z0b)))
    values = eqx.filter_jit(g.values_fn(names[:2]))(mb, xb)
    allclose(values, {names[0]: z0b, names[1]: mb.layers[1](jax.nn.relu(z0b))})

    patched = g.replace(names[1], lambda old: old * 0.5).as_function()

    def halved(m, x):
        h = m.layers[1](jax.nn.relu(m.layers[0](x))) * 0.5
        return m.layers[2](jax.nn.relu(h))

    allclose(patched(mb, xb), halved(mb, xb))
    allclose(eqx.filter_grad(loss(patched))(mb, xb), eqx.filter_grad(loss(halved))(mb, xb))


# -- Equinox: eqx.nn.GRUCell under jax.lax.scan ------------------------------------------------
T = 6


def gru_run(cell, h0, xs):
    def body(h, x):
        h_new = cell(x, h)
        return h_new, h_new

    h_last, hs = jax.lax.scan(body, h0, xs)
    return jnp.tanh(h_last).sum() + hs.sum()


def gru_states(cell, h0, xs):
    hs, h = [], h0
    for x in xs:
        h = cell(x, h)
        hs.append(h)
    return hs


def gru_perturbed(eps, cell, h0, xs, scale_at=None):
    """``gru_run`` with ``eps[t]`` added to step t's new state (and step ``scale_at``'s
    new state halved), unrolled by hand."""
    h, hs = h0, []
    for t in range(T):
        h = cell(xs[t], h)
        if t == scale_at:
            h = h * 0.5
        h = h + eps[t]
        hs.append(h)
    return jnp.tanh(h).sum() + jnp.stack(hs).sum()


@functools.cache
def gru_cases():
    """The arguments ``(cell, h0, xs)`` of ``gru_run`` at A and at B (made when first
    asked, as :func:`haiku_case`)."""
    a = (
        eqx.nn.GRUCell(3, 4, key=jax.random.key(0)),
        jnp.zeros(4),
        jax.random.normal(jax.random.key(2), (T, 3)),
    )
    b = (
        eqx.nn.GRUCell(3, 4, key=jax.random.key(1)),
        jax.random.normal(jax.random.key(4), (4,)),
        jax.random.normal(jax.random.key(3), (T, 3)),
    )
    return a, b


def test_equinox_gru_scan_whole_function_and_per_step_grads():
    """A ``GRUCell`` run by ``lax.scan``: ``as_function`` and its gradient at another cell,
    state and sequence equal the scan's; ``g.grads`` / jitted ``grads_fn`` at every step's
    new state (``eqx.nn.GRUCell@*``) equal the trick unrolled by hand, at A and at B."""
    GRU_A, GRU_B = gru_cases()
    g = js.trace(gru_run, *GRU_A)
    whole = g.as_function()
    # (the references under jit: run eagerly, each operation compiles on its own)
    allclose(whole(*GRU_B), eqx.filter_jit(gru_run)(*GRU_B))
    expected = eqx.filter_jit(eqx.filter_grad(gru_run))(*GRU_B)
    allclose(eqx.filter_grad(whole)(*GRU_B), expected, rtol=1e-5, atol=1e-5)
    allclose(eqx.filter_jit(eqx.filter_grad(whole))(*GRU_B), expected, rtol=1e-5, atol=1e-5)
    grad_h0 = eqx.filter_jit(jax.grad(gru_run, argnums=1))
    allclose(jax.grad(whole, argnums=1)(*GRU_B), grad_h0(*GRU_B), rtol=1e-5, atol=1e-5)

    zero = jnp.zeros((T, 4))
    grads = g.grads("out", wrt={"h": "eqx.nn.GRUCell@*", "h2": "eqx.nn.GRUCell@2", "h0": "h0"})
    grad_eps = eqx.filter_jit(jax.grad(gru_perturbed))
    ref_a = grad_eps(zero, *GRU_A)
    allclose(grads["h"], ref_a, rtol=1e-5)
    allclose(grads["h2"], ref_a[2], rtol=1e-5)
    allclose(grads["h0"], grad_h0(*GRU_A), rtol=1e-5)
    got = eqx.filter_jit(g.grads_fn("out", wrt={"h": "eqx.nn.GRUCell@*"}))(*GRU_B)
    allclose(got["h"], grad_eps(zero, *GRU_B), rtol=1e-5, atol=1e-5)


def test_equinox_gru_scan_slices_values_and_replace():
    """Slices between steps of the scanned GRU (``@1 → @4`` and ``@3 → out``) equal the cell
    stepped by hand, with JVPs and gradients, at A and bound to B (eager and jitted);
    ``values_fn`` at B equals the states by hand; a patched step (``@2`` halved) and its
    ``patch_fn`` equal the hand-unrolled loop with that state halved."""
    GRU_A, GRU_B = gru_cases()
    g = js.trace(gru_run, *GRU_A)
    cell_a, _, xs_a = GRU_A
    cell_b, _, xs_b = GRU_B
    ha, hb = gru_states(*GRU_A), gru_states(*GRU_B)

    def steps(cell, xs, h, a, b):
        for t in range(a + 1, b + 1):
            h = cell(xs[t], h)
        return h

    s = g.slice("eqx.nn.GRUCell@1", "eqx.nn.GRUCell@4")
    allclose(s(ha[1]), g.value("eqx.nn.GRUCell@4"), atol=1e-6)
    allclose(s(ha[1]), ha[4], atol=1e-6)
    v = jnp.array([1.0, -0.5, 0.25, 2.0])
    ref = jax.jvp(lambda h: steps(cell_a, xs_a, h, 1, 4), (ha[1],), (v,))
    allclose(jax.jvp(s, (ha[1],), (v,)), ref, atol=1e-6)
    allclose(g.jvp("eqx.nn.GRUCell@1", "eqx.nn.GRUCell@4", v), ref, atol=1e-6)
    allclose(s.bind(*GRU_B)(hb[1]), hb[4], atol=1e-6)
    jitted = eqx.filter_jit(lambda c, h0, xs, z: s.bind(c, h0, xs)(z))
    allclose(jitted(*GRU_B, hb[1]), hb[4], atol=1e-6)

    def rest(h3, cell, xs, hs):  # step 3's state -> out, earlier states context
        h, out = h3, list(hs[:3]) + [h3]
        for t in range(4, T):
            h = cell(xs[t], h)
            out.append(h)
        return jnp.tanh(h).sum() + jnp.stack(out).sum()

    s2 = g.slice("eqx.nn.GRUCell@3", "out")
    allclose(s2(ha[3]), rest(ha[3], cell_a, xs_a, ha), atol=1e-5)
    allclose(jax.grad(s2)(ha[3]), jax.grad(rest)(ha[3], cell_a, xs_a, ha), atol=1e-5)
    bound = s2.bind(*GRU_B)
    z = hb[3] * 0.5
    allclose(bound(z), rest(z, cell_b, xs_b, hb), atol=1e-5)
    allclose(jax.grad(bound)(z), jax.grad(rest)(z, cell_b, xs_b, hb), atol=1e-5)

    sel = ["eqx.nn.GRUCell@1", "eqx.nn.GRUCell@4", "h_last", "hs"]
    values = eqx.filter_jit(g.values_fn(sel))(*GRU_B)
    allclose(values, dict(zip(sel, [hb[1], hb[4], hb[-1], jnp.stack(hb)])), atol=1e-6)

    zero = jnp.zeros((T, 4))
    patched = g.replace("eqx.nn.GRUCell@2", lambda old: old * 0.5).as_function()
    for args in (GRU_A, GRU_B):
        allclose(patched(*args), gru_perturbed(zero, *args, scale_at=2), atol=1e-5)
    allclose(
        eqx.filter_grad(patched)(*GRU_B),
        eqx.filter_grad(lambda *a: gru_perturbed(zero, *a, scale_at=2))(*GRU_B),
        rtol=1e-5,
        atol=1e-5,
    )
    pf = g.patch_fn("eqx.nn.GRUCell@2")
    allclose(
        pf({"eqx.nn.GRUCell@2": hb[2] * 0.5}, *GRU_B),
        gru_perturbed(zero, *GRU_B, scale_at=2),
        atol=1e-5,
    )


# -- Equinox: eqx.nn.MultiheadAttention ------------------------------------------------------------
def mha_forward(model, x, mask):
    h = model(x, x, x, mask=mask)
    out = jnp.tanh(h).sum()
    return out


def test_equinox_multihead_attention_at_new_weights_and_masks():
    """``eqx.nn.MultiheadAttention`` (traced with a causal mask, run with a full one and
    other weights): ``as_function`` and its gradient equal the module's; a slice from the
    attention logits to the output equals masked softmax attention by hand (value, JVP,
    bound to B); ``values_fn`` and a halved-logits ``replace`` equal the same by hand."""
    k = keys(4)
    ma, mb = eqx.nn.MultiheadAttention(2, 8, key=k[0]), eqx.nn.MultiheadAttention(2, 8, key=k[1])
    xa, xb = jax.random.normal(k[2], (5, 8)), jax.random.normal(k[3], (5, 8))
    mask_a, mask_b = jnp.tril(jnp.ones((5, 5), bool)), jnp.ones((5, 5), bool).at[0, 3].set(False)
    g = js.trace(mha_forward, ma, xa, mask_a)
    whole = g.as_function()
    # (the references under jit: run eagerly, each operation compiles on its own)
    allclose(whole(mb, xb, mask_b), eqx.filter_jit(mha_forward)(mb, xb, mask_b))
    expected = eqx.filter_jit(eqx.filter_grad(mha_forward))(mb, xb, mask_b)
    allclose(eqx.filter_grad(whole)(mb, xb, mask_b), expected, atol=1e-5)
    allclose(eqx.filter_jit(eqx.filter_grad(whole))(mb, xb, mask_b), expected, atol=1e-5)

    def heads(m, x):  # (heads, seq, 4) projections by hand
        q = (x @ m.query_proj.weight.T).reshape(5, 2, 4).transpose(1, 0, 2)
        kk = (x @ m.key_proj.weight.T).reshape(5, 2, 4).transpose(1, 0, 2)
        vv = (x @ m.value_proj.weight.T).reshape(5, 2, 4).transpose(1, 0, 2)
        return q, kk, vv

    def logits(m, x):
        q, kk, _ = heads(m, x)
        return jnp.einsum("hsd,hSd->hsS", q / jnp.sqrt(4.0), kk)

    def from_logits(lg, m, x, mask):
        _, _, vv = heads(m, x)
        w = jax.nn.softmax(jnp.where(mask, lg, jnp.finfo(jnp.float32).min), axis=-1)
        o = jnp.einsum("hsS,hSd->hsd", w, vv).transpose(1, 0, 2).reshape(5, 8)
        return jnp.tanh(o @ m.output_proj.weight.T).sum()

    name = "eqx.nn.MultiheadAttention/sd,Sd->sS"
    la, lb = logits(ma, xa), logits(mb, xb)
    allclose(g.value(name), la, atol=1e-5)
    s = g.slice(name, "out")
    allclose(s(la), from_logits(la, ma, xa, mask_a), atol=1e-5)
    v = jax.random.normal(jax.random.key(9), la.shape)
    allclose(
        jax.jvp(s, (la,), (v,)),
        jax.jit(lambda z, v: jax.jvp(lambda z: from_logits(z, ma, xa, mask_a), (z,), (v,)))(la, v),
        atol=1e-5,
    )
    bound = s.bind(mb, xb, mask_b)
    allclose(bound(lb), from_logits(lb, mb, xb, mask_b), atol=1e-5)
    allclose(
        jax.grad(bound)(lb), eqx.filter_jit(jax.grad(from_logits))(lb, mb, xb, mask_b), atol=1e-5
    )
    allclose(eqx.filter_jit(g.values_fn([name]))(mb, xb, mask_b), {name: lb}, atol=1e-5)
    patched = g.replace(name, lambda old: old * 0.5).as_function()
    allclose(patched(mb, xb, mask_b), from_logits(lb * 0.5, mb, xb, mask_b), atol=1e-5)


# -- Flax linen: nn.scan over nn.remat(cell) -----------------------------------------------------
class RematCell(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        h = jnp.tanh(nn.Dense(4)(h) + x)
        return h, h


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, xs):
        h0 = jnp.zeros(xs.shape[1:])
        scan = nn.scan(
            nn.remat(RematCell),
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=0,
            out_axes=0,
        )
        h, hs = scan()(h0, xs)
        return nn.Dense(2)(h).sum() + hs.sum()


def scan_net_by_hand(v, xs, eps=None, scale_at=None):
    """ScanNet written out: returns (out, per-step Dense outputs), with ``eps[t]`` added to
    step t's Dense output and step ``scale_at``'s halved."""
    pc, pd = v["params"]["ScanCheckpointRematCell_0"]["Dense_0"], v["params"]["Dense_0"]
    h, hs, dense = jnp.zeros(4), [], []
    for t in range(xs.shape[0]):
        d = h @ pc["kernel"] + pc["bias"]
        if scale_at == t:
            d = d * 0.5
        if eps is not None:
            d = d + eps[t]
        dense.append(d)
        h = jnp.tanh(d + xs[t])
        hs.append(h)
    return (h @ pd["kernel"] + pd["bias"]).sum() + jnp.stack(hs).sum(), dense


def test_flax_linen_scan_of_a_remat_cell():
    """A linen ``nn.scan(nn.remat(cell))``: ``as_function`` keeps one scan with its remat
    and equals ``apply`` (and its gradient) at new variables and inputs; ``grads`` at every
    step's Dense output equals the trick by hand (at A, and jitted ``grads_fn`` at B); a
    slice between steps bound to B equals the cell by hand; ``values_fn`` and a halved step
    equal the loop written out."""
    net = ScanNet()
    k = keys(4)
    xs_a, xs_b = jax.random.normal(k[0], (5, 4)), jax.random.normal(k[1], (5, 4))
    va, vb = net.init(k[2], xs_a), net.init(k[3], xs_a)
    g = js.trace(net.apply, va, xs_a)
    whole = g.as_function()
    text = str(jax.make_jaxpr(whole)(vb, xs_b))
    assert text.count("scan[") == 1 and "remat" in text
    allclose(whole(vb, xs_b), net.apply(vb, xs_b))
    expected = jax.grad(net.apply, argnums=(0, 1))(vb, xs_b)
    allclose(jax.grad(whole, argnums=(0, 1))(vb, xs_b), expected, atol=1e-5)
    allclose(jax.jit(jax.grad(whole, argnums=(0, 1)))(vb, xs_b), expected, atol=1e-5)

    step = "ScanCheckpointRematCell_0/Dense_0"
    zero = jnp.zeros((5, 4))
    trick = lambda v, xs: jax.grad(lambda e: scan_net_by_hand(v, xs, e)[0])(zero)  # noqa: E731
    allclose(g.grads("out", wrt={"d": f"{step}@*"})["d"], trick(va, xs_a), atol=1e-5)
    got = jax.jit(g.grads_fn("out", wrt={"d": f"{step}@*", "d2": f"{step}@2"}))(vb, xs_b)
    allclose(got["d"], trick(vb, xs_b), atol=1e-5)
    allclose(got["d2"], trick(vb, xs_b)[2], atol=1e-5)

    da, db = scan_net_by_hand(va, xs_a)[1], scan_net_by_hand(vb, xs_b)[1]

    def mid(d1, v, xs):  # step 1's Dense output -> step 3's
        pc = v["params"]["ScanCheckpointRematCell_0"]["Dense_0"]
        h = jnp.tanh(d1 + xs[1])
        for t in (2, 3):
            d = h @ pc["kernel"] + pc["bias"]
            h = jnp.tanh(d + xs[t])
        return d

    s = g.slice(f"{step}@1", f"{step}@3")
    allclose(s(da[1]), g.value(f"{step}@3"), atol=1e-6)
    v = jnp.array([0.3, -1.0, 0.5, 2.0])
    allclose(
        jax.jvp(s, (da[1],), (v,)), jax.jvp(lambda d: mid(d, va, xs_a), (da[1],), (v,)), atol=1e-6
    )
    allclose(s.bind(vb, xs_b)(db[1] + 0.1), mid(db[1] + 0.1, vb, xs_b), atol=1e-6)
    values = jax.jit(g.values_fn([f"{step}@1", f"{step}@4"]))(vb, xs_b)
    allclose(values, {f"{step}@1": db[1], f"{step}@4": db[4]}, atol=1e-6)
    patched = g.replace(f"{step}@2", lambda old: old * 0.5).as_function()
    allclose(patched(vb, xs_b), scan_net_by_hand(vb, xs_b, scale_at=2)[0], atol=1e-5)
    allclose(
        jax.grad(patched)(vb, xs_b),
        jax.grad(lambda v: scan_net_by_hand(v, xs_b, scale_at=2)[0])(vb),
        atol=1e-5,
    )


# -- Flax NNX: residual blocks in an nnx.List --------------------------------------------------------
class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
        return x + nnx.gelu(self.lin(self.ln(x)))


class NNXResNet(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
        self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x).sum()


def test_flax_nnx_residual_network_at_new_state():
    """A Flax NNX network (LayerNorm, Linear, gelu, residuals) traced through
    ``nnx.merge``: ``as_function`` and its gradient at another model's state equal the
    model's; ``grads`` at a block output equals the trick with the model's own blocks; a
    block-to-block slice bound to B equals block 1 of model B; ``values_fn`` and a halved
    block equal the blocks applied by hand."""
    ma, mb = NNXResNet(nnx.Rngs(0)), NNXResNet(nnx.Rngs(1))
    graphdef, sa = nnx.split(ma)
    _, sb = nnx.split(mb)

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        return model(x)

    xa, xb = (
        jax.random.normal(jax.random.key(0), (3, 4)),
        jax.random.normal(jax.random.key(1), (3, 4)),
    )
    g = js.trace(forward, sa, xa)
    whole = g.as_function()
    # (the references under jit: run eagerly, each operation compiles on its own)
    allclose(whole(sb, xb), nnx.jit(lambda m, x: m(x))(mb, xb))
    expected = jax.jit(jax.grad(forward, argnums=(0, 1)))(sb, xb)
    allclose(jax.grad(whole, argnums=(0, 1))(sb, xb), expected, atol=1e-5)
    allclose(jax.jit(jax.grad(whole, argnums=(0, 1)))(sb, xb), expected, atol=1e-5)

    def by_hand(m, x, eps=0.0, scale=1.0):
        z0 = m.blocks[0](x) * scale + eps
        return m.head(m.blocks[1](z0)).sum(), z0

    z0a, z0b = by_hand(ma, xa)[1], by_hand(mb, xb)[1]
    zero = jnp.zeros((3, 4))
    grads = g.grads("out", wrt=["model/blocks[0]", "x"])
    trick = nnx.jit(lambda m, x: jax.grad(lambda e: by_hand(m, x, e)[0])(zero))
    allclose(grads["model/blocks[0]"], trick(ma, xa), atol=1e-5)
    allclose(grads["x"], nnx.jit(lambda m, x: jax.grad(m)(x))(ma, xa), atol=1e-5)
    got = jax.jit(g.grads_fn("out", wrt=["model/blocks[0]"]))(sb, xb)
    allclose(got["model/blocks[0]"], trick(mb, xb), atol=1e-5)

    s = g.slice("model/blocks[0]", "model/blocks[1]")
    allclose(s(z0a), g.value("model/blocks[1]"), atol=1e-6)
    v = jnp.ones((3, 4))
    jvp_s = jax.jvp(s, (z0a,), (v,))
    allclose(jvp_s, g.jvp("model/blocks[0]", "model/blocks[1]", v), atol=1e-6)
    block_jvp = nnx.jit(lambda blk, z, v: jax.jvp(blk, (z,), (v,)))
    allclose(jvp_s, block_jvp(ma.blocks[1], z0a, v), atol=1e-5)
    allclose(s.bind(sb, xb)(z0b), mb.blocks[1](z0b), atol=1e-6)
    values = jax.jit(g.values_fn(["model/blocks[0]", "model/blocks[1]", "model/blocks[0]/ln"]))(
        sb, xb
    )
    expected = {
        "model/blocks[0]": z0b,
        "model/blocks[1]": mb.blocks[1](z0b),
        "model/blocks[0]/ln": mb.blocks[0].ln(xb),
    }
    allclose(values, expected, atol=1e-6)
    patched = g.replace("model/blocks[0]", lambda old: old * 0.5).as_function()
    allclose(patched(sb, xb), by_hand(mb, xb, scale=0.5)[0], atol=1e-6)


# -- penzai: a llama-like transformer ----------------------------------------------------------------
def test_penzai_transformer_at_new_params_and_tokens():
    """A penzai llama-like transformer (2 decoder blocks): jitted ``as_function`` and its
    gradient at another model's parameters and other tokens equal the model's;
    ``g.grads`` at a parameter equals ``jax.grad``; the embedding layer's output from
    ``values_fn`` at B equals the embedding table indexed by hand, and the slice from it
    to the logits bound to B, fed that, gives the model's logits; a halved embedding
    (``replace``) equals that slice fed half of it, and both move the logits."""
    from penzai.models.transformer.variants import llamalike_common as llama

    config = penzai_llama_config()
    build = lambda seed: llama.build_llamalike_transformer(
        config, init_base_rng=jax.random.key(seed)
    )  # noqa: E731
    unbound, pa = pz.unbind_params(build(0), freeze=True)
    _, pb = pz.unbind_params(build(1), freeze=True)

    def logits(params, tokens):
        model = pz.bind_variables(unbound, params)
        positions = pz.nx.wrap(jnp.arange(tokens.shape[1])[None], "batch", "seq")
        out = model(pz.nx.wrap(tokens, "batch", "seq"), token_positions=positions)
        return out.unwrap("batch", "seq", "vocabulary")

    ta, tb = jnp.asarray([[3, 1, 4, 1, 5, 9]]), jnp.asarray([[2, 7, 1, 8, 2, 8]])
    g = js.trace(logits, pa, ta)
    whole = jax.jit(g.as_function())
    ref_b = jax.jit(logits)(pb, tb)
    allclose(whole(pb, tb), ref_b, rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda p, t: jnp.sum(jnp.tanh(fn(p, t)))  # noqa: E731
    allclose(
        jax.jit(jax.grad(loss(g.as_function())))(pb, tb),
        jax.jit(jax.grad(loss(logits)))(pb, tb),
        rtol=1e-4,
        atol=1e-5,
    )
    w = "transformer/embedder.embeddings"
    allclose(
        g.grads("out", wrt=[w])[w],
        jax.jit(jax.grad(lambda p: logits(p, ta).sum()))(pa)[0].value.data_array,
        rtol=1e-4,
        atol=1e-5,
    )

    emb = "model/body.sublayers[0]"
    found = jax.jit(g.values_fn([emb]))(pb, tb)[emb]
    table = pb[0].value.unwrap("vocabulary", "embedding")
    ref = table[tb]
    perm = [found.shape.index(d) for d in ref.shape]  # penzai's layout: match axes by size
    allclose(found.transpose(perm), ref)
    s = g.slice(emb, "out")
    bound = jax.jit(s.bind(pb, tb))  # (the eager slice call: s below)
    allclose(bound(found), ref_b, rtol=1e-5, atol=1e-5)
    allclose(s(g.value(emb)), g.value("out"), rtol=1e-5, atol=1e-5)
    halved = jax.jit(g.replace(emb, lambda old: old * 0.5).as_function())(pb, tb)
    allclose(halved, bound(found * 0.5), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(halved - ref_b).max()) > 1e-3


# -- diffrax: adaptive Tsit5, SaveAt(ts=...), reverse-mode adjoint ---------------------------------
DTS = jnp.array([0.0, 0.3, 0.7, 1.0])


def ode_ys(y0, theta):
    return diffrax_solution(y0, theta, DTS).ys


def ode_loss(y0, theta):
    ys = ode_ys(y0, theta)
    loss = jnp.sum(ys**2)
    return loss


def test_diffrax_adaptive_solve_at_new_initial_state_and_parameter():
    """A diffrax solve with the default (recursive checkpoint) adjoint, traced at A and run
    at B, whose stiffer parameter takes other steps: jitted ``as_function`` and
    ``jax.grad`` of it equal the solve's; ``g.grads`` at the inputs equals ``jax.grad``,
    and at ``ys`` equals 2·ys; a slice ``theta → ys`` bound to B equals the solve at B;
    ``values_fn`` and a halved ``ys`` equal the solve by hand."""
    a = (jnp.array([1.0, -0.5]), jnp.array(0.7))
    b = (jnp.array([-2.0, 0.3]), jnp.array(3.0))
    g = js.trace(ode_loss, *a)
    whole = g.as_function()
    allclose(jax.jit(whole)(*b), ode_loss(*b), rtol=1e-5)
    expected = jax.jit(jax.grad(ode_loss, argnums=(0, 1)))(*b)
    allclose(jax.jit(jax.grad(whole, argnums=(0, 1)))(*b), expected, rtol=1e-4, atol=1e-5)
    grads = g.grads("loss", wrt=["ys", "theta"])
    allclose(grads["ys"], 2 * ode_ys(*a), rtol=1e-5)
    allclose(grads["theta"], jax.grad(ode_loss, argnums=1)(*a), rtol=1e-4)
    ys_b = ode_ys(*b)
    s = g.slice("theta", "ys")
    allclose(s(a[1]), ode_ys(*a), rtol=1e-5)
    allclose(s.bind(*b)(b[1]), ys_b, rtol=1e-5)
    allclose(jax.jit(g.values_fn(["ys"]))(*b)["ys"], ys_b, rtol=1e-5)
    allclose(
        jax.jit(g.replace("ys", lambda old: old * 0.5).as_function())(*b),
        jnp.sum((0.5 * ys_b) ** 2),
        rtol=1e-5,
    )


# -- NumPyro: a model's potential energy -------------------------------------------------------------
def regression(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mu = numpyro.deterministic("mu", x @ w)
    numpyro.sample("obs", dist.StudentT(4.0, mu, sigma), obs=y)


def energy(params, x, y):
    return potential_energy(regression, (x, y), {}, params)


def energy_by_hand(params, x, y, mu=None):
    """The potential energy in unconstrained space, written out: sigma = exp(s) with its
    log-Jacobian, StudentT(4) likelihood, Normal and HalfNormal priors."""
    w, s = params["w"], params["sigma"]
    sigma = jnp.exp(s)
    mu = x @ w if mu is None else mu
    z = (y - mu) / sigma
    nu = 4.0
    studentt = (
        jax.scipy.special.gammaln((nu + 1) / 2)
        - jax.scipy.special.gammaln(nu / 2)
        - 0.5 * jnp.log(nu * jnp.pi)
        - jnp.log(sigma)
        - (nu + 1) / 2 * jnp.log1p(z**2 / nu)
    )
    prior_w = -0.5 * w**2 - 0.5 * jnp.log(2 * jnp.pi)
    prior_sigma = jnp.log(2.0) - 0.5 * sigma**2 - 0.5 * jnp.log(2 * jnp.pi)
    return -(studentt.sum() + prior_w.sum() + prior_sigma + s)


def test_numpyro_potential_energy_at_new_params_and_data():
    """``numpyro.infer.util.potential_energy`` of a robust regression: ``as_function`` and its
    gradient at other parameters and data equal NumPyro's and the energy written by hand;
    ``grads`` at the deterministic site ``mu`` equals the hand-written energy's gradient in
    ``mu``; a slice ``mu → out`` bound to B equals it; ``values_fn`` gives the constrained
    ``sigma`` and ``mu``; a halved ``mu`` equals the energy at half ``mu``."""
    k = keys(3)
    x = jax.random.normal(k[0], (6, 3))
    y = jax.random.normal(k[1], (6,))
    a = ({"w": jnp.array([0.5, -1.0, 2.0]), "sigma": jnp.array(0.3)}, x, y)
    b = ({"w": jnp.array([-0.2, 0.4, 1.0]), "sigma": jnp.array(-1.2)}, 2 * x, -y)
    # (the references under jit: run eagerly, each operation compiles on its own)
    by_hand = jax.jit(energy_by_hand)
    energy_b = jax.jit(energy)(*b)
    allclose(energy_b, by_hand(*b), rtol=1e-5)  # the reference is NumPyro's energy
    g = js.trace(energy, *a)
    whole = g.as_function()
    allclose(whole(*b), energy_b, rtol=1e-6)
    expected = jax.jit(jax.grad(energy, argnums=(0, 1, 2)))(*b)
    allclose(jax.grad(whole, argnums=(0, 1, 2))(*b), expected, rtol=1e-5, atol=1e-5)
    allclose(jax.jit(jax.grad(whole, argnums=(0, 1, 2)))(*b), expected, rtol=1e-5, atol=1e-5)

    mu_a, mu_b = x @ a[0]["w"], 2 * x @ b[0]["w"]
    grads = g.grads("out", wrt=["potential_energy/mu", "params['sigma']"])
    allclose(grads["potential_energy/mu"], jax.grad(lambda m: by_hand(*a, mu=m))(mu_a), rtol=1e-5)
    allclose(grads["params['sigma']"], jax.jit(jax.grad(energy))(*a)["sigma"], rtol=1e-5)
    s = g.slice("potential_energy/mu", "out")
    allclose(s(mu_a), jax.jit(energy)(*a), rtol=1e-6)
    bound = s.bind(*b)
    allclose(bound(mu_b * 0.5), by_hand(*b, mu=mu_b * 0.5), rtol=1e-5)
    allclose(
        jax.grad(bound)(mu_b),
        jax.grad(lambda m: by_hand(*b, mu=m))(mu_b),
        rtol=1e-5,
        atol=1e-6,
    )
    values = jax.jit(g.values_fn(["potential_energy/sigma", "potential_energy/mu"]))(*b)
    allclose(
        values, {"potential_energy/sigma": jnp.exp(-1.2), "potential_energy/mu": mu_b}, rtol=1e-6
    )
    patched = g.replace("potential_energy/mu", lambda old: old * 0.5).as_function()
    allclose(patched(*b), by_hand(*b, mu=mu_b * 0.5), rtol=1e-5)


# -- jraph: a GraphNetwork ----------------------------------------------------------------------------
SENDERS, RECEIVERS = jnp.array([0, 1, 2, 3, 0]), jnp.array([1, 2, 3, 0, 2])


def make_graph(nodes, edges):
    return jraph.GraphsTuple(
        nodes=nodes,
        edges=edges,
        senders=SENDERS,
        receivers=RECEIVERS,
        n_node=jnp.array([4]),
        n_edge=jnp.array([5]),
        globals=jnp.zeros((1, 2)),
    )


def graph_net(w, graph):
    gn = jraph.GraphNetwork(
        update_edge_fn=lambda e, s, r, gl: jnp.tanh(jnp.concatenate([e, s, r], -1) @ w["e"]),
        update_node_fn=lambda n, s, r, gl: jnp.tanh(jnp.concatenate([n, s, r], -1) @ w["n"]),
        update_global_fn=lambda n, e, gl: jnp.concatenate([n, e], -1) @ w["g"],
    )
    out = gn(graph)
    return out.globals.sum() + out.nodes.sum()


def graph_net_by_hand(w, nodes, edges, scale=1.0):
    """One GraphNetwork step written out (sum aggregation, one graph); the new nodes
    are multiplied by ``scale``."""
    e = jnp.tanh(jnp.concatenate([edges, nodes[SENDERS], nodes[RECEIVERS]], -1) @ w["e"])
    sent = jax.ops.segment_sum(e, SENDERS, 4)
    received = jax.ops.segment_sum(e, RECEIVERS, 4)
    n = jnp.tanh(jnp.concatenate([nodes, sent, received], -1) @ w["n"]) * scale
    gl = jnp.concatenate([n.sum(0, keepdims=True), e.sum(0, keepdims=True)], -1) @ w["g"]
    return gl.sum() + n.sum(), n


def test_jraph_graph_network_at_new_weights_and_features():
    """A ``jraph.GraphNetwork`` on a ``GraphsTuple``: ``as_function`` and its gradient (w.r.t.
    weights, node and edge features) at B equal the network's and the network by hand;
    ``grads`` at the new nodes ``gn.nodes`` equals the hand-written gradient; a slice
    ``graph.edges → gn.nodes`` bound to B equals the edge and node updates by hand;
    ``values_fn`` and halved new nodes equal the same by hand."""
    k = keys(7)
    wa = {
        "e": jax.random.normal(k[0], (8, 3)),
        "n": jax.random.normal(k[1], (9, 3)),
        "g": jax.random.normal(k[2], (6, 2)),
    }
    wb = jax.tree.map(lambda p: 0.5 * p - 0.1, wa)
    ga = make_graph(jax.random.normal(k[3], (4, 3)), jax.random.normal(k[4], (5, 2)))
    gb = make_graph(jax.random.normal(k[5], (4, 3)), jax.random.normal(k[6], (5, 2)))
    g = js.trace(graph_net, wa, ga)
    whole = g.as_function()
    # (the references under jit: run eagerly, each operation compiles on its own)
    by_hand = jax.jit(graph_net_by_hand)
    out_b = whole(wb, gb)
    allclose(out_b, jax.jit(graph_net)(wb, gb))
    out_b_by_hand, n_b = by_hand(wb, gb.nodes, gb.edges)
    allclose(out_b, out_b_by_hand, rtol=1e-5)
    via = lambda fn: lambda w, n, e: fn(w, make_graph(n, e))  # noqa: E731
    expected = jax.jit(jax.grad(via(graph_net), argnums=(0, 1, 2)))(wb, gb.nodes, gb.edges)
    allclose(jax.grad(via(whole), argnums=(0, 1, 2))(wb, gb.nodes, gb.edges), expected, atol=1e-5)
    allclose(
        jax.jit(jax.grad(via(whole), argnums=(0, 1, 2)))(wb, gb.nodes, gb.edges),
        expected,
        atol=1e-5,
    )

    n_a = by_hand(wa, ga.nodes, ga.edges)[1]
    allclose(g.value("gn.nodes"), n_a, atol=1e-6)
    ref = jax.jit(jax.grad(lambda s: graph_net_by_hand(wa, ga.nodes, ga.edges, s)[0]))(
        jnp.ones((4, 3))
    )
    allclose(g.grads("out", wrt=["gn.nodes"])["gn.nodes"], ref / n_a, rtol=1e-4, atol=1e-5)

    s = g.slice("graph.edges", "gn.nodes")
    allclose(s(ga.edges), n_a, atol=1e-6)
    edges_b = gb.edges + 0.3
    allclose(s.bind(wb, gb)(edges_b), by_hand(wb, gb.nodes, edges_b)[1], atol=1e-6)
    v = jnp.ones((5, 2))
    allclose(
        jax.jvp(s.bind(wb, gb), (gb.edges,), (v,))[1],
        jax.jvp(lambda e: by_hand(wb, gb.nodes, e)[1], (gb.edges,), (v,))[1],
        atol=1e-5,
    )
    allclose(
        jax.jit(g.values_fn(["gn.nodes"]))(wb, gb)["gn.nodes"],
        n_b,
        atol=1e-6,
    )
    patched = g.replace("gn.nodes", lambda old: old * 0.5).as_function()
    allclose(patched(wb, gb), by_hand(wb, gb.nodes, gb.edges, 0.5)[0], rtol=1e-5)


# -- optax: one Adam update ------------------------------------------------------------------------
ADAM = optax.adam(1e-2)


def adam_step(params, state, grads):
    updates, state = ADAM.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    return new_params, state


def adam_by_hand(p, mu, nu, count, g, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, scale=1.0):
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g**2
    c = count + 1
    update = -lr * (mu / (1 - b1**c)) / (jnp.sqrt(nu / (1 - b2**c)) + eps) * scale
    return p + update, update


def test_optax_adam_step_at_a_later_state():
    """``optax.adam`` ``update`` + ``apply_updates``, traced at the initial state and run at
    a state two steps on (other count, moments, params, gradients): ``as_function`` and its
    gradient equal the step's and Adam by hand; ``grads`` of the new params w.r.t. the
    gradient input equals ``jax.grad``; a slice ``grads['w'] → new_params['w']`` bound to B
    equals Adam by hand; ``values_fn`` and halved updates equal the same by hand."""
    pa = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    ga = jax.tree.map(lambda p: jnp.sin(p) + 0.1, pa)
    sa = ADAM.init(pa)
    pb = jax.tree.map(lambda p: -0.7 * p + 0.2, pa)
    gb = jax.tree.map(lambda p: jnp.cos(3 * p), pa)
    # (the references under jit: run eagerly, each operation compiles on its own)
    step = jax.jit(adam_step)
    _, sb = step(pb, sa, gb)
    _, sb = step(pb, sb, ga)
    assert int(sb[0].count) == 2
    g = js.trace(adam_step, pa, sa, ga)
    whole = g.as_function()
    out_b = whole(pb, sb, gb)
    allclose(out_b, step(pb, sb, gb))
    mu, nu, count = sb[0].mu["w"], sb[0].nu["w"], sb[0].count
    allclose(out_b[0]["w"], adam_by_hand(pb["w"], mu, nu, count, gb["w"])[0])
    loss = lambda fn: lambda p, g: jnp.sum(jnp.tanh(fn(p, sb, g)[0]["w"]))  # noqa: E731
    expected = jax.jit(jax.grad(loss(adam_step), argnums=(0, 1)))(pb, gb)
    allclose(jax.grad(loss(whole), argnums=(0, 1))(pb, gb), expected, atol=1e-5)
    allclose(jax.jit(jax.grad(loss(whole), argnums=(0, 1)))(pb, gb), expected, atol=1e-5)

    grads = g.grads("new_params['w']", wrt=["grads['w']", "updates['w']"])
    allclose(
        grads["grads['w']"],
        jax.jit(jax.grad(lambda g_: adam_step(pa, sa, dict(ga, w=g_))[0]["w"].sum()))(ga["w"]),
        atol=1e-5,
    )
    allclose(grads["updates['w']"], jnp.ones((2, 3)))

    s = g.slice("grads['w']", "new_params['w']")
    allclose(s(ga["w"]), g.value("new_params['w']"))
    by_hand_b = lambda g_: adam_by_hand(pb["w"], mu, nu, count, g_)[0]  # noqa: E731
    bound = s.bind(pb, sb, gb)
    allclose(bound(gb["w"] * 2), by_hand_b(gb["w"] * 2), atol=1e-6)
    v = jnp.ones((2, 3))
    jvp_by_hand = jax.jit(lambda g_, v: jax.jvp(by_hand_b, (g_,), (v,)))
    allclose(jax.jvp(bound, (gb["w"],), (v,)), jvp_by_hand(gb["w"], v), atol=1e-5)
    values = jax.jit(g.values_fn(["updates['w']", "state[0].count#1"]))(pb, sb, gb)
    allclose(values["updates['w']"], adam_by_hand(pb["w"], mu, nu, count, gb["w"])[1], atol=1e-7)
    assert int(values["state[0].count#1"]) == 3
    patched = g.replace("updates['w']", lambda old: old * 0.5).as_function()
    allclose(
        patched(pb, sb, gb)[0]["w"],
        adam_by_hand(pb["w"], mu, nu, count, gb["w"], scale=0.5)[0],
        atol=1e-6,
    )


# -- blackjax: HMC and NUTS steps --------------------------------------------------------------------
def logdensity(x):
    return -0.5 * jnp.sum(x**2 * jnp.array([1.0, 4.0]))


HMC_EPS, HMC_STEPS = 0.2, 4
HMC = blackjax.hmc(
    logdensity, step_size=HMC_EPS, inverse_mass_matrix=jnp.ones(2), num_integration_steps=HMC_STEPS
)


def hmc_step(state, key):
    new_state, info = HMC.step(key, state)
    return new_state.position, info


def test_blackjax_hmc_step_at_a_new_state_and_key():
    """A blackjax HMC step (typed keys, ``jax.random.key``; the NUTS test below takes
    legacy ``PRNGKey`` keys): at
    another position and key ``as_function`` equals the step and its gradient w.r.t. the
    position equals ``jax.grad`` of the step; the slice from the position to the proposal,
    bound to B, equals leapfrog by hand from B's momentum (which ``values_fn`` reports as
    the step's own ``info.momentum``)."""
    sa, sb = HMC.init(jnp.array([1.0, -0.5])), HMC.init(jnp.array([-0.3, 2.0]))
    ka, kb = jax.random.key(1), jax.random.key(7)
    g = js.trace(hmc_step, sa, ka)
    whole = g.as_function()
    allclose(whole(sb, kb), hmc_step(sb, kb))
    first = lambda fn: lambda pos: jnp.sum(fn(HMC.init(pos), kb)[0] ** 2)  # noqa: E731
    expected = jax.grad(first(hmc_step))(sb.position)
    allclose(jax.grad(first(whole))(sb.position), expected, atol=1e-5)
    allclose(jax.jit(jax.grad(first(whole)))(sb.position), expected, atol=1e-5)

    momentum_b = jax.jit(g.values_fn(["HMC.step[1].momentum"]))(sb, kb)["HMC.step[1].momentum"]
    allclose(momentum_b, hmc_step(sb, kb)[1].momentum)
    grad_b = sb.logdensity_grad

    def leapfrog(x, p, grad):
        for _ in range(HMC_STEPS):
            p = p + 0.5 * HMC_EPS * grad
            x = x + HMC_EPS * p
            grad = jax.grad(logdensity)(x)
            p = p + 0.5 * HMC_EPS * grad
        return x

    s = g.slice("state.position", "HMC.step[1].proposal.position")
    allclose(s(sa.position), g.value("HMC.step[1].proposal.position"))
    x = sb.position + 0.1
    allclose(s.bind(sb, kb)(x), leapfrog(x, momentum_b, grad_b), atol=1e-5)
    v = jnp.array([1.0, -1.0])
    allclose(
        jax.jvp(s.bind(sb, kb), (x,), (v,)),
        jax.jvp(lambda y: leapfrog(y, momentum_b, grad_b), (x,), (v,)),
        atol=1e-5,
    )


def test_blackjax_mala_step_bound_to_a_key_that_takes_the_other_decision():
    """A blackjax MALA step ends in an accept/reject ``cond`` whose branches pass their
    input on (the proposal or the current state). Traced at a key that accepts, the slice
    from the position to the new position, bound to a key that rejects, returns the
    position unchanged, and the other way round; ``values_fn`` and ``grads_fn`` follow
    the decision too (the reference: ``jax.grad`` of the step w.r.t. the position
    alone, the state's other fields held, as ``grads_fn`` perturbs one value)."""
    mala = blackjax.mala(logdensity, step_size=0.08)

    def step(state, key):
        new_state, info = mala.step(key, state)
        return new_state.position, info.is_accepted

    s0 = mala.init(jnp.array([1.0, -0.5]))
    accepted = {bool(step(s0, jax.random.key(i))[1]): jax.random.key(i) for i in range(40)}
    for traced, other in ((True, False), (False, True)):
        g = js.trace(step, s0, accepted[traced])
        key = accepted[other]
        want = step(s0, key)[0]
        allclose(g.slice("state.position", "out[0]").bind(s0, key)(s0.position), want)
        allclose(g.values_fn(["out[0]"])(s0, key)["out[0]"], want)
        if not other:
            allclose(want, s0.position)  # rejected: the position as it was
        by_hand = jax.grad(lambda p, k=key: step(s0._replace(position=p), k)[0].sum())(s0.position)
        allclose(g.grads_fn("out[0]", ["state.position"])(s0, key)["state.position"], by_hand)


def test_blackjax_nuts_step_at_a_new_state_and_key():
    """A blackjax NUTS step (a ``while_loop`` tree building): ``as_function`` at another
    state and key equals the step (other trajectory), also jitted, and its forward-mode
    derivative w.r.t. the position equals ``jax.jvp`` of the step (reverse mode fails for
    both, as JAX's while_loop does)."""
    nuts = blackjax.nuts(logdensity, step_size=0.3, inverse_mass_matrix=jnp.ones(2))

    def step(state, key):
        new_state, info = nuts.step(key, state)
        return new_state.position, info.acceptance_rate

    sa, sb = nuts.init(jnp.array([1.0, -0.5])), nuts.init(jnp.array([-0.3, 2.0]))
    ka, kb = jax.random.PRNGKey(1), jax.random.PRNGKey(7)
    g = js.trace(step, sa, ka)
    whole = g.as_function()
    # (the references under jit: run eagerly, each operation compiles on its own)
    expected = jax.jit(step)(sb, kb)
    allclose(whole(sb, kb), expected)
    allclose(jax.jit(whole)(sb, kb), expected)
    from_pos = lambda fn: lambda pos: fn(nuts.init(pos), kb)  # noqa: E731
    v = jnp.array([0.5, 1.0])
    allclose(
        jax.jvp(from_pos(whole), (sb.position,), (v,)),
        jax.jvp(from_pos(step), (sb.position,), (v,)),
        atol=1e-5,
    )
