"""Oracles for tl_multimodal.analysis.attribution: finite differences (GPT-2-style and gated Llama-style tiny
models, each as a HookedVisionPrefix and as a VisionBridge), a hand-planted multimodal neuron, the
completeness of integrated gradients, targets read off the model's own logits, and GPT-2 small with
a single backward pass."""

import warnings

import pytest
import torch

from tl_multimodal import HookedVisionPrefix
from tl_multimodal.analysis.attribution import Attribution, TopUnits, attribute, attribute_dataset
from tl_multimodal.analysis.nouns import first_noun
from tl_multimodal.analysis.decoding import decode_units

from conftest import build_vlm, hf_mlp, tiny_hf

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4: the HookedTransformer-only tests skip
    HookedTransformer = None

PROMPT = "A picture of"
needs_hooked_transformer = pytest.mark.skipif(HookedTransformer is None,
                                              reason="builds a HookedTransformer by hand (TransformerLens 3 only)")


def _tiny_lm(tok, gated=False, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=24, n_ctx=64, d_vocab=50257,
               act_fn="gelu_new", normalization_type="LN", model_name="tiny", dtype=dtype)
    if gated:
        cfg.update(act_fn="silu", normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary",
                   rotary_dim=8, final_rms=True, original_architecture="LlamaForCausalLM")
    cfg.update(kw)
    lm = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tok)
    with torch.no_grad():  # widen the random init so the tiny models are not almost linear
        for name, p in lm.named_parameters():
            if name.endswith(("W_in", "W_gate", "W_out", "W_V", "W_O")):
                p.mul_(4.0)
    return lm.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_vlm(request, backend, gpt2_tokenizer, vit_encoder):
    """3 layers of 24 units, float64, as a HookedVisionPrefix or a VisionBridge (``backend``)."""
    return build_vlm(backend, tiny_hf(request.param), gpt2_tokenizer, vit_encoder)


@pytest.fixture(scope="module")
def feats(vit_encoder):
    torch.manual_seed(5)
    return torch.randn(2, vit_encoder.n_patches, vit_encoder.d_img)


def _y(model, feats, target_id, hook_name=None, edit=None):
    """y_c with an optional edit of one hook: the logit of target_id after the prompt."""
    hooks = [] if hook_name is None else [(hook_name, edit)]
    logits = model.run_with_hooks(PROMPT, image_features=feats, fwd_hooks=hooks)
    return logits[:, -1, target_id]


@pytest.mark.parametrize("hook", ["pre", "post", "pre_linear"])
def test_matches_finite_differences(tiny_vlm, backend, feats, hook):
    """g = Z * dy/dZ: a shift of Z by eps changes y by eps * g / Z; scaling Z by (1 + eps) by eps * g.

    HF's Llama computes its RMSNorm and attention softmax in float32 even in a float64 model, so on
    the bridge y carries float32 rounding (~1e-6): there the step is larger and the tolerance wider
    (still far below the strongest units' scores, which are checked too)."""
    if hook == "pre_linear" and not tiny_vlm.cfg.gated_mlp:
        with pytest.raises(ValueError, match="hook_pre_linear"):
            attribute(tiny_vlm, image_features=feats, target=" dog", hook=hook)
        return
    tid = tiny_vlm.tokenizer(" dog")["input_ids"][0]
    attr = attribute(tiny_vlm, image_features=feats, target="dog", hook=hook, prompt=PROMPT)
    assert attr.target_ids.tolist() == [tid, tid]
    assert attr.scores.shape == (2, 3, 16, 24) and attr.scores.dtype == torch.float32
    torch.testing.assert_close(attr.y.double(), _y(tiny_vlm, feats, tid).detach(), rtol=1e-6, atol=1e-6)
    _, cache = tiny_vlm.run_with_cache(PROMPT, image_features=feats)
    float32_inside = backend == "bridge" and tiny_vlm.cfg.gated_mlp
    eps, rtol, atol = (4e-2, 1e-3, 3e-5) if float32_inside else (1e-4, 1e-4, 1e-7)
    strongest = [(l, *divmod(int(attr.scores[0, l].abs().argmax()), 24)) for l in range(2)]
    for (layer, patch, unit) in [(0, 3, 5), (1, 15, 0), *strongest]:
        name = f"blocks.{layer}.mlp.hook_{hook}"
        z = cache[name][:, patch, unit]

        def shift(d):
            def edit(act, hook):
                act = act.clone()
                act[:, patch, unit] += d
                return act
            return _y(tiny_vlm, feats, tid, name, edit).detach()

        def scale(s):
            def edit(act, hook):
                act = act.clone()
                act[:, patch, unit] *= s
                return act
            return _y(tiny_vlm, feats, tid, name, edit).detach()

        grad = (shift(eps) - shift(-eps)) / (2 * eps)
        g = attr.scores[:, layer, patch, unit].double()
        torch.testing.assert_close(g, z * grad, rtol=rtol, atol=atol)
        # the relative step s moves Z by s * |Z| = eps, as the shift does: a larger |Z| would take a larger
        # step and a larger truncation error (eps^2 * y''' / 6)
        s = eps / z.abs().clamp_min(eps)
        torch.testing.assert_close(g, (scale(1 + s) - scale(1 - s)) / (2 * s), rtol=rtol, atol=atol)
    # the last layer's MLP at image positions cannot reach the text position that predicts c
    assert (attr.scores[:, 2] == 0).all() and attr.scores[:, :2].abs().max() > 1e-2 > 100 * atol


