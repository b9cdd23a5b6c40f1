"""LiMBeR's released models (Merullo et al.): GPT-J-6B + a frozen image encoder + a trained ``proj.ckpt``.

The Multimodal Neurons paper studies ``beit_linear``. Each LiMBeR config names its encoder, how the
encoder's output becomes tokens, and the preprocessing it was trained with:

* ``beit_linear``: HF ``BeitModel`` ``microsoft/beit-large-patch16-224-pt22k`` (self-supervised, no
  labels), ``last_hidden_state[:, 1:]``: 196 x 1024, one token per patch.
* ``beit_ft_linear``: the same with the ImageNet-22k fine-tuned ``...-pt22k-ft22k``.
* ``clip_linear``: CLIP RN50x16 with its attention pooling removed (timm ``resnet50x16_clip.openai``
  ``forward_features``, ``b d h w -> b (h w) d``): 144 x 3072; resize 384 (bicubic), center crop 384,
  CLIP's mean/std.
* ``nfrn50_4096_linear``: timm ``nf_resnet50`` average-pooled to one 2048-d vector and
  ``Linear(2048, 4096 * 1)`` (``image_seq_len: 1``). LiMBeR fed it unnormalised [0, 1] pixels at 384;
  its random-crop augmentation is replaced here by resize + center crop.

    model = tl_multimodal.load("limber:beit_linear", projection="limber_weights/beit_linear/proj.ckpt")
    model.caption(images, prompt="A picture of")

The hub constructors (``HookedVisionPrefix.from_pretrained``, ``VisionBridge.from_pretrained``) default
to LiMBeR's encoder (:data:`HUB_ENCODER`) and warn when no trained projection is given
(:func:`hub_encoder`, :func:`hub_projection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tl_multimodal._compat import HookedTransformer
from tl_multimodal.models.projection import ImageProjection, ProjectionInfo

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LimberConfig:
    """One LiMBeR configuration: its encoder and projection kind.

    Attributes:
        encoder: Hub name of the encoder (HF transformers for BEiT, timm otherwise).
        source: ``"hf"`` or ``"timm"``.
        kind: Projection kind (``"linear"`` per patch, ``"pooled"`` for NF-ResNet).
        n_tokens: Soft-prompt tokens of a pooled projection.
        data_config: Preprocessing in timm's format (``None``: the HF model's own image processor).
    """

    encoder: str
    source: str
    kind: str = "linear"
    n_tokens: int | None = None
    data_config: dict | None = None


LIMBER_CONFIGS = {
    "beit_linear": LimberConfig("microsoft/beit-large-patch16-224-pt22k", "hf"),
    "beit_ft_linear": LimberConfig("microsoft/beit-large-patch16-224-pt22k-ft22k", "hf"),
    "clip_linear": LimberConfig("resnet50x16_clip.openai", "timm", data_config={
        "input_size": (3, 384, 384), "interpolation": "bicubic", "mean": _CLIP_MEAN, "std": _CLIP_STD,
        "crop_pct": 1.0, "crop_mode": "center"}),
    "nfrn50_4096_linear": LimberConfig("nf_resnet50", "timm", kind="pooled", n_tokens=1, data_config={
        "input_size": (3, 384, 384), "interpolation": "bilinear", "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0), "crop_pct": 1.0, "crop_mode": "center"}),
}


def _config(config: str) -> LimberConfig:
    if config not in LIMBER_CONFIGS:
        raise ValueError(f"unknown LiMBeR config {config!r}; choose one of {sorted(LIMBER_CONFIGS)}")
    return LIMBER_CONFIGS[config]


def limber_encoder(config: str = "beit_linear"):
    """The frozen, pretrained image encoder of a LiMBeR config (downloads from the hub)."""
    from tl_multimodal.models.encoders import HFVisionEncoder, VisionEncoder

    c = _config(config)
    if c.source == "hf":
        return HFVisionEncoder.from_pretrained(c.encoder)
    return VisionEncoder.from_timm(c.encoder, pretrained=True, data_config=c.data_config)


def assemble_limber(lm, encoder, projection_path: str | Path, config: str = "beit_linear"):
    """A vision LM from an LM, an encoder and a LiMBeR ``proj.ckpt``.

    Args:
        lm: The language model (LiMBeR: GPT-J-6B): a ``HookedTransformer`` gives a
            :class:`~tl_multimodal.HookedVisionPrefix`, a ``TransformerBridge`` a
            :class:`~tl_multimodal.VisionBridge`.
        encoder: The config's encoder (:func:`limber_encoder`).
        projection_path: LiMBeR's ``limber_weights/<config>/proj.ckpt``.
        config: A key of :data:`LIMBER_CONFIGS`; says the projection kind.

    Raises:
        ValueError: The checkpoint does not have the shape this encoder and LM need.
    """
    c = _config(config)
    info = ProjectionInfo(encoder=encoder.model_name, d_img=encoder.d_img, grid=encoder.grid,
                          lm=lm.cfg.model_name, d_model=lm.cfg.d_model, kind=c.kind, n_tokens=c.n_tokens,
                          training={"source": f"LiMBeR {config}", "checkpoint": str(projection_path)})
    proj = ImageProjection.from_limber(projection_path, info).to(lm.W_E.device)
    if hasattr(lm, "adapter") and hasattr(lm, "original_model"):  # a TransformerBridge
        from tl_multimodal.models.bridge import VisionBridge

        return VisionBridge(lm, encoder, proj)
    from tl_multimodal.models.prefix import HookedVisionPrefix

    return HookedVisionPrefix(lm, encoder, proj)


def load_limber(config: str = "beit_linear", projection_path: str | Path | None = None,
                lm_name: str = "EleutherAI/gpt-j-6B", *, backend: str = "hooked", **lm_kwargs):
    """LiMBeR's model as the paper used it: GPT-J-6B + the config's encoder + its ``proj.ckpt`` (hub).

    GPT-J-6B needs about 12 GB in float16 (the default here) and twice that while the model is
    built (the LM's weights are copied once); a GPU is advised. :func:`tl_multimodal.load` with
    ``"limber:<config>"`` calls this.

    Args:
        config: A key of :data:`LIMBER_CONFIGS` (the paper: ``"beit_linear"``).
        projection_path: The config's ``proj.ckpt`` from LiMBeR's repository (``limber_weights/``).
        lm_name: The TransformerLens model name.
        backend: ``"hooked"`` (``HookedTransformer.from_pretrained``, a HookedVisionPrefix) or
            ``"bridge"`` (``TransformerBridge.boot_transformers``, a VisionBridge).
        **lm_kwargs: Passed to the LM's loader (default ``dtype=torch.float16``).
    """
    _config(config)
    if backend not in ("hooked", "bridge"):
        raise ValueError(f"backend must be 'hooked' or 'bridge', got {backend!r}")
    if projection_path is None:
        raise ValueError(f"projection_path is required: LiMBeR's limber_weights/{config}/proj.ckpt "
                         "(from its GitHub repository)")
    if not Path(projection_path).is_file():
        raise FileNotFoundError(f"projection_path {projection_path} does not exist")
    lm_kwargs.setdefault("dtype", torch.float16)
    if backend == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        lm = TransformerBridge.boot_transformers(lm_name, **lm_kwargs)
    else:
        lm = HookedTransformer.from_pretrained(lm_name, **lm_kwargs)
    encoder = limber_encoder(config).to(lm.W_E.device)
    return assemble_limber(lm, encoder, projection_path, config)
