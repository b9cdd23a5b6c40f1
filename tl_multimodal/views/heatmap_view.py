"""Patch-grid heatmaps over their image, as HTML with inline PNGs (no JavaScript; offline).

* :func:`unit_heatmap_view` - where on the image each unit fires (its activations at the image positions).
* :func:`patch_heatmap_view` - any patch-grid scores (activations, attributions, ...) over the image.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from tl_multimodal._validate import check_int, check_number
from tl_multimodal.analysis.heatmaps import one_image, unit_grid_activations
from tl_multimodal.analysis.units import sae_tags, unit_label, unit_list
from tl_multimodal.models.geometry import CropGeometry, grid_to_image
from tl_multimodal.models.protocol import VisionLM
from tl_multimodal.sae.splice import saes_by_hook
from tl_multimodal.views.html import HTMLView, png_data_uri


class HeatmapView(HTMLView):
    """Patch-grid heatmaps drawn over an image: inline PNGs in HTML (no JavaScript).

    Attributes:
        heatmaps: ``[n, height, width]`` the grids upsampled onto the image (NaN outside the crop).
        grids: ``[n, rows, cols]`` the patch grids.
        labels: One label per heatmap.
        panels: The panels as displayed (PIL): the plain image first when shown, then one overlay
            per heatmap.
        image: The image under the heatmaps (PIL, original frame), or None.
        captions: One caption per panel (label and colour range).
        colorbar: The colour bar (PIL), its end labels in ``colorbar_labels``.
        note: What the colours and the darkened border mean (lines of text).
    """

    def __init__(self, html: str, title: str, heatmaps: Tensor, grids: Tensor, labels: list[str],
                 panels: list[Image.Image], image: Image.Image | None, captions: list[str] | None = None,
                 colorbar: Image.Image | None = None, colorbar_labels: tuple[str, str] = ("low", "high"),
                 note: str = ""):
        super().__init__(html, title)
        self.heatmaps, self.grids, self.labels, self.panels, self.image = heatmaps, grids, labels, panels, image
        self.captions = [""] * len(panels) if captions is None else captions
        self.colorbar, self.colorbar_labels, self.note = colorbar, colorbar_labels, note

    @property
    def cropped(self) -> bool:
        """Whether the encoder's crop cut part of the image away (those pixels are NaN and drawn dark)."""
        return self.image is not None and not bool(torch.isfinite(self.heatmaps).all())

    def to_pil(self, labels: bool = True) -> Image.Image:
        """The panels side by side, on white (what :meth:`save` writes for ``.png``).

        Args:
            labels: Write each panel's caption under it, then the colour bar and the note on the
                crop (``False``: the panels alone).
        """
        w = sum(p.width for p in self.panels) + 4 * (len(self.panels) - 1)
        h = max(p.height for p in self.panels)
        if not labels:
            out = Image.new("RGB", (w, h), "white")
            for x, p in zip(_offsets(self.panels), self.panels):
                out.paste(p, (x, 0))
            return out
        from PIL import ImageDraw, ImageFont

        font = ImageFont.load_default(size=12)
        line = 16
        bar = self.colorbar
        notes = [n for n in self.note.split("\n") if n]
        out = Image.new("RGB", (w, h + line + 6 + (bar.height + line + 8 if bar else 0) + line * len(notes)), "white")
        draw = ImageDraw.Draw(out)
        for x, p, c in zip(_offsets(self.panels), self.panels, self.captions):
            out.paste(p, (x, 0))
            draw.text((x + p.width / 2, h + 3), c, fill="black", font=font, anchor="ma")
        y = h + line + 6
        if bar is not None:
            out.paste(bar, (4, y))
            lo, hi = self.colorbar_labels
            draw.text((4, y + bar.height + 2), lo, fill="black", font=font, anchor="la")
            draw.text((4 + bar.width, y + bar.height + 2), hi, fill="black", font=font, anchor="ra")
            y += bar.height + line + 8
        for n in notes:
            draw.text((4, y), n, fill="#444", font=font)
            y += line
        return out

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page, or the panels as one image if ``path`` ends in .png/.jpg."""
        path = Path(path)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            self.to_pil().save(path)
            return path
        return super().save(path)

    def __repr__(self) -> str:
        more = " ..." if len(self.labels) > 4 else ""
        return f"HeatmapView({len(self.labels)} heatmaps: {', '.join(self.labels[:4])}{more})"



def _colorize(heatmap: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """``[h, w]`` -> ``[h, w, 3]`` float RGB with the colormap's 256-entry table."""
    import matplotlib

    scale = (heatmap - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(heatmap)
    return matplotlib.colormaps[cmap](np.clip(np.nan_to_num(scale), 0, 1))[..., :3]


def overlay_heatmap(image: Image.Image | None, heatmap: Float[Tensor, "height width"], alpha: float = 0.5,
                    cmap: str = "jet", vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """A heatmap blended over its image (same size), as a PIL RGB image.

    ``out = (1 - alpha) * image + alpha * cmap((heatmap - vmin) / (vmax - vmin))``; NaN pixels (cut
    away by the crop, never seen by the model) show the image dimmed, or grey without an image.
    Without an image the colours are drawn opaque.

    Args:
        image: The image (``None``: the heatmap alone).
        heatmap: ``[height, width]``, in the image's frame.
        alpha: Heatmap opacity over the image.
        cmap: A matplotlib colormap name.
        vmin, vmax: Colour range (default: the heatmap's finite min and max).
    """
    hm = heatmap.detach().float().cpu().numpy()
    finite = np.isfinite(hm)
    if not finite.any():
        raise ValueError("the heatmap has no finite values")
    vmin = float(hm[finite].min()) if vmin is None else vmin
    vmax = float(hm[finite].max()) if vmax is None else vmax
    color = _colorize(hm, cmap, vmin, vmax)
    if image is None:
        rgb = np.where(finite[..., None], color, 0.8)
    else:
        if image.size != (hm.shape[1], hm.shape[0]):
            raise ValueError(f"heatmap is {hm.shape[1]}x{hm.shape[0]} but the image is {image.size[0]}x{image.size[1]}")
        base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
        rgb = np.where(finite[..., None], (1 - alpha) * base + alpha * color, 0.4 * base)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def mark_patch(image: Image.Image, patch: int, grid: tuple[int, int], geometry: CropGeometry) -> Image.Image:
    """``image`` (drawn in the frame of ``geometry``) with patch ``patch`` of the ``grid`` (rows, cols;
    patches numbered row by row) boxed in white and black; a copy.

    Raises:
        ValueError: A patch outside the grid, or an image of another size than the geometry's.
    """
    from PIL import ImageDraw

    rows, cols = (int(g) for g in grid)
    check_int(patch, "patch", minimum=0, maximum=rows * cols - 1)
    if tuple(image.size) != tuple(geometry.image_size):
        raise ValueError(f"the image is {image.size} but the geometry is for {geometry.image_size}")
    r, c = divmod(int(patch), cols)
    _, _, w, h = geometry.crop
    x0, y0 = geometry.to_original(c * w / cols, r * h / rows)
    x1, y1 = geometry.to_original((c + 1) * w / cols, (r + 1) * h / rows)
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline="white", width=3)
    draw.rectangle([x0 + 1, y0 + 1, x1 - 2, y1 - 2], outline="black", width=1)
    return out


def _display_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    w, h = size
    if max_size is None or max(w, h) <= max_size:
        return w, h
    s = max_size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _offsets(panels: Sequence[Image.Image], gap: int = 4) -> list[int]:
    """Left edge of each panel laid out side by side."""
    return [sum(p.width + gap for p in panels[:i]) for i in range(len(panels))]


def colorbar_image(cmap: str = "jet", width: int = 256, height: int = 12) -> Image.Image:
    """A horizontal colour bar of a matplotlib colormap, low on the left (PIL RGB)."""
    row = _colorize(np.linspace(0.0, 1.0, width), cmap, 0.0, 1.0)
    return Image.fromarray(np.round(np.repeat(row[None], height, 0) * 255).astype(np.uint8))


def _check_range(vmin, vmax) -> None:
    for name, v in (("vmin", vmin), ("vmax", vmax)):
        if v is not None:
            check_number(v, name)
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise ValueError(f"vmin must be below vmax, got vmin={vmin} vmax={vmax}")


def patch_heatmap_view(image: Image.Image | None, grids: Float[Tensor, "n rows cols"] | Sequence[Tensor],
                       labels: Sequence[str] | None = None, geometry: CropGeometry | None = None,
                       alpha: float = 0.5, cmap: str = "jet", max_size: int | None = 256,
                       shared_scale: bool = False, show_image: bool = True, title: str | None = None,
                       vmin: float | None = None, vmax: float | None = None) -> HeatmapView:
    """Patch-grid scores (unit activations, attributions, ...) upsampled onto an image, as HTML.

    Each grid goes through :func:`~tl_multimodal.analysis.heatmaps.grid_to_image` (bilinear, in the model's
    input frame, read off at the original pixels through the resize/crop of ``geometry``) and is
    blended over the image (:func:`overlay_heatmap`); panels are inline base64 PNGs, each captioned
    with its label and value range, followed by a colour bar and a note on what the colours and a
    darkened border (the part of the image the encoder's centre crop cut away) mean.

    Args:
        image: The original image (``None``: heatmaps alone, in the input frame of ``geometry``).
        grids: ``[n, rows, cols]`` (or ``[rows, cols]``, or a list of grids).
        labels: One caption per grid (default ``"0"``, ``"1"``, ...).
        geometry: Where the model input sits in ``image`` (``CropGeometry.from_data_config(
            model.vision.data_config, image.size)``); default: the image *is* the model input.
        alpha, cmap: Heatmap opacity and matplotlib colormap.
        max_size: Longest side of a displayed panel in pixels (``None``: full size).
        shared_scale: One colour range for all grids, their joint min..max (default: each its own
            min..max, so colours compare only within a panel).
        show_image: Put the plain image first.
        title: Heading above the panels.
        vmin, vmax: A fixed colour range for all grids (either one alone fixes that end of the shared
            range; values outside take the end colours).

    Returns:
        A :class:`HeatmapView`; ``.heatmaps`` holds the upsampled grids at full size.
    """
    g = torch.stack([torch.as_tensor(x) for x in grids]) if not isinstance(grids, Tensor) else grids
    g = g[None] if g.ndim == 2 else g
    if g.ndim != 3 or g.shape[0] == 0:
        raise ValueError(f"grids must be [n, rows, cols] (or one [rows, cols] grid), got shape {tuple(g.shape)}")
    g = g.detach().float().cpu()
    labels = [str(i) for i in range(len(g))] if labels is None else [str(s) for s in labels]
    if len(labels) != len(g):
        raise ValueError(f"{len(labels)} labels for {len(g)} grids")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_range(vmin, vmax)
    if geometry is None:
        if image is None:
            raise ValueError("pass the image or a geometry (the heatmap needs a frame)")
        geometry = CropGeometry.identity(image.size)
    elif image is not None and tuple(geometry.image_size) != tuple(image.size):
        raise ValueError(f"the geometry is for a {geometry.image_size} image but the image is {image.size}")
    heatmaps = grid_to_image(g, geometry)  # [n, h, w]
    finite = heatmaps[torch.isfinite(heatmaps)]
    shared = shared_scale or vmin is not None or vmax is not None
    lo, hi = None, None
    if shared and len(finite):
        lo = float(finite.min()) if vmin is None else float(vmin)
        hi = float(finite.max()) if vmax is None else float(vmax)
        if not lo < hi and (vmin is not None or vmax is not None):
            raise ValueError(f"the colour range is empty ({lo:.3g} .. {hi:.3g}): pass both vmin and vmax")
    size = _display_size(geometry.image_size, max_size)
    panels, captions = [], []
    if show_image and image is not None:
        plain = image.convert("RGB").resize(size, Image.BILINEAR) if size != image.size else image.convert("RGB")
        panels.append(plain)
        captions.append("image")
    for hm, label in zip(heatmaps, labels):
        full = overlay_heatmap(image, hm, alpha=alpha, cmap=cmap, vmin=lo, vmax=hi)
        panels.append(full.resize(size, Image.BILINEAR) if size != full.size else full)
        rng = hm[torch.isfinite(hm)]
        captions.append(f"{label} ({float(rng.min()):.3g} .. {float(rng.max()):.3g})")
    title = title or f"{len(g)} patch heatmaps"
    bar = colorbar_image(cmap, width=min(256, max(64, size[0])))
    ends = (f"{lo:.3g}", f"{hi:.3g}") if lo is not None else ("each panel's min", "its max")
    notes = [f"{cmap}: {ends[0]} (left) .. {ends[1]} (right)"
             + ("; one colour scale for all panels" if lo is not None else
                "; each panel has its own scale (shared_scale=True for one scale)")]
    if image is not None and not torch.isfinite(heatmaps[0]).all():
        notes.append("darkened border: cut away by the encoder's centre crop (the model saw only the "
                     f"{geometry.crop[2]}x{geometry.crop[3]} centre of the resized image)")
    note = "\n".join(notes)
    items = "\n".join(
        f'<figure style="margin: 4px;"><img src="{png_data_uri(p)}" width="{p.width}" height="{p.height}" '
        f'alt="{html.escape(c)}" style="image-rendering: auto;"/>'
        f'<figcaption style="font-family: monospace; font-size: 80%; text-align: center;">{html.escape(c)}'
        "</figcaption></figure>" for c, p in zip(captions, panels))
    legend = (f"<div class='colorbar' style='font-size: 80%; display: flex; align-items: center; gap: 6px;'>"
              f'<span>{html.escape(ends[0])}</span><img src="{png_data_uri(bar)}" width="{bar.width}" '
              f'height="{bar.height}" alt="colour bar ({html.escape(cmap)})"/><span>{html.escape(ends[1])}</span></div>'
              + "".join(f"<div class='note' style='font-size: 80%; color: #555;'>{html.escape(n)}</div>" for n in notes))
    body = (f"<div><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
            f"<div style='display: flex; flex-wrap: wrap; align-items: flex-start;'>{items}</div>{legend}</div>")
    return HeatmapView(body, title, heatmaps, g, labels, panels, image, captions=captions, colorbar=bar,
                       colorbar_labels=ends, note=note)


def display_image(model: VisionLM, image) -> tuple[Image.Image, CropGeometry, Tensor]:
    """The image to draw on, its geometry and its pixels: PIL originals (or paths) as they are, pixel
    tensors de-normalised."""
    pil, pixels = one_image(model, image)
    if pil is not None:
        return pil, CropGeometry.from_data_config(model.vision.data_config, pil.size), pixels
    _, pixels = one_image(model, image)
    cfg = model.vision.data_config
    mean = torch.tensor(cfg.get("mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(cfg.get("std", (1.0, 1.0, 1.0)))[:, None, None]
    rgb = (pixels[0].float().cpu() * std + mean).clamp(0, 1)
    pil = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return pil, CropGeometry.identity(pil.size), pixels


def unit_heatmap_view(model: VisionLM, image, units, hook: str = "post", *, image_embed: Tensor | None = None,
                      sae=None, **kwargs) -> HeatmapView:
    """Where on the image each unit fires: its activations at the image positions, over the image.

    Args:
        model: The vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`).
        image: One image: PIL (drawn in its original frame, through timm's resize/crop), or a pixel
            tensor ``[channel, h, w]`` (de-normalised with the encoder's mean/std, the input frame).
        units: ``(layer, unit)`` pairs (a list or an ``[n, 2]`` tensor).
        hook: The MLP hook read (see :func:`~tl_multimodal.analysis.heatmaps.unit_grid_activations`).
        image_embed: The image's soft prompts, if already made (the image is then not encoded again).
        sae: An SAE or a list of them: the units are ``(SAE index, latent)`` and the panels their latents
            (``hook`` unused), labelled ``L15.F123`` (:func:`~tl_multimodal.analysis.units.sae_tags`).
        **kwargs: Passed to :func:`patch_heatmap_view` (alpha, cmap, max_size, shared_scale, ...).

    Returns:
        A :class:`HeatmapView` (one panel per unit, after the plain image).
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    pairs = unit_list(model, units, saes)
    pil, geometry, pixels = display_image(model, image)
    grids = unit_grid_activations(model, None if image_embed is not None else pixels, pairs, hook,
                                  image_embed=image_embed, sae=sae)[0]
    tags = None if saes is None else sae_tags([s.hook_name for s in saes.values()])
    labels = [unit_label(l, u, tags) for l, u in pairs]
    what = f"{hook} of {len(labels)} units" if saes is None else f"{len(labels)} SAE latents"
    kwargs.setdefault("title", f"{what} over the patch grid {tuple(model.vision.grid)}")
    return patch_heatmap_view(pil, grids, labels, geometry, **kwargs)
