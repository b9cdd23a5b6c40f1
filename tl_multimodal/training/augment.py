"""Image augmentation for training the projection: random-resized crop and horizontal flip.

Training with an ``augment`` function encodes each image anew at every step (the encoder is
frozen and cheap next to the LM), so the projection sees a different view of an image each time.
The draws come from a ``random.Random`` the caller seeds, so a run (and a resumed run) is exact.
"""

from __future__ import annotations

import math
import random

from PIL import Image


def random_resized_crop_flip(image: Image.Image, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5) -> Image.Image:
    """A random crop of ``image`` (area fraction in ``scale``, aspect ratio in ``ratio``), flipped
    left-right with probability ``flip``; the encoder's preprocessing resizes it afterwards.

    Args:
        image: A PIL image.
        rng: The source of every random draw.
        scale: Range of the crop's area as a fraction of the image's, in (0, 1].
        ratio: Range of the crop's width/height (drawn log-uniformly).
        flip: Probability of a horizontal flip, in [0, 1].

    Returns:
        The cropped (maybe flipped) PIL image; the whole image when no draw of 10 fits.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
    if not 0 <= flip <= 1:
        raise ValueError(f"flip must be a probability in [0, 1], got {flip}")
    w, h = image.size
    box = (0, 0, w, h)
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = (x, y, x + cw, y + ch)
            break
    out = image.crop(box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < flip else out


#: Augmentations by name: what ``TrainingConfig(augment="name")`` and a saved training record name.
AUGMENTATIONS = {"random_resized_crop_flip": random_resized_crop_flip}
