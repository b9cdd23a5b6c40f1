"""A tiny random LLaVA (CLIP vision + Llama text) converted with from_llava (HookedVisionPrefix) and on
TransformerLens's own LLaVA bridge adapter (VisionBridge.from_llava): HF's own model (and HF's
LlavaProcessor for prompts with the <image> placeholder) is the oracle."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tl_multimodal import HookedVisionPrefix, VisionBridge
from tl_multimodal.pretrained.llava import from_llava, llava_bridge

from conftest import ASSETS, assert_decoding_matches_decomposition

try:
    from transformer_lens import HookedTransformer
except ImportError:  # TransformerLens 4: only the bridge cases run
    HookedTransformer = None
needs_hooked_transformer = pytest.mark.skipif(HookedTransformer is None, reason="TransformerLens 4 has no HookedTransformer")

IMAGE_TOKEN, VOCAB = 50257, 50258  # GPT-2's vocabulary + "<image>"
CHAT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(scope="module")
def processor():
    """HF's LLaVA processor on GPT-2's tokenizer with <image> added (BOS added, as Llama's tokenizer does)."""
    tok = transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer", add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, image_token="<image>",
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def hf_llava():
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=64),
        text_config=transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
                                             max_position_embeddings=128, initializer_range=0.1),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, projector_hidden_act="gelu")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")  # as the bridge runs it (sdpa differs by ~1e-4 in float32)
    with torch.no_grad():  # widen the random init so the tiny model is not almost linear
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith(("mlp.down_proj.weight", "v_proj.weight")):
                p.mul_(4.0)
    return model


def _convert(backend, hf, processor):
    """``hf`` as ``backend``: converted (HookedVisionPrefix), or a copy on TransformerLens's LLaVA bridge."""
    import copy

    if backend == "hooked":
        return from_llava(hf, image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    return llava_bridge(copy.deepcopy(hf), image_processor=processor.image_processor,
                                   tokenizer=processor.tokenizer)


@pytest.fixture(scope="module")
def llava(backend, hf_llava, processor):
    return _convert(backend, hf_llava, processor)


def _prompt(n_images_tokens=16):
    """input_ids as HF's processor makes them: text, the placeholder expanded to 16 image tokens, text."""
    return torch.tensor([[1, 5, 9, 33] + [IMAGE_TOKEN] * n_images_tokens + [44, 7, 81]])


def test_logits_equal_hf_with_the_image_inside_the_prompt(llava, hf_llava):
    assert (llava.n_image_tokens, llava.image_token_id, llava.projection.kind) == (16, IMAGE_TOKEN, "mlp")
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    ids = _prompt().expand(2, -1)
    with torch.no_grad():
        want = hf_llava(input_ids=ids, pixel_values=pixels).logits
        got = llava(ids, images=pixels)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| vs HF LlavaForConditionalGeneration: {diff:.2e} (logit scale {want.abs().max():.2f})")
    assert got.shape == want.shape == (2, 23, VOCAB)
    assert diff < 1e-4
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the image matters


def test_image_features_and_embeddings_equal_hf(llava, hf_llava):
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = hf_llava.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                 vision_feature_select_strategy="default")
        want = torch.stack(list(want.pooler_output))  # transformers 5: one [patch, d_model] per image
        got = llava.embed_images(pixels)
    assert got.shape == want.shape == (1, 16, 64)
    torch.testing.assert_close(got, want)


def test_greedy_generation_gives_hf_tokens(llava, hf_llava):
    pixels = torch.randn(1, 3, 32, 32)
    ids = _prompt()
    with torch.no_grad():
        want = hf_llava.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        got = llava.generate(ids, 8, images=pixels, do_sample=False, stop_at_eos=False, verbose=False,
                             return_type="tokens")
    assert got.tolist() == want.tolist()


def test_text_prompt_with_placeholder_equals_hf_processor_and_model(llava, hf_llava, processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)) for _ in range(2)]
    inputs = processor(text=[CHAT, CHAT], images=images, return_tensors="pt")
    tokens = llava.to_tokens(CHAT, image=True)
    assert tokens.tolist() == inputs["input_ids"][:1].tolist()  # BOS, text, 16 image slots in place, text
    assert llava.image_mask(tokens).sum() == 16 and llava.image_mask(tokens)[0, 4:20].all()
    with torch.no_grad():
        want = hf_llava(**inputs).logits
        got = llava(CHAT, images=images)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| on a chat prompt vs HF processor + model: {diff:.2e}")
    assert diff < 1e-4