def test_bos_layout_scores_the_image_slots_after_the_bos(tiny_vlm, backend, feats, monkeypatch):
    """With [BOS][image][text], patch p is sequence position p + 1: the probe reads it off the mask.
    (Finite-difference step and tolerance as in test_matches_finite_differences.)"""
    monkeypatch.setattr(tiny_vlm.projection.info, "bos", True)
    tid = tiny_vlm.tokenizer(" dog")["input_ids"][0]
    attr = attribute(tiny_vlm, image_features=feats, target=tid, prompt=PROMPT)
    assert attr.probe.tokens[0, 0] == tiny_vlm.start_token_id
    assert attr.probe.image_positions.tolist() == [list(range(1, 17))] * 2
    torch.testing.assert_close(attr.y.double(), _y(tiny_vlm, feats, tid).detach(), rtol=1e-6, atol=1e-6)
    _, cache = tiny_vlm.run_with_cache(PROMPT, image_features=feats)
    float32_inside = backend == "bridge" and tiny_vlm.cfg.gated_mlp
    eps, rtol, atol = (4e-2, 1e-3, 3e-5) if float32_inside else (1e-4, 1e-4, 1e-7)
    for layer, patch, unit in [(0, 0, 5), (1, 15, 0)]:
        name = f"blocks.{layer}.mlp.hook_pre"

        def shift(d):
            def edit(act, hook):
                act = act.clone()
                act[:, patch + 1, unit] += d
                return act
            return _y(tiny_vlm, feats, tid, name, edit).detach()

        grad = (shift(eps) - shift(-eps)) / (2 * eps)
        torch.testing.assert_close(attr.scores[:, layer, patch, unit].double(),
                                   cache[name][:, patch + 1, unit] * grad, rtol=rtol, atol=atol)


def test_logprob_and_caption_objectives(tiny_vlm, feats):
    """y is read off the model's own output: the target's log-prob, and the caption's total log-prob."""
    tid = tiny_vlm.tokenizer(" dog")["input_ids"][0]
    lp = attribute(tiny_vlm, image_features=feats, target=tid, objective="logprob")
    logits = tiny_vlm(PROMPT, image_features=feats)[:, -1].log_softmax(-1)
    torch.testing.assert_close(lp.y.double(), logits[:, tid].detach(), rtol=1e-6, atol=1e-6)

    cap = "a dog on a red sofa"
    attr = attribute(tiny_vlm, image_features=feats, captions=[cap, cap], objective="caption_logprob")
    tokens = tiny_vlm.to_tokens(PROMPT + " " + cap, image=True).expand(2, -1)
    n_prompt = tiny_vlm.to_tokens(PROMPT, image=True).shape[1]
    logp = tiny_vlm(tokens, image_features=feats).log_softmax(-1)[:, n_prompt - 1:-1]
    want = logp.gather(-1, tokens[:, n_prompt:, None]).sum((1, 2))
    torch.testing.assert_close(attr.y.double(), want.detach(), rtol=1e-6, atol=1e-5)
    assert attr.targets == [cap, cap] and attr.target_ids.tolist() == [-1, -1]


