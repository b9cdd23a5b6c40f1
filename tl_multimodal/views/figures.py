"""Matplotlib figures of the analyses (the HTML views are :mod:`tl_multimodal.views.heatmap_view` and
:mod:`tl_multimodal.views.tokens`): a heatmap over its image, several units' heatmaps on one image, an
ablation curve."""

from __future__ import annotations

import math
from typing import Sequence

from tl_multimodal.models.geometry import grid_to_image
from tl_multimodal.analysis.heatmaps import activation_mask, plot_heatmap, unit_grid_activations
from tl_multimodal.analysis.units import unit_label, unit_list
from tl_multimodal.views.heatmap_view import display_image
from tl_multimodal.models.protocol import VisionLM


def plot_unit_heatmaps(model: VisionLM, image, units, hook: str = "post", ncols: int = 4, q: float | None = 95.0,
                       object_mask=None, titles: Sequence[str] | None = None, panel_size: float = 3.0,
                       shared_scale: bool = False):
    """A matplotlib figure: the image, then each unit's heatmap over it (95th-percentile mask outlined).

    Args:
        model: The vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`).
        image: One image (PIL or pixel tensor, as for :func:`unit_heatmap_view`).
        units: ``(layer, unit)`` pairs, e.g. ``attr.top_units(8).units()``.
        hook: The MLP hook read.
        ncols: Panels per row.
        q: Outline the pixels at or above this percentile (``None``: no outline).
        object_mask: An object mask in the image's frame, outlined in lime
            (:func:`~tl_multimodal.data.coco.coco_category_mask`).
        titles: One title per unit (default ``L{layer}.{unit}``).
        panel_size: Inches per panel.
        shared_scale: One colour range for all units (their joint min..max), so colours compare across
            panels (default: each panel its own range, as its colour bar shows).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    pairs = unit_list(model, units)
    titles = [unit_label(l, u) for l, u in pairs] if titles is None else list(titles)
    if len(titles) != len(pairs):
        raise ValueError(f"{len(titles)} titles for {len(pairs)} units")
    pil, geometry, pixels = display_image(model, image)
    heatmaps = grid_to_image(unit_grid_activations(model, pixels, pairs, hook)[0], geometry)
    finite = heatmaps[heatmaps.isfinite()]
    lo, hi = (float(finite.min()), float(finite.max())) if shared_scale and len(finite) else (None, None)
    n = len(pairs) + 1
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
