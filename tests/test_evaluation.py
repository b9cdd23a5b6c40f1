"""The decoded-text similarity test on planted embeddings: matched texts that are their captions
are found (small p), texts unrelated to every caption are not, and the numbers equal a brute-force
computation."""

import numpy as np
import pytest

from tl_multimodal.evaluation import SimilarityTest, text_similarity_test


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _captions(rng, n_images=8, d=16):
    return [_unit(rng.normal(size=(5, d))) for _ in range(n_images)]


def test_planted_matches_are_found_and_numbers_match_brute_force():
    rng = np.random.default_rng(1)
    caps = _captions(rng)
    texts = [_unit(c[:3] + 0.1 * rng.normal(size=c[:3].shape)) for c in caps]  # near 3 of its own captions
    texts[2] = np.zeros((0, 16))  # an image with no interpretable unit
    res = text_similarity_test(texts, caps, rng=np.random.default_rng(0), n_perm=500)
    assert isinstance(res, SimilarityTest) and res.n_images == 7 and res.n_pairs == 21
    matched = np.mean([(t @ caps[i].T).mean(-1) for i, t in enumerate(texts) if len(t)], axis=0).mean()
    brute_random = np.concatenate([(t @ caps[j].T).mean(-1) for i, t in enumerate(texts)
                                   for j in range(len(caps)) if j != i and len(t)])
    assert res.matched == pytest.approx(matched) and res.random == pytest.approx(brute_random.mean())
    assert res.matched > res.random + 0.1
    assert res.mwu_p < 1e-3 and res.perm_p <= 2 / 501 and res.mwu_n_random == 21
    mx = text_similarity_test(texts, caps, reduce="max", n_perm=10)
    assert mx.matched > res.matched  # the best caption is at least the mean
    assert set(res.to_dict()) >= {"matched", "random", "mwu_p", "perm_p"} and "SimilarityTest(7 images" in repr(res)


def test_unrelated_texts_are_not_significant():
    rng = np.random.default_rng(2)
    caps = _captions(rng, n_images=10)
    texts = [_unit(rng.normal(size=(4, 16))) for _ in caps]
    res = text_similarity_test(texts, caps, rng=np.random.default_rng(0), n_perm=500)
    assert res.mwu_p > 0.01 and res.perm_p > 0.01


def test_bad_input():
    caps = _captions(np.random.default_rng(0), n_images=2)
    with pytest.raises(ValueError, match="1 text sets for 2 caption sets"):
        text_similarity_test(caps[:1], caps)
    with pytest.raises(ValueError, match="reduce must be"):
        text_similarity_test(caps, caps, reduce="median")