def test_first_noun_of_given_and_generated_captions(tiny_vlm, feats):
    """The target is the caption's first noun, predicted from the position just before it."""
    assert first_noun("a red car parked on the street") == ("car", 6)
    assert first_noun("two young women with their dogs") == ("women", 10)
    assert first_noun("an old black and white photo of a man") == ("man", 34)
    assert first_noun("of the and") is None

    attr = attribute(tiny_vlm, image_features=feats, captions=["a red car on the road", "the dog"])
    assert attr.targets == [" car", " dog"]
    n_prompt = tiny_vlm.to_tokens(PROMPT, image=True).shape[1]
    assert attr.positions.tolist() == [n_prompt + 1, n_prompt]  # after " a red" / " the"
    tokens = tiny_vlm.to_tokens(PROMPT + " a red car", image=True)
    want = tiny_vlm(tokens.expand(2, -1), image_features=feats)[0, n_prompt + 1, attr.target_ids[0]]
    torch.testing.assert_close(attr.y[0].double(), want.detach(), rtol=1e-6, atol=1e-6)

    with warnings.catch_warnings():  # a random model's caption may have no noun: first word, with a warning
        warnings.simplefilter("ignore", UserWarning)
        gen = attribute(tiny_vlm, image_features=feats, max_new_tokens=12)  # the model's own greedy caption
        whole = attribute(tiny_vlm, image_features=feats, max_new_tokens=12, until="caption")
    out = tiny_vlm.generate(PROMPT, 12, image_features=feats, do_sample=False, return_type="tokens", verbose=False)
    for i in range(2):
        caption_ids = out[i, n_prompt:].tolist()
        j = int(gen.positions[i]) - n_prompt + 1
        assert caption_ids[j] == int(gen.target_ids[i])
        eos = tiny_vlm.tokenizer.eos_token_id
        caption_ids = caption_ids[:caption_ids.index(eos)] if eos in caption_ids else caption_ids
        full = tiny_vlm.tokenizer.decode(caption_ids)
        assert whole.captions[i] == full  # until="caption": the whole greedy caption, its first noun
        assert caption_ids[int(whole.positions[i]) - n_prompt + 1] == int(whole.target_ids[i])
        # generation stopped once the noun was complete: the caption is the greedy one cut right after it
        assert full.startswith(gen.captions[i])
        found = first_noun(gen.captions[i])
        if gen.captions[i] != full and found is not None:
            assert found[1] + len(found[0]) < len(gen.captions[i])
            decode = tiny_vlm.tokenizer.decode
            n = next(n for n in range(len(caption_ids)) if decode(caption_ids[:n]) == gen.captions[i])
            shorter = tiny_vlm.tokenizer.decode(caption_ids[:n - 1])
            cut = first_noun(shorter)
            assert cut is None or cut[1] + len(cut[0]) >= len(shorter)  # not settled one token earlier


def test_caption_and_attribute_in_one_pass_or_two_agree(tiny_vlm, feats):
    """``grad_through_kv_cache``: the captioning steps differentiated through the KV cache (the bridge's default)
    and captioning without gradients then one more forward (HookedVisionPrefix's, as TransformerLens 3 keeps a
    weight copy per cached step) give the same captions, targets and scores (float64)."""
    default = tiny_vlm.grad_through_kv_cache
    runs = {}
    try:
        for fused in (True, False):
            tiny_vlm.grad_through_kv_cache = fused
            with warnings.catch_warnings():  # a random model's caption may have no noun: first word, with a warning
                warnings.simplefilter("ignore", UserWarning)
                runs[fused] = attribute(tiny_vlm, image_features=feats, max_new_tokens=12)
    finally:
        tiny_vlm.grad_through_kv_cache = default
    one, two = runs[True], runs[False]
    assert one.captions == two.captions and torch.equal(one.target_ids, two.target_ids)
    assert one.scores.abs().max() > 1e-3
    torch.testing.assert_close(one.scores, two.scores, rtol=1e-9, atol=1e-9 * float(one.scores.abs().max()))
    torch.testing.assert_close(one.y, two.y, rtol=1e-9, atol=1e-12)


