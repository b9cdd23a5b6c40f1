"""The vision LM against independent oracles: the upstream HF models fed the same embeddings,
TransformerLens's own cache decomposition, and greedy decoding without a KV cache. GPT-2 small runs as a
HookedVisionPrefix and as a VisionBridge (``vlm_on``, parametrised by ``backend``); the tests that compare
with a HookedTransformer stay on HookedVisionPrefix (TransformerLens 3 only)."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tl_multimodal import HookedVisionPrefix

PROMPT = "A picture of"


def _hf_inputs(vlm, wte, pixels, text_ids):
    """The LiMBeR sequence built by hand: projected patch tokens, then the text's word embeddings."""
    feats = vlm.vision.model.forward_features(pixels)[:, 1:]  # drop the ViT's CLS token
    image_tokens = feats @ vlm.projection.linear.weight.T + vlm.projection.linear.bias
    return torch.cat([image_tokens, wte(text_ids).expand(len(pixels), -1, -1)], dim=1)


@torch.no_grad()
def test_logits_equal_hf_gpt2_fed_the_same_embeddings(vlm_on, hf_gpt2, gpt2_tokenizer, pixels):
    ids = torch.tensor([gpt2_tokenizer(PROMPT)["input_ids"]])
    expected = hf_gpt2(inputs_embeds=_hf_inputs(vlm_on, hf_gpt2.transformer.wte, pixels, ids)).logits
    logits = vlm_on(PROMPT, images=pixels)
    assert logits.shape == (3, vlm_on.n_image_tokens + ids.shape[1], 50257)
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_loss_counts_text_tokens_only_like_hf_with_ignored_image_labels(vlm_on, hf_gpt2, gpt2_tokenizer, pixels):
    ids = torch.tensor([gpt2_tokenizer(" a dog on a red sofa")["input_ids"]])
    labels = torch.cat([torch.full((3, vlm_on.n_image_tokens), -100), ids.expand(3, -1)], dim=1)
    expected = hf_gpt2(inputs_embeds=_hf_inputs(vlm_on, hf_gpt2.transformer.wte, pixels, ids), labels=labels).loss
    loss = vlm_on(" a dog on a red sofa", images=pixels, return_type="loss")
    assert torch.allclose(loss, expected, atol=1e-5)


@torch.no_grad()
def test_images_reach_the_lm_only_through_hook_image_embed(vlm_on, pixels):
    fixed = torch.randn(1, vlm_on.n_image_tokens, vlm_on.cfg.d_model)
    hooks = [("hook_image_embed", lambda act, hook: fixed.expand_as(act))]
    a = vlm_on.run_with_hooks(PROMPT, images=pixels[:1], fwd_hooks=hooks)
    b = vlm_on.run_with_hooks(PROMPT, images=pixels[1:2], fwd_hooks=hooks)
    assert torch.equal(a, b)
    assert not torch.allclose(vlm_on(PROMPT, images=pixels[:1]), vlm_on(PROMPT, images=pixels[1:2]))


@torch.no_grad()
def test_cache_decomposition_includes_image_embedding_rows_and_sums_to_residual(vlm_on, pixels):
    _, cache = vlm_on.run_with_cache(PROMPT, images=pixels)
    n = vlm_on.n_image_tokens
    assert vlm_on.vision.model_name == "vit_tiny_32" == vlm_on.projection.info.encoder
    assert cache["hook_image_features"].shape == (3, n, vlm_on.vision.d_img)
    assert torch.equal(cache["hook_embed"][:, :n], cache["hook_image_embed"])
    parts, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert labels[-2:] == ["embed", "pos_embed"] or {"embed", "pos_embed"} <= set(labels)
    final = cache[f"blocks.{vlm_on.cfg.n_layers - 1}.hook_resid_post"]
    assert torch.allclose(parts.sum(0), final, atol=1e-3)


