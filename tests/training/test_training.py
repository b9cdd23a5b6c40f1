"""Projection training: only the projection learns, and what it learns ties captions to images."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from conftest import HookedTransformer, build_vlm, tiny_hf

from tl_multimodal import ImageProjection
from tl_multimodal.training.augment import random_resized_crop_flip
from tl_multimodal.training.config import TrainingConfig
from tl_multimodal.training.features import encode_images
from tl_multimodal.training.nll import _batch, _caption_ids, caption_nll, caption_token_nll
from tl_multimodal.training.train import train_projection

ASSETS = Path(__file__).parents[1] / "assets"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


needs_hooked = pytest.mark.skipif(HookedTransformer is None,
                                  reason="builds a HookedTransformer, which TransformerLens 4 removed")
# The tiny LM every test trains on: 2 layers, d_model 64, n_ctx 64, GPT-2's vocabulary (random weights), float64
# (runs that sum in another order, micro-batches or processes, then agree to ~1e-12, not to float32 noise)
TINY = dict(n_layers=2, d_model=64, n_heads=4, d_mlp=128, n_ctx=64, dtype=torch.float64, seed=6, init=0.1, widen=1.0)


@pytest.fixture(scope="module")
def tiny_vlm(backend, gpt2_tokenizer, vit_encoder):
    """The tiny LM behind the tiny ViT on each backend (``backend``), from the same HF weights; each model
    has its own copy of the encoder (tests change its flags and modes and check they come back)."""
    return build_vlm(backend, tiny_hf("gpt2", **TINY), gpt2_tokenizer, copy.deepcopy(vit_encoder))


def make_colour_data() -> datasets.Dataset:
    """Plain-colour images, each captioned with its colour: a pairing only the image can tell."""
    rows = [{"image": Image.fromarray(np.full((40, 40, 3), rgb, dtype=np.uint8)),
             "captions": [f"a {name} square", f"{name}"]} for name, rgb in COLOURS.items()]
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


@pytest.fixture(scope="module")
def colour_data():
    return make_colour_data()


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
    assert torch.equal(torch.load(tmp_path / "projection.pt", weights_only=True)["state_dict"]["linear.weight"],
                       tiny_vlm.projection.linear.weight)  # the file holds the weights as trained (float64)
    assert torch.equal(saved.linear.weight, tiny_vlm.projection.linear.weight.float())  # loaded as float32
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


@needs_hooked
def test_projection_for_another_model_is_refused(cnn_encoder, gpt2_tokenizer, vit_encoder, tmp_path):
    from transformer_lens import HookedTransformerConfig

    from tl_multimodal import HookedVisionPrefix

    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=64, d_head=16, n_heads=4, d_mlp=128, d_vocab=50257,
                                  act_fn="gelu_new", normalization_type="LN", model_name="tiny-gpt2")
    HookedVisionPrefix(HookedTransformer(cfg, tokenizer=gpt2_tokenizer), vit_encoder).projection.save(tmp_path / "p.pt")
    other = HookedVisionPrefix(HookedTransformer(cfg, tokenizer=gpt2_tokenizer), cnn_encoder)
    with pytest.raises(ValueError, match=r"another model; encoder: projection has 'vit_tiny_32'.*d_img"):
        other.load_projection(tmp_path / "p.pt")
    bigger = HookedTransformerConfig(**{**cfg.to_dict(), "d_model": 32, "d_head": 8, "model_name": "x"})
    with pytest.raises(ValueError, match="lm: projection has 'tiny-gpt2', model has 'x'"):
        HookedVisionPrefix(HookedTransformer(bigger, tokenizer=gpt2_tokenizer), vit_encoder,
                           ImageProjection.load(tmp_path / "p.pt"))


# ---------------------------------------------------------------------------- the configuration
def test_training_config_round_trips_and_refuses_unknown_settings():
    config = TrainingConfig(steps=7, lr=1e-2, checkpoint_dir=Path("runs/p"), checkpoint_every=2, bos=True,
                            augment=random_resized_crop_flip, device="cpu")
    assert config.checkpoint_dir == "runs/p" and config.augment == "random_resized_crop_flip"
    assert config.augment_fn is random_resized_crop_flip
    d = config.to_dict()
    assert d == json.loads(json.dumps(d)) and d["steps"] == 7 and d["batch_size"] == 256
    assert TrainingConfig.from_dict(d) == config and TrainingConfig.from_dict({}) == TrainingConfig()
    assert repr(config).startswith("TrainingConfig(steps=7, lr=0.01, checkpoint_dir='runs/p'")
    assert "batch_size" not in repr(config)  # only what differs from the defaults
    assert config.replace(seed=3).seed == 3 and config.seed == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    with pytest.raises(TypeError, match=r"unknown TrainingConfig setting step; the settings are: steps, batch_size"):
        TrainingConfig.resolve(None, {"step": 3})
    with pytest.raises(TypeError, match="unknown TrainingConfig settings bogus, step;"):
        config.replace(step=3, bogus=1)
    with pytest.raises(ValueError, match="TrainingConfig has no setting colour"):
        TrainingConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="augment 'blur' is not one of"):
        TrainingConfig(augment="blur")
    with pytest.raises(ValueError, match="feature_cache holds one encoding per image"):
        TrainingConfig(augment="random_resized_crop_flip", feature_cache="f.npy")


def test_an_unknown_setting_is_refused_before_any_work(tiny_vlm, colour_data, no_step):
    with pytest.raises(TypeError, match="unknown TrainingConfig setting stepz; the settings are: steps"):
        train_projection(tiny_vlm, colour_data, stepz=1)
    with pytest.raises(TypeError, match="config must be a TrainingConfig, got dict"):
        train_projection(tiny_vlm, colour_data, {"steps": 1})


def test_the_saved_projection_records_the_config_it_was_trained_with(tiny_vlm, colour_data, tmp_path):
    from tl_multimodal.models.projection import projection_id

    init = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    start = projection_id(tiny_vlm.projection)
    config = TrainingConfig(steps=2, batch_size=2, lr=1e-2, warmup=1, progress=False, seed=4, dataset_name="colours")
    result = train_projection(tiny_vlm, colour_data, config, checkpoint_dir=tmp_path)
    assert result.config == config.replace(checkpoint_dir=str(tmp_path))
    saved = ImageProjection.load(tmp_path / "projection.pt")
    assert TrainingConfig.from_dict(saved.info.training["config"]) == result.config
    assert saved.info.training["init_projection"] == start != projection_id(saved)
    assert projection_id(saved) == projection_id(tiny_vlm.projection)
    assert saved.info.training["steps"] == 2 and saved.info.training["dataset"] == "colours"
    tiny_vlm.projection.load_state_dict(init)


# ---------------------------------------------------------------------------- the loss
def test_caption_token_nll_equals_the_full_model_loss(tiny_vlm, colour_data):
    """Oracle: the model's own loss over all positions (unembedding everything), same batch."""
    feats = encode_images(tiny_vlm, colour_data, progress=False)
    texts = ["a red square", "a rather long green square caption with padding after others", "blue", "x y"]
    ids = [r[0] for r in _caption_ids(tiny_vlm, texts, "captions", tiny_vlm.n_image_tokens)]
    tokens, mask = _batch(tiny_vlm, ids)
    assert torch.equal(tokens, tiny_vlm.to_tokens([t + "<|endoftext|>" for t in texts], image=True,
                                                  padding_side="right"))
    with torch.no_grad():
        mine = caption_token_nll(tiny_vlm, tokens, mask, feats)
        full = tiny_vlm(tokens, image_features=feats, attention_mask=mask, return_type="loss", loss_per_token=True)
        mean = tiny_vlm(tokens, image_features=feats, attention_mask=mask, return_type="loss")
    targets = mask[:, 1:].bool() & ~tiny_vlm.image_mask(tokens[:, 1:])
    assert mine.shape == (targets.sum(),) and (mask.sum(1) < mask.shape[1]).any()
    torch.testing.assert_close(mine, full[targets], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.mean(), mean, rtol=1e-5, atol=1e-6)


