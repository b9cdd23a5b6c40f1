"""Oracles for tl_multimodal.decoding: TransformerLens's own residual decomposition, a planted
unit, brute-force nearest tokens, and the shipped word list."""

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_multimodal.decoding import (
    UnitDecoding,
    decode_image_prompts,
    decode_unit,
    decode_units,
    is_english_word,
    is_interpretable,
    load_word_list,
)

from conftest import assert_decoding_matches_decomposition


def _tiny_lm(tok, style="gpt2"):
    torch.manual_seed(0)
    cfg = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=24, n_ctx=64, d_vocab=50257,
               act_fn="gelu_new", normalization_type="LN", model_name="tiny", dtype=torch.float64)
    if style == "llama":
        cfg.update(act_fn="silu", normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary",
                   rotary_dim=8, final_rms=True)
    lm = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tok).eval()
    with torch.no_grad():  # non-trivial final norm weights
        lm.ln_final.w.copy_(0.5 + torch.rand_like(lm.ln_final.w))
        if hasattr(lm.ln_final, "b"):
            lm.ln_final.b.normal_()
    return lm


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("apply_ln", [False, True])
def test_agrees_with_full_resid_decomposition(gpt2_tokenizer, style, apply_ln):
    """A neuron's component of the residual stream (act * W_out row) projected on W_U is act (/ scale
    with the norm) times the decoded direction's logits, and has the same top tokens."""
    lm = _tiny_lm(gpt2_tokenizer, style)
    _, cache = lm.run_with_cache("The cat sat on the mat")
    assert_decoding_matches_decomposition(lm, cache, [(0, 3), (1, 0), (1, 17)], apply_ln)


def test_planted_unit_decodes_to_its_token(gpt2_tokenizer):
    lm = _tiny_lm(gpt2_tokenizer)
    tid = gpt2_tokenizer(" volcano")["input_ids"][0]
    direction = torch.zeros(32, dtype=torch.float64)
    direction[4], direction[9] = 1.0, -1.0  # mean zero, so LN centring keeps it
    with torch.no_grad():
        lm.blocks[1].mlp.W_out[7] = direction
        lm.W_U[:, tid] = 20 * direction
    for apply_ln in (False, True):
        dec = decode_unit(lm, 1, 7, n_tokens=10, apply_ln=apply_ln)
        assert dec.token_ids[0, 0] == tid and dec.tokens[0][0] == " volcano"
        assert dec.probs[0, 0] > 0.5 and torch.all(dec.probs[0, :-1] >= dec.probs[0, 1:])


def test_batch_api_and_dataframe(vlm):
    units = torch.tensor([[0, 1], [5, 100], [11, 3071], [5, 100]])
    dec = decode_units(vlm, units, n_tokens=10, batch_size=3)
    assert isinstance(dec, UnitDecoding) and len(dec) == 4 and dec.token_ids.shape == (4, 10)
    one = decode_unit(vlm, 11, 3071)
    assert dec.token_ids[2].tolist() == one.token_ids[0].tolist()
    torch.testing.assert_close(dec.probs[2], one.probs[0])
    logits = vlm.blocks[5].mlp.W_out[100] @ vlm.W_U  # brute force
    assert dec.token_ids[1].tolist() == logits.topk(10).indices.tolist()
    torch.testing.assert_close(dec.probs[1], logits.softmax(-1).topk(10).values)
    df = dec.to_dataframe()
    assert len(df) == 40 and list(df.columns) == ["layer", "unit", "rank", "token", "token_id", "prob", "interpretable"]
    assert "UnitDecoding(4 units" in repr(dec)
    assert dec.interpretable.tolist() == [is_interpretable(t) for t in dec.tokens]
    with pytest.raises(ValueError, match="out of range"):
        decode_units(vlm, [(12, 0)])
    with pytest.raises(ValueError, match="out of range"):
        decode_units(vlm, [(0, 3072)])
    with pytest.raises(ValueError, match="non-empty"):
        decode_units(vlm, [])
    with pytest.raises(ValueError, match="n_tokens must be"):
        decode_units(vlm, [(0, 0)], n_tokens=0)


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
def test_decode_image_prompts_matches_brute_force(vlm, pixels, method):
    dec = decode_image_prompts(vlm, pixels, n_tokens=5, method=method)
    assert dec.token_ids.shape == (3, 16, 5) and len(dec.tokens[2][15]) == 5
    _, cache = vlm.run_with_cache("A picture of", images=pixels)
    x = cache["hook_image_embed"][1, 7]
    if method == "unembed":
        scores = vlm.unembed(vlm.ln_final(x[None, None]))[0, 0].softmax(-1)
    else:
        scores = torch.nn.functional.cosine_similarity(x[None], vlm.W_E, dim=-1)
    top = scores.topk(5)
    assert dec.token_ids[1, 7].tolist() == top.indices.tolist()
    torch.testing.assert_close(dec.scores[1, 7], top.values.float(), rtol=1e-4, atol=1e-6)
    assert len(dec.to_dataframe()) == 3 * 16 * 5 and "ImagePromptDecoding(3 images" in repr(dec)
    with pytest.raises(ValueError, match="method"):
        decode_image_prompts(vlm, pixels, method="nearest")
