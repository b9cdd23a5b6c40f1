"""An atlas of a dataset's multimodal units: a static website made from a dataset runner's rows.

:func:`write_atlas` takes the rows of a :func:`~tl_multimodal.training.runner.run_attribution` run
(every image's top units; ``load_rows(run)``), the images and the model, and writes a folder that any
browser opens from ``file://`` with no server and no network:

* ``index.html`` (and ``index-2.html``, ...): the units, paginated, sorted by the number of images where
  each is a top unit; ``by-score.html``, ``by-specificity.html``, ``by-layer.html`` the same table in
  other orders. Each page filters and sorts in place with a small script; without JavaScript it is a
  plain table.
* ``units/L5_U1234.html``: one unit: its decoded tokens with probabilities, the targets it was
  attributed to, how often it is a top unit, a histogram of its peak activation over every image, and
  its top images with its heatmap over each (the top patch boxed). For a run made with an SAE
  (``sae=``) the units are its latents, on pages ``latents/L15_F123.html`` (latent 123 of the SAE on
  layer 15's hook), decoded and heatmapped as latents, the SAE named (path and id) on every page.
* ``images/<image id>.html``: one image: file, caption, target, its top units with heatmaps and links.
* ``img/``: each image full size and as a thumbnail; ``heat/``: the heatmaps (JPEG files, never inline).

The heatmaps are recomputed here (one forward pass per image up to the last layer needed; the runner
stores only each unit's top patch). The command line: ``tl-multimodal atlas RUN -o SITE``.

    rows = load_rows("runs/attr")
    atlas = write_atlas(model, rows, images, "site", provenance={"model": "offline"})
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from tl_multimodal._validate import check_int, check_number
from tl_multimodal.analysis.decoding import decode_units
from tl_multimodal.analysis.heatmaps import unit_grid_activations
from tl_multimodal.analysis.units import as_units, sae_tags
from tl_multimodal.models.geometry import CropGeometry, grid_to_image
from tl_multimodal.models.images import to_pil
from tl_multimodal.sae.model import sae_id
from tl_multimodal.sae.splice import saes_by_hook
from tl_multimodal.views import atlas_pages as pages
from tl_multimodal.views.heatmap_view import colorbar_image, mark_patch, overlay_heatmap

#: Columns :func:`write_atlas` reads from the runner's rows.
#: The heatmaps' colormap: diverging, zero white, on a symmetric range per unit.
CMAP = "RdBu_r"
#: Columns :func:`write_atlas` reads from the runner's rows.
ROW_COLUMNS = ("image_index", "image_id", "caption", "target", "rank", "layer", "unit", "patch", "score")


@dataclass(repr=False)
class Atlas:
    """What :func:`write_atlas` wrote.

    Attributes:
        out: The site's folder (open ``out / "index.html"``).
        units: One row per unit: layer, unit, n_images (images where it is a top unit), share (of all
            images), mean_score, max_score, top_target, specificity, many, interpretable, tokens,
            page (relative path).
        images: One row per image: image_index, image_id, caption, target, file, page.
        peak: ``[n_images, n_units]`` each unit's largest activation over the patches of each image
            (rows in :attr:`images` order, columns in :attr:`units` order): the histograms' data.
        pages: Every HTML page written (paths relative to ``out``).
        provenance: What every page names as its source (run, model, projection, data; the SAE and its id).
        kind: What the units are: ``"units"`` (MLP units) or ``"latents"`` (an SAE's).
    """

    out: Path
    units: Any
    images: Any
    peak: torch.Tensor
    pages: list[str]
    provenance: dict = field(default_factory=dict)
    kind: str = "units"

    def to_dataframe(self):
        """The unit index (a copy of :attr:`units`)."""
        return self.units.copy()

    def __repr__(self) -> str:
        n_many = int(self.units["many"].sum())
        return (f"Atlas({len(self.units)} {self.kind} ({n_many} top {self.kind} for many images), {len(self.images)} images, "
                f"{len(self.pages)} pages, out={str(self.out)!r})")


def unit_table(rows, n_images: int | None = None, many: float = 0.25):
    """Per unit, how often and how strongly it is a top unit, from the runner's rows.

    Args:
        rows: The runner's rows (``load_rows(run)``): ``image_index``, ``layer``, ``unit``, ``score``,
            ``target`` at least.
        n_images: Images in the run (default: those in ``rows``).
        many: A unit that is a top unit for at least this share of the images is marked ``many``
            (generic rather than specific to an image).

    Returns:
        A DataFrame, one row per ``(layer, unit)``, sorted by ``n_images`` then ``mean_score``
        (descending): ``n_images``, ``share = n_images / n_images_total``, ``mean_score``,
        ``max_score``, ``top_target`` (its most frequent target) and ``top_target_share``,
        ``specificity = 1 - share`` (1: top unit for one image only of many; 0: for every image) and
        ``many``.
    """
    _check_rows(rows)
    check_number(many, "many", minimum=0.0)
    total = int(rows["image_index"].nunique()) if n_images is None else check_int(n_images, "n_images")
    g = rows.groupby(["layer", "unit"], sort=False)
    table = g.agg(n_images=("image_index", "nunique"), mean_score=("score", "mean"),
                  max_score=("score", "max")).reset_index()
    mode = rows.groupby(["layer", "unit", "target"]).size().rename("n").reset_index()
    mode = mode.sort_values(["layer", "unit", "n", "target"], ascending=[True, True, False, True])
    mode = mode.drop_duplicates(["layer", "unit"])
    table = table.merge(mode.rename(columns={"target": "top_target"}), on=["layer", "unit"])
    table["top_target_share"] = table.pop("n") / table["n_images"]
    table["share"] = table["n_images"] / total
    table["specificity"] = 1.0 - table["share"]
    table["many"] = table["share"] >= many
    return table.sort_values(["n_images", "mean_score", "layer", "unit"], ascending=[False, False, True, True],
                             ignore_index=True)


def _check_rows(rows) -> None:
    missing = [c for c in ROW_COLUMNS if c not in getattr(rows, "columns", ())]
    if missing:
        raise ValueError(f"rows must be the runner's rows (load_rows(run)); missing columns {missing}")
    if len(rows) == 0:
        raise ValueError("rows is empty: the run holds no units")


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(value)).strip(".") or "_"


def _image_names(images) -> dict[int, str]:
    """image_index -> the file stem of its page and pictures: its id, made safe (index first if ids clash)."""
    stems = {int(i): _slug(v) for i, v in zip(images["image_index"], images["image_id"])}
    if len(set(stems.values())) < len(stems):
        stems = {i: f"{i}_{s}" for i, s in stems.items()}
    return stems


def _picture(images, index: int):
    try:
        image = images[index]
    except (KeyError, IndexError):
        raise ValueError(f"images has no image {index} (the rows name image_index {index})") from None
    return image


def _source_file(image) -> str:
    """The file an image came from ("" if none is known): a path, or a PIL image's ``filename``."""
    return str(image) if isinstance(image, (str, Path)) else str(getattr(image, "filename", "") or "")


def _save_pictures(pil: Image.Image, file: str, out: Path, stem: str, thumb: int) -> tuple[str, str]:
    """The full-size file (the original copied when it is a JPEG/PNG file) and a thumbnail; paths from ``out``."""
    src = Path(file) if file else None
    if src is not None and src.is_file() and src.suffix.lower() in (".jpg", ".jpeg", ".png"):
        full = f"img/{stem}{src.suffix.lower()}"
        shutil.copyfile(src, out / full)
    else:
        full = f"img/{stem}.png"
        pil.convert("RGB").save(out / full)
    small = pil.convert("RGB")
    small.thumbnail((thumb, thumb))
    small.save(out / f"img/{stem}_thumb.jpg", quality=85)
    return full, f"img/{stem}_thumb.jpg"


def _heatmap_picture(img: Image.Image, grid: torch.Tensor, data_config: dict, patch: int, lo: float,
                     hi: float) -> Image.Image:
    """The unit's patch grid over the (display-size) image, ``lo..hi`` on :data:`CMAP`, the top ``patch`` boxed."""
    geometry = CropGeometry.from_data_config(data_config, img.size)
    heat = overlay_heatmap(img, grid_to_image(grid.float(), geometry), cmap=CMAP, vmin=lo, vmax=hi)
    return mark_patch(heat, patch, tuple(grid.shape), geometry)


def write_atlas(model, rows, images: Mapping[int, Any] | Sequence[Any], out: str | Path, *,
                provenance: Mapping[str, Any] | None = None, units_per_page: int = 200, images_per_unit: int = 12,
                units_per_image: int = 10, n_tokens: int = 10, hook: str = "post", many: float = 0.25,
                thumb_size: int = 160, heatmap_size: int = 256, batch_size: int = 8,
                progress: bool = False, sae=None) -> Atlas:
    """Write the atlas site of a run's units (see the module docstring for its pages).

    Args:
        model: The vision LM the run attributed (:class:`~tl_multimodal.models.protocol.VisionLM`): it
            decodes the units and recomputes their activations for the heatmaps and histograms.
        rows: The runner's rows (``load_rows(run)``; columns :data:`ROW_COLUMNS`).
        images: The run's images by ``image_index`` (a mapping or a sequence): PIL images or paths.
        out: The site's folder (created; pages already there are replaced).
        provenance: Named on every page (e.g. run folder, model, projection id, data source).
        units_per_page: Rows of each index page.
        images_per_unit: Top images (by score) shown on a unit's page, with heatmaps.
        units_per_image: Top units shown on an image's page, with heatmaps.
        n_tokens: Decoded tokens per unit (10 for the paper's interpretability filter).
        hook: MLP hook the heatmaps and histograms show (``"post"``: the activation).
        many: Share of the images above which a unit is marked as a top unit for many images.
        thumb_size, heatmap_size: Longest side, in pixels, of the thumbnails and of the heatmaps.
        batch_size: Images per forward pass.
        progress: Show a progress bar.
        sae: The SAE (or list of SAEs) of a run made with one (``RunConfig.sae``, ``--sae``): the rows' units are
            then ``(SAE index, latent)``, decoded through each latent's decoder row, heatmapped and histogrammed
            from the latents (``hook`` unused), on pages ``latents/L15_F123.html`` (``L15``: the layer of the
            SAE's hook; ``SAE0``, ``SAE1``, ... when two SAEs share a layer). ``provenance`` gets ``sae`` (its
            path, or its hook) and ``sae_id`` (:func:`~tl_multimodal.sae.model.sae_id`) unless given.

    Returns:
        An :class:`Atlas`.

    Raises:
        ValueError: Rows that are not the runner's, units out of range for the model (or for ``sae``: rows
            of MLP units with an SAE, or of latents of a wider SAE), an image missing from ``images``,
            ``out`` a file.
    """
    for name, value in (("units_per_page", units_per_page), ("images_per_unit", images_per_unit),
                        ("units_per_image", units_per_image), ("n_tokens", n_tokens), ("thumb_size", thumb_size),
                        ("heatmap_size", heatmap_size), ("batch_size", batch_size)):
        check_int(value, name)
    units = unit_table(rows, many=many)
    saes = None if sae is None else saes_by_hook(model, sae)
    unit_pairs = torch.tensor(units[["layer", "unit"]].to_numpy(), dtype=torch.long)
    try:
        as_units(model, unit_pairs, batched=False, saes=saes)
    except ValueError as e:
        raise ValueError(f"rows: {e} (the rows of a run made with an SAE need its sae=; rows of MLP units "
                         "none)") from None
    tags = None if saes is None else sae_tags([s.hook_name for s in saes.values()])
    provenance = dict(provenance or {})
    if saes is not None:
        provenance.setdefault("sae", ", ".join(s.cfg.source or s.hook_name for s in saes.values()))
        provenance.setdefault("sae_id", ", ".join(sae_id(s) for s in saes.values()))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file, not a folder")
    for sub in ("units" if saes is None else "latents", "images", "img", "heat", "assets"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    per_image = rows.drop_duplicates("image_index").sort_values("image_index", ignore_index=True)
    order = [int(i) for i in per_image["image_index"]]
    stems = _image_names(per_image)
    column = {(int(l), int(u)): j for j, (l, u) in enumerate(unit_pairs.tolist())}
    decoding = decode_units(model, unit_pairs, n_tokens=n_tokens, sae=sae)
    units["interpretable"] = decoding.interpretable.numpy()
    units["tokens"] = [" ".join(repr(t) for t in toks) for toks in decoding.tokens]
    units["page"] = [pages.unit_page(l, u, tags) for l, u in unit_pairs.tolist()]

    top = rows.sort_values(["image_index", "rank"])
    shown_units = top[top["rank"] < units_per_image]
    best = rows.sort_values(["layer", "unit", "score", "image_index"], ascending=[True, True, False, True])
    shown_images = best.groupby(["layer", "unit"], sort=False).head(images_per_unit)
    needed = {(int(i), int(l), int(u)): int(p) for i, l, u, p in
              shown_units[["image_index", "layer", "unit", "patch"]].itertuples(index=False)}
    needed.update({(int(i), int(l), int(u)): int(p) for i, l, u, p in
                   shown_images[["image_index", "layer", "unit", "patch"]].itertuples(index=False)})

    from tqdm.auto import tqdm

    peak = torch.empty(len(order), len(unit_pairs))  # each unit's max over patches, per image
    lo = torch.full((len(unit_pairs),), float("inf"))
    hi = torch.full((len(unit_pairs),), float("-inf"))
    by_image: dict[int, list[tuple[int, int]]] = {}
    for i, l, u in needed:
        by_image.setdefault(i, []).append((l, u))
    grids, shown, pictures, files = {}, {}, {}, {}
    for start in tqdm(range(0, len(order), batch_size), desc="atlas", disable=not progress):
        batch = order[start:start + batch_size]
        sources = [_picture(images, i) for i in batch]
        pils = [to_pil(s, f"images[{i}]") for s, i in zip(sources, batch)]
        acts = unit_grid_activations(model, pils, unit_pairs, hook, batch_size=batch_size, sae=sae)  # [b, n, r, c]
        flat = acts.flatten(2)
        peak[start:start + len(batch)] = flat.amax(-1)
        lo = torch.minimum(lo, flat.amin((0, 2)))
        hi = torch.maximum(hi, flat.amax((0, 2)))
        for b, (i, pil, src) in enumerate(zip(batch, pils, sources)):
            files[i] = _source_file(src)
            pictures[i] = _save_pictures(pil, files[i], out, stems[i], thumb_size)
            shown[i] = pil.copy()
            shown[i].thumbnail((heatmap_size, heatmap_size))
            for l, u in by_image.get(i, []):
                grids[i, l, u] = acts[b, column[l, u]].clone()
    # one symmetric colour range per unit, over every image: its heatmaps compare across pages, zero is white
    bound = torch.maximum(torch.maximum(hi.abs(), lo.abs()), torch.full_like(hi, 1e-6))
    heat_files = {}
    for (i, l, u), patch in needed.items():
        j = column[l, u]
        name = f"heat/{stems[i]}_{pages.unit_stem(l, u, tags)}.jpg"
        _heatmap_picture(shown[i], grids[i, l, u], model.vision.data_config, patch, -float(bound[j]),
                         float(bound[j])).save(out / name, quality=85)
        heat_files[i, l, u] = name
    colorbar_image(CMAP, width=256, height=12).save(out / "assets" / "colorbar.png")

    import pandas as pd

    image_table = pd.DataFrame({
        "image_index": order, "image_id": per_image["image_id"].tolist(), "caption": per_image["caption"].tolist(),
        "target": per_image["target"].tolist(), "file": [files[i] for i in order],
        "page": [pages.image_page(stems[i]) for i in order]})
    site = pages.Site(out=out, units=units, images=image_table, rows=rows, decoding=decoding, peak=peak,
                      lo=-bound, hi=bound, pictures=pictures, heat_files=heat_files, stems=stems,
                      provenance=provenance, hook=hook, units_per_page=units_per_page,
                      images_per_unit=images_per_unit, units_per_image=units_per_image,
                      n_images=len(order), many=many, tags=tags,
                      sae_hooks=None if saes is None else [s.hook_name for s in saes.values()])
    written = pages.write_site(site)
    return Atlas(out=out, units=units, images=image_table, peak=peak, pages=written, provenance=dict(provenance),
                 kind="units" if saes is None else "latents")