def test_integrated_gradients_completeness(backend, gpt2_tokenizer, vit_encoder, feats):
    """Per layer, IG scores sum to y(Z) - y(Z at the image positions set to the baseline)."""
    vlm = build_vlm(backend, tiny_hf("gpt2", n_layers=2), gpt2_tokenizer, vit_encoder)
    tid = vlm.tokenizer(" dog")["input_ids"][0]
    ig = attribute(vlm, image_features=feats, target=tid, method="integrated_gradients", n_steps=64)
    y = _y(vlm, feats, tid).detach()
    for layer in range(2):
        def zero(act, hook):
            act = act.clone()
            act[:, vlm.image_positions] = 0.0
            return act
        y0 = _y(vlm, feats, tid, f"blocks.{layer}.mlp.hook_pre", zero).detach()
        torch.testing.assert_close(ig.scores[:, layer].sum((1, 2)).double(), y - y0, rtol=2e-3, atol=2e-4)
    assert ig.method == "integrated_gradients"


def _planted(tok, vit_encoder, layer=1, unit=5, patch=6, target=" dog"):
    """3 layers, attention off except one uniform head in the last layer that carries direction e1
    to the final position. Unit (layer, unit) reads direction e0 (which only patch `patch` carries,
    through the projection) and writes e1, which only the target token's unembedding reads."""
    torch.manual_seed(0)
    lm = _tiny_lm(tok, dtype=torch.float32, n_layers=3, d_model=16, d_head=4, n_heads=4, d_mlp=8,
                  act_fn="relu", normalization_type=None)
    tid = tok(target)["input_ids"][0]
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(0.02 / 4)  # everything else: small
        for blk in lm.blocks:
            blk.attn.W_O.zero_()
            blk.attn.b_O.zero_()
        attn = lm.blocks[2].attn  # uniform attention (Q = K = 0); head 0 copies e1 -> e1
        attn.W_Q.zero_(), attn.W_K.zero_(), attn.b_Q.zero_(), attn.b_K.zero_()
        attn.W_V[0].zero_(), attn.b_V[0].zero_()
        attn.W_V[0, 1, 0] = 1.0
        attn.W_O[0, 0, 1] = 1.0
        for blk in lm.blocks:  # nothing but the planted unit reads e0 or writes e1
            blk.mlp.W_in[0].zero_()
            blk.mlp.W_out[:, 1].zero_()
        lm.W_E[:, :2].zero_()
        lm.W_pos[:, :2].zero_()
        lm.W_U[1].zero_()
        lm.b_U.zero_()
        lm.W_U[1, tid] = 10.0
        mlp = lm.blocks[layer].mlp
        mlp.W_in[:, unit].zero_()
        mlp.W_in[0, unit] = 1.0
        mlp.b_in[unit] = 0.0
        mlp.W_out[unit].zero_()
        mlp.W_out[unit, 1] = 1.0
    vlm = HookedVisionPrefix(lm, vit_encoder).eval()
    with torch.no_grad():
        vlm.projection.linear.weight.mul_(0.02)
        vlm.projection.linear.weight[0].zero_()
        vlm.projection.linear.weight[:, 0].zero_()
        vlm.projection.linear.weight[0, 0] = 1.0  # encoder feature 0 -> residual direction e0
        vlm.projection.linear.bias.zero_()
    torch.manual_seed(1)
    feats = 0.5 * torch.randn(2, vit_encoder.n_patches, vit_encoder.d_img)
    feats[:, :, 0] = 0.0
    feats[:, patch, 0] = 3.0  # only this patch carries the unit's feature
    return vlm, feats, tid


