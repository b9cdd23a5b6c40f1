"""A self-contained HTML report of one image's multimodal units: caption, target, top units, heatmaps.

:func:`write_report` captions the image greedily, attributes the first noun of that caption to every
MLP unit at every image position (:func:`~tl_multimodal.analysis.attribution.attribute`), keeps the top ``k``
units (:meth:`~tl_multimodal.analysis.attribution.Attribution.top_units`), decodes them through the
unembedding (:func:`~tl_multimodal.analysis.decoding.decode_units`, the paper's interpretability filter) and
draws each unit's activation over the image (:func:`~tl_multimodal.views.heatmap_view.unit_heatmap_view`). The page
needs no network: images are inline base64 PNGs and there is no JavaScript.

    write_report(model, Image.open("dog.jpg"), "dog.html", n_units=10)
    # or: tl-multimodal report dog.jpg --out dog.html --k 10
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor

from tl_multimodal._validate import check_int, check_number
from tl_multimodal.analysis.attribution import Attribution, attribute
from tl_multimodal.analysis.nouns import first_noun
from tl_multimodal.analysis.decoding import UnitDecoding, decode_units
from tl_multimodal.analysis.heatmaps import one_image
from tl_multimodal.analysis.probe import Probe
from tl_multimodal.analysis.units import sae_tags, unit_label
from tl_multimodal.views.heatmap_view import mark_patch, unit_heatmap_view
from tl_multimodal.views.tokens import probs_html
from tl_multimodal.views.html import png_data_uri
from tl_multimodal.models.geometry import CropGeometry
from tl_multimodal.models.projection import projection_id
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.model import sae_id
from tl_multimodal.sae.splice import as_saes

_CSS = """
body { font-family: sans-serif; margin: 16px; color: #222; }
table.units { border-collapse: collapse; }
table.units th, table.units td { border-bottom: 1px solid #ddd; padding: 4px 8px; vertical-align: middle; }
table.units td.tokens { max-width: 520px; text-align: left; }
table.units th { text-align: left; }
.many { background: #fde9c8; color: #7a4a00; border-radius: 3px; padding: 0 4px; }
table.units td.num { text-align: right; font-family: monospace; }
.muted { color: #666; font-size: 85%; }
"""


@dataclass(repr=False)
class UnitReport:
    """What a report shows (also returned by :func:`build_report` for use in a notebook).

    Attributes:
        caption: The model's greedy caption (after the prompt).
        target: The attributed token (first sub-token of the caption's first noun).
        noun: The noun found in the caption (None if the first word was used instead).
        attribution: The :class:`~tl_multimodal.analysis.attribution.Attribution` of the image.
        units: ``[k, 2]`` (layer, unit) of the top units, best first.
        scores: ``[k]`` their max-over-patches attribution.
        decoding: Their :class:`~tl_multimodal.analysis.decoding.UnitDecoding` (top 10 tokens).
        heatmaps: One PNG (PIL) per unit: its activation over the image.
        image: The image as displayed (PIL).
        html: The page.
    """

    caption: str
    target: str
    noun: str | None
    attribution: Attribution
    units: Tensor
    scores: Tensor
    decoding: UnitDecoding
    heatmaps: list[Image.Image]
    image: Image.Image
    html: str

    def to_dataframe(self):
        """One row per top unit: rank, layer, unit, score, tokens, interpretable."""
        import pandas as pd

        return pd.DataFrame({"rank": range(len(self.units)), "layer": self.units[:, 0].tolist(),
                             "unit": self.units[:, 1].tolist(), "score": self.scores.tolist(),
                             "tokens": [" ".join(t) for t in self.decoding.tokens],
                             "interpretable": self.decoding.interpretable.tolist()})

    def __repr__(self) -> str:
        return (f"UnitReport(caption={self.caption!r}, target={self.target!r}, {len(self.units)} units, "
                f"{int(self.decoding.interpretable.sum())} interpretable, {len(self.html) / 1e3:.0f} kB)")


def build_report(model: VisionLM, image, n_units: int = 10, prompt: str = "A picture of", max_new_tokens: int = 20,
                 hook: str = "pre", heatmap_hook: str = "post", max_size: int = 360, *,
                 probe: Probe | None = None, source: str | None = None, reference=None,
                 many: float = 0.25, sae=None) -> UnitReport:
    """Compute everything a report shows (see :func:`write_report`) without writing a file.

    Args:
        model: The vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`).
        image: One image: PIL, a file path, an array, or a pixel tensor ``[channel, h, w]``.
        n_units: Top units shown.
        prompt: Text after the image tokens.
        max_new_tokens: Most tokens of the greedy caption.
        hook: MLP hook the attribution scores (``"pre"``: as the paper).
        heatmap_hook: MLP hook whose activations the heatmaps show.
        max_size: Longest side of a heatmap panel in pixels.
        probe: A one-image :class:`~tl_multimodal.analysis.probe.Probe` to attribute instead of the
            caption's first noun (``prompt`` is then ignored).
        source: The image's file, named on the page (default: the PIL image's ``filename``, if any).
        reference: The rows of a dataset run (``load_rows(run)``: ``image_index``, ``layer``, ``unit``):
            each unit's count of reference images where it is a top unit is shown, and units that are
            for at least ``many`` of them are marked (they are not specific to this image).
        many: The share of the reference images above which a unit is marked.
        sae: An SAE or a list of them: the units are their latents ``(SAE index, latent)``, attributed
            (``attribute(sae=)``, ``hook`` and ``heatmap_hook`` unused), decoded through their decoder rows and
            heatmapped as latents, labelled ``L15.F123``; the page names each SAE (hook, path and
            :func:`~tl_multimodal.sae.model.sae_id`). ``reference`` is then a run made with the same SAE.

    Returns:
        A :class:`UnitReport` (``.html`` is the page).
    """
    check_int(n_units, "n_units")
    saes = None if sae is None else as_saes(model, sae)
    pil, pixels = one_image(model, image)
    emb = soft_prompts(model, pixels)
    attr = attribute(model, image_embed=emb, probe=probe, prompt=prompt, hook=hook, max_new_tokens=max_new_tokens,
                     sae=sae)
    top = attr.top_units(n_units, image_index=0)
    units = top.units()
    decoding = decode_units(model, units, n_tokens=10, sae=sae)
    view = unit_heatmap_view(model, pil if pil is not None else pixels, units, hook=heatmap_hook, image_embed=emb,
                             max_size=max_size, sae=sae)
    tags = None if saes is None else sae_tags([s.hook_name for s in saes])
    shown, panels = view.panels[0], view.panels[1:]
    caption = (attr.captions or [""])[0]
    found = first_noun(caption)
    noun = found[0] if found is not None else None
    target = attr.targets[0]

    counts, n_ref = _reference_counts(reference, many)
    grid_shape = tuple(model.vision.grid)
    bar = png_data_uri(view.colorbar)
    rows, marked = [], []
    for r, ((layer, unit), score, patch, toks, probs, ok, panel, cap) in enumerate(zip(
            units.tolist(), top.score.tolist(), top.patch.tolist(), decoding.tokens, decoding.probs.tolist(),
            decoding.interpretable.tolist(), panels, view.captions[1:])):
        geometry = (CropGeometry.from_data_config(model.vision.data_config, panel.size) if pil is not None
                    else CropGeometry.identity(panel.size))
        panel = mark_patch(panel, patch, grid_shape, geometry)
        marked.append(panel)
        n = (counts or {}).get((layer, unit), 0)
        ref = "" if counts is None else (
            f'<td class="num">{n} of {n_ref}' + (' <span class="many">many</span>' if n >= many * n_ref else "") + "</td>")
        lo_hi = cap[cap.rfind("(") + 1:-1].split(" .. ")
        rows.append(
            f'<tr class="unit-row" data-rank="{r}" data-layer="{layer}" data-unit="{unit}">'
            f'<td class="num">{r}</td><td class="num">{layer if tags is None else tags[layer]}</td>'
            f'<td class="num">{unit}</td>'
            f'<td class="num">{score:.4g}</td><td class="num">{patch}</td>{ref}'
            f'<td class="tokens">{probs_html(toks, probs)}</td>'
            f'<td>{"yes" if ok else "no"}</td>'
            f'<td><img src="{png_data_uri(panel)}" width="{panel.width}" height="{panel.height}" '
            f'alt="{unit_label(layer, unit, tags)} heatmap"/><br><span class="muted">{html.escape(lo_hi[0])}</span> '
            f'<img src="{bar}" width="120" height="10" alt="colour bar (jet)"/> '
            f'<span class="muted">{html.escape(lo_hi[-1])}</span></td></tr>')
    n_ok = int(decoding.interpretable.sum())
    crop_note = ('<p class="muted crop">The darkened border is the part of the image the encoder\'s centre crop cut '
                 "away: the model never saw it, and the heatmaps leave it out.</p>"
                 if view.cropped else "")
    grid = tuple(model.vision.grid)
    ref_head = "" if n_ref is None else "<th>top unit for</th>"
    ref_note = (f'<p class="muted">top unit for: of the {n_ref} reference images, how many have the unit among '
                f'their top units; <span class="many">many</span>: at least {many:.0%} of them (not specific to '
                "this image).</p>" if n_ref is not None else
                '<p class="muted">Pass <code>reference=load_rows(run)</code> (<code>--reference RUN</code>) to see '
                "which units are top units for many images of a dataset.</p>")
    file = source or getattr(image, "filename", None) or getattr(pil, "filename", None)
    provenance = (f'<p class="provenance muted">image file: <code>{html.escape(str(file) if file else "not given")}'
                  f"</code>; model: <code>{html.escape(str(model.cfg.model_name))}</code> + <code>"
                  f"{html.escape(str(model.vision.model_name))}</code>; projection: <code>"
                  f"{projection_id(model.projection)}</code>; " + (
                      f"attribution hook <code>{html.escape(hook)}</code>, heatmaps <code>{html.escape(heatmap_hook)}"
                      "</code>" if saes is None else "units: the latents of " + "; ".join(
                          f"SAE {t} on <code>{html.escape(s.hook_name)}</code> (<code>{html.escape(str(s.cfg.source))}"
                          f"</code>, id <code>{sae_id(s)}</code>)" for t, s in zip(tags, saes))) + "</p>")
    kind = "unit" if saes is None else "latent"
    direction = ("<code>softmax(W_U^T W_out[layer][unit])</code>" if saes is None else
                 "<code>softmax(W_U^T W_dec[latent])</code> (the latent's decoder row through the unembedding)")
    body = f"""
<h2>Multimodal units of one image</h2>
{provenance}
<div style="display: flex; gap: 24px; align-items: flex-start;">
<img src="{png_data_uri(shown)}" width="{shown.width}" height="{shown.height}" alt="image"/>
<div>
<p><b>Caption</b> (greedy): <span class="caption">{html.escape(prompt)} {html.escape(caption.strip())}</span></p>
<p><b>Target</b> <i>c</i>: <code class="target">{html.escape(repr(target))}</code>
(token id {int(attr.target_ids[0])}; the first sub-token of the caption's first noun
{html.escape(repr(noun)) if noun else "(none found: the first word)"});
its logit {float(attr.y[0]):.4g}</p>
<p class="muted">Attribution: <code>Z * dy_c/dZ</code> at <code>{html.escape(attr.hook)}</code>
for every {kind} at each of the {model.n_image_tokens} image positions ({grid[0]}x{grid[1]} grid); a {kind}'s
score is its maximum over patches (patch = where). Tokens: top 10 of
{direction}; interpretable = at least 7 of them are English words of
at least 3 letters ({n_ok} of {len(units)} here). Heatmaps: the {kind}'s
<code>{html.escape(heatmap_hook if saes is None else "hook_sae_acts_post")}</code>
activation over the patch grid, upsampled bilinearly onto the image (jet: blue low, red high, each
heatmap on its own scale, its ends written under it); the box marks the unit's top patch.</p>
{ref_note}
{crop_note}
</div></div>
<h3>Top {len(units)} {kind}s</h3>
<table class="units">
<tr><th>rank</th><th>{"layer" if saes is None else "SAE"}</th><th>{kind}</th><th>score</th><th>patch</th>{ref_head}
<th>top decoded tokens</th>
<th>interpretable?</th><th>heatmap</th></tr>
{chr(10).join(rows)}
</table>
{provenance}
"""
    page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>tl_multimodal report: '
            f"{html.escape(caption.strip())}</title><style>{_CSS}</style></head>\n<body>{body}</body></html>\n")
    return UnitReport(caption=caption, target=target, noun=noun, attribution=attr, units=units,
                      scores=top.score, decoding=decoding, heatmaps=marked, image=shown, html=page)


def _reference_counts(reference, many: float) -> tuple[dict | None, int | None]:
    """Per ``(layer, unit)``, the reference images where it is a top unit; and their number (None, None without)."""
    if reference is None:
        return None, None
    missing = [c for c in ("image_index", "layer", "unit") if c not in getattr(reference, "columns", ())]
    if missing:
        raise ValueError(f"reference must be a run's rows (load_rows(run)); missing columns {missing}")
    check_number(many, "many", minimum=0.0)
    n = reference.groupby(["layer", "unit"])["image_index"].nunique()
    return {(int(l), int(u)): int(c) for (l, u), c in n.items()}, int(reference["image_index"].nunique())


def write_report(model: VisionLM, image, path: str | Path, n_units: int = 10, prompt: str = "A picture of",
                 **kwargs) -> Path:
    """Write a self-contained HTML report of one image's top multimodal units.

    The page shows the image, the model's greedy caption, the target token (first noun), and a
    table of the top ``n_units`` units by attribution (layer, unit, score, patch, top 10 decoded tokens,
    the paper's interpretability filter) with each unit's activation heatmap over the image.
    Everything is inline (base64 PNGs, no scripts, no network).

    Args:
        model: The vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`).
        image: One image: PIL, a file path, or a pixel tensor ``[channel, h, w]``.
        path: The HTML file to write (parent folders are created).
        n_units: Top units shown.
        prompt: Text after the image tokens.
        **kwargs: Passed to :func:`build_report` (``max_new_tokens``, ``hook``, ``heatmap_hook``,
            ``max_size``, ``reference``, ``sae``: the units are then that SAE's latents).

    Returns:
        The path written.
    """
    report = build_report(model, image, n_units=n_units, prompt=prompt, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.html, encoding="utf-8")
    return path