def test_caption_token_nll_gradient_equals_the_full_model_loss(tiny_vlm, colour_data):
    feats = encode_images(tiny_vlm, colour_data, progress=False)
    ids = [r[0] for r in _caption_ids(tiny_vlm, ["red", "a green square"] * 2, "c", tiny_vlm.n_image_tokens)]
    tokens, mask = _batch(tiny_vlm, ids)
    grads = []
    for loss_fn in (lambda: caption_token_nll(tiny_vlm, tokens, mask, feats).mean(),
                    lambda: tiny_vlm(tokens, image_features=feats, attention_mask=mask, return_type="loss")):
        tiny_vlm.zero_grad(set_to_none=True)
        loss_fn().backward()
        grads.append(tiny_vlm.projection.linear.weight.grad.clone())
    tiny_vlm.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@needs_hooked
def test_both_backends_score_and_train_alike(gpt2_tokenizer, vit_encoder, colour_data):
    """Oracle: the other backend. From the same HF weights (float64) and the same projection, caption_nll,
    the per-step training losses (dropout on in the projection: the same masks) and the trained projection
    agree between HookedVisionPrefix and VisionBridge (whose HF model has dropout: the frozen LM stays in
    eval mode)."""
    hf = tiny_hf("gpt2", **{**TINY, "dtype": torch.float64})
    assert hf.config.resid_pdrop > 0  # the bridge's HF blocks would drop out in train mode
    captions = [f"a {name} square" for name in COLOURS]
    runs = {}
    for backend in ("hooked", "bridge"):
        model = build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)
        feats = encode_images(model, colour_data, progress=False)
        before = caption_nll(model, captions, feats)
        text_only = caption_nll(model, captions)
        result = train_projection(model, colour_data, steps=6, batch_size=3, lr=3e-2, warmup=2, seed=1,
                                  dev_dataset=colour_data, eval_every=3, progress=False)
        runs[backend] = (before, text_only, result, caption_nll(model, captions, feats),
                         {k: v.clone() for k, v in model.projection.state_dict().items()})
    (b0, t0, r0, a0, p0), (b1, t1, r1, a1, p1) = runs["hooked"], runs["bridge"]
    assert b1 == pytest.approx(b0, rel=1e-10) and t1 == pytest.approx(t0, rel=1e-10)
    np.testing.assert_allclose(r1.train_losses, r0.train_losses, rtol=1e-9)
    np.testing.assert_allclose([d for _, d in r1.dev_losses], [d for _, d in r0.dev_losses], rtol=1e-9)
    assert a1 == pytest.approx(a0, rel=1e-9) and a0 < b0  # it learned, alike
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- bad input, before any work
def _data(captions):
    rows = [{"image": Image.new("RGB", (8, 8)), "captions": c} for c in captions]
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


