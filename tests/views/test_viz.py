"""Offline notebook views: circuitsvis HTML with the bundle inlined (checked against circuitsvis's own
``render_local``), decoded tokens and activations in the HTML, heatmap PNGs that decode back to the
upsampled grid."""

import base64
import html
import io
import json
import re
import shutil
import subprocess

import matplotlib
import numpy as np
import pytest
import torch
from circuitsvis.utils.render import render_local
from PIL import Image

from _chips import as_shown, chips, probs_written
from tl_multimodal.analysis.decoding import decode_units
from tl_multimodal.models.geometry import CropGeometry, grid_to_image
from tl_multimodal.views.heatmap_view import (
    HeatmapView, colorbar_image, overlay_heatmap, patch_heatmap_view, unit_heatmap_view,
)
from tl_multimodal.views.html import HTMLView, circuitsvis_bundle, join_views, save_views
from tl_multimodal.views.tokens import cv_tokens, decoded_tokens_view, token_activations_view, tokens_html
from tl_multimodal.views.figures import plot_unit_heatmaps

matplotlib.use("Agg")
CDN = re.compile(r"""(src\s*=\s*["']?\s*(https?:)?//|from\s*["']https?://|unpkg\.com|jsdelivr|cdnjs)""", re.I)


def _scripts(html: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S)


def _render(elements) -> str:
    return HTMLView.from_circuitsvis(elements, None, "elements").html


def _render_calls(html: str) -> list[tuple[str, dict]]:
    """(element, props) of each CircuitsVis.render call in the HTML."""
    calls = re.findall(r'CircuitsVis\.render\(\s*"[^"]+",\s*CircuitsVis\.(\w+),\s*(\{.*?\})\s*\)', html, flags=re.S)
    return [(name, json.loads(props.replace("<\\/", "</"))) for name, props in calls]


