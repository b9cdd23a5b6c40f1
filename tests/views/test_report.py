"""The HTML report: a self-contained page whose unit table is exactly the attribution's top-k units
(oracle: ``attribute(...).top_units(k)`` on the same image), with the caption, target and heatmaps."""

import base64
import html
import io
import re

import numpy as np
import pytest
from PIL import Image

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
    for (_, _, _, cells), toks, ok in zip(rows, dec.tokens, dec.interpretable.tolist()):
        assert all(html.escape(repr(t)) in cells for t in toks)
        assert (">yes<" if ok else ">no<") in cells
        assert len(IMG.findall(cells)) == 1


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
    assert len(imgs) == K + 1  # the image + one heatmap per unit
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
