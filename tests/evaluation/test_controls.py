"""Specificity controls: each control set is what it claims (TransformerLens's own cache as the
magnitude oracle, the probe's targets for the other-image draw, the layers for random units), each
measure equals the library's own single-set functions on those sets (``ablate_units``,
``heatmap_ious``, cosines by hand), and the intervals and gaps are consistent with the values."""

import numpy as np
import pandas as pd
import pytest
import torch

from tl_multimodal.analysis.ablation import ablate_units
from tl_multimodal.evaluation.controls import (ARMS, SpecificityControls, bootstrap_interval, magnitude_matched_units,
                                    other_image_units, specificity_controls, unit_magnitudes)
from tl_multimodal.analysis.decoding import clean_token, decode_units
from tl_multimodal.analysis.heatmaps import heatmap_ious
from tl_multimodal.analysis.probe import make_probe

PROMPT = "A picture of a"


def test_unit_magnitudes_are_the_cache_max_over_image_slots(small_vlm_on, pixels):
    mag = unit_magnitudes(small_vlm_on, pixels, batch_size=2)
    tokens = small_vlm_on.to_tokens(PROMPT, image=True).expand(3, -1)
    with torch.no_grad():
        _, cache = small_vlm_on.run_with_cache(tokens, images=pixels)
    slots = small_vlm_on.image_mask(tokens)[0]
    want = torch.stack([cache[f"blocks.{l}.mlp.hook_post"][:, slots].abs().amax(1) for l in range(2)], 1)
    assert mag.shape == (3, 2, 64)
    torch.testing.assert_close(mag, want)


def test_other_image_units_come_from_an_image_with_another_target():
    ranked = torch.arange(5 * 3 * 2).reshape(5, 3, 2)
    targets = ["dog", "dog", "cat", "bus", "dog"]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        units, donors = other_image_units(ranked, targets, gen)
        assert torch.equal(units, ranked[donors])
        assert all(targets[d] != t for d, t in zip(donors.tolist(), targets))
        seen.add(int(donors[0]))
    assert seen == {2, 3}  # both images with another target are drawn
    units, donors = other_image_units(ranked[:2], targets[:2])  # no image with another target: no donor
    assert donors.tolist() == [-1, -1] and torch.equal(units, ranked[:2])
    with pytest.raises(ValueError, match="2 targets for 5 images"):
        other_image_units(ranked, targets[:2])


def test_magnitude_matching_picks_units_within_the_tolerance():
    gen = torch.Generator().manual_seed(1)
    mag = torch.rand(2, 3, 50, generator=gen) * 10
    units = torch.tensor([[[0, 1], [2, 7], [2, 8], [1, 4]], [[1, 0], [1, 1], [0, 49], [2, 3]]])
    matched, within = magnitude_matched_units(units, mag, rtol=0.2, generator=gen)
    assert torch.equal(matched[..., 0], units[..., 0])  # same layers
    for i in range(2):
        own = {tuple(u) for u in units[i].tolist()}
        picked = [tuple(u) for u in matched[i].tolist()]
        assert not own & set(picked) and len(set(picked)) == len(picked)  # none of its own, no repeats
        for (l, u), (_, v), ok in zip(units[i].tolist(), matched[i].tolist(), within[i].tolist()):
            assert ok and abs(mag[i, l, v] - mag[i, l, u]) <= 0.2 * mag[i, l, u]
    # a planted layer: only unit 9 is within 1% of unit 0; the rest are far, so the 2nd match falls back
    mag = torch.full((1, 1, 20), 100.0)
    mag[0, 0, 0], mag[0, 0, 9], mag[0, 0, 1], mag[0, 0, 15] = 1.0, 1.005, 1.0, 3.0
    matched, within = magnitude_matched_units(torch.tensor([[[0, 0], [0, 1]]]), mag, rtol=0.01)
    assert matched[0, :, 1].tolist() == [9, 15] and within.tolist() == [[True, False]]  # 15: the closest left
    with pytest.raises(ValueError, match="magnitudes must be"):
        magnitude_matched_units(units, mag)


def test_bootstrap_interval_contains_the_mean():
    v = np.random.default_rng(0).normal(1.0, 1.0, 40)
    mean, lo, hi, n = bootstrap_interval(np.r_[v, np.nan])
    assert n == 40 and mean == pytest.approx(v.mean()) and lo < mean < hi
    assert hi - lo == pytest.approx(2 * 1.96 * v.std(ddof=1) / np.sqrt(40), rel=0.2)  # the normal approximation
    assert bootstrap_interval(np.array([2.0, 2.0])) == (2.0, 2.0, 2.0, 2)
    assert np.isnan(bootstrap_interval(np.array([1.0]))[1])


def _bag_of_letters(texts):
    v = np.array([[t.lower().count(ch) for ch in "abcdefghijklmnopqrstuvwxyz "] for t in texts], float) + 1e-3
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def controls(small_vlm_on, pixels):
    gen = torch.Generator().manual_seed(0)
    ranked = torch.stack([torch.stack([torch.randint(2, (8,), generator=gen),
                                       torch.randperm(64, generator=gen)[:8]], 1) for _ in range(3)])
    probe = make_probe(small_vlm_on, 3, [" dog", " cat", " dog"], PROMPT)
    refs = [["a dog on grass", "a brown dog"], ["a red bus"], ["two cats", "a cat asleep"]]
    masks = [np.zeros((32, 32), bool), None, np.zeros((32, 32), bool)]
    masks[0][4:20, 8:30], masks[2][:10] = True, True
    ctl = specificity_controls(small_vlm_on, pixels, ranked, probe, ks=(2, 8), n_units=5, n_draws=2, rtol=0.5,
                               embed=_bag_of_letters, reference_captions=refs, object_masks=masks, seed=3, n_boot=200)
    return ctl, ranked, probe, refs, masks


