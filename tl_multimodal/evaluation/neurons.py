"""The paper's measurements as functions: decoded-text similarity, the ablation curve, heatmap IoU.

:func:`text_similarity_test` compares texts attached to images (the decoded tokens of each image's
top units, or the model's own captions) with the images' reference captions, against random
pairing with other images' captions: a Mann-Whitney U test over text-caption pairs and an
image-level permutation test. It takes embeddings (any sentence encoder; rows L2-normalised, so a
dot product is the cosine), so it runs offline and is tested on planted embeddings;
:func:`unit_texts` gives the texts of units (their decoded tokens, the paper's filter applied).
:func:`summarize_ablation` reads an :class:`~tl_multimodal.analysis.ablation.AblationCurve` as the paper's
table (mean relative change of p(c), top-k vs layer-matched random units, spread over draws).
:func:`heatmap_iou_test` compares the heatmap IoU of each image's top units with the object mask
against random units of the same layers (Wilcoxon signed-rank over images);
:func:`coco_object_masks` picks each image's object (the target noun's COCO category, else the
largest) and carries its mask into the model-input frame. :func:`evaluate_neurons` runs all three
over a dataset (attribution to the first noun of the model's own caption, then (a), (b), (c), then
their specificity controls, :mod:`tl_multimodal.evaluation.controls`) and returns a :class:`NeuronsEval`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from tl_multimodal.analysis.ablation import AblationCurve, ablation_curve, sample_matched_units
from tl_multimodal.analysis.attribution import attribute_dataset
from tl_multimodal.data.coco import coco_category_mask, object_for_noun
from tl_multimodal.evaluation.config import EvalConfig
from tl_multimodal.evaluation.controls import SpecificityControls, specificity_controls
from tl_multimodal.analysis.decoding import unit_texts
from tl_multimodal.models.geometry import input_geometry, mask_to_input
from tl_multimodal.analysis.heatmaps import heatmap_ious
from tl_multimodal.analysis.nouns import first_noun
from tl_multimodal.analysis.units import unit_axis
from tl_multimodal.models.protocol import VisionLM
from tl_multimodal.sae.splice import saes_by_hook


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


def pair_similarities(text_emb: Sequence[Float[np.ndarray, "n_texts d"]],
                      caption_emb: Sequence[Float[np.ndarray, "n_captions d"]],
                      reduce: Literal["mean", "max"] = "mean") -> list[list[Float[np.ndarray, "n_texts"]]]:
    """Every image's texts against every image's reference captions: ``[i][j]`` is ``[n_i]``, each of
    image ``i``'s texts' mean (or max) cosine with image ``j``'s captions (rows L2-normalised).

    Args:
        text_emb: Per image, ``[n_i, d]`` normalised embeddings of its texts (``n_i`` may be 0).
        caption_emb: Per image, ``[n_captions, d]`` normalised embeddings of its reference captions.
        reduce: ``"mean"`` or ``"max"`` over an image's captions.
    """
    if len(text_emb) != len(caption_emb):
        raise ValueError(f"{len(text_emb)} text sets for {len(caption_emb)} caption sets")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    red = (lambda m: m.mean(-1)) if reduce == "mean" else (lambda m: m.max(-1))
    return [[red(t @ c.T) if len(t) else np.zeros(0) for c in caption_emb] for t in text_emb]


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
    rng = np.random.default_rng(0) if rng is None else rng
    pair = pair_similarities(text_emb, caption_emb, reduce)
    has = np.array([len(t) > 0 for t in text_emb])
    S = np.array([[p.mean() if len(p) else np.nan for p in row] for row in pair])
    matched_pairs = np.concatenate([pair[i][i] for i in range(n)]) if n else np.zeros(0)
    others = [pair[i][j] for i in range(n) for j in range(n) if j != i]
    random_pairs = np.concatenate(others) if others else np.zeros(0)
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
        curve: The output of :func:`~tl_multimodal.analysis.ablation.ablation_curve`.
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


def heatmap_iou_test(model: VisionLM, images, units: Int[Tensor, "n_images n_units 2"], object_masks,
                     n_random_seeds: int = 3, seed: int = 0, q: float = 95.0, hook: str = "post",
                     batch_size: int = 16, sae=None) -> IoUTest:
    """Heatmap IoU of each image's top units vs random units from the same layers.

    Args:
        model: The vision LM.
        images: Images as :func:`~tl_multimodal.analysis.heatmaps.heatmap_ious` takes them (PIL images
            with masks in original pixels, or pixels with masks in the input frame).
        units: Per image, its top ``(layer, unit)`` rows.
        object_masks: One ``[height, width]`` boolean mask per image.
        n_random_seeds: Random draws of layer-matched units
            (:func:`~tl_multimodal.analysis.ablation.sample_matched_units`); their IoUs are averaged.
        seed: Seed of the draws.
        q, hook, batch_size, sae: As for :func:`~tl_multimodal.analysis.heatmaps.heatmap_ious` (with ``sae``, the
            random latents come from the same SAEs).
    """
    if not isinstance(units, Tensor) or units.ndim != 3 or units.shape[-1] != 2:
        raise ValueError("units must be a [n_images, n_units, 2] tensor (each image's top units)")
    if len(units) != len(images):
        raise ValueError(f"units for {len(units)} images, {len(images)} images given")
    if n_random_seeds < 1:
        raise ValueError(f"n_random_seeds must be at least 1, got {n_random_seeds}")
    top = heatmap_ious(model, images, units, object_masks, q, hook, batch_size, sae=sae).iou.nanmean(1).numpy()
    gen = torch.Generator().manual_seed(seed)
    _, width = unit_axis(model, hook, None if sae is None else saes_by_hook(model, sae))
    rand = torch.stack([heatmap_ious(model, images, sample_matched_units(units, width, gen), object_masks,
                                     q, hook, batch_size, sae=sae).iou.nanmean(1) for _ in range(n_random_seeds)])
    rand = rand.mean(0).numpy()
    w = stats.wilcoxon(top, rand, alternative="greater") if len(top) > 1 else None
    return IoUTest(top=top, random=rand, wilcoxon_W=float("nan") if w is None else float(w.statistic),
                   wilcoxon_p=float("nan") if w is None else float(w.pvalue), n_draws=n_random_seeds, q=q)


def coco_object_masks(model: VisionLM, coco, image_ids: Sequence[int], nouns: Sequence[str | None], images: Sequence,
                      ) -> tuple[list[int], list[tuple[int, str, str]], list[Bool[Tensor, "h_in w_in"]]]:
    """Each image's object (:func:`~tl_multimodal.data.coco.object_for_noun`), its mask in the model-input frame.

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


