"""Oracles for tl_multimodal.analysis.decoding: TransformerLens's own residual decomposition, a planted
unit, brute-force nearest tokens, and the shipped word list; the model-based tests run on a
HookedVisionPrefix and a VisionBridge built from the same HF weights."""

import pytest
import torch

from tl_multimodal.analysis.decoding import (
    UnitDecoding,
    decode_image_prompts,
    decode_unit,
    decode_units,
    is_english_word,
    is_interpretable,
    load_word_list,
)

from conftest import assert_decoding_matches_decomposition, build_vlm, hf_mlp, tiny_hf


def _tiny_hf(style):
    """2 layers of 24 units, float64, with non-trivial final-norm weights (and bias, for LayerNorm)."""
    hf = tiny_hf(style, n_layers=2)
    norm = hf.transformer.ln_f if style == "gpt2" else hf.model.norm
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand_like(norm.weight))
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    return hf


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_vlm(request, backend, gpt2_tokenizer, vit_encoder):
    return build_vlm(backend, _tiny_hf(request.param), gpt2_tokenizer, vit_encoder)


@pytest.mark.parametrize("apply_ln", [False, True])
def test_agrees_with_full_resid_decomposition(tiny_vlm, pixels, apply_ln):
    """A neuron's component of the residual stream (act * W_out row) projected on W_U is act (/ scale
    with the norm) times the decoded direction's logits, and has the same top tokens."""
    _, cache = tiny_vlm.run_with_cache("The cat sat on the mat", images=pixels[:1])
    assert_decoding_matches_decomposition(tiny_vlm, cache, [(0, 3), (1, 0), (1, 17)], apply_ln)


def test_planted_unit_decodes_to_its_token(backend, gpt2_tokenizer, vit_encoder):
    hf = _tiny_hf("gpt2")
    tid = gpt2_tokenizer(" volcano")["input_ids"][0]
    direction = torch.zeros(32, dtype=torch.float64)
    direction[4], direction[9] = 1.0, -1.0  # mean zero, so LN centring keeps it
    with torch.no_grad():
        hf_mlp(hf, 1)["W_out"][7] = direction
        hf.lm_head.weight[tid] = 20 * direction  # W_U[:, tid]
    model = build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)
    for apply_ln in (False, True):
        dec = decode_unit(model, 1, 7, n_tokens=10, apply_ln=apply_ln)
        assert dec.token_ids[0, 0] == tid and dec.tokens[0][0] == " volcano"
        assert dec.probs[0, 0] > 0.5 and torch.all(dec.probs[0, :-1] >= dec.probs[0, 1:])


def test_batch_api_and_dataframe(tiny_vlm):
    units = torch.tensor([[0, 1], [1, 10], [1, 23], [1, 10]])
    dec = decode_units(tiny_vlm, units, n_tokens=10, batch_size=3)
    assert isinstance(dec, UnitDecoding) and len(dec) == 4 and dec.token_ids.shape == (4, 10)
    one = decode_unit(tiny_vlm, 1, 23)
    assert dec.token_ids[2].tolist() == one.token_ids[0].tolist()
    torch.testing.assert_close(dec.probs[2], one.probs[0])
    logits = tiny_vlm.W_out[1, 10] @ tiny_vlm.W_U  # brute force, from the stacked weights
    assert dec.token_ids[1].tolist() == logits.topk(10).indices.tolist()
    torch.testing.assert_close(dec.probs[1], logits.float().softmax(-1).topk(10).values)
    df = dec.to_dataframe()
    assert len(df) == 40 and list(df.columns) == ["layer", "unit", "rank", "token", "token_id", "prob", "interpretable"]
    assert "UnitDecoding(4 units" in repr(dec)
    assert dec.interpretable.tolist() == [is_interpretable(t) for t in dec.tokens]
    with pytest.raises(ValueError, match="out of range"):
        decode_units(tiny_vlm, [(2, 0)])
    with pytest.raises(ValueError, match="out of range"):
        decode_units(tiny_vlm, [(0, 24)])
    with pytest.raises(ValueError, match="non-empty"):
        decode_units(tiny_vlm, [])
    with pytest.raises(ValueError, match="n_tokens must be"):
        decode_units(tiny_vlm, [(0, 0)], n_tokens=0)


def test_word_list_and_interpretability_filter():
    words = load_word_list()
    assert 20_000 < len(words) < 60_000
    assert {"NOUN"} <= words["dog"] and "ADJ" in words["red"]
    assert is_english_word(" dog") and is_english_word("\u0120Dog") and is_english_word("the")
    assert not is_english_word(" do")  # 2 letters
    assert not is_english_word(" xqzt") and not is_english_word(" 123") and not is_english_word(" dog's")
    seven = [" dog", " cat", " house", " tree", " water", " music", " river", " ##", " xqj", " zz"]
    assert is_interpretable(seven)
    assert not is_interpretable(seven[:6] + [" qq"] + seven[7:])
    with pytest.raises(ValueError, match="top 10"):
        is_interpretable(seven[:5])


@pytest.mark.parametrize("method", ["unembed", "embed"])
def test_decode_image_prompts_matches_brute_force(tiny_vlm, pixels, method):
    dec = decode_image_prompts(tiny_vlm, pixels, n_tokens=5, method=method)
    assert dec.token_ids.shape == (3, 16, 5) and len(dec.tokens[2][15]) == 5
    _, cache = tiny_vlm.run_with_cache("A picture of", images=pixels)
    x = cache["hook_image_embed"][1, 7]
    if method == "unembed":
        scores = (tiny_vlm.ln_final(x[None, None])[0, 0] @ tiny_vlm.W_U + tiny_vlm.b_U).softmax(-1)
    else:
        scores = torch.nn.functional.cosine_similarity(x[None], tiny_vlm.W_E, dim=-1)
    top = scores.topk(5)
    assert dec.token_ids[1, 7].tolist() == top.indices.tolist()
    torch.testing.assert_close(dec.scores[1, 7], top.values.float(), rtol=1e-4, atol=1e-6)
    assert len(dec.to_dataframe()) == 3 * 16 * 5 and "ImagePromptDecoding(3 images" in repr(dec)
    with pytest.raises(ValueError, match="method"):
        decode_image_prompts(tiny_vlm, pixels, method="nearest")
