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