@pytest.fixture
def no_step(tiny_vlm):
    """Counts soft-prompt embeddings (one per training step): bad input must be refused before any."""
    calls = []
    with tiny_vlm.hooks(fwd_hooks=[("hook_image_embed", lambda x, hook: calls.append(1))]):
        yield
    assert calls == []


@pytest.mark.parametrize("data, error, match", [
    (lambda: _data([]), ValueError, "dataset is empty"),
    (lambda: _data(["a cat"]).rename_column("captions", "text"), ValueError,
     r"no column 'captions' \(columns: image, text\)"),
    (lambda: _data(["a cat"]).remove_columns("image"), ValueError, "no column 'image'"),
    (lambda: datasets.Dataset.from_list([{"image": None, "captions": 5}]), TypeError, "row 0 holds int 5"),
    (lambda: datasets.Dataset.from_list([{"image": None, "captions": "ok"}, {"image": None, "captions": None}]),
     TypeError, "row 1 holds NoneType"),
    (lambda: _data([["ok"], []]), ValueError, "row 1 has no caption"),
    (lambda: _data(["a cat", "fine", "  "]), ValueError, "row 2 has an empty caption"),
    (lambda: _data(["a cat", "short", " ".join(["word"] * 60)]), ValueError,
     r"n_ctx=64 allows after 16 image slots \(at most 48 tokens.*\): row 2 caption 0 has 61 tokens$"),
    (lambda: 5, TypeError, "dataset must be a datasets.Dataset or an iterable of dict rows .a stream., got int"),
    # a stream's rows are checked as they are read: the first batch, before its step
    (lambda: [{"image": None, "captions": "a"}, {"image": None}], ValueError,
     r"row 1 of the training stream \(epoch 0\) has no column 'captions' \(columns: image\)"),
    (lambda: [{"image": None, "captions": "a"}, {"image": None, "captions": " "}], ValueError,
     r"training stream \(epoch 0\) column 'captions': row 1 has an empty caption"),
    (lambda: iter([]), ValueError, "the training stream gave no rows in epoch 0"),
    (lambda: ["a cat"], TypeError, "must give dict rows, got str at row 0 of epoch 0"),
])
def test_bad_dataset_is_refused_before_step_one(tiny_vlm, no_step, data, error, match):
    with pytest.raises(error, match=match):
        train_projection(tiny_vlm, data(), steps=1, batch_size=2, progress=False)


def test_bad_dev_dataset_is_refused_before_step_one(tiny_vlm, colour_data, no_step):
    with pytest.raises(ValueError, match="dev_dataset column 'captions': row 1 has an empty caption"):
        train_projection(tiny_vlm, colour_data, dev_dataset=_data(["a", ""]), steps=1, batch_size=1, progress=False)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
    ({"batch_size": 2.0}, TypeError, "batch_size must be an int, got float"),
    ({"lr": float("nan")}, ValueError, "lr must be a positive number"),
    ({"warmup": -1}, ValueError, "warmup must be >= 0, got -1"),
    ({"checkpoint_every": 5}, ValueError, "checkpoint_every needs checkpoint_dir"),
    ({"resume_from": "/nonexistent/training_state.pt"}, FileNotFoundError, "does not exist"),
    ({"shuffle": 1}, TypeError, "shuffle must be a bool, got int"),
])
def test_bad_arguments_are_refused(tiny_vlm, colour_data, no_step, kwargs, error, match):
    with pytest.raises(error, match=match):
        train_projection(tiny_vlm, colour_data, **{"steps": 1, "batch_size": 1, "progress": False, **kwargs})


@pytest.mark.parametrize("args, error, match", [
    (([],), ValueError, "captions is empty"),
    (("a cat",), TypeError, "captions must be a list of strings, got str"),
    ((["a cat", 3],), TypeError, "row 1 holds int"),
    ((["a cat", " "],), ValueError, "row 1 has an empty caption"),
    ((["a cat"], torch.zeros(2, 16, 64)), ValueError, r"image_features must be \[1 captions"),
    ((["a cat"], None, 0), ValueError, "batch_size must be >= 1, got 0"),
])
def test_caption_nll_bad_arguments(tiny_vlm, args, error, match):
    with pytest.raises(error, match=match):
        caption_nll(tiny_vlm, *args)


