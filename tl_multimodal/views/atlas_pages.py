"""The pages of the atlas (:mod:`tl_multimodal.views.atlas`): plain HTML files that link to each other,
to a shared stylesheet and script, and to image files; readable without JavaScript."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_multimodal.views.tokens import probs_html, tokens_html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 16px 24px; color: #222; text-align: left; }
a { color: #0645ad; }
nav { margin-bottom: 12px; font-size: 90%; }
nav a { margin-right: 12px; }
table.list { border-collapse: collapse; }
table.list th, table.list td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: middle; }
table.list td.num, table.list th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.list th[data-sort] { cursor: pointer; }
.many { background: #fde9c8; color: #7a4a00; border-radius: 3px; padding: 0 4px; font-size: 85%; }
.muted { color: #666; font-size: 85%; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid figure { margin: 0; width: 260px; }
.grid figcaption { font-size: 85%; }
footer { margin-top: 24px; border-top: 1px solid #ddd; padding-top: 6px; color: #555; font-size: 80%; }
.pages a, .pages b { margin-right: 6px; }
.controls { margin: 8px 0; }
"""

_JS = """
// Filter and sort the unit table of this page (no data is fetched: the rows are in the page).
(function () {
  var table = document.querySelector("table.units");
  var box = document.querySelector(".controls");
  if (!table || !box) return;
  box.hidden = false;
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  function apply() {
    var text = box.querySelector("[name=text]").value.toLowerCase();
    var layer = box.querySelector("[name=layer]").value;
    var interp = box.querySelector("[name=interpretable]").checked;
    var specific = box.querySelector("[name=specific]").checked;
    rows.forEach(function (r) {
      var ok = (!text || r.textContent.toLowerCase().indexOf(text) >= 0) &&
               (layer === "" || r.dataset.layer === layer) &&
               (!interp || r.dataset.interpretable === "1") && (!specific || r.dataset.many === "0");
      r.hidden = !ok;
    });
  }
  box.addEventListener("input", apply);
  Array.prototype.forEach.call(table.tHead.querySelectorAll("th[data-sort]"), function (th) {
    th.addEventListener("click", function () {
      var key = th.dataset.sort, down = th.dataset.dir !== "desc";
      th.dataset.dir = down ? "desc" : "asc";
      rows.sort(function (a, b) {
        var x = a.dataset[key], y = b.dataset[key];
        var d = isNaN(x) ? x.localeCompare(y) : (+x) - (+y);
        return down ? -d : d;
      });
      rows.forEach(function (r) { table.tBodies[0].appendChild(r); });
    });
  });
})();
"""

#: Index orders: file stem, heading, sort columns, ascending.
ORDERS = (("index", "images where it is a top unit", ["n_images", "mean_score"], False),
          ("by-score", "mean attribution score", ["mean_score", "n_images"], False),
          ("by-specificity", "specificity", ["specificity", "mean_score"], False),
          ("by-layer", "layer and unit", ["layer", "unit"], True))


def unit_stem(layer: int, unit: int, tags: list[str] | None = None) -> str:
    """A unit's file stem: ``L5_U1234`` (MLP unit 1234 of layer 5); with ``tags`` (one per SAE,
    :func:`~tl_multimodal.analysis.units.sae_tags`) latent ``unit`` of SAE ``layer``: ``L15_F123``."""
    return f"L{int(layer)}_U{int(unit)}" if tags is None else f"{tags[int(layer)]}_F{int(unit)}"


def unit_page(layer: int, unit: int, tags: list[str] | None = None) -> str:
    """The unit's page, relative to the site's folder: ``units/L5_U1234.html``, or with ``tags`` (SAE latents)
    ``latents/L15_F123.html``."""
    return f"{'units' if tags is None else 'latents'}/{unit_stem(layer, unit, tags)}.html"


def image_page(stem: str) -> str:
    """An image's page, relative to the site's folder."""
    return f"images/{stem}.html"


@dataclass
class Site:
    """Everything the pages show (built by :func:`~tl_multimodal.views.atlas.write_atlas`)."""

    out: Path
    units: Any
    images: Any
    rows: Any
    decoding: Any
    peak: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    pictures: dict
    heat_files: dict
    stems: dict
    provenance: dict
    hook: str
    units_per_page: int
    images_per_unit: int
    units_per_image: int
    n_images: int
    many: float
    tags: list[str] | None = None  # one per SAE when the units are SAE latents (unit_stem)
    sae_hooks: list[str] | None = None  # the hook each SAE reads


def _name(site: Site, layer, unit) -> str:
    """A unit's name on the pages: ``L5 U1234``, or an SAE latent's ``L15 F123``."""
    return unit_stem(layer, unit, site.tags).replace("_", " ")


def _noun(site: Site) -> str:
    return "unit" if site.tags is None else "latent"


