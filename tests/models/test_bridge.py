"""VisionBridge against independent oracles: the upstream HF model (an unbridged copy) fed the same
embeddings, greedy decoding by full forward passes, and (under TransformerLens 3) HookedVisionPrefix
on the same weights. Runs under TransformerLens 3.9 and 4.x."""

import copy

import pytest
import torch
import transformers

from tl_multimodal import HookedVisionPrefix, ImageProjection, VisionBridge, VisionEncoder
from tl_multimodal.pretrained import offline as loading
from tl_multimodal.cli import _sample_images
from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION, SMOLLM2_MODEL_NAME, _hooked_config

from transformer_lens.model_bridge import TransformerBridge

try:
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
except ImportError:  # TransformerLens 4
    HookedTransformer = None

try:  # TransformerLens 4's analysis tools
    from transformer_lens.tools.analysis import JacobianLens, direct_logit_attribution, logit_lens
except ImportError:  # TransformerLens 3
    logit_lens = None

PROMPT = "A picture of"
needs_hooked_transformer = pytest.mark.skipif(HookedTransformer is None, reason="TransformerLens 4 has no HookedTransformer")
needs_tl4_tools = pytest.mark.skipif(logit_lens is None, reason="TransformerLens 3 has no transformer_lens.tools.analysis")


def _widen(model, factor=4.0):
    """Scale the random init of the MLP and attention outputs so greedy choices have clear margins."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight", "mlp.c_proj.weight",
                              "attn.c_proj.weight", "lm_head.weight")):
                p.mul_(factor)
    return model.eval()


def _tiny_hf(kind: str):
    torch.manual_seed(5)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       rms_norm_eps=1e-5, tie_word_embeddings=False)
        return _widen(transformers.LlamaForCausalLM(cfg))
    cfg = transformers.GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return _widen(transformers.GPT2LMHeadModel(cfg))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request, gpt2_tokenizer, vit_encoder):
    """(oracle HF model, VisionBridge over an identical copy of it); bridging changes the copy's modules."""
    hf = _tiny_hf(request.param)
    torch.manual_seed(3)
    vb = VisionBridge.from_hf(copy.deepcopy(hf), gpt2_tokenizer, vit_encoder, model_name="tiny").eval()
    return hf, vb


def _hf_inputs(vb, hf, pixels, text_ids):
    """The LiMBeR sequence built by hand: projected patch tokens, then the text's word embeddings."""
    feats = vb.vision.model.forward_features(pixels)[:, 1:]  # drop the ViT's CLS token
    image_tokens = feats @ vb.projection.linear.weight.T + vb.projection.linear.bias
    text = hf.get_input_embeddings()(text_ids).expand(len(pixels), -1, -1)
    return torch.cat([image_tokens, text], dim=1)


