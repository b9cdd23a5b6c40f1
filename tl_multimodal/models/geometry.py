"""Crop geometry: where the model input sits in an original image, and moving grids and masks between
the two frames.

A unit's activations at the image slots form the encoder's patch grid (``model.vision.grid``,
row-major) over the *model input*: the image after timm's eval preprocessing (resize, then center
crop; ``model.vision.data_config``). :class:`CropGeometry` records that resize/crop for an image of a
given size; :func:`grid_to_image` upsamples a grid bilinearly *in the input frame* and reads it off
at the original image's pixel centres (NaN where the crop cut the image away); :func:`mask_to_input`
takes an original-image mask into the input frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from PIL import Image
from torch import Tensor

_DEFAULT_CROP_PCT = 0.875  # timm's default when a data config has none


# ---------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CropGeometry:
    """Where the model input sits in an original image (timm eval preprocessing).

    Attributes:
        image_size: Original ``(width, height)``.
        resized: ``(width, height)`` after the resize step.
        crop: ``(left, top, width, height)`` of the crop in resized pixels (= the model input size).
    """

    image_size: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]

    @classmethod
    def from_data_config(cls, data_config: dict, image_size: tuple[int, int]) -> "CropGeometry":
        """The geometry of ``timm.data.create_transform(**data_config)`` (eval) on an image.

        Supports timm's ``crop_mode`` ``"center"`` (resize the short side to ``size / crop_pct``,
        keep the aspect ratio, center crop) and ``"squash"`` (resize both sides, center crop).

        Args:
            data_config: A timm data config (``model.vision.data_config``).
            image_size: The original ``(width, height)`` (``PIL.Image.size``).
        """
        w, h = (int(v) for v in image_size)
        if w <= 0 or h <= 0:
            raise ValueError(f"image_size must be a positive (width, height), got {image_size}")
        if data_config.get("crop_border_pixels"):
            raise ValueError("crop_border_pixels is not supported")
        _, H, W = data_config["input_size"]
        pct = data_config.get("crop_pct") or _DEFAULT_CROP_PCT
        mode = data_config.get("crop_mode") or "center"
        sh, sw = math.floor(H / pct), math.floor(W / pct)
        if mode == "squash":
            rw, rh = sw, sh
        elif mode == "center" and sh == sw:  # torchvision Resize(int): the short side becomes sh
            short, long = min(w, h), max(w, h)
            new_long = int(sh * long / short)
            rw, rh = (sh, new_long) if w <= h else (new_long, sh)
        elif mode == "center":  # timm ResizeKeepRatio(longest=0)
            ratio = min(h / sh, w / sw)
            rh, rw = round(h / ratio), round(w / ratio)
        else:
            raise ValueError(f"crop_mode {mode!r} is not supported (only 'center' and 'squash')")
        # torchvision center_crop (pads symmetrically first if the image is smaller than the crop)
        left = int(round((rw - W) / 2.0)) if rw >= W else -((W - rw) // 2)
        top = int(round((rh - H) / 2.0)) if rh >= H else -((H - rh) // 2)
        return cls(image_size=(w, h), resized=(rw, rh), crop=(left, top, W, H))

    @classmethod
    def identity(cls, size: tuple[int, int]) -> "CropGeometry":
        """The geometry of an image that already is the model input (``(width, height)``)."""
        w, h = size
        return cls(image_size=(w, h), resized=(w, h), crop=(0, 0, w, h))

    def to_input(self, x, y):
        """Original-image coordinates -> model-input coordinates (continuous; pixel i spans [i, i+1))."""
        (w, h), (rw, rh), (left, top, _, _) = self.image_size, self.resized, self.crop
        return x * rw / w - left, y * rh / h - top

    def to_original(self, x, y):
        """Model-input coordinates -> original-image coordinates (continuous)."""
        (w, h), (rw, rh), (left, top, _, _) = self.image_size, self.resized, self.crop
        return (x + left) * w / rw, (y + top) * h / rh

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The model input as ``(x0, y0, x1, y1)`` in original-image coordinates."""
        x0, y0 = self.to_original(0, 0)
        x1, y1 = self.to_original(self.crop[2], self.crop[3])
        return x0, y0, x1, y1


def input_geometry(model, image: Image.Image | None) -> CropGeometry:
    """Where the model input sits in ``image`` (PIL: timm's resize/crop; ``None`` or pixels: the input itself)."""
    if isinstance(image, Image.Image):
        return CropGeometry.from_data_config(model.vision.data_config, image.size)
    _, H, W = model.vision.input_size
    return CropGeometry.identity((W, H))


# ---------------------------------------------------------------------------------- grids -> images
def upsample_grid(grid: Float[Tensor, "... rows cols"], size: tuple[int, int]) -> Float[Tensor, "... height width"]:
    """Bilinear upsampling of patch grids to ``size = (height, width)`` (the model-input frame).

    ``F.interpolate(mode="bilinear", align_corners=False)``: patch centres sit at the centres of
    the image areas they cover.
    """
    lead = grid.shape[:-2]
    flat = grid.reshape(1, -1, *grid.shape[-2:]).float()
    return F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False).reshape(*lead, *size)


def grid_to_image(grid: Float[Tensor, "... rows cols"], geometry: CropGeometry) -> Float[Tensor, "... height width"]:
    """A patch grid as a heatmap over the original image (NaN where the crop cut the image away).

    Equals ``upsample_grid(grid, input size)`` (bilinear, ``align_corners=False``) evaluated at
    the original pixels' centres mapped into the input frame through the resize and crop, in one
    resampling (``F.grid_sample`` with border padding, which is what ``F.interpolate`` does at the
    edges).
    """
    (w, h), (_, _, cw, ch) = geometry.image_size, geometry.crop
    x, y = geometry.to_input(torch.arange(w, dtype=torch.float64) + 0.5, torch.arange(h, dtype=torch.float64) + 0.5)
    xn, yn = 2 * x / cw - 1, 2 * y / ch - 1  # normalised input coords, align_corners=False
    sample = torch.stack(torch.meshgrid(xn, yn, indexing="xy"), -1)[None].float()  # [1, h, w, 2] as (x, y)
    lead = grid.shape[:-2]
    flat = grid.reshape(1, -1, *grid.shape[-2:]).float()
    out = F.grid_sample(flat, sample.to(flat.device), mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((x >= 0) & (x < cw))[None, :] & ((y >= 0) & (y < ch))[:, None]
    out = out.masked_fill(~inside.to(out.device), float("nan"))
    return out.reshape(*lead, h, w)


def mask_to_input(mask: Bool[Tensor, "height width"] | np.ndarray, geometry: CropGeometry) -> Bool[Tensor, "h_in w_in"]:
    """An original-image mask in the model-input frame: resized (bilinear, > 0.5) and cropped as the pixels are."""
    m = torch.as_tensor(np.asarray(mask)).float()
    (w, h), (rw, rh), (left, top, cw, ch) = geometry.image_size, geometry.resized, geometry.crop
    if tuple(m.shape) != (h, w):
        raise ValueError(f"mask is {tuple(m.shape)} (h, w) but the image is {(h, w)}")
    r = F.interpolate(m[None, None], size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)[0, 0] > 0.5
    out = torch.zeros(ch, cw, dtype=torch.bool)
    ys, xs = slice(max(top, 0), min(top + ch, rh)), slice(max(left, 0), min(left + cw, rw))
    out[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left] = r[ys, xs]
    return out