@torch.no_grad()
def test_bos_layout_equals_hf_fed_bos_then_image_then_text(vlm_on, backend, hf_gpt2, gpt2_tokenizer, pixels,
                                                           monkeypatch):
    """A projection trained with the BOS layout makes it the default: [BOS][image][text], as HF sees it."""
    ids = torch.tensor([gpt2_tokenizer(PROMPT)["input_ids"]])
    wte = hf_gpt2.transformer.wte
    bos = wte(torch.tensor([[gpt2_tokenizer.bos_token_id]])).expand(len(pixels), -1, -1)
    expected = hf_gpt2(inputs_embeds=torch.cat([bos, _hf_inputs(vlm_on, wte, pixels, ids)], dim=1)).logits
    assert not vlm_on.image_bos and vlm_on.image_positions == slice(0, vlm_on.n_image_tokens)
    explicit = vlm_on(PROMPT, images=pixels, prepend_bos=True)
    monkeypatch.setattr(vlm_on.projection.info, "bos", True)
    assert vlm_on.image_bos and vlm_on.image_positions == slice(1, 1 + vlm_on.n_image_tokens)
    tokens = vlm_on.to_tokens(PROMPT, image=True)
    assert tokens[0, 0] == gpt2_tokenizer.bos_token_id and vlm_on.image_mask(tokens)[0, vlm_on.image_positions].all()
    assert int(vlm_on.image_mask(tokens).sum()) == vlm_on.n_image_tokens
    logits = vlm_on(PROMPT, images=pixels)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    unforced = vlm_on(PROMPT, images=pixels, prepend_bos=False)  # an explicit False still wins
    assert unforced.shape[1] == logits.shape[1] - 1
    # caption generates after the same layout: greedy decoding by full passes of the HF oracle
    embeds = torch.cat([bos, _hf_inputs(vlm_on, wte, pixels, ids)], dim=1)
    new = []
    for _ in range(4):
        nxt = hf_gpt2(inputs_embeds=embeds).logits[:, -1].argmax(-1)
        new.append(nxt)
        embeds = torch.cat([embeds, wte(nxt)[:, None]], dim=1)
    want = [gpt2_tokenizer.decode(row).strip() for row in torch.stack(new, 1)]
    assert vlm_on.caption(pixels, max_new_tokens=4, prompt=PROMPT) == want
    torch.testing.assert_close(explicit, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_generate_with_kv_cache_equals_greedy_decoding_without_it(vlm_on, pixels):
    kwargs = dict(images=pixels, do_sample=False, stop_at_eos=False, return_type="tokens", verbose=False)
    cached = vlm_on.generate(PROMPT, 6, use_past_kv_cache=True, **kwargs)
    uncached = vlm_on.generate(PROMPT, 6, use_past_kv_cache=False, **kwargs)
    tokens = vlm_on.to_tokens(PROMPT, image=True).expand(3, -1)
    for _ in range(6):  # the oracle: a full forward pass per step, argmax of the last position
        tokens = torch.cat([tokens, vlm_on(tokens, images=pixels)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, tokens) and torch.equal(uncached, tokens)
    captions = vlm_on.caption(pixels, max_new_tokens=6)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


@torch.no_grad()
@pytest.mark.parametrize("bos", [False, True])
def test_left_padded_prompts_give_the_same_last_logits_as_unpadded(vlm_on, pixels, bos, monkeypatch):
    """Also in the BOS layout, where GPT-2's pad token is its BOS: the BOS before the slots is attended."""
    monkeypatch.setattr(vlm_on.projection.info, "bos", bos)
    prompts = ["A picture of", "A very small picture of a"]
    tokens = vlm_on.to_tokens(prompts, image=True, padding_side="left")
    assert (tokens[:, :-1] == vlm_on.tokenizer.pad_token_id).any(-1).tolist() == [True, bos]
    assert (vlm_on.image_mask(tokens).sum(-1) == vlm_on.n_image_tokens).all()
    vlm_on.tokenizer.padding_side = "left"
    try:
        batched = vlm_on(tokens, images=pixels[:2])[:, -1]
    finally:
        vlm_on.tokenizer.padding_side = "right"
    for i, p in enumerate(prompts):
        alone = vlm_on(p, images=pixels[i:i + 1])[:, -1]
        assert torch.allclose(batched[i], alone[0], atol=1e-4)


@torch.no_grad()
def test_llama_style_lm_matches_hf_fed_the_same_embeddings(tiny_llama, vit_encoder, gpt2_tokenizer, pixels):
    hf, lm = tiny_llama
    vlm = HookedVisionPrefix(lm, vit_encoder).eval()
    ids = torch.tensor([gpt2_tokenizer(PROMPT)["input_ids"]])
    expected = hf(inputs_embeds=_hf_inputs(vlm, hf.model.embed_tokens, pixels, ids)).logits
    assert torch.allclose(vlm(PROMPT, images=pixels), expected, atol=1e-4, rtol=1e-4)
    cached = vlm.generate(PROMPT, 4, images=pixels, do_sample=False, stop_at_eos=False, return_type="tokens",
                          verbose=False)
    uncached = vlm.generate(PROMPT, 4, images=pixels, do_sample=False, stop_at_eos=False, return_type="tokens",
                            verbose=False, use_past_kv_cache=False)
    assert torch.equal(cached, uncached)


def test_text_only_use_is_plain_transformer_lens(vlm, gpt2_small):
    with torch.no_grad():
        assert torch.equal(vlm("Hello world"), gpt2_small("Hello world"))


# ------------------------------------------------------------------ bad input gets a clear error
@pytest.mark.parametrize("shape, message", [
    ((2, 3, 64, 64), "takes 32x32 images"),
    ((2, 1, 32, 32), "takes 3-channel images"),
    ((1, 2, 3, 32, 32), "batch, channels, height, width"),
])
def test_wrong_image_shapes_raise(vlm_on, shape, message):
    with pytest.raises(ValueError, match=message):
        vlm_on(PROMPT, images=torch.zeros(shape))


def test_nan_images_raise(vlm_on, pixels):
    bad = pixels.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vlm_on(PROMPT, images=bad)


def test_prompt_past_n_ctx_raises(vlm_on, pixels):
    long_prompt = " dog" * (vlm_on.cfg.n_ctx - vlm_on.n_image_tokens + 1)
    with pytest.raises(ValueError, match="longer than n_ctx=1024"):
        vlm_on(long_prompt, images=pixels[:1])
    with pytest.raises(ValueError, match="longer than n_ctx"):
        vlm_on.generate(" dog" * (vlm_on.cfg.n_ctx - vlm_on.n_image_tokens - 2), 5, images=pixels[:1])


def test_token_and_image_mismatches_raise(vlm_on, pixels):
    with pytest.raises(ValueError, match="no image slots"):
        vlm_on(vlm_on.to_tokens(PROMPT), images=pixels)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        vlm_on(["a", "b"], images=pixels)
    with pytest.raises(ValueError, match="no images were given"):
        vlm_on(vlm_on.to_tokens(PROMPT, image=True))
    with pytest.raises(ValueError, match="image_features must be"):
        vlm_on(PROMPT, image_features=torch.zeros(1, 5, 64))


# ------------------------------------------------------------------ bad input at the door (caption, forward, preprocess)
@pytest.fixture(scope="module")
def photo():
    """A small RGB photo (not the encoder's size: preprocess resizes it)."""
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (40, 48, 3), dtype=np.uint8))


