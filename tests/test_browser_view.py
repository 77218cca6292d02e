"""The interactive view in a real browser (headless Chromium, tests/browser.py): it lays
out the model's blocks, opens a group on a click, searches, and its screenshot shows the
picture (checked by content: ink on the page and the expected labels, not pixels)."""

from browser import shot_summary
from draw_models import BLOCKS, flax_transformer


def labels(page):
    return page.eval_on_selector_all(".jsv-node .jsv-label", "els => els.map(e => e.textContent)")


def test_the_view_opens_groups_searches_and_draws(open_page, tmp_path):
    g = flax_transformer()
    path = tmp_path / "view.html"
    g.view().save(str(path))
    page = open_page(path.read_text())
    page.wait_for_selector(".jsv-node")
    shown = labels(page)
    assert [f"▸ Block_{k}" for k in range(BLOCKS)] == [s for s in shown if "Block_" in s]
    before = int(page.get_attribute(".jsv", "data-nodes"))

    # a click on Block_2 opens it: its modules show, inside a cluster headed Block_2
    page.click(".jsv-group:has-text('Block_2')")
    shown = labels(page)
    assert "▸ LayerNorm_0" in shown
    assert "▸ …DotProductAttention_0" in shown  # long labels keep their tail
    assert int(page.get_attribute(".jsv", "data-nodes")) > before
    clusters = page.eval_on_selector_all(".jsv-cluster text", "els => els.map(e => e.textContent)")
    assert clusters == ["▾ Transformer", "▾ Block_2"]
    # the opened block's boxes are in sight: the picture is fitted again when they would
    # fall outside the canvas
    inside = """() => {
        const canvas = document.querySelector('.jsv-canvas').getBoundingClientRect();
        const scene = document.querySelector('.jsv-scene').getBoundingClientRect();
        return scene.left >= canvas.left - 1 && scene.right <= canvas.right + 1 &&
            scene.top >= canvas.top - 1 && scene.bottom <= canvas.bottom + 1;
    }"""
    assert page.evaluate(inside)
    # hovering a var shows its card with a selector to copy
    page.hover(".jsv-node:not(.jsv-group)")
    assert "selector" in page.inner_text(".jsv-card") and "g[" in page.inner_text(".jsv-card")

    # search (words, any case) counts the matches and opens their groups
    page.fill(".jsv-search", "block_4 DENSE_1")
    # the same vars as a glob over names and aliases: Dense_1's 3 values and 2 parameters
    assert page.inner_text(".jsv-count") == f"{len(g.select('**Block_4**Dense_1**'))} matches"
    assert page.locator(".jsv-hit").count() >= 1
    assert any("Dense_1" in s for s in labels(page))
    page.fill(".jsv-search", "no such thing")
    assert page.inner_text(".jsv-count") == "0 matches"

    shot = shot_summary(page.locator(".jsv-canvas").screenshot())
    assert shot.ink > 0.01 and shot.contrast > 3  # boxes and text, not a blank canvas


def test_the_page_unpacks_the_data_it_ships(open_page, tmp_path):
    """The page gets the data packed (columns of string-table indices); unpacked in the
    browser it is View.data() again, with aliases and group parents."""
    import json

    g = flax_transformer()
    view = g.view()
    page = open_page(view.html(standalone=True))
    page.wait_for_selector(".jsv-node")
    packed = json.dumps(view.packed())
    unpacked = page.evaluate(f"JSON.stringify(unpackView({packed}))")
    assert json.loads(unpacked) == json.loads(json.dumps(view.data()))
    assert any(v["aliases"] for v in view.data()["vars"])  # the sparse column is exercised


