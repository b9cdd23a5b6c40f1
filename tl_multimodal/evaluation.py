"""The paper's measurements as functions: decoded-text similarity against random pairing.

:func:`text_similarity_test` compares texts attached to images (the decoded tokens of each image's
top units, or the model's own captions) with the images' reference captions, against random
pairing with other images' captions: a Mann-Whitney U test over text-caption pairs and an
image-level permutation test. It takes embeddings (any sentence encoder; rows L2-normalised, so a
dot product is the cosine), so it runs offline and is tested on planted embeddings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
from jaxtyping import Float
from scipy import stats


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
