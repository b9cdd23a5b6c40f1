"""Images enter once: every public analysis call runs the vision encoder once per image batch
(integrated gradients and ablation curves included), counted with a forward hook on the encoder.
And the VisionLM protocol describes the model the analyses get."""

import warnings

import matplotlib
import pytest
import torch
from PIL import Image

from tl_multimodal.analysis.ablation import ablate_units, ablation_curve, mean_unit_activations
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.analysis.decoding import decode_image_prompts
from tl_multimodal.analysis.heatmaps import heatmap_ious, unit_grid_activations, unit_heatmap
from tl_multimodal.analysis.patching import patch_resid, patch_units, unit_patch_sweep
from tl_multimodal.views.report import build_report
from tl_multimodal.views.figures import plot_unit_heatmaps
from tl_multimodal.views.heatmap_view import unit_heatmap_view
from tl_multimodal.views.tokens import token_activations_view
from tl_multimodal.models.protocol import VisionLM, soft_prompts

matplotlib.use("Agg")


@pytest.fixture
def count_encoder(small_vlm_on):
    calls = []
    handle = small_vlm_on.vision.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    yield calls
    handle.remove()


def _pil(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy())


def test_the_model_is_a_vision_lm(small_vlm_on):
    assert isinstance(small_vlm_on, VisionLM)
    assert not isinstance(small_vlm_on.vision, VisionLM)


CALLS = {
    "attribute (greedy caption)": lambda m, px: attribute(m, px, max_new_tokens=4, batch_size=2),
    "attribute (integrated gradients)": lambda m, px: attribute(
        m, px, target="dog", method="integrated_gradients", n_steps=3, batch_size=2),
    "attribute (ig, captioned)": lambda m, px: attribute(m, px, method="integrated_gradients", n_steps=2,
                                                         max_new_tokens=3),
    "ablate_units": lambda m, px: ablate_units(m, px, [(0, 1), (1, 2)], "dog", batch_size=2),
    "ablation_curve": lambda m, px: ablation_curve(m, px, [(0, 1), (1, 2), (1, 5)], "dog", ks=(1, 3),
                                                   n_random_seeds=2, batch_size=2),
    "mean_unit_activations": lambda m, px: mean_unit_activations(m, px, batch_size=2),
    "unit_grid_activations": lambda m, px: unit_grid_activations(m, px, [(0, 1)], batch_size=2),
    "heatmap_ious": lambda m, px: heatmap_ious(m, px, [(0, 1)], [torch.ones(32, 32, dtype=torch.bool)] * 3),
    "decode_image_prompts": lambda m, px: decode_image_prompts(m, px),
}
PAIRED = {
    "patch_units": lambda m, a, b: patch_units(m, a, b, [(0, 1)], "dog"),
    "patch_resid": lambda m, a, b: patch_resid(m, a, b, "dog", layer=1),
    "unit_patch_sweep": lambda m, a, b: unit_patch_sweep(m, a, b, [(0, 1), (1, 3)], "dog"),
}
ONE_IMAGE = {
    "unit_heatmap": lambda m, im: unit_heatmap(m, im, 0, 1),
    "token_activations_view (captioned)": lambda m, im: token_activations_view(m, im, [(0, 1)], max_new_tokens=3),
    "unit_heatmap_view": lambda m, im: unit_heatmap_view(m, im, [(0, 1), (1, 2)]),
    "plot_unit_heatmaps": lambda m, im: plot_unit_heatmaps(m, im, [(0, 1)]),
    "build_report": lambda m, im: build_report(m, im, n_units=2, max_new_tokens=3),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_one_encoder_pass_per_call(small_vlm_on, pixels, count_encoder, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random captions may have no noun
        CALLS[name](small_vlm_on, pixels)
    assert count_encoder == [3]


@pytest.mark.parametrize("name", list(PAIRED))
def test_one_encoder_pass_per_image_batch_when_patching(small_vlm_on, pixels, count_encoder, name):
    PAIRED[name](small_vlm_on, pixels, pixels.flip(0))
    assert count_encoder == [3, 3]  # the source batch, then the base batch


@pytest.mark.parametrize("name", list(ONE_IMAGE))
def test_one_encoder_pass_per_single_image_call(small_vlm_on, count_encoder, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ONE_IMAGE[name](small_vlm_on, _pil(0))
    assert count_encoder == [1]


def test_soft_prompts_door(small_vlm_on, pixels, count_encoder):
    emb = soft_prompts(small_vlm_on, pixels)
    torch.testing.assert_close(emb, small_vlm_on.embed_images(pixels))
    assert count_encoder == [3, 3]
    assert soft_prompts(small_vlm_on, image_embed=emb) is not None and count_encoder == [3, 3]
    res = ablate_units(small_vlm_on, None, [(0, 1)], "dog", image_embed=emb)
    torch.testing.assert_close(res.p_after, ablate_units(small_vlm_on, pixels, [(0, 1)], "dog").p_after)
    with pytest.raises(ValueError, match="exactly one of images="):
        soft_prompts(small_vlm_on, pixels, image_embed=emb)
    with pytest.raises(ValueError, match=r"image_embed must be \[batch, 16, 32\]"):
        soft_prompts(small_vlm_on, image_embed=emb[:, :3])