# ---------------------------------------------------------------------------- faults and resume
def _flags(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


class Boom(Exception):
    pass


def _fail_at(model, step, exc=Boom, nan=False):
    """A hook on hook_image_embed that raises (or returns NaN) in training step ``step`` (fault injection)."""
    calls = []

    def hook(x, hook):
        if model.projection.training:  # training steps only; dev evaluation runs in eval mode
            calls.append(1)
            if len(calls) == step:
                if nan:
                    return torch.full_like(x, float("nan"))
                raise exc(f"injected fault at step {step}")
    return model.hooks(fwd_hooks=[("hook_image_embed", hook)])


def test_interrupted_then_resumed_equals_uninterrupted(tiny_vlm, colour_data, tmp_path):
    init = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    kw = dict(steps=7, batch_size=3, lr=1e-2, warmup=3, dev_dataset=colour_data, eval_every=3,
              checkpoint_every=2, progress=False, seed=5)
    whole = train_projection(tiny_vlm, colour_data, checkpoint_dir=tmp_path / "whole", **kw)
    expected = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}

    tiny_vlm.projection.load_state_dict(init)
    tiny_vlm.train()  # an unusual starting state, to be restored exactly
    tiny_vlm.blocks[0].requires_grad_(False)
    before = _flags(tiny_vlm)
    with _fail_at(tiny_vlm, 5), pytest.raises(Boom):
        train_projection(tiny_vlm, colour_data, checkpoint_dir=tmp_path / "cut", **kw)
    assert _flags(tiny_vlm) == before
    tiny_vlm.requires_grad_(True)
    tiny_vlm.eval()

    with torch.no_grad():
        tiny_vlm.projection.linear.weight.zero_()  # the state must bring the weights back
    resumed = train_projection(tiny_vlm, colour_data, checkpoint_dir=tmp_path / "cut",
                               resume_from=tmp_path / "cut", **kw)
    for k, v in expected.items():
        assert torch.equal(tiny_vlm.projection.state_dict()[k], v), k
    assert resumed.train_losses == whole.train_losses and resumed.dev_losses == whole.dev_losses
    assert resumed.steps == 7 and resumed.state == tmp_path / "cut" / "training_state.pt"
    frame = resumed.to_frame()
    assert list(frame.columns) == ["step", "train_loss", "dev_loss"] and frame.step.tolist() == list(range(1, 8))
    assert frame.dropna().set_index("step").dev_loss.to_dict() == dict(whole.dev_losses)
    assert not tiny_vlm.training and all(p.requires_grad for p in tiny_vlm.parameters())