@dataclass(repr=False)
class NeuronsEval:
    """The multimodal-neuron evaluation of a dataset (:func:`evaluate_neurons`).

    Attributes:
        captions, targets, nouns: Per image, the model's greedy caption, the attributed target
            token and its first noun (``None`` if none was found).
        top_units: ``[n_images, n_units, 2]`` each image's top units, best first.
        interpretable: ``[n_images, n_units]`` the paper's decoded-token filter.
        text_similarity, own_captions: (a) for the interpretable top units' texts and for the
            model's own captions.
        ablation: (b).
        heatmap_iou: (c), ``None`` without COCO annotations or objects.
        iou_images, iou_objects: The images (indices) in (c) and their ``(category id, name, how)``.
        controls: The specificity controls of (a), (b), (c) (:mod:`~tl_multimodal.evaluation.controls`), or None.
        n_layers: Layers of the LM.
        stages_s: Seconds per stage.
        config: The settings it ran with (in :meth:`to_dict` as ``config``).
    """

    captions: list[str]
    targets: list[str]
    nouns: list[str | None]
    top_units: Int[Tensor, "n_images n_units 2"]
    interpretable: Bool[Tensor, "n_images n_units"]
    text_similarity: SimilarityTest
    own_captions: SimilarityTest
    ablation: AblationSummary
    heatmap_iou: IoUTest | None
    iou_images: list[int]
    iou_objects: list[tuple[int, str, str]]
    n_layers: int
    controls: SpecificityControls | None = None
    stages_s: dict[str, float] = field(default_factory=dict)
    config: EvalConfig | None = None

    @property
    def layer_counts(self) -> Int[Tensor, "layer"]:
        """How many of the top units sit in each layer."""
        return torch.bincount(self.top_units[..., 0].flatten(), minlength=self.n_layers)

    @property
    def mean_layer(self) -> float:
        return float(self.top_units[..., 0].float().mean())

    def to_dict(self, image_ids: Sequence | None = None) -> dict:
        """The numbers as a plain dict (JSON-ready); ``image_ids`` label the images (default: indices)."""
        ids = list(range(len(self.captions))) if image_ids is None else list(image_ids)
        iou = {"n_images": len(self.iou_images)}
        if self.heatmap_iou is not None:
            h, two = self.heatmap_iou, len(self.iou_images) > 1
            iou.update(top=h.mean_top, random=h.mean_random, wilcoxon_W=h.wilcoxon_W if two else None,
                       wilcoxon_p=h.wilcoxon_p if two else None,
                       n_by_noun=sum(c[2] == "noun" for c in self.iou_objects),
                       categories=[{"image_id": ids[i], "noun": self.nouns[i], "category": c[1], "how": c[2],
                                    "iou_top": float(a), "iou_random": float(b)}
                                   for i, c, a, b in zip(self.iou_images, self.iou_objects, h.top, h.random)])
        return {
            "config": None if self.config is None else self.config.to_dict(),
            "images": [{"image_id": ids[i], "caption": c, "target": t, "noun": w, "n_interpretable": int(k.sum())}
                       for i, (c, t, w, k) in enumerate(zip(self.captions, self.targets, self.nouns,
                                                            self.interpretable))],
            "layers": {"counts": self.layer_counts.tolist(), "mean_layer": self.mean_layer},
            "text_similarity": {"n_units": self.interpretable.numel(),
                                "n_interpretable": int(self.interpretable.sum()),
                                "top_units": self.text_similarity.to_dict(),
                                "own_captions": self.own_captions.to_dict()},
            "ablation": {"ks": self.ablation.ks, "p_before_mean": self.ablation.p_before,
                         "top_rel_change": self.ablation.top, "random_rel_change": self.ablation.random,
                         "random_rel_change_sd": self.ablation.random_sd},
            "heatmap_iou": iou,
            "controls": None if self.controls is None else self.controls.to_dataframe().to_dict("records"),
        }

    def to_dataframe(self) -> pd.DataFrame:
        """One row per image: caption, target, noun, interpretable top units, IoU (NaN outside (c))."""
        iou = np.full((len(self.captions), 2), np.nan)
        if self.heatmap_iou is not None:
            iou[self.iou_images] = np.stack([self.heatmap_iou.top, self.heatmap_iou.random], 1)
        return pd.DataFrame({"caption": self.captions, "target": self.targets, "noun": self.nouns,
                             "n_interpretable": self.interpretable.sum(1).tolist(),
                             "iou_top": iou[:, 0], "iou_random": iou[:, 1]})

    def __repr__(self) -> str:
        return (f"NeuronsEval({len(self.captions)} images x top {self.top_units.shape[1]} units; "
                f"(a) {self.text_similarity!r}; (b) {self.ablation!r}; (c) {self.heatmap_iou!r})"
                + ("" if self.controls is None else f"\n{self.controls!r}"))


