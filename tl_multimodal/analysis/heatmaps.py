"""Where in the image does a unit fire? Patch-grid heatmaps, 95th-percentile masks, IoU with objects.

A unit's activations at the image slots form the encoder's patch grid; :mod:`tl_multimodal.models.geometry`
lays the grid over the original image through timm's resize/crop. Pixels cut away by the crop were
never seen by the model: their heatmap value is NaN, and they are left out of percentiles and IoUs.
Object masks come from :mod:`tl_multimodal.data.coco`.

    hm = unit_heatmap(model, pil_image, layer=5, unit=1234)
    obj = coco_category_mask(coco, image_id, "dog")
    hm.iou(obj), hm.plot(obj)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from PIL import Image
from torch import Tensor

from tl_multimodal.models.geometry import CropGeometry, grid_to_image, input_geometry
from tl_multimodal.analysis.probe import Probe
from tl_multimodal.analysis.units import as_units, cache_units, mlp_hook, unit_axis, unit_label
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.splice import saes_by_hook

# ---------------------------------------------------------------------------------- masks and IoU
def activation_mask(heatmap: Float[Tensor, "... height width"], q: float = 95.0) -> Bool[Tensor, "... height width"]:
    """Pixels at or above the ``q``-th percentile of the heatmap (NaN pixels: never; excluded from the percentile)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be a percentile in [0, 100], got {q}")
    flat = heatmap.reshape(*heatmap.shape[:-2], -1).double()
    thr = torch.nanquantile(flat, q / 100, dim=-1, keepdim=True)
    return (flat >= thr).reshape(heatmap.shape)


def mask_iou(pred: Bool[Tensor, "height width"], target: Bool[Tensor, "height width"] | np.ndarray,
             valid: Bool[Tensor, "height width"] | None = None) -> float:
    """Intersection over union of two masks, counting only ``valid`` pixels; NaN if both are empty."""
    target = torch.as_tensor(np.asarray(target) if not isinstance(target, Tensor) else target).bool().cpu()
    pred = pred.bool().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"masks differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if valid is not None:
        valid = valid.bool().cpu()
        pred, target = pred & valid, target & valid
    union = (pred | target).sum().item()
    return float("nan") if union == 0 else (pred & target).sum().item() / union


