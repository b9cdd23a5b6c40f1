"""The image door (tl_multimodal.models.images) against independent oracles: pixel arrays built by hand
(16-bit values divided by 257, EXIF rotations done with numpy), the encoder's own transform, and a
named error for each bad input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tl_multimodal.models.images import check_pixels, to_pil, to_pil_list, to_pixels


def _rgb(h=12, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_uint8_rgb_passes_unchanged():
    a = _rgb()
    assert np.array_equal(np.asarray(to_pil(Image.fromarray(a))), a)
    assert np.array_equal(np.asarray(to_pil(a)), a)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_are_scaled_not_saturated(mode):
    a = np.linspace(0, 65535, 12 * 20).round().astype(np.uint16).reshape(12, 20)
    im = Image.fromarray(a) if mode == "I;16" else Image.fromarray(a.astype(np.int32))
    assert im.mode == mode
    out = np.asarray(to_pil(im))
    expected = np.round(a / 257.0).astype(np.uint8)  # 65535 -> 255, 257 -> 1
    assert out.shape == (12, 20, 3) and all(np.array_equal(out[..., c], expected) for c in range(3))
    assert (out == 255).mean() < 0.01  # PIL's own convert("RGB") puts almost every pixel at 255
    assert np.array_equal(np.asarray(to_pil(a))[..., 0], expected)  # the same as a numpy array


def test_float_images_in_0_1_and_out_of_range():
    a = np.random.default_rng(1).random((6, 7, 3))
    assert np.array_equal(np.asarray(to_pil(a)), np.round(a * 255).astype(np.uint8))
    f = Image.fromarray(a[..., 0].astype(np.float32))
    assert f.mode == "F"
    assert np.array_equal(np.asarray(to_pil(f))[..., 1], np.round(a[..., 0].astype(np.float32) * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"float image with values in \[-0.9.*expected \[0, 1\]"):
        to_pil(a * 4 - 1)
    with pytest.raises(ValueError, match="NaN"):
        to_pil(np.full((3, 3), np.nan))


def test_exif_orientation_is_applied():
    a = _rgb(10, 16)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif)
    buf.seek(0)
    out = np.asarray(to_pil(Image.open(buf)))
    assert out.shape == (16, 10, 3)
    assert np.array_equal(out, np.rot90(a, k=-1))


def test_paths_grey_alpha_and_palette_images(tmp_path):
    a = _rgb()
    path = tmp_path / "x.png"
    Image.fromarray(a).save(path)
    for p in (path, str(path)):
        assert np.array_equal(np.asarray(to_pil(p)), a)
    grey = a[..., 0]
    assert np.array_equal(np.asarray(to_pil(Image.fromarray(grey))), np.repeat(grey[..., None], 3, -1))
    assert np.array_equal(np.asarray(to_pil(grey[..., None])), np.repeat(grey[..., None], 3, -1))
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], -1)
    assert np.array_equal(np.asarray(to_pil(rgba)), a)
    assert to_pil(Image.fromarray(a).convert("P")).mode == "RGB"


def test_batches_lists_tuples_and_4d_arrays():
    a, b = _rgb(seed=1), _rgb(seed=2)
    for batch in ([a, b], (a, b), np.stack([a, b]), [Image.fromarray(a), b]):
        out = to_pil_list(batch)
        assert len(out) == 2 and np.array_equal(np.asarray(out[1]), b)
    assert len(to_pil_list(a)) == 1


@pytest.mark.parametrize("bad, error, message", [
    (Image.new("RGB", (0, 0)), ValueError, "empty"),
    (np.zeros((0, 4, 3), np.uint8), ValueError, "empty"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, r"\[h, w\] or \[h, w, 3\|4\]"),
    (np.zeros((4, 4), np.int8), ValueError, "dtype int8"),
    (3, TypeError, "must be a PIL image, a file path, a numpy array or a pixel tensor, got int"),
    ("/no/such/file.png", FileNotFoundError, "not a file"),
])
def test_bad_images_are_named(bad, error, message):
    with pytest.raises(error, match=message):
        to_pil(bad)
    with pytest.raises(error, match="image 1" if error is not TypeError else message):
        to_pil_list([_rgb(), bad])


def test_bad_batches_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        to_pil(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no images"):
        to_pil_list([])
    with pytest.raises(TypeError, match="got dict"):
        to_pil_list({"a": 1})
    with pytest.raises(TypeError, match="pixel tensor has no original"):
        to_pil_list(torch.zeros(1, 3, 4, 4))


def test_check_pixels_converts_dtypes_and_refuses_raw_pixels():
    x = torch.randn(2, 3, 8, 8)
    assert check_pixels(x) is x
    assert check_pixels(x[0]).shape == (1, 3, 8, 8)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out = check_pixels(x.to(dtype))
        assert out.dtype == torch.float32 and torch.equal(out, x.to(dtype).float())
    with pytest.raises(ValueError, match="raw 0-255 pixels.*preprocess"):
        check_pixels(torch.rand(1, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match="must be float.*preprocess"):
        check_pixels(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        check_pixels(torch.full((1, 3, 8, 8), float("inf")))
    with pytest.raises(ValueError, match="batch size 0"):
        check_pixels(torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        check_pixels(torch.zeros(8, 8))


def test_to_pixels_uses_the_encoders_transform(vit_encoder):
    ims = [Image.fromarray(_rgb(40, 50, seed=s)) for s in range(2)]
    expected = vit_encoder.preprocess(ims)
    assert expected.shape == (2, 3, 32, 32)
    assert torch.equal(to_pixels(vit_encoder, ims), expected)
    assert torch.equal(to_pixels(vit_encoder, [np.asarray(im) for im in ims]), expected)
    assert torch.equal(to_pixels(vit_encoder, [expected[0], expected[1:]]), expected)
    with pytest.raises(ValueError, match="takes 32x32 images"):
        to_pixels(vit_encoder, torch.zeros(1, 3, 16, 16))