def test_bos_layout_and_augmented_views_train_resume_and_load_with_their_layout(tiny_vlm, colour_data, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(tiny_vlm.projection.info, "bos", False)  # the fixture's layout comes back afterwards
    init = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    kw = dict(steps=4, batch_size=3, lr=1e-2, warmup=2, checkpoint_every=2, progress=False, seed=1, bos=True,
              augment=random_resized_crop_flip)
    whole = train_projection(tiny_vlm, colour_data, checkpoint_dir=tmp_path / "whole", **kw)
    expected = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    saved = ImageProjection.load(tmp_path / "whole" / "projection.pt")
    assert saved.info.bos and tiny_vlm.image_bos
    assert saved.info.training["bos"] is True and saved.info.training["augment"] == "random_resized_crop_flip"

    tiny_vlm.projection.load_state_dict(init)  # the same run on whole images learns something else
    train_projection(tiny_vlm, colour_data, **{**kw, "augment": None, "checkpoint_every": None})
    assert not torch.equal(tiny_vlm.projection.linear.weight, expected["linear.weight"])

    tiny_vlm.projection.load_state_dict(init)  # interrupted at step 3, resumed: the same views, the same end
    with _fail_at(tiny_vlm, 3), pytest.raises(Boom):
        train_projection(tiny_vlm, colour_data, checkpoint_dir=tmp_path / "cut", **kw)
    resumed = train_projection(tiny_vlm, colour_data, checkpoint_dir=tmp_path / "cut", resume_from=tmp_path / "cut", **kw)
    for k, v in expected.items():
        assert torch.equal(tiny_vlm.projection.state_dict()[k], v), k
    assert resumed.train_losses == whole.train_losses
    with pytest.raises(ValueError, match="bos: checkpoint has True, this call False"):
        train_projection(tiny_vlm, colour_data, checkpoint_dir=tmp_path / "cut", resume_from=tmp_path / "cut",
                         **{**kw, "bos": False})
    assert tiny_vlm.image_bos  # a refused call leaves the layout as it was

    # what training scores is [start][image slots][caption]: the model's own loss on those tokens
    texts = ["a red square", "blue"]
    ids = [r[0] for r in _caption_ids(tiny_vlm, texts, "captions", tiny_vlm.n_image_tokens + 1)]
    tokens, mask = _batch(tiny_vlm, ids)
    assert torch.equal(tokens, tiny_vlm.to_tokens([t + "<|endoftext|>" for t in texts], image=True,
                                                  padding_side="right"))
    assert (tokens[:, 0] == tiny_vlm.start_token_id).all() and tiny_vlm.image_mask(tokens)[:, 1:17].all()
    feats = encode_images(tiny_vlm, colour_data.select([0, 1]), progress=False)
    with torch.no_grad():
        mine = caption_token_nll(tiny_vlm, tokens, mask, feats)
        full = tiny_vlm(tokens, image_features=feats, attention_mask=mask, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(mine, full[mask[:, 1:].bool() & ~tiny_vlm.image_mask(tokens[:, 1:])])
    torch.testing.assert_close(caption_nll(tiny_vlm, texts, feats), mine.mean().item())

    other = copy.deepcopy(tiny_vlm)  # a model loading the checkpoint takes its layout
    other.projection.info.bos = False
    other.load_projection(tmp_path / "whole" / "projection.pt")
    assert other.image_bos and other.to_tokens("a", image=True)[0, 0] == other.start_token_id
    tiny_vlm.projection.load_state_dict(init)  # leave the shared model as this test found it


def test_keyboard_interrupt_restores_modes_and_flags(tiny_vlm, colour_data):
    tiny_vlm.eval()
    before = _flags(tiny_vlm)
    with _fail_at(tiny_vlm, 2, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        train_projection(tiny_vlm, colour_data, steps=5, batch_size=2, progress=False)
    assert _flags(tiny_vlm) == before
    a = tiny_vlm.embed_images(image_features=torch.ones(1, 16, 64))
    assert torch.equal(a, tiny_vlm.embed_images(image_features=torch.ones(1, 16, 64)))  # dropout off


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_vlm, colour_data, tmp_path):
    before = _flags(tiny_vlm)
    with _fail_at(tiny_vlm, 5, nan=True), pytest.raises(
            FloatingPointError, match=r"loss became nan at step 5.*last good state is .*training_state.pt \(step 4\)"):
        train_projection(tiny_vlm, colour_data, steps=8, batch_size=2, checkpoint_dir=tmp_path,
                         checkpoint_every=2, progress=False)
    assert _flags(tiny_vlm) == before
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["projection"].values())
    assert torch.equal(ImageProjection.load(tmp_path / "projection_step4.pt").linear.weight,
                       state["projection"]["linear.weight"].float())  # the model is float64, a loaded projection float32
    assert not (tmp_path / "projection_step6.pt").exists()


def test_resume_refuses_other_data_encoder_lm_and_edited_states(backend, tiny_vlm, colour_data, gpt2_tokenizer,
                                                                 tmp_path):
    """A state records what it was made from: other images or captions (the same number of rows), an
    encoder of the same shape with other weights, an LM of another width, and a state edited by hand are
    each refused, the message saying what differs."""
    kw = dict(steps=4, batch_size=2, progress=False)
    init = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    train_projection(tiny_vlm, colour_data, steps=2, batch_size=2, checkpoint_dir=tmp_path, progress=False)
    tiny_vlm.projection.load_state_dict(init)
    state_file = tmp_path / "training_state.pt"
    good = torch.load(state_file, weights_only=True)
    assert good["config"]["lm"] == "tiny (d_model 64)" and good["config"]["encoder"].startswith("vit_tiny_32 (weights ")

    grey = Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8))
    other_images = colour_data.map(lambda row, i: {"image": grey if i == 0 else row["image"]}, with_indices=True)
    other_captions = colour_data.map(lambda row, i: {"captions": ["a square"] if i == 3 else row["captions"]},
                                     with_indices=True)
    for data, what in ((other_images, "images"), (other_captions, "captions")):
        with pytest.raises(ValueError, match=f"other settings; {what} \\(a hash of the {what}\\): checkpoint has"):
            train_projection(tiny_vlm, data, resume_from=tmp_path, **kw)

    weight = next(tiny_vlm.vision.parameters())
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)  # an encoder of the same name and shape, other weights
    try:
        with pytest.raises(ValueError, match=r"encoder \(name and weights\): checkpoint has 'vit_tiny_32 \(weights "
                                             r"\w+\)', this call 'vit_tiny_32 \(weights \w+\)'"):
            train_projection(tiny_vlm, colour_data, resume_from=tmp_path, **kw)
    finally:
        with torch.no_grad():
            weight.copy_(kept)

    narrow = build_vlm(backend, tiny_hf("gpt2", **{**TINY, "d_model": 32}), gpt2_tokenizer, tiny_vlm.vision)
    with pytest.raises(ValueError, match=r"lm \(name and width\): checkpoint has 'tiny \(d_model 64\)', "
                                         r"this call 'tiny \(d_model 32\)'"):
        train_projection(narrow, colour_data, resume_from=tmp_path, **kw)
    old = {**good, "config": {k: v for k, v in good["config"].items() if k not in ("lm", "encoder", "images",
                                                                                   "captions")}}
    torch.save(old, state_file)  # a state written before the identities: the projection's shapes still tell
    with pytest.raises(ValueError, match=r"holds a projection for another encoder or LM width \(linear.weight: "
                                         r"\[64, 64\] in the state, \[32, 64\] in this model; linear.bias"):
        train_projection(narrow, colour_data, resume_from=tmp_path, **kw)

    for edit, match in (({"step": -5}, "step is -5, not a whole number >= 0"),
                        ({"step": 1}, "train_losses, scheduler do not agree with its step 1"),
                        ({"order": [0, 9]}, "order does not agree"),
                        ({"stream": {"epoch": 0, "position": 3}}, "stream does not agree"),
                        ({"projection": {"linear.weight": "x"}}, "its projection is not a dict of tensors")):
        torch.save({**good, **edit}, state_file)
        with pytest.raises(ValueError, match=f"resume_from='{state_file}' is not a valid training state: {match}"):
            train_projection(tiny_vlm, colour_data, resume_from=tmp_path, **kw)
    torch.save(good, state_file)
    assert train_projection(tiny_vlm, colour_data, steps=2, batch_size=2, resume_from=tmp_path,
                            progress=False).steps == 2  # the good state resumes (at its last step: no step runs)
    tiny_vlm.projection.load_state_dict(init)


