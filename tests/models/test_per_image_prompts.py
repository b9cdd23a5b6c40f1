"""One prompt per image in ``generate``: every row continues as it does alone.

Oracles: the same model generating each prompt alone (no padding at all), and Hugging Face's own
``generate`` on the HF weights fed each row's embeddings alone (its soft prompts at the image slots).
Both layouts (``[image][text]`` and ``[BOS][image][text]``), GPT-2 style (learned positions) and Llama
style (rotary) LMs, on both backends; with hooks attached (TransformerLens's own loop on the hooked
backend) and without a KV cache."""

import pytest
import torch

from conftest import build_vlm, tiny_hf

PROMPTS = ["A", "A picture of a very small"]
N_NEW = 6


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_and_model(request, backend, gpt2_tokenizer, vit_encoder):
    hf = tiny_hf(request.param, n_layers=2, d_model=32, n_heads=4, d_mlp=64, dtype=torch.float32, seed=3)
    return hf, build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)


def _new_tokens(model, prompt, images, **kwargs):
    out = model.generate(prompt, N_NEW, images=images, do_sample=False, stop_at_eos=False,
                         return_type="tokens", verbose=False, **kwargs)
    return out[:, -N_NEW:]


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("how", ["default", "hooks attached", "no kv cache"])
@torch.no_grad()
def test_each_row_continues_as_it_does_alone(hf_and_model, pixels, bos, how):
    hf, model = hf_and_model
    model.projection.info.bos = bos  # the layout (GPT-2's BOS is its pad token: the layout tells them apart)
    try:
        _check_rows(hf, model, pixels[:2], bos, {"use_past_kv_cache": False} if how == "no kv cache" else {},
                    how == "hooks attached")
    finally:
        model.projection.info.bos = False


def _check_rows(hf, model, images, bos, kwargs, hooks):
    alone = torch.cat([_new_tokens(model, p, images[i:i + 1], **kwargs) for i, p in enumerate(PROMPTS)])
    if hooks:
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: act)]):
            batched = _new_tokens(model, PROMPTS, images, **kwargs)
    else:
        batched = _new_tokens(model, PROMPTS, images, **kwargs)
    assert torch.equal(batched, alone)

    # HF's generate on each row's embeddings alone: text ids embedded by HF, soft prompts at the slots
    soft = model.embed_images(images)
    for i, prompt in enumerate(PROMPTS):
        ids = model.to_tokens(prompt, image=True).cpu()
        assert (ids[0, 0] == model.start_token_id) == bos
        slots = model.image_mask(ids)
        embeds = hf.get_input_embeddings()(ids.masked_fill(slots, 0))
        embeds[slots] = soft[i].to(embeds)
        expected = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(batched[i], expected[0, -N_NEW:])


@torch.no_grad()
def test_right_padding_of_prompts_of_different_lengths_is_refused(hf_and_model, pixels):
    model = hf_and_model[1]
    with pytest.raises(ValueError, match="padding_side='right'"):
        model.generate(PROMPTS, 2, images=pixels[:2], padding_side="right", verbose=False)
    same = ["A picture of", "A picture of"]  # no padding: either side is the same
    right = model.generate(same, 2, images=pixels[:2], padding_side="right", do_sample=False, verbose=False)
    assert right == model.generate(same, 2, images=pixels[:2], do_sample=False, verbose=False)
