"""The HTML report: a self-contained page whose unit table is exactly the attribution's top-k units
(oracle: ``attribute(...).top_units(k)`` on the same image), with the caption, target and heatmaps."""

import base64
import html
import io
import re

import numpy as np
import pytest
from PIL import Image

from _chips import as_shown, chips, probs_written
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.cli import main
from tl_multimodal.analysis.decoding import decode_units
from tl_multimodal.views.report import write_report

K = 6
REMOTE = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?(https?:)?//|<script|<link|@import""", re.IGNORECASE)
ROW = re.compile(r'<tr class="unit-row" data-rank="(\d+)" data-layer="(\d+)" data-unit="(\d+)">(.*?)</tr>', re.DOTALL)
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def photo():
    """A non-square RGB image (so the heatmaps go through timm's resize and crop)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def oracle(vlm_on, photo):
    """The attribution module itself, on the same image (greedy caption, first noun)."""
    return attribute(vlm_on, [photo])


@pytest.fixture(scope="module")
def written(vlm_on, photo, tmp_path_factory):
    path = write_report(vlm_on, photo, tmp_path_factory.mktemp("report") / "sub" / "report.html", n_units=K)
    return path, path.read_text(encoding="utf-8")


def test_report_rows_are_the_attribution_top_units(vlm_on, photo, written):
    path, page = written
    assert path.is_file() and path.name == "report.html"
    oracle = attribute(vlm_on, [photo]).top_units(K)
    rows = ROW.findall(page)
    assert len(rows) == K
    assert [int(r[0]) for r in rows] == list(range(K))
    assert [(int(l), int(u)) for _, l, u, _ in rows] == list(zip(oracle.layer.tolist(), oracle.unit.tolist()))
    # each row shows its decoded tokens, its filter verdict and one heatmap
    dec = decode_units(vlm_on, oracle.units(), n_tokens=10)
    for (_, _, _, cells), toks, probs, ok in zip(rows, dec.tokens, dec.probs.tolist(), dec.interpretable.tolist()):
        boxes = chips(cells)
        assert [shown for _, shown, _ in boxes] == [as_shown(t) for t in toks]  # boxes, not reprs
        assert [v for _, _, v in boxes] == probs_written(probs)
        assert (">yes<" if ok else ">no<") in cells
        assert len(IMG.findall(cells)) == 2  # the heatmap and its colour bar


def test_report_shows_caption_and_target(written, oracle):
    _, page = written
    attr = oracle
    assert attr.captions[0].strip()
    assert html.escape(attr.captions[0].strip()) in page
    assert f'<code class="target">{html.escape(repr(attr.targets[0]))}</code>' in page


def test_report_is_self_contained(written):
    _, page = written
    assert REMOTE.search(page) is None
    imgs = IMG.findall(page)
    assert len(imgs) == 2 * K + 1  # the image + per unit its heatmap and colour bar
    assert len(re.findall(r"<img ", page)) == len(imgs)  # every image is inline
    for b64 in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.format == "PNG" and min(im.size) > 0


def test_report_bad_input(vlm_on, photo, tmp_path):
    with pytest.raises(ValueError, match="n_units must be"):
        write_report(vlm_on, photo, tmp_path / "r.html", n_units=0)
    with pytest.raises(FileNotFoundError, match="missing.png is not a file"):  # the image door's error
        write_report(vlm_on, tmp_path / "missing.png", tmp_path / "r.html")
    assert main(["report", str(tmp_path / "missing.png")]) == 3  # the CLI: a one-line error, exit code 3 (input file)


def test_report_explains_the_darkened_border_when_the_crop_cuts(vlm_on, photo, written):
    import torch

    from tl_multimodal.models.geometry import CropGeometry, grid_to_image

    geo = CropGeometry.from_data_config(vlm_on.vision.data_config, photo.size)
    cut = not torch.isfinite(grid_to_image(torch.zeros(vlm_on.vision.grid), geo)).all()
    assert cut  # the fixture's non-square photo loses its sides to the centre crop
    assert '<p class="muted crop">The darkened border' in written[1]


def test_report_names_its_sources_and_boxes_the_top_patch(vlm_on, photo, written, oracle, tmp_path):
    from tl_multimodal.models.projection import projection_id
    from tl_multimodal.views.report import build_report

    _, page = written
    assert page.count(f"<code>{projection_id(vlm_on.projection)}</code>") == 2  # top and bottom of the page
    assert page.count(f"<code>{html.escape(vlm_on.cfg.model_name)}</code>") == 2
    # the box: the report's panel differs from the plain heatmap only on the top patch's border
    from tl_multimodal.views.heatmap_view import unit_heatmap_view

    top = oracle.top_units(K)
    report = build_report(vlm_on, photo, n_units=K, source="photo.jpg")
    assert "<code>photo.jpg</code>" in report.html
    plain = unit_heatmap_view(vlm_on, photo, top.units(), max_size=360).panels[1:]
    from tl_multimodal.models.geometry import CropGeometry

    rows, cols = vlm_on.vision.grid
    for panel, bare, patch in zip(report.heatmaps, plain, top.patch.tolist()):
        diff = np.abs(np.asarray(panel, dtype=int) - np.asarray(bare, dtype=int)).sum(-1) > 0
        geo = CropGeometry.from_data_config(vlm_on.vision.data_config, bare.size)
        r, c = divmod(patch, cols)
        x0, y0 = geo.to_original(c * geo.crop[2] / cols, r * geo.crop[3] / rows)
        x1, y1 = geo.to_original((c + 1) * geo.crop[2] / cols, (r + 1) * geo.crop[3] / rows)
        ys, xs = np.nonzero(diff)
        assert len(xs) and xs.min() >= int(x0) - 1 and xs.max() <= int(np.ceil(x1)) and ys.min() >= int(y0) - 1
        assert ys.max() <= int(np.ceil(y1))


def test_report_marks_units_that_are_top_units_for_many_reference_images(vlm_on, photo, oracle):
    import pandas as pd

    from tl_multimodal.views.report import build_report

    top = oracle.top_units(K)
    (l0, u0), (l1, u1) = top.units()[:2].tolist()
    # four reference images: the first unit is a top unit of all four, the second of one
    reference = pd.DataFrame({"image_index": [0, 1, 2, 3, 0], "layer": [l0, l0, l0, l0, l1],
                              "unit": [u0, u0, u0, u0, u1]})
    report = build_report(vlm_on, photo, n_units=K, reference=reference, many=0.5)
    rows = ROW.findall(report.html)
    assert '<td class="num">4 of 4 <span class="many">many</span></td>' in rows[0][3]
    assert '<td class="num">1 of 4</td>' in rows[1][3]
    assert all('<td class="num">0 of 4</td>' in r[3] for r in rows[2:])
    with pytest.raises(ValueError, match="missing columns"):
        build_report(vlm_on, photo, n_units=K, reference=reference.drop(columns=["unit"]))