def _pngs(html: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in
            re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _invert_colormap(rgb: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Scalar in [0, 1] of each pixel: the nearest entry of the colormap's 256-colour table."""
    lut = np.round(matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255)
    d = ((rgb[..., None, :3].astype(float) - lut) ** 2).sum(-1)
    return d.argmin(-1) / 255


# ---------------------------------------------------------------------------------- inlined circuitsvis
def test_render_matches_circuitsvis_render_local_without_cdn():
    props = {"tokens": ["A", " dog", "</script>"], "values": torch.tensor([0.1, 0.9, 0.0]), "maxValue": 1.0}
    ours = _render([("ColoredTokens", props)])
    theirs = render_local("ColoredTokens", **props)  # circuitsvis's own offline rendering
    assert not CDN.search(ours)
    (script,) = _scripts(ours)
    (their_script,) = _scripts(theirs)
    bundle = circuitsvis_bundle()
    assert len(bundle) > 100_000 and bundle.strip() in their_script and bundle.strip() in script
    assert _render_calls(ours) == _render_calls(theirs) == [
        ("ColoredTokens", {"tokens": ["A", " dog", "</script>"],
                           "values": [pytest.approx(0.1), pytest.approx(0.9), 0.0], "maxValue": 1.0})]
    assert script.count("</script") == 0  # the token cannot close the inline script early


def test_rendered_script_is_valid_javascript(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot syntax-check the inline module script")
    html = _render([("ColoredTokens", {"tokens": ["a", "</b>"], "values": [1, 2]}),
                               ("ColoredTokensMulti", {"tokens": ["x"], "values": [[1.0, 2.0]], "labels": ["p", "q"]})])
    (script,) = _scripts(html)
    path = tmp_path / "view.mjs"
    path.write_text(script)
    out = subprocess.run([node, "--check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_render_rejects_nothing():
    with pytest.raises(ValueError, match="nothing to render"):
        _render([])


# ---------------------------------------------------------------------------------- (a) decoded tokens
def test_decoded_tokens_view_shows_each_units_tokens(small_vlm_on, tmp_path):
    """Plain HTML (no script): per unit its tokens in order, each in its own box with its probability
    written under it, a leading space shown as a mark, cells left-aligned inline (notebook stylesheets
    right-align table cells)."""
    dec = decode_units(small_vlm_on, [(0, 3), (1, 60)], n_tokens=10)
    view = decoded_tokens_view(dec, n_tokens=5)
    assert _scripts(view.html) == [] and "<td" in view.html
    assert all("text-align: left" in td for td in re.findall(r"<td[^>]*>", view.html))
    rows = re.findall(r'<tr class="tlmm-unit">(.*?)</tr>', view.html, flags=re.S)
    assert len(rows) == 2
    for row, toks, probs in zip(rows, dec.tokens, dec.probs.tolist()):
        boxes = chips(row)
        assert [shown for _, shown, _ in boxes] == [as_shown(t) for t in toks[:5]]
        assert [v for _, _, v in boxes] == probs_written(probs[:5])
        assert all("border: 1px solid" in style for style, _, _ in boxes)  # every token's edges visible
    assert "L0.3" in view.html and "L1.60" in view.html
    assert view._repr_html_() == view.html
    page = view.save(tmp_path / "dec.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and view.html in page
    with pytest.raises(ValueError, match="n_tokens must be"):
        decoded_tokens_view(dec, n_tokens=11)
    with pytest.raises(ValueError, match="UnitDecoding"):
        decoded_tokens_view([(0, 3)])


def test_tokens_html_marks_whitespace_and_shades_symmetrically():
    out = tokens_html([" a", "\n", "<b>", "  x"], [0.5, -1.0, 2.0, 0.0], fmt="{:+.1f}", bound=1.0)
    boxes = chips(out)
    assert [shown for _, shown, _ in boxes] == ["\u2423a", "\u23ce", "<b>", "\u2423\u2423x"]
    assert [v for _, _, v in boxes] == ["+0.5", "-1.0", "+2.0", "+0.0"]
    alphas = [re.search(r"rgba\((\d+), \d+, \d+, ([\d.]+)\)", style).groups() for style, _, _ in boxes]
    assert alphas == [("220", "0.50"), ("40", "1.00"), ("220", "1.00"), ("220", "0.00")]  # -1 as strong as +1
    with pytest.raises(ValueError, match="values has 1 entries for 2 tokens"):
        tokens_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="pass values"):
        tokens_html(["a"], bound=1.0)


# ---------------------------------------------------------------------------------- (b) activations over tokens
def test_token_activations_view_matches_the_cache(small_vlm_on, pixels):
    """One ColoredTokens per unit over the text tokens, the values the cache's; each unit's colour range is
    its own, symmetric, set by its text tokens (so switching units cannot keep another unit's bounds)."""
    units = [(1, 5), (0, 63)]
    view = token_activations_view(small_vlm_on, pixels[0], units, text="A picture of a dog")
    tokens = small_vlm_on.to_tokens("A picture of a dog", image=True)
    _, cache = small_vlm_on.run_with_cache(tokens, images=pixels[:1])
    expected = torch.stack([cache["blocks.1.mlp.hook_post"][0, :, 5], cache["blocks.0.mlp.hook_post"][0, :, 63]], 1)
    n_img = small_vlm_on.n_image_tokens
    calls = _render_calls(view.html)
    assert [name for name, _ in calls] == ["ColoredTokens", "ColoredTokens"]
    for j, (_, props) in enumerate(calls):
        assert "".join(props["tokens"]) == "A picture of a dog"  # text only: image slots shown apart
        np.testing.assert_allclose(props["values"], expected[n_img:, j].numpy(), rtol=1e-5, atol=1e-6)
        bound = float(expected[n_img:, j].abs().max())
        assert props["maxValue"] == pytest.approx(bound, rel=1e-5) and props["minValue"] == -props["maxValue"]
    assert calls[0][1]["maxValue"] != calls[1][1]["maxValue"]
    assert view.tokens[:n_img] == [f"[img {i}]" for i in range(n_img)]
    torch.testing.assert_close(view.values, expected.float())
    assert not CDN.search(view.html)
    assert list(view.to_dataframe().columns) == ["position", "token", "L1.5", "L0.63"]
    text_only = token_activations_view(small_vlm_on, pixels[0], units, text="A picture of a dog", include_image=False)
    assert "".join(text_only.tokens) == "A picture of a dog"
    torch.testing.assert_close(text_only.values, expected[n_img:].float())


def test_token_activations_view_has_a_plain_html_copy_inside_each_row(small_vlm_on, pixels):
    """Without JavaScript each unit's row still shows its tokens and values: the copy inside circuitsvis's
    placeholder; the image slots and special tokens are shown apart, on their own scale, out of the title."""
    text = "A picture of<|endoftext|> a dog"
    view = token_activations_view(small_vlm_on, pixels[0], [(0, 1), (1, 2)], text=text)
    tokens = small_vlm_on.to_tokens(text, image=True)
    assert 50256 in tokens[0].tolist()  # GPT-2's special token, one position
    divs = re.findall(r'<div id="tl-multimodal-[0-9a-f]+" style="[^"]*">(.*?)</div>', view.html, flags=re.S)
    calls = _render_calls(view.html)
    assert len(divs) == len(calls) == 2
    for div, (_, props) in zip(divs, calls):
        boxes = chips(div)
        assert [s for _, s, _ in boxes] == [html.unescape(t).replace(" ", "\u2423") for t in props["tokens"]]
        assert [v for _, _, v in boxes] == [f"{x:+.3g}" for x in props["values"]]
        assert "<|endoftext|>" not in "".join(props["tokens"])
    n_img = small_vlm_on.n_image_tokens
    assert int((~view.text_mask).sum()) == n_img + 1 and view.text == "A picture of a dog"
    assert "endoftext" not in view.title and "image slots and special tokens" in view.html
    torch.testing.assert_close(view.bounds, view.values[view.text_mask].abs().amax(0))


def test_token_activations_view_labels_every_position_as_visible_text(small_vlm_on, pixels):
    """circuitsvis puts each token into the page as HTML: no token may hold markup, image slots included."""
    text = "a <b>dog</b> & a cat"
    view = token_activations_view(small_vlm_on, pixels[0], [(0, 1)], text=text)
    ((_, props),) = _render_calls(view.html)
    tags = re.compile(r"<[A-Za-z/!]")
    assert not any(tags.search(t) for t in props["tokens"])
    assert "".join(html.unescape(t) for t in props["tokens"]) == text  # the escaping is all that changed
    assert "&lt;b&gt;" in "".join(props["tokens"]) and "&amp;" in "".join(props["tokens"])
    assert view.to_dataframe().token.tolist()[:2] == ["[img 0]", "[img 1]"]


def test_cv_tokens():
    assert cv_tokens(["x", "<s>", "y", "&"], [True, False, True, False]) == ["[img 0]", "&lt;s&gt;", "[img 1]", "&amp;"]
    assert cv_tokens(["<b>"]) == ["&lt;b&gt;"]
    with pytest.raises(ValueError, match="image_slots has 1 entries for 2 tokens"):
        cv_tokens(["a", "b"], [True])


def test_token_activations_view_captions_by_default(small_vlm_on, pixels):
    view = token_activations_view(small_vlm_on, pixels[1], [(0, 1)], max_new_tokens=3)
    out = small_vlm_on.generate("A picture of", 3, images=pixels[1:2], do_sample=False, return_type="tokens",
                             verbose=False)
    assert view.text == small_vlm_on.tokenizer.decode(out[0, small_vlm_on.n_image_tokens:].tolist())
    assert view.text.startswith("A picture of") and len(view.tokens) == out.shape[1]


def test_token_activations_view_bad_input(small_vlm_on, pixels):
    with pytest.raises(ValueError, match="out of range"):
        token_activations_view(small_vlm_on, pixels[0], [(2, 0)], text="a")
    with pytest.raises(ValueError, match="one image"):
        token_activations_view(small_vlm_on, pixels, [(0, 0)], text="a")
    with pytest.raises(ValueError, match="unknown hook .hook_nope."):
        token_activations_view(small_vlm_on, pixels[0], [(0, 0)], text="a", hook="hook_nope")


# ---------------------------------------------------------------------------------- (c) heatmaps
def test_patch_heatmap_png_is_the_upsampled_grid_hottest_in_planted_patch():
    grid = torch.zeros(7, 7)
    grid[2, 5] = 3.0  # the planted patch
    grid[6, 0] = -1.0
    geo = CropGeometry.identity((224, 224))
    view = patch_heatmap_view(None, grid, labels=["planted"], geometry=geo, max_size=None, cmap="viridis")
    png, bar = _pngs(view.html)  # the panel, then the colour bar
    assert png.shape == (224, 224, 3) and bar.shape[0] == view.colorbar.height
    decoded = _invert_colormap(png, "viridis")  # viridis is one-to-one (jet has flat stretches)
    y, x = np.unravel_index(decoded.argmax(), decoded.shape)
    assert (y // 32, x // 32) == (2, 5)  # 224 / 7 = 32-pixel patches
    up = grid_to_image(grid, geo).numpy()
    np.testing.assert_allclose(decoded, (up - up.min()) / (up.max() - up.min()), atol=2 / 255)
    torch.testing.assert_close(view.heatmaps[0], grid_to_image(grid, geo))


def test_patch_heatmap_over_a_cropped_image():
    """A 300x200 image, center-cropped to 100x100 by the geometry: the hot patch lands where the crop maps it."""
    geo = CropGeometry.from_data_config({"input_size": (3, 100, 100), "crop_pct": 1.0, "crop_mode": "center"},
                                        (300, 200))
    grid = torch.zeros(4, 4)
    grid[0, 3] = 1.0
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    view = patch_heatmap_view(image, grid, geometry=geo, alpha=1.0, max_size=None)
    assert isinstance(view, HeatmapView) and len(view.panels) == 2  # the image, then the overlay
    plain, over, _ = _pngs(view.html)  # the image, the overlay, the colour bar
    assert plain.shape == over.shape == (200, 300, 3)
    hm = view.heatmaps[0].numpy()
    assert np.isnan(hm[:, :40]).all() and np.isnan(hm[:, 261:]).all()  # cut away: resized 150x100, crop x in [25, 125)
    finite = np.isfinite(hm)
    decoded = np.where(finite, _invert_colormap(over), -1)
    y, x = np.unravel_index(decoded.argmax(), decoded.shape)
    x0, y0, x1, y1 = geo.box  # the crop in original pixels: patch (0, 3) is its top-right quarter
    assert x0 + 0.75 * (x1 - x0) <= x < x1 and y0 <= y < y0 + 0.25 * (y1 - y0)
    assert (over[~finite] == 0).all()  # black image dimmed where the model saw nothing


def test_unit_heatmap_view_matches_cache_grid(small_vlm_on, pixels, tmp_path):
    units = [(0, 7), (1, 2)]
    view = unit_heatmap_view(small_vlm_on, pixels[2], units, alpha=1.0, max_size=None)
    _, cache = small_vlm_on.run_with_cache("", images=pixels[2:3])
    for i, (l, u) in enumerate(units):
        grid = cache[f"blocks.{l}.mlp.hook_post"][0, small_vlm_on.image_positions, u].reshape(4, 4)
        torch.testing.assert_close(view.grids[i], grid)
        torch.testing.assert_close(view.heatmaps[i], grid_to_image(grid, CropGeometry.identity((32, 32))))
        decoded = _invert_colormap(_pngs(view.html)[i + 1])  # panel 0 is the plain image
        y, x = np.unravel_index(decoded.argmax(), decoded.shape)
        r, c = divmod(int(grid.argmax()), 4)
        assert grid[y // 8, x // 8] >= grid[r, c] - 1e-3 * (grid.max() - grid.min())  # 8x8-pixel patches
    assert view.labels == ["L0.7", "L1.2"] and "L0.7" in view.html and not CDN.search(view.html)
    assert view.to_pil(labels=False).size == (32 * 3 + 8, 32)
    saved = np.asarray(Image.open(view.save(tmp_path / "h.png")).convert("L"))
    assert saved.shape[1] == 32 * 3 + 8 and saved.shape[0] > 32 + 16  # captions and colour bar under the panels
    for x in (0, 36, 72):  # each panel's caption is drawn under it
        assert (saved[33:49, x:x + 32] < 128).any()
    assert "<img" in view.save(tmp_path / "h.html").read_text()


def test_unit_heatmap_view_on_pil_image_uses_timm_geometry(small_vlm_on):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    view = unit_heatmap_view(small_vlm_on, image, [(1, 9)], max_size=None)
    geo = CropGeometry.from_data_config(small_vlm_on.vision.data_config, image.size)
    torch.testing.assert_close(view.heatmaps[0], grid_to_image(view.grids[0], geo), equal_nan=True)
    assert view.heatmaps.shape == (1, 48, 64)


def test_overlay_and_view_bad_input():
    with pytest.raises(ValueError, match="image is"):
        overlay_heatmap(Image.new("RGB", (4, 4)), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="no finite"):
        overlay_heatmap(None, torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="labels"):
        patch_heatmap_view(Image.new("RGB", (8, 8)), torch.zeros(2, 2, 2), labels=["a"])
    with pytest.raises(ValueError, match="geometry"):
        patch_heatmap_view(None, torch.zeros(2, 2))


def test_plot_unit_heatmaps(small_vlm_on, pixels):
    fig = plot_unit_heatmaps(small_vlm_on, pixels[0], [(0, 1), (0, 2), (1, 3)], ncols=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "L0.1", "L0.2", "L1.3"]
    import matplotlib.pyplot as plt

    units = [(0, 1), (0, 2), (1, 3)]
    grids = unit_heatmap_view(small_vlm_on, pixels[0], units).heatmaps  # the oracle: the same upsampled grids
    own = [im.get_clim() for ax in fig.axes for im in ax.get_images()[-1:] if ax.get_title().startswith("L")]
    assert own == [pytest.approx((float(g.nan_to_num(np.inf).min()), float(g.nan_to_num(-np.inf).max()))) for g in grids]
    shared = plot_unit_heatmaps(small_vlm_on, pixels[0], units, shared_scale=True)
    clims = [im.get_clim() for ax in shared.axes for im in ax.get_images()[-1:] if ax.get_title().startswith("L")]
    assert clims == [pytest.approx((float(grids.nan_to_num(np.inf).min()), float(grids.nan_to_num(-np.inf).max())))] * 3
    plt.close(fig)
    plt.close(shared)


def test_html_view_repr():
    v = HTMLView("<b>x</b>", "t")
    assert "HTMLView('t'" in repr(v) and v.to_html().count("<b>x</b>") == 1


# ---------------------------------------------------------------------------------- colour scales
def test_shared_scale_and_fixed_range_colour_all_panels_alike():
    geo = CropGeometry.identity((64, 64))
    grid = torch.arange(16.0).reshape(4, 4)
    grids = torch.stack([grid, 2 * grid])  # the second is twice the first
    up = grid_to_image(grids, geo).numpy()
    own = patch_heatmap_view(None, grids, geometry=geo, max_size=None, cmap="viridis")
    for png, u in zip(_pngs(own.html)[:2], up):  # default: each panel its own min..max
        np.testing.assert_allclose(_invert_colormap(png, "viridis"), (u - u.min()) / (u.max() - u.min()), atol=2 / 255)
    shared = patch_heatmap_view(None, grids, geometry=geo, max_size=None, cmap="viridis", shared_scale=True)
    lo, hi = up.min(), up.max()
    for png, u in zip(_pngs(shared.html)[:2], up):
        np.testing.assert_allclose(_invert_colormap(png, "viridis"), (u - lo) / (hi - lo), atol=2 / 255)
    assert shared.colorbar_labels == (f"{lo:.3g}", f"{hi:.3g}") and "one colour scale for all panels" in shared.html
    fixed = patch_heatmap_view(None, grids, geometry=geo, max_size=None, cmap="viridis", vmin=5.0, vmax=20.0)
    for png, u in zip(_pngs(fixed.html)[:2], up):
        np.testing.assert_allclose(_invert_colormap(png, "viridis"), np.clip((u - 5) / 15, 0, 1), atol=2 / 255)
    assert fixed.colorbar_labels == ("5", "20") and ">5</span>" in fixed.html and ">20</span>" in fixed.html
    with pytest.raises(ValueError, match="vmin must be below vmax"):
        patch_heatmap_view(None, grids, geometry=geo, vmin=3, vmax=3)
    with pytest.raises(ValueError, match="vmax must be a finite number"):
        patch_heatmap_view(None, grids, geometry=geo, vmax=float("nan"))
    with pytest.raises(ValueError, match=r"colour range is empty \(100 .. 30\)"):
        patch_heatmap_view(None, grids, geometry=geo, vmin=100)  # above every value: nothing left to colour
    flat = patch_heatmap_view(None, torch.zeros(2, 4, 4), geometry=geo, shared_scale=True)  # constant grids draw
    assert flat.colorbar_labels == ("0", "0")


def test_colour_bar_runs_low_to_high_and_is_in_the_view():
    bar = np.asarray(colorbar_image("viridis", width=100, height=5))
    assert bar.shape == (5, 100, 3)
    np.testing.assert_allclose(_invert_colormap(bar, "viridis")[0], np.linspace(0, 1, 100), atol=2 / 255)
    view = patch_heatmap_view(None, torch.rand(2, 3, 3), geometry=CropGeometry.identity((30, 30)), cmap="viridis")
    pngs = _pngs(view.html)
    assert len(pngs) == 3 and pngs[-1].shape[0] == view.colorbar.height  # two panels, then the bar
    assert "colour bar (viridis)" in view.html and "its own scale" in view.html


def test_crop_is_explained_only_where_it_shows():
    geo = CropGeometry.from_data_config({"input_size": (3, 100, 100), "crop_pct": 1.0, "crop_mode": "center"},
                                        (300, 200))
    cropped = patch_heatmap_view(Image.new("RGB", (300, 200)), torch.rand(4, 4), geometry=geo)
    assert "darkened border" in cropped.html and "centre crop" in cropped.note and "100x100" in cropped.note
    square = patch_heatmap_view(Image.new("RGB", (100, 100)), torch.rand(4, 4))
    assert "darkened border" not in square.html


# ---------------------------------------------------------------------------------- several views, one bundle
def test_four_saved_views_share_one_bundle(small_vlm_on, pixels, tmp_path):
    units = [(0, 3), (1, 60)]
    views = [decoded_tokens_view(decode_units(small_vlm_on, units, n_tokens=10)),
             token_activations_view(small_vlm_on, pixels[0], units, text="A picture of a dog"),
             token_activations_view(small_vlm_on, pixels[1], units, text="a cat"),
             unit_heatmap_view(small_vlm_on, pixels[0], units)]
    alone = sum(v.save(tmp_path / f"v{i}.html").stat().st_size for i, v in enumerate(views))
    assert alone > 2 * len(circuitsvis_bundle())  # each circuitsvis view (the two token views) inlines the bundle
    path = save_views(tmp_path / "page.html", views, title="four views")
    size = path.stat().st_size
    assert size < 2_000_000, f"{size / 1e6:.2f} MB"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>four views</title>" in page and not CDN.search(page)
    assert page.count(circuitsvis_bundle()[:2000]) == 1 and len(_scripts(page)) == 1
    assert _render_calls(page) == [c for v in views for c in _render_calls(v.html)]  # every element, in order
    for v in views:
        assert v.body in page
    ids = re.findall(r'<div id="(tl-multimodal-[0-9a-f]+)"', page)
    assert len(ids) == 4 and sorted(ids) == sorted(re.findall(r'CircuitsVis\.render\("([^"]+)"', page))
    joined = join_views(views)
    assert joined.html.count(circuitsvis_bundle()[:2000]) == 1 and joined._repr_html_() == joined.html
    node = shutil.which("node")
    if node is not None:
        (script,) = _scripts(page)
        (tmp_path / "page.mjs").write_text(script)
        out = subprocess.run([node, "--check", str(tmp_path / "page.mjs")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    with pytest.raises(ValueError, match="views is empty"):
        save_views(tmp_path / "x.html", [])
    with pytest.raises(TypeError, match=r"views\[1\] is a str"):
        join_views([views[0], "<b>x</b>"])


def test_one_bundle_per_notebook(small_vlm_on, pixels, monkeypatch):
    """In a kernel the first circuitsvis output carries the bundle (and makes it global); later ones only
    wait for it; outside a kernel every view is self-contained."""
    import tl_multimodal.views.html as views_html

    views = [token_activations_view(small_vlm_on, pixels[i], [(0, 3)], text="a dog") for i in range(3)]
    assert all(v._repr_html_() == v.html for v in views)  # no kernel here: each output stands alone
    monkeypatch.setattr(views_html, "_in_kernel", lambda: True)
    monkeypatch.setattr(views_html, "_BUNDLE_SHOWN", False)
    outputs = [v._repr_html_() for v in views]
    bundle = circuitsvis_bundle()[:2000]
    assert [o.count(bundle) for o in outputs] == [1, 0, 0]
    assert "globalThis.CircuitsVis = CircuitsVis" in outputs[0]
    for v, o in zip(views, outputs):
        assert _render_calls(o) == _render_calls(v.html) and v.body in o
