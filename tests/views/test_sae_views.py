"""SAE latents in the atlas, the report and the views: a tiny run made with ``tl-multimodal attribute --sae`` and
its atlas made by ``tl-multimodal atlas`` (which reads the SAE from ``_run.json``), checked against an oracle
independent of the views: the SAE's ``encode`` of the residual stream that TransformerLens's own
``run_with_cache`` holds at the SAE's hook, and ``decode_units``/``attribute`` with ``sae=``."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from _chips import as_shown, chips, probs_written
from _atlas_run import N_IMAGES, jpeg_folder
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.analysis.decoding import decode_units
from tl_multimodal.analysis.heatmaps import unit_grid_activations
from tl_multimodal.cli import main
from tl_multimodal.sae.load import load_sae, save_sae
from tl_multimodal.sae.model import SAE, SAEConfig, sae_id
from tl_multimodal.sae.splice import model_hook_name
from tl_multimodal.training.runner import load_rows
from tl_multimodal.views.atlas import write_atlas
from tl_multimodal.views.browser import find_chromium
from tl_multimodal.views.heatmap_view import unit_heatmap_view
from tl_multimodal.views.report import build_report
from tl_multimodal.views.tokens import token_activations_view

ROOT = Path(__file__).parents[2]
K, D_SAE = 6, 40  # D_SAE > the tiny model's d_mlp (24): some latents are no MLP unit
LINK = re.compile(r'(?:href|src)="([^"#]+)"')


@pytest.fixture(scope="module")
def sae_run(backend, tmp_path_factory):
    """``(model, sae, data folder, run folder, site folder)``: an SAE on layer 1's residual stream of the
    tiny runner model, a run of its latents and that run's atlas, both by the command line."""
    sys.path.insert(0, str(ROOT / "tests" / "training"))
    from test_runner import build_tiny_vlm, model_factory

    root = tmp_path_factory.mktemp(f"sae_atlas_{backend}")
    model = build_tiny_vlm(backend=backend)
    g = torch.Generator().manual_seed(1)
    params = {"W_enc": torch.randn(32, D_SAE, generator=g) / 32 ** 0.5, "b_enc": torch.full((D_SAE,), 0.2),
              "W_dec": torch.randn(D_SAE, 32, generator=g), "b_dec": torch.randn(32, generator=g) * 0.1}
    sae_dir = save_sae(SAE(SAEConfig("standard", 32, D_SAE, "blocks.1.hook_resid_post"), params), root / "sae")
    factory = model_factory(root, model, backend)
    data = jpeg_folder(root / "coco", 3000, seed=1)
    run, site = root / "run", root / "site"
    assert main(["attribute", str(data), "--split", "dev", "--out", str(run), "--k", str(K), "--batch-size", "2",
                 "--model", factory, "--sae", str(sae_dir), "--no-progress"]) == 0
    assert main(["atlas", str(run), "-o", str(site), "--units-per-page", "5", "--images-per-unit", "3",
                 "--units-per-image", "4", "--no-progress"]) == 0
    sae = load_sae(sae_dir, dtype=model.cfg.dtype)  # as the runner and the atlas load it
    return model, sae, data, run, site


def _latents(model, sae, image, tokens=None):
    """Oracle: ``sae.encode`` of the residual stream TransformerLens caches at the SAE's hook ([pos, d_sae]),
    and the image-slot mask."""
    tokens = model.to_tokens("", image=True) if tokens is None else tokens
    name = model_hook_name(model, sae.hook_name)
    _, cache = model.run_with_cache(tokens, images=model.preprocess([image]), names_filter=[name])
    return sae.encode(cache[name][0].to(sae.W_dec.dtype)).detach(), model.image_mask(tokens)[0]


def _close(actual, oracle):
    """Equal up to a few roundings of the coarser dtype of the two (the SAE's: the model's float64, or float32 where
    the bridge's ``cfg.dtype`` says float32 and the runner loads the SAE so; the grids are kept in float32):
    the same ``encode`` of the same values."""
    eps = max(torch.finfo(actual.dtype).eps, torch.finfo(oracle.dtype).eps)
    return torch.allclose(actual.to(oracle.dtype), oracle, rtol=64 * eps, atol=64 * eps * float(oracle.abs().max()))