@torch.no_grad()
def test_raw_0_255_float_pixels_are_refused_with_a_pointer_to_preprocess(vlm_on, pixels):
    raw = (torch.rand(1, 3, 32, 32) * 255).round()
    for call in (lambda: vlm_on.caption(raw, max_new_tokens=1), lambda: vlm_on(PROMPT, images=raw),
                 lambda: vlm_on.preprocess(raw)):
        with pytest.raises(ValueError, match=r"raw 0-255 pixels.*model\.preprocess"):
            call()


@torch.no_grad()
def test_float64_and_half_pixels_are_converted(vlm_on, pixels):
    assert vlm_on.caption(pixels.double(), max_new_tokens=3) == vlm_on.caption(pixels, max_new_tokens=3)
    half = pixels.half()
    assert torch.equal(vlm_on(PROMPT, images=half), vlm_on(PROMPT, images=half.float()))
    assert vlm_on.preprocess(pixels.bfloat16()).dtype == torch.float32


@torch.no_grad()
def test_paths_arrays_16_bit_and_exif_images_reach_caption(vlm_on, photo, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    expected = vlm_on.caption([photo], max_new_tokens=3)
    for same in (str(path), path, np.asarray(photo), (photo,), [str(path)]):
        assert vlm_on.caption(same, max_new_tokens=3) == expected
    wide = np.asarray(photo)[..., 0].astype(np.uint16) * 257  # 16-bit grey, full range
    grey8 = Image.fromarray(np.asarray(photo)[..., 0]).convert("RGB")
    assert torch.equal(vlm_on.preprocess(Image.fromarray(wide)), vlm_on.preprocess(grey8))
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CCW to display"
    tagged = tmp_path / "tagged.png"
    photo.save(tagged, exif=exif)
    upright = Image.fromarray(np.rot90(np.asarray(photo)).copy())
    assert torch.equal(vlm_on.preprocess(str(tagged)), vlm_on.preprocess(upright))


@torch.no_grad()
def test_prompts_as_tuples_lists_and_none(vlm_on, pixels):
    prompts = ("A picture of", "A photo of")
    assert torch.equal(vlm_on(prompts, images=pixels[:2]), vlm_on(list(prompts), images=pixels[:2]))
    with pytest.raises(TypeError, match="input must be a string, a list of strings or a token tensor"):
        vlm_on(None, images=pixels[:1])
    with pytest.raises(TypeError, match="holding"):
        vlm_on(["a", 3], images=pixels[:2])
    for bad in (None, prompts, 3):
        with pytest.raises(TypeError, match="prompt must be a string"):
            vlm_on.caption(pixels, prompt=bad)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(batch_size=None), TypeError, "batch_size must be an int"),
    (dict(do_sample="yes"), TypeError, "do_sample must be True or False"),
    (dict(temperature=-1.0), ValueError, "temperature must be finite and >= 0"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(top_p=1.5), ValueError, r"top_p must be a number in \(0, 1\]"),
])
def test_every_caption_and_generate_argument_is_named(vlm_on, backend, pixels, kwargs, error, message):
    with pytest.raises(error, match=message):
        vlm_on.caption(pixels, **kwargs)
    if "batch_size" not in kwargs:
        with pytest.raises(error, match=message):
            vlm_on.generate(PROMPT, **{"max_new_tokens": 2, **kwargs}, images=pixels, verbose=False)
        with pytest.raises(error, match=message):
            vlm_on.generate("Hello", **{"max_new_tokens": 2, **kwargs}, verbose=False)


def test_empty_images_are_refused(vlm_on):
    with pytest.raises(ValueError, match="empty"):
        vlm_on.caption(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="no images"):
        vlm_on.caption([])
    with pytest.raises(TypeError, match="got int"):
        vlm_on.caption(3)
