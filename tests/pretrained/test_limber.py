"""LiMBeR assembly on tiny random parts: the HF model fed the same soft prompts is the oracle."""

import inspect
import warnings

import pytest
import torch
import transformers
from torch import nn

from tl_multimodal import HookedVisionPrefix
from tl_multimodal.models.bridge import VisionBridge
from tl_multimodal.models.encoders import HFVisionEncoder
from tl_multimodal.models._hub import HUB_ENCODER, hub_encoder, hub_projection
from tl_multimodal.pretrained.limber import LIMBER_CONFIGS, assemble_limber, load_limber

from conftest import needs_hooked_prefix


@pytest.fixture(scope="module")
def tiny_beit():
    torch.manual_seed(0)
    config = transformers.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    return transformers.BeitModel(config).eval()


def _hf_logits(hf_gpt2, image_tokens, ids):
    embeds = torch.cat([image_tokens, hf_gpt2.transformer.wte(ids).expand(len(image_tokens), -1, -1)], 1)
    return hf_gpt2(inputs_embeds=embeds).logits


def test_beit_linear_assembly_equals_hf_beit_linear_hf_gpt2(tiny_beit, gpt2_small, hf_gpt2, tmp_path):
    torch.manual_seed(1)
    linear = nn.Linear(32, 768)
    torch.save(linear.state_dict(), tmp_path / "proj.ckpt")  # LiMBeR's limber_weights/<config>/proj.ckpt
    model = assemble_limber(gpt2_small, HFVisionEncoder(tiny_beit), tmp_path / "proj.ckpt", "beit_linear").eval()
    assert model.n_image_tokens == 16 and model.projection.info.training["source"] == "LiMBeR beit_linear"
    pixels = torch.randn(2, 3, 32, 32)
    ids = model.tokenizer("A picture of", return_tensors="pt").input_ids
    with torch.no_grad():
        want = _hf_logits(hf_gpt2, linear(tiny_beit(pixel_values=pixels).last_hidden_state[:, 1:]), ids)
        got = model("A picture of", images=pixels)
    assert got.shape == want.shape == (2, 16 + ids.shape[1], 50257)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| vs HF BEiT + Linear + HF GPT-2: {diff:.2e}")
    assert diff < 1e-3


def test_pooled_nfrn50_style_assembly_gives_one_token(cnn_encoder, gpt2_small, hf_gpt2, tmp_path):
    """nfrn50_4096_linear: average-pooled CNN features, Linear(d_img, d_model * 1), one image token."""
    torch.manual_seed(2)
    linear = nn.Linear(cnn_encoder.d_img, 768)
    torch.save(linear.state_dict(), tmp_path / "proj.ckpt")
    model = assemble_limber(gpt2_small, cnn_encoder, tmp_path / "proj.ckpt", "nfrn50_4096_linear").eval()
    assert model.n_image_tokens == 1
    pixels = torch.randn(1, *cnn_encoder.input_size)
    ids = model.tokenizer(" a dog", return_tensors="pt").input_ids
    with torch.no_grad():
        fmap = cnn_encoder.model.forward_features(pixels)  # [1, 1280, 7, 7]
        pooled = nn.AdaptiveAvgPool2d((1, 1))(fmap).flatten(1)
        want = _hf_logits(hf_gpt2, linear(pooled)[:, None], ids)
        got = model(" a dog", images=pixels)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


def test_checkpoint_for_gptj_is_refused_by_a_smaller_lm(tiny_beit, gpt2_small, tmp_path):
    torch.save(nn.Linear(32, 4096).state_dict(), tmp_path / "proj.ckpt")  # made for GPT-J's d_model
    with pytest.raises(ValueError, match=r"shape \(4096, 32\), expected \(768, 32\)"):
        assemble_limber(gpt2_small, HFVisionEncoder(tiny_beit), tmp_path / "proj.ckpt")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown LiMBeR config 'beit'"):
        load_limber("beit", tmp_path / "proj.ckpt")
    with pytest.raises(ValueError, match="projection_path is required"):
        load_limber("beit_linear")
    with pytest.raises(FileNotFoundError, match="proj.ckpt"):
        load_limber("beit_linear", tmp_path / "proj.ckpt")
    assert set(LIMBER_CONFIGS) == {"beit_linear", "beit_ft_linear", "clip_linear", "nfrn50_4096_linear"}


# ------------------------------------------------------------------ hub defaults of from_pretrained
def test_hub_default_encoder_is_limbers_beit_everywhere():
    from tl_multimodal.cli import build_parser

    assert HUB_ENCODER == LIMBER_CONFIGS["beit_linear"].encoder == "microsoft/beit-large-patch16-224-pt22k"
    for f in (HookedVisionPrefix.from_pretrained, VisionBridge.from_pretrained):
        assert inspect.signature(f).parameters["encoder"].default == HUB_ENCODER
    caption = next(a for a in build_parser()._actions if a.dest == "command").choices["caption"]
    assert HUB_ENCODER in "".join(caption.format_help().split())  # --encoder names it (argparse wraps at hyphens)


def test_hub_encoder_reads_a_hf_beit_as_last_hidden_state_without_cls(tiny_beit, tmp_path):
    """A HF model folder (as the hub name resolves) gives HF's last_hidden_state[:, 1:], with the
    model's own image processor; a plain name is timm's."""
    folder = tmp_path / "beit"
    tiny_beit.save_pretrained(folder)
    transformers.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(folder)
    enc = hub_encoder(str(folder))
    assert isinstance(enc, HFVisionEncoder) and (enc.n_patches, enc.d_img, enc.grid) == (16, 32, (4, 4))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), tiny_beit(pixel_values=pixels).last_hidden_state[:, 1:])
    with pytest.raises(TypeError, match="encoder must be a HF or timm model name"):
        hub_encoder(None)


def test_hub_projection_warns_unless_trained_or_untrained_on_purpose(vit_encoder, gpt2_small, tmp_path):
    with pytest.warns(UserWarning, match=r"UNTRAINED \(random\) projection.*limber:beit_linear.*projection='untrained'"):
        assert hub_projection(None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hub_projection("untrained") is None
        trained = HookedVisionPrefix(gpt2_small, vit_encoder).projection
        assert hub_projection(trained) is trained
        trained.save(tmp_path / "p.pt")
        loaded = hub_projection(tmp_path / "p.pt")
    torch.testing.assert_close(loaded.state_dict(), trained.state_dict())
    with pytest.raises(TypeError, match="projection must be a checkpoint path"):
        hub_projection(3)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        hub_projection(tmp_path / "missing.pt")
    torch.save(nn.Linear(4, 8).state_dict(), tmp_path / "proj.ckpt")
    with pytest.raises(ValueError, match="LiMBeR's proj.ckpt format"):
        hub_projection(str(tmp_path / "proj.ckpt"))


@pytest.mark.parametrize("cls", [pytest.param(HookedVisionPrefix, marks=needs_hooked_prefix), VisionBridge])
def test_from_pretrained_warns_before_any_download(cls):
    """The warning (and a bad projection's error) comes first: offline, the LM load fails after it."""
    with pytest.warns(UserWarning, match=f"{cls.__name__}.from_pretrained: no projection given"):
        with pytest.raises((ValueError, OSError)):
            cls.from_pretrained("no-such-model-xyz")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises((ValueError, OSError)):
            cls.from_pretrained("no-such-model-xyz", projection="untrained")
    with pytest.raises(TypeError, match="projection must be a checkpoint path"):
        cls.from_pretrained("no-such-model-xyz", projection=1.5)
