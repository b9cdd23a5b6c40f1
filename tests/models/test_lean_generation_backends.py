"""The lean KV-cached generation loop on both backends, against independent oracles: the backend's own
``generate`` (TransformerLens's on the hooked backend, the bridge's, i.e. the HF model's, on the bridge)
and Hugging Face ``generate`` on the same weights and soft prompts; hooks send generation back to the
backend's own ``generate``, where they fire."""

import pytest
import torch

from conftest import build_vlm, tiny_hf
from tl_multimodal.models import _fast_generation

N_NEW = 6


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_and_model(request, backend, gpt2_tokenizer, vit_encoder):
    """A tiny random HF GPT-2 (LayerNorm, learned positions, GELU) or Llama (RMSNorm, rotary, gated SiLU),
    float64, and the vision LM of ``backend`` on its weights."""
    hf = tiny_hf(request.param)
    return hf, build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)


@pytest.fixture
def lean_calls(monkeypatch):
    """The number of times the lean loop produced tokens (a spy on ``generate_tokens``)."""
    calls = []
    real = _fast_generation.generate_tokens

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_fast_generation, "generate_tokens", spy)
    return calls


def _generate(model, prompt, pixels, lean: bool, **kwargs):
    model.use_lean_generation = lean
    try:
        return model.generate(prompt, N_NEW, images=pixels.to(model.W_E.dtype), return_type="tokens",
                              verbose=False, **kwargs)
    finally:
        model.use_lean_generation = True


def test_both_architectures_take_the_lean_loop(hf_and_model):
    assert _fast_generation.why_not_fast(hf_and_model[1]) is None


@pytest.mark.parametrize("do_sample", [False, True])
def test_tokens_equal_the_backends_own_generate(hf_and_model, pixels, do_sample, lean_calls):
    model = hf_and_model[1]
    torch.manual_seed(11)
    lean = _generate(model, "A picture of", pixels, True, do_sample=do_sample)
    assert lean_calls == [True]
    torch.manual_seed(11)
    own = _generate(model, "A picture of", pixels, False, do_sample=do_sample)
    assert lean_calls == [True]  # the oracle did not take the lean loop
    assert torch.equal(lean, own)


def test_left_padded_rows_equal_each_prompt_alone(hf_and_model, pixels, lean_calls):
    """Prompts of different lengths, left-padded in one batch: each row's new tokens are what the
    backend's own ``generate`` gives for that prompt and image alone (no padding)."""
    model = hf_and_model[1]
    prompts = ["A", "A very small picture of a", "Two"]
    batch = _generate(model, prompts, pixels, True, do_sample=False, stop_at_eos=False, padding_side="left")
    assert lean_calls == [True]
    for i, prompt in enumerate(prompts):
        alone = _generate(model, prompt, pixels[i:i + 1], False, do_sample=False, stop_at_eos=False)
        assert torch.equal(batch[i, -N_NEW:], alone[0, -N_NEW:]), prompt


def test_greedy_tokens_equal_hf_generate(hf_and_model, pixels, lean_calls):
    hf, model = hf_and_model
    tokens = model.to_tokens("A picture of", image=True).expand(len(pixels), -1)
    slots = model.image_mask(tokens)
    with torch.no_grad():
        soft = model.embed_images(pixels.to(model.W_E.dtype))
        x = hf.get_input_embeddings()(tokens.masked_fill(slots, 0))
        x[slots] = soft.reshape(-1, soft.shape[-1]).to(x.dtype)
        expected = hf.generate(inputs_embeds=x, attention_mask=torch.ones_like(tokens), do_sample=False,
                               max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    out = _generate(model, "A picture of", pixels, True, do_sample=False, stop_at_eos=False)
    assert lean_calls == [True]
    assert torch.equal(out[:, tokens.shape[1]:], expected[:, -N_NEW:])


def test_hooks_send_generation_to_the_backends_generate_and_fire(hf_and_model, pixels, lean_calls):
    model = hf_and_model[1]
    seen = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook: seen.append(act.shape[1]))]):
        assert _fast_generation.why_not_fast(model) == "hooks are attached"
        _generate(model, "A picture of", pixels, True, do_sample=False, stop_at_eos=False)
    assert lean_calls == [] and len(seen) == N_NEW  # one call per step: the prompt, then one token each
    assert _fast_generation.why_not_fast(model) is None  # the hooks are gone


def test_use_lean_generation_false_is_named(hf_and_model):
    model = hf_and_model[1]
    if not isinstance(model, _fast_generation.TransformerBridge):
        pytest.skip("the hooked backend reads use_lean_generation in generate, not in why_not_fast")
    model.use_lean_generation = False
    try:
        assert _fast_generation.why_not_fast(model) == "use_lean_generation=False"
    finally:
        model.use_lean_generation = True