@needs_hooked_transformer
def test_planted_neuron_ranks_first_and_decodes_to_its_token(gpt2_tokenizer, vit_encoder):
    vlm, feats, tid = _planted(gpt2_tokenizer, vit_encoder, layer=1, unit=5, patch=6)
    attr = attribute(vlm, image_features=feats, target=" dog")
    top = attr.top_units(10)
    assert isinstance(top, TopUnits) and len(top) == 20
    df = top.to_dataframe()
    assert list(df.columns[:6]) == ["image_index", "rank", "layer", "unit", "patch", "score"]
    for i in range(2):
        best = df[(df.image_index == i) & (df["rank"] == 0)].iloc[0]
        assert (best.layer, best.unit, best.patch) == (1, 5, 6)
        assert best.score > 10 * df[(df.image_index == i) & (df["rank"] == 1)].score.iloc[0]
    assert attr.top_units(3, image_index=1).image_index.tolist() == [1, 1, 1]
    assert attr.heatmap(0, 1, 5).shape == vlm.vision.grid
    assert attr.heatmap(0, 1, 5).flatten().argmax() == 6
    dec = decode_units(vlm, top.units()[:1], n_tokens=10)
    assert dec.token_ids[0, 0] == tid and dec.tokens[0][0] == " dog"

    # dataset aggregation: the planted unit is every image's top unit
    seen = []
    res = attribute_dataset(vlm, [feats, feats[:1]], n_units=5, features=True, target=" dog",
                            on_batch=lambda start, n: seen.append((start, n)))
    assert seen == [(0, 2), (2, 1)] and len(res) == 3 and res.targets == [" dog"] * 3
    one = attribute(vlm, image_features=feats[:1], target=" dog").probe
    assert torch.equal(res.probe.tokens, one.tokens.expand(3, -1))
    tops = res.top_units
    assert tops.image_index.unique().tolist() == [0, 1, 2]
    counts = tops.unit_counts()
    assert (counts.iloc[0].layer, counts.iloc[0].unit, counts.iloc[0].n_images) == (1, 5, 3)
    assert tops.layer_counts().sum() == 15