def test_placeholders_must_match_images(llava):
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"1 images of 16 patches .* \[32\] image slots"):
        llava(_prompt(32), images=pixels)
    with pytest.raises(ValueError, match=r"\[15\] image slots"):
        llava(_prompt(15), images=pixels)
    with pytest.raises(ValueError, match=r"1 images of 16 patches .* \[32\] image slots .*one image per prompt"):
        llava(torch.cat([_prompt(), _prompt()], 1), images=pixels)  # two images' slots in one row
    with pytest.raises(ValueError, match="holds 2 image placeholders .* use exactly one placeholder"):
        llava("USER: <image> and <image> ASSISTANT:", images=pixels)  # two placeholders, one image
    with pytest.raises(ValueError, match=r"2 images of 16 patches for tokens of batch 1 with \[16\]"):
        llava(_prompt(), images=torch.randn(2, 3, 32, 32))  # one placeholder, two images


def test_placeholder_in_a_text_only_call_is_refused(llava):
    with pytest.raises(ValueError, match="image slots but no images"):
        llava(_prompt())
    no_images = f"image slots but no images were given \\(id {IMAGE_TOKEN}, e.g. an image placeholder"
    with pytest.raises(ValueError, match=no_images):
        llava(CHAT)
    with pytest.raises(ValueError, match="image slots but no images"):
        llava.generate(CHAT, 2, verbose=False)


def test_unsupported_llava_variants_are_named(hf_llava):
    import copy
    config = copy.deepcopy(hf_llava.config)
    config.vision_feature_select_strategy, config.projector_hidden_act = "full", "relu"
    other = transformers.LlavaForConditionalGeneration(config)
    with pytest.raises(ValueError, match="'full'.*'relu'"):
        llava_bridge(other)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        llava_bridge(hf_llava.model)
    if HookedTransformer is None:
        with pytest.raises(ImportError, match="VisionBridge"):
            from_llava(other)
        return
    with pytest.raises(ValueError, match="'full'.*'relu'"):
        from_llava(other)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        from_llava(hf_llava.model)


@needs_hooked_transformer
def test_classmethod_delegates(hf_llava):
    assert isinstance(from_llava(hf_llava), HookedVisionPrefix)


@pytest.fixture(scope="module")
def llava64(backend, hf_llava, processor):
    """A float64 copy of the tiny LLaVA (finite differences and exact comparisons)."""
    import copy

    return _convert(backend, copy.deepcopy(hf_llava).double(), processor)


@pytest.fixture(scope="module")
def chat_slots(processor):
    """The image positions of CHAT, from HF's processor (the oracle): where <image> was expanded."""
    image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    ids = processor(text=CHAT, images=image, return_tensors="pt")["input_ids"][0]
    return (ids == IMAGE_TOKEN).nonzero()[:, 0]


@pytest.mark.parametrize("prompt", ["A picture of", CHAT])
def test_attribution_on_converted_llava_matches_finite_differences(llava64, backend, chat_slots, prompt):
    """The neuron toolkit runs on the converted model and on TransformerLens's LLaVA bridge: grad x act
    at an image position equals the central finite difference of the target logit (float64), with the
    image as a prefix or at the <image> placeholder inside a chat prompt (patch k is then the k-th
    position HF's processor expands). HF's Llama (which the bridge runs) computes RMSNorm and softmax
    in float32 even in float64, so there the step is larger and the tolerance wider."""
    from tl_multimodal.analysis.attribution import attribute

    model = llava64
    torch.manual_seed(3)
    feats = torch.randn(1, 16, 32, dtype=torch.float64)
    tid = 3290  # " dog"
    attr = attribute(model, image_features=feats, target=tid, hook="post", prompt=prompt)
    slots = chat_slots if prompt == CHAT else torch.arange(16)
    assert attr.probe.image_positions[0].tolist() == slots.tolist()
    name_of = lambda layer: f"blocks.{layer}.mlp.hook_post"  # noqa: E731
    _, cache = model.run_with_cache(prompt, image_features=feats)
    # the last layer's MLP at an image position writes only there: it cannot reach the final logit
    assert attr.scores[0, -1].abs().max() == 0
    for layer in range(model.cfg.n_layers - 1):
        flat = int(attr.scores[0, layer].abs().argmax())
        patch, unit = divmod(flat, model.cfg.d_mlp)
        pos = int(slots[patch])
        z = cache[name_of(layer)][0, pos, unit]

        def y(d):
            def edit(act, hook):
                act = act.clone()
                act[:, pos, unit] += d
                return act
            hooks = [(name_of(layer), edit)]
            return model.run_with_hooks(prompt, image_features=feats, fwd_hooks=hooks)[0, -1, tid].item()

        eps, tol = (4e-2, 3e-5) if backend == "bridge" else (1e-5, 1e-5)
        fd = z.item() * (y(eps) - y(-eps)) / (2 * eps)
        assert abs(attr.scores[0, layer, patch, unit].item() - fd) <= tol * max(1.0, abs(fd))
        assert abs(fd) > 1e-4


