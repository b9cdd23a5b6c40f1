"""Specificity controls: are an image's top units about the image, or would any large unit do?

Each image's own top-k units are compared with three control sets of the same size and layers:

- ``"other_image"``: the top-k units of another image whose target differs (seeded draw);
- ``"magnitude"``: per top unit, a unit of the same layer whose activation magnitude at the image
  positions (max over the image slots of ``|hook_post|``) is within ``rtol`` of the top unit's,
  not one of the image's own top units (no gradient, no target: "large units" as such);
- ``"random"``: random units of the same layers (:func:`~tl_multimodal.analysis.ablation.sample_matched_units`).

Each set is measured on each image with the image's own query: the relative change of p(c) when
the units are zero-ablated at the image positions (one value per k), the decoded-text similarity
of the interpretable units with the image's reference captions, and the heatmap IoU with the
image's object. Control values are averaged over ``n_draws`` seeded draws per image; means get
95% bootstrap intervals over images, and the specificity gap (own minus control) a paired one.

    ctl = specificity_controls(model, pixels, ranked, probe, ks=(10, 100), embed=embed,
                               reference_captions=refs, object_masks=masks)
    ctl                     # the table; ctl.to_dataframe() for the numbers
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.ablation import Ablator, sample_matched_units
from tl_multimodal.analysis.decoding import unit_texts
from tl_multimodal.analysis.heatmaps import heatmap_ious
from tl_multimodal.analysis.probe import Probe
from tl_multimodal.analysis.units import as_units, cache_units, mlp_hook, unit_axis
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.splice import saes_by_hook

ARMS = ("own", "other_image", "magnitude", "random")
ARM_NAMES = {"own": "own top units", "other_image": "other image's top units (other target)",
             "magnitude": "magnitude-matched units", "random": "random same-layer units"}


# ---------------------------------------------------------------------------------- the control sets
@torch.no_grad()
def unit_magnitudes(model: VisionLM, images=None, *, image_embed: Tensor | None = None, hook: str = "post",
                    batch_size: int = 16, sae=None) -> Float[Tensor, "batch layer unit"]:
    """Each unit's largest ``|activation|`` over the image slots, per image.

    The model runs on the image slots alone (``to_tokens("", image=True)``): under causal attention
    the text after the image cannot change them.

    Args:
        model: The vision LM.
        images, image_embed: The images (anything ``model.preprocess`` takes) or their soft prompts.
        hook: The MLP hook (:func:`~tl_multimodal.analysis.units.mlp_hook`); ``"post"`` is the scalar that
            multiplies the unit's output row.
        batch_size: Images per forward pass.
        sae: An SAE or a list of them: the magnitudes of their latents (``[batch, n_saes, d_sae]``).
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    short = "sae" if saes else mlp_hook(model, hook)
    emb = soft_prompts(model, images, image_embed=image_embed)
    tokens = model.to_tokens("", image=True)
    mask = model.image_mask(tokens)[0]
    names, _ = unit_axis(model, short, saes)
    out = []
    for chunk in emb.split(batch_size):
        _, cache = cache_units(model, tokens.expand(len(chunk), -1), chunk, names, saes)
        out.append(torch.stack([cache[n][:, mask.to(cache[n].device)].abs().amax(1).float().cpu() for n in names], 1))
    return torch.cat(out)


def other_image_units(ranked: Int[Tensor, "n_images n_units 2"], targets: Sequence,
                      generator: torch.Generator | None = None,
                      ) -> tuple[Int[Tensor, "n_images n_units 2"], Int[Tensor, "n_images"]]:
    """For each image, the ranked units of another image (drawn uniformly) whose target differs.

    An image whose target every other image shares has no donor: its donor is -1 and its row is
    its own units (a placeholder: :func:`specificity_controls` reports NaN for it).

    Args:
        ranked: Each image's units, best first.
        targets: Each image's target (token string or id).
        generator: Random generator of the draw.

    Returns:
        The donors' units (row ``i`` is ``ranked[donor[i]]``) and the donor of each image (-1: none).
    """
    if not isinstance(ranked, Tensor) or ranked.ndim != 3 or ranked.shape[-1] != 2:
        raise ValueError("ranked must be a [n_images, n_units, 2] tensor")
    targets = list(targets)
    if len(targets) != len(ranked):
        raise ValueError(f"{len(targets)} targets for {len(ranked)} images")
    donors = []
    for i, t in enumerate(targets):
        pool = [j for j, u in enumerate(targets) if u != t]
        donors.append(pool[int(torch.randint(len(pool), (), generator=generator))] if pool else -1)
    donors = torch.tensor(donors, dtype=torch.long)
    return ranked[torch.where(donors >= 0, donors, torch.arange(len(ranked)))].clone(), donors


