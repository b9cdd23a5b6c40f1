"""The decodability test and the logit lens by depth on a planted model, on both backends.

The planted model is a tiny HF GPT-2 built by hand (:func:`planted_hf`): no attention or MLP output
and no position embedding, so the residual stream at the image positions is the soft prompt itself
until block ``LAYER``, whose MLP unit ``i`` reads image ``i``'s code and writes a direction that the
unembedding (one row per planted word, made long) turns into image ``i``'s word. So image ``i``'s
positions decode to its word from depth ``LAYER + 1`` on and to unrelated tokens before; and its
captions hold that word. Oracles: the HF model fed the same embeddings (its hidden states through
``ln_f`` and ``lm_head``), the planted words, a bag-of-words sentence embedding built by hand, and
for the KS test the definition of the statistic computed by hand."""

import numpy as np
import pytest
import torch

from conftest import build_vlm, tiny_hf
from tl_multimodal.analysis.lens import image_logit_lens
from tl_multimodal.evaluation.decodability import decodability_test, matched_norm_vectors
from tl_multimodal.evaluation.lens import lens_similarity, resid_lens_texts, unit_lens_texts

WORDS = ["cat", "boat", "pizza", "dog", "train", "horse"]
N_LAYERS, LAYER, D_MODEL = 3, 1, 32


def bag_of_words(texts):
    """A hand-built sentence embedding: L2-normalised word counts over the texts' vocabulary."""
    vocab = sorted({w for t in texts for w in t.lower().split()})
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(texts), max(len(vocab), 1)))
    for r, t in enumerate(texts):
        for w in t.lower().split():
            out[r, index[w]] += 1
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1)


CAPTIONS = [[f"a {w} on the table", f"the {w} is here"] for w in WORDS]


def word_ids(tokenizer):
    ids = [tokenizer.encode(" " + w) for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


def centred_unit(v):
    v = v - v.mean()
    return v / v.norm()


def planted_hf(tokenizer, codes):
    """The planted tiny GPT-2 (module docstring); ``codes[i]`` is the direction image ``i``'s unit reads."""
    hf = tiny_hf("gpt2", n_layers=N_LAYERS, d_model=D_MODEL, n_heads=4, d_mlp=24, seed=5)
    ids = word_ids(tokenizer)
    eye = torch.eye(D_MODEL, dtype=hf.dtype)
    with torch.no_grad():
        hf.transformer.wpe.weight.zero_()
        for block in hf.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        mlp = hf.transformer.h[LAYER].mlp
        mlp.c_fc.weight.zero_()
        mlp.c_fc.bias.zero_()
        for i, t in enumerate(ids):
            out = centred_unit(eye[8 + i])                 # orthogonal to every code below
            hf.lm_head.weight[t] = 5.0 * out               # far longer than any random row (~0.85)
            mlp.c_fc.weight[:, i] = codes[i]
            mlp.c_proj.weight[i] = 10.0 * out
    return hf, ids


@pytest.fixture(scope="module")
def planted(backend, gpt2_tokenizer, vit_encoder):
    eye = torch.eye(D_MODEL, dtype=torch.float64)
    hf, ids = planted_hf(gpt2_tokenizer, [eye[i] for i in range(len(WORDS))])
    model = build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)
    # image i's soft prompts: its code (basis vector i) at every patch, each patch scaled differently
    scale = torch.linspace(1.0, 3.0, model.n_image_tokens, dtype=torch.float64)[None, :, None]
    embed = eye[: len(WORDS)][:, None, :] * scale
    return model, hf, ids, embed


def test_lens_decodes_the_planted_word_from_the_planted_layer_on(planted):
    model, hf, ids, embed = planted
    lens = image_logit_lens(model, image_embed=embed, n_tokens=3, batch_size=4)
    assert lens.token_ids.shape == (N_LAYERS + 1, len(WORDS), model.n_image_tokens, 3)
    top1 = lens.token_ids[..., 0]
    want = torch.tensor(ids)[:, None].expand(-1, model.n_image_tokens)
    for depth in range(N_LAYERS + 1):
        if depth > LAYER:
            assert torch.equal(top1[depth], want), depth
        else:
            assert not (top1[depth] == want).any(), depth
    # oracle: HF fed the same embeddings; hidden_states[d] is the residual stream before block d
    # (the last one already through ln_f)
    slots = model.image_mask(model.to_tokens("", image=True))[0]
    tokens = model.to_tokens("", image=True).expand(len(WORDS), -1)
    inputs = hf.transformer.wte(tokens.clamp_max(hf.config.vocab_size - 1)).detach().clone()
    inputs[:, slots] = embed.to(inputs.dtype)
    with torch.no_grad():
        hs = hf(inputs_embeds=inputs, output_hidden_states=True).hidden_states
        for depth in range(N_LAYERS + 1):
            x = hs[depth][:, slots]
            logits = hf.lm_head(x if depth == N_LAYERS else hf.transformer.ln_f(x))
            torch.testing.assert_close(lens.probs[depth], logits.softmax(-1).topk(3).values.float(),
                                       rtol=1e-5, atol=1e-6)
            assert torch.equal(lens.token_ids[depth], logits.topk(3).indices)