@pytest.mark.parametrize("apply_ln", [False, True])
def test_unit_decoding_agrees_with_full_resid_decomposition_on_a_chat_prompt(llava64, chat_slots, apply_ln):
    """A unit's component of the residual stream at an image position of a chat prompt (TransformerLens's
    get_full_resid_decomposition(expand_neurons=True)) projected on W_U is its activation (/ the final RMS
    scale) times the decoded direction's logits, with the same top tokens."""
    model = llava64
    torch.manual_seed(4)
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    _, cache = model.run_with_cache(CHAT, images=pixels)
    assert (model.to_tokens(CHAT, image=True)[0] == IMAGE_TOKEN).nonzero()[:, 0].tolist() == chat_slots.tolist()
    assert_decoding_matches_decomposition(model, cache, [(0, 3), (1, 0), (1, 77)], apply_ln, positions=chat_slots)


def test_chat_prompt_generation_and_bad_image_token_id(llava, hf_llava, processor):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    inputs = processor(text=CHAT, images=image, return_tensors="pt")
    with torch.no_grad():
        want = hf_llava.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        got = llava.generate(CHAT, 5, images=image, do_sample=False, stop_at_eos=False, verbose=False,
                             return_type="tokens")
    assert got.tolist() == want.tolist()
    with pytest.raises(ValueError, match=r"image_token_id must be in \[0, "):
        if isinstance(llava, VisionBridge):
            VisionBridge(llava, llava.vision, llava.projection, image_token_id=VOCAB + 1)
        else:
            HookedVisionPrefix(HookedTransformer(llava.cfg), llava.vision, llava.projection, image_token_id=VOCAB + 1)