def test_sae_run_atlas_has_latent_pages_named_by_the_sae(sae_run):
    model, sae, _, run, site = sae_run
    rows = load_rows(run)
    assert (rows.layer == 0).all()
    pairs = sorted({(int(l), int(u)) for l, u in zip(rows.layer, rows.unit)})
    for _, f in pairs:
        assert (site / "latents" / f"L1_F{f}.html").is_file()
    assert not (site / "units").exists()  # no MLP unit pages: the bug this replaces showed "L0 U<latent>"
    assert not list(site.rglob("*_U*"))
    record = json.loads((run / "_run.json").read_text())
    assert record["sae_id"] == sae_id(sae)
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert sae_id(sae) in text and record["sae"] in text and "blocks.1.hook_resid_post" in text  # provenance
        assert "base64" not in text
        for link in LINK.findall(text):
            assert (page.parent / link).resolve().is_file(), (page, link)
    # image pages link each image's top latents, by name
    for image_id, group in rows.groupby("image_id"):
        page = (site / "images" / f"{image_id}.html").read_text(encoding="utf-8")
        linked = re.findall(r'<a href="\.\./latents/L1_F(\d+)\.html">L1 F(\d+)</a>', page)
        assert [(int(a), int(b)) for a, b in linked] == [(u, u) for u in group.sort_values("rank").unit[:4]]
    # latent pages: the decoded tokens are decode_units(sae=)'s, the title names the latent and the SAE's hook
    dec = decode_units(model, pairs, n_tokens=10, sae=sae)
    for (_, f), toks, probs in zip(pairs, dec.tokens, dec.probs.tolist()):
        page = (site / "latents" / f"L1_F{f}.html").read_text(encoding="utf-8")
        assert f"<title>Latent L1 F{f} of the SAE on blocks.1.hook_resid_post</title>" in page
        assert f"W_dec[{f}]" in page and "W_out" not in page
        boxes = chips(re.search(r"<h3>Decoded tokens</h3><p>(.*?)</p>", page, flags=re.S).group(1))
        assert [(shown, v) for _, shown, v in boxes] == list(zip(map(as_shown, toks), probs_written(probs)))


def test_atlas_peaks_are_the_sae_latents_of_the_cached_residual_stream(sae_run, tmp_path):
    model, sae, data, run, _ = sae_run
    rows = load_rows(run)
    files = {i: data / "images" / f"{3000 + i}.jpg" for i in range(N_IMAGES)}
    atlas = write_atlas(model, rows, files, tmp_path / "site", sae=sae)
    assert atlas.provenance["sae_id"] == sae_id(sae) and repr(atlas).startswith(f"Atlas({len(atlas.units)} latents")
    pairs = list(zip(atlas.units["layer"].tolist(), atlas.units["unit"].tolist()))
    assert list(atlas.units["page"]) == [f"latents/L1_F{u}.html" for _, u in pairs]
    for k, i in enumerate(atlas.images["image_index"].tolist()):
        image = Image.open(files[i]).convert("RGB")
        latents, slots = _latents(model, sae, image)
        grids = unit_grid_activations(model, [image], pairs, sae=sae)[0]  # what the heatmaps draw
        for j, (_, f) in enumerate(pairs):
            oracle = latents[slots, f]
            assert _close(grids[j].flatten(), oracle)
            assert _close(atlas.peak[k, j], oracle.max())


def test_rows_and_sae_that_do_not_match_are_refused(sae_run, tmp_path):
    model, sae, data, run, _ = sae_run
    rows = load_rows(run)
    files = {i: data / "images" / f"{3000 + i}.jpg" for i in range(N_IMAGES)}
    beyond = rows.copy()
    beyond.loc[beyond.index[0], "unit"] = model.cfg.d_mlp  # a latent no MLP unit has
    with pytest.raises(ValueError, match="rows: .*need its sae="):
        write_atlas(model, beyond, files, tmp_path / "a")
    mlp = rows.copy()
    mlp.loc[mlp.index[0], "layer"] = 1  # an MLP layer: one SAE has index 0 only
    with pytest.raises(ValueError, match="rows: "):
        write_atlas(model, mlp, files, tmp_path / "b", sae=sae)


