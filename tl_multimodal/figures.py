"""Matplotlib figures of the analyses (apart from the HTML views in :mod:`tl_multimodal.viz`): a heatmap
over its image, several units' heatmaps on one image, an ablation curve."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from tl_multimodal.geometry import grid_to_image
from tl_multimodal.heatmaps import activation_mask, unit_grid_activations
from tl_multimodal.units import as_units
from tl_multimodal.viz import display_image
from tl_multimodal.vlm import VisionLM


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


def plot_unit_heatmaps(model: VisionLM, image, units, hook: str = "post", ncols: int = 4, q: float | None = 95.0,
                       object_mask=None, titles: Sequence[str] | None = None, panel_size: float = 3.0,
                       shared_scale: bool = False):
    """A matplotlib figure: the image, then each unit's heatmap over it (95th-percentile mask outlined).

    Args:
        model: The vision LM (:class:`~tl_multimodal.vlm.VisionLM`).
        image: One image (PIL or pixel tensor, as for :func:`unit_heatmap_view`).
        units: ``(layer, unit)`` pairs, e.g. ``attr.top_units(8).units()``.
        hook: The MLP hook read.
        ncols: Panels per row.
        q: Outline the pixels at or above this percentile (``None``: no outline).
        object_mask: An object mask in the image's frame, outlined in lime
            (:func:`~tl_multimodal.coco.coco_category_mask`).
        titles: One title per unit (default ``L{layer}.{unit}``).
        panel_size: Inches per panel.
        shared_scale: One colour range for all units (their joint min..max), so colours compare across
            panels (default: each panel its own range, as its colour bar shows).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    unit_list = [tuple(u) for u in as_units(model, units, batched=False, allow_empty=False).tolist()]
    titles = [f"L{l}.{u}" for l, u in unit_list] if titles is None else list(titles)
    if len(titles) != len(unit_list):
        raise ValueError(f"{len(titles)} titles for {len(unit_list)} units")
    pil, geometry, pixels = display_image(model, image)
    heatmaps = grid_to_image(unit_grid_activations(model, pixels, unit_list, hook)[0], geometry)
    finite = heatmaps[heatmaps.isfinite()]
    lo, hi = (float(finite.min()), float(finite.max())) if shared_scale and len(finite) else (None, None)
    n = len(unit_list) + 1
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols * 1.15, panel_size * nrows), squeeze=False)
    axes = axes.flatten()
    axes[0].imshow(pil)
    axes[0].set_title("image")
    axes[0].set_axis_off()
    for ax, hm, t in zip(axes[1:], heatmaps, titles):
        plot_heatmap(pil, hm, mask=activation_mask(hm, q) if q is not None else None, object_mask=object_mask,
                     title=t, ax=ax, vmin=lo, vmax=hi)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_ablation_curve(curve, ax=None):
    """An :class:`~tl_multimodal.ablation.AblationCurve`: mean relative change of p(c) vs k (log x), top-k
    against random (mean ± sd over seeds). Returns the Figure."""
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(5, 3.5))
    ax = ax if ax is not None else fig.add_subplot()
    top = curve.rel_change("top").mean(-1) * 100
    rand = curve.rel_change("random").mean(-1) * 100  # [k, seed]
    ax.plot(curve.ks, top, "o-", label="top-k attributed units")
    ax.plot(curve.ks, rand.mean(1), "s--", color="gray", label="random units, same layers")
    if rand.shape[1] > 1:
        ax.fill_between(curve.ks, rand.mean(1) - rand.std(1), rand.mean(1) + rand.std(1),
                        color="gray", alpha=0.25)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("units ablated (k)")
    ax.set_ylabel("mean change in p(c) (%)")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig
