"""Where in the image does a unit fire? Patch-grid heatmaps, 95th-percentile masks, IoU with objects.

A unit's activations at the image positions form the encoder's patch grid (``model.vision.grid``,
row-major). The grid covers the *model input*: the image after timm's eval preprocessing (resize,
then center crop; ``model.vision.data_config``). :class:`CropGeometry` records that resize/crop for
an image of a given size, and :func:`grid_to_image` upsamples the grid bilinearly *in the input
frame* and reads it off at the original image's pixel centres, so the heatmap lies on the original
image. Pixels cut away by the crop were never seen by the model: their heatmap value is NaN, and
they are left out of percentiles and IoUs. (:func:`mask_to_input` goes the other way: an
original-image mask into the input frame.)

IoU with COCO: :func:`coco_category_mask` is the union of all instance masks of the category in
the image (crowd annotations included), via ``pycocotools``' ``annToMask``.

    hm = unit_heatmap(model, pil_image, layer=5, unit=1234)
    obj = coco_category_mask(coco, image_id, "dog")
    hm.iou(obj), hm.plot(obj)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from PIL import Image
from torch import Tensor

from tl_multimodal.probe import Probe
from tl_multimodal.units import as_units, mlp_act_name, mlp_hook
from tl_multimodal.vlm import VisionLM, soft_prompts

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


def _geometry(model: VisionLM, image: Image.Image | None) -> CropGeometry:
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


# ---------------------------------------------------------------------------------- masks and IoU
def activation_mask(heatmap: Float[Tensor, "... height width"], q: float = 95.0) -> Bool[Tensor, "... height width"]:
    """Pixels at or above the ``q``-th percentile of the heatmap (NaN pixels: never; excluded from the percentile)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be a percentile in [0, 100], got {q}")
    flat = heatmap.reshape(*heatmap.shape[:-2], -1).double()
    thr = torch.nanquantile(flat, q / 100, dim=-1, keepdim=True)
    return (flat >= thr).reshape(heatmap.shape)


def mask_iou(pred: Bool[Tensor, "height width"], target: Bool[Tensor, "height width"] | np.ndarray,
             valid: Bool[Tensor, "height width"] | None = None) -> float:
    """Intersection over union of two masks, counting only ``valid`` pixels; NaN if both are empty."""
    target = torch.as_tensor(np.asarray(target) if not isinstance(target, Tensor) else target).bool().cpu()
    pred = pred.bool().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"masks differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if valid is not None:
        valid = valid.bool().cpu()
        pred, target = pred & valid, target & valid
    union = (pred | target).sum().item()
    return float("nan") if union == 0 else (pred & target).sum().item() / union


def coco_category_mask(coco, image_id: int, category: int | str,
                       image_size: tuple[int, int] | None = None) -> Bool[Tensor, "height width"]:
    """Union of the instance masks of one category in one COCO image.

    Args:
        coco: A ``pycocotools.coco.COCO`` (or the path of an instances json to load).
        image_id: The COCO image id.
        category: Category id or name (e.g. ``"dog"``).
        image_size: The image's ``(width, height)`` (``PIL.Image.size``); needed only when the
            annotation file's image entry has no ``width``/``height`` (trimmed files), and checked
            against it otherwise.

    Returns:
        ``[height, width]`` in original image pixels; all False if the category is absent.
        Crowd (RLE) annotations are included. Masks come from ``coco.annToMask``, or from the same
        ``pycocotools.mask`` calls with ``image_size`` when the entry has no size.
    """
    if not hasattr(coco, "annToMask"):
        from pycocotools.coco import COCO

        coco = COCO(str(coco))
    if isinstance(category, str):
        ids = coco.getCatIds(catNms=[category])
        if not ids:
            raise ValueError(f"unknown COCO category {category!r}")
        category = ids[0]
    if image_id not in coco.imgs:
        raise ValueError(f"image id {image_id} is not in this COCO annotation file")
    info = coco.imgs[image_id]
    has_size = "height" in info and "width" in info
    if has_size:
        w, h = info["width"], info["height"]
        if image_size is not None and tuple(image_size) != (w, h):
            raise ValueError(f"image_size {tuple(image_size)} differs from the annotation's {(w, h)} (width, height)")
    elif image_size is None:
        raise ValueError(f"the annotation file gives no size for image {image_id}; pass image_size=(width, height)")
    else:
        w, h = image_size
    mask = np.zeros((h, w), dtype=bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[category], iscrowd=None)):
        mask |= (coco.annToMask(ann) if has_size else _ann_to_mask(ann, h, w)).astype(bool)
    return torch.from_numpy(mask)


def _ann_to_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """``COCO.annToMask`` for an image of known size (polygons, RLE or compressed RLE)."""
    from pycocotools import mask as mask_utils

    segm = ann["segmentation"]
    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle)


# ---------------------------------------------------------------------------------- model -> grids
@torch.no_grad()
def unit_grid_activations(model: VisionLM, images=None, units=None, hook: str = "post", batch_size: int = 16, *,
                          image_features: Tensor | None = None, image_embed: Tensor | None = None,
                          probe: Probe | None = None) -> Float[Tensor, "batch n_units rows cols"]:
    """Activations of MLP units at the image slots, as patch grids.

    Without ``probe`` the model runs on the image slots alone (``to_tokens("", image=True)``; text
    after the image cannot change them under causal attention), up to the last layer needed; with
    ``probe`` it runs on the probe's tokens and reads each row's image slots.

    Args:
        model: The vision LM.
        images, image_features, image_embed: The images (anything ``model.preprocess`` takes), their
            encoder features or their soft prompts: exactly one.
        units: ``(layer, unit)`` rows, ``[n, 2]`` for all images or ``[batch, n, 2]``.
        hook: ``"post"`` (the activation; default) or ``"pre"`` (what attribution scores).
        batch_size: Images per forward pass.
        probe: Run on these tokens (e.g. ``attr.probe``) instead of the image slots alone.
    """
    short = mlp_hook(model, hook)
    emb = soft_prompts(model, images, image_features, image_embed)
    if units is None:
        raise ValueError("pass units=: (layer, unit) rows")
    u = as_units(model, units)
    per_image = u if u.ndim == 3 else u[None].expand(len(emb), -1, -1)
    if per_image.shape[0] != len(emb):
        raise ValueError(f"per-image units for {per_image.shape[0]} images, but {len(emb)} images given")
    if probe is None:
        tokens = model.to_tokens("", image=True).expand(len(emb), -1)
        mask = model.image_mask(tokens)
    else:
        probe.check_batch(len(emb))
        tokens, mask = probe.tokens.to(model.cfg.device), probe.image_mask
    layers = sorted(set(per_image[..., 0].flatten().tolist()))
    names = [mlp_act_name(short, layer) for layer in layers]
    out = []
    for start in range(0, len(emb), batch_size):
        rows = slice(start, start + batch_size)
        cu = per_image[rows]
        if not layers:
            out.append(torch.zeros(len(cu), 0, model.n_image_tokens))
            continue
        _, cache = model.run_with_cache(tokens[rows], image_embed=emb[rows], names_filter=names,
                                        stop_at_layer=layers[-1] + 1)
        m = mask[rows].to(cache[names[0]].device)
        acts = torch.stack([cache[n][m].reshape(len(cu), -1, model.cfg.d_mlp).float().cpu() for n in names], 1)
        li = torch.tensor([layers.index(v) for v in cu[..., 0].flatten().tolist()]).reshape(cu.shape[:2])
        b = torch.arange(len(cu))[:, None]
        out.append(acts[b, li, :, cu[..., 1]])  # [b, n, patch]
    return torch.cat(out).reshape(len(emb), per_image.shape[1], *model.vision.grid)