def test_atlas_command_takes_a_moved_sae_and_refuses_another(sae_run, tmp_path):
    _, sae, _, run, site = sae_run
    record = json.loads((run / "_run.json").read_text())
    moved = shutil.copytree(record["sae"], tmp_path / "moved")
    common = ["--units-per-page", "5", "--images-per-unit", "3", "--units-per-image", "4", "--no-progress"]
    assert main(["atlas", str(run), "-o", str(tmp_path / "s1"), "--sae", str(moved), *common]) == 0
    page = next((site / "latents").iterdir()).name
    assert (tmp_path / "s1" / "latents" / page).is_file()
    other = SAE(sae.cfg, {n: p.detach() * 2 for n, p in sae.named_parameters()})
    assert main(["atlas", str(run), "-o", str(tmp_path / "s2"), "--sae", str(save_sae(other, tmp_path / "o")),
                 *common]) == 3  # not the run's SAE (its id differs)
    # the run's SAE gone: named, with the way out
    gone = shutil.copytree(run, tmp_path / "run_gone")
    (gone / "_run.json").write_text(json.dumps({**record, "sae": str(tmp_path / "nothing")}))
    assert main(["atlas", str(gone), "-o", str(tmp_path / "s3"), *common]) == 3
    # --sae on a run of MLP units
    mlp = shutil.copytree(run, tmp_path / "run_mlp")
    (mlp / "_run.json").write_text(json.dumps({**record, "sae": None, "sae_id": None}))
    assert main(["atlas", str(mlp), "-o", str(tmp_path / "s4"), "--sae", str(moved), *common]) == 2


def test_report_with_an_sae_lists_attributes_top_latents(sae_run, tmp_path):
    model, sae, data, run, _ = sae_run
    image = Image.open(data / "images" / "3001.jpg").convert("RGB")
    report = build_report(model, image, n_units=3, sae=sae, max_new_tokens=5, reference=load_rows(run))
    top = attribute(model, [image], sae=sae, max_new_tokens=5).top_units(3, image_index=0)
    assert torch.equal(report.units, top.units()) and torch.allclose(report.scores, top.score)
    assert torch.equal(report.decoding.probs, decode_units(model, top.units(), n_tokens=10, sae=sae).probs)
    page = report.html
    shown = re.findall(r'data-layer="(\d+)" data-unit="(\d+)"><td class="num">\d+</td><td class="num">(\w+)</td>', page)
    assert [(int(l), int(u), t) for l, u, t in shown] == [(0, u, "L1") for u in top.unit.tolist()]
    assert f"id <code>{sae_id(sae)}</code>" in page and "blocks.1.hook_resid_post" in page
    assert "Top 3 latents" in page and "W_dec[latent]" in page
    # the command line: --sae, with a reference run of the same SAE; a reference of other units is refused
    factory = f"{run.parent / 'factory.py'}:build"
    record = json.loads((run / "_run.json").read_text())
    file, out = data / "images" / "3001.jpg", tmp_path / "r.html"
    assert main(["report", str(file), "-o", str(out), "--k", "3", "--max-new-tokens", "5", "--model", factory,
                 "--sae", record["sae"], "--reference", str(run)]) == 0
    assert re.findall(r'data-unit="(\d+)"', out.read_text(encoding="utf-8")) == [str(u) for u in top.unit.tolist()]
    assert main(["report", str(file), "-o", str(out), "--model", factory, "--reference", str(run)]) == 2


def test_heatmap_and_token_views_of_latents(sae_run):
    model, sae, data, _, _ = sae_run
    image = Image.open(data / "images" / "3002.jpg").convert("RGB")
    units = [(0, 3), (0, D_SAE - 1)]
    view = unit_heatmap_view(model, image, units, sae=sae)
    latents, slots = _latents(model, sae, image)
    assert view.labels == ["L1.F3", f"L1.F{D_SAE - 1}"]
    for j, (_, f) in enumerate(units):
        assert _close(view.grids[j].flatten(), latents[slots, f])
    text = " a dog on the grass"
    tv = token_activations_view(model, image, units, text=text, sae=sae)
    latents, _ = _latents(model, sae, image, model.to_tokens(text, image=True))
    assert tv.labels == view.labels
    assert _close(tv.values, latents[:, [f for _, f in units]])
    with pytest.raises(ValueError, match="d_sae"):
        unit_heatmap_view(model, image, [(0, D_SAE)], sae=sae)


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_latent_page_renders_clean(sae_run, tmp_path):
    from tl_multimodal.views.browser import Chromium

    _, _, _, _, site = sae_run
    with Chromium() as browser:
        for name, page in (("latent", sorted((site / "latents").iterdir())[0]), ("index", site / "index.html")):
            check = browser.check(page, screenshot=tmp_path / f"{name}.png")
            assert check.problems == [] and check.network == [], (check.problems, check.network)
            assert check.links and all(u.startswith("file:") for u in check.requests)
