"""Ablation and activation patching of MLP units at image positions, against manual hooked
computations and TransformerLens's own patching functions, on a HookedVisionPrefix and a
VisionBridge built from the same HF weights."""

from functools import partial

import matplotlib
import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

from tl_multimodal.analysis.ablation import ablate_units, ablation_curve, mean_unit_activations, sample_matched_units
from tl_multimodal.analysis.patching import get_act_patch_mlp_neuron, patch_resid, patch_units, unit_patch_sweep
from tl_multimodal.analysis.probe import target_probability

from conftest import build_vlm, hf_mlp, tiny_hf


def target_prob_metric(pred_pos, target):
    """The batch-mean p(c), written out for TransformerLens's patching functions (the oracle side)."""
    return lambda logits: target_probability(logits, pred_pos, target).mean()

matplotlib.use("Agg")

PROMPT = "A picture of a"
TARGET = [3290, 5044, 2415]  # arbitrary valid token ids, one per image


def _tiny_vlm(backend, tokenizer, encoder, gated: bool, seed: int):
    """3 layers of 48 units (GPT-2-style, or gated Llama-style), float32, as ``backend``."""
    hf = tiny_hf("llama" if gated else "gpt2", n_layers=3, d_mlp=48, dtype=torch.float32, seed=seed, init=0.2,
                 widen=1.0)
    with torch.no_grad():  # plant unit (0, 5): strongly active on the image, with a big output
        mlp = hf_mlp(hf, 0)
        mlp["W_in"][:, 5] *= 8
        if gated:
            mlp["W_gate"][:, 5] *= 8
        mlp["W_out"][5] *= 30
        for layer in range(3):  # larger MLP biases (where there are), so that zero-ablating everything differs from b_out=0
            if hf_mlp(hf, layer)["b_out"] is not None:
                hf_mlp(hf, layer)["b_out"].normal_(0, 0.3)
    return build_vlm(backend, hf, tokenizer, encoder)


@pytest.fixture(scope="module", params=["gelu", "gated"])
def tiny_vlm(request, backend, gpt2_tokenizer, vit_encoder):
    gated = request.param == "gated"  # seed 12: the planted gated unit is active on all three images
    return _tiny_vlm(backend, gpt2_tokenizer, vit_encoder, gated=gated, seed=12 if gated else 10)


@pytest.fixture(scope="module")
def gelu_vlm(backend, gpt2_tokenizer, vit_encoder):
    return _tiny_vlm(backend, gpt2_tokenizer, vit_encoder, gated=False, seed=11)


def _manual_p(model, pixels, units, prompt=PROMPT, target=TARGET):
    """p(c) with units zero-ablated at image positions, by subtracting their W_out rows from mlp_out."""
    n_img = model.n_image_tokens
    store = {}
    hooks = []
    for layer in sorted({layer for layer, _ in units}):
        ks = [k for l_, k in units if l_ == layer]

        def record(act, hook, layer=layer):
            store[layer] = act.clone()

        def subtract(out, hook, layer=layer, ks=ks):
            post = store[layer][:, :n_img, ks]  # [batch, img, k]
            W = model.blocks[layer].mlp.W_out[ks]  # [k, d_model]
            out[:, :n_img] = out[:, :n_img] - post @ W
            return out

        hooks += [(f"blocks.{layer}.mlp.hook_post", record), (f"blocks.{layer}.hook_mlp_out", subtract)]
    tokens = model.to_tokens(prompt, image=True).expand(len(pixels), -1)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, images=pixels, fwd_hooks=hooks)
    return torch.softmax(logits[:, -1].float(), -1)[torch.arange(len(pixels)), torch.tensor(TARGET)]


def test_zero_ablating_planted_unit_matches_manual(tiny_vlm, pixels):
    res = ablate_units(tiny_vlm, pixels, [(0, 5)], TARGET, prompt=PROMPT)
    manual = _manual_p(tiny_vlm, pixels, [(0, 5)])
    torch.testing.assert_close(res.p_after, manual, rtol=1e-4, atol=1e-9)
    assert ((res.p_after - res.p_before).abs() / res.p_before > 1e-2).all()  # the unit matters
    torch.testing.assert_close(res.rel_change, (res.p_after - res.p_before) / res.p_before)
    df = res.to_dataframe()
    assert list(df.columns) == ["image", "target", "p_before", "p_after", "rel_change"] and len(df) == 3
    assert "AblationResult(3 images, 1 units zero-ablated" in repr(res)


def test_zero_ablating_units_in_later_layers_matches_manual(tiny_vlm, pixels):
    units = [(1, 3), (1, 40), (2, 0), (2, 7), (0, 5)]
    res = ablate_units(tiny_vlm, pixels, torch.tensor(units), TARGET, prompt=PROMPT)
    torch.testing.assert_close(res.p_after, _manual_p(tiny_vlm, pixels, units), rtol=1e-4, atol=1e-9)


