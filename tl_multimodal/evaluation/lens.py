"""Where translation happens: how close what the image positions decode to is to the captions, by depth.

:func:`lens_similarity` takes texts per depth and image (any source), measures each text's similarity
to its image's reference captions against random pairing with the other images' captions
(:func:`~tl_multimodal.evaluation.neurons.pair_similarities`), and gives per depth the mean matched
similarity and the gap "own captions minus other images' captions" with 95% bootstrap intervals over
images (:func:`~tl_multimodal.evaluation.controls.bootstrap_interval`): a :class:`LensCurve`. A depth
whose decoded text is about the image has a gap above zero. The texts come from
:func:`resid_lens_texts` (the logit lens of the residual stream at the image positions,
:func:`~tl_multimodal.analysis.lens.image_logit_lens`) or :func:`unit_lens_texts` (the decoded output
directions of each layer's most active MLP units at the image positions); any other source passes its own
``{depth: [image][texts]}``: e.g. SAE latents, each image's most active latents per layer with their decoder
directions (``[1, n, d_model]``) turned into texts by ``token_texts(model, nearest_tokens(model, directions, 10)[0])``
(:mod:`tl_multimodal.analysis.decoding`).

    texts = resid_lens_texts(model, images)
    curve = lens_similarity(texts, captions, embed)
    curve.plot()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.decoding import decode_units, token_texts
from tl_multimodal.analysis.lens import image_logit_lens
from tl_multimodal.evaluation.controls import bootstrap_interval, unit_magnitudes
from tl_multimodal.evaluation.neurons import pair_similarities
from tl_multimodal.models.protocol import VisionLM, soft_prompts

Texts = Mapping[int, Sequence[Sequence[str]]]  # {depth: per image, its texts}


@dataclass(repr=False)
class LensCurve:
    """Similarity of decoded texts to the captions by depth (:func:`lens_similarity`).

    Attributes:
        depths: The depths measured, ascending.
        matched: ``[depth, n_images]`` per image, its texts' mean cosine with its own captions.
        other: ``[depth, n_images]`` the same with every other image's captions (mean over them).
        source: What was decoded (a label for tables and the figure).
        n_boot, seed: Bootstrap resamples of the intervals, and their seed.
    """

    depths: list[int]
    matched: Float[np.ndarray, "depth n_images"]
    other: Float[np.ndarray, "depth n_images"]
    source: str
    n_boot: int = 2000
    seed: int = 0

    def to_dataframe(self) -> pd.DataFrame:
        """One row per depth: matched and random-pairing means, the gap (matched minus random pairing,
        per image) and its 95% bootstrap interval over images."""
        rows = []
        for d, m, o in zip(self.depths, self.matched, self.other):
            mean, lo, hi, n = bootstrap_interval(m, self.n_boot, self.seed)
            gap, glo, ghi, _ = bootstrap_interval(m - o, self.n_boot, self.seed)
            rows.append((self.source, d, n, mean, lo, hi, float(np.nanmean(o)), gap, glo, ghi))
        return pd.DataFrame(rows, columns=["source", "depth", "n_images", "matched", "matched_low", "matched_high",
                                           "random_pairing", "gap", "gap_low", "gap_high"])

    def __repr__(self) -> str:
        lines = [f"LensCurve({self.source}; {self.matched.shape[1]} images, 95% bootstrap intervals over images)",
                 f"  {'depth':>5} {'own captions [95% CI]':>28} {'other images':>13} {'gap own - other [95% CI]':>30}"]
        for r in self.to_dataframe().itertuples():
            lines.append(f"  {r.depth:5d} {f'{r.matched:.4f} [{r.matched_low:.4f}, {r.matched_high:.4f}]':>28} "
                         f"{r.random_pairing:13.4f} {f'{r.gap:+.4f} [{r.gap_low:+.4f}, {r.gap_high:+.4f}]':>30}")
        return "\n".join(lines)

    def plot(self, ax=None, label: str | None = None):
        """The gap (own minus other images' captions) by depth with its 95% interval; the Figure."""
        import matplotlib.pyplot as plt

        fig = ax.figure if ax is not None else plt.figure(figsize=(5, 3.2))
        ax = ax if ax is not None else fig.add_subplot()
        df = self.to_dataframe()
        line, = ax.plot(df.depth, df.gap, "o-", ms=3, label=label or self.source)
        ax.fill_between(df.depth, df.gap_low, df.gap_high, color=line.get_color(), alpha=0.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("depth (residual stream before block; MLP: block)")
        ax.set_ylabel("similarity to own - other captions")
        ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
        return fig


def lens_similarity(texts: Texts, reference_captions: Sequence[Sequence[str]],
                    embed: Callable[[list[str]], Float[np.ndarray, "n d"]], *, source: str = "texts",
                    n_boot: int = 2000, seed: int = 0) -> LensCurve:
    """Per depth, each image's texts against its own captions and against the other images' captions.

    Args:
        texts: ``{depth: per image, its texts}`` (an image may have none at a depth: NaN there).
        reference_captions: Per image, its reference captions.
        embed: Texts -> ``[n, d]`` L2-normalised sentence embeddings (called once, on the sorted unique texts).
        source: A label for what was decoded.
        n_boot, seed: Bootstrap resamples of the intervals, and their seed.
    """
    n = len(reference_captions)
    if n < 2:
        raise ValueError(f"reference_captions: random pairing needs at least 2 images, got {n}")
    if not texts:
        raise ValueError("texts is empty: pass {depth: per image, its texts}")
    for d, per in texts.items():
        if len(per) != n:
            raise ValueError(f"texts[{d}] has texts for {len(per)} images, reference_captions for {n}")
    refs = [list(c) for c in reference_captions]
    uniq = sorted({t for per in texts.values() for ts in per for t in ts} | {c for cs in refs for c in cs})
    vec = dict(zip(uniq, np.asarray(embed(uniq))))
    dim = len(next(iter(vec.values())))
    as_mat = lambda ts: np.stack([vec[t] for t in ts]) if len(ts) else np.zeros((0, dim))  # noqa: E731
    caps = [as_mat(cs) for cs in refs]
    depths = sorted(texts)
    matched, other = np.full((len(depths), n), np.nan), np.full((len(depths), n), np.nan)
    for r, d in enumerate(depths):
        S = np.array([[p.mean() if len(p) else np.nan for p in row]
                      for row in pair_similarities([as_mat(ts) for ts in texts[d]], caps)])
        matched[r] = np.diag(S)
        other[r] = (np.nansum(S, 1) - np.diag(S)) / (n - 1)
    return LensCurve(depths=depths, matched=matched, other=other, source=source, n_boot=n_boot, seed=seed)


def resid_lens_texts(model: VisionLM, images=None, image_features: Tensor | None = None, *,
                     image_embed: Tensor | None = None, n_tokens: int = 5, batch_size: int = 8,
                     ) -> dict[int, list[list[str]]]:
    """``{depth: [image][patch]}``: the logit lens's top ``n_tokens`` at each image position, as texts
    (:func:`~tl_multimodal.analysis.lens.image_logit_lens`; depth ``n_layers`` is the final residual stream)."""
    lens = image_logit_lens(model, images, image_features, image_embed=image_embed, n_tokens=n_tokens,
                            batch_size=batch_size)
    return dict(enumerate(lens.texts(model)))


def unit_lens_texts(model: VisionLM, images=None, image_features: Tensor | None = None, *,
                    image_embed: Tensor | None = None, n_units: int = 5, n_tokens: int = 10, batch_size: int = 8,
                    ) -> dict[int, list[list[str]]]:
    """``{layer: [image][unit]}``: per layer and image, the ``n_units`` MLP units with the largest
    ``|hook_post|`` at the image positions (:func:`~tl_multimodal.evaluation.controls.unit_magnitudes`), each
    as its top ``n_tokens`` decoded tokens (:func:`~tl_multimodal.analysis.decoding.decode_units`) joined."""
    check_int(n_units, "n_units", maximum=model.cfg.d_mlp)
    emb = soft_prompts(model, images, image_features, image_embed)
    top = unit_magnitudes(model, image_embed=emb, batch_size=batch_size).topk(n_units, dim=-1).indices  # [b, L, n]
    n_img, n_layers = top.shape[:2]
    layers = torch.arange(n_layers)[None, :, None].expand_as(top)
    units = torch.stack([layers, top], -1).reshape(-1, 2)
    dec = decode_units(model, units, n_tokens=n_tokens)
    texts = np.array(token_texts(model, dec.token_ids), dtype=object).reshape(n_img, n_layers, n_units)
    return {layer: [list(texts[i, layer]) for i in range(n_img)] for layer in range(n_layers)}
