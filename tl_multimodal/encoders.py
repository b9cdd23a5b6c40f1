"""Frozen timm vision encoders that turn images into a grid of patch features.

ViT-family models (BEiT, ViT, DeiT, ...) give their patch tokens with the CLS/prefix tokens
dropped; CNNs give their last feature map flattened row by row. Either way the result is
``[batch, patch, d_img]`` plus the ``(rows, cols)`` grid the patches came from, which heatmaps use.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor, nn


class VisionEncoder(nn.Module):
    """A frozen timm model that maps images to patch features.

    Args:
        model: A timm model (``timm.create_model(...)``). Its weights are frozen and it stays in
            eval mode, whatever mode the parent module is put in.
        name: The name recorded in projection checkpoints; defaults to the timm architecture.

    Attributes:
        model_name: Encoder name (e.g. ``"beit_base_patch16_224"``). (Not ``name``: TransformerLens's
            ``setup()`` sets ``.name`` of every submodule to its path in the model.)
        d_img: Width of one patch feature.
        grid: ``(rows, cols)`` of the patch grid; ``n_patches = rows * cols``.
        input_size: The ``(channels, height, width)`` the encoder expects.
        data_config: timm's preprocessing config (mean, std, interpolation, crop).
    """

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_name = name or model.pretrained_cfg.get("architecture", type(model).__name__)
        self.data_config = timm.data.resolve_data_config({}, model=model)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # a ViT built at another resolution than its pretrained config
            self.data_config["input_size"] = (self.data_config["input_size"][0], *img_size)
        self.input_size: tuple[int, int, int] = tuple(self.data_config["input_size"])
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
        self.n_patches = self.grid[0] * self.grid[1]
        self._transform = timm.data.create_transform(**self.data_config)

    @classmethod
    def from_timm(cls, name: str, pretrained: bool = True, **kwargs) -> "VisionEncoder":
        """Build an encoder with ``timm.create_model(name, pretrained=pretrained, **kwargs)``."""
        return cls(timm.create_model(name, pretrained=pretrained, **kwargs), name=name)

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout/batch-norm statistics never change
        return self

    def preprocess(self, images: Sequence[Image.Image] | Image.Image) -> Float[Tensor, "batch 3 h w"]:
        """Resize, crop and normalise PIL images with the encoder's own timm transform."""
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

    def forward(self, images: Float[Tensor, "batch channel h w"]) -> Float[Tensor, "batch patch d_img"]:
        """Encode preprocessed images into ``[batch, patch, d_img]`` features (row-major grid)."""
        self.check_images(images)
        feats = self.model.forward_features(images)
        if feats.ndim == 4:
            return feats.flatten(2).transpose(1, 2)
        return feats[:, self._n_prefix:]