def test_zero_ablating_all_units_leaves_b_out(tiny_vlm, pixels):
    m = tiny_vlm
    units = [(layer, k) for layer in range(m.cfg.n_layers) for k in range(m.cfg.d_mlp)]
    res = ablate_units(m, pixels, units, TARGET, prompt=PROMPT)

    def set_bias(out, hook, layer):
        b_out = m.blocks[layer].mlp.b_out  # None: an MLP without bias (HF Llama on the bridge)
        out[:, m.image_positions] = 0.0 if b_out is None else b_out
        return out

    tokens = m.to_tokens(PROMPT, image=True).expand(3, -1)
    with torch.no_grad():
        logits = m.run_with_hooks(tokens, images=pixels, fwd_hooks=[
            (f"blocks.{layer}.hook_mlp_out", partial(set_bias, layer=layer)) for layer in range(m.cfg.n_layers)])
    manual = torch.softmax(logits[:, -1].float(), -1)[torch.arange(3), torch.tensor(TARGET)]
    torch.testing.assert_close(res.p_after, manual, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(res.p_after, res.p_before, rtol=1e-3)


def test_ablating_nothing_changes_nothing(tiny_vlm, pixels):
    res = ablate_units(tiny_vlm, pixels, torch.zeros(0, 2, dtype=torch.long), TARGET, prompt=PROMPT)
    assert torch.equal(res.p_after, res.p_before)
    with torch.no_grad():
        logits = tiny_vlm(PROMPT, images=pixels)
    torch.testing.assert_close(res.p_before, target_probability(logits, torch.tensor([19] * 3), torch.tensor(TARGET)))


def test_mean_ablation_with_the_actual_activations_is_a_noop(gelu_vlm, pixels):
    m, px = gelu_vlm, pixels[:1]
    means = mean_unit_activations(m, px)
    _, cache = m.run_with_cache(PROMPT, images=px)
    torch.testing.assert_close(means[2], cache["blocks.2.mlp.hook_post"][0, m.image_positions])
    units = [(layer, k) for layer in range(m.cfg.n_layers) for k in range(m.cfg.d_mlp)]
    res = ablate_units(m, px, units, TARGET[0], prompt=PROMPT, mode="mean", mean_acts=means)
    torch.testing.assert_close(res.p_after, res.p_before, rtol=1e-5, atol=0)
    # ... while the means of another image, or means pooled over positions, do change p(c)
    other = ablate_units(m, px, units, TARGET[0], prompt=PROMPT, mode="mean",
                         mean_acts=mean_unit_activations(m, pixels[1:2]))
    pooled = ablate_units(m, px, units, TARGET[0], prompt=PROMPT, mode="mean", mean_acts=means.mean(1))
    assert not torch.allclose(other.p_after, other.p_before, rtol=1e-3)
    assert not torch.allclose(pooled.p_after, pooled.p_before, rtol=1e-3)
    assert mean_unit_activations(m, pixels, per_position=False).shape == (m.cfg.n_layers, m.cfg.d_mlp)


def test_per_image_units_and_per_image_prompts(gelu_vlm, pixels):
    m = gelu_vlm
    units = torch.tensor([[[0, 5], [1, 2]], [[2, 9], [0, 1]], [[1, 1], [1, 2]]])
    prompts = ["A picture of a", "A photo of", "Look at this small"]  # different lengths: right padding
    res = ablate_units(m, pixels, units, TARGET, prompt=prompts)
    for i in range(3):
        one = ablate_units(m, pixels[i:i + 1], units[i], TARGET[i], prompt=prompts[i])
        torch.testing.assert_close(res.p_after[i:i + 1], one.p_after, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(res.p_before[i:i + 1], one.p_before, rtol=1e-4, atol=1e-9)


def test_sample_matched_units_keeps_layer_counts():
    g = torch.Generator().manual_seed(0)
    units = torch.tensor([[3, 1], [3, 2], [0, 7], [3, 5], [5, 0], [0, 1]])
    r = sample_matched_units(units, d_mlp=10, generator=g)
    assert r.shape == units.shape
    assert torch.equal(r[:, 0].bincount(minlength=6), units[:, 0].bincount(minlength=6))
    for layer in (0, 3, 5):
        u = r[r[:, 0] == layer, 1]
        assert len(u.unique()) == len(u) and ((u >= 0) & (u < 10)).all()
    # the whole layer when all of it is asked for; per-image sets keep per-image counts
    assert sorted(sample_matched_units([(2, k) for k in range(10)], 10)[:, 1].tolist()) == list(range(10))
    per = torch.stack([units, torch.tensor([[1, 0]] * 6)])
    rp = sample_matched_units(per, 10, g)
    assert torch.equal(rp[0][:, 0].sort().values, units[:, 0].sort().values) and (rp[1][:, 0] == 1).all()
    draws = {tuple(sample_matched_units(units, 10, g)[:, 1].tolist()) for _ in range(5)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="more units in a layer"):
        sample_matched_units([(0, k) for k in range(11)], 10)


def test_ablation_curve_matches_ablate_units(gelu_vlm, pixels):
    m = gelu_vlm
    ranked = torch.tensor([[0, 5], [2, 3], [0, 9], [1, 4], [1, 30], [2, 47]])
    curve = ablation_curve(m, pixels, ranked, TARGET, prompt=PROMPT, ks=[0, 2, 5], n_random_seeds=2, seed=1)
    assert curve.p_top.shape == (3, 3) and curve.p_random.shape == (3, 2, 3)
    torch.testing.assert_close(curve.p_top[0], curve.p_before)
    torch.testing.assert_close(curve.p_random[0], curve.p_before.expand(2, -1))
    for i, k in enumerate([2, 5]):
        ref = ablate_units(m, pixels, ranked[:k], TARGET, prompt=PROMPT)
        torch.testing.assert_close(curve.p_top[i + 1], ref.p_after)
        torch.testing.assert_close(curve.p_before, ref.p_before)
    # the random draws are the layer-matched samples of the same generator
    g = torch.Generator().manual_seed(1)
    for i, k in enumerate([0, 2, 5]):
        for s in range(2):
            rand = sample_matched_units(ranked[:k], m.cfg.d_mlp, g)
            torch.testing.assert_close(curve.p_random[i, s], ablate_units(m, pixels, rand, TARGET, PROMPT).p_after)
    df = curve.to_dataframe()
    assert len(df) == 3 * 3 * (1 + 2) and set(df["kind"]) == {"top", "random"}
    assert isinstance(curve.plot(), matplotlib.figure.Figure)
    assert repr(curve).startswith("AblationCurve(3 images")
    with pytest.raises(ValueError, match="ks must be"):
        ablation_curve(m, pixels, ranked, TARGET, ks=[7])


def test_bad_inputs_raise(gelu_vlm, pixels):
    m = gelu_vlm
    with pytest.raises(ValueError, match="layers must be in"):
        ablate_units(m, pixels, [(3, 0)], TARGET)
    with pytest.raises(ValueError, match="unit indices"):
        ablate_units(m, pixels, [(0, 48)], TARGET)
    dog = m.tokenizer(" dog")["input_ids"][0]
    torch.testing.assert_close(ablate_units(m, pixels, [(0, 1)], "dog").p_after,
                               ablate_units(m, pixels, [(0, 1)], dog).p_after)  # a string is its token
    with pytest.raises(ValueError, match="multi_token"):
        ablate_units(m, pixels, [(0, 1)], " hippopotamus")
    with pytest.raises(ValueError, match="2 targets for 3 images"):
        ablate_units(m, pixels, [(0, 1)], [1, 2])
    with pytest.raises(ValueError, match=r"positions \[999\] are out of range"):
        ablate_units(m, pixels, [(0, 1)], TARGET, positions=[999])
    with pytest.raises(ValueError, match=r"positions \[999\] are out of range"):
        patch_units(m, pixels, pixels.flip(0), [(0, 1)], TARGET, positions=[999])
    with pytest.raises(ValueError, match="needs mean_acts"):
        ablate_units(m, pixels, [(0, 1)], TARGET, mode="mean")
    with pytest.raises(ValueError, match="mean_acts must be"):
        ablate_units(m, pixels, [(0, 1)], TARGET, mode="mean", mean_acts=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="unknown hook 'hook_mlp_out'"):
        ablate_units(m, pixels, [(0, 1)], TARGET, hook="hook_mlp_out")
    with pytest.raises(ValueError, match="pair them"):
        patch_units(m, pixels, pixels[:2], [(0, 1)], TARGET)


# ---------------------------------------------------------------------------------- patching
def test_bind_images_lets_tl_run_on_image_tokens_and_nests(gelu_vlm, pixels):
    m = gelu_vlm
    tokens = m.to_tokens(PROMPT, image=True).expand(3, -1)
    with torch.no_grad():
        ref_a, ref_b = m(tokens, images=pixels), m(tokens, images=pixels.flip(0))
        with m.bind_images(pixels):
            torch.testing.assert_close(m(tokens), ref_a)
            torch.testing.assert_close(m(tokens, images=pixels.flip(0)), ref_b)  # explicit images win
            torch.testing.assert_close(m(tokens), ref_a)  # ... and the binding survives them
    with pytest.raises(ValueError, match="no images were given"):
        m(tokens)


def test_resid_patch_agrees_with_get_act_patch_resid_pre(gelu_vlm, pixels):
    vlm = gelu_vlm
    src, base = pixels[:1], pixels[1:2]
    tokens = vlm.to_tokens(PROMPT, image=True)
    target = torch.tensor([TARGET[0]])
    metric = target_prob_metric(torch.tensor([tokens.shape[1] - 1]), target)
    cases = [(0, 0), (1, 15), (2, tokens.shape[1] - 1)]
    with torch.no_grad():
        _, src_cache = vlm.run_with_cache(tokens, images=src)
        with vlm.bind_images(base):  # TL's function, unchanged, on the listed (layer, pos) only
            tl = tl_patching.get_act_patch_resid_pre(vlm, tokens, src_cache, metric, index_axis_names=None,
                                                     index_df=pd.DataFrame(cases, columns=["layer", "pos"]))
    for (layer, pos), p_tl in zip(cases, tl.cpu()):
        res = patch_resid(vlm, src, base, target, layer=layer, positions=[pos], prompt=PROMPT)
        torch.testing.assert_close(res.p_patched[0], p_tl, rtol=1e-4, atol=1e-10)
    assert tl.std() > 0
    # the image matters: patching every image position at layer 0 moves p(c) to the source's
    full = patch_resid(vlm, src, base, target, layer=0, prompt=PROMPT)
    torch.testing.assert_close(full.p_patched, full.p_source, rtol=1e-4, atol=1e-10)
    assert not torch.allclose(full.p_base, full.p_source, rtol=1e-3)


def test_all_neurons_of_a_layer_at_a_position_equal_get_act_patch_mlp_out(tiny_vlm, pixels):
    m = tiny_vlm
    src, base = pixels[:2], pixels[1:].flip(0)
    tokens = m.to_tokens(PROMPT, image=True).expand(2, -1)
    target = torch.tensor(TARGET[:2])
    metric = target_prob_metric(torch.full((2,), tokens.shape[1] - 1), target)
    cases = [(0, 3), (1, 15), (2, 10), (0, 0)]
    with torch.no_grad():
        _, src_cache = m.run_with_cache(tokens, images=src)
        with m.bind_images(base):
            tl = tl_patching.get_act_patch_mlp_out(m, tokens, src_cache, metric, index_axis_names=None,
                                                   index_df=pd.DataFrame(cases, columns=["layer", "pos"]))
    for (layer, pos), p_tl in zip(cases, tl.cpu()):
        units = [(layer, k) for k in range(m.cfg.d_mlp)]
        res = patch_units(m, src, base, units, target, prompt=PROMPT, positions=[pos])
        torch.testing.assert_close(res.p_patched.mean(), p_tl, rtol=1e-4, atol=1e-10)
    assert tl.std() > 0  # image positions matter
    assert "PatchResult(2 pairs" in repr(res) and len(res.to_dataframe()) == 2


def test_neuron_patch_sweeps_agree_with_patch_units(gelu_vlm, pixels):
    m = gelu_vlm
    src, base = pixels[:2], pixels[1:]
    tokens = m.to_tokens(PROMPT, image=True).expand(2, -1)
    target = torch.tensor(TARGET[:2])
    metric = target_prob_metric(torch.full((2,), tokens.shape[1] - 1), target)
    with torch.no_grad():
        _, src_cache = m.run_with_cache(tokens, images=src)
        with m.bind_images(base):
            grid = get_act_patch_mlp_neuron(m, tokens, src_cache, metric, layers=[0, 2], positions=[1, 9],
                                            neurons=[5, 11, 40])
    assert grid.shape == (2, 2, 3)
    cases = [((0, 0), (0, 1), (0, 5)), ((1, 2), (1, 9), (2, 40)), ((0, 0), (1, 9), (1, 11))]  # (index, value)
    for (i, layer), (j, pos), (k, n) in cases:
        ref = patch_units(m, src, base, [(layer, n)], target, prompt=PROMPT, positions=[pos])
        torch.testing.assert_close(grid[i, j, k].cpu(), ref.p_patched.mean(), rtol=1e-4, atol=1e-10)

    units = torch.tensor([[0, 5], [1, 7], [2, 40]])
    sweep = unit_patch_sweep(m, src, base, units, target, prompt=PROMPT)
    for u, p in zip(units.tolist(), sweep.p_patched):
        ref = patch_units(m, src, base, [tuple(u)], target, prompt=PROMPT)  # all image positions
        torch.testing.assert_close(p, ref.p_patched.mean(), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(torch.tensor(sweep.p_base), ref.p_base.mean(), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(sweep.p_source), ref.p_source.mean(), rtol=1e-5, atol=0)
    assert abs(sweep.p_patched[0] - sweep.p_base) > 1e-3 * sweep.p_base  # the planted unit carries signal
    df = sweep.to_dataframe()
    assert list(df.columns) == ["layer", "unit", "p_patched", "delta"] and df["delta"].is_monotonic_decreasing
