"""The image door's bad-input cases (issue #25): one rule for float pixel values (no guessing from the
values), decompression bombs named with the file and its size, and what a pixel tensor can and cannot
be checked for. Oracles: hand-built arrays and files, exact values."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tl_multimodal.models import images as images_module
from tl_multimodal.models.images import check_pixels, to_pil, to_pil_list


# ------------------------------------------------------------------ case 1: float images are [0, 1]
def test_float_images_are_0_1_whatever_their_values_look_like():
    rng = np.random.default_rng(0)
    bright = 0.9 + 0.1 * rng.random((5, 6, 3))  # a bright [0, 1] image
    assert np.array_equal(np.asarray(to_pil(bright)), np.round(bright * 255).astype(np.uint8))
    dark = 0.004 * rng.random((5, 6, 3))  # a dark [0, 1] image: values under 1/255 round to 0 or 1
    assert np.array_equal(np.asarray(to_pil(dark)), np.round(dark * 255).astype(np.uint8))
    for dtype in (np.float16, np.float32, np.float64):
        a = np.array([[0.0, 0.5, 1.0]], dtype)
        assert np.asarray(to_pil(a))[0, :, 0].tolist() == [0, 128, 255]
    # integer images are 0-255 by their dtype
    u = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_pil(u)), u)
    assert np.asarray(to_pil(np.array([[False, True]])))[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize("values, hint", [
    (np.array([[0.0, 0.5, 1.02]]), r"np.clip\(a, 0, 1\)"),  # a slightly bright [0, 1] image (e.g. after augmentation)
    (np.array([[0.0, 12.0, 200.0]]), r"a.astype\(np.uint8\) or a / 255"),  # 0-255 values as floats
    (np.array([[-0.5, 0.0, 0.5]]), "rescale it into"),
])
def test_float_images_outside_0_1_are_refused_with_how_to_convert(values, hint):
    with pytest.raises(ValueError, match=rf"image 1 is a float image with values in .*expected \[0, 1\].*{hint}"):
        to_pil_list([np.zeros((2, 3)), values])
    f = Image.fromarray(values.astype(np.float32))  # PIL's float mode follows the same rule
    assert f.mode == "F"
    with pytest.raises(ValueError, match=rf"expected \[0, 1\].*{hint}"):
        to_pil(f)


def test_float_rule_is_documented():
    doc = images_module.__doc__
    assert "float images are [0, 1]" in doc and "integer images\n  are 0-255" in doc
    assert "ToTensor" in doc and "not** detected" in doc


# ------------------------------------------------------------------ case 2: unnormalised ToTensor pixels
def test_pixel_tensors_in_0_1_pass_as_given():
    """Documented limit: a ``ToTensor`` tensor (values in [0, 1]) cannot be told from normalised pixels
    (a mid-grey image normalises into [0, 1] too), so it passes unchanged; raw 0-255 values are refused."""
    x = torch.rand(2, 3, 8, 8)
    assert check_pixels(x) is x
    grey = (torch.full((1, 3, 8, 8), 0.55) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / \
        torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert 0 <= grey.min() and grey.max() <= 1  # a normalised image in [0, 1]: why no rule can refuse x
    with pytest.raises(ValueError, match="raw 0-255 pixels"):
        check_pixels(x * 255)


# ------------------------------------------------------------------ case 3: decompression bombs
def _png_declaring(path, width: int, height: int) -> None:
    """A PNG whose header declares ``width x height`` RGB pixels (with one tiny IDAT chunk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_named_with_its_file_and_size(tmp_path):
    bomb = tmp_path / "huge.png"
    _png_declaring(bomb, 100000, 100000)
    with pytest.raises(ValueError, match=r"huge.png declares 100000 x 100000 pixels, more than PIL's limit.*"
                                         r"decompression bomb.*MAX_IMAGE_PIXELS"):
        to_pil(bomb)
    with pytest.raises(ValueError, match=r"image 1: .*huge.png declares 100000 x 100000 pixels"):
        to_pil_list([np.zeros((2, 2), np.uint8), str(bomb)])
    ok = tmp_path / "ok.png"  # a normal file beside it still opens
    Image.fromarray(np.full((3, 4, 3), 7, np.uint8)).save(ok)
    assert np.asarray(to_pil(ok)).tolist() == np.full((3, 4, 3), 7).tolist()


def test_a_bomb_without_a_readable_header_still_names_the_pixel_count(tmp_path, monkeypatch):
    tiff = tmp_path / "big.tiff"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tiff)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 2000 pixels > 2 * 500: PIL raises on open
    with pytest.raises(ValueError, match=r"big.tiff declares 2000 pixels, more than PIL's limit of 1000"):
        to_pil(tiff)
