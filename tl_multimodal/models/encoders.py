"""Frozen vision encoders that turn images into a grid of patch features: timm and HF transformers.

ViT-family models (BEiT, ViT, CLIP, SigLIP, ...) give their patch tokens with the CLS/prefix tokens
dropped; CNNs give their last feature map flattened row by row. Either way the result is
``[batch, patch, d_img]`` plus the ``(rows, cols)`` grid the patches came from, which heatmaps use.

* :class:`VisionEncoder` wraps a timm model (``VisionEncoder.from_timm("beit_base_patch16_224")``).
* :class:`HFVisionEncoder` wraps HF transformers' ``BeitModel``, ``CLIPVisionModel`` or
  ``SiglipVisionModel``: LiMBeR's BEiT is ``HFVisionEncoder.from_pretrained(
  "microsoft/beit-large-patch16-224-pt22k")`` (``last_hidden_state[:, 1:]``, 196 x 1024); LLaVA-1.5's
  tower is ``HFVisionEncoder.from_pretrained("openai/clip-vit-large-patch14-336", feature_layer=-2)``
  (penultimate hidden state, CLS dropped). The model's own image-processor settings are written as
  a timm data config, so preprocessing and heatmap geometry read them like a timm encoder's.
"""

from __future__ import annotations

import math
from typing import Sequence

import timm
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor, nn

from tl_multimodal._validate import check_int

