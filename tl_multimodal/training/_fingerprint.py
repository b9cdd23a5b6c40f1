"""Fingerprints of what a training state or a feature cache was made from: the images, the captions, the
encoder's weights, the LM, so that a resume or a cache on something else is refused, saying what differs.

Each is 16 hex digits of a SHA-256. Images are hashed as stored, without decoding: a ``datasets.Image``
column's bytes, or for an image kept as a file path its file name and size (a folder moved elsewhere keeps
its fingerprint); a decoded PIL image (a stream's rows) by its mode, size and pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import datasets
import torch

_BATCH = 1000  # rows read at a time from a datasets.Dataset


def _path_identity(path) -> bytes:
    path = Path(path)
    size = path.stat().st_size if path.is_file() else None
    return f"file {path.name} {size}".encode()


def image_identity(image: Any) -> bytes:
    """What identifies an image as a row holds it: PIL (mode, size, pixels), bytes, a ``datasets.Image``
    storage dict (its bytes, else its file), a path (file name and size), an array (its bytes)."""
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL
        return f"pil {image.mode} {image.size} ".encode() + image.tobytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        return bytes(image["bytes"]) if image.get("bytes") is not None else _path_identity(image.get("path") or "")
    if isinstance(image, (str, os.PathLike)):
        return _path_identity(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if hasattr(image, "tobytes"):  # numpy
        return f"array {image.dtype} {image.shape} ".encode() + image.tobytes()
    return f"unhashable {type(image).__name__}".encode()


def update_row(digest, image: Any, caption: Any) -> None:
    """Add one row (its image and its caption value) to a running SHA-256."""
    for part in (image_identity(image), json.dumps(caption, sort_keys=True, default=str).encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)


def images_id(dataset: datasets.Dataset, image_column: str) -> str:
    """The fingerprint of a ``datasets.Dataset``'s images, in row order (nothing decoded)."""
    raw = dataset.select_columns([image_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    digest = hashlib.sha256()
    for start in range(0, len(raw), _BATCH):
        for image in raw[start:start + _BATCH][image_column]:
            part = image_identity(image)
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()[:16]


def captions_id(captions: Iterable[Any]) -> str:
    """The fingerprint of a caption column's values, in row order."""
    return hashlib.sha256(json.dumps(list(captions), default=str).encode()).hexdigest()[:16]


def weights_id(module: torch.nn.Module) -> str:
    """The fingerprint of a module's weights: each state-dict entry's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_identity(model) -> str:
    """``"name (weights <weights_id>)"`` of a vision LM's encoder."""
    return f"{model.vision.model_name} (weights {weights_id(model.vision)})"
