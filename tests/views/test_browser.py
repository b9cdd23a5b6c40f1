"""Pages rendered in headless Chromium (the atlas's index, a unit page, an image page, the report, the
token and heatmap views): no console error, no network request, every image loads, every link resolves;
screenshots are saved under each test's tmp folder (CI keeps them as artifacts). Without Chromium the
tests skip (``.ci/run`` installs it with apt)."""

import html
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _atlas_run import atlas_run  # noqa: F401 (a fixture)
from tl_multimodal.training.runner import load_rows
from tl_multimodal.views.browser import Chromium, find_chromium

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def browser():
    with Chromium() as b:
        yield b


def _clean(check):
    assert check.problems == [], check.problems
    assert check.network == []
    return check


def test_the_checker_sees_each_kind_of_problem(browser, tmp_path):
    """The oracle checked first: a page with one of each fault gets each one reported."""
    Image.new("RGB", (4, 4), "red").save(tmp_path / "ok.png")
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title></head><body>'
                    '<img src="ok.png"><img src="missing.png"><a href="gone.html">x</a><a href="ok.png">y</a>'
                    '<a href="https://example.com/">z</a><script>console.error("boom");'
                    'fetch("http://127.0.0.1:9/x").catch(() => {});</script></body></html>')
    check = browser.check(page, screenshot=tmp_path / "bad.png")
    assert any("boom" in m for m in check.console)
    assert check.network == ["http://127.0.0.1:9/x"]
    assert [Path(u).name for u in check.broken_images] == ["missing.png"]
    assert sorted(Path(u).name if u.startswith("file:") else u for u in check.dead_links) == [
        "gone.html", "https://example.com/"]
    assert check.screenshot.stat().st_size > 0 and Image.open(check.screenshot).size[0] > 0


def test_atlas_pages_render_clean(browser, atlas_run, tmp_path):
    _, _, run, site = atlas_run
    rows = load_rows(run)
    first = rows.sort_values(["image_index", "rank"]).iloc[0]
    pages = {"index": site / "index.html", "unit": site / "units" / f"L{first.layer}_U{first.unit}.html",
             "image": site / "images" / f"{first.image_id}.html", "images": site / "images.html",
             "by-layer": site / "by-layer-2.html"}
    for name, page in pages.items():
        check = _clean(browser.check(page, screenshot=tmp_path / f"{name}.png"))
        assert check.links and all(u.startswith("file:") for u in check.links)
        assert all(u.startswith("file:") for u in check.requests)
    unit = browser.check(pages["unit"])
    assert len([u for u in unit.requests if "/heat/" in u]) >= 1  # heatmap files, loaded
    # without JavaScript the content is all there: the index's units and the image page's table
    index = _clean(browser.check(pages["index"], javascript=False, screenshot=tmp_path / "index-nojs.png"))
    assert "filter this page" not in index.text  # the controls need scripts: hidden without them
    table = rows.groupby(["layer", "unit"]).image_index.nunique().sort_values(ascending=False)
    assert f"L{first.layer} U{first.unit}" in _clean(browser.check(pages["image"], javascript=False)).text
    assert len(index.links) >= 5 + 4  # five unit rows and the navigation


def test_report_renders_clean(browser, vlm_on, tmp_path):
    from tl_multimodal.views.report import write_report

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    path = write_report(vlm_on, photo, tmp_path / "report.html", n_units=4, max_new_tokens=4)
    check = _clean(browser.check(path, screenshot=tmp_path / "report.png"))
    assert "Top 4 units" in check.text


def test_views_render_clean(browser, small_vlm_on, tmp_path):
    from tl_multimodal.analysis.decoding import decode_units
    from tl_multimodal.views.heatmap_view import unit_heatmap_view
    from tl_multimodal.views.html import save_views
    from tl_multimodal.views.tokens import decoded_tokens_view, token_activations_view

    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    units = [(0, 3), (1, 7)]
    views = [decoded_tokens_view(decode_units(small_vlm_on, units)),
             token_activations_view(small_vlm_on, photo, units, text="A picture of a cat"),
             unit_heatmap_view(small_vlm_on, photo, units)]
    path = save_views(tmp_path / "views.html", views)
    check = _clean(browser.check(path, screenshot=tmp_path / "views.png", settle=1.0))
    # the bundle and the pictures are inline: nothing but the page itself comes from a file
    assert [u for u in check.requests if not u.startswith("data:image/png;base64,")] == [path.as_uri()]


RENDERED = """JSON.stringify(Array.from(document.querySelectorAll('div[id^="tl-multimodal-"]')).map(d => ({
  fallback: d.querySelectorAll('.tlmm-tok').length, children: d.childElementCount, text: d.innerText.length})))"""


def test_views_fall_back_to_plain_html_and_share_one_bundle_in_a_notebook(browser, small_vlm_on, tmp_path, monkeypatch):
    """The outputs of three token views as a notebook shows them (one page, the bundle in the first only):
    with scripts circuitsvis replaces every plain-HTML copy; without, every copy is there to read."""
    import json

    import tl_multimodal.views.html as views_html
    from tl_multimodal.views.tokens import token_activations_view

    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    monkeypatch.setattr(views_html, "_in_kernel", lambda: True)
    monkeypatch.setattr(views_html, "_BUNDLE_SHOWN", False)
    outputs = [token_activations_view(small_vlm_on, photo, [(0, i), (1, i)], text="A picture of a cat")._repr_html_()
               for i in range(3)]
    page = tmp_path / "notebook.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>notebook</title></head><body>'
                    + "<hr>".join(outputs) + "</body></html>", encoding="utf-8")
    on = _clean(browser.check(page, screenshot=tmp_path / "notebook.png", settle=1.5, evaluate=RENDERED))
    off = _clean(browser.check(page, javascript=False, screenshot=tmp_path / "notebook-nojs.png", evaluate=RENDERED))
    on, off = json.loads(on.value), json.loads(off.value)
    assert len(on) == len(off) == 6
    assert all(d["fallback"] == 0 and d["children"] > 0 and d["text"] > 0 for d in on)  # circuitsvis drew each
    assert all(d["fallback"] == len("A picture of a cat".split()) for d in off)  # the copies, one box a token
