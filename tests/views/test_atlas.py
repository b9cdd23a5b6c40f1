"""The atlas of a run's units: its tables against counts made by hand from the runner's rows, its peak
activations against TransformerLens's own cache, its pages against the rows and the decodings."""

import html
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from _chips import as_shown, chips, probs_written
from _atlas_run import K, N_IMAGES, atlas_run  # noqa: F401 (a fixture)
from tl_multimodal.analysis.decoding import decode_units
from tl_multimodal.cli import main
from tl_multimodal.training.runner import load_rows
from tl_multimodal.views.atlas import unit_table, write_atlas

LINK = re.compile(r'(?:href|src)="([^"#]+)"')


def _by_hand(rows):
    """Per unit: the set of images where it is a top unit, its scores and targets."""
    seen = {}
    for r in rows.itertuples(index=False):
        s = seen.setdefault((int(r.layer), int(r.unit)), {"images": set(), "scores": [], "targets": []})
        s["images"].add(int(r.image_index))
        s["scores"].append(float(r.score))
        s["targets"].append(r.target)
    return seen


def test_unit_table_counts_what_the_rows_hold(atlas_run):
    _, _, run, _ = atlas_run
    rows = load_rows(run)
    table = unit_table(rows, many=0.5)
    hand = _by_hand(rows)
    assert len(table) == len(hand)
    for t in table.itertuples(index=False):
        h = hand[int(t.layer), int(t.unit)]
        assert t.n_images == len(h["images"])
        assert t.share == pytest.approx(len(h["images"]) / N_IMAGES)
        assert t.specificity == pytest.approx(1 - len(h["images"]) / N_IMAGES)
        assert t.mean_score == pytest.approx(sum(h["scores"]) / len(h["scores"]), rel=1e-6)
        assert t.max_score == pytest.approx(max(h["scores"]), rel=1e-6)
        assert t.top_target_share == pytest.approx(h["targets"].count(t.top_target) / len(h["targets"]))
        assert t.many == (len(h["images"]) / N_IMAGES >= 0.5)
    assert table["n_images"].is_monotonic_decreasing


