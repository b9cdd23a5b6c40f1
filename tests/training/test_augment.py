"""Random-resized crop and flip: every view is a window of the image (read off a coordinate-coded
image), of the area and aspect asked for, mirrored when drawn so, and the same for the same seed."""

import random

import numpy as np
import pytest
from PIL import Image

from tl_multimodal.training.augment import random_resized_crop_flip


def coordinate_image(w=200, h=120) -> Image.Image:
    """Red = x, green = y: a pixel says where it came from."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_views_are_windows_of_the_requested_area_and_aspect():
    image = coordinate_image()
    src = np.asarray(image)
    flipped = 0
    for seed in range(40):
        view = np.asarray(random_resized_crop_flip(image, random.Random(seed), scale=(0.3, 0.8), ratio=(0.5, 2.0)))
        h, w = view.shape[:2]
        if view[0, 0, 0] > view[0, -1, 0]:  # mirrored: x decreases along the row
            view = view[:, ::-1]
            flipped += 1
        x0, y0 = int(view[0, 0, 0]), int(view[0, 0, 1])
        assert np.array_equal(view, src[y0:y0 + h, x0:x0 + w])
        assert 0.3 - 0.02 <= w * h / (200 * 120) <= 0.8 + 0.02 and 0.5 - 0.05 <= w / h <= 2.0 + 0.05
    assert 5 < flipped < 35
    a = random_resized_crop_flip(image, random.Random(3))
    assert np.array_equal(np.asarray(a), np.asarray(random_resized_crop_flip(image, random.Random(3))))


def test_full_crop_without_and_with_flip():
    image = coordinate_image()
    same = random_resized_crop_flip(image, random.Random(0), scale=(1, 1), ratio=(200 / 120, 200 / 120), flip=0)
    assert np.array_equal(np.asarray(same), np.asarray(image))
    mirror = random_resized_crop_flip(image, random.Random(0), scale=(1, 1), ratio=(200 / 120, 200 / 120), flip=1)
    assert np.array_equal(np.asarray(mirror), np.asarray(image)[:, ::-1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(scale=(0, 1)), ValueError, "scale"), (dict(scale=(0.9, 0.5)), ValueError, "scale"),
    (dict(ratio=(2, 1)), ValueError, "ratio"), (dict(flip=1.5), ValueError, "flip"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        random_resized_crop_flip(coordinate_image(), random.Random(0), **kwargs)
    with pytest.raises(TypeError, match="PIL"):
        random_resized_crop_flip(np.zeros((4, 4, 3)), random.Random(0))
