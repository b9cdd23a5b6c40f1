"""The lean KV-cached loop against independent oracles: greedy decoding by full forward passes without
a cache, Hugging Face ``generate`` on the same weights and soft prompts, and TransformerLens's own
``generate`` (tokens and per-step logits, greedy and sampled with a seed); hooks send ``generate``
back to TransformerLens."""

import pytest
import torch

from conftest import skip_module_without_hooked_transformer

skip_module_without_hooked_transformer("the lean generation loop is HookedVisionPrefix's (HookedTransformer, "
                                       "TransformerLens 3 only; TransformerLens 4 removed it)")

from transformer_lens.utilities import get_attention_mask  # noqa: E402

from tl_multimodal import HookedVisionPrefix  # noqa: E402
from tl_multimodal.models._fast_generation import generate_tokens, hooks_attached, why_not_fast  # noqa: E402

PROMPTS = ["A picture of", "A very small picture of a", "Two"]
N_NEW = 8


@pytest.fixture(scope="module", params=["gpt2_style", "llama_style"])
def model(request, small_vlm, tiny_llama, vit_encoder):
    """GPT-2 style (LayerNorm, learned positions, GELU MLP, multi-head) or Llama style (RMSNorm,
    rotary, gated SiLU MLP, grouped-query attention)."""
    if request.param == "gpt2_style":
        return small_vlm
    return HookedVisionPrefix(tiny_llama[1], vit_encoder).eval()


def _generate(model, prompt, images, lean: bool, **kwargs):
    model.use_lean_generation = lean
    try:
        return model.generate(prompt, N_NEW, images=images, return_type="tokens", verbose=False, **kwargs)
    finally:
        model.use_lean_generation = True


def test_models_take_the_lean_loop(model):
    assert why_not_fast(model) is None


