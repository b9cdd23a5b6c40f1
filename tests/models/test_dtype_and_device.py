"""Half precision end to end (encoder, projection, LM and pixels follow the model's dtype), against the
float32 model on the same weights; and a move to a device that fails leaves the model where it was.

On CPU both bfloat16 and float16 run (torch 2.14: conv, matmul and attention have CPU kernels for both).
Tolerance: the logits of the half model are within ``32 * eps(dtype) * max|logit|`` of the float32 model's
(eps: 2**-8 for bfloat16, 2**-11 for float16; the rounding of a few dozen layers of a tiny model, measured
at about 10 eps for bfloat16)."""

import copy

import pytest
import torch
from PIL import Image

from conftest import build_vlm, tiny_hf


def _model(backend, tokenizer, encoder):
    """A small float32 model with its own encoder (``to`` changes the encoder in place)."""
    hf = tiny_hf("gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=64, dtype=torch.float32, seed=3)
    return build_vlm(backend, hf, tokenizer, copy.deepcopy(encoder))


@pytest.fixture(scope="module")
def image():
    import numpy as np

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("encoder", ["vit_encoder", "cnn_encoder"])
@torch.no_grad()
def test_half_precision_end_to_end_is_close_to_float32(backend, gpt2_tokenizer, request, encoder, dtype, image):
    model = _model(backend, gpt2_tokenizer, request.getfixturevalue(encoder))
    ref = model("A picture of", images=image)
    pixels32 = model.preprocess(image)
    assert pixels32.dtype == torch.float32
    model.to(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}  # LM, encoder and projection
    pixels = model.preprocess(image)
    assert pixels.dtype == dtype and model.preprocess(pixels32.to(dtype)).dtype == dtype  # pixels follow the model
    assert model.embed_images(image).dtype == dtype
    out = model("A picture of", images=image)
    assert out.dtype == dtype
    tol = 32 * torch.finfo(dtype).eps * ref.abs().max()
    assert (out.float() - ref).abs().max() < tol
    assert not torch.allclose(ref, model("A picture of", images=torch.zeros_like(pixels)).float(), atol=float(tol))
    captions = model.caption([image, image], max_new_tokens=3)
    assert len(captions) == 2 and captions[0] == captions[1]
    model.to(torch.float32)  # and back: the float32 model again, exactly
    assert torch.equal(model("A picture of", images=image), model("A picture of", images=pixels32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU: the move must fail")
@pytest.mark.parametrize("how", ["to", "train_projection"])
@torch.no_grad()
def test_a_failed_move_leaves_the_model_where_it_was(backend, gpt2_tokenizer, vit_encoder, how, image):
    model = _model(backend, gpt2_tokenizer, vit_encoder)
    before = model("A picture of", images=image)
    cfg, layout = dict(vars(model.cfg)), model.projection.info.bos
    with pytest.raises((RuntimeError, AssertionError)):  # torch: "no NVIDIA driver" / "not compiled with CUDA"
        if how == "to":
            model.to("cuda")
        else:
            import datasets

            from tl_multimodal.training.train import train_projection

            data = datasets.Dataset.from_list([{"image": image, "captions": ["a square"]}])
            with torch.enable_grad():
                train_projection(model, data, steps=1, batch_size=1, device="cuda", progress=False,
                                 bos=not model.image_bos)  # another layout: it must not stick either
    assert model.projection.info.bos == layout
    assert vars(model.cfg) == cfg and model.cfg.device == cfg["device"]
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(model("A picture of", images=image), before)