# ---------------------------------------------------------------------------------- model -> grids
@torch.no_grad()
def unit_grid_activations(model: VisionLM, images=None, units=None, hook: str = "post", batch_size: int = 16, *,
                          image_features: Tensor | None = None, image_embed: Tensor | None = None,
                          probe: Probe | None = None, sae=None) -> Float[Tensor, "batch n_units rows cols"]:
    """Activations of MLP units (or SAE latents) at the image slots, as patch grids.

    Without ``probe`` the model runs on the image slots alone (``to_tokens("", image=True)``; text
    after the image cannot change them under causal attention), up to the last layer needed; with
    ``probe`` it runs on the probe's tokens and reads each row's image slots.

    Args:
        model: The vision LM.
        images, image_features, image_embed: The images (anything ``model.preprocess`` takes), their
            encoder features or their soft prompts: exactly one.
        units: ``(layer, unit)`` rows, ``[n, 2]`` for all images or ``[batch, n, 2]``.
        hook: ``"post"`` (the activation; default) or ``"pre"`` (what attribution scores).
        batch_size: Images per forward pass.
        probe: Run on these tokens (e.g. ``attr.probe``) instead of the image slots alone.
        sae: An SAE or a list of them: the units are ``(SAE index, latent)``, their latents' grids (``hook`` unused).
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    short = "sae" if saes else mlp_hook(model, hook)
    emb = soft_prompts(model, images, image_features, image_embed)
    if units is None:
        raise ValueError("pass units=: (layer, unit) rows")
    u = as_units(model, units, saes=saes)
    per_image = u if u.ndim == 3 else u[None].expand(len(emb), -1, -1)
    if per_image.shape[0] != len(emb):
        raise ValueError(f"per-image units for {per_image.shape[0]} images, but {len(emb)} images given")
    if probe is None:
        tokens = model.to_tokens("", image=True).expand(len(emb), -1)
        mask = model.image_mask(tokens)
    else:
        probe.check_batch(len(emb))
        probe.check_model(model)
        tokens, mask = probe.tokens.to(model.cfg.device), probe.image_mask
    layers = sorted(set(per_image[..., 0].flatten().tolist()))
    all_names, width = unit_axis(model, short, saes)
    names = [all_names[layer] for layer in layers]
    out = []
    for start in range(0, len(emb), batch_size):
        rows = slice(start, start + batch_size)
        cu = per_image[rows]
        if not layers:
            out.append(torch.zeros(len(cu), 0, model.n_image_tokens))
            continue
        stop = {} if saes else {"stop_at_layer": layers[-1] + 1}
        _, cache = cache_units(model, tokens[rows], emb[rows], names, saes, **stop)
        m = mask[rows].to(cache[names[0]].device)
        acts = torch.stack([cache[n][m].reshape(len(cu), -1, width).float().cpu() for n in names], 1)
        li = torch.tensor([layers.index(v) for v in cu[..., 0].flatten().tolist()]).reshape(cu.shape[:2])
        b = torch.arange(len(cu))[:, None]
        out.append(acts[b, li, :, cu[..., 1]])  # [b, n, patch]
    return torch.cat(out).reshape(len(emb), per_image.shape[1], *model.vision.grid)


def plot_heatmap(image: Image.Image | None, heatmap: Float[Tensor, "height width"], mask=None, object_mask=None,
                 alpha: float = 0.5, cmap: str = "jet", title: str | None = None, ax=None,
                 vmin: float | None = None, vmax: float | None = None):
    """Overlay a heatmap (original image coordinates) on its image; outline masks.

    Args:
        image: The original image (``None``: the heatmap alone).
        heatmap: ``[height, width]``; NaN pixels (cropped away) stay transparent.
        mask: The activation mask, outlined in white.
        object_mask: The object mask, outlined in lime.
        alpha, cmap: Heatmap opacity and colormap.
        title: Axes title.
        ax: Axes to draw on (default: a new figure).
        vmin, vmax: The colour range (default: the heatmap's finite min and max); the colour bar shows it.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(5, 5))
    ax = ax if ax is not None else fig.add_subplot()
    hm = heatmap.detach().float().cpu().numpy()
    if image is not None:
        if image.size != (hm.shape[1], hm.shape[0]):
            raise ValueError(f"heatmap is {hm.shape[1]}x{hm.shape[0]} but the image is {image.size[0]}x{image.size[1]}")
        ax.imshow(image)
    im = ax.imshow(np.ma.masked_invalid(hm), cmap=cmap, alpha=alpha if image is not None else 1.0, vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for m, color in ((mask, "white"), (object_mask, "lime")):
        if m is not None:
            ax.contour(np.asarray(m, dtype=float), levels=[0.5], colors=color, linewidths=1.5)
    if title:
        ax.set_title(title)
    ax.set_axis_off()
    fig.tight_layout()
    return fig



# ---------------------------------------------------------------------------------- results
@dataclass(repr=False)
class UnitHeatmap:
    """One unit's activation over one image.

    Attributes:
        layer, unit: The MLP unit.
        grid: ``[rows, cols]`` activations at the image patches.
        heatmap: ``[height, width]`` the grid upsampled onto the original image (NaN outside the crop).
        geometry: The resize/crop that maps the two.
        image: The original image, if given as PIL.
    """

    layer: int
    unit: int
    grid: Float[Tensor, "rows cols"]
    heatmap: Float[Tensor, "height width"]
    geometry: CropGeometry
    image: Image.Image | None = None

    def mask(self, q: float = 95.0) -> Bool[Tensor, "height width"]:
        """Pixels at or above the ``q``-th percentile of the (visible part of the) heatmap."""
        return activation_mask(self.heatmap, q)

    def iou(self, object_mask, q: float = 95.0) -> float:
        """IoU of :meth:`mask` with an object mask in original pixels, over the visible (cropped) area."""
        return mask_iou(self.mask(q), object_mask, valid=torch.isfinite(self.heatmap))

    def plot(self, object_mask=None, q: float = 95.0, ax=None):
        """The heatmap over the image, with the ``q``-th percentile mask (and the object) outlined."""
        return plot_heatmap(self.image, self.heatmap, mask=self.mask(q), object_mask=object_mask, ax=ax,
                            title=unit_label(self.layer, self.unit))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per patch: row, col, activation."""
        rows, cols = self.grid.shape
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        return pd.DataFrame({"row": r.flatten().tolist(), "col": c.flatten().tolist(),
                             "activation": self.grid.flatten().tolist()})

    def __repr__(self) -> str:
        (w, h), (rows, cols) = self.geometry.image_size, self.grid.shape
        return (f"UnitHeatmap(L{self.layer}.{self.unit}, {rows}x{cols} grid on a {w}x{h} image, "
                f"max {self.grid.max():.3g} at patch {divmod(int(self.grid.argmax()), cols)})")


def unit_heatmap(model: VisionLM, image, layer: int, unit: int, hook: str = "post", sae=None) -> UnitHeatmap:
    """The heatmap of MLP unit ``(layer, unit)`` on one image (PIL or a path: original coordinates;
    a pixel tensor ``[channel, h, w]`` or an array: the model-input frame); with ``sae``, of latent ``unit``
    of SAE ``layer`` (an index into ``sae`` when it is a list; 0 for one SAE)."""
    pil, pixels = one_image(model, image)
    grid = unit_grid_activations(model, pixels, [(layer, unit)], hook, sae=sae)[0, 0]
    geo = input_geometry(model, pil)
    return UnitHeatmap(layer, unit, grid, grid_to_image(grid, geo), geo, pil)


def one_image(model: VisionLM, image) -> tuple[Image.Image | None, Float[Tensor, "1 channel height width"]]:
    """One image, through the door once: its original (PIL, when given as PIL or a path) and its pixels."""
    from tl_multimodal.models.images import to_pil

    if isinstance(image, (list, tuple)) or (isinstance(image, (Tensor, np.ndarray)) and image.ndim == 4):
        if len(image) != 1:
            raise ValueError(f"pass one image, got {len(image)}")
        image = image[0]
    pil = to_pil(image) if isinstance(image, (Image.Image, str, Path)) else None
    return pil, model.preprocess([pil] if pil is not None else image)


@dataclass(repr=False)
class HeatmapIoUs:
    """IoU of each unit's ``q``-th percentile mask with the object mask, per image.

    Attributes:
        units: ``[batch, n, 2]`` (layer, unit) per image.
        iou: ``[batch, n]``.
        q: The percentile.
    """

    units: Int[Tensor, "batch n 2"]
    iou: Float[Tensor, "batch n"]
    q: float

    def to_dataframe(self) -> pd.DataFrame:
        b, n = self.iou.shape
        return pd.DataFrame({"image": np.repeat(np.arange(b), n), "layer": self.units[..., 0].flatten().tolist(),
                             "unit": self.units[..., 1].flatten().tolist(), "iou": self.iou.flatten().tolist()})

    def __repr__(self) -> str:
        return (f"HeatmapIoUs({self.iou.shape[0]} images x {self.iou.shape[1]} units, q={self.q:g}: "
                f"mean IoU {self.iou.nanmean():.3f})")


def heatmap_ious(model: VisionLM, images: Sequence[Image.Image], units, object_masks,
                 q: float = 95.0, hook: str = "post", batch_size: int = 16, sae=None) -> HeatmapIoUs:
    """IoU of unit heatmaps (at the ``q``-th percentile) with object masks, image by image.

    Args:
        model: The vision-prefixed model.
        images: Original PIL images (a pixel tensor: masks must then be in the input frame).
        units: ``[n, 2]`` for all images, or ``[batch, n, 2]`` (e.g. each image's top units, or
            ``patching.sample_matched_units`` of them as the baseline).
        object_masks: One ``[height, width]`` mask per image, in original pixels
            (:func:`~tl_multimodal.data.coco.coco_category_mask`).
        q: Percentile of the activation mask (METHOD.md: 95).
        hook: MLP hook (see :func:`unit_grid_activations`).
        batch_size: Images per forward pass.
        sae: An SAE or a list of them: the units are their latents (see :func:`unit_grid_activations`).
    """
    if len(object_masks) != len(images):
        raise ValueError(f"{len(object_masks)} object masks for {len(images)} images")
    grids = unit_grid_activations(model, images, units, hook, batch_size, sae=sae)  # [b, n, rows, cols]
    ious = torch.full(grids.shape[:2], float("nan"))
    for i, (grid, obj) in enumerate(zip(grids, object_masks)):
        hm = grid_to_image(grid, input_geometry(model, images[i]))
        masks = activation_mask(hm, q)
        valid = torch.isfinite(hm[0]) if len(hm) else None
        ious[i] = torch.tensor([mask_iou(m, obj, valid) for m in masks])
    u = as_units(model, units)
    return HeatmapIoUs(units=u if u.ndim == 3 else u[None].expand(len(images), -1, -1), iou=ious, q=q)