def evaluate_neurons(model: VisionLM, images: Sequence, reference_captions: Sequence[Sequence[str]],
                     embed: Callable[[list[str]], Float[np.ndarray, "n d"]], config: EvalConfig | None = None, *,
                     coco=None, image_ids: Sequence[int] | None = None, log: Callable[[str], None] | None = None,
                     sae=None, **overrides) -> NeuronsEval:
    """The paper's three measurements of multimodal neurons over a dataset (METHOD.md §2).

    Each image is captioned greedily after ``prompt`` and its MLP units attributed to the caption's
    first noun (:func:`~tl_multimodal.analysis.attribution.attribute_dataset`, ``until="caption"``). Then
    (a) the interpretable top units' decoded texts vs the image's reference captions, against random
    pairing (:func:`text_similarity_test`; also for the model's own captions); (b) the ablation curve
    (:func:`~tl_multimodal.analysis.ablation.ablation_curve` at the probe, :func:`summarize_ablation`);
    (c) heatmap IoU of the top units with the COCO object in the model-input frame
    (:func:`coco_object_masks`, :func:`heatmap_iou_test`). Then the specificity controls of all three
    (:func:`~tl_multimodal.evaluation.controls.specificity_controls`: own top units vs another image's, magnitude-
    matched and random same-layer units, with bootstrap intervals and gaps).

    Args:
        model: The vision LM.
        images: The original PIL images.
        reference_captions: Per image, its reference captions.
        embed: Texts -> ``[n, d]`` L2-normalised sentence embeddings (called on sorted unique
            texts: once for (a), once for the controls).
        config: The settings (:class:`~tl_multimodal.evaluation.config.EvalConfig`: units, ks,
            prompt, ranking, seeds, controls, batch size); default all defaults. The result records it.
        coco, image_ids: A ``pycocotools`` COCO object and each image's id in it (both, or
            neither: then (c) is skipped).
        log: Called with a progress line after each stage.
        sae: An SAE or a list of them (:func:`~tl_multimodal.sae.load.load_sae`): measure their latents instead
            of the MLP units, every test and control the same (``hook`` is then not used).
        **overrides: :class:`~tl_multimodal.evaluation.config.EvalConfig` fields replacing those of
            ``config`` (``n_units=10, hook="pre"``).

    Raises:
        TypeError: An override that is not a setting (the settings are named).
        ValueError: Data that do not match (caption sets, COCO ids), or a bad setting.
    """
    config = EvalConfig.resolve(config, overrides)
    n = len(images)
    if len(reference_captions) != n:
        raise ValueError(f"{len(reference_captions)} reference caption sets for {n} images")
    if (coco is None) != (image_ids is None) or (image_ids is not None and len(image_ids) != n):
        raise ValueError("pass coco and image_ids (one per image) together, or neither")
    n_units, ks, seed, batch_size = config.n_units, list(config.ks), config.seed, config.batch_size
    say = log or (lambda msg: None)
    rng = np.random.default_rng(seed)
    t0, stages = time.perf_counter(), {}
    stage = lambda name: stages.__setitem__(name, time.perf_counter() - t0 - sum(stages.values()))  # noqa: E731

    res = attribute_dataset(model, [images[s:s + batch_size] for s in range(0, n, batch_size)],
                            n_units=max(n_units, max(ks), *config.control_ks), prompt=config.prompt,
                            batch_size=batch_size,
                            hook=config.hook, over_patches=config.over_patches, normalize=config.normalize,
                            max_new_tokens=config.max_new_tokens, until="caption", sae=sae,
                            on_batch=lambda s, m: say(f"attributed images {s}..{s + m - 1}"))
    captions = res.captions
    nouns = [found[0] if (found := first_noun(c)) else None for c in captions]
    ranked = res.top_units.units_per_image()  # best first
    top = ranked[:, :n_units]
    stage("attribution")

    texts, interp = unit_texts(model, top, n_tokens=10, sae=sae)
    uniq = sorted({t for ts in texts for t in ts} | {c for cs in reference_captions for c in cs} | set(captions))
    vectors = np.asarray(embed(uniq))
    emb = dict(zip(uniq, vectors))
    as_mat = lambda ts: np.stack([emb[t] for t in ts]) if ts else np.zeros((0, vectors.shape[-1]))  # noqa: E731
    ref = [as_mat(list(cs)) for cs in reference_captions]
    sim_units = text_similarity_test([as_mat(ts) for ts in texts], ref, config.reduce, rng, config.n_perm)
    sim_caps = text_similarity_test([as_mat([cap]) for cap in captions], ref, config.reduce, rng, config.n_perm)
    say(f"(a) decoded {interp.numel()} top units: {int(interp.sum())} interpretable")
    stage("text_similarity")

    curve = ablation_curve(model, images, ranked, ks=ks, probe=res.probe, n_random_seeds=config.ablation_seeds,
                           seed=seed, batch_size=batch_size, sae=sae)
    say(f"(b) {curve!r}")
    stage("ablation")

    kept, cats, masks = coco_object_masks(model, coco, image_ids, nouns, images) if coco is not None else ([], [], [])
    iou = None
    if kept:  # in the model-input frame: the same activations as on the original, fewer pixels
        iou = heatmap_iou_test(model, model.preprocess([images[i] for i in kept]), top[kept], masks,
                               n_random_seeds=config.iou_seeds, seed=seed, batch_size=batch_size, sae=sae)
    say(f"(c) IoU over {len(kept)} images with masks")
    stage("iou")

    controls = None
    if config.control_draws > 0:
        per_image = [None] * n
        for i, m in zip(kept, masks):
            per_image[i] = m
        controls = specificity_controls(model, model.preprocess(images), ranked, res.probe, ks=config.control_ks,
                                        n_units=n_units, n_draws=config.control_draws, rtol=config.magnitude_rtol,
                                        embed=embed,
                                        reference_captions=reference_captions,
                                        object_masks=per_image if kept else None, seed=seed, n_boot=config.n_boot,
                                        batch_size=batch_size, sae=sae)
        say(f"controls: {config.control_draws} draws")
        stage("controls")
    return NeuronsEval(captions=captions, targets=res.targets, nouns=nouns, top_units=top, interpretable=interp,
                       text_similarity=sim_units, own_captions=sim_caps, ablation=summarize_ablation(curve),
                       heatmap_iou=iou, iou_images=kept, iou_objects=cats,
                       n_layers=model.cfg.n_layers if sae is None else len(saes_by_hook(model, sae)),
                       controls=controls, stages_s=stages, config=config)