def _e(value) -> str:
    return html.escape(str(value))


def _page(site: Site, title: str, body: str, depth: int) -> str:
    up = "../" * depth
    nav = (f'<nav><a href="{up}index.html">units by images</a><a href="{up}by-score.html">by score</a>'
           f'<a href="{up}by-specificity.html">by specificity</a><a href="{up}by-layer.html">by layer</a>'
           f'<a href="{up}images.html">images</a></nav>')
    where = "; ".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in site.provenance.items() if v is not None)
    shown = (f"<code>{_e(site.hook)}</code> activations" if site.tags is None else "SAE latents (<code>"
             "hook_sae_acts_post</code>) of the SAEs on " + ", ".join(f"<code>{_e(h)}</code> ({_e(t)})" for t, h
                                                                    in zip(site.tags, site.sae_hooks)))
    foot = f"<footer>{where}{'; ' if where else ''}heatmaps and histograms: {shown}; made by tl_multimodal</footer>"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width">'
            f'<link rel="stylesheet" href="{up}assets/atlas.css"></head>\n<body>{nav}\n<h2>{_e(title)}</h2>\n'
            f'{body}\n{foot}<script src="{up}assets/atlas.js"></script></body></html>\n')


def _many_mark(site: Site, n: int) -> str:
    share = n / site.n_images
    if share < site.many:
        return ""
    return f' <span class="many" title="a top unit for {n} of {site.n_images} images">many: {share:.0%}</span>'


def _write(site: Site, name: str, text: str, written: list[str]) -> None:
    (site.out / name).write_text(text, encoding="utf-8")
    written.append(name)


# ------------------------------------------------------------------------------------------ index
def _index_pages(site: Site, written: list[str]) -> None:
    u = site.units
    n_pages = max(1, math.ceil(len(u) / site.units_per_page))
    for stem, what, keys, ascending in ORDERS:
        ordered = u.sort_values(keys, ascending=ascending, kind="stable", ignore_index=True)
        names = [f"{stem}.html" if p == 0 else f"{stem}-{p + 1}.html" for p in range(n_pages)]
        for p, name in enumerate(names):
            chunk = ordered.iloc[p * site.units_per_page:(p + 1) * site.units_per_page]
            links = " ".join(f"<b>{q + 1}</b>" if q == p else f'<a href="{n}">{q + 1}</a>' for q, n in enumerate(names))
            n = _noun(site)
            body = (f'<p>{len(u)} {n}s that are among the top {n}s of at least one of the {site.n_images} images, '
                    f"sorted by {_e(what)}; {n}s {p * site.units_per_page + 1}..{p * site.units_per_page + len(chunk)}"
                    f'.</p><p class="pages">pages: {links}</p>' + _controls() + _unit_rows(site, chunk)
                    + f'<p class="pages">pages: {links}</p>' + _legend(site))
            title = f"Atlas of {'units' if site.tags is None else 'SAE latents'}: by {what}"
            _write(site, name, _page(site, title + (f", page {p + 1}" if p else ""), body, 0),
                   written)


def _controls() -> str:
    return ('<div class="controls" hidden>filter this page: <input name="text" placeholder="token or target"> '
            'layer <input name="layer" size="3"> <label><input type="checkbox" name="interpretable"> interpretable'
            '</label> <label><input type="checkbox" name="specific"> not marked many</label> '
            '<span class="muted">(click a column heading to sort)</span></div>')


def _legend(site: Site) -> str:
    return (f'<p class="muted">images: how many images have the unit among their top units (share of all '
            f"{site.n_images}); score: attribution (gradient x activation, max over patches); specificity = "
            f"1 - share; <span class=\"many\">many</span>: a top unit for at least {site.many:.0%} of the images; "
            "interpretable: at least 7 of its top 10 decoded tokens are English words.</p>")


