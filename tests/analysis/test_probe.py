"""The query c as one object: targets as strings or ids, probes made once and taken by ablation,
patching and views, image slots wherever the tokens put them; checked against the tokenizer, manual
hooked forwards and TransformerLens's own patching."""

import pytest
import torch
from transformer_lens import patching as tl_patching

from tl_multimodal.analysis.ablation import ablate_units, ablation_curve
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.analysis.patching import patch_resid
from tl_multimodal.analysis.probe import Probe, make_probe, target_id, target_probability

PROMPT = "A picture of"


def test_target_id_strings_ids_special_and_multi_token(small_vlm_on):
    tok = small_vlm_on.tokenizer
    dog = tok(" dog")["input_ids"][0]
    assert target_id(small_vlm_on, "dog", after=PROMPT) == dog  # a space is added after text
    assert target_id(small_vlm_on, " dog", after=PROMPT) == dog
    assert target_id(small_vlm_on, "dog") == tok("dog")["input_ids"][0]
    assert target_id(small_vlm_on, dog) == dog and target_id(small_vlm_on, torch.tensor(dog)) == dog
    assert target_id(small_vlm_on, "<|endoftext|>", after=PROMPT) == tok.eos_token_id == 50256  # not the space, 220
    hippo = tok(" hippopotamus")["input_ids"]
    assert len(hippo) > 1
    with pytest.raises(ValueError, match="multi_token='first'"):
        target_id(small_vlm_on, "hippopotamus", after=PROMPT)
    assert target_id(small_vlm_on, "hippopotamus", after=PROMPT, multi_token="first") == hippo[0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target_id(small_vlm_on, small_vlm_on.cfg.d_vocab)
    with pytest.raises(ValueError, match="empty string"):
        target_id(small_vlm_on, " ")
    with pytest.raises(TypeError, match="string or a token id"):
        target_id(small_vlm_on, 3.5)
    with pytest.raises(ValueError, match="multi_token must be"):
        target_id(small_vlm_on, "dog", multi_token="last")


def test_make_probe_rows_match_the_models_tokens(small_vlm_on):
    probe = make_probe(small_vlm_on, 3, ["dog", 123, "<|endoftext|>"], prompt=PROMPT)
    tokens = small_vlm_on.to_tokens(PROMPT, image=True)[0].cpu()
    assert torch.equal(probe.tokens, tokens.expand(3, -1))
    assert torch.equal(probe.image_mask, small_vlm_on.image_mask(tokens).expand(3, -1).cpu())
    assert probe.pred_pos.tolist() == [len(tokens) - 1] * 3
    assert probe.target_ids.tolist() == [small_vlm_on.tokenizer(" dog")["input_ids"][0], 123, 50256]
    assert probe.targets == [" dog", small_vlm_on.tokenizer.decode([123]), "<|endoftext|>"]
    assert torch.equal(probe.image_positions, torch.arange(16).expand(3, -1))
    # captions: the target is the first noun, predicted after the caption before it
    p2 = make_probe(small_vlm_on, 2, prompt=PROMPT, captions=["a red car", "the dog"])
    assert p2.targets == [" car", " dog"] and p2.captions == ["a red car", "the dog"]
    assert p2.pred_pos.tolist() == [len(tokens) + 1, len(tokens)]
    row = small_vlm_on.to_tokens(PROMPT + " a red", image=True)[0].cpu()
    assert torch.equal(p2.tokens[0], row)
    sub = p2[1]
    assert len(sub) == 1 and sub.targets == [" dog"] and sub.tokens.shape[1] == len(tokens) + 1
    df = p2.to_dataframe()
    assert list(df.columns) == ["image_index", "prompt", "caption", "target", "target_id", "pred_pos"]
    assert "Probe(2 images" in repr(p2)
    with pytest.raises(ValueError, match="exactly one of target= and captions="):
        make_probe(small_vlm_on, 2, "dog", captions=["a dog", "a cat"])
    with pytest.raises(ValueError, match="3 targets for 2 images"):
        make_probe(small_vlm_on, 2, ["a", "b", "c"])


def test_probe_metric_is_a_transformer_lens_patching_metric(small_vlm_on, pixels):
    """patch_resid through the probe agrees with TL's get_act_patch_resid_pre using probe.metric."""
    src, base = pixels[:1], pixels[1:2]
    probe = make_probe(small_vlm_on, 1, "dog", prompt=PROMPT)
    tokens = probe.tokens
    with torch.no_grad():
        logits = small_vlm_on(tokens, images=src)
        manual = logits[0, -1].float().softmax(-1)[probe.target_ids[0]]
        torch.testing.assert_close(probe.metric(logits), manual)
        _, cache = small_vlm_on.run_with_cache(tokens, images=src)
        with small_vlm_on.bind_images(base):
            tl = tl_patching.get_act_patch_resid_pre(small_vlm_on, tokens, cache, probe.metric)  # [layer, pos]
    for layer, pos in [(0, 3), (1, 15)]:
        res = patch_resid(small_vlm_on, src, base, layer=layer, positions=[pos], probe=probe)
        torch.testing.assert_close(res.p_patched.mean(), tl[layer, pos].float(), rtol=1e-4, atol=1e-7)


def test_image_slots_after_a_bos_are_found_not_assumed(small_vlm_on, pixels):
    """A probe whose image slots follow a BOS: ablation hits the slots, as a manual hook does."""
    bos = small_vlm_on.tokenizer.bos_token_id
    base = small_vlm_on.to_tokens(PROMPT, image=True)[0].cpu()
    tokens = torch.cat([torch.tensor([bos]), base]).expand(3, -1)
    mask = small_vlm_on.image_mask(tokens)
    dog = small_vlm_on.tokenizer(" dog")["input_ids"][0]
    probe = Probe(tokens, mask, torch.full((3,), tokens.shape[1] - 1), torch.full((3,), dog), [" dog"] * 3,
                  [PROMPT] * 3)
    assert probe.image_positions[0].tolist() == list(range(1, 17))
    res = ablate_units(small_vlm_on, pixels, [(0, 7), (1, 10)], probe=probe)

    def zero(act, hook, unit):
        act = act.clone()
        act[:, 1:17, unit] = 0.0
        return act

    hooks = [("blocks.0.mlp.hook_post", lambda a, hook: zero(a, hook, 7)),
             ("blocks.1.mlp.hook_post", lambda a, hook: zero(a, hook, 10))]
    with torch.no_grad():
        before = small_vlm_on(tokens, images=pixels)
        after = small_vlm_on.run_with_hooks(tokens, images=pixels, fwd_hooks=hooks)
    pos, tid = probe.pred_pos, probe.target_ids
    torch.testing.assert_close(res.p_before, target_probability(before, pos, tid))
    torch.testing.assert_close(res.p_after, target_probability(after, pos, tid))
    assert not torch.allclose(res.p_after, res.p_before)


def test_attribution_probe_goes_to_ablation_and_patching(small_vlm_on, pixels):
    """attribute -> ablate_units(probe=attr.probe): p(c) is the softmax of the attributed logit."""
    attr = attribute(small_vlm_on, pixels, captions=["a dog on a sofa", "the big cat", "red apples"])
    lp = attribute(small_vlm_on, pixels, probe=attr.probe, objective="logprob")
    torch.testing.assert_close(lp.scores.shape, attr.scores.shape)
    units = attr.top_units(5).units_per_image()
    assert units.shape == (3, 5, 2)
    res = ablate_units(small_vlm_on, pixels, units, probe=attr.probe)
    torch.testing.assert_close(res.p_before, lp.y.exp(), rtol=1e-4, atol=1e-8)
    assert res.target.tolist() == attr.target_ids.tolist()
    curve = ablation_curve(small_vlm_on, pixels, units, ks=(5,), n_random_seeds=1, probe=attr.probe)
    torch.testing.assert_close(curve.p_top[0], res.p_after)
    with pytest.raises(ValueError, match="either probe= or target="):
        ablate_units(small_vlm_on, pixels, units, "dog", probe=attr.probe)
    with pytest.raises(ValueError, match="the probe has 3 rows but 2 images"):
        ablate_units(small_vlm_on, pixels[:2], [(0, 1)], probe=attr.probe)
    with pytest.raises(ValueError, match="pass target="):
        ablate_units(small_vlm_on, pixels, [(0, 1)])
