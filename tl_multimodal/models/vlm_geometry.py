"""Where each image token of a Hugging Face VLM looks: its image, its view (tile, crop) and its box in the
ORIGINAL image's pixels, found by the processor and the model's own code rather than re-derived.

The trick is a *coordinate image*: an image of the original size whose three channels hold each pixel's
own ``x`` and ``y`` (as fractions of the width and height) and a constant 1. The model's image processor
resizes, pads, tiles and crops it exactly as it does a photo (resampling keeps linear ramps linear), so
after undoing its normalisation every pixel of ``pixel_values`` says which original pixel it came from,
and a padded pixel says it is padding (third channel far from 1). Each vision patch then gets a record
``(cx, cy, x0, y0, x1, y1, real, view)``; the architecture's own rearrangement of patches into tokens
is applied to these records:

* LLaVA-NeXT / LLaVA-OneVision: the model's ``pack_image_features`` (base view, anyres tiles, unpadding,
  OneVision's ``anyres_max`` down-sampling, one ``image_newline`` token per row; newlines come out as
  separators, ``is_patch`` False);
* Qwen2.5-VL: ``spatial_merge_size ** 2`` consecutive patches of ``pixel_values`` (dynamic resolution,
  ``image_grid_thw``) are one token;
* Gemma 3: each crop's patch grid average-pooled to ``mm_tokens_per_image`` tokens (pan-and-scan crops
  after the whole image);
* Idefics3 / SmolVLM: the connector's own ``pixel_shuffle`` on each tile and the global view (views that
  are all padding dropped, as the model drops them).

    geometry = image_token_geometry(hf_model, image_processor, [(640, 480)])
    heat = geometry.paint(values, image_index=0)      # [480, 640], NaN where no token looks
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

_N_FIELDS = 8  # cx, cy, x0, y0, x1, y1, real, view
_SLACK = 0.25  # pixels: resampling blurs the decoded box edges by a fraction of a pixel
_REAL = 0.75  # the coordinate image's third channel is 1 on real pixels; padding decodes to 0 or the mean


@dataclass(repr=False)
class ImageTokenGeometry:
    """Each image token of a batch (in the order of the image-token positions of ``input_ids``).

    Attributes:
        image_index: ``[n]`` which image the token belongs to.
        view: ``[n]`` which view of it (LLaVA-NeXT/OneVision: 0 base view, 1.. tiles; Gemma 3: 0 the
            whole image, 1.. pan-and-scan crops; Idefics3: the tiles, then the global view; Qwen: 0).
        box: ``[n, 4]`` ``(x0, y0, x1, y1)`` in original pixels (NaN for separators and padding).
        is_patch: ``[n]`` False for separator tokens (``image_newline``) and all-padding patches:
            units' patch statistics leave them out.
        image_sizes: Each image's original ``(width, height)``.
    """

    image_index: Int[Tensor, "n"]
    view: Int[Tensor, "n"]
    box: Float[Tensor, "n 4"]
    is_patch: Bool[Tensor, "n"]
    image_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.image_index)

    def __repr__(self) -> str:
        return (f"ImageTokenGeometry({len(self)} image tokens over {len(self.image_sizes)} images, "
                f"{int((~self.is_patch).sum())} separators, views per image "
                f"{[int(self.view[self.image_index == i].max()) + 1 for i in range(len(self.image_sizes))]})")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per image token: image_index, view, x0, y0, x1, y1, is_patch."""
        x0, y0, x1, y1 = self.box.T.tolist()
        return pd.DataFrame({"image_index": self.image_index.tolist(), "view": self.view.tolist(),
                             "x0": x0, "y0": y0, "x1": x1, "y1": y1, "is_patch": self.is_patch.tolist()})

    def paint(self, values: Float[Tensor, "n"], image_index: int = 0) -> Float[Tensor, "height width"]:
        """Per-token values as a heatmap over an original image: each pixel gets the mean value of the
        patch tokens whose box holds its centre (all views together), NaN where none does.

        Args:
            values: ``[n]`` one value per image token of the batch (separators are ignored).
            image_index: The image to paint.
        """
        if not isinstance(values, Tensor) or values.shape != (len(self),):
            raise ValueError(f"values must be a [{len(self)}] tensor (one per image token), "
                             f"got {tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}")
        if not 0 <= image_index < len(self.image_sizes):
            raise ValueError(f"image_index must be in [0, {len(self.image_sizes)}), got {image_index}")
        w, h = self.image_sizes[image_index]
        total, count = torch.zeros(h, w, dtype=torch.float64), torch.zeros(h, w, dtype=torch.float64)
        keep = (self.image_index == image_index) & self.is_patch & torch.isfinite(self.box).all(-1)
        for (x0, y0, x1, y1), v in zip(self.box[keep].tolist(), values.detach().cpu().double()[keep].tolist()):
            # pixels whose centre (i + 0.5) lies in [x0, x1], boxes widened by _SLACK: resampling error in the
            # decoded coordinates must not open a gap between neighbours (a shared edge pixel is averaged)
            c0, c1 = max(math.ceil(x0 - 0.5 - _SLACK), 0), min(math.floor(x1 - 0.5 + _SLACK) + 1, w)
            r0, r1 = max(math.ceil(y0 - 0.5 - _SLACK), 0), min(math.floor(y1 - 0.5 + _SLACK) + 1, h)
            total[r0:r1, c0:c1] += v
            count[r0:r1, c0:c1] += 1
        return (total / count).float()