# PIL resampling codes (what HF image processors store) -> timm interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class _FrozenEncoder(nn.Module):
    """What every encoder shares: frozen eval mode, timm preprocessing from ``data_config``, checks.

    Subclasses set ``model``, ``model_name``, ``d_img``, ``grid`` and call :meth:`_set_data_config`.
    """

    model: nn.Module
    model_name: str
    d_img: int
    grid: tuple[int, int]

    def _set_data_config(self, data_config: dict) -> None:
        self.data_config = data_config
        self.input_size: tuple[int, int, int] = tuple(data_config["input_size"])
        self._transform = timm.data.create_transform(**data_config)

    @property
    def n_patches(self) -> int:
        """Patches per image: ``rows * cols`` of :attr:`grid`."""
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout/batch-norm statistics never change
        return self

    def preprocess(self, images: Sequence[Image.Image] | Image.Image) -> Float[Tensor, "batch 3 h w"]:
        """Resize, crop and normalise PIL images with the transform of :attr:`data_config`."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def check_images(self, images: Tensor) -> None:
        """Raise a ValueError naming the problem if ``images`` cannot go into this encoder."""
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [batch, channels, height, width], got "
                             f"{type(images).__name__}{'' if not isinstance(images, Tensor) else ' ' + str(images.dtype)}"
                             "; use model.preprocess(pil_images)")
        if images.ndim != 4:
            raise ValueError(f"images must have 4 dims [batch, channels, height, width], got shape "
                             f"{tuple(images.shape)}")
        c, h, w = self.input_size
        if images.shape[1] != c:
            raise ValueError(f"{self.model_name} takes {c}-channel images, got {images.shape[1]} channels")
        if tuple(images.shape[2:]) != (h, w):
            raise ValueError(f"{self.model_name} takes {h}x{w} images, got {images.shape[2]}x{images.shape[3]}"
                             "; use model.preprocess(pil_images) to resize")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")


class VisionEncoder(_FrozenEncoder):
    """A frozen timm model that maps images to patch features.

    Args:
        model: A timm model (``timm.create_model(...)``). Its weights are frozen and it stays in
            eval mode, whatever mode the parent module is put in.
        name: The name recorded in projection checkpoints; defaults to the timm architecture.
        data_config: Preprocessing in timm's format, replacing the model's own (e.g. the transform a
            projection was trained with); default ``timm.data.resolve_data_config({}, model=model)``.

    Attributes:
        model_name: Encoder name (e.g. ``"beit_base_patch16_224"``). (Not ``name``: TransformerLens's
            ``setup()`` sets ``.name`` of every submodule to its path in the model.)
        d_img: Width of one patch feature.
        grid: ``(rows, cols)`` of the patch grid; ``n_patches = rows * cols``.
        input_size: The ``(channels, height, width)`` the encoder expects.
        data_config: timm's preprocessing config (mean, std, interpolation, crop).
    """

    def __init__(self, model: nn.Module, name: str | None = None, data_config: dict | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_name = name or model.pretrained_cfg.get("architecture", type(model).__name__)
        if data_config is None:
            data_config = timm.data.resolve_data_config({}, model=model)
            img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
            if img_size is not None:  # a ViT built at another resolution than its pretrained config
                data_config["input_size"] = (data_config["input_size"][0], *img_size)
        self._set_data_config(dict(data_config))
        self._n_prefix = getattr(model, "num_prefix_tokens", 0)
        with torch.no_grad():
            raw = model.forward_features(torch.zeros(1, *self.input_size))
        if raw.ndim == 4:  # CNN: [batch, channels, rows, cols]
            self.d_img, self.grid = raw.shape[1], tuple(raw.shape[2:])
        elif raw.ndim == 3:  # ViT: [batch, prefix + rows * cols, d]
            self.d_img = raw.shape[2]
            self.grid = tuple(model.patch_embed.grid_size)
        else:
            raise ValueError(f"{self.model_name}: forward_features gave shape {tuple(raw.shape)}; "
                             "expected [B, C, H, W] (CNN) or [B, tokens, d] (ViT)")

    @classmethod
    def from_timm(cls, name: str, pretrained: bool = True, data_config: dict | None = None,
                  **kwargs) -> "VisionEncoder":
        """Build an encoder with ``timm.create_model(name, pretrained=pretrained, **kwargs)``."""
        return cls(timm.create_model(name, pretrained=pretrained, **kwargs), name=name, data_config=data_config)

    def forward(self, images: Float[Tensor, "batch channel h w"]) -> Float[Tensor, "batch patch d_img"]:
        """Encode preprocessed images into ``[batch, patch, d_img]`` features (row-major grid)."""
        self.check_images(images)
        feats = self.model.forward_features(images.to(next(self.model.parameters()).dtype))  # pixels follow the weights
        if feats.ndim == 4:
            return feats.flatten(2).transpose(1, 2)
        return feats[:, self._n_prefix:]


def data_config_from_processor(processor) -> dict:
    """A HF image processor's eval settings as a timm data config (``timm.data.create_transform``).

    ``size={"height", "width"}`` (BEiT, SigLIP) becomes timm's ``"squash"`` resize, optionally followed
    by a center crop; ``size={"shortest_edge"}`` + center crop (CLIP, LLaVA) becomes timm's
    ``"center"`` mode (short side resized to ``shortest_edge``, then a center crop).

    Args:
        processor: A HF image processor, or its ``to_dict()``.

    Raises:
        ValueError: Settings timm's eval transform cannot express (no resize, padding to a square,
            a rescale other than 1/255, a shortest-edge resize without a square crop, a crop of another aspect ratio).
    """
    d = processor if isinstance(processor, dict) else processor.to_dict()
    name = d.get("image_processor_type", "image processor")
    if d.get("do_pad"):
        raise ValueError(f"{name}: do_pad=True (pad to a square first) has no timm equivalent here")
    if not d.get("do_resize", True):
        raise ValueError(f"{name}: do_resize=False (images of any size) cannot give a fixed patch grid")
    if d.get("do_rescale", True) and not math.isclose(d.get("rescale_factor", 1 / 255), 1 / 255):
        raise ValueError(f"{name}: rescale_factor={d['rescale_factor']} is not 1/255")
    resample = int(d.get("resample", 3))
    if resample not in _RESAMPLE:
        raise ValueError(f"{name}: unknown resample {resample!r}")
    size, crop = d["size"], d.get("crop_size") if d.get("do_center_crop", False) else None
    if "shortest_edge" in size:
        if crop is None or crop["height"] != crop["width"]:
            raise ValueError(f"{name}: a shortest_edge resize needs a square center crop, got crop {crop}")
        short, side = size["shortest_edge"], crop["height"]
        mode, input_hw = "center", (side, side)
        crop_pct = side / short
        if math.floor(side / crop_pct) != short:  # float rounding: timm floors side / crop_pct
            crop_pct = side / (short + 1e-6)
    elif "height" in size and "width" in size:
        h, w = size["height"], size["width"]
        mode, input_hw = "squash", (h, w) if crop is None else (crop["height"], crop["width"])
        crop_pct = input_hw[0] / h
        if not math.isclose(input_hw[1] / w, crop_pct):
            raise ValueError(f"{name}: crop {input_hw} of a {h}x{w} resize has another aspect ratio")
    else:
        raise ValueError(f"{name}: size {size} is neither {{'height', 'width'}} nor {{'shortest_edge'}}")
    normalize = d.get("do_normalize", True)
    return {"input_size": (3, *input_hw), "interpolation": _RESAMPLE[resample],
            "mean": tuple(d["image_mean"]) if normalize else (0.0, 0.0, 0.0),
            "std": tuple(d["image_std"]) if normalize else (1.0, 1.0, 1.0),
            "crop_pct": crop_pct, "crop_mode": mode}


def _default_processor(config):
    """The image processor a HF vision config's checkpoints ship with, at the config's image size."""
    import transformers

    s = config.image_size
    if config.model_type == "beit":
        return transformers.BeitImageProcessor(size={"height": s, "width": s}, do_center_crop=False)
    if config.model_type in ("clip_vision_model", "clip"):
        return transformers.CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    if config.model_type in ("siglip_vision_model", "siglip"):
        return transformers.SiglipImageProcessor(size={"height": s, "width": s})
    raise ValueError(f"no default image processor for model_type {config.model_type!r}; pass image_processor=")


class HFVisionEncoder(_FrozenEncoder):
    """A frozen HF transformers ViT (``BeitModel``, ``CLIPVisionModel``, ``SiglipVisionModel``).

    Features are ``last_hidden_state`` (``feature_layer=None``, LiMBeR's BEiT) or
    ``hidden_states[feature_layer]`` (LLaVA-1.5: ``-2``; ``hidden_states[0]`` is the embedding output),
    with the prefix tokens (CLS; none for SigLIP) dropped, so one feature per patch of the grid.

    Args:
        model: The HF vision model; frozen and kept in eval mode.
        feature_layer: ``None`` for ``last_hidden_state``, else an index into ``hidden_states``.
        image_processor: The model's HF image processor (or its ``to_dict()``); ``None`` uses the
            processor class the model family ships with, at ``config.image_size``.
        name: The name recorded in projection checkpoints; default ``config._name_or_path`` (or the
            model type), with ``":layer<k>"`` appended for a selected layer.

    Attributes:
        model_name, d_img, grid, input_size, data_config: As for :class:`VisionEncoder`.
        feature_layer: The selected layer (``None``: last hidden state).
        n_prefix: Prefix tokens dropped from the model's output.
    """

    def __init__(self, model: nn.Module, feature_layer: int | None = None, image_processor=None,
                 name: str | None = None):
        super().__init__()
        config = model.config
        n_states = config.num_hidden_layers + 1
        if feature_layer is not None:  # an index into the hidden_states: the embeddings, then each layer's output
            check_int(feature_layer, "feature_layer", minimum=-n_states, maximum=n_states - 1)
        self.model = model.eval().requires_grad_(False)
        self.feature_layer = feature_layer
        base = name or getattr(config, "_name_or_path", "") or config.model_type
        self.model_name = base if feature_layer is None else f"{base}:layer{feature_layer}"
        self._set_data_config(data_config_from_processor(image_processor or _default_processor(config)))
        patch = config.patch_size
        _, h, w = self.input_size
        if h % patch or w % patch:
            raise ValueError(f"{self.model_name}: input {h}x{w} is not a multiple of patch_size {patch}")
        self.grid = (h // patch, w // patch)
        with torch.no_grad():
            tokens = self._hidden(torch.zeros(1, *self.input_size))
        self.n_prefix = tokens.shape[1] - self.n_patches
        if self.n_prefix < 0:
            raise ValueError(f"{self.model_name} gave {tokens.shape[1]} tokens for a {self.grid} patch grid")
        self.d_img = tokens.shape[2]

    @classmethod
    def from_pretrained(cls, name: str = "microsoft/beit-large-patch16-224-pt22k",
                        feature_layer: int | None = None, **kwargs) -> "HFVisionEncoder":
        """Download a HF vision model and its image processor (needs the hub).

        ``BeitModel`` for ``beit`` checkpoints, the vision tower of ``clip``/``siglip`` ones.

        Args:
            name: A hub name, e.g. LiMBeR's ``"microsoft/beit-large-patch16-224-pt22k"`` or LLaVA-1.5's
                ``"openai/clip-vit-large-patch14-336"`` (with ``feature_layer=-2``).
            feature_layer: See the class.
            **kwargs: Passed to the model's ``from_pretrained`` (``torch_dtype``, ``revision``, ...).
        """
        import transformers

        model_type = transformers.AutoConfig.from_pretrained(name).model_type
        classes = {"beit": transformers.BeitModel, "clip": transformers.CLIPVisionModel,
                   "clip_vision_model": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel,
                   "siglip_vision_model": transformers.SiglipVisionModel}
        if model_type not in classes:
            raise ValueError(f"{name} is a {model_type!r} model; supported: {sorted(classes)}")
        model = classes[model_type].from_pretrained(name, **kwargs)
        processor = transformers.AutoImageProcessor.from_pretrained(name)
        return cls(model, feature_layer=feature_layer, image_processor=processor, name=name)

    def _hidden(self, pixels: Tensor) -> Float[Tensor, "batch token d_img"]:
        if self.feature_layer is None:
            return self.model(pixel_values=pixels).last_hidden_state
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.feature_layer]

    def forward(self, images: Float[Tensor, "batch channel h w"]) -> Float[Tensor, "batch patch d_img"]:
        """Encode preprocessed images into ``[batch, patch, d_img]`` features (row-major grid)."""
        self.check_images(images)
        return self._hidden(images.to(self.model.dtype))[:, self.n_prefix:]
