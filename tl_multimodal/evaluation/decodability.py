"""The paper's decodability test: are the image soft prompts themselves decodable into language?

Schwettmann et al. (2023) take each image soft prompt's 5 nearest tokens and score them against the
image (CLIPScore 19.22), against the same for random vectors of matched norm (19.17), with a
two-sample Kolmogorov-Smirnov test (D = .037, p > .5): the projection's outputs are not decodable,
translation happens deeper in the LM. :func:`decodability_test` does the same with captions instead
of the image: per image and patch, the ``n_tokens`` nearest tokens of the soft prompt (by the input
embeddings ``W_E`` and by the logit lens through ``ln_final`` and ``W_U``,
:func:`~tl_multimodal.analysis.decoding.nearest_tokens`) joined into one text; the same for a random
vector of the same norm per soft prompt (seeded Gaussian directions); each text's similarity to the
image's reference captions (:func:`~tl_multimodal.evaluation.neurons.pair_similarities`, any sentence
encoder). Compared: soft prompts vs random vectors (KS test, ``scipy.stats.ks_2samp``) and each
against random pairing with other images' captions
(:func:`~tl_multimodal.evaluation.neurons.text_similarity_test`).

    dec = decodability_test(model, images, captions, embed)
    dec                     # the table; dec.to_dataframe() for the numbers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.decoding import nearest_tokens, token_texts
from tl_multimodal.evaluation.neurons import SimilarityTest, pair_similarities, text_similarity_test
from tl_multimodal.models.protocol import VisionLM, soft_prompts

SOURCES = ("soft prompts", "random vectors")


def matched_norm_vectors(x: Float[Tensor, "... d_model"], generator: torch.Generator | None = None,
                         ) -> Float[Tensor, "... d_model"]:
    """Random vectors with the norms of ``x``: uniform directions (normalised Gaussians) times ``|x|``."""
    g = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    g = g / g.norm(dim=-1, keepdim=True)
    return (g * x.double().norm(dim=-1, keepdim=True)).to(x.dtype)


@dataclass(repr=False)
class Decodability:
    """The decodability test of image soft prompts (:func:`decodability_test`).

    Attributes:
        texts: ``{(method, source): [n_images][n_patches]}`` the decoded texts (the nearest tokens joined).
        scores: ``{(method, source): [n_images, n_patches]}`` each text's mean cosine with its image's
            reference captions.
        pairing: ``{(method, source): SimilarityTest}`` matched captions vs random pairing.
        ks: ``{method: (D, p)}`` two-sample KS test of the soft prompts' scores vs the random vectors'.
        n_tokens: Nearest tokens per prompt.
        methods: ``"embed"`` and/or ``"unembed"``.
    """

    texts: dict[tuple[str, str], list[list[str]]]
    scores: dict[tuple[str, str], np.ndarray]
    pairing: dict[tuple[str, str], SimilarityTest]
    ks: dict[str, tuple[float, float]]
    n_tokens: int
    methods: tuple[str, ...]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (method, source): mean similarity to the own captions, to other images' captions,
        the permutation p of matched > random pairing, and the method's KS D and p (soft prompts vs
        random vectors)."""
        rows = []
        for method in self.methods:
            for source in SOURCES:
                t = self.pairing[(method, source)]
                rows.append((method, source, t.n_images, self.scores[(method, source)].size, t.matched, t.random,
                             t.perm_p, *self.ks[method]))
        return pd.DataFrame(rows, columns=["method", "source", "n_images", "n_texts", "matched", "random_pairing",
                                           "perm_p", "ks_D", "ks_p"])

    def __repr__(self) -> str:
        lines = [f"Decodability({self.n_tokens} nearest tokens per soft prompt; similarity to the image's captions)",
                 f"  {'method':8} {'source':15} {'texts':>6} {'own captions':>13} {'other images':>13} "
                 f"{'perm p':>7}   KS soft prompts vs random vectors"]
        for r in self.to_dataframe().itertuples():
            ks = f"D = {r.ks_D:.3f}, p = {r.ks_p:.3g}" if r.source == SOURCES[0] else ""
            lines.append(f"  {r.method:8} {r.source:15} {r.n_texts:6d} {r.matched:13.4f} {r.random_pairing:13.4f} "
                         f"{r.perm_p:7.3g}   {ks}".rstrip())
        i, p = 0, 0
        for method in self.methods:
            lines.append(f"  e.g. {method}, image {i} patch {p}: {self.texts[(method, SOURCES[0])][i][p]!r} "
                         f"(random vector: {self.texts[(method, SOURCES[1])][i][p]!r})")
        return "\n".join(lines)