# ------------------------------------------------------------------------------ the coordinate image
def coordinate_pixels(image_processor, size: tuple[int, int], **processor_kwargs) -> dict:
    """The image processor's output for a coordinate image of ``size = (width, height)``, plus under
    ``"coords"`` what :func:`_decode` needs to turn its ``pixel_values`` back into (x in original pixels,
    y in original pixels, realness) channels: the normalisation's mean and std and the image size."""
    w, h = size
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    image = torch.stack([x[None].expand(h, w), y[:, None].expand(h, w), torch.ones(h, w)])
    out = dict(image_processor(images=[image], do_rescale=False, return_tensors="pt", **processor_kwargs))
    mean = torch.as_tensor(image_processor.image_mean if getattr(image_processor, "do_normalize", True) else 0.0)
    std = torch.as_tensor(image_processor.image_std if getattr(image_processor, "do_normalize", True) else 1.0)
    out["coords"] = (mean, std, torch.tensor([w, h, 1.0]))
    return out


def _decode(pixels: Tensor, coords, channel_dim: int) -> Tensor:
    """Normalised pixels -> (x, y, real) with the channel axis at ``channel_dim``."""
    mean, std, scale = coords
    shape = [1] * pixels.ndim
    shape[channel_dim] = 3
    return (pixels.float() * std.reshape(shape) + mean.reshape(shape)) * scale.reshape(shape)


