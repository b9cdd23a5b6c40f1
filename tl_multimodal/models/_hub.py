"""The hub constructors' arguments (``from_pretrained`` of both backends): an encoder named on the hub and
a projection that must be trained unless asked otherwise."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from tl_multimodal.models.encoders import HFVisionEncoder, VisionEncoder
from tl_multimodal.models.projection import ImageProjection

HUB_ENCODER = "microsoft/beit-large-patch16-224-pt22k"  # the paper's: self-supervised BEiT-large, CLS dropped
UNTRAINED = "untrained"  # projection= value that asks for a random projection on purpose (no warning)


def hub_encoder(name: str = HUB_ENCODER):
    """The pretrained encoder a hub constructor names: HF transformers or timm, told apart by the name.

    A name with a ``/`` (``"microsoft/beit-large-patch16-224-pt22k"``, ``"openai/clip-vit-large-patch14"``)
    or a local folder is a HF model (:class:`~tl_multimodal.models.encoders.HFVisionEncoder`: last hidden
    state, CLS dropped); a plain name (``"beit_base_patch16_224"``) or ``"hf-hub:..."``/``"timm/..."``
    is a timm model.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"encoder must be a HF or timm model name (str), got {name!r}")
    if not name.startswith(("hf-hub:", "timm/")) and ("/" in name or os.path.isdir(name)):
        return HFVisionEncoder.from_pretrained(name)
    return VisionEncoder.from_timm(name, pretrained=True)


def hub_projection(projection, where: str = "from_pretrained"):
    """The projection a hub constructor was given: loaded, or ``None`` (untrained) with a loud warning.

    Args:
        projection: A checkpoint path (``ImageProjection.save`` / ``train_projection``), an
            :class:`~tl_multimodal.models.projection.ImageProjection`, ``None`` (untrained, with a
            ``UserWarning``), or ``"untrained"`` (untrained on purpose, e.g. to train it: no warning).
        where: The caller's name, for the messages.

    Returns:
        The projection, or ``None`` for the constructor to build an untrained one.
    """
    if isinstance(projection, ImageProjection):
        return projection
    if projection is None:
        warnings.warn(
            f"{where}: no projection given, so images go through an UNTRAINED (random) projection and the "
            "model's captions and neuron findings are meaningless. Pass projection='path/to/projection.pt' "
            "(saved by ImageProjection.save or train_projection); for the paper's model use "
            "tl_multimodal.load('limber:beit_linear', projection='limber_weights/beit_linear/proj.ckpt'); or pass "
            f"projection={UNTRAINED!r} to build an untrained one on purpose (e.g. to train it).",
            UserWarning, stacklevel=3)
        return None
    if projection == UNTRAINED:
        return None
    if not isinstance(projection, (str, os.PathLike)):
        raise TypeError(f"projection must be a checkpoint path, an ImageProjection, None or {UNTRAINED!r}, "
                        f"got {type(projection).__name__}")
    if not Path(projection).is_file():
        raise FileNotFoundError(f"projection checkpoint {projection} does not exist")
    return ImageProjection.load(projection)
