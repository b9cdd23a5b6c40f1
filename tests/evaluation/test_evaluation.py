"""The decoded-text similarity test on planted embeddings: matched texts that are their captions
are found (small p), texts unrelated to every caption are not, and the numbers equal a brute-force
computation."""

import numpy as np
import pytest

from tl_multimodal.evaluation.neurons import SimilarityTest, text_similarity_test


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
    one = text_similarity_test(caps[:1], caps[:1])  # one image: no random pairing, no test
    assert one.matched == pytest.approx((caps[0] @ caps[0].T).mean()) and np.isnan(one.random) and np.isnan(one.mwu_p)


# ------------------------------------------------------------------ measurements on a tiny model

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import stats  # noqa: E402

from tl_multimodal.analysis.ablation import ablate_units, ablation_curve, sample_matched_units  # noqa: E402
from tl_multimodal.analysis.decoding import clean_token  # noqa: E402
from tl_multimodal.evaluation.neurons import (AblationSummary, IoUTest, coco_object_masks, heatmap_iou_test,  # noqa: E402
                                      summarize_ablation, unit_texts)

PROMPT, TARGET = "A picture of a", [3290, 5044, 2415]
WORDS = [" house", " water", " green", " table", " people", " small", " river", " night", " light", " stone"]


def test_unit_texts_keep_the_planted_word_unit(backend, gpt2_tokenizer, vit_encoder):
    from conftest import build_vlm, hf_mlp, tiny_hf

    hf = tiny_hf("gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=64, dtype=torch.float32, seed=3)  # small_vlm_on's
    ids = [gpt2_tokenizer.encode(w)[0] for w in WORDS]
    with torch.no_grad():  # unit (1, 7) writes e_0; only the 10 word tokens read e_0 (in rank order)
        W_U = hf.lm_head.weight.T  # [d_model, d_vocab], a view (the unembedding is not tied)
        W_U[0] = 0.0
        W_U[0, ids] = torch.linspace(100, 50, 10)
        W_out = hf_mlp(hf, 1)["W_out"]
        W_out[7] = 0.0
        W_out[7, 0] = 1.0
    m = build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)
    assert m.W_out[1, 7, 0] == 1.0 and m.W_U[0, ids[0]] == 100.0  # the plant is in the model either way
    units = torch.tensor([[[0, 3], [1, 7], [1, 2]], [[1, 7], [0, 1], [0, 0]]])
    texts, interp = unit_texts(m, units)
    planted = " ".join(clean_token(w) for w in WORDS)
    assert interp[0, 1] and interp[1, 0] and planted == "house water green table people small river night light stone"
    assert texts[0][[r for r in range(3) if interp[0, r]].index(1)] == planted == texts[1][0]
    assert [len(t) for t in texts] == interp.sum(1).tolist()
    with pytest.raises(ValueError, match="n_images, n_units, 2"):
        unit_texts(m, units[0])


def test_ablation_summary_from_ablate_units(small_vlm_on, pixels):
    ranked = torch.tensor([[0, 5], [1, 3], [0, 9], [1, 40], [1, 30], [0, 47]])
    curve = ablation_curve(small_vlm_on, pixels, ranked, TARGET, prompt=PROMPT, ks=[2, 5], n_random_seeds=3, seed=4)
    s = summarize_ablation(curve)
    assert isinstance(s, AblationSummary) and s.ks == [2, 5] and (s.n_images, s.n_draws) == (3, 3)
    rel = lambda r: ((r.p_after - r.p_before) / r.p_before).mean().item()  # noqa: E731
    g = torch.Generator().manual_seed(4)
    for i, k in enumerate([2, 5]):
        assert s.top[i] == pytest.approx(rel(ablate_units(small_vlm_on, pixels, ranked[:k], TARGET, PROMPT)), rel=1e-5)
        draws = [rel(ablate_units(small_vlm_on, pixels, sample_matched_units(ranked[:k], 64, g), TARGET, PROMPT))
                 for _ in range(3)]
        assert s.random[i] == pytest.approx(np.mean(draws), rel=1e-5, abs=1e-7)
        assert s.random_sd[i] == pytest.approx(np.std(draws), rel=1e-4, abs=1e-7)
    p_before = ablate_units(small_vlm_on, pixels, ranked[:1], TARGET, PROMPT).p_before
    assert s.p_before == pytest.approx(p_before.mean().item())
    assert list(s.to_dataframe().columns) == ["k", "top", "random", "random_sd"] and "k=5" in repr(s)
    with pytest.raises(TypeError, match="AblationCurve"):
        summarize_ablation(s)


