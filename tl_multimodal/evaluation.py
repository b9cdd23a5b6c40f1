"""The paper's measurements as functions: decoded-text similarity, the ablation curve, heatmap IoU.

:func:`text_similarity_test` compares texts attached to images (the decoded tokens of each image's
top units, or the model's own captions) with the images' reference captions, against random
pairing with other images' captions: a Mann-Whitney U test over text-caption pairs and an
image-level permutation test. It takes embeddings (any sentence encoder; rows L2-normalised, so a
dot product is the cosine), so it runs offline and is tested on planted embeddings;
:func:`unit_texts` gives the texts of units (their decoded tokens, the paper's filter applied).
:func:`summarize_ablation` reads an :class:`~tl_multimodal.ablation.AblationCurve` as the paper's
table (mean relative change of p(c), top-k vs layer-matched random units, spread over draws).
:func:`heatmap_iou_test` compares the heatmap IoU of each image's top units with the object mask
against random units of the same layers (Wilcoxon signed-rank over images);
:func:`coco_object_masks` picks each image's object (the target noun's COCO category, else the
largest) and carries its mask into the model-input frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from tl_multimodal.ablation import AblationCurve, sample_matched_units
from tl_multimodal.coco import coco_category_mask, object_for_noun
from tl_multimodal.decoding import clean_token, decode_units
from tl_multimodal.geometry import input_geometry, mask_to_input
from tl_multimodal.heatmaps import heatmap_ious
from tl_multimodal.vlm import VisionLM


@dataclass
class SimilarityTest:
    """Similarity of matched text-caption pairs vs random pairing.

    Attributes:
        n_images: Images with at least one text.
        n_pairs: Matched (text, image) pairs.
        matched: Mean similarity of texts to their own image's captions.
        random: Mean similarity of texts to every other image's captions.
        mwu_U, mwu_p: One-sided Mann-Whitney U (matched > random; one random other image per text).
        mwu_n_random: Random pairs drawn for the rank test.
        perm_stat, perm_null_mean, perm_p, n_perm: Image-level permutation test (mean over images
            of their texts' similarity to their own captions; null: captions shuffled over images).
    """

    n_images: int
    n_pairs: int
    matched: float
    random: float
    mwu_U: float = float("nan")
    mwu_p: float = float("nan")
    mwu_n_random: int = 0
    perm_stat: float = float("nan")
    perm_null_mean: float = float("nan")
    perm_p: float = float("nan")
    n_perm: int = 0

    def to_dict(self) -> dict:
        """The numbers as a plain dict (JSON-ready)."""
        return asdict(self)

    def __repr__(self) -> str:
        return (f"SimilarityTest({self.n_images} images, {self.n_pairs} pairs: matched {self.matched:.4f} vs "
                f"random {self.random:.4f}; MWU p={self.mwu_p:.3g}, permutation p={self.perm_p:.3g})")


def text_similarity_test(text_emb: Sequence[Float[np.ndarray, "n_texts d"]],
                         caption_emb: Sequence[Float[np.ndarray, "n_captions d"]],
                         reduce: Literal["mean", "max"] = "mean", rng: np.random.Generator | None = None,
                         n_perm: int = 10000) -> SimilarityTest:
    """Texts of each image vs its reference captions, against random pairing with other images.

    ``S[i, j]`` = mean over image ``i``'s texts of the (mean or max over image ``j``'s captions)
    cosine similarity.

    Args:
        text_emb: Per image, ``[n_i, d]`` normalised embeddings of its texts (``n_i`` may be 0).
        caption_emb: Per image, ``[n_captions, d]`` normalised embeddings of its reference captions.
        reduce: ``"mean"`` or ``"max"`` over an image's captions.
        rng: Random generator (default: seeded 0).
        n_perm: Permutations of the image-level test.
    """
    n = len(caption_emb)
    if len(text_emb) != n:
        raise ValueError(f"{len(text_emb)} text sets for {n} caption sets")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    rng = np.random.default_rng(0) if rng is None else rng
    red = (lambda m: m.mean(-1)) if reduce == "mean" else (lambda m: m.max(-1))
    pair = [[red(t @ c.T) if len(t) else np.zeros(0) for c in caption_emb] for t in text_emb]  # [i][j] -> [n_i]
    has = np.array([len(t) > 0 for t in text_emb])
    S = np.array([[p.mean() if len(p) else np.nan for p in row] for row in pair])
    matched_pairs = np.concatenate([pair[i][i] for i in range(n)])
    random_pairs = np.concatenate([pair[i][j] for i in range(n) for j in range(n) if j != i])
    drawn = []  # one random other image per text (equal sample sizes for the rank test)
    for i in range(n if n > 1 else 0):
        others = (i + rng.integers(1, n, len(pair[i][i]))) % n
        drawn += [pair[i][j][t] for t, j in enumerate(others)]
    drawn = np.asarray(drawn)
    out = SimilarityTest(n_images=int(has.sum()), n_pairs=len(matched_pairs),
                         matched=float(matched_pairs.mean()) if len(matched_pairs) else float("nan"),
                         random=float(random_pairs.mean()) if len(random_pairs) else float("nan"))
    if n > 1 and len(matched_pairs) and len(drawn):
        u = stats.mannwhitneyu(matched_pairs, drawn, alternative="greater")
        out.mwu_U, out.mwu_p, out.mwu_n_random = float(u.statistic), float(u.pvalue), len(drawn)
        idx = np.flatnonzero(has)
        obs = S[idx, idx].mean()
        perms = np.array([S[idx, rng.permutation(n)[idx]].mean() for _ in range(n_perm)])
        out.perm_stat, out.perm_null_mean = float(obs), float(perms.mean())
        out.perm_p, out.n_perm = float((1 + (perms >= obs).sum()) / (1 + n_perm)), n_perm
    return out



def unit_texts(model: VisionLM, units: Int[Tensor, "n_images n_units 2"], n_tokens: int = 10,
               ) -> tuple[list[list[str]], Bool[Tensor, "n_images n_units"]]:
    """Each unit's text: its top ``n_tokens`` decoded tokens, cleaned, joined by spaces.

    Args:
        model: The vision LM (units decoded through its unembedding, :func:`decode_units`).
        units: Per image, its ``(layer, unit)`` rows.
        n_tokens: Tokens per unit (the paper's filter needs 10).

    Returns:
        Per image, the texts of its interpretable units (in the order of ``units``), and the
        ``[n_images, n_units]`` interpretable mask.
    """
    if not isinstance(units, Tensor) or units.ndim != 3 or units.shape[-1] != 2:
        raise ValueError(f"units must be a [n_images, n_units, 2] tensor, got "
                         f"{tuple(units.shape) if isinstance(units, Tensor) else type(units).__name__}")
    n, k = units.shape[:2]
    dec = decode_units(model, units.reshape(-1, 2), n_tokens=n_tokens)
    interp = dec.interpretable.reshape(n, k)
    texts = [" ".join(clean_token(t) for t in toks) for toks in dec.tokens]
    return [[texts[i * k + r] for r in range(k) if interp[i, r]] for i in range(n)], interp


@dataclass(repr=False)
class AblationSummary:
    """The ablation curve as the paper's table: mean relative change of p(c) over images, per k.

    Attributes:
        ks: The k values.
        p_before: Mean p(c) unablated.
        top: Per k, mean relative change with the top-k units ablated.
        random: Per k, mean over draws of the mean relative change with random same-layer units.
        random_sd: Per k, the standard deviation (``ddof=0``) of that mean over the draws.
        n_images, n_draws: Images, random draws per k.
    """

    ks: list[int]
    p_before: float
    top: list[float]
    random: list[float]
    random_sd: list[float]
    n_images: int
    n_draws: int

    def to_dataframe(self) -> pd.DataFrame:
        """One row per k."""
        return pd.DataFrame({"k": self.ks, "top": self.top, "random": self.random, "random_sd": self.random_sd})

    def __repr__(self) -> str:
        pts = ", ".join(f"k={k}: {t:+.1%} vs {r:+.1%} (sd {s:.1%})"
                        for k, t, r, s in zip(self.ks, self.top, self.random, self.random_sd))
        return (f"AblationSummary({self.n_images} images, {self.n_draws} draws, p(c) {self.p_before:.4f}; "
                f"top vs random: {pts})")


def summarize_ablation(curve: AblationCurve) -> AblationSummary:
    """Mean relative change of p(c) over images for the top-k and the random units, per k.

    Args:
        curve: The output of :func:`~tl_multimodal.ablation.ablation_curve`.
    """
    if not isinstance(curve, AblationCurve):
        raise TypeError(f"curve must be an AblationCurve, got {type(curve).__name__}")
    rand = curve.rel_change("random").mean(-1)  # [k, draw]
    return AblationSummary(ks=list(curve.ks), p_before=float(curve.p_before.mean()),
                           top=curve.rel_change("top").mean(-1).tolist(), random=rand.mean(-1).tolist(),
                           random_sd=rand.std(-1, correction=0).tolist(), n_images=len(curve.p_before),
                           n_draws=rand.shape[-1])


@dataclass(repr=False)
class IoUTest:
    """Heatmap IoU with the object mask: each image's top units vs random units of the same layers.

    Attributes:
        top: ``[n_images]`` mean IoU of the image's top units (NaN IoUs skipped).
        random: ``[n_images]`` the same for random same-layer units, averaged over the draws.
        wilcoxon_W, wilcoxon_p: One-sided Wilcoxon signed-rank test over images (top > random);
            NaN with fewer than 2 images.
        n_draws: Random draws.
        q: Percentile of the activation masks.
    """

    top: Float[np.ndarray, "n_images"]
    random: Float[np.ndarray, "n_images"]
    wilcoxon_W: float
    wilcoxon_p: float
    n_draws: int
    q: float

    @property
    def mean_top(self) -> float:
        return float(np.nanmean(self.top))

    @property
    def mean_random(self) -> float:
        return float(np.nanmean(self.random))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per image."""
        return pd.DataFrame({"image": np.arange(len(self.top)), "iou_top": self.top, "iou_random": self.random})

    def __repr__(self) -> str:
        return (f"IoUTest({len(self.top)} images, q={self.q:g}: top {self.mean_top:.4f} vs random "
                f"{self.mean_random:.4f}; Wilcoxon W={self.wilcoxon_W:g}, p={self.wilcoxon_p:.3g})")


def heatmap_iou_test(model: VisionLM, images, units: Int[Tensor, "n_images n_units 2"], object_masks, n_random_seeds: int = 3,
                     seed: int = 0, q: float = 95.0, hook: str = "post", batch_size: int = 16) -> IoUTest:
    """Heatmap IoU of each image's top units vs random units from the same layers.

    Args:
        model: The vision LM.
        images: Images as :func:`~tl_multimodal.heatmaps.heatmap_ious` takes them (PIL images
            with masks in original pixels, or pixels with masks in the input frame).
        units: Per image, its top ``(layer, unit)`` rows.
        object_masks: One ``[height, width]`` boolean mask per image.
        n_random_seeds: Random draws of layer-matched units
            (:func:`~tl_multimodal.ablation.sample_matched_units`); their IoUs are averaged.
        seed: Seed of the draws.
        q, hook, batch_size: As for :func:`~tl_multimodal.heatmaps.heatmap_ious`.
    """
    if not isinstance(units, Tensor) or units.ndim != 3 or units.shape[-1] != 2:
        raise ValueError("units must be a [n_images, n_units, 2] tensor (each image's top units)")
    if len(units) != len(images):
        raise ValueError(f"units for {len(units)} images, {len(images)} images given")
    if n_random_seeds < 1:
        raise ValueError(f"n_random_seeds must be at least 1, got {n_random_seeds}")
    top = heatmap_ious(model, images, units, object_masks, q, hook, batch_size).iou.nanmean(1).numpy()
    gen = torch.Generator().manual_seed(seed)
    rand = torch.stack([heatmap_ious(model, images, sample_matched_units(units, model.cfg.d_mlp, gen), object_masks,
                                     q, hook, batch_size).iou.nanmean(1) for _ in range(n_random_seeds)])
    rand = rand.mean(0).numpy()
    w = stats.wilcoxon(top, rand, alternative="greater") if len(top) > 1 else None
    return IoUTest(top=top, random=rand, wilcoxon_W=float("nan") if w is None else float(w.statistic),
                   wilcoxon_p=float("nan") if w is None else float(w.pvalue), n_draws=n_random_seeds, q=q)


def coco_object_masks(model: VisionLM, coco, image_ids: Sequence[int], nouns: Sequence[str | None], images: Sequence,
                      ) -> tuple[list[int], list[tuple[int, str, str]], list[Bool[Tensor, "h_in w_in"]]]:
    """Each image's object (:func:`~tl_multimodal.coco.object_for_noun`), its mask in the model-input frame.

    Args:
        model: The vision LM (its encoder's data config gives the resize and crop).
        coco: A ``pycocotools`` COCO object.
        image_ids: COCO id of each image.
        nouns: Each image's target noun (``None``: the largest object).
        images: The original PIL images.

    Returns:
        The indices of the images that have an object, their ``(category id, name, how)``, and
        their masks in the model-input frame (as :meth:`~HookedVisionPrefix.preprocess` crops).
    """
    if not len(image_ids) == len(nouns) == len(images):
        raise ValueError(f"{len(image_ids)} image_ids, {len(nouns)} nouns, {len(images)} images")
    kept, cats, masks = [], [], []
    for i, (image_id, noun, image) in enumerate(zip(image_ids, nouns, images)):
        cat = object_for_noun(coco, image_id, noun)
        if cat is None:
            continue
        kept.append(i)
        cats.append(cat)
        masks.append(mask_to_input(coco_category_mask(coco, image_id, cat[0], image_size=image.size),
                                   input_geometry(model, image)))
    return kept, cats, masks