def magnitude_matched_units(units: Int[Tensor, "n_images n_units 2"], magnitudes: Float[Tensor, "n_images layer unit"],
                            rtol: float = 0.1, generator: torch.Generator | None = None,
                            ) -> tuple[Int[Tensor, "n_images n_units 2"], Bool[Tensor, "n_images n_units"]]:
    """Per image and unit, a unit of the same layer with about the same activation magnitude.

    For unit ``u`` with magnitude ``m_u`` (from :func:`unit_magnitudes`), a unit ``v`` of the same
    layer is drawn uniformly among those with ``|m_v - m_u| <= rtol * m_u``, leaving out the
    image's own units and the units already drawn for it. Where none is left within the tolerance,
    the closest one (in ``|log m_v - log m_u|``) is taken and flagged.

    Returns:
        The matched units (same order and layers as ``units``) and ``[n_images, n_units]`` whether
        each match is within the tolerance.
    """
    if not isinstance(units, Tensor) or units.ndim != 3 or units.shape[-1] != 2:
        raise ValueError("units must be a [n_images, n_units, 2] tensor")
    if magnitudes.ndim != 3 or magnitudes.shape[0] != units.shape[0]:
        raise ValueError(f"magnitudes must be [n_images={units.shape[0]}, layer, unit], got {tuple(magnitudes.shape)}")
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    out, within = units.clone(), torch.zeros(units.shape[:2], dtype=torch.bool)
    for i, row in enumerate(units.tolist()):
        taken = {tuple(u) for u in row}
        for r, (layer, unit) in enumerate(row):
            m = magnitudes[i, layer].double()
            free = torch.ones_like(m, dtype=torch.bool)
            free[[u for (l, u) in taken if l == layer]] = False
            if not free.any():
                raise ValueError(f"layer {layer} has no unit left to match image {i}'s units")
            ok = free & ((m - m[unit]).abs() <= rtol * m[unit])
            if ok.any():
                cand = ok.nonzero()[:, 0]
                pick = int(cand[torch.randint(len(cand), (), generator=generator)])
                within[i, r] = True
            else:
                dist = (m.clamp_min(1e-30).log() - m[unit].clamp_min(1e-30).log()).abs()
                pick = int(dist.masked_fill(~free, float("inf")).argmin())
            out[i, r, 1] = pick
            taken.add((layer, pick))
    return out, within


# ---------------------------------------------------------------------------------- intervals
def bootstrap_interval(values: Float[np.ndarray, "n"], n_boot: int = 2000, seed: int = 0,
                       ) -> tuple[float, float, float, int]:
    """Mean of the finite values and its 95% percentile-bootstrap interval (``scipy.stats.bootstrap``).

    Returns:
        ``(mean, low, high, n)``; the interval is NaN with fewer than 2 finite values.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if len(v) < 2 or np.ptp(v) == 0:
        lo = hi = float(v[0]) if len(v) >= 2 else float("nan")
        return float(v.mean()), lo, hi, len(v)
    ci = stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=0.95, method="percentile",
                         random_state=np.random.default_rng(seed)).confidence_interval
    return float(v.mean()), float(ci.low), float(ci.high), len(v)


# ---------------------------------------------------------------------------------- the result
@dataclass(repr=False)
class SpecificityControls:
    """Own top units against the three controls, per measure (:func:`specificity_controls`).

    Attributes:
        values: ``{(measure, arm): [n_images]}`` per-image values (controls: mean over the draws;
            NaN where an image has no value, e.g. no interpretable unit or no object mask).
            Measures: ``"ablation k=K"`` (relative change of p(c)), ``"decoded similarity"``,
            ``"heatmap IoU"``; arms: :data:`ARMS`.
        n_draws: Draws of each control set.
        magnitude_within: Share of magnitude matches within ``rtol``.
        rtol: The magnitude tolerance.
        donors: ``[n_draws, n_images]`` the other image of each draw.
        units: ``{(arm, n): [n_draws, n_images, n, 2]}`` the unit sets measured (``n`` each k and
            ``n_units``; the own set has one "draw").
        n_boot, seed: Bootstrap resamples of the intervals, and their seed.
    """

    values: dict[tuple[str, str], np.ndarray]
    n_draws: int
    magnitude_within: float
    rtol: float
    donors: Tensor
    units: dict[tuple[str, int], Tensor]
    n_boot: int = 2000
    seed: int = 0

    @property
    def measures(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.values))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (measure, arm): mean and 95% interval over images, and the specificity gap
        (own minus the arm, per image) with its paired 95% interval (NaN for the own row)."""
        rows = []
        for measure in self.measures:
            own = self.values[(measure, "own")]
            for arm in ARMS:
                v = self.values[(measure, arm)]
                mean, lo, hi, n = bootstrap_interval(v, self.n_boot, self.seed)
                gap = (float("nan"),) * 3 if arm == "own" else bootstrap_interval(own - v, self.n_boot, self.seed)[:3]
                rows.append((measure, arm, mean, lo, hi, *gap, n))
        return pd.DataFrame(rows, columns=["measure", "arm", "mean", "low", "high", "gap", "gap_low", "gap_high",
                                           "n_images"])

    def __repr__(self) -> str:
        df = self.to_dataframe()
        lines = [f"SpecificityControls({self.n_draws} draws per control, 95% bootstrap intervals over images; "
                 f"magnitude matches within {self.rtol:.0%}: {self.magnitude_within:.0%})",
                 f"  {'measure':20} {'units':40} {'n':>3} {'mean [95% CI]':>28} {'gap own - this [95% CI]':>30}"]
        for r in df.itertuples():
            pct = r.measure.startswith("ablation")
            f = (lambda x: f"{x:+.1%}") if pct else (lambda x: f"{x:.4f}")  # noqa: E731
            g = (lambda x: f"{x:+.1%}") if pct else (lambda x: f"{x:+.4f}")  # noqa: E731
            val = f"{f(r.mean)} [{f(r.low)}, {f(r.high)}]"
            gap = "" if r.arm == "own" else f"{g(r.gap)} [{g(r.gap_low)}, {g(r.gap_high)}]"
            lines.append(f"  {r.measure if r.arm == 'own' else '':20} {ARM_NAMES[r.arm]:40} {r.n_images:3d} "
                         f"{val:>28} {gap:>30}".rstrip())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- the measurements