def _iou_bounds(cache, image, layer, unit, obj):
    """The IoU of the unit's 95th-percentile mask with ``obj``, by hand in float64, as an interval: pixels
    within float32 rounding of the threshold (near-ties) may fall either side of it, so the interval
    spans every such choice (a point where no pixel is that close)."""
    grid = cache[f"blocks.{layer}.mlp.hook_post"][image, :16, unit].reshape(1, 1, 4, 4).double()
    hm = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    thr = np.percentile(hm, 95)
    tol = 1e-5 * max(hm.max() - hm.min(), abs(thr), 1e-30)  # far above float32 rounding of a few ops
    sure, maybe = hm >= thr + tol, hm >= thr - tol
    return (sure & obj).sum() / (maybe | obj).sum(), (maybe & obj).sum() / (sure | obj).sum()


def _mean_bounds(bounds):
    lo, hi = np.array(bounds).T
    return lo.mean(), hi.mean()


def test_heatmap_iou_test_by_hand(small_vlm_on, pixels):
    units = torch.tensor([[[0, 5], [1, 3]], [[1, 9], [1, 60]], [[0, 2], [0, 8]]])
    objs = [np.zeros((32, 32), bool) for _ in range(3)]
    objs[0][4:20, 8:30], objs[1][16:, :16], objs[2][:10, :] = True, True, True
    res = heatmap_iou_test(small_vlm_on, pixels, units, objs, n_random_seeds=2, seed=3)
    with torch.no_grad():
        _, cache = small_vlm_on.run_with_cache(PROMPT, images=pixels)
    top = [_mean_bounds([_iou_bounds(cache, i, l, u, objs[i]) for l, u in units[i].tolist()]) for i in range(3)]
    g = torch.Generator().manual_seed(3)
    draws = [sample_matched_units(units, 64, g) for _ in range(2)]
    rand = [_mean_bounds([_iou_bounds(cache, i, l, u, objs[i]) for d in draws for l, u in d[i].tolist()])
            for i in range(3)]
    for got, want in ((res.top, top), (res.random, rand)):
        lo, hi = np.array(want).T
        assert np.all(lo * (1 - 1e-5) <= got) and np.all(got <= hi * (1 + 1e-5)), (got, want)
    top, rand = res.top, res.random  # inside the oracle's intervals: the test statistics follow from them
    w = stats.wilcoxon(top, rand, alternative="greater")
    assert (res.wilcoxon_W, res.wilcoxon_p) == pytest.approx((w.statistic, w.pvalue))
    assert isinstance(res, IoUTest) and res.mean_top == pytest.approx(np.mean(top)) and "IoUTest(3 images" in repr(res)
    assert isinstance(res.to_dataframe(), pd.DataFrame) and len(res.to_dataframe()) == 3
    one = heatmap_iou_test(small_vlm_on, pixels[:1], units[:1], objs[:1], n_random_seeds=1)
    assert np.isnan(one.wilcoxon_p) and one.top[0] == pytest.approx(top[0], rel=1e-6)
    with pytest.raises(ValueError, match="units for 2 images, 3 images"):
        heatmap_iou_test(small_vlm_on, pixels, units[:2], objs)
    with pytest.raises(ValueError, match="n_random_seeds"):
        heatmap_iou_test(small_vlm_on, pixels, units, objs, n_random_seeds=0)