def patch_records(xyr: Float[Tensor, "view 3 height width"], patch: int) -> Float[Tensor, "view n_patches 8"]:
    """One record per vision patch (row-major) of decoded views: centre, box, realness (view index last)."""
    v, _, H, W = xyr.shape
    xyr = xyr[..., : H // patch * patch, : W // patch * patch]  # a strided conv drops the rest (SigLIP 384/14)
    cells = xyr.reshape(v, 3, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(v, (H // patch) * (W // patch), 3, patch * patch)
    return _records(cells, torch.arange(v, dtype=torch.float32)[:, None].expand(v, cells.shape[1]))


def _records(cells: Float[Tensor, "... 3 pixels"], view: Tensor) -> Float[Tensor, "... 8"]:
    real = cells[..., 2, :] > _REAL
    n = real.sum(-1).clamp(min=1)
    x, y = cells[..., 0, :], cells[..., 1, :]
    big = torch.tensor(float("inf"))
    x0, x1 = x.masked_fill(~real, big).amin(-1), x.masked_fill(~real, -big).amax(-1)
    y0, y1 = y.masked_fill(~real, big).amin(-1), y.masked_fill(~real, -big).amax(-1)
    # the sampled pixels are centres: widen by half a step (the patch is side x side samples)
    side = cells.shape[-1] ** 0.5
    hx, hy = (x1 - x0) / (2 * (side - 1)), (y1 - y0) / (2 * (side - 1))
    rec = torch.stack([(x * real).sum(-1) / n, (y * real).sum(-1) / n, x0 - hx, y0 - hy, x1 + hx, y1 + hy,
                       real.float().mean(-1), view.float()], -1)
    return _fill_empty(rec, real.any(-1), view)


def _fill_empty(rec: Tensor, any_real: Tensor, view: Tensor) -> Tensor:
    empty = torch.full_like(rec, float("nan"))
    empty[..., 6] = 0.0
    empty[..., 7] = view.float()
    return torch.where(any_real[..., None], rec, empty)


def merge_records(rec: Float[Tensor, "... k 8"]) -> Float[Tensor, "... 8"]:
    """Records of ``k`` patches that make one token: mean centre, union box, mean realness, first view."""
    real = rec[..., 6:7] > 0
    n = real.sum(-2).clamp(min=1)
    centre = torch.nan_to_num(rec[..., :2] * real).sum(-2) / n
    lo = torch.nan_to_num(rec[..., 2:4], nan=float("inf")).amin(-2)
    hi = torch.nan_to_num(rec[..., 4:6], nan=float("-inf")).amax(-2)
    out = torch.cat([centre, lo, hi, rec[..., 6:7].mean(-2), rec[..., 0, 7:8]], -1)
    out[..., :6] = torch.where(real.any(-2), out[..., :6], torch.full_like(out[..., :6], float("nan")))
    return out


def geometry_from_records(records: list[Float[Tensor, "n 8"]], image_sizes) -> ImageTokenGeometry:
    """Per-image token records (:func:`patch_records` order) -> an :class:`ImageTokenGeometry`."""
    rec = torch.cat(records)
    index = torch.cat([torch.full((len(r),), i) for i, r in enumerate(records)])
    is_patch = rec[:, 6] > 0
    box = torch.where(is_patch[:, None], rec[:, 2:6], torch.full_like(rec[:, 2:6], float("nan")))
    view = torch.where(is_patch, rec[:, 7].round(), torch.full_like(rec[:, 7], -1)).long()
    return ImageTokenGeometry(index, view, box, is_patch, [tuple(int(v) for v in s) for s in image_sizes])


def pool_records(rec: Float[Tensor, "view n_patches 8"], tokens_per_view: int) -> Float[Tensor, "view tokens 8"]:
    """Average-pool a square patch grid of records to ``tokens_per_view`` tokens (Gemma 3's projector)."""
    v, n, _ = rec.shape
    g, k = round(n ** 0.5), round(tokens_per_view ** 0.5)
    if g * g != n or k * k != tokens_per_view or g % k:
        raise ValueError(f"cannot pool a {n}-patch grid to {tokens_per_view} tokens")
    s = g // k
    cells = rec.reshape(v, k, s, k, s, _N_FIELDS).permute(0, 1, 3, 2, 4, 5).reshape(v, k * k, s * s, _N_FIELDS)
    return merge_records(cells)



# ------------------------------------------------------------------------------ per architecture
def _zero_nan(rec: Tensor) -> Tensor:
    """Records with all-padding patches' NaN boxes as 0 (realness 0 marks them), for code that mixes them."""
    return torch.nan_to_num(rec, nan=0.0)


def _llava_next(hf, out, size) -> Tensor:
    config = hf.config
    xyr = _decode(out["pixel_values"][0], out["coords"], 1)
    rec = _zero_nan(patch_records(xyr, config.vision_config.patch_size))
    newline = torch.zeros(_N_FIELDS)
    if config.model_type == "llava_onevision":
        packed, _ = hf.model.pack_image_features([rec], out["image_sizes"], image_newline=newline,
                                                 vision_aspect_ratio=config.vision_aspect_ratio)
    else:
        packed, _ = hf.model.pack_image_features([rec], out["image_sizes"], config.vision_feature_select_strategy,
                                                 image_newline=newline)
    return packed[0]


def _qwen2_5_vl(hf, out, size) -> Tensor:
    vc = hf.config.vision_config
    rows = out["pixel_values"]
    p, t = vc.patch_size, vc.temporal_patch_size
    cells = _decode(rows.reshape(len(rows), 3, t, p, p)[:, :, 0], out["coords"], 1).reshape(len(rows), 3, p * p)
    rec = _records(cells, torch.zeros(len(rows)))
    m = vc.spatial_merge_size ** 2
    return merge_records(rec.reshape(len(rows) // m, m, _N_FIELDS))


def _gemma3(hf, out, size) -> Tensor:
    config = hf.config
    xyr = _decode(out["pixel_values"], out["coords"], 1)
    rec = patch_records(xyr, config.vision_config.patch_size)
    return pool_records(rec, config.mm_tokens_per_image).reshape(-1, _N_FIELDS)


def _idefics3(hf, out, size) -> Tensor:
    config = hf.config
    pixels = out["pixel_values"][0]
    pixels = pixels[(pixels != 0).flatten(1).any(1)]  # the model drops all-padding views
    rec = patch_records(_decode(pixels, out["coords"], 1), config.vision_config.patch_size)
    s = config.scale_factor
    shuffled = hf.model.connector.pixel_shuffle(rec, s)
    return merge_records(shuffled.reshape(*shuffled.shape[:2], s * s, _N_FIELDS)).reshape(-1, _N_FIELDS)


_ARCHITECTURES = {"llava_next": _llava_next, "llava_onevision": _llava_next, "qwen2_5_vl": _qwen2_5_vl,
                  "gemma3": _gemma3, "idefics3": _idefics3, "smolvlm": _idefics3}
MODEL_TYPES = tuple(_ARCHITECTURES)


def image_token_geometry(hf_model, image_processor, image_sizes, **processor_kwargs) -> ImageTokenGeometry:
    """The :class:`ImageTokenGeometry` of images of the given sizes, as ``image_processor`` prepares them.

    Args:
        hf_model: The HF VLM (``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``, ``Gemma3ForConditionalGeneration``,
            ``Idefics3ForConditionalGeneration``); only its config and pure rearrangement code are used.
        image_processor: The processor's image processor.
        image_sizes: Each image's original ``(width, height)`` (``PIL.Image.size``), in batch order.
        **processor_kwargs: The options the batch was made with (e.g. ``do_pan_and_scan=True``).

    Returns:
        One record per image token, in the order of the image-token positions of the batch's ``input_ids``.

    Raises:
        ValueError: An architecture without geometry here, or a bad size.
    """
    kind = hf_model.config.model_type
    if kind not in _ARCHITECTURES:
        raise ValueError(f"no image-token geometry for model_type {kind!r} (known: {', '.join(MODEL_TYPES)})")
    sizes = [tuple(s) for s in image_sizes]
    if not sizes or any(len(s) != 2 or min(int(v) for v in s) <= 0 for s in sizes):
        raise ValueError(f"image_sizes must be positive (width, height) pairs, got {image_sizes!r}")
    records = [_ARCHITECTURES[kind](hf_model, coordinate_pixels(image_processor, s, **processor_kwargs), s)
               for s in sizes]
    return geometry_from_records(records, sizes)
