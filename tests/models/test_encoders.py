"""HF transformers encoders (BEiT, CLIP, SigLIP) against the HF models themselves; timm configs from
HF image processors against the processors' own output."""

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image

from tl_multimodal.models.encoders import HFVisionEncoder, data_config_from_processor
from tl_multimodal.analysis.heatmaps import CropGeometry

_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=64)


@pytest.fixture(scope="module")
def hf_towers():
    """Tiny random HF vision models: name -> (model, number of prefix tokens)."""
    torch.manual_seed(0)
    return {
        "beit": (transformers.BeitModel(transformers.BeitConfig(**_VIT, use_mask_token=False)).eval(), 1),
        "clip": (transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_VIT)).eval(), 1),
        "siglip": (transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**_VIT)).eval(), 0),
    }


@pytest.mark.parametrize("kind", ["beit", "clip", "siglip"])
@pytest.mark.parametrize("layer", [None, -2, 1])
def test_hf_encoder_gives_hf_features_with_prefix_dropped(hf_towers, kind, layer):
    model, n_prefix = hf_towers[kind]
    enc = HFVisionEncoder(model, feature_layer=layer)
    assert (enc.grid, enc.n_patches, enc.d_img, enc.n_prefix, enc.input_size) == ((4, 4), 16, 32, n_prefix, (3, 32, 32))
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        want = (out.last_hidden_state if layer is None else out.hidden_states[layer])[:, n_prefix:]
        got = enc(pixels)
    assert got.shape == (2, 16, 32)
    assert torch.equal(got, want)
    assert enc.model_name == (model.config.model_type if layer is None else f"{model.config.model_type}:layer{layer}")


def test_clip_penultimate_layer_is_llava_selection(hf_towers):
    """LLaVA-1.5 reads hidden_states[-2], which differs from the last hidden state."""
    model, _ = hf_towers["clip"]
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(HFVisionEncoder(model, feature_layer=-2)(pixels), HFVisionEncoder(model)(pixels))


def test_encoder_is_frozen_and_stays_in_eval(hf_towers):
    enc = HFVisionEncoder(hf_towers["beit"][0])
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("kind", ["beit", "clip", "siglip"])
def test_preprocess_matches_hf_processor_without_resampling(kind):
    """An image that needs no resize (only CLIP's crop): timm's transform from the processor's
    settings equals the HF processor (mean, std, crop offsets)."""
    proc = {"beit": transformers.BeitImageProcessor(size={"height": 32, "width": 32}),
            "clip": transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            "siglip": transformers.SiglipImageProcessor(size={"height": 32, "width": 32})}[kind]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40 if kind == "clip" else 32, 32, 3), np.uint8))
    want = proc(image, return_tensors="pt")["pixel_values"]
    got = timm.data.create_transform(**data_config_from_processor(proc))(image)[None]
    assert got.shape == want.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["beit", "clip"])
def test_preprocess_close_to_hf_processor_with_resize(kind):
    """With a resize, PIL (timm) and torchvision (HF) bicubic differ a little, on a smooth image."""
    proc = transformers.BeitImageProcessor() if kind == "beit" else transformers.CLIPImageProcessor()
    y, x = np.mgrid[0:300, 0:400]
    image = Image.fromarray(np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], -1).astype(np.uint8))
    want = proc(image, return_tensors="pt")["pixel_values"]
    got = timm.data.create_transform(**data_config_from_processor(proc))(image)[None]
    assert got.shape == want.shape == (1, 3, 224, 224)
    assert (got - want).abs().mean() < 0.01


def test_crop_geometry_of_clip_settings_is_shortest_edge_then_center_crop():
    cfg = data_config_from_processor(transformers.CLIPImageProcessor(size={"shortest_edge": 336},
                                                                      crop_size={"height": 336, "width": 336}))
    geo = CropGeometry.from_data_config(cfg, (640, 480))
    assert geo.resized == (448, 336) and geo.crop == (56, 0, 336, 336)
    beit = CropGeometry.from_data_config(data_config_from_processor(transformers.BeitImageProcessor()), (640, 480))
    assert beit.resized == (224, 224) and beit.crop == (0, 0, 224, 224)


def test_hf_encoder_preprocess_feeds_the_model(hf_towers):
    enc = HFVisionEncoder(hf_towers["siglip"][0])
    pixels = enc.preprocess([Image.new("RGB", (50, 70), (255, 0, 0))])
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # (x/255 - .5) / .5
    assert enc(pixels).shape == (1, 16, 32)


def test_bad_settings_are_named(hf_towers):
    model = hf_towers["clip"][0]
    with pytest.raises(ValueError, match="feature_layer"):
        HFVisionEncoder(model, feature_layer=7)
    with pytest.raises(ValueError, match="do_resize"):
        data_config_from_processor(transformers.CLIPImageProcessor(do_resize=False))
    with pytest.raises(ValueError, match="do_pad"):
        data_config_from_processor(transformers.LlavaImageProcessor(do_pad=True))
    with pytest.raises(ValueError, match="square center crop"):
        data_config_from_processor(transformers.CLIPImageProcessor(do_center_crop=False))
    enc = HFVisionEncoder(model)
    with pytest.raises(ValueError, match="32x32"):
        enc(torch.zeros(1, 3, 64, 64))


def test_heatmap_through_an_hf_clip_encoder_covers_the_center_crop(hf_towers, backend, request):
    """CLIP's shortest-edge resize + center crop: on a 48x32 image the model sees the middle 32x32
    (after resizing the short side 32 -> 32), so the heatmap is NaN on the 8-pixel bands cut away,
    and its grid equals the unit's activations read off the cache at the image positions."""
    from tl_multimodal.analysis.heatmaps import unit_heatmap

    from conftest import gpt2_small_vlm

    model = gpt2_small_vlm(backend, request, HFVisionEncoder(hf_towers["clip"][0]))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 48, 3), np.uint8))
    hm = unit_heatmap(model, image, layer=1, unit=7)
    assert hm.heatmap.shape == (32, 48) and hm.geometry.crop == (8, 0, 32, 32)
    nan = torch.isnan(hm.heatmap)
    assert nan[:, :8].all() and nan[:, 40:].all() and not nan[:, 8:40].any()
    pixels = model.preprocess(image)
    hf_proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.testing.assert_close(pixels, hf_proc(image, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        _, cache = model.run_with_cache("A picture of", images=pixels)
    torch.testing.assert_close(hm.grid, cache["blocks.1.mlp.hook_post"][0, :16, 7].reshape(4, 4))