def test_control_sets_are_what_they_claim(small_vlm_on, pixels, controls):
    ctl, ranked, probe, _, _ = controls
    mag = unit_magnitudes(small_vlm_on, pixels)
    assert torch.equal(ctl.units[("own", 8)][0], ranked)
    for d in range(2):  # other image: a donor with another target; its own top units
        donors = ctl.donors[d]
        assert all(probe.targets[j] != probe.targets[i] for i, j in enumerate(donors.tolist()))
        assert torch.equal(ctl.units[("other_image", 5)][d], ranked[donors, :5])
        for s in (2, 5, 8):  # same layers as the own top units
            for arm in ("magnitude", "random"):
                got = ctl.units[(arm, s)][d]
                assert sorted(got[..., 0].flatten().tolist()) == sorted(ranked[:, :s, 0].flatten().tolist())
            m = ctl.units[("magnitude", s)][d]
            for i in range(3):
                for (l, u), (_, v) in zip(ranked[i, :s].tolist(), m[i].tolist()):
                    assert abs(mag[i, l, v] - mag[i, l, u]) <= 0.5 * mag[i, l, u]
    assert ctl.magnitude_within == 1


def test_measures_equal_the_single_set_functions(small_vlm_on, pixels, controls):
    ctl, ranked, probe, refs, masks = controls
    for k in (2, 8):
        for arm in ARMS:
            sets = ctl.units[(arm, k)]
            want = np.mean([ablate_units(small_vlm_on, pixels, u, probe=probe).rel_change.numpy() for u in sets], 0)
            np.testing.assert_allclose(ctl.values[(f"ablation k={k}", arm)], want, rtol=1e-5, atol=1e-7)
    for arm in ARMS:  # decoded similarity by hand: interpretable units' texts vs the image's captions
        per_draw = []
        for u in ctl.units[(arm, 5)]:
            dec = decode_units(small_vlm_on, u.reshape(-1, 2), n_tokens=10)
            row = []
            for i in range(3):
                t = [" ".join(clean_token(x) for x in dec.tokens[i * 5 + r]) for r in range(5)
                     if dec.interpretable[i * 5 + r]]
                row.append((_bag_of_letters(t) @ _bag_of_letters(refs[i]).T).mean() if t else np.nan)
            per_draw.append(row)
        with np.errstate(all="ignore"):
            want = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in np.array(per_draw).T])
        np.testing.assert_allclose(ctl.values[("decoded similarity", arm)], want, rtol=1e-6)
        ious = [heatmap_ious(small_vlm_on, pixels[[0, 2]], u[[0, 2]], [masks[0], masks[2]]).iou.nanmean(1).numpy()
                for u in ctl.units[(arm, 5)]]
        got = ctl.values[("heatmap IoU", arm)]
        assert np.isnan(got[1])  # no mask
        np.testing.assert_allclose(got[[0, 2]], np.nanmean(ious, 0), rtol=1e-6)


def test_table_intervals_and_gaps(controls):
    ctl = controls[0]
    df = ctl.to_dataframe()
    assert isinstance(ctl, SpecificityControls) and isinstance(df, pd.DataFrame)
    assert list(df.measure.unique()) == ["ablation k=2", "ablation k=8", "decoded similarity", "heatmap IoU"]
    for r in df.itertuples():
        v = ctl.values[(r.measure, r.arm)]
        assert r.mean == pytest.approx(np.nanmean(v)) and r.n_images == np.isfinite(v).sum()
        if r.n_images >= 2:
            assert r.low <= r.mean <= r.high
        if r.arm != "own":
            gap = ctl.values[(r.measure, "own")] - v
            assert r.gap == pytest.approx(np.nanmean(gap.astype(float)))  # in float64, as the table
            if np.isfinite(gap).sum() >= 2:
                assert r.gap_low <= r.gap <= r.gap_high
        else:
            assert np.isnan(r.gap)
    text = repr(ctl)
    assert "magnitude-matched units" in text and "ablation k=8" in text and "[" in text


def test_bad_input(small_vlm_on, pixels, controls):
    _, ranked, probe, refs, _ = controls
    with pytest.raises(ValueError, match="n_units and ks must be in"):
        specificity_controls(small_vlm_on, pixels, ranked, probe, ks=(9,))
    with pytest.raises(ValueError, match="embed and reference_captions together"):
        specificity_controls(small_vlm_on, pixels, ranked, probe, ks=(2,), embed=_bag_of_letters)
    with pytest.raises(ValueError, match="n_draws must be"):
        specificity_controls(small_vlm_on, pixels, ranked, probe, ks=(2,), n_draws=0)
    with pytest.raises(ValueError, match="2 object masks for 3 images"):
        specificity_controls(small_vlm_on, pixels, ranked, probe, ks=(2,), object_masks=[None, None])
    probe = make_probe(small_vlm_on, 3, [" dog", " dog", " cat"], PROMPT)  # images 0 and 1: only image 2 to draw
    one = specificity_controls(small_vlm_on, pixels, ranked, probe, ks=(2,), n_draws=2)
    assert (one.donors[:, :2] == 2).all() and set(one.donors[:, 2].tolist()) <= {0, 1}
    same = specificity_controls(small_vlm_on, pixels, ranked, make_probe(small_vlm_on, 3, " dog", PROMPT), ks=(2,))
    assert np.isnan(same.values[("ablation k=2", "other_image")]).all() and (same.donors == -1).all()
    assert np.isfinite(same.values[("ablation k=2", "random")]).all()
    assert same.to_dataframe().set_index("arm").loc["other_image", "n_images"] == 0