def _nanmean(per_draw: list[np.ndarray]) -> np.ndarray:
    """Mean over draws, skipping NaN (all-NaN images stay NaN, without a warning)."""
    a = np.stack(per_draw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, 0)


def _text_similarity(texts: list[list[str]], refs: list[list[str]], as_mat: Callable[[list[str]], np.ndarray],
                     ) -> np.ndarray:
    """Per image: mean over its texts of the mean cosine with its reference captions (NaN: no text)."""
    out = np.full(len(texts), np.nan)
    for i, (ts, cs) in enumerate(zip(texts, refs)):
        if ts:
            out[i] = (as_mat(ts) @ as_mat(cs).T).mean()
    return out


def specificity_controls(model: VisionLM, images, ranked: Int[Tensor, "n_images n_units 2"], probe: Probe, *,
                         ks: Sequence[int] = (10, 100), n_units: int | None = None, n_draws: int = 3,
                         rtol: float = 0.1, embed: Callable[[list[str]], Float[np.ndarray, "n d"]] | None = None,
                         reference_captions: Sequence[Sequence[str]] | None = None,
                         object_masks: Sequence[Tensor | np.ndarray | None] | None = None,
                         magnitudes: Tensor | None = None, seed: int = 0, n_boot: int = 2000, q: float = 95.0,
                         batch_size: int = 16, sae=None) -> SpecificityControls:
    """Measure each image's own top units and the three control sets (module docstring).

    Args:
        model: The vision LM.
        images: The images as ``model.preprocess`` takes them; with ``object_masks`` they must be in
            the frame of the masks (pixels in the model-input frame, as :func:`evaluate_neurons` passes).
        ranked: Each image's units, best first (``top_units(n).units_per_image()``).
        probe: The query of every image (``attr.probe``): its target defines p(c) and the other-image draw.
        ks: Units ablated (top-k) for the ablation measure.
        n_units: Units per image for decoded similarity and IoU (default: all of ``ranked``).
        n_draws: Seeded draws of each control set.
        rtol: Relative tolerance of the magnitude match.
        embed, reference_captions: Texts -> ``[n, d]`` L2-normalised embeddings, and each image's
            reference captions: both for the decoded-similarity measure, or neither.
        object_masks: One ``[height, width]`` mask (or ``None``) per image, for the IoU measure.
        magnitudes: Precomputed :func:`unit_magnitudes` of the images (computed if not given).
        seed: Seed of the draws and the bootstrap.
        n_boot: Bootstrap resamples.
        q: Percentile of the heatmap masks.
        batch_size: Images per forward pass.
        sae: An SAE or a list of them: the units are their latents, and every control set is drawn from them.
    """
    pixels = model.preprocess(images)
    emb = soft_prompts(model, pixels)
    n = len(emb)
    saes = None if sae is None else saes_by_hook(model, sae)
    names, width = unit_axis(model, "post", saes)
    ranked = as_units(model, ranked, saes=saes)
    if ranked.ndim != 3 or len(ranked) != n:
        raise ValueError(f"ranked must be [n_images={n}, n_units, 2], got {tuple(ranked.shape)}")
    probe.check_batch(n)
    probe.check_model(model)
    n_units = ranked.shape[1] if n_units is None else check_int(n_units, "n_units", minimum=None)
    ks = [check_int(k, "ks", minimum=None) for k in ks]
    if not 1 <= n_units <= ranked.shape[1] or any(not 1 <= k <= ranked.shape[1] for k in ks):
        raise ValueError(f"n_units and ks must be in [1, {ranked.shape[1]}] (the ranked units), got "
                         f"n_units={n_units}, ks={ks}")
    check_int(n_draws, "n_draws")
    if (embed is None) != (reference_captions is None):
        raise ValueError("pass embed and reference_captions together, or neither")
    if reference_captions is not None and len(reference_captions) != n:
        raise ValueError(f"{len(reference_captions)} reference caption sets for {n} images")
    if object_masks is not None and len(object_masks) != n:
        raise ValueError(f"{len(object_masks)} object masks for {n} images (None where an image has none)")
    if magnitudes is None:
        magnitudes = unit_magnitudes(model, image_embed=emb, batch_size=batch_size, sae=sae)
    if tuple(magnitudes.shape) != (n, len(names), width):
        raise ValueError(f"magnitudes must be [{n}, {len(names)}, {width}], got {tuple(magnitudes.shape)}")

    gen = torch.Generator().manual_seed(seed)
    targets = probe.target_ids.tolist()
    sizes = sorted(set(ks) | {n_units})
    # sets[arm][size] = list over draws of [n, size, 2]
    sets = {"own": {s: [ranked[:, :s]] for s in sizes}}
    sets.update({arm: {s: [] for s in sizes} for arm in ARMS[1:]})
    donors, within = [], []
    for _ in range(n_draws):
        other, d = other_image_units(ranked, targets, gen)
        donors.append(d)
        for s in sizes:
            sets["other_image"][s].append(other[:, :s])
            matched, ok = magnitude_matched_units(ranked[:, :s], magnitudes, rtol, gen)
            sets["magnitude"][s].append(matched)
            within.append(ok.flatten())
            sets["random"][s].append(sample_matched_units(ranked[:, :s], width, gen))

    values: dict[tuple[str, str], np.ndarray] = {}
    run = Ablator(model, emb, probe, "post", None, "zero", None, batch_size, saes)
    p0 = run.p(None)
    for k in ks:
        for arm in ARMS:
            rel = [((run.p(u) - p0) / p0).numpy() for u in sets[arm][k]]
            values[(f"ablation k={k}", arm)] = np.mean(rel, 0)
    if embed is not None:  # every set's texts first, then one call of embed on the unique texts
        refs = [list(c) for c in reference_captions]
        texts = {arm: [unit_texts(model, u, n_tokens=10, sae=sae)[0] for u in sets[arm][n_units]] for arm in ARMS}
        uniq = sorted({t for per_arm in texts.values() for draw in per_arm for ts in draw for t in ts}
                      | {c for cs in refs for c in cs})
        vec = dict(zip(uniq, np.asarray(embed(uniq))))
        as_mat = lambda ts: np.stack([vec[t] for t in ts])  # noqa: E731
        for arm in ARMS:
            values[("decoded similarity", arm)] = _nanmean([_text_similarity(d, refs, as_mat) for d in texts[arm]])
    if object_masks is not None:
        has = [i for i, m in enumerate(object_masks) if m is not None]
        if has:
            for arm in ARMS:
                ious = [heatmap_ious(model, pixels[has], u[has], [object_masks[i] for i in has], q,
                                     batch_size=batch_size, sae=sae).iou.nanmean(1).numpy() for u in sets[arm][n_units]]
                full = np.full(n, np.nan)
                full[has] = _nanmean(ious)
                values[("heatmap IoU", arm)] = full
    no_donor = (donors[0] < 0).numpy()  # the same images in every draw: no other target to draw from
    for (measure, arm), v in values.items():
        if arm == "other_image":
            v[no_donor] = np.nan
    return SpecificityControls(values=values, n_draws=n_draws, magnitude_within=float(torch.cat(within).float().mean()),
                               rtol=rtol, donors=torch.stack(donors), n_boot=n_boot, seed=seed,
                               units={(arm, s): torch.stack(sets[arm][s]) for arm in ARMS for s in sizes})