@needs_hooked_transformer
def test_ranking_options_sum_over_patches_and_per_layer_normalisation(gpt2_tokenizer, vit_encoder):
    """Planted scores: a unit with one strong patch wins under max, a unit weak everywhere wins under
    sum; a unit standing out in a small-gradient layer wins once each layer is divided by its RMS."""
    vlm, feats, _ = _planted(gpt2_tokenizer, vit_encoder, layer=1, unit=5, patch=6)
    attr = attribute(vlm, image_features=feats, target=" dog")
    scores = torch.zeros(2, 3, 16, 24)
    scores[:, 0] = 0.5 * torch.linspace(-1, 1, 24)  # layer 0: large scores everywhere
    scores[:, 0, 3, 2] = 5.0  # one strong patch: best max
    scores[:, 0, :, 9] = 1.0  # 1.0 on every patch: best sum (16)
    scores[:, 1] = 0.001 * torch.linspace(-1, 1, 24)  # layer 1: tiny scores (a late layer)
    scores[:, 1, 4, 7] = 0.05  # ... one unit stands out in its layer
    planted = Attribution(scores=scores, probe=attr.probe, hook="pre", objective="logit", method="grad_x_act",
                          y=attr.y, grid=attr.grid)
    first = lambda **kw: tuple(planted.top_units(1, **kw).units()[0].tolist())  # noqa: E731
    assert first() == first(over_patches="max") == (0, 2) and first(over_patches="sum") == (0, 9)
    assert first(normalize="layer") == (1, 7)
    # oracles: the sum and the RMS by hand; an all-zero layer stays zero
    s, where = planted.unit_scores("sum", "layer")
    rms = scores.sum(2).pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(s[:, :2], (scores.sum(2) / rms)[:, :2])
    assert (s[:, 2] == 0).all() and torch.equal(where, scores.max(2).indices)
    top = attr.top_units(4, over_patches="sum")  # on real scores: the sum's order
    want = attr.scores.sum(2)[0].flatten().topk(4).indices
    d = attr.scores.shape[-1]
    assert top.units_per_image()[0].tolist() == [[int(i) // d, int(i) % d] for i in want]
    assert torch.equal(top.score[:4], attr.scores.sum(2)[0].flatten()[want])
    res = attribute_dataset(vlm, [feats], n_units=3, features=True, target=" dog", normalize="layer")
    assert torch.equal(res.top_units.units(), attr.top_units(3, normalize="layer").units())
    with pytest.raises(ValueError, match="over_patches must be 'max' or 'sum'"):
        attr.top_units(3, over_patches="mean")
    with pytest.raises(ValueError, match="normalize must be None or 'layer'"):
        attr.unit_scores(normalize="global")


def test_bad_input_gets_clear_errors(tiny_vlm, backend, feats):
    with pytest.raises(ValueError, match="unknown hook"):
        attribute(tiny_vlm, image_features=feats, target="dog", hook="resid")
    with pytest.raises(ValueError, match="exactly one"):
        attribute(tiny_vlm, target="dog")
    with pytest.raises(ValueError, match="empty string"):
        attribute(tiny_vlm, image_features=feats, target="  ")
    with pytest.raises(ValueError, match="3 targets for 2 images"):
        attribute(tiny_vlm, image_features=feats, target=["a", "b", "c"])
    with pytest.raises(ValueError, match="caption of image 1 is empty"):
        attribute(tiny_vlm, image_features=feats, captions=["a dog", ""])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(tiny_vlm, image_features=feats, target=10**6)
    with pytest.raises(ValueError, match="NaN"):
        attribute(tiny_vlm, image_features=feats.clone().fill_(float("nan")), target="dog")
    with pytest.raises(ValueError, match="caption_logprob"):
        attribute(tiny_vlm, image_features=feats, target="dog", objective="caption_logprob")
    with pytest.raises(ValueError, match="objective"):
        attribute(tiny_vlm, image_features=feats, target="dog", objective="prob")
    hf = tiny_hf("gpt2", n_layers=1)
    with torch.no_grad():
        hf_mlp(hf, 0)["W_out"][0, 0] = float("nan")
    nan_lm = build_vlm(backend, hf, tiny_vlm.tokenizer, tiny_vlm.vision)
    with pytest.raises(ValueError, match="NaN or infinite"):
        attribute(nan_lm, image_features=feats, target="dog")
    attr = attribute(tiny_vlm, image_features=feats, target="dog")
    assert torch.equal(attr.heatmap(1, 2, 23), attr.scores[1, 2, :, 23].reshape(4, 4))
    with pytest.raises(ValueError, match=r"unit \(0, 24\) is out of range: the scores have 3 layers of 24 units"):
        attr.heatmap(0, 0, 24)
    with pytest.raises(ValueError, match="out of range"):
        attr.heatmap(0, 3, 0)
    with pytest.raises(ValueError, match="image_index 2 out of range for 2 images"):
        attr.heatmap(2, 0, 0)
    with pytest.raises(ValueError, match="multi_token='first'"):
        attribute(tiny_vlm, image_features=feats, target="hippopotamus")
    first = attribute(tiny_vlm, image_features=feats, target="hippopotamus", multi_token="first")
    assert first.target_ids.tolist() == [tiny_vlm.tokenizer(" hippopotamus")["input_ids"][0]] * 2
    with pytest.raises(ValueError, match="at most one of probe=, target= and captions="):
        attribute(tiny_vlm, image_features=feats, target="dog", probe=attr.probe)


def test_gpt2_small_one_backward_pass(vlm_on, pixels):
    """GPT-2 small: every layer x patch x unit from one backward; no parameter gradients."""
    backward_calls, forward_calls = [], []

    def count(resid, hook):
        forward_calls.append(1)
        resid.register_hook(lambda g: backward_calls.append(1))

    with vlm_on.hooks(fwd_hooks=[("blocks.11.hook_resid_post", count)]):
        attr = attribute(vlm_on, pixels, captions=["a dog on a sofa", "the big cat", "three red apples"])
    assert isinstance(attr, Attribution)
    assert attr.scores.shape == (3, 12, 16, 3072) and attr.scores.device.type == "cpu"
    assert attr.targets == [" dog", " cat", " apples"]
    assert len(forward_calls) == 1 and len(backward_calls) == 1
    assert all(p.grad is None for p in vlm_on.parameters())
    assert torch.isfinite(attr.scores).all() and attr.scores.abs().sum() > 0
    assert "3 images x 12 layers" in repr(attr)