def test_coco_object_masks_pick_the_noun_and_crop_like_timm(small_vlm_on, tmp_path):
    import json

    import timm
    from PIL import Image
    from pycocotools.coco import COCO

    ann = {"images": [{"id": i, "width": 48, "height": 40} for i in (1, 2)],
           "categories": [{"id": 1, "name": "person"}, {"id": 4, "name": "bus"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 50, "bbox": [0, 0, 1, 1], "iscrowd": 0,
                            "segmentation": [[10, 8, 30, 8, 30, 30, 10, 30]]},
                           {"id": 2, "image_id": 1, "category_id": 4, "area": 90, "bbox": [0, 0, 1, 1], "iscrowd": 0,
                            "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]}]}
    (tmp_path / "i.json").write_text(json.dumps(ann))
    coco = COCO(str(tmp_path / "i.json"))
    images = [Image.new("RGB", (48, 40)) for _ in range(2)]
    kept, cats, masks = coco_object_masks(small_vlm_on, coco, [1, 2], ["woman", None], images)
    assert kept == [0] and cats == [(1, "person", "noun")]  # image 2 has no annotation
    # oracle: the person's mask drawn as an image, through timm's own eval transform
    im = Image.new("L", (48, 40), 0)
    im.paste(255, (10, 8, 30, 30))
    seen = timm.data.create_transform(**small_vlm_on.vision.data_config | {"mean": (0,) * 3, "std": (1,) * 3})(
        im.convert("RGB"))[0] > 0.5
    assert masks[0].shape == seen.shape and (masks[0] != seen).float().mean() < 0.05
    with pytest.raises(ValueError, match="2 image_ids, 1 nouns"):
        coco_object_masks(small_vlm_on, coco, [1, 2], ["x"], images)


def _bag_of_letters(texts):
    """A deterministic stand-in sentence encoder: normalised letter counts."""
    v = np.array([[t.lower().count(ch) for ch in "abcdefghijklmnopqrstuvwxyz "] for t in texts], float) + 1e-3
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_eval_config_round_trips_and_unknown_settings_are_named():
    from tl_multimodal.evaluation.config import EvalConfig
    from tl_multimodal.evaluation.neurons import evaluate_neurons

    config = EvalConfig(n_units=4, ks=[5, 2], hook="pre", over_patches="max", normalize=None, control_ks=())
    assert config.ks == (2, 5) and EvalConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["ks"] == [2, 5] and config.replace(seed=2).seed == 2
    assert repr(config) == ("EvalConfig(n_units=4, ks=(2, 5), hook='pre', over_patches='max', normalize=None, "
                            "control_ks=())")
    with pytest.raises(TypeError, match="unknown EvalConfig setting k; the settings are: n_units, ks, prompt"):
        evaluate_neurons(None, [], [], None, k=3)  # refused before the model is touched
    with pytest.raises(ValueError, match="over_patches must be one of"):
        EvalConfig(over_patches="mean")
    with pytest.raises(ValueError, match="ks must hold at least one k"):
        EvalConfig(ks=())
    with pytest.raises(ValueError, match="n_units must be >= 1, got 0"):
        config.replace(n_units=0)


def test_evaluate_neurons_is_its_parts(small_vlm_on, tmp_path):
    import json

    from PIL import Image
    from pycocotools.coco import COCO

    from tl_multimodal.analysis.attribution import attribute_dataset
    from tl_multimodal.evaluation.config import EvalConfig
    from tl_multimodal.evaluation.neurons import NeuronsEval, evaluate_neurons, text_similarity_test

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    refs = [["a dog on grass", "a brown dog"], ["a red bus", "a bus in town"], ["two cats", "a cat asleep"]]
    poly = [[8, 8, 40, 8, 40, 36, 8, 36]]
    ann = {"images": [{"id": i, "width": 48, "height": 40} for i in (11, 12, 13)],
           "categories": [{"id": 4, "name": "bus"}],
           "annotations": [{"id": j, "image_id": i, "category_id": 4, "area": 9, "bbox": [0, 0, 1, 1], "iscrowd": 0,
                            "segmentation": poly} for j, i in enumerate((11, 12))]}
    (tmp_path / "i.json").write_text(json.dumps(ann))
    coco = COCO(str(tmp_path / "i.json"))
    kw = dict(n_units=4, ks=(5, 2), max_new_tokens=3, n_perm=50, ablation_seeds=2, iou_seeds=2, seed=1, batch_size=2,
              control_ks=(5,), control_draws=1)
    ev = evaluate_neurons(small_vlm_on, images, refs, _bag_of_letters, coco=coco, image_ids=[11, 12, 13], **kw)
    assert isinstance(ev, NeuronsEval) and ev.top_units.shape == (3, 4, 2) and ev.ablation.ks == [2, 5]
    assert ev.config == EvalConfig(**kw) and ev.config.ks == (2, 5)
    # the parts, called by hand
    res = attribute_dataset(small_vlm_on, [images[:2], images[2:]], n_units=5, prompt="A picture of", batch_size=2,
                            max_new_tokens=3, until="caption", hook="post", over_patches="sum", normalize="layer")
    ranked = res.top_units.units_per_image()
    assert torch.equal(ev.top_units, ranked[:, :4]) and ev.captions == res.captions and ev.targets == res.targets
    texts, interp = unit_texts(small_vlm_on, ranked[:, :4])
    assert torch.equal(ev.interpretable, interp)
    r = np.random.default_rng(1)
    as_mat = lambda ts: _bag_of_letters(ts) if ts else np.zeros((0, 27))  # noqa: E731
    ref = text_similarity_test([as_mat(t) for t in texts], [as_mat(c) for c in refs], rng=r, n_perm=50)
    assert ev.text_similarity.to_dict() == pytest.approx(ref.to_dict(), nan_ok=True)
    own = text_similarity_test([as_mat([c]) for c in res.captions], [as_mat(c) for c in refs], rng=r, n_perm=50)
    assert ev.own_captions.to_dict() == pytest.approx(own.to_dict(), nan_ok=True)
    curve = ablation_curve(small_vlm_on, images, ranked, ks=[2, 5], probe=res.probe, n_random_seeds=2, seed=1)
    assert ev.ablation.top == pytest.approx(summarize_ablation(curve).top, rel=1e-5)
    assert ev.iou_images == [0, 1] and [c[1] for c in ev.iou_objects] == ["bus", "bus"]
    kept, _, masks = coco_object_masks(small_vlm_on, coco, [11, 12], [None, None], images[:2])
    iou = heatmap_iou_test(small_vlm_on, small_vlm_on.preprocess(images[:2]), ranked[:2, :4], masks, n_random_seeds=2, seed=1)
    np.testing.assert_allclose(ev.heatmap_iou.top, iou.top, rtol=1e-5)
    from tl_multimodal.evaluation.controls import specificity_controls

    ctl = specificity_controls(small_vlm_on, small_vlm_on.preprocess(images), ranked, res.probe, ks=(5,),
                               n_units=4, n_draws=1, embed=_bag_of_letters, reference_captions=refs,
                               object_masks=[masks[0], masks[1], None], seed=1)
    for key, v in ctl.values.items():
        np.testing.assert_allclose(ev.controls.values[key], v, rtol=1e-5)
    d = ev.to_dict([11, 12, 13])
    assert d["heatmap_iou"]["n_images"] == 2 and d["images"][2]["image_id"] == 13 and d["ablation"]["ks"] == [2, 5]
    json.dumps(d)
    assert d["config"] == EvalConfig(**kw).to_dict() and d["config"]["ks"] == [2, 5]
    df = ev.to_dataframe()
    assert len(df) == 3 and np.isnan(df["iou_top"][2]) and "NeuronsEval(3 images" in repr(ev)
    no_coco = evaluate_neurons(small_vlm_on, images[:1], refs[:1], _bag_of_letters, **kw)
    assert no_coco.heatmap_iou is None and no_coco.to_dict()["heatmap_iou"] == {"n_images": 0}
    with pytest.raises(ValueError, match="2 reference caption sets for 3 images"):
        evaluate_neurons(small_vlm_on, images, refs[:2], _bag_of_letters)
    with pytest.raises(ValueError, match="coco and image_ids"):
        evaluate_neurons(small_vlm_on, images, refs, _bag_of_letters, coco=coco)
