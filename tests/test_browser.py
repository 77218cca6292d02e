"""The browser test fixtures themselves (tests/browser.py): pages open, and screenshots are
read by content, so a dark-on-dark table would be caught."""

from __future__ import annotations

from browser import shot_summary


def test_open_page_runs_javascript(open_page):
    page = open_page(
        "<p id='x'></p><script>document.getElementById('x').textContent = 'hi'</script>"
    )
    assert page.inner_text("#x") == "hi"


def test_shot_summary_reads_contrast(open_page):
    text = "<p id='x' style='font-size:24px;padding:8px;{}'>readable text 0123</p>"
    light = shot_summary(open_page(text.format("")).locator("#x").screenshot())
    assert not light.dark and light.ink > 0.005 and light.contrast > 10
    dark = shot_summary(open_page(text.format(""), dark=True).locator("#x").screenshot())
    assert dark.dark and dark.contrast > 7
    unreadable = "color:#222;background:#111"
    bad = shot_summary(open_page(text.format(unreadable), dark=True).locator("#x").screenshot())
    assert bad.dark and bad.contrast < 1.5