def _greedy(vb, pixels, n):
    """The oracle for generation: a full forward pass per step, argmax of the last position."""
    tokens = vb.to_tokens(PROMPT, image=True).expand(len(pixels), -1)
    for _ in range(n):
        tokens = torch.cat([tokens, vb(tokens, images=pixels)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
def test_logits_equal_the_hf_model_fed_the_same_embeddings(models, gpt2_tokenizer, pixels):
    hf, vb = models
    ids = torch.tensor([gpt2_tokenizer(PROMPT)["input_ids"]])
    expected = hf(inputs_embeds=_hf_inputs(vb, hf, pixels, ids)).logits
    logits = vb(PROMPT, images=pixels)
    assert logits.shape == (3, vb.n_image_tokens + ids.shape[1], 50257)
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(vb("Hello world", prepend_bos=False), hf(torch.tensor([gpt2_tokenizer("Hello world")["input_ids"]])).logits,
                          atol=1e-5), "text-only calls are the plain bridge"


@torch.no_grad()
def test_loss_counts_text_tokens_only_like_hf_with_ignored_image_labels(models, gpt2_tokenizer, pixels):
    hf, vb = models
    ids = torch.tensor([gpt2_tokenizer(" a dog on a red sofa")["input_ids"]])
    labels = torch.cat([torch.full((3, vb.n_image_tokens), -100), ids.expand(3, -1)], dim=1)
    expected = hf(inputs_embeds=_hf_inputs(vb, hf, pixels, ids), labels=labels).loss
    loss = vb(" a dog on a red sofa", images=pixels, return_type="loss")
    assert torch.allclose(loss, expected, atol=1e-5)
    logits, per_token = vb(" a dog on a red sofa", images=pixels, return_type="both", loss_per_token=True)
    assert per_token.shape == (3, logits.shape[1] - 1) and (per_token[:, :vb.n_image_tokens - 1] == 0).all()


@torch.no_grad()
def test_image_features_and_image_embed_give_the_same_logits_as_images(models, pixels):
    _, vb = models
    feats = vb.vision(vb.preprocess(pixels))
    expected = vb(PROMPT, images=pixels)
    assert torch.equal(vb(PROMPT, image_features=feats), expected)
    assert torch.equal(vb(PROMPT, image_embed=vb.embed_images(pixels)), expected)


@torch.no_grad()
def test_image_positions_and_slots(models, pixels):
    _, vb = models
    n = vb.n_image_tokens
    assert vb.image_token_id == vb.cfg.d_vocab == 50257
    tokens = vb.to_tokens(PROMPT, image=True)
    assert torch.equal(tokens[0, vb.image_positions], torch.full((n,), vb.image_token_id))
    assert torch.equal(tokens[0, n:], vb.to_tokens(PROMPT, prepend_bos=False)[0])
    assert vb.image_mask(tokens).sum() == n
    assert vb.to_str_tokens(tokens)[:2] == ["<image_0>", "<image_1>"]
    assert vb.to_str_tokens(tokens)[n:] == vb.to_str_tokens(PROMPT, prepend_bos=False)
    left = vb.to_tokens(["A picture of", "A very small picture of a"], image=True, padding_side="left")
    assert (vb.image_mask(left).sum(-1) == n).all()
    assert not vb.image_mask(left[0, :3]).any(), "the shorter row is padded before its image"
    slots = [f"<image_{i}>" for i in range(n)]  # token ids as the prefix names them: batches and arrays too
    batched = vb.to_str_tokens(left)
    assert len(batched) == 2 and batched[1] == slots + vb.to_str_tokens(left[1, n:])
    assert vb.to_str_tokens(left[1].numpy()) == vb.to_str_tokens(left[1:]) == batched[1]


@torch.no_grad()
def test_prompts_as_tuples_and_lists_and_bad_prompts(models, pixels):
    _, vb = models
    prompts = ("A picture of", "A very small photo of")
    assert torch.equal(vb(prompts, images=pixels[:2]), vb(list(prompts), images=pixels[:2]))
    kwargs = dict(images=pixels[:2], do_sample=False, return_type="tokens", verbose=False)
    assert torch.equal(vb.generate(prompts, 3, **kwargs), vb.generate(list(prompts), 3, **kwargs))
    with pytest.raises(TypeError, match="input must be a string, a list of strings or a token tensor"):
        vb(None, images=pixels[:1])
    with pytest.raises(TypeError, match="holding \\['int', 'str'\\]"):
        vb(["a", 3], images=pixels[:2])
    with pytest.raises(TypeError, match="token tensor with image slots"):
        vb(torch.zeros(1, 20), images=pixels[:1])


@torch.no_grad()
def test_left_padded_prompts_give_the_same_last_logits_as_unpadded(models, pixels):
    _, vb = models
    prompts = ["A picture of", "A very small picture of a"]
    batched = vb(vb.to_tokens(prompts, image=True, padding_side="left"), images=pixels[:2])[:, -1]
    for i, p in enumerate(prompts):
        assert torch.allclose(batched[i], vb(p, images=pixels[i:i + 1])[0, -1], atol=1e-4)


@torch.no_grad()
def test_bos_layout_equals_hf_fed_bos_then_image_then_text_padded_or_not(models, pixels, gpt2_tokenizer,
                                                                         monkeypatch):
    hf, vb = models
    monkeypatch.setattr(vb.projection.info, "bos", True)
    ids = torch.tensor([gpt2_tokenizer(PROMPT)["input_ids"]])
    bos = hf.get_input_embeddings()(torch.tensor([[vb.start_token_id]])).expand(len(pixels), -1, -1)
    expected = hf(inputs_embeds=torch.cat([bos, _hf_inputs(vb, hf, pixels, ids)], 1)).logits
    tokens = vb.to_tokens(PROMPT, image=True)
    assert tokens[0, 0] == vb.start_token_id and vb.image_positions == slice(1, 1 + vb.n_image_tokens)
    assert torch.allclose(vb(PROMPT, images=pixels), expected, atol=1e-4, rtol=1e-4)
    prompts = ["A picture of", "A very small picture of a"]
    batched = vb(vb.to_tokens(prompts, image=True, padding_side="left"), images=pixels[:2])[:, -1]
    for i, p in enumerate(prompts):
        assert torch.allclose(batched[i], vb(p, images=pixels[i:i + 1])[0, -1], atol=1e-4)


@torch.no_grad()
def test_cache_holds_the_image_hooks_and_the_embedding_reads_them_at_the_slots(models, pixels):
    _, vb = models
    logits, cache = vb.run_with_cache(PROMPT, images=pixels)
    n = vb.n_image_tokens
    assert cache["hook_image_features"].shape == (3, n, vb.vision.d_img)
    assert cache["hook_image_embed"].shape == (3, n, vb.cfg.d_model)
    assert torch.equal(cache["hook_embed"][:, :n], cache["hook_image_embed"])
    assert torch.equal(logits, vb(PROMPT, images=pixels))
    for name in ("blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"):
        assert cache[name].shape[:2] == (3, n + 3)


@torch.no_grad()
def test_images_reach_the_lm_only_through_hook_image_embed(models, pixels):
    _, vb = models
    fixed = torch.randn(1, vb.n_image_tokens, vb.cfg.d_model)
    hooks = [("hook_image_embed", lambda act, hook: fixed.expand_as(act))]
    a = vb.run_with_hooks(PROMPT, images=pixels[:1], fwd_hooks=hooks)
    b = vb.run_with_hooks(PROMPT, images=pixels[1:2], fwd_hooks=hooks)
    assert torch.equal(a, b)
    assert not torch.allclose(vb(PROMPT, images=pixels[:1]), vb(PROMPT, images=pixels[1:2]))
    assert not vb.bridge.hook_image_embed._forward_hooks, "run_with_hooks removes its hooks"


@torch.no_grad()
def test_bind_images_serves_token_calls_and_embeds_once(models, pixels):
    _, vb = models
    tokens = vb.to_tokens(PROMPT, image=True).expand(3, -1)
    calls = []
    vb.bridge.hook_image_embed.add_hook(lambda act, hook: calls.append(1))
    try:
        with vb.bind_images(pixels):
            a, b = vb(tokens), vb.run_with_hooks(tokens, fwd_hooks=[])
    finally:
        vb.reset_hooks()
    assert len(calls) == 1
    expected = vb(PROMPT, images=pixels)
    assert torch.equal(a, expected) and torch.equal(b, expected)


@torch.no_grad()
def test_generation_equals_greedy_full_forward_decoding(models, pixels):
    """With the KV cache (the default) and without it: each step attends to the whole sequence."""
    _, vb = models
    expected = _greedy(vb, pixels, 5)
    kwargs = dict(images=pixels, do_sample=False, stop_at_eos=False, return_type="tokens", verbose=False)
    assert torch.equal(vb.generate(PROMPT, 5, **kwargs), expected)
    assert torch.equal(vb.generate(PROMPT, 5, use_past_kv_cache=False, **kwargs), expected)
    n_prompt = vb.to_tokens(PROMPT, image=True).shape[1]
    captions = vb.caption(pixels, max_new_tokens=5)
    assert captions == [vb.tokenizer.decode(row[n_prompt:], skip_special_tokens=True).strip() for row in expected]


@needs_hooked_transformer
@torch.no_grad()
def test_same_logits_and_captions_as_hooked_vision_prefix_on_the_same_weights(gpt2_tokenizer, vit_encoder, pixels):
    hf = _tiny_hf("llama")
    cfg = _hooked_config(hf.config, "cpu", torch.float32)
    lm = HookedTransformer(cfg, tokenizer=gpt2_tokenizer)
    lm.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    torch.manual_seed(3)
    hooked = HookedVisionPrefix(lm, vit_encoder).eval()
    vb = VisionBridge.from_hf(hf, gpt2_tokenizer, vit_encoder, copy.deepcopy(hooked.projection),
                              model_name=cfg.model_name).eval()
    assert torch.allclose(vb(PROMPT, images=pixels), hooked(PROMPT, images=pixels), atol=1e-4, rtol=1e-4)
    prompts = ("A picture of", "A very small photo of a")  # the same prompts make the same tokens
    for side in ("left", "right"):
        assert torch.equal(vb.to_tokens(prompts, image=True, padding_side=side),
                           hooked.to_tokens(prompts, image=True, padding_side=side))
    assert torch.allclose(vb(prompts, images=pixels[:2]), hooked(prompts, images=pixels[:2]), atol=1e-4, rtol=1e-4)
    _, cache = vb.run_with_cache(PROMPT, images=pixels)
    _, hooked_cache = hooked.run_with_cache(PROMPT, images=pixels)
    for name in ("hook_image_embed", "blocks.1.mlp.hook_post", "blocks.0.mlp.hook_pre_linear"):
        assert torch.allclose(cache[name], hooked_cache[name], atol=1e-4), name
    assert torch.allclose(vb.W_out, hooked.W_out) and torch.allclose(vb.W_U, hooked.W_U)
    assert vb.caption(pixels, max_new_tokens=8) == hooked.caption(pixels, max_new_tokens=8)


# ------------------------------------------------------------------ bad input gets a clear error
def test_mismatches_raise(models, pixels, cnn_encoder):
    _, vb = models
    with pytest.raises(ValueError, match="no image slots"):
        vb(vb.to_tokens(PROMPT), images=pixels)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        vb(["a", "b"], images=pixels)
    with pytest.raises(ValueError, match="no images were given"):
        vb(vb.to_tokens(PROMPT, image=True))
    with pytest.raises(ValueError, match="image_features must be"):
        vb(PROMPT, image_features=torch.zeros(1, 5, 64))
    with pytest.raises(ValueError, match="exactly one of"):
        vb(PROMPT, images=pixels, image_features=torch.zeros(3, 16, 64))
    with pytest.raises(ValueError, match="got 2 images of 16 patches for tokens of batch 3"):
        with vb.bind_images(pixels[:2]):
            vb(vb.to_tokens(PROMPT, image=True).expand(3, -1))
    with pytest.raises(ValueError, match="longer than n_ctx=128"):
        vb(" dog" * 120, images=pixels[:1])
    with pytest.raises(ValueError, match="encoder: projection has 'vit_tiny_32', model has 'tf_efficientnet_lite0'"):
        VisionBridge(vb, cnn_encoder, vb.projection)
    with pytest.raises(TypeError, match="TransformerBridge"):
        VisionBridge(torch.nn.Linear(2, 2), cnn_encoder)


def test_projection_checkpoint_round_trip(models, pixels, tmp_path):
    _, vb = models
    path = tmp_path / "proj.pt"
    vb.projection.save(path)
    with torch.no_grad():
        before = vb(PROMPT, images=pixels)
        vb.projection.linear.weight.add_(1.0)
        vb.load_projection(path)
        assert torch.equal(vb(PROMPT, images=pixels), before)
    other = ImageProjection.load(path)
    other.info.lm = "another-lm"
    other.save(path)
    with pytest.raises(ValueError, match="lm: projection has 'another-lm', model has 'tiny'"):
        vb.load_projection(path)


@pytest.mark.skipif(HookedTransformer is not None, reason="TransformerLens 3 keeps HookedTransformer")
def test_hooked_vision_prefix_names_the_bridge_on_transformer_lens_4(vit_encoder):
    with pytest.raises(ImportError, match=r"HookedVisionPrefix \(built on HookedTransformer\).*VisionBridge"):
        HookedVisionPrefix(object(), vit_encoder)
    with pytest.raises(ImportError, match="VisionBridge"):
        HookedVisionPrefix.from_pretrained("gpt2")


# ------------------------------------------------------------------ the real offline models (issue 10's acceptance)
@pytest.fixture(scope="module")
def smollm2_models():
    """(oracle HF SmolLM2, VisionBridge over a copy, HookedVisionPrefix on TransformerLens 3 else None),
    EfficientNet-Lite0 and the shipped projection; the GGUF file is read once."""
    hf, tok = loading.load_hf_smollm2()
    encoder = VisionEncoder(loading.load_efficientnet_lite0(), name="tf_efficientnet_lite0")
    hooked = None
    if HookedTransformer is not None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loading, "load_hf_smollm2", lambda dtype=torch.float32: (hf, tok))
            hooked = HookedVisionPrefix(loading.load_smollm2(), encoder, ImageProjection.load(SHIPPED_PROJECTION))
        hooked.eval()
    vb = VisionBridge.from_hf(copy.deepcopy(hf), tok, encoder, ImageProjection.load(SHIPPED_PROJECTION),
                              model_name=SMOLLM2_MODEL_NAME).eval()
    return hf, vb, hooked


@torch.no_grad()
def test_smollm2_bridge_logits_equal_hf_on_the_sample_images(smollm2_models):
    hf, vb, _ = smollm2_models
    hf.set_attn_implementation("eager")  # as the bridge runs it (sdpa differs by ~1e-4 in float32)
    pixels = vb.preprocess(list(_sample_images().values()))
    ids = torch.tensor([vb.tokenizer(PROMPT)["input_ids"]])
    embed = hf.get_input_embeddings()
    start = embed(torch.tensor([[vb.start_token_id]] if vb.image_bos else [[]], dtype=torch.long))
    inputs = torch.cat([start.expand(len(pixels), -1, -1), vb.embed_images(pixels),
                        embed(ids).expand(len(pixels), -1, -1)], 1)  # the layout the projection was trained with
    assert vb.image_bos == ImageProjection.load(SHIPPED_PROJECTION).info.bos
    assert torch.allclose(vb(PROMPT, images=pixels), hf(inputs_embeds=inputs).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_smollm2_bridge_captions_the_sample_images_like_hf_generate(smollm2_models):
    """HF's own greedy decoding of the same soft prompts is the oracle on either TransformerLens major;
    on 3.x the next test ties HookedVisionPrefix to the bridge, so the bridge on 4.x gives 3.x's tokens."""
    hf, vb, _ = smollm2_models
    images = list(_sample_images().values())
    tokens = vb.to_tokens(PROMPT, image=True)  # the projection's layout
    slots = vb.image_mask(tokens)[0]
    inputs = hf.get_input_embeddings()(tokens[0].masked_fill(slots, 0))[None].repeat(len(images), 1, 1)
    inputs[:, slots] = vb.embed_images(vb.preprocess(images))
    eos = vb.tokenizer.eos_token_id
    out = hf.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                      max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    expected = [vb.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
    assert vb.caption(images, max_new_tokens=12) == expected


@needs_hooked_transformer
@torch.no_grad()
def test_smollm2_bridge_captions_the_sample_images_like_hooked_vision_prefix(smollm2_models):
    _, vb, hooked = smollm2_models
    images = list(_sample_images().values())
    kwargs = dict(images=vb.preprocess(images), do_sample=False, return_type="tokens", verbose=False)
    assert torch.equal(vb.generate(PROMPT, 12, **kwargs), hooked.generate(PROMPT, 12, **kwargs))
    assert vb.caption(images, max_new_tokens=12) == hooked.caption(images, max_new_tokens=12)


# ------------------------------------------------------------------ a VisionBridge is a TransformerBridge
def _plain_and_vision(gpt2_tokenizer, vit_encoder, kind="gpt2"):
    """A plain bridge and a VisionBridge over two identical copies of one tiny HF model (in training
    mode, as a fresh HF model is), and the HF model."""
    hf = _tiny_hf(kind).train()
    plain = TransformerBridge.boot_transformers("tiny", hf_model=copy.deepcopy(hf), tokenizer=gpt2_tokenizer)
    torch.manual_seed(3)
    return plain.eval(), VisionBridge.from_hf(copy.deepcopy(hf), gpt2_tokenizer, vit_encoder, model_name="tiny")


def test_it_is_the_bridge_it_was_made_from_in_eval_mode(gpt2_tokenizer, vit_encoder):
    bridge = TransformerBridge.boot_transformers("tiny", hf_model=_tiny_hf("gpt2").train(), tokenizer=gpt2_tokenizer)
    assert bridge.training
    encoder = copy.deepcopy(vit_encoder)
    vb = VisionBridge(bridge, encoder)
    assert vb is bridge and isinstance(vb, TransformerBridge) and vb.bridge is vb
    assert not any(m.training for m in [*vb.modules(), *vb.original_model.modules()]), "eval mode, all of it"
    assert vb._modules["vision"] is encoder and "projection" in vb._modules
    assert {"hook_image_features", "hook_image_embed"} <= set(vb.hook_dict)
    other = copy.copy(gpt2_tokenizer)
    vb.tokenizer = other  # attribute writes land on the bridge: it is the bridge
    assert vb.tokenizer is other and vb.__dict__.get("tokenizer") is None
    assert vb.cpu() is vb and vb.train() is vb and vb.training and vb.original_model.training
    assert not vb.vision.model.training, "the frozen encoder stays in eval mode"
    assert vb.to(torch.float64) is vb and vb.cfg.dtype == torch.float64, "the bridge's own to()"
    assert {p.dtype for p in vb.parameters()} == {torch.float64}, "the vision parts move with it"


def test_without_images_it_is_exactly_the_plain_bridge(gpt2_tokenizer, vit_encoder):
    plain, vb = _plain_and_vision(gpt2_tokenizer, vit_encoder)
    assert str(vb) == str(plain)
    tokens = plain.to_tokens(["Hello world", "A dog on a red sofa"])
    with torch.no_grad():
        assert torch.equal(vb(tokens), plain(tokens))
        assert torch.equal(vb(tokens, return_type="loss"), plain(tokens, return_type="loss"))
        (_, cache), (_, plain_cache) = vb.run_with_cache(tokens), plain.run_with_cache(tokens)
    assert set(cache.keys()) == set(plain_cache.keys())
    assert all(torch.equal(cache[k], plain_cache[k]) for k in plain_cache.keys())
    state, plain_state = vb.state_dict(), plain.state_dict()
    lm_keys = [k for k in state if not k.startswith(("vision.", "projection."))]
    assert lm_keys == list(plain_state), "the bridge's TransformerLens-format keys, in its order, first"
    assert all(torch.equal(state[k], plain_state[k]) for k in lm_keys)
    assert set(state) - set(lm_keys) == {f"vision.{k}" for k in vb.vision.state_dict()} | {
        f"projection.{k}" for k in vb.projection.state_dict()}


def test_state_dict_round_trip_holds_the_vision_parts(gpt2_tokenizer, vit_encoder, pixels):
    _, vb = _plain_and_vision(gpt2_tokenizer, vit_encoder)
    saved = {k: v.clone() for k, v in vb.state_dict().items()}
    with torch.no_grad():
        expected = vb(PROMPT, images=pixels)
        for p in vb.parameters():
            p.add_(1.0)
        assert not torch.allclose(vb(PROMPT, images=pixels), expected)
        result = vb.load_state_dict(saved)
        assert not result.missing_keys and not result.unexpected_keys
        assert all(torch.equal(v, saved[k]) for k, v in vb.state_dict().items())
        assert torch.equal(vb(PROMPT, images=pixels), expected)
    lm_only = {k: v for k, v in saved.items() if not k.startswith(("vision.", "projection."))}
    vb.load_state_dict(lm_only)  # a plain bridge's state dict loads strictly, vision parts untouched
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: 'projection.linear.bias'"):
        vb.load_state_dict({k: v for k, v in saved.items() if k != "projection.linear.bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*'vision.bogus'"):
        vb.load_state_dict({**saved, "vision.bogus": torch.zeros(1)})


def test_parameters_are_the_bridges_then_the_encoders_and_projections(gpt2_tokenizer, vit_encoder):
    plain, vb = _plain_and_vision(gpt2_tokenizer, vit_encoder)
    names = [n for n, _ in vb.named_parameters()]
    vision = [f"vision.{n}" for n, _ in vb.vision.named_parameters()] + [
        f"projection.{n}" for n, _ in vb.projection.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()] + vision
    assert [id(p) for p in vb.parameters()] == [id(p) for _, p in vb.named_parameters()]
    assert [id(p) for p in vb.parameters()][:len(names) - len(vision)] == [id(p) for p in vb.original_model.parameters()]


def test_a_refused_bridge_is_left_plain_and_a_vision_bridge_is_not_made_twice(gpt2_tokenizer, vit_encoder, cnn_encoder):
    bridge = TransformerBridge.boot_transformers("tiny", hf_model=_tiny_hf("gpt2"), tokenizer=gpt2_tokenizer)
    projection = ImageProjection.load(SHIPPED_PROJECTION)  # made for EfficientNet-Lite0 and SmolLM2
    with pytest.raises(ValueError, match="encoder: projection has"):
        VisionBridge(bridge, vit_encoder, projection)
    assert type(bridge) is TransformerBridge and "vision" not in bridge._modules
    vb = VisionBridge(bridge, vit_encoder)
    with pytest.raises(ValueError, match="already a VisionBridge"):
        VisionBridge(vb, vit_encoder)
    clone = copy.deepcopy(vb)  # deepcopy and pickle rebuild it without arguments
    assert type(clone) is VisionBridge and clone.vision is not vb.vision


@torch.no_grad()
def test_image_slots_get_names_or_a_clear_error(models, pixels):
    _, vb = models
    tokens = vb.to_tokens(["A picture of", "A very small picture of a"], image=True, padding_side="right")
    _, cache = vb.run_with_cache(tokens, images=pixels[:2])
    resid = cache["blocks.1.hook_resid_post"][None, :, -1]  # [component, batch, d_model]
    with pytest.raises(ValueError, match="image slots .* no unembedding direction"):
        cache.logit_attrs(resid, tokens=tokens[:, 0], pos_slice=-1)
    with pytest.raises(ValueError, match="image slots"):
        vb.tokens_to_residual_directions(vb.image_token_id)
    answers = tokens[:, -1]  # text tokens are fine
    assert cache.logit_attrs(resid, tokens=answers, pos_slice=-1).shape == (1, 2)
    slots = [f"<image_{i}>" for i in range(vb.n_image_tokens)]
    assert vb.to_str_tokens(tokens)[0][:vb.n_image_tokens] == slots
    assert vb.to_str_tokens(tokens[0].numpy())[:vb.n_image_tokens] == slots
    assert vb.to_string(tokens[0]) == "A picture of" + "<|endoftext|>" * int((tokens[0] == 50256).sum())


@needs_tl4_tools
def test_transformer_lens_tools_take_it_and_keep_their_checks(gpt2_tokenizer, vit_encoder):
    plain, vb = _plain_and_vision(gpt2_tokenizer, vit_encoder)
    # eval mode by default: logit_lens runs (it refuses training mode), as on the plain bridge
    assert torch.equal(logit_lens(vb, "Hello world").values, logit_lens(plain, "Hello world").values)
    for model in (plain, vb):  # DLA's safety check holds (a non-identity final norm, no compatibility mode)
        with pytest.raises(ValueError, match="DLA on a TransformerBridge requires compatibility mode"):
            direct_logit_attribution(model, "Hello world", answer_tokens=" there")
    prompts = ["Hello world, this is", "A dog on a red sofa"]  # JacobianLens takes bridges only
    kwargs = dict(corpus="test", source_layers=[0], dim_batch=64, show_progress=False, skip_first_positions=0)
    assert torch.allclose(JacobianLens.fit(vb, prompts, **kwargs).jacobians[0],
                          JacobianLens.fit(plain, prompts, **kwargs).jacobians[0])


def test_to_takes_print_details_as_the_parent_does(backend, gpt2_tokenizer, vit_encoder, capsys):
    """``.to(..., print_details=...)`` as TransformerLens's ``.to`` takes it (the bridge's and
    HookedTransformer's), the encoder and projection moved along."""
    from conftest import build_vlm, tiny_hf

    model = build_vlm(backend, tiny_hf("gpt2", n_layers=1, dtype=torch.float32), gpt2_tokenizer,
                      copy.deepcopy(vit_encoder))
    capsys.readouterr()
    assert model.to("cpu", print_details=False) is model
    assert model.to(torch.float64, print_details=False) is model
    assert capsys.readouterr().out == ""
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.dtype for p in [*model.vision.parameters(), *model.projection.parameters()]} == {torch.float64}
    model.to("cpu", print_details=True)
    assert "cpu" in capsys.readouterr().out