def test_patching_on_a_chat_prompt_agrees_with_transformer_lens_patching(llava64, chat_slots):
    """patch_resid / patch_units through a chat-prompt probe equal TransformerLens's own
    get_act_patch_resid_pre / get_act_patch_mlp_out (the probe's metric, images bound)."""
    import pandas as pd
    from transformer_lens import patching as tl_patching

    from tl_multimodal.analysis.patching import patch_resid, patch_units
    from tl_multimodal.analysis.probe import make_probe

    model = llava64
    torch.manual_seed(5)
    src, base = torch.randn(2, 3, 32, 32, dtype=torch.float64).split(1)
    probe = make_probe(model, 1, "dog", prompt=CHAT)
    assert probe.image_positions[0].tolist() == chat_slots.tolist() and probe.targets == [" dog"]
    tokens = probe.tokens
    last = tokens.shape[1] - 1
    cases = [(0, 0), (0, int(chat_slots[3])), (1, int(chat_slots[-1])), (1, last)]  # BOS, image, image, text
    index = pd.DataFrame(cases, columns=["layer", "pos"])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, images=src)
        with model.bind_images(base):
            tl_resid = tl_patching.get_act_patch_resid_pre(model, tokens, cache, probe.metric,
                                                           index_axis_names=None, index_df=index)
            tl_mlp = tl_patching.get_act_patch_mlp_out(model, tokens, cache, probe.metric,
                                                       index_axis_names=None, index_df=index)
    all_units = lambda layer: [(layer, k) for k in range(model.cfg.d_mlp)]  # noqa: E731
    for (layer, pos), p_resid, p_mlp in zip(cases, tl_resid, tl_mlp):
        res = patch_resid(model, src, base, layer=layer, positions=[pos], probe=probe)
        torch.testing.assert_close(res.p_patched[0], p_resid.float(), rtol=1e-6, atol=1e-12)
        res = patch_units(model, src, base, all_units(layer), probe=probe, positions=[pos])
        torch.testing.assert_close(res.p_patched[0], p_mlp.float(), rtol=1e-6, atol=1e-12)
    assert tl_resid[1] != tl_resid[0] and tl_mlp[1] != tl_mlp[0]  # the image position matters, the BOS does not
    torch.testing.assert_close(tl_resid[0], res.p_base[0], rtol=1e-6, atol=1e-12)  # BOS: same in both runs
    # default positions are the probe's image slots: patching them all at layer 0 gives the source's p(c)
    full = patch_resid(model, src, base, layer=0, probe=probe)
    torch.testing.assert_close(full.p_patched, full.p_source, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(full.p_base, full.p_source, rtol=1e-3)


def test_ablation_and_heatmaps_read_the_image_slots_where_the_placeholder_was(llava64, chat_slots):
    """ablate_units and unit_grid_activations with a chat-prompt probe act on the positions HF's
    processor gave the image (not on a prefix), as manual hooks at those positions do."""
    from tl_multimodal.analysis.ablation import ablate_units
    from tl_multimodal.analysis.heatmaps import unit_grid_activations
    from tl_multimodal.analysis.probe import make_probe, target_probability

    model = llava64
    torch.manual_seed(6)
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    probe = make_probe(model, 2, ["dog", "cat"], prompt=CHAT)
    assert probe.image_mask.sum(1).tolist() == [16, 16]
    assert probe.image_positions.tolist() == [chat_slots.tolist()] * 2
    units = [(0, 7), (0, 40)]

    def zero(act, hook):
        act = act.clone()
        act[:, chat_slots[:, None], torch.tensor([7, 40])] = 0.0
        return act

    with torch.no_grad():
        before = model(probe.tokens, images=pixels)
        after = model.run_with_hooks(probe.tokens, images=pixels, fwd_hooks=[("blocks.0.mlp.hook_post", zero)])
    res = ablate_units(model, pixels, units, probe=probe)
    torch.testing.assert_close(res.p_before, target_probability(before, probe.pred_pos, probe.target_ids))
    torch.testing.assert_close(res.p_after, target_probability(after, probe.pred_pos, probe.target_ids))
    assert not torch.allclose(res.p_after, res.p_before, rtol=1e-4)

    grids = unit_grid_activations(model, pixels, units, probe=probe)
    _, cache = model.run_with_cache(probe.tokens, images=pixels)
    want = cache["blocks.0.mlp.hook_post"][:, chat_slots][..., [7, 40]].permute(0, 2, 1).reshape(2, 2, 4, 4)
    assert grids.shape == (2, 2, 4, 4)
    torch.testing.assert_close(grids, want.float())


def test_attribution_caption_target_follows_hf_greedy_tokens_after_a_chat_prompt(llava, hf_llava, processor):
    """Without a target, attribute() captions after the chat prompt: the probe's tokens are HF's processor
    ids followed by HF's own greedy tokens, and the target is HF's next greedy token."""
    import warnings

    from tl_multimodal.analysis.attribution import attribute

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's caption may hold no noun (first-word fallback)
        attr = attribute(llava, images, prompt=CHAT, max_new_tokens=10)
    probe = attr.probe
    for i, image in enumerate(images):
        inputs = processor(text=CHAT, images=image, return_tensors="pt")
        with torch.no_grad():
            want = hf_llava.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                     eos_token_id=None)[0]
        n = int(probe.pred_pos[i]) + 1
        assert n > inputs["input_ids"].shape[1] - 1
        assert probe.tokens[i, :n].tolist() == want[:n].tolist()
        assert int(probe.target_ids[i]) == int(want[n])
    assert attr.scores.shape == (2, 2, 16, 96) and attr.scores.abs().sum() > 0