def test_lens_similarity_rises_where_the_word_appears(planted):
    model, _, _, embed = planted
    texts = resid_lens_texts(model, image_embed=embed, n_tokens=1)
    assert [texts[LAYER + 1][i][0].strip() for i in range(len(WORDS))] == WORDS
    curve = lens_similarity(texts, CAPTIONS, bag_of_words, source="residual stream", n_boot=500)
    df = curve.to_dataframe()
    # own captions: "cat" vs "a cat on the table" and "the cat is here": cosines 1/sqrt(5) and 1/2
    want = (1 / np.sqrt(5) + 0.5) / 2
    after = df[df.depth > LAYER]
    np.testing.assert_allclose(after.matched, want)
    np.testing.assert_allclose(after.random_pairing, 0.0)
    assert (after.gap_low > 0).all()
    before = df[df.depth <= LAYER]
    np.testing.assert_allclose(before.gap, 0.0)
    assert "residual stream" in repr(curve) and len(df) == N_LAYERS + 1
    fig = curve.plot()
    assert len(fig.axes[0].lines) >= 1


def test_unit_lens_finds_the_planted_units_at_the_planted_layer(planted):
    model, _, _, embed = planted
    texts = unit_lens_texts(model, image_embed=embed, n_units=1, n_tokens=1)
    assert sorted(texts) == list(range(N_LAYERS))
    assert [texts[LAYER][i][0] for i in range(len(WORDS))] == WORDS
    df = lens_similarity(texts, CAPTIONS, bag_of_words, n_boot=500).to_dataframe()
    assert df.set_index("depth").gap_low[LAYER] > 0
    np.testing.assert_allclose(df[df.depth != LAYER].gap, 0.0)


def ks_by_hand(a, b):
    """The two-sample KS statistic by its definition: the largest gap between the empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf = lambda s: (np.sort(s)[None, :] <= grid[:, None]).mean(1)  # noqa: E731
    return np.abs(cdf(a) - cdf(b)).max()


def test_decodability_finds_decodable_prompts(planted, gpt2_tokenizer):
    model, hf, ids, _ = planted
    # soft prompts that ARE the planted words: their input embedding (for "embed") whose centred direction
    # the planted unembedding row reads (for "unembed"): make each planted row point along it
    W_E = model.W_E.detach()
    prompts = torch.stack([W_E[t] for t in ids])[:, None, :].expand(-1, model.n_image_tokens, -1)
    prompts = prompts * torch.linspace(0.5, 2.0, model.n_image_tokens, dtype=prompts.dtype)[None, :, None]
    dec = decodability_test(model, reference_captions=CAPTIONS, embed=bag_of_words, image_embed=prompts,
                            n_tokens=1, methods=("embed",), n_perm=2000)
    assert all(t == w for row, w in zip(dec.texts[("embed", "soft prompts")], WORDS) for t in row)
    df = dec.to_dataframe().set_index("source")
    want = (1 / np.sqrt(5) + 0.5) / 2
    np.testing.assert_allclose(df.matched["soft prompts"], want)
    assert df.matched["random vectors"] < want / 10 and df.perm_p["soft prompts"] < 0.01
    a, b = dec.scores[("embed", "soft prompts")].ravel(), dec.scores[("embed", "random vectors")].ravel()
    np.testing.assert_allclose(df.ks_D.iloc[0], ks_by_hand(a, b))
    assert df.ks_D.iloc[0] > 0.9 and df.ks_p.iloc[0] < 1e-6
    assert "KS" in repr(dec)


def test_decodability_of_the_planted_codes_by_unembedding(planted):
    model, _, ids, embed = planted
    # the codes decode to unrelated tokens at depth 0, the planted depth's residual stream to the words:
    # feed that residual stream as the "soft prompt"
    lens_in = embed + 10.0 * torch.stack([centred_unit(torch.eye(D_MODEL, dtype=embed.dtype)[8 + i])
                                          for i in range(len(WORDS))])[:, None, :]
    dec = decodability_test(model, reference_captions=CAPTIONS, embed=bag_of_words, image_embed=lens_in,
                            n_tokens=1, methods=("unembed",))
    assert all(t == w for row, w in zip(dec.texts[("unembed", "soft prompts")], WORDS) for t in row)
    # (random vectors sometimes land on a planted word too: its unembedding row is 6x longer than the others)
    assert dec.ks["unembed"][0] > 0.5 and dec.ks["unembed"][1] < 1e-6
    plain = decodability_test(model, reference_captions=CAPTIONS, embed=bag_of_words, image_embed=embed,
                              n_tokens=1, methods=("unembed",))
    assert plain.ks["unembed"][0] < 0.2 and plain.pairing[("unembed", "soft prompts")].matched == 0


def test_matched_norm_vectors_keep_the_norms():
    x = torch.randn(3, 5, 16, dtype=torch.float64) * torch.arange(1, 6, dtype=torch.float64)[None, :, None]
    r = matched_norm_vectors(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    assert (torch.nn.functional.cosine_similarity(r, x, dim=-1).abs() < 0.9).all()


def test_bad_input_is_named(planted):
    model, _, _, embed = planted
    with pytest.raises(ValueError, match="reference_captions"):
        decodability_test(model, reference_captions=CAPTIONS[:2], embed=bag_of_words, image_embed=embed)
    with pytest.raises(ValueError, match="methods"):
        decodability_test(model, reference_captions=CAPTIONS, embed=bag_of_words, image_embed=embed,
                          methods=("nearest",))
    with pytest.raises(ValueError, match="texts"):
        lens_similarity({0: [["cat"]]}, CAPTIONS, bag_of_words)
    with pytest.raises(ValueError, match="n_tokens"):
        image_logit_lens(model, image_embed=embed, n_tokens=0)
