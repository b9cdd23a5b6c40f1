"""Image-caption datasets as ``datasets.Dataset`` objects: the rows training and evaluation read.

A row has an ``image`` (decoded to PIL by the ``datasets.Image`` feature) and ``captions`` (a list of
strings; training samples one per step). ``load_coco_mini`` reads the offline COCO sample that ships
beside this project; any dataset with the same two columns works.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets


def load_coco_mini(data_dir: str | Path, split: str | None = None) -> datasets.Dataset:
    """Load a COCO-style folder: ``metadata.jsonl`` (file_name, image_id, split, captions) + images.

    Args:
        data_dir: The folder, e.g. ``../shared/data/coco_mini``.
        split: ``"train"``, ``"dev"`` or ``None`` for every row.

    Returns:
        A dataset with columns ``image`` (PIL on access), ``image_id``, ``captions``.
    """
    data_dir = Path(data_dir)
    meta = data_dir / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: data_dir must hold metadata.jsonl and the images")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    splits = sorted({r["split"] for r in rows})
    if split is not None and split not in splits:
        raise ValueError(f"split {split!r} not in {data_dir} (it has {splits})")
    rows = [{"image": str(data_dir / r["file_name"]), "image_id": r["image_id"], "captions": r["captions"]}
            for r in rows if split is None or r["split"] == split]
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
