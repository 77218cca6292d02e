"""The HTML var table in a real browser (headless Chromium, tests/browser.py): typing in the
filter box (spaces, mixed case) filters every row, folded ones too, without folding the
table; the count is right; the fold opens; the table reads in light and dark themes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from browser import shot_summary

import jaxsurgery as js
from jaxsurgery._table import HEAD, TAIL

STEPS, BLOCK = 120, range(40, 60)  # the block's rows are in the folded middle


def f(x):
    for i in range(STEPS):
        if i in BLOCK:
            with jax.named_scope("MyBlock"):
                x = jnp.cos(jnp.sin(x))
        else:
            x = jnp.sin(x)
    return x


@pytest.fixture(scope="module")
def graph():
    return js.trace(f, jnp.ones(2))


VISIBLE_NAMES = """t => Array.from(t.querySelectorAll('tbody tr'))
    .filter(r => r.offsetParent !== null).map(r => r.cells[1] ? r.cells[1].textContent : '')"""


def test_filter_spaces_and_case_cover_every_row(graph, open_page):
    n = len(graph.vars)
    assert n > HEAD + TAIL + len(BLOCK) * 2
    page = open_page(graph._repr_html_())
    table = page.locator(".jst table")
    count = page.locator(".jst-count")
    folded = table.evaluate(VISIBLE_NAMES)
    assert folded == [v.name for v in graph.vars[:HEAD]] + [""] + [
        v.name for v in graph.vars[-TAIL:]
    ]
    assert count.inner_text() == f"{n} rows"

    box = page.locator("input.jst-q")
    box.click()
    page.keyboard.type("myBLOCK  Sin")  # two words, a double space, mixed case
    expected = [v.name for v in graph.vars if v.scope == "MyBlock" and v.primitive == "sin"]
    assert len(expected) == len(BLOCK)
    assert table.is_visible() and box.input_value() == "myBLOCK  Sin"
    assert table.evaluate(VISIBLE_NAMES) == expected
    assert count.inner_text() == f"{len(BLOCK)} of {n} rows match"
    # the picture of the filtered table: header and 20 rows, readable
    shot = shot_summary(table.screenshot())
    row = table.locator("tbody tr:visible").first.bounding_box()["height"]
    assert abs(shot.height - (len(BLOCK) + 1) * row) < 2 * row
    assert shot.ink > 0.02 and shot.contrast > 7

    box.fill("")
    box.dispatch_event("input")
    assert table.evaluate(VISIBLE_NAMES) == folded and count.inner_text() == f"{n} rows"
    page.locator(".jst-more label").click()  # unfold: every row, in order
    head, rest = graph.vars[:HEAD], graph.vars[HEAD:]
    assert table.evaluate(VISIBLE_NAMES) == [v.name for v in head] + [""] + [v.name for v in rest]


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_table_reads_in_light_and_dark_themes(graph, open_page, dark):
    page = open_page(graph.slice("x#40", "x#45")._repr_html_(), dark=dark)
    shot = shot_summary(page.locator(".jst table").screenshot())
    assert shot.dark == dark and shot.ink > 0.02 and shot.contrast > 7
    for i in range(4):  # plain and striped rows alike: the theme's background, readable text
        row = shot_summary(page.locator("tbody tr").nth(i).screenshot())
        assert row.dark == dark and row.contrast > 4.5, (i, row)
    roles = page.locator("tbody tr td:nth-child(2)").all_inner_texts()
    assert roles[0] == "input" and roles[-1] == "output" and "window" in roles