def _unit_rows(site: Site, chunk) -> str:
    layer, unit = ("layer", "unit") if site.tags is None else ("SAE", "latent")
    head = (f'<thead><tr><th data-sort="layer" class="num">{layer}</th><th data-sort="unit" class="num">{unit}</th>'
            '<th data-sort="images" class="num">images</th><th data-sort="score" class="num">mean score</th>'
            '<th data-sort="max" class="num">max score</th><th>top target</th>'
            '<th data-sort="specificity" class="num">specificity</th><th>interpretable</th>'
            "<th>decoded tokens</th></tr></thead>")
    index = {(int(l), int(u)): j for j, (l, u) in enumerate(zip(site.units["layer"], site.units["unit"]))}
    body = []
    for r in chunk.itertuples(index=False):
        j = index[int(r.layer), int(r.unit)]
        toks = tokens_html(site.decoding.tokens[j][:5])
        body.append(
            f'<tr data-layer="{r.layer}" data-unit="{r.unit}" data-images="{r.n_images}" data-score="{r.mean_score:.6g}" '
            f'data-max="{r.max_score:.6g}" data-specificity="{r.specificity:.6g}" '
            f'data-interpretable="{int(r.interpretable)}" data-many="{int(r.many)}">'
            f'<td class="num">{r.layer if site.tags is None else site.tags[r.layer]}</td>'
            f'<td class="num"><a href="{r.page}">{r.unit}</a></td>'
            f'<td class="num">{r.n_images} ({r.share:.0%}){_many_mark(site, r.n_images)}</td>'
            f'<td class="num">{r.mean_score:.4g}</td><td class="num">{r.max_score:.4g}</td>'
            f"<td>{_e(r.top_target)} <span class=\"muted\">({r.top_target_share:.0%})</span></td>"
            f'<td class="num">{r.specificity:.2f}</td><td>{"yes" if r.interpretable else "no"}</td><td>{toks}</td></tr>')
    return f'<table class="list units">{head}<tbody>{"".join(body)}</tbody></table>'


# ------------------------------------------------------------------------------------------ units
def _direction(site: Site, layer: int, unit: int) -> str:
    """What a unit's decoded tokens are the softmax of."""
    if site.tags is None:
        return f"softmax(W_U^T W_out[{layer}][{unit}])"
    return f"softmax(W_U^T W_dec[{unit}]) of the SAE on {_e(site.sae_hooks[layer])}"


def _histogram(values: torch.Tensor, marks: list[float], width: int = 360, height: int = 90, bins: int = 30) -> str:
    """An inline SVG histogram of ``values``, ``marks`` as red ticks under it."""
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(values.float(), bins=bins, min=lo, max=hi)
    top = float(counts.max()) or 1.0
    bw = width / bins
    bars = "".join(f'<rect x="{k * bw:.1f}" y="{height - c / top * height:.1f}" width="{bw - 1:.1f}" '
                   f'height="{c / top * height:.1f}" fill="#888"><title>{int(c)}</title></rect>'
                   for k, c in enumerate(counts.tolist()))
    ticks = "".join(f'<line x1="{(m - lo) / (hi - lo) * width:.1f}" x2="{(m - lo) / (hi - lo) * width:.1f}" '
                    f'y1="{height + 2}" y2="{height + 12}" stroke="#d00" stroke-width="2"/>' for m in marks)
    return (f'<svg width="{width}" height="{height + 30}" role="img" aria-label="histogram">{bars}{ticks}'
            f'<text x="0" y="{height + 26}" font-size="11">{lo:.3g}</text>'
            f'<text x="{width}" y="{height + 26}" font-size="11" text-anchor="end">{hi:.3g}</text></svg>')


def _colour_scale(site: Site, j: int, up: str) -> str:
    return (f'<span class="muted">{float(site.lo[j]):.3g}</span> <img src="{up}assets/colorbar.png" width="160" '
            f'height="10" alt="colour bar: blue negative, white zero, red positive"> <span class="muted">{float(site.hi[j]):.3g}</span>')


def _unit_pages(site: Site, written: list[str]) -> None:
    groups = dict(iter(site.rows.groupby(["layer", "unit"])))
    position = {i: k for k, i in enumerate(site.images["image_index"].tolist())}
    for j, r in enumerate(site.units.itertuples(index=False)):
        mine = groups[r.layer, r.unit].sort_values(["score", "image_index"], ascending=[False, True])  # as write_atlas
        targets = mine["target"].value_counts()
        target_rows = "".join(f"<tr><td>{_e(repr(t))}</td><td class='num'>{n}</td></tr>" for t, n in targets.items())
        figures = []
        for x in mine.head(site.images_per_unit).itertuples(index=False):
            i = int(x.image_index)
            stem = site.stems[i]
            figures.append(
                f'<figure><a href="../{image_page(stem)}"><img src="../{site.heat_files[i, r.layer, r.unit]}" '
                f'alt="{_name(site, r.layer, r.unit)} over image {_e(x.image_id)}" style="max-width: 256px"></a>'
                f"<figcaption>image <a href=\"../{image_page(stem)}\">{_e(x.image_id)}</a>: score {x.score:.4g}, "
                f"rank {x.rank}, top patch {x.patch} (boxed); target {_e(repr(x.target))}</figcaption></figure>")
        marks = [float(site.peak[position[int(i)], j]) for i in mine["image_index"].unique()]
        d = site.decoding
        body = (f"<p>A top {_noun(site)} for <b>{r.n_images}</b> of {site.n_images} images ({r.share:.0%})"
                f"{_many_mark(site, r.n_images)}; mean score {r.mean_score:.4g}, max {r.max_score:.4g}; "
                f"specificity {r.specificity:.2f}; interpretable: {'yes' if r.interpretable else 'no'}.</p>"
                f"<h3>Decoded tokens</h3><p>{probs_html(d.tokens[j], d.probs[j].tolist())}</p>"
                f'<p class="muted">{_direction(site, r.layer, r.unit)}: the tokens the {_noun(site)} writes towards, '
                "with their probabilities; \u2423 marks a leading space.</p>"
                f"<h3>Targets it was attributed to</h3><table class='list'><tr><th>target</th><th class='num'>"
                f"images</th></tr>{target_rows}</table>"
                f"<h3>Peak activation over all {site.n_images} images</h3>"
                f"{_histogram(site.peak[:, j], marks)}<p class='muted'>its maximum "
                f"{_e(site.hook) if site.tags is None else 'latent'} activation over "
                f"the patches of each image; red: the images where it is a top {_noun(site)}.</p>"
                f"<h3>Top images</h3><p>colour scale (this {_noun(site)}, all images): "
                f"{_colour_scale(site, j, '../')}</p>"
                f'<div class="grid">{"".join(figures)}</div>')
        title = (f"Unit {_name(site, r.layer, r.unit)}" if site.tags is None else
                 f"Latent {_name(site, r.layer, r.unit)} of the SAE on {site.sae_hooks[r.layer]}")
        _write(site, r.page, _page(site, title, body, 1), written)