def test_a_call_groups_card_offers_its_result_and_insides(open_page):
    """A call whose result has a name (``y = layer(x)``: most plain-Python models) ships
    its selector as a list; the page unpacks it and the card shows the g.select call."""
    import json

    import jax.numpy as jnp

    import jaxsurgery as js

    def layer(x, w):
        h = jnp.tanh(x @ w)
        return h * 2

    def f(x, w):
        y = layer(x, w)
        z = layer(y, w)
        return (y + z).sum()

    g = js.trace(f, jnp.ones((2, 3)), jnp.ones((3, 3)))
    view = g.view(depth=1)
    rows = {r["path"]: r for r in view.data()["groups"]}
    assert rows["layer#0"]["glob"] == ["layer#0", "layer#0/**"]
    page = open_page(view._repr_html_())
    page.wait_for_selector(".jsv-node")
    unpacked = page.evaluate(f"JSON.stringify(unpackView({json.dumps(view.packed())}))")
    assert json.loads(unpacked) == json.loads(json.dumps(view.data()))
    page.hover(".jsv-group:has-text('layer#1')")
    card = page.inner_text(".jsv-card")
    assert 'g.select(["layer#1", "layer#1/**"])' in card
    selected = g.select(["layer#1", "layer#1/**"])
    assert g["layer#1/h"] in selected and g["z"] in selected  # z is the call's result


def test_the_view_keeps_labels_that_end_alike_apart(open_page):
    """Two parameters whose paths end alike read apart in the view's boxes (clipped at
    22 characters from the left, both read …['Dense_0']['kernel'])."""
    import jax.numpy as jnp

    import jaxsurgery as js

    def model(params, x):
        h = x @ params["encoder"]["Dense_0"]["kernel"]
        return h @ params["decoder"]["Dense_0"]["kernel"]

    w = jnp.ones((3, 3))
    params = {"encoder": {"Dense_0": {"kernel": w}}, "decoder": {"Dense_0": {"kernel": w}}}
    page = open_page(js.trace(model, params, jnp.ones(3)).view()._repr_html_())
    page.wait_for_selector(".jsv-node")
    kernels = [s for s in labels(page) if "kernel" in s]
    assert len(kernels) == 2 and len(set(kernels)) == 2, kernels
    widths = page.eval_on_selector_all(
        ".jsv-node rect", "els => els.map(e => e.getAttribute('width'))"
    )
    assert len(set(widths)) == 1 and float(widths[0]) > 160  # boxes widened to hold them


def nested_scopes(x):
    import jax
    import jax.numpy as jnp

    with jax.named_scope("outer"):
        for k in range(2):
            with jax.named_scope(f"inner_{k}"):
                x = jnp.tanh(x) * 2.0 + 1.0
    return x


def test_a_click_on_an_inner_groups_header_closes_that_group(open_page):
    """The outer group's frame was drawn over the inner group's header and took its
    click: every group closed."""
    import jax.numpy as jnp

    import jaxsurgery as js

    page = open_page(js.trace(nested_scopes, jnp.ones(3)).view(depth=1)._repr_html_())
    page.wait_for_selector(".jsv-node")
    page.click(".jsv-node.jsv-group")  # outer
    page.click(".jsv-node.jsv-group")  # inner_0, inside it
    headers = ".jsv-cluster text"
    assert sorted(page.eval_on_selector_all(headers, "els => els.map(e => e.textContent)")) == [
        "▾ inner_0",
        "▾ outer",
    ]
    inner = page.locator(headers, has_text="inner_0").bounding_box()
    page.mouse.click(inner["x"] + inner["width"] / 2, inner["y"] + inner["height"] / 2)
    assert page.eval_on_selector_all(headers, "els => els.map(e => e.textContent)") == ["▾ outer"]


def test_fit_keeps_a_tall_picture_inside_the_canvas(open_page):
    """Scaled down below a half, the picture's bottom (its output) fell below the
    canvas."""
    import jax.numpy as jnp

    import jaxsurgery as js

    def chain(x):
        for _ in range(60):
            x = jnp.sin(x) * 1.1
        return x

    page = open_page(js.trace(chain, jnp.ones(3)).view()._repr_html_())
    page.wait_for_selector(".jsv-node")
    page.click(".jsv-fit")
    canvas, scene = (page.locator(s).bounding_box() for s in (".jsv-canvas", ".jsv-scene"))
    transform = page.get_attribute(".jsv-scene", "transform")
    assert float(transform.rsplit("scale(", 1)[1].rstrip(")")) < 0.5  # scaled well down
    assert (
        scene["y"] >= canvas["y"] and scene["y"] + scene["height"] <= canvas["y"] + canvas["height"]
    )