# ---------------------------------------------------------------------------------- results
@dataclass(repr=False)
class UnitHeatmap:
    """One unit's activation over one image.

    Attributes:
        layer, unit: The MLP unit.
        grid: ``[rows, cols]`` activations at the image patches.
        heatmap: ``[height, width]`` the grid upsampled onto the original image (NaN outside the crop).
        geometry: The resize/crop that maps the two.
        image: The original image, if given as PIL.
    """

    layer: int
    unit: int
    grid: Float[Tensor, "rows cols"]
    heatmap: Float[Tensor, "height width"]
    geometry: CropGeometry
    image: Image.Image | None = None

    def mask(self, q: float = 95.0) -> Bool[Tensor, "height width"]:
        """Pixels at or above the ``q``-th percentile of the (visible part of the) heatmap."""
        return activation_mask(self.heatmap, q)

    def iou(self, object_mask, q: float = 95.0) -> float:
        """IoU of :meth:`mask` with an object mask in original pixels, over the visible (cropped) area."""
        return mask_iou(self.mask(q), object_mask, valid=torch.isfinite(self.heatmap))

    def plot(self, object_mask=None, q: float = 95.0, ax=None):
        """The heatmap over the image, with the ``q``-th percentile mask (and the object) outlined."""
        return plot_heatmap(self.image, self.heatmap, mask=self.mask(q), object_mask=object_mask, ax=ax,
                            title=f"L{self.layer}.{self.unit}")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per patch: row, col, activation."""
        rows, cols = self.grid.shape
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        return pd.DataFrame({"row": r.flatten().tolist(), "col": c.flatten().tolist(),
                             "activation": self.grid.flatten().tolist()})

    def __repr__(self) -> str:
        (w, h), (rows, cols) = self.geometry.image_size, self.grid.shape
        return (f"UnitHeatmap(L{self.layer}.{self.unit}, {rows}x{cols} grid on a {w}x{h} image, "
                f"max {self.grid.max():.3g} at patch {divmod(int(self.grid.argmax()), cols)})")


def unit_heatmap(model: VisionLM, image, layer: int, unit: int, hook: str = "post") -> UnitHeatmap:
    """The heatmap of MLP unit ``(layer, unit)`` on one image (PIL or a path: original coordinates;
    a pixel tensor ``[channel, h, w]`` or an array: the model-input frame)."""
    pil, pixels = one_image(model, image)
    grid = unit_grid_activations(model, pixels, [(layer, unit)], hook)[0, 0]
    geo = _geometry(model, pil)
    return UnitHeatmap(layer, unit, grid, grid_to_image(grid, geo), geo, pil)


def one_image(model: VisionLM, image) -> tuple[Image.Image | None, Float[Tensor, "1 channel height width"]]:
    """One image, through the door once: its original (PIL, when given as PIL or a path) and its pixels."""
    from tl_multimodal.images import to_pil

    if isinstance(image, (list, tuple)) or (isinstance(image, (Tensor, np.ndarray)) and image.ndim == 4):
        if len(image) != 1:
            raise ValueError(f"pass one image, got {len(image)}")
        image = image[0]
    pil = to_pil(image) if isinstance(image, (Image.Image, str, Path)) else None
    return pil, model.preprocess([pil] if pil is not None else image)


@dataclass(repr=False)
class HeatmapIoUs:
    """IoU of each unit's ``q``-th percentile mask with the object mask, per image.

    Attributes:
        units: ``[batch, n, 2]`` (layer, unit) per image.
        iou: ``[batch, n]``.
        q: The percentile.
    """

    units: Int[Tensor, "batch n 2"]
    iou: Float[Tensor, "batch n"]
    q: float

    def to_dataframe(self) -> pd.DataFrame:
        b, n = self.iou.shape
        return pd.DataFrame({"image": np.repeat(np.arange(b), n), "layer": self.units[..., 0].flatten().tolist(),
                             "unit": self.units[..., 1].flatten().tolist(), "iou": self.iou.flatten().tolist()})

    def __repr__(self) -> str:
        return (f"HeatmapIoUs({self.iou.shape[0]} images x {self.iou.shape[1]} units, q={self.q:g}: "
                f"mean IoU {self.iou.nanmean():.3f})")


def heatmap_ious(model: VisionLM, images: Sequence[Image.Image], units, object_masks,
                 q: float = 95.0, hook: str = "post", batch_size: int = 16) -> HeatmapIoUs:
    """IoU of unit heatmaps (at the ``q``-th percentile) with object masks, image by image.

    Args:
        model: The vision-prefixed model.
        images: Original PIL images (a pixel tensor: masks must then be in the input frame).
        units: ``[n, 2]`` for all images, or ``[batch, n, 2]`` (e.g. each image's top units, or
            ``patching.sample_matched_units`` of them as the baseline).
        object_masks: One ``[height, width]`` mask per image, in original pixels
            (:func:`coco_category_mask`).
        q: Percentile of the activation mask (METHOD.md: 95).
        hook: MLP hook (see :func:`unit_grid_activations`).
        batch_size: Images per forward pass.
    """
    if len(object_masks) != len(images):
        raise ValueError(f"{len(object_masks)} object masks for {len(images)} images")
    grids = unit_grid_activations(model, images, units, hook, batch_size)  # [b, n, rows, cols]
    ious = torch.full(grids.shape[:2], float("nan"))
    for i, (grid, obj) in enumerate(zip(grids, object_masks)):
        hm = grid_to_image(grid, _geometry(model, images[i]))
        masks = activation_mask(hm, q)
        valid = torch.isfinite(hm[0]) if len(hm) else None
        ious[i] = torch.tensor([mask_iou(m, obj, valid) for m in masks])
    u = as_units(model, units)
    return HeatmapIoUs(units=u if u.ndim == 3 else u[None].expand(len(images), -1, -1), iou=ious, q=q)


def plot_heatmap(image: Image.Image | None, heatmap: Float[Tensor, "height width"], mask=None, object_mask=None,
                 alpha: float = 0.5, cmap: str = "jet", title: str | None = None, ax=None):
    """Overlay a heatmap (original image coordinates) on its image; outline masks.

    Args:
        image: The original image (``None``: the heatmap alone).
        heatmap: ``[height, width]``; NaN pixels (cropped away) stay transparent.
        mask: The activation mask, outlined in white.
        object_mask: The object mask, outlined in lime.
        alpha, cmap: Heatmap opacity and colormap.
        title: Axes title.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(5, 5))
    ax = ax if ax is not None else fig.add_subplot()
    hm = heatmap.detach().float().cpu().numpy()
    if image is not None:
        if image.size != (hm.shape[1], hm.shape[0]):
            raise ValueError(f"heatmap is {hm.shape[1]}x{hm.shape[0]} but the image is {image.size[0]}x{image.size[1]}")
        ax.imshow(image)
    im = ax.imshow(np.ma.masked_invalid(hm), cmap=cmap, alpha=alpha if image is not None else 1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for m, color in ((mask, "white"), (object_mask, "lime")):
        if m is not None:
            ax.contour(np.asarray(m, dtype=float), levels=[0.5], colors=color, linewidths=1.5)
    if title:
        ax.set_title(title)
    ax.set_axis_off()
    fig.tight_layout()
    return fig