def test_resume_refuses_other_settings_and_other_files(tiny_vlm, colour_data, tmp_path, no_step):
    import tl_multimodal.training.train as training
    state = {"format": training._STATE_FORMAT, "step": 2, "projection": tiny_vlm.projection.state_dict(),
             "config": {"batch_size": 2, "lr": 1e-3, "warmup": 100, "weight_decay": 0.0, "clip": 1.0, "seed": 0,
                        "n_images": 4, "grad_accum": 1, "processes": 1}}
    torch.save(state, tmp_path / "training_state.pt")
    with pytest.raises(ValueError, match=r"other settings; batch_size: checkpoint has 2, this call 3; "
                                         r"lr: checkpoint has 0.001, this call 0.01"):
        train_projection(tiny_vlm, colour_data, steps=4, batch_size=3, lr=1e-2, resume_from=tmp_path, progress=False)
    with pytest.raises(ValueError, match="at step 2, past steps=1"):
        train_projection(tiny_vlm, colour_data, steps=1, batch_size=2, lr=1e-3, resume_from=tmp_path, progress=False)
    tiny_vlm.projection.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="not a training state"):
        train_projection(tiny_vlm, colour_data, steps=4, batch_size=2, resume_from=tmp_path / "p.pt", progress=False)


def test_caption_token_nll_bad_arguments(tiny_vlm):
    tokens = tiny_vlm.to_tokens("a cat", image=True)
    with pytest.raises(ValueError, match=r"both be \[batch, pos\], got \(1, 18\) and \(1, 17\)"):
        caption_token_nll(tiny_vlm, tokens, torch.ones(1, 17, dtype=torch.long), torch.zeros(1, 16, 64))
    mask = torch.zeros_like(tokens)
    mask[:, :16] = 1  # the caption is all padding
    with pytest.raises(ValueError, match="no caption token to predict"):
        caption_token_nll(tiny_vlm, tokens, mask, torch.zeros(1, 16, 64))