# ------------------------------------------------------------------------------------------ images
def _image_pages(site: Site, written: list[str]) -> None:
    groups = dict(iter(site.rows.groupby("image_index")))
    column = {(int(l), int(u)): j for j, (l, u) in enumerate(zip(site.units["layer"], site.units["unit"]))}
    entries = []
    for im in site.images.itertuples(index=False):
        i = int(im.image_index)
        full, thumb = site.pictures[i]
        mine = groups[i].sort_values("rank").head(site.units_per_image)
        trs = []
        for x in mine.itertuples(index=False):
            j = column[int(x.layer), int(x.unit)]
            u = site.units.iloc[j]
            trs.append(
                f'<tr><td class="num">{x.rank}</td><td><a href="../{u.page}">{_name(site, x.layer, x.unit)}</a>'
                f"{_many_mark(site, int(u.n_images))}</td><td class='num'>{x.score:.4g}</td>"
                f"<td class='num'>{x.patch}</td><td class='num'>{u.n_images}</td>"
                f"<td>{tokens_html(site.decoding.tokens[j][:5])}</td>"
                f'<td><img src="../{site.heat_files[i, int(x.layer), int(x.unit)]}" '
                f'alt="{_name(site, x.layer, x.unit)} heatmap" '
                f'style="max-width: 256px"><br>{_colour_scale(site, j, "../")}</td></tr>')
        file = f"<code>{_e(im.file)}</code>" if im.file else "not recorded"
        body = (f'<div style="display: flex; gap: 24px; flex-wrap: wrap;"><a href="../{full}">'
                f'<img src="../{full}" alt="image {_e(im.image_id)}" style="max-width: 480px; max-height: 480px"></a>'
                f"<div><p><b>Caption</b> (greedy): {_e(im.caption)}</p><p><b>Target</b>: <code>{_e(repr(im.target))}"
                f"</code></p><p><b>Image file</b>: {file}</p><p><b>Image index</b> in the run: {i}</p></div></div>"
                f"<h3>Top {len(mine)} {_noun(site)}s</h3><table class='list'><tr><th class='num'>rank</th>"
                f"<th>{_noun(site)}</th>"
                "<th class='num'>score</th><th class='num'>top patch</th><th class='num'>images</th>"
                f"<th>decoded tokens</th><th>heatmap (top patch boxed)</th></tr>{''.join(trs)}</table>"
                f'<p class="muted">images: for how many of the {site.n_images} images the unit is a top unit; '
                '<span class="many">many</span> marks units that are not specific to this image.</p>')
        _write(site, im.page, _page(site, f"Image {im.image_id}", body, 1), written)
        entries.append(f'<figure><a href="{im.page}"><img src="{thumb}" alt="image {_e(im.image_id)}"></a>'
                       f"<figcaption><a href=\"{im.page}\">{_e(im.image_id)}</a>: {_e(im.caption)}</figcaption></figure>")
    _write(site, "images.html", _page(site, f"{site.n_images} images", f'<div class="grid">{"".join(entries)}</div>', 0),
           written)


def write_site(site: Site) -> list[str]:
    """Write every page, the stylesheet and the script; returns the pages (relative paths)."""
    (site.out / "assets" / "atlas.css").write_text(_CSS, encoding="utf-8")
    (site.out / "assets" / "atlas.js").write_text(_JS, encoding="utf-8")
    written: list[str] = []
    _index_pages(site, written)
    _unit_pages(site, written)
    _image_pages(site, written)
    return written
