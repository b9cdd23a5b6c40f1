"""Projection training: only the projection learns, and what it learns ties captions to images."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_multimodal import HookedVisionPrefix, ImageProjection
from tl_multimodal.training import caption_nll, encode_images, train_projection

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


@pytest.fixture(scope="module")
def tiny_vlm(gpt2_tokenizer, vit_encoder):
    torch.manual_seed(6)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=64, d_head=16, n_heads=4, d_mlp=128,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", model_name="tiny-gpt2")
    return HookedVisionPrefix(HookedTransformer(cfg, tokenizer=gpt2_tokenizer), vit_encoder).eval()


@pytest.fixture(scope="module")
def colour_data():
    """Plain-colour images, each captioned with its colour: a pairing only the image can tell."""
    rows = [{"image": Image.fromarray(np.full((40, 40, 3), rgb, dtype=np.uint8)),
             "captions": [f"a {name} square", f"{name}"]} for name, rgb in COLOURS.items()]
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


def test_training_moves_only_the_projection_and_ties_captions_to_images(tiny_vlm, colour_data, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_vlm.named_parameters()}
    result = train_projection(tiny_vlm, colour_data, steps=100, batch_size=4, lr=3e-2, warmup=5,
                              dev_dataset=colour_data, eval_every=50, checkpoint_dir=tmp_path,
                              checkpoint_every=50, progress=False, dataset_name="colours")
    changed = {n for n, p in tiny_vlm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"projection.linear.weight", "projection.linear.bias"}
    assert not tiny_vlm.vision.model.training and not any(p.requires_grad for p in tiny_vlm.vision.parameters())
    assert result.dev_losses[-1][1] < result.dev_losses[0][1]

    feats = encode_images(tiny_vlm, colour_data, progress=False)
    captions = [f"a {name} square" for name in COLOURS]
    matched = caption_nll(tiny_vlm, captions, feats)
    shuffled = caption_nll(tiny_vlm, captions, feats.roll(1, dims=0))
    assert matched < shuffled - 0.25

    saved = ImageProjection.load(tmp_path / "projection.pt")
    assert saved.info.training["steps"] == 100 and saved.info.training["dataset"] == "colours"
    assert torch.equal(saved.linear.weight, tiny_vlm.projection.linear.weight)
    assert [p.name for p in result.checkpoints] == ["projection_step50.pt", "projection_step100.pt", "projection.pt"]


def test_caption_nll_is_the_mean_over_caption_tokens(tiny_vlm, colour_data):
    """Oracle: the per-token log-probs summed by hand, caption by caption (no padding involved)."""
    feats = encode_images(tiny_vlm, colour_data.select([0, 1]), progress=False)
    captions = ["a red square", "a rather long green square caption"]
    total, count = 0.0, 0
    with torch.no_grad():
        for cap, f in zip(captions, feats):
            tokens = tiny_vlm.to_tokens(cap + tiny_vlm.tokenizer.eos_token, image=True)
            logp = tiny_vlm(tokens, image_features=f[None]).log_softmax(-1)
            n = tiny_vlm.n_image_tokens
            targets = tokens[0, n:]
            total -= logp[0, n - 1:-1].gather(-1, targets[:, None]).sum().item()
            count += len(targets)
    assert caption_nll(tiny_vlm, captions, feats) == pytest.approx(total / count, rel=1e-5)


def test_empty_caption_raises(tiny_vlm):
    rows = [{"image": Image.new("RGB", (8, 8)), "captions": ["a cat", "  "]}]
    data = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match="empty caption"):
        train_projection(tiny_vlm, data, steps=1, batch_size=1, progress=False)


def test_projection_for_another_model_is_refused(tiny_vlm, cnn_encoder, gpt2_tokenizer, tmp_path):
    tiny_vlm.projection.save(tmp_path / "p.pt")
    other_lm = HookedTransformer(tiny_vlm.cfg, tokenizer=gpt2_tokenizer)
    other = HookedVisionPrefix(other_lm, cnn_encoder)
    with pytest.raises(ValueError, match=r"another model; encoder: projection has 'vit_tiny_32'.*d_img"):
        other.load_projection(tmp_path / "p.pt")
    bigger = HookedTransformerConfig(**{**tiny_vlm.cfg.to_dict(), "d_model": 32, "d_head": 8, "model_name": "x"})
    with pytest.raises(ValueError, match="lm: projection has 'tiny-gpt2', model has 'x'"):
        HookedVisionPrefix(HookedTransformer(bigger, tokenizer=gpt2_tokenizer), tiny_vlm.vision,
                           ImageProjection.load(tmp_path / "p.pt"))
