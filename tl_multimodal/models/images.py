"""The one door images come in by: PIL images of any mode, paths, numpy arrays, pixel tensors, lists.

Everything a user may call an image is normalised here, once, into either RGB PIL images (the
originals, whose size heatmaps need) or the encoder's normalised pixel tensor. Problems are named
with a ``ValueError``/``TypeError`` at the door instead of failing deep inside torch:

* Pixel values follow one rule, read off the dtype, never guessed from the values: **integer images
  are 0-255** (``uint8``; ``uint16`` and 16/32-bit PIL modes are 0-65535, scaled to 8 bits, never
  clipped), ``bool`` images are 0/1, and **float images are [0, 1]**. A float image with a value
  outside [0, 1] is refused (with how to convert it): a float array holding 0-255 values is
  ``a.astype(np.uint8)`` or ``a / 255``, never read as such silently.
* PIL images: EXIF orientation applied; 16-bit and 32-bit integer modes scaled to 8 bits; float mode
  ``F`` is [0, 1] as above; palette, alpha and grey modes converted to RGB; an empty (0x0) image refused.
* Paths (``str`` or ``Path``): opened with PIL; a missing file, a non-image, or a file declaring more
  pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` allows (a decompression bomb) is named with its size.
* numpy arrays: ``[h, w]``, ``[h, w, c]`` (c = 1, 3 or 4) or a batch ``[n, h, w, c]``; ``uint8``,
  ``uint16``, ``bool`` or floats in [0, 1].
* Pixel tensors: ``[batch, c, h, w]`` or one ``[c, h, w]``, already normalised by the encoder's
  transform (``model.preprocess``); float64/half/bfloat16 are converted to float32. A float tensor
  whose values look like raw 0-255 pixels is refused with a pointer to ``preprocess``. A tensor
  straight from ``torchvision``'s ``ToTensor`` (resized but *not* normalised, values in [0, 1]) is
  **not** detected: its values lie inside the range of normalised pixels too (a low-contrast image,
  or an encoder whose transform has mean 0 and std 1, normalises into [0, 1]), so no rule tells the two
  apart without guessing. Pass PIL images, paths or arrays (the door normalises them), or pixels from
  ``model.preprocess``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

ImageLike = Union[Image.Image, str, Path, np.ndarray]
Images = Union[ImageLike, Sequence[ImageLike], Tensor]

# A normalised pixel tensor (timm/HF mean-std normalisation) lies within about [-3, 3]; raw 0-255
# pixels go far above. Anything past this bound is taken for unnormalised pixels.
_MAX_NORMALISED = 20.0


def _scale_to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """An integer, bool or float array as uint8, scaled by its type's range (never clipped)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255 exactly
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:  # the one rule for floats: [0, 1], whatever the values look like
            return np.round(a * 255.0).astype(np.uint8)
        hint = ("pass 0-255 values as a.astype(np.uint8) or a / 255; clip a [0, 1] image that overshoots "
                "with np.clip(a, 0, 1)"
                if lo >= 0.0 and hi <= 255.0 else "rescale it into [0, 1] (or pass uint8 values in [0, 255])")
        raise ValueError(f"{what} is a float image with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] "
                         f"(float images are read as [0, 1], integer ones as [0, 255]): {hint}")
    raise ValueError(f"{what} has dtype {a.dtype}; expected uint8, uint16, bool or float")


def _declared_size(path: Path, error: Exception) -> str:
    """``"W x H pixels"`` as the file's header declares it (PNG, GIF, BMP), else PIL's pixel count."""
    import re
    import struct

    with open(path, "rb") as f:
        head = f.read(32)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return f"{w} x {h} pixels"
    if head[:4] in (b"GIF8",):
        w, h = struct.unpack("<HH", head[6:10])
        return f"{w} x {h} pixels"
    if head[:2] == b"BM" and len(head) >= 26:
        w, h = struct.unpack("<ii", head[18:26])
        return f"{w} x {abs(h)} pixels"
    m = re.search(r"\((\d+) pixels\)", str(error))
    return f"{m.group(1)} pixels" if m else "too many pixels"