@torch.no_grad()
def decodability_test(model: VisionLM, images=None, reference_captions: Sequence[Sequence[str]] | None = None,
                      embed: Callable[[list[str]], Float[np.ndarray, "n d"]] | None = None, *,
                      image_features: Tensor | None = None, image_embed: Tensor | None = None, n_tokens: int = 5,
                      methods: Sequence[str] = ("embed", "unembed"), seed: int = 0, n_perm: int = 2000,
                      ) -> Decodability:
    """The paper's decodability test of the image soft prompts (module docstring).

    Args:
        model: The vision LM.
        images, image_features, image_embed: The images, their encoder features or their soft prompts
            (exactly one).
        reference_captions: Per image, its reference captions.
        embed: Texts -> ``[n, d]`` L2-normalised sentence embeddings (called once, on the sorted unique texts).
        n_tokens: Nearest tokens per soft prompt (the paper: 5).
        methods: ``"embed"`` (cosine with ``W_E``) and/or ``"unembed"`` (the logit lens).
        seed: Seed of the random vectors and of the pairing tests.
        n_perm: Permutations of the image-level pairing test.

    Returns:
        A :class:`Decodability`.
    """
    x = soft_prompts(model, images, image_features, image_embed)
    n = len(x)
    if reference_captions is None or embed is None:
        raise ValueError("pass reference_captions (one caption list per image) and embed")
    if len(reference_captions) != n or any(len(c) == 0 for c in reference_captions):
        raise ValueError(f"reference_captions must hold a non-empty caption list for each of the {n} images")
    check_int(n_tokens, "n_tokens", maximum=model.cfg.d_vocab)
    methods = tuple(methods)
    if not methods or any(m not in ("embed", "unembed") for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct of 'embed', 'unembed', got {methods!r}")
    vectors = {SOURCES[0]: x, SOURCES[1]: matched_norm_vectors(x, torch.Generator().manual_seed(seed))}
    texts = {(m, s): token_texts(model, nearest_tokens(model, v, n_tokens, m)[0])
             for m in methods for s, v in vectors.items()}
    refs = [list(c) for c in reference_captions]
    uniq = sorted({t for per in texts.values() for row in per for t in row} | {c for cs in refs for c in cs})
    vec = dict(zip(uniq, np.asarray(embed(uniq))))
    as_mat = lambda ts: np.stack([vec[t] for t in ts])  # noqa: E731
    caps = [as_mat(cs) for cs in refs]
    scores, pairing, ks = {}, {}, {}
    for key, per in texts.items():
        text_emb = [as_mat(row) for row in per]
        pair = pair_similarities(text_emb, caps)
        scores[key] = np.stack([pair[i][i] for i in range(n)])
        pairing[key] = text_similarity_test(text_emb, caps, rng=np.random.default_rng(seed), n_perm=n_perm)
    for m in methods:
        r = stats.ks_2samp(scores[(m, SOURCES[0])].ravel(), scores[(m, SOURCES[1])].ravel())
        ks[m] = (float(r.statistic), float(r.pvalue))
    return Decodability(texts=texts, scores=scores, pairing=pairing, ks=ks, n_tokens=n_tokens, methods=methods)