@torch.no_grad()
def test_greedy_tokens_equal_full_forward_passes_without_cache(model, pixels):
    lean = _generate(model, PROMPTS, pixels, lean=True, do_sample=False, stop_at_eos=False, padding_side="left")
    tokens = model.to_tokens(PROMPTS, image=True, padding_side="left")
    assert (tokens[:, 0] == model.tokenizer.pad_token_id).any()  # rows of different lengths: left padding
    model.tokenizer.padding_side = "left"  # so that forward masks the leading pads
    try:
        for _ in range(N_NEW):  # the oracle: one uncached forward pass per step, argmax of the last position
            tokens = torch.cat([tokens, model(tokens, images=pixels)[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        model.tokenizer.padding_side = "right"
    assert torch.equal(lean, tokens)


@pytest.mark.parametrize("prompt", ["A picture of", PROMPTS])
@pytest.mark.parametrize("stop_at_eos", [False, True])
@torch.no_grad()
def test_greedy_tokens_equal_transformer_lens_generate(model, pixels, prompt, stop_at_eos):
    kwargs = dict(do_sample=False, stop_at_eos=stop_at_eos, padding_side="left")
    if stop_at_eos:  # a token the model does emit as the end of text: rows finish at different steps
        first = _generate(model, prompt, pixels, lean=False, do_sample=False, stop_at_eos=False,
                          padding_side="left")[:, -N_NEW:]
        kwargs["eos_token_id"] = int(first[0, 2])
    lean = _generate(model, prompt, pixels, lean=True, **kwargs)
    assert torch.equal(lean, _generate(model, prompt, pixels, lean=False, **kwargs))
    tokens = model.to_tokens(prompt, image=True, padding_side="left").expand(len(pixels), -1)
    with model.bind_images(pixels):  # generate took the lean loop
        direct = generate_tokens(model, tokens, get_attention_mask(model.tokenizer, tokens, False, "left"), N_NEW,
                                 **{k: v for k, v in kwargs.items() if k != "padding_side"})
    assert direct is not None and torch.equal(direct, lean)
    if stop_at_eos:  # row 0 finished at step 2 and is padded with the end-of-text token after it
        n_prompt = model.to_tokens(prompt, image=True, padding_side="left").shape[1]
        assert (lean[0, n_prompt + 2:] == kwargs["eos_token_id"]).all()


@torch.no_grad()
def test_llama_style_greedy_tokens_equal_hf_generate(tiny_llama, vit_encoder, pixels):
    hf, lm = tiny_llama
    vlm = HookedVisionPrefix(lm, vit_encoder).eval()
    ids = torch.tensor([vlm.tokenizer(PROMPTS[0])["input_ids"]])
    soft = vlm.embed_images(pixels)
    inputs = torch.cat([soft, hf.model.embed_tokens(ids).expand(len(pixels), -1, -1)], dim=1)
    expected = hf.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                           max_new_tokens=N_NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    lean = vlm.generate(PROMPTS[0], N_NEW, image_embed=soft, do_sample=False, stop_at_eos=False,
                        return_type="tokens", verbose=False)
    assert torch.equal(lean[:, -N_NEW:], expected[:, -N_NEW:])


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(top_k=20), dict(top_p=0.9)])
@torch.no_grad()
def test_sampling_with_a_seed_follows_transformer_lens(model, pixels, sampling):
    """Same per-step logits as TransformerLens's ``generate(output_logits=True)`` (to 1e-4), hence the
    same distribution, and with the same seed the same draws."""
    tokens = model.to_tokens(PROMPTS, image=True, padding_side="left")
    torch.manual_seed(7)
    reference = _generate(model, PROMPTS, pixels, lean=False, do_sample=True, stop_at_eos=False,
                          padding_side="left", output_logits=True, **sampling)
    mask = get_attention_mask(model.tokenizer, tokens, False, padding_side="left")  # as TransformerLens
    torch.manual_seed(7)
    with model.bind_images(pixels):
        out, logits = generate_tokens(model, tokens, mask, N_NEW, stop_at_eos=False, do_sample=True,
                                      return_logits=True, **sampling)
    torch.testing.assert_close(logits, torch.stack(reference.logits, dim=1), atol=1e-4, rtol=1e-4)
    assert torch.equal(out, reference.sequences)
    torch.manual_seed(7)
    lean = _generate(model, PROMPTS, pixels, lean=True, do_sample=True, stop_at_eos=False, padding_side="left",
                     **sampling)
    assert torch.equal(lean, reference.sequences)


@torch.no_grad()
def test_attached_hooks_fall_back_to_transformer_lens_and_fire(model, pixels):
    calls = []

    def ablate(act, hook):  # changes the output, so the tokens tell which path ran
        calls.append(act.shape[1])
        return torch.zeros_like(act)

    plain = _generate(model, PROMPTS[0], pixels, lean=True, do_sample=False, stop_at_eos=False)
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", ablate)]):
        assert why_not_fast(model) == "hooks are attached"
        hooked = _generate(model, PROMPTS[0], pixels, lean=True, do_sample=False, stop_at_eos=False)
    assert len(calls) == N_NEW and calls[1:] == [1] * (N_NEW - 1)  # TransformerLens's KV-cached steps
    assert not torch.equal(hooked, plain)
    assert not hooks_attached(model) and why_not_fast(model) is None
    handle = model.blocks[-1].mlp.register_forward_hook(lambda module, args, out: calls.append("torch hook"))
    try:
        assert hooks_attached(model)
        _generate(model, PROMPTS[0], pixels, lean=True, do_sample=False, stop_at_eos=False)
    finally:
        handle.remove()
    assert calls.count("torch hook") == N_NEW


def test_image_side_hooks_keep_the_lean_loop(model):
    with model.hooks(fwd_hooks=[("hook_image_embed", lambda act, hook: act)]):
        assert not hooks_attached(model)


@torch.no_grad()
def test_what_it_does_not_take_goes_to_transformer_lens(model, pixels):
    assert why_not_fast(model, use_past_kv_cache=False) == "use_past_kv_cache=False"
    assert why_not_fast(model, freq_penalty=0.5) == "freq_penalty"
    tokens = model.to_tokens(PROMPTS, image=True, padding_side="right")
    mask = torch.ones_like(tokens)
    mask[-1, -1] = 0  # a trailing pad: TransformerLens reads it differently
    with model.bind_images(pixels):
        assert generate_tokens(model, tokens, mask, N_NEW) is None
    right = _generate(model, tokens, pixels, lean=True, do_sample=False, padding_side="right")
    assert torch.equal(right, _generate(model, tokens, pixels, lean=False, do_sample=False, padding_side="right"))


def _tiny_lm(tokenizer, **cfg):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(11)
    base = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=48, n_ctx=64, d_vocab=50257, act_fn="gelu_new",
                normalization_type="LN", model_name="tiny")
    return HookedTransformer(HookedTransformerConfig(**{**base, **cfg}), tokenizer=tokenizer).eval()


@torch.no_grad()
def test_partial_rotary_with_adjacent_pairs_equals_transformer_lens(gpt2_tokenizer, vit_encoder, pixels):
    """GPT-J's rotary: only the first ``rotary_dim`` of each head's dimensions, adjacent pairs rotated."""
    lm = _tiny_lm(gpt2_tokenizer, positional_embedding_type="rotary", rotary_dim=4, rotary_adjacent_pairs=True)
    vlm = HookedVisionPrefix(lm, vit_encoder).eval()
    assert why_not_fast(vlm) is None
    kwargs = dict(do_sample=False, stop_at_eos=False, padding_side="left")
    assert torch.equal(_generate(vlm, PROMPTS, pixels, lean=True, **kwargs),
                       _generate(vlm, PROMPTS, pixels, lean=False, **kwargs))


@pytest.mark.parametrize("cfg, reason", [
    (dict(attn_only=True), "cfg.attn_only"),
    (dict(parallel_attn_mlp=True), "cfg.parallel_attn_mlp"),
    (dict(positional_embedding_type="shortformer"), "positional_embedding_type 'shortformer'"),
    (dict(act_fn="solu_ln"), "act_fn 'solu_ln'"),
])
def test_architectures_it_does_not_implement_are_named(gpt2_tokenizer, cfg, reason):
    assert why_not_fast(_tiny_lm(gpt2_tokenizer, **cfg)) == reason
