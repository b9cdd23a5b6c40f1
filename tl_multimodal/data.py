"""Image-caption datasets: the rows training, evaluation and the dataset runner read.

A row has an ``image`` (decoded to PIL by the ``datasets.Image`` feature) and ``captions`` (a list of
strings; training samples one per step). ``load_coco_mini`` reads the offline COCO sample that ships
beside this project; any dataset with the same two columns works. ``open_dataset`` is the command
line's door: a folder in that layout, webdataset shards, or a hub dataset (streamed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import datasets

#: Column names tried in order when none is given: a ``datasets.Image`` column or webdataset keys.
IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")
#: The same for captions (``txt``: webdataset, e.g. img2dataset's output).
CAPTION_KEYS = ("captions", "caption", "txt", "text")


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


def open_dataset(data: str | Path, split: str | None = None):
    """A dataset from the command line's ``DATA`` argument.

    Args:
        data: A folder in the ``coco_mini`` layout (``metadata.jsonl`` + images; read with
            :func:`load_coco_mini`), webdataset shards (a ``.tar`` file or a brace pattern such as
            ``shards/{00000..00099}.tar``; images decoded to PIL), or a hub dataset name
            (``datasets.load_dataset(data, split=split, streaming=True)``; needs internet).
        split: The split (folder and hub datasets).

    Returns:
        A ``datasets.Dataset`` (folder), or a stream: ``webdataset.WebDataset`` or
        ``datasets.IterableDataset``.

    Raises:
        FileNotFoundError: A folder without ``metadata.jsonl``, a missing ``.tar`` file.
        ValueError: An unknown split, a file that is none of these, a hub dataset without ``split``.
    """
    text = str(data)
    path = Path(text)
    if path.is_dir():
        return load_coco_mini(path, split)
    if text.endswith(".tar") or (".tar" in text and "{" in text):
        try:
            import webdataset as wds
        except ImportError:
            raise ImportError("reading webdataset shards needs `pip install webdataset`") from None
        if "{" not in text and not path.is_file():
            raise FileNotFoundError(f"webdataset shard {path} does not exist")
        # every rank reads the whole stream in order (the runner and training split it), so no node splitting
        return wds.WebDataset(text, shardshuffle=False, nodesplitter=None, empty_check=False).decode("pil")
    if path.exists():
        raise ValueError(f"{data} is a file; DATA must be a coco_mini-style folder, webdataset .tar shards "
                         "or a hub dataset name")
    if split is None:
        raise ValueError("a hub dataset needs --split")
    return datasets.load_dataset(text, split=split, streaming=True)


def find_column(row: Mapping, candidates: Sequence[str], given: str | None, option: str) -> str:
    """The column of ``row`` to read: ``given`` if set (it must exist), else the first of ``candidates`` present.

    Args:
        row: One row of the dataset.
        candidates: Names tried in order, e.g. :data:`IMAGE_KEYS`.
        given: The name the user passed, or None.
        option: How errors name the argument, e.g. ``"image_column"``.

    Raises:
        ValueError: ``given`` is not a column, or no candidate is (the columns are listed).
    """
    if given is not None:
        if given not in row:
            raise ValueError(f"{option} {given!r} is not in the dataset (columns: {sorted(row)})")
        return given
    for key in candidates:
        if key in row:
            return key
    raise ValueError(f"no column among {sorted(row)} is one of {list(candidates)}; pass {option}=")
