"""tl_multimodal.analysis.alignment against hand-computed cosines: each image-caption pair is run alone through
a tiny vision LM (no batching, no padding; each backend, GPT-2- and Llama-style) and every measure is
recomputed with explicit loops over tokens, pairs and held-out samples."""

import itertools
import math

import pytest
import torch
from conftest import build_vlm, tiny_hf

from tl_multimodal.analysis.alignment import Alignment, SoftPromptNorms, alignment, residuals, soft_prompt_norms

# different lengths, so the batched run pads
CAPTIONS = ["a dog on a red sofa", "two cats", "a man riding a horse on the beach at dawn", "a bus"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, backend, gpt2_tokenizer, vit_encoder):
    """3 layers, d_model 32, float64, random weights (GPT-2- or Llama-style) on each backend."""
    hf = tiny_hf(request.param, n_layers=3, d_model=32, n_heads=4, d_mlp=24, n_ctx=64, dtype=torch.float64)
    return build_vlm(backend, hf, gpt2_tokenizer, vit_encoder).eval()


@pytest.fixture(scope="module")
def feats(vit_encoder):
    torch.manual_seed(5)
    return torch.randn(len(CAPTIONS), vit_encoder.n_patches, vit_encoder.d_img)


def _alone(model, feats):
    """Residuals of each pair run alone: [(image [layer+1, patch, d], text [layer+1, n, d])]."""
    out, n_img, L = [], model.n_image_tokens, model.cfg.n_layers
    for b, caption in enumerate(CAPTIONS):
        _, cache = model.run_with_cache(caption, image_features=feats[b:b + 1])
        resid = torch.stack([cache[f"blocks.{l}.hook_resid_pre"][0] for l in range(L)]
                            + [cache[f"blocks.{L - 1}.hook_resid_post"][0]])
        assert resid.shape[1] == n_img + len(model.tokenizer(caption)["input_ids"])
        out.append((resid[:, :n_img], resid[:, n_img:]))
    return out


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_residuals_match_single_runs(tiny, feats):
    image, text = residuals(tiny, CAPTIONS, image_features=feats, batch_size=3)
    assert image.shape == (4, tiny.cfg.n_layers + 1, tiny.n_image_tokens, 32) and image.dtype == torch.float32
    for (img, txt), got_img, got_txt in zip(_alone(tiny, feats), image, text):
        torch.testing.assert_close(got_img, img.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_txt, txt.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exclude", [(), (0, 5)])
def test_alignment_matches_hand_computed(tiny, feats, exclude):
    al = alignment(tiny, CAPTIONS, image_features=feats, batch_size=3, exclude_image_tokens=exclude)
    runs, n, L = _alone(tiny, feats), len(CAPTIONS), tiny.cfg.n_layers
    keep = [i for i in range(tiny.n_image_tokens) if i not in exclude]
    runs = [(img[:, keep], txt) for img, txt in runs]
    n_img = len(keep)
    assert isinstance(al, Alignment) and al.n_images == n
    for l in range(L):
        mean_cos = [[_cos(runs[i][0][l].mean(0), runs[j][1][l].mean(0)) for j in range(n)] for i in range(n)]
        pair_cos = [[sum(_cos(u, v) for u in runs[i][0][l] for v in runs[j][1][l])
                     / (len(runs[i][0][l]) * len(runs[j][1][l])) for j in range(n)] for i in range(n)]
        others = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]
        expected = {
            "mean_cos": sum(mean_cos[i][i] for i in range(n)) / n,
            "mean_cos_other": sum(mean_cos[i][j] for i, j in others) / len(others),
            "pair_cos": sum(pair_cos[i][i] for i in range(n)) / n,
            "pair_cos_other": sum(pair_cos[i][j] for i, j in others) / len(others),
            "retrieval": sum(max(range(n), key=lambda j: pair_cos[i][j]) == i for i in range(n)) / n,
            "image_step_cos": sum(_cos(u, v) for r in runs for u, v in zip(r[0][l], r[0][l + 1]))
                              / (n * n_img),
            "text_step_cos": (sum(_cos(u, v) for r in runs for u, v in zip(r[1][l], r[1][l + 1]))
                              / sum(len(r[1][l]) for r in runs)),
            "image_norm": sum(float(u.norm()) for r in runs for u in r[0][l]) / (n * n_img),
            "text_norm": sum(float(u.norm()) for r in runs for u in r[1][l]) / sum(len(r[1][l]) for r in runs),
        }
        for name, value in expected.items():
            assert math.isclose(float(getattr(al, name)[l]), value, rel_tol=1e-4, abs_tol=1e-5), (name, l)
    df = al.to_dataframe()
    assert list(df["layer"]) == list(range(L)) and df.shape == (L, 11)
    assert "Alignment(4 images, 3 layers)" in repr(al)


