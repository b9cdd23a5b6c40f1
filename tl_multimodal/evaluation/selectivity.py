"""Why top units' heatmaps can miss the object: how spread their activation is, and how generic the units are.

- :func:`unit_spread`: per image and unit, how its activation over the patch grid is spread: the
  normalised entropy of its activation above its own minimum (1: the same at every patch, 0: one
  patch), and the share of that mass in its top ``top_share`` of patches (the region a 95th-percentile
  heatmap keeps; ``top_share`` of the mass when flat).
- :func:`generic_units`: how often an image's top units are also top units of images with another
  target (a unit that is top for unrelated images is about the model, not the image): the pairwise
  overlap of top-unit sets and each unit's frequency among the other images.
- :func:`drop_units` and :func:`rerank`: rankings without the generic units, or with a
  spatial-selectivity term, for :func:`~tl_multimodal.evaluation.controls.specificity_controls`.
- :func:`iou_ceiling`: the best IoU a mask of a fixed share of the image can reach with each object
  mask (a 95th-percentile mask covers 5%; a large object caps its IoU far below 1).

    spread = unit_spread(model, pixels, top)        # top: [n_images, n_units, 2]
    gen = generic_units(top, probe.target_ids.tolist())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_multimodal._validate import check_number
from tl_multimodal.analysis.heatmaps import unit_grid_activations
from tl_multimodal.models.protocol import VisionLM


def _check_ranked(ranked, name: str = "ranked") -> Tensor:
    if not isinstance(ranked, Tensor) or ranked.ndim != 3 or ranked.shape[-1] != 2:
        raise ValueError(f"{name} must be a [n_images, n_units, 2] tensor of (layer, unit) rows")
    return ranked


@dataclass(repr=False)
class UnitSpread:
    """How spread each unit's activation is over the patches (:func:`unit_spread`).

    Attributes:
        units: ``[n_images, n_units, 2]`` the units.
        entropy: ``[n_images, n_units]`` normalised entropy of ``a - min(a)`` over the patches, in [0, 1]
            (NaN for a unit that is the same at every patch).
        top_mass: ``[n_images, n_units]`` share of ``a - min(a)`` in the unit's top ``n_top`` patches.
        n_top: Patches counted in ``top_mass``.
        n_patches: Patches of the grid.
    """

    units: Int[Tensor, "n_images n_units 2"]
    entropy: Float[Tensor, "n_images n_units"]
    top_mass: Float[Tensor, "n_images n_units"]
    n_top: int
    n_patches: int

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (image, unit): image, rank, layer, unit, entropy, top_mass."""
        b, n = self.entropy.shape
        return pd.DataFrame({"image": np.repeat(np.arange(b), n), "rank": np.tile(np.arange(n), b),
                             "layer": self.units[..., 0].flatten().numpy(),
                             "unit": self.units[..., 1].flatten().numpy(),
                             "entropy": self.entropy.flatten().numpy(), "top_mass": self.top_mass.flatten().numpy()})

    def __repr__(self) -> str:
        b, n = self.entropy.shape
        return (f"UnitSpread({b} images x {n} units: entropy {self.entropy.nanmean():.3f} (1 = flat), "
                f"mass in the top {self.n_top} of {self.n_patches} patches {self.top_mass.nanmean():.3f} "
                f"(flat: {self.n_top / self.n_patches:.3f}))")


def spread_of_grids(grids: Float[Tensor, "... rows cols"], n_top: int,
                    ) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """Normalised entropy and top-``n_top`` mass share of ``a - min(a)`` over each grid's cells."""
    a = grids.flatten(-2).double()
    a = a - a.amin(-1, keepdim=True)
    total = a.sum(-1, keepdim=True)
    p = a / total
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    entropy = (-plogp.sum(-1) / math.log(a.shape[-1])).float()
    top = (a.topk(n_top, dim=-1).values.sum(-1) / total[..., 0]).float()
    flat = total[..., 0] == 0
    return entropy.masked_fill(flat, float("nan")), top.masked_fill(flat, float("nan"))


def unit_spread(model: VisionLM, images=None, units: Int[Tensor, "n_images n_units 2"] | None = None, *,
                image_embed: Tensor | None = None, top_share: float = 0.05, hook: str = "post",
                batch_size: int = 16) -> UnitSpread:
    """How spread each image's units' activations are over its patches (module docstring).

    Args:
        model: The vision LM.
        images, image_embed: The images (anything ``model.preprocess`` takes) or their soft prompts.
        units: Per image, its ``(layer, unit)`` rows.
        top_share: Share of the patches counted as the top (rounded up; 0.05: a 95th-percentile heatmap).
        hook: The MLP hook (:func:`~tl_multimodal.analysis.heatmaps.unit_grid_activations`).
        batch_size: Images per forward pass.
    """
    units = _check_ranked(units, "units")
    top_share = check_number(top_share, "top_share", minimum=0.0)
    if not 0 < top_share <= 1:
        raise ValueError(f"top_share must be in (0, 1], got {top_share}")
    grids = unit_grid_activations(model, images, units, hook, batch_size, image_embed=image_embed)
    n_patches = grids.shape[-1] * grids.shape[-2]
    n_top = math.ceil(top_share * n_patches)
    entropy, top = spread_of_grids(grids, n_top)
    return UnitSpread(units=units.clone(), entropy=entropy, top_mass=top, n_top=n_top, n_patches=n_patches)


