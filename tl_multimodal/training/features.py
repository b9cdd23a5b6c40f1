"""Encoder features of a dataset's images, computed once and kept in RAM or a memory-mapped file.

Training on a ``datasets.Dataset`` encodes every image once here (the encoder is frozen), so a
training step runs only the projection and the LM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_multimodal._io import atomic_write, temp_path
from tl_multimodal._validate import check_int
from tl_multimodal.data.sources import rows_naming_bad_images
from tl_multimodal.models.protocol import VisionLM
from tl_multimodal.training._fingerprint import encoder_identity, images_id
from tl_multimodal.training.nll import _restoring


def _check_columns(dataset, what: str, *columns: str) -> None:
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"{what} must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} has no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(dataset.column_names)})")

def encode_images(model: VisionLM, dataset: datasets.Dataset, image_column: str = "image",
                  batch_size: int = 32, progress: bool = True, cache: str | Path | None = None,
                  ) -> Float[Tensor, "n patch d_img"]:
    """Encoder features of every image of ``dataset`` (computed once, kept on the CPU).

    Args:
        model: The model whose encoder runs.
        dataset: Rows with an image column.
        image_column: Its name.
        batch_size: Images per encoder pass.
        progress: Show a progress bar.
        cache: A ``.npy`` file for the features instead of RAM: written once (atomically, with a
            ``.json`` record beside it of the encoder (name and weights), the images (a hash, as
            stored) and the shape), then memory-mapped, so a run reads only the rows it draws and
            later runs on the same data skip the encoder. A record for another encoder, other
            images or another row count is refused (the fields named), and so is a file that is not
            the ``.npy`` array its record describes.

    Returns:
        ``[n, patch, d_img]`` float32 features (memory-mapped, copy-on-write, with ``cache``).
    """
    check_int(batch_size, "batch_size")
    _check_columns(dataset, "dataset", image_column)
    if cache is not None:
        return _cached_features(model, dataset, image_column, batch_size, progress, Path(cache))
    return torch.cat(list(_encode(model, dataset, image_column, batch_size, progress)))


@torch.no_grad()
def _encode_batch(model, images) -> Float[Tensor, "batch patch d_img"]:
    """Encoder features of a few images (float32, on the model's device); the caller sets eval mode."""
    return model.vision(model.preprocess(images)).float()


def _encode(model, dataset, image_column, batch_size, progress):
    with _restoring(model):
        model.eval()
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoding images", disable=not progress):
            yield _encode_batch(model, _images(dataset, start, start + batch_size, image_column)).cpu()


def _images(dataset, start: int, stop: int, image_column: str) -> list:
    """The decoded images of rows ``[start, stop)``; one that cannot be read raises ``ImageReadError`` naming it."""
    try:
        return dataset[start:stop][image_column]
    except Exception:
        rows = dataset.select(range(start, min(stop, len(dataset))))
        for _ in rows_naming_bad_images(rows, dataset, start):  # raises, naming the row and its file
            pass
        raise


def _cached_features(model, dataset, image_column, batch_size, progress, path: Path) -> Tensor:
    """:func:`encode_images` through the on-disk cache ``path`` (rank 0 writes it, others wait)."""
    if path.suffix != ".npy":
        raise ValueError(f"cache must be a .npy file, got {str(path)!r}")
    record = {"encoder": encoder_identity(model), "images": images_id(dataset, image_column),
              "n_images": len(dataset), "shape": [len(dataset), model.n_image_tokens, model.vision.d_img]}
    meta = path.with_suffix(".json")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)  # removed by a later write if a kill leaves it
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(record["shape"]))
            start = 0
            for chunk in _encode(model, dataset, image_column, batch_size, progress):
                out[start:start + len(chunk)] = chunk.numpy()
                start += len(chunk)
            out.flush()
            del out
            atomic_write(meta, lambda f: f.write(json.dumps(record).encode()))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    fix = "delete it (and its .json record) to encode the images again, or name another file"
    try:
        have = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"feature cache {path} has no readable record {meta} ({e}); {fix}") from None
    if have != record:
        differ = [f"{k}: {have.get(k)!r} there, {v!r} here" for k, v in record.items()
                  if not isinstance(have, dict) or have.get(k) != v]
        raise ValueError(f"feature cache {path} was written for other data or another encoder "
                         f"({'; '.join(differ)}; from {meta}); {fix}")
    try:
        features = np.load(path, mmap_mode="c")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"feature cache {path} is not a readable .npy file ({e}); {fix}") from None
    if features.dtype != np.float32 or list(features.shape) != record["shape"]:
        raise ValueError(f"feature cache {path} holds a {features.dtype} array of shape {list(features.shape)}, "
                         f"its record says float32 {record['shape']}; {fix}")
    return torch.from_numpy(features)