def test_pages_link_every_unit_and_image_and_every_link_resolves(atlas_run):
    _, _, run, site = atlas_run
    rows = load_rows(run)
    hand = _by_hand(rows)
    for layer, unit in hand:
        assert (site / "units" / f"L{layer}_U{unit}.html").is_file()
    for image_id in rows["image_id"].unique():
        assert (site / "images" / f"{image_id}.html").is_file()
    pages = list(site.rglob("*.html"))
    assert len(pages) == len(hand) + N_IMAGES + 1 + 4 * -(-len(hand) // 5)  # units, images, images.html, indexes
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "base64" not in text and "http" not in text.replace("http-equiv", "")
        for link in LINK.findall(text):
            assert (page.parent / link).resolve().is_file(), (page, link)
    # pictures are files: a thumbnail and the original per image
    assert len(list((site / "img").glob("*_thumb.jpg"))) == N_IMAGES


def test_image_pages_list_the_rows_top_units(atlas_run):
    _, _, run, site = atlas_run
    rows = load_rows(run)
    for image_id, group in rows.groupby("image_id"):
        page = (site / "images" / f"{image_id}.html").read_text(encoding="utf-8")
        linked = re.findall(r'<a href="\.\./units/L(\d+)_U(\d+)\.html">', page)
        top = group.sort_values("rank").head(4)
        assert [(int(l), int(u)) for l, u in linked] == list(zip(top.layer.tolist(), top.unit.tolist()))
        assert html.escape(repr(group.target.iloc[0])) in page
        assert f"images/{image_id}.jpg" in page  # the image file is named


def test_unit_pages_show_decoded_tokens_and_counts(atlas_run):
    model, _, run, site = atlas_run
    rows = load_rows(run)
    hand = _by_hand(rows)
    units = sorted(hand)[:5]
    dec = decode_units(model, units, n_tokens=10)
    for (layer, unit), toks, probs in zip(units, dec.tokens, dec.probs.tolist()):
        page = (site / "units" / f"L{layer}_U{unit}.html").read_text(encoding="utf-8")
        assert f"A top unit for <b>{len(hand[layer, unit]['images'])}</b> of {N_IMAGES} images" in page
        boxes = chips(re.search(r"<h3>Decoded tokens</h3><p>(.*?)</p>", page, flags=re.S).group(1))
        assert [(shown, v) for _, shown, v in boxes] == list(zip(map(as_shown, toks), probs_written(probs)))
        shown = re.findall(r'<img src="\.\./heat/(\d+)_L(\d+)_U(\d+)\.jpg"', page)
        best = rows[(rows.layer == layer) & (rows.unit == unit)].sort_values("score", ascending=False).head(3)
        assert [int(i) for i, _, _ in shown] == best.image_id.tolist()


def test_peak_activations_are_the_cache_maxima(atlas_run, tmp_path):
    """Library call on the same rows: ``peak`` against ``run_with_cache`` read at the image slots."""
    from tl_multimodal._compat import get_act_name  # TransformerLens's own (utils in 3.x, utilities in 4.x)

    model, data, run, _ = atlas_run
    rows = load_rows(run)
    files = {i: data / "images" / f"{2000 + i}.jpg" for i in range(N_IMAGES)}
    atlas = write_atlas(model, rows, files, tmp_path / "site", units_per_page=50)
    assert list(atlas.images["file"]) == [str(files[i]) for i in range(N_IMAGES)]
    for k, i in enumerate(atlas.images["image_index"].tolist()):
        pixels = model.preprocess([Image.open(files[i]).convert("RGB")])
        tokens = model.to_tokens("", image=True)
        _, cache = model.run_with_cache(tokens, images=pixels)
        slots = model.image_mask(tokens)[0]
        for j, (layer, unit) in enumerate(zip(atlas.units["layer"], atlas.units["unit"])):
            acts = cache[get_act_name("post", int(layer))][0, slots, int(unit)]
            assert float(atlas.peak[k, j]) == pytest.approx(float(acts.max()), rel=1e-5, abs=1e-6)
    # heatmaps: one file per shown (image, unit), at most heatmap_size on the longest side
    for f in (tmp_path / "site" / "heat").iterdir():
        assert max(Image.open(f).size) <= 256


def test_bad_input_is_named(atlas_run, tmp_path):
    model, _, run, _ = atlas_run
    rows = load_rows(run)
    with pytest.raises(ValueError, match="missing columns"):
        write_atlas(model, rows.drop(columns=["patch"]), {}, tmp_path / "a")
    with pytest.raises(ValueError, match="images has no image 0"):
        write_atlas(model, rows, {}, tmp_path / "b")
    with pytest.raises(ValueError, match="units_per_page"):
        write_atlas(model, rows, {}, tmp_path / "c", units_per_page=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        write_atlas(model, rows, {}, tmp_path / "file")
    assert main(["atlas", str(tmp_path), "-o", str(tmp_path / "d")]) == 3  # not a run folder


def test_report_command_marks_units_of_a_reference_run(atlas_run, tmp_path):
    _, data, run, _ = atlas_run
    factory = run.parent / "factory.py"
    image = data / "images" / "2000.jpg"
    out = tmp_path / "r.html"
    assert main(["report", str(image), "-o", str(out), "--k", "3", "--model", f"{factory}:build",
                 "--reference", str(run)]) == 0
    page = out.read_text(encoding="utf-8")
    rows = load_rows(run)
    counts = rows.groupby(["layer", "unit"]).image_index.nunique()
    shown = re.findall(r'data-layer="(\d+)" data-unit="(\d+)">.*?<td class="num">(\d+) of (\d+)', page, flags=re.S)
    assert len(shown) == 3
    for layer, unit, n, total in shown:
        assert int(total) == N_IMAGES and int(n) == int(counts.get((int(layer), int(unit)), 0))
    assert f"<code>{image.resolve()}</code>" in page
    assert main(["report", str(image), "-o", str(out), "--reference", str(tmp_path / "none")]) == 3


def test_images_by_index_reads_a_stream_up_to_the_last_index_wanted():
    from tl_multimodal.data.sources import ImagesByIndex

    read = []

    def stream():
        for i in range(10):
            read.append(i)
            yield {"jpg": f"picture {i}", "__key__": str(i)}

    images = ImagesByIndex(stream(), [4, 1])
    assert (images[1], images[4]) == ("picture 1", "picture 4") and read == list(range(5))
    with pytest.raises(KeyError):
        images[2]  # not kept: only the indices asked for
    with pytest.raises(ValueError, match="the data has 10 rows but row 12 is wanted"):
        ImagesByIndex(stream(), [12])
    with pytest.raises(ValueError, match="image_column 'png'"):
        ImagesByIndex([{"jpg": 1}], [0], "png")