def test_separability_matches_leave_one_out_by_hand(tiny, feats):
    al = alignment(tiny, CAPTIONS, image_features=feats, batch_size=2)
    runs, n = _alone(tiny, feats), len(CAPTIONS)
    for l in range(tiny.cfg.n_layers):
        hits = {0: 0, 1: 0}
        counts = {0: 0, 1: 0}
        for b in range(n):
            # centroids: mean unit vector of each modality over the other samples' tokens
            cents = [torch.stack([u / u.norm() for j in range(n) if j != b for u in runs[j][m][l]]).mean(0)
                     for m in (0, 1)]
            for m in (0, 1):
                for u in runs[b][m][l]:
                    u = u / u.norm()
                    says_image = float((u - cents[0]).norm()) < float((u - cents[1]).norm())
                    hits[m] += says_image == (m == 0)
                    counts[m] += 1
        expected = 0.5 * (hits[0] / counts[0] + hits[1] / counts[1])
        assert math.isclose(float(al.separability[l]), expected, abs_tol=1e-6)


def test_separability_sees_a_planted_modality_direction(tiny, feats):
    """Image tokens far along one direction of the residual stream are told apart from text perfectly."""
    planted = tiny.projection.linear.bias.detach().clone()
    try:
        with torch.no_grad():
            tiny.projection.linear.bias += 50.0 * torch.nn.functional.normalize(torch.ones(32), dim=0).to(planted)
        al = alignment(tiny, CAPTIONS, image_features=feats)
    finally:
        with torch.no_grad():
            tiny.projection.linear.bias.copy_(planted)
    assert al.separability[0] == 1.0


def test_soft_prompt_norms(tiny, feats):
    norms = soft_prompt_norms(tiny, image_features=feats)
    _, cache = tiny.run_with_cache(CAPTIONS[0], image_features=feats)
    assert isinstance(norms, SoftPromptNorms)
    torch.testing.assert_close(norms.image, cache["hook_image_embed"].float().norm(dim=-1))
    assert norms.text.shape == (50257,)
    assert math.isclose(float(norms.text[11]), float(tiny.W_E[11].detach().norm()), rel_tol=1e-6)
    assert math.isclose(norms.ratio, float(norms.image.median() / norms.text.median()))
    df = norms.to_dataframe()
    assert list(df["tokens"]) == ["soft prompt", "text embedding"] and list(df["n"]) == [4 * 16, 50257]


def test_bad_captions(tiny, feats):
    with pytest.raises(ValueError, match="3 captions for 4 images"):
        alignment(tiny, CAPTIONS[:3], image_features=feats)
    with pytest.raises(TypeError, match="captions must be a list"):
        alignment(tiny, "a dog", image_features=feats)
    with pytest.raises(ValueError, match="non-empty"):
        alignment(tiny, CAPTIONS[:3] + [""], image_features=feats)
    with pytest.raises(ValueError, match=r"exclude_image_tokens \[16\] out of range"):
        alignment(tiny, CAPTIONS, image_features=feats, exclude_image_tokens=(16,))
    with pytest.raises(TypeError, match="sequence of ints"):
        alignment(tiny, CAPTIONS, image_features=feats, exclude_image_tokens=0)
    with pytest.raises(ValueError, match="no image token"):
        alignment(tiny, CAPTIONS, image_features=feats, exclude_image_tokens=range(16))
    with pytest.raises(ValueError, match="at least 2 images"):
        alignment(tiny, CAPTIONS[:1], image_features=feats[:1])


def test_plot_draws_the_measures(tiny, feats):
    import matplotlib
    matplotlib.use("Agg")
    al = alignment(tiny, CAPTIONS, image_features=feats)
    fig = al.plot()
    drawn = {line.get_label(): line.get_ydata() for ax in fig.axes for line in ax.get_lines()}
    assert list(drawn["mean token, own caption"]) == al.mean_cos.tolist()
    assert list(drawn["separability (nearest centroid)"]) == al.separability.tolist()
    assert fig.axes[3].get_yscale() == "log"


def test_images_go_through_the_image_door(tiny, pixels):
    """Pixels (or PIL images) give the same measures as the encoder features of those pixels."""
    captions = CAPTIONS[:3]
    from_pixels = alignment(tiny, captions, images=pixels)
    with torch.no_grad():
        feats = tiny.vision(tiny.preprocess(pixels))
    from_feats = alignment(tiny, captions, image_features=feats)
    torch.testing.assert_close(from_pixels.to_dataframe().to_numpy(), from_feats.to_dataframe().to_numpy())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_both_backends_give_the_same_measures(kind, gpt2_tokenizer, vit_encoder, feats):
    """Oracle: the other backend, on the same HF weights and projection."""
    from conftest import HookedTransformer

    if HookedTransformer is None:
        pytest.skip("HookedVisionPrefix needs HookedTransformer, which TransformerLens 4 removed")
    hf = tiny_hf(kind, n_layers=3, d_model=32, n_heads=4, d_mlp=24, n_ctx=64, dtype=torch.float64)
    hooked, bridge = (build_vlm(b, hf, gpt2_tokenizer, vit_encoder) for b in ("hooked", "bridge"))
    a, b = (alignment(m, CAPTIONS, image_features=feats, batch_size=3, exclude_image_tokens=(0,))
            for m in (hooked, bridge))
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(b.to_dataframe().to_numpy(float), a.to_dataframe().to_numpy(float), rtol=1e-5, atol=1e-6)
    n0, n1 = soft_prompt_norms(hooked, image_features=feats), soft_prompt_norms(bridge, image_features=feats)
    torch.testing.assert_close(n1.image, n0.image)
    torch.testing.assert_close(n1.text, n0.text)