# ---------------------------------------------------------------------------- streaming input
def _write_shards(folder: Path, data: datasets.Dataset, per_shard: int) -> str:
    """``data`` (image + one-string captions) as webdataset ``.tar`` shards of png + txt; their brace pattern."""
    import webdataset as wds

    folder.mkdir()
    n_shards = (len(data) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(s * per_shard, min(len(data), (s + 1) * per_shard)):
                sink.write({"__key__": f"{i:06d}", "png": data[i]["image"], "txt": data[i]["captions"]})
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def _one_caption_data() -> datasets.Dataset:
    """The colour images with one caption each (a webdataset ``txt`` holds one string)."""
    data = make_colour_data()
    return data.map(lambda row: {"captions": row["captions"][0]})


@pytest.mark.parametrize("source", ["list", "hf streaming", "webdataset"])
def test_a_stream_trains_as_the_same_rows_in_memory(tiny_vlm, tmp_path, source):
    """Oracle: the in-memory run taking the same rows in the same order (``shuffle=False``); 7 steps of
    3 rows over 4 images cross epochs; dropout on (the same masks: encoding draws no random numbers)."""
    import webdataset as wds

    data = _one_caption_data()
    init = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    kw = dict(steps=7, batch_size=3, lr=1e-2, warmup=2, seed=3, progress=False)
    oracle = train_projection(tiny_vlm, data, shuffle=False, **kw)
    expected = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    columns = {}
    if source == "list":
        stream = [{"image": row["image"], "captions": row["captions"]} for row in data]
    elif source == "hf streaming":
        stream = data.to_iterable_dataset()  # one shard: set_epoch reorders the shards of a sharded one
    else:
        stream = wds.WebDataset(_write_shards(tmp_path / "shards", data, 3), shardshuffle=False,
                                nodesplitter=None, empty_check=False).decode("pil")
        columns = {"image_column": "png", "caption_column": "txt"}
    tiny_vlm.projection.load_state_dict(init)
    result = train_projection(tiny_vlm, stream, grad_accum=3, **columns, **kw)
    for k, v in expected.items():
        torch.testing.assert_close(tiny_vlm.projection.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.train_losses, oracle.train_losses, rtol=1e-5)
    assert not torch.equal(expected["linear.weight"], init["linear.weight"])
    tiny_vlm.projection.load_state_dict(init)


def test_an_interrupted_stream_resumes_where_it_stopped(tiny_vlm, tmp_path):
    """Webdataset shards: a run cut at step 5 resumes from step 4's state (12 rows read: epoch 2, row 4),
    skipping the rows consumed, and ends bit for bit where the uninterrupted run ends."""
    import webdataset as wds

    pattern = _write_shards(tmp_path / "shards", _one_caption_data(), 2)
    stream = lambda: wds.WebDataset(pattern, shardshuffle=False, nodesplitter=None,  # noqa: E731
                                    empty_check=False).decode("pil")
    init = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    kw = dict(steps=7, batch_size=3, lr=1e-2, warmup=2, seed=4, checkpoint_every=2, progress=False,
              image_column="png", caption_column="txt")
    whole = train_projection(tiny_vlm, stream(), checkpoint_dir=tmp_path / "whole", **kw)
    expected = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    tiny_vlm.projection.load_state_dict(init)
    with _fail_at(tiny_vlm, 5), pytest.raises(Boom):
        train_projection(tiny_vlm, stream(), checkpoint_dir=tmp_path / "cut", **kw)
    state = torch.load(tmp_path / "cut" / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and {k: state["stream"][k] for k in ("epoch", "position")} == {"epoch": 2, "position": 4}
    recaptioned = _one_caption_data().map(lambda row, i: {"captions": "a colour" if i == 1 else row["captions"]},
                                          with_indices=True)  # epoch 2's 4 rows read again: the 2nd differs
    with pytest.raises(ValueError, match="first 4 rows of epoch 2 of the training stream are not those the training "
                                         "state read"):
        train_projection(tiny_vlm, wds.WebDataset(_write_shards(tmp_path / "other", recaptioned, 2), shardshuffle=False,
                                                  nodesplitter=None, empty_check=False).decode("pil"),
                         checkpoint_dir=tmp_path / "cut", resume_from=tmp_path / "cut", **kw)
    with pytest.raises(ValueError, match="training stream has 3 rows in epoch 2, but the training state had read 4"):
        train_projection(tiny_vlm, [{"png": r["image"], "txt": r["captions"]} for r in _one_caption_data()][:3],
                         checkpoint_dir=tmp_path / "cut", resume_from=tmp_path / "cut", **kw)
    resumed = train_projection(tiny_vlm, stream(), checkpoint_dir=tmp_path / "cut", resume_from=tmp_path / "cut", **kw)
    for k, v in expected.items():
        assert torch.equal(tiny_vlm.projection.state_dict()[k], v), k
    assert resumed.train_losses == whole.train_losses
    in_memory = _one_caption_data().rename_columns({"image": "png", "captions": "txt"})
    with pytest.raises(ValueError, match="n_images: checkpoint has None, this call 4"):  # a stream's state
        train_projection(tiny_vlm, in_memory, checkpoint_dir=tmp_path / "cut", resume_from=tmp_path / "cut", **kw)
    with pytest.raises(ValueError, match="feature_cache needs a datasets.Dataset"):
        train_projection(tiny_vlm, stream(), checkpoint_dir=tmp_path / "c", feature_cache=tmp_path / "f.npy", **kw)
    tiny_vlm.projection.load_state_dict(init)


# ---------------------------------------------------------------------------- scale: cache, accumulation, processes
def test_feature_cache_is_written_once_and_reused(tiny_vlm, colour_data, tmp_path):
    calls = []
    handle = tiny_vlm.vision.register_forward_hook(lambda *args: calls.append(1))
    try:
        direct = encode_images(tiny_vlm, colour_data, progress=False)
        first = encode_images(tiny_vlm, colour_data, progress=False, cache=tmp_path / "f.npy")
        n_encoder_passes = len(calls)
        second = encode_images(tiny_vlm, colour_data, progress=False, cache=tmp_path / "f.npy")
    finally:
        handle.remove()
    assert len(calls) == n_encoder_passes == 2  # the second read skips the encoder
    assert torch.equal(first, direct) and torch.equal(second, direct)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "f.npy"]
    with pytest.raises(ValueError, match=r"f.npy was written for other data or another encoder \(images: .*; "
                                         r"n_images: 4 there, 2 here; shape: .*; delete it"):
        encode_images(tiny_vlm, colour_data.select([0, 1]), progress=False, cache=tmp_path / "f.npy")
    flipped = colour_data.select([1, 0, 2, 3])  # the same count, other images in rows 0 and 1
    with pytest.raises(ValueError, match=r"f.npy was written for other data or another encoder \(images: '\w+' "
                                         r"there, '\w+' here; from .*f.json\)"):
        encode_images(tiny_vlm, flipped, progress=False, cache=tmp_path / "f.npy")
    good = (tmp_path / "f.npy").read_bytes()
    for garbage, match in ((b"not an array at all", "is not a readable .npy file"),
                           (good[:200], "is not a readable .npy file"),
                           (None, r"holds a float64 array of shape \[4, 16, 64\], its record says float32")):
        if garbage is None:
            np.save(tmp_path / "f.npy", np.zeros((4, 16, 64)))
        else:
            (tmp_path / "f.npy").write_bytes(garbage)
        with pytest.raises(ValueError, match=f"feature cache {tmp_path / 'f.npy'} {match}.*delete it"):
            encode_images(tiny_vlm, colour_data, progress=False, cache=tmp_path / "f.npy")
    with pytest.raises(ValueError, match=r"cache must be a .npy file"):
        encode_images(tiny_vlm, colour_data, progress=False, cache=tmp_path / "f.bin")


# Two processes run in a subprocess started by torchrun (spawned, not forked: forking a process whose
# OpenMP threads are running can hang), each rebuilding the same tiny model from its saved weights.
_DP_SCRIPT = """
import sys
import torch
import transformers
import timm
sys.path[:0] = [{tests!r}, {conftest_dir!r}]
from test_training import TINY, make_colour_data
from conftest import build_vlm, tiny_hf
from tl_multimodal import VisionEncoder
from tl_multimodal.training.train import train_projection

tok = transformers.GPT2TokenizerFast.from_pretrained({tokenizer!r})
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2,
                        num_heads=2, num_classes=0)
model = build_vlm({backend!r}, tiny_hf("gpt2", **TINY), tok, VisionEncoder(vit, name="vit_tiny_32"))
model.load_state_dict(torch.load({weights!r}, weights_only=True))
model.projection.dropout.p = 0.0
init = {{k: v.clone() for k, v in model.projection.state_dict().items()}}
train_projection(model, make_colour_data(), **{kwargs!r})
if torch.distributed.get_rank() == 0:
    torch.save(model.projection.state_dict(), {out!r})
model.projection.load_state_dict(init)  # then a stream: every process reads all rows, encodes its own
train_projection(model, [dict(row) for row in make_colour_data()], **{kwargs!r})
if torch.distributed.get_rank() == 0:
    torch.save(model.projection.state_dict(), {out_stream!r})
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accumulation_and_two_processes_train_as_one_batch(backend, tiny_vlm, colour_data, tmp_path):
    """Oracle: one process, one pass per global batch (and for a stream on 2 processes, the one-process
    run taking the same rows in order). Dropout off: masks are drawn per pass."""
    init = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
    kw = dict(steps=3, batch_size=4, lr=1e-2, warmup=1, seed=2, progress=False)
    runs = {}
    dropout, tiny_vlm.projection.dropout.p = tiny_vlm.projection.dropout.p, 0.0
    try:
        for name, extra in {"one": {}, "accum": {"grad_accum": 2},
                            "cached": {"feature_cache": tmp_path / "f.npy", "grad_accum": 4},
                            "one, in order": {"shuffle": False}}.items():
            tiny_vlm.projection.load_state_dict(init)
            train_projection(tiny_vlm, colour_data, **kw, **extra)
            runs[name] = {k: v.clone() for k, v in tiny_vlm.projection.state_dict().items()}
        tiny_vlm.projection.load_state_dict(init)
        torch.save(tiny_vlm.state_dict(), tmp_path / "model.pt")
        script = tmp_path / "dp.py"
        script.write_text(_DP_SCRIPT.format(tests=str(Path(__file__).parent), conftest_dir=str(Path(__file__).parents[1]), tokenizer=str(ASSETS / "gpt2_tokenizer"),
                                            backend=backend, weights=str(tmp_path / "model.pt"), kwargs=kw,
                                            out=str(tmp_path / "dp.pt"), out_stream=str(tmp_path / "dp_stream.pt")))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(_free_port()), str(script)],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        runs["two processes"] = torch.load(tmp_path / "dp.pt", weights_only=True)
        stream = torch.load(tmp_path / "dp_stream.pt", weights_only=True)
    finally:
        tiny_vlm.projection.dropout.p = dropout
    assert not torch.equal(runs["one"]["linear.weight"], init["linear.weight"])
    in_order = runs.pop("one, in order")
    assert not torch.equal(in_order["linear.weight"], runs["one"]["linear.weight"])
    for k, v in stream.items():  # two processes on a stream: the one-process run on the same rows in order
        torch.testing.assert_close(v, in_order[k], rtol=1e-4, atol=1e-5)
    for name, run in runs.items():
        for k, v in run.items():
            # float32 sums in another order (micro-batches, processes, 2 threads): ~2e-6 apart after 3 steps
            # of lr 1e-2; summing instead of averaging the gradients would be ~1e-2 apart
            torch.testing.assert_close(v, runs["one"][k], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name, k=k: f"{name}: {k}: {m}")


def test_failed_state_write_keeps_the_previous_state(tiny_vlm, colour_data, tmp_path, monkeypatch):
    """Fault injection in the file write: the 4th torch.save (step 4's state) fills the disk part-way."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        real_save(obj, f, *args, **kwargs)
        if len(calls) == 4:
            f.truncate(100)
            raise OSError(28, "No space left on device")

    before = _flags(tiny_vlm)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train_projection(tiny_vlm, colour_data, steps=6, batch_size=2, checkpoint_dir=tmp_path,
                         checkpoint_every=2, progress=False)
    monkeypatch.undo()
    assert _flags(tiny_vlm) == before
    assert torch.load(tmp_path / "training_state.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projection_step2.pt", "projection_step4.pt",
                                                          "training_state.pt"]
    result = train_projection(tiny_vlm, colour_data, steps=6, batch_size=2, checkpoint_dir=tmp_path,
                              checkpoint_every=2, resume_from=tmp_path, progress=False)
    assert result.steps == 6 and len(result.train_losses) == 6