def to_pil(image: ImageLike, what: str = "image") -> Image.Image:
    """One image as an RGB PIL image (EXIF orientation applied, high bit depths scaled to 8 bits).

    Args:
        image: A PIL image (any mode), a path, or a numpy array ``[h, w]`` / ``[h, w, c]``.
        what: How to name the image in errors (e.g. ``"image 3"``).

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: An empty image, a file that is not an image or declares too many pixels (a
            decompression bomb), an array of the wrong shape, or a float image outside [0, 1].
        TypeError: Anything else.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} is not a file")
        try:
            with Image.open(path) as im:
                im.load()
                image = im
        except Image.DecompressionBombError as e:  # PIL refuses it on open, before reading any pixel
            raise ValueError(f"{what}: {path} declares {_declared_size(path, e)}, more than PIL's limit of "
                             f"{2 * Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS x 2): a corrupt or "
                             "malicious file (a decompression bomb); if you trust it, raise "
                             "PIL.Image.MAX_IMAGE_PIXELS, or resize it first") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{what}: {path} is not an image PIL can read ({e})") from None
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if not (a.ndim == 2 or a.ndim == 3 and a.shape[-1] in (3, 4)):
            raise ValueError(f"{what}: a numpy image must be [h, w] or [h, w, 3|4], got shape {a.shape}")
        if 0 in a.shape:
            raise ValueError(f"{what} is empty (shape {a.shape})")
        return Image.fromarray(np.ascontiguousarray(_scale_to_uint8(a, what))).convert("RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL image, a file path, a numpy array or a pixel tensor, "
                        f"got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what} is empty ({image.width}x{image.height} pixels)")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(image)
        if a.dtype.kind in "iu":
            a = a.astype(np.int64)
            if a.min() < 0 or a.max() > 65535:
                raise ValueError(f"{what}: integer image with values in [{a.min()}, {a.max()}]; "
                                 "expected 16-bit values in [0, 65535]")
            a = a.astype(np.uint16)
        return Image.fromarray(_scale_to_uint8(a, what)).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA") and "transparency" in image.info or image.mode == "PA":
        image = image.convert("RGBA")
    return image.convert("RGB")


def to_pil_list(images: Images) -> list[Image.Image]:
    """A batch of images (one image, a list or tuple of them, or a ``[n, h, w, c]`` numpy array) as RGB PIL.

    Raises:
        ValueError: No images, or a bad image (named by its index).
        TypeError: A pixel tensor (it has no original to return) or an unknown type.
    """
    if isinstance(images, Tensor):
        raise TypeError("a pixel tensor has no original image; pass PIL images, paths or arrays")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (Image.Image, str, Path, np.ndarray)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be an image, a list or tuple of images, or a pixel tensor, "
                        f"got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("no images given")
    return [to_pil(im, f"image {i}") for i, im in enumerate(images)]


def check_pixels(pixels: Tensor) -> Float[Tensor, "batch channel height width"]:
    """A pixel tensor as ``[batch, c, h, w]`` float32, checked to look normalised.

    ``[c, h, w]`` becomes a batch of one; float64/half/bfloat16 become float32. Shape and size
    against the encoder are checked by the encoder itself. Unnormalised ``ToTensor`` pixels (values
    in [0, 1]) are not detected: normalised pixels can lie in [0, 1] too (see the module docstring).

    Raises:
        ValueError: Not 3-D/4-D, empty, an integer tensor, NaN/inf, or raw 0-255 values.
    """
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4:
        raise ValueError(f"a pixel tensor must be [batch, channels, height, width] or [channels, height, "
                         f"width], got shape {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError("no images given (a pixel tensor with batch size 0)")
    if not pixels.is_floating_point():
        raise ValueError(f"a pixel tensor must be float and normalised, got {pixels.dtype}; "
                         "pass PIL images (or paths or arrays) to model.preprocess(...) instead")
    if not torch.isfinite(pixels).all():
        raise ValueError("images contain NaN or infinite values")
    if pixels.numel() and pixels.abs().max() > _MAX_NORMALISED:
        raise ValueError(f"the pixel tensor holds values up to {float(pixels.abs().max()):.4g}: it looks "
                         "like raw 0-255 pixels, not normalised ones; pass PIL images (or paths or "
                         "arrays) to model.preprocess(...) to resize and normalise them")
    return pixels.float() if pixels.dtype != torch.float32 else pixels


def to_pixels(encoder, images: Images) -> Float[Tensor, "batch channel height width"]:
    """Any image input as ``encoder``'s normalised pixel tensor (on the CPU, or where a tensor was).

    Args:
        encoder: A vision encoder with ``preprocess(list_of_pil)`` and ``check_images(tensor)``.
        images: See the module docstring.
    """
    if isinstance(images, Tensor):
        pixels = check_pixels(images)
    elif isinstance(images, (list, tuple)) and images and all(isinstance(x, Tensor) for x in images):
        pixels = torch.cat([check_pixels(x) for x in images])
    else:
        pixels = encoder.preprocess(to_pil_list(images))
    encoder.check_images(pixels)
    return pixels