@dataclass(repr=False)
class GenericUnits:
    """How often an image's top units are top units of images with another target (:func:`generic_units`).

    Attributes:
        frequency: ``[n_images, n_units]`` share of the images with another target that have the unit
            among their top units too.
        generic: ``[n_images, n_units]`` ``frequency >= min_share``.
        overlap: ``[n_images, n_images]`` share of image ``i``'s top units among image ``j``'s (NaN on the
            diagonal and for pairs with the same target).
        min_share: The threshold of ``generic``.
        common: The most common units: (layer, unit, number of images with it among their top units).
    """

    frequency: Float[Tensor, "n_images n_units"]
    generic: Bool[Tensor, "n_images n_units"]
    overlap: Float[Tensor, "n_images n_images"]
    min_share: float
    common: list[tuple[int, int, int]]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (image, rank): frequency, generic."""
        b, n = self.frequency.shape
        return pd.DataFrame({"image": np.repeat(np.arange(b), n), "rank": np.tile(np.arange(n), b),
                             "frequency": self.frequency.flatten().numpy(), "generic": self.generic.flatten().numpy()})

    def __repr__(self) -> str:
        top = ", ".join(f"L{l}.{u} ({c})" for l, u, c in self.common[:5])
        return (f"GenericUnits({self.frequency.shape[0]} images x {self.frequency.shape[1]} units: mean overlap of two "
                f"images' top units (other targets) {np.nanmean(self.overlap.numpy()):.1%}; generic (top for >= "
                f"{self.min_share:.0%} of images with other targets): {self.generic.float().mean():.1%}; "
                f"most common: {top})")


def generic_units(ranked: Int[Tensor, "n_images n_units 2"], targets: Sequence, min_share: float = 0.25,
                  ) -> GenericUnits:
    """Which of each image's top units are also top units of images with another target.

    Args:
        ranked: Each image's top units.
        targets: Each image's target (token string or id); images with the same target are not compared.
        min_share: A unit is generic when at least this share of the images with another target have it.
    """
    ranked = _check_ranked(ranked)
    targets = list(targets)
    n = len(ranked)
    if len(targets) != n:
        raise ValueError(f"targets: {len(targets)} for {n} images")
    if not 0 < check_number(min_share, "min_share", minimum=0.0) <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    sets = [set(map(tuple, r)) for r in ranked.tolist()]
    other = torch.tensor([[targets[i] != targets[j] for j in range(n)] for i in range(n)])
    freq = torch.full(ranked.shape[:2], float("nan"))
    for i, row in enumerate(ranked.tolist()):
        js = other[i].nonzero()[:, 0].tolist()
        if js:
            freq[i] = torch.tensor([sum(tuple(u) in sets[j] for j in js) / len(js) for u in row])
    overlap = torch.tensor([[len(sets[i] & sets[j]) / len(sets[i]) if other[i, j] else float("nan")
                             for j in range(n)] for i in range(n)])
    counts: dict[tuple[int, int], int] = {}
    for s in sets:
        for u in s:
            counts[u] = counts.get(u, 0) + 1
    common = sorted(((l, u, c) for (l, u), c in counts.items()), key=lambda t: (-t[2], t[0], t[1]))
    return GenericUnits(frequency=freq, generic=freq >= min_share, overlap=overlap, min_share=min_share,
                        common=common[:20])


def drop_units(ranked: Int[Tensor, "n_images n_candidates 2"], drop: Bool[Tensor, "n_images n_candidates"],
               n_units: int) -> Int[Tensor, "n_images n_units 2"]:
    """Each image's first ``n_units`` ranked units that are not dropped, best first.

    Raises:
        ValueError: An image has fewer than ``n_units`` units left (pass more candidates).
    """
    ranked = _check_ranked(ranked)
    if drop.shape != ranked.shape[:2]:
        raise ValueError(f"drop must be [n_images, n_candidates] = {tuple(ranked.shape[:2])}, got {tuple(drop.shape)}")
    kept = []
    for i in range(len(ranked)):
        rows = ranked[i][~drop[i]]
        if len(rows) < n_units:
            raise ValueError(f"image {i} has {len(rows)} units left after dropping, fewer than n_units={n_units}")
        kept.append(rows[:n_units])
    return torch.stack(kept)


def rerank(ranked: Int[Tensor, "n_images n_candidates 2"], scores: Float[Tensor, "n_images n_candidates"],
           n_units: int) -> Int[Tensor, "n_images n_units 2"]:
    """Each image's candidates ordered by ``scores`` (descending, ties in the old order), the first ``n_units``."""
    ranked = _check_ranked(ranked)
    if scores.shape != ranked.shape[:2] or not torch.isfinite(scores).all():
        raise ValueError(f"scores must be finite, [n_images, n_candidates] = {tuple(ranked.shape[:2])}")
    if not 1 <= n_units <= ranked.shape[1]:
        raise ValueError(f"n_units must be in [1, {ranked.shape[1]}], got {n_units}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n_units]
    return torch.gather(ranked, 1, order[..., None].expand(-1, -1, 2))


def iou_ceiling(object_masks: Sequence[Tensor | np.ndarray], share: float = 0.05) -> Float[np.ndarray, "n"]:
    """The best IoU any mask covering ``share`` of an image can reach with each object mask.

    A mask of area ``A`` and an object of area ``O`` overlap at most ``min(A, O)`` and their union is at
    least ``max(A, O)``, and a mask placed on (or inside) the object reaches that.
    """
    out = []
    for m in object_masks:
        m = np.asarray(m, dtype=bool)
        a, o = share * m.size, float(m.sum())
        out.append(min(a, o) / max(a, o) if max(a, o) > 0 else float("nan"))
    return np.asarray(out)
