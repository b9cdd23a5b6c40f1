"""Image-caption datasets: the rows training, evaluation and the dataset runner read.

A row has an ``image`` (decoded to PIL by the ``datasets.Image`` feature) and ``captions`` (a list of
strings; training samples one per step). ``load_coco_mini`` reads the offline COCO sample that ships
beside this project; any dataset with the same two columns works. ``open_dataset`` is the command
line's door: a folder in that layout, webdataset shards, or a hub dataset (streamed). ``sample_images``
picks images for the demos (annotated COCO images, else scikit-image's photos); ``download_coco_sample``
writes a folder in the same layout from COCO val2017 on a machine with internet (e.g. Colab).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import datasets

from tl_multimodal._validate import check_int

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
        _check_shards(text)
        # every rank reads the whole stream in order (the runner and training split it), so no node splitting
        return wds.WebDataset(text, shardshuffle=False, nodesplitter=None, empty_check=False).decode("pil")
    if path.exists():
        raise ValueError(f"{data} is a file; DATA must be a coco_mini-style folder, webdataset .tar shards "
                         "or a hub dataset name")
    if not _HUB_NAME.fullmatch(text) or (text.count("/") == 1 and Path(text.split("/")[0]).is_dir()):
        raise FileNotFoundError(f"{data} does not exist (DATA: a coco_mini-style folder, webdataset .tar shards "
                                "or a hub dataset name)")
    if split is None:
        raise ValueError(f"{data} is no local folder or file; as a hub dataset name it needs a split (--split)")
    return datasets.load_dataset(text, split=split, streaming=True)


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `name` or `owner/name`; anything else is a local path


def _check_shards(pattern: str) -> None:
    """Raise ``FileNotFoundError`` naming the local shards of ``pattern`` (a path or a brace pattern) that do
    not exist; URLs and ``pipe:`` commands are left to webdataset."""
    if "://" in pattern or pattern.startswith("pipe:"):
        return
    from braceexpand import braceexpand  # webdataset's own dependency

    paths = list(braceexpand(pattern))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing == paths and len(paths) > 1:
        raise FileNotFoundError(f"webdataset pattern {pattern!r} matches no file (none of its {len(paths)} shards, "
                                f"{paths[0]} ... {paths[-1]}, exists)")
    if missing:
        raise FileNotFoundError(f"webdataset shard {missing[0]} does not exist" +
                                (f" ({len(missing)} of the {len(paths)} shards of {pattern!r} are missing)"
                                 if len(paths) > 1 else ""))


class ImageReadError(ValueError):
    """An image of a dataset could not be read (a missing file, truncated or damaged data, a decompression
    bomb); the message names the row and, where the dataset knows it, the file or the shard and key."""


def _where(data, index: int, error: BaseException) -> str:
    """Where row ``index`` of ``data`` comes from: its image file, or a webdataset shard and key."""
    wds_error = getattr(sys.modules.get("webdataset.autodecode"), "DecodingError", None)
    if wds_error is not None and isinstance(error, wds_error):
        return f"key {error.key!r} of {error.url}"
    if isinstance(data, datasets.Dataset):
        for name, feature in data.features.items():
            if isinstance(feature, datasets.Image):
                raw = data.select([index]).cast_column(name, datasets.Image(decode=False))[0][name]
                if raw and raw.get("path"):
                    return f"file {raw['path']}"
    return "of the stream"


def rows_naming_bad_images(rows: Iterable[Mapping], data=None, start: int = 0) -> Iterator[Mapping]:
    """``rows`` one by one; an image that cannot be decoded as its row is read raises :class:`ImageReadError`
    naming the row (``start`` + its position in ``rows``) and its file, instead of PIL's message without it.

    Args:
        rows: Rows read from ``data`` from row ``start`` on (decoding as they are read).
        data: The dataset the rows come from (a ``datasets.Dataset`` gives the file names).
        start: The index in ``data`` of the first row.

    Raises:
        ImageReadError: A row's image is missing, truncated, damaged or too large for PIL.
    """
    from PIL import Image

    bad = (OSError, Image.DecompressionBombError)
    index, rows = start, iter(rows)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            cause = e if isinstance(e, bad) else e.__cause__  # webdataset wraps the error
            if not isinstance(cause, bad):
                raise
            raise ImageReadError(f"image {index} ({_where(data, index, e)}) cannot be read: {cause}") from e
        yield row
        index += 1


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


# ------------------------------------------------------------------------------------ demo images
COCO_HUB_REPO = "merve/coco"  # a hub mirror of the official COCO 2017 annotation files
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # scikit-image's bundled colour photos


@dataclass
class SampleImages:
    """Images to look at, with what is known about them.

    Attributes:
        images: RGB PIL images.
        captions: The first human caption of each image (``None`` for photos without one).
        image_ids: COCO image ids (``None`` for photos that are not from COCO).
        coco: ``pycocotools.coco.COCO`` of the images' instance masks, or ``None``.
        source: Where the images came from.
    """

    images: list
    captions: list
    image_ids: list
    coco: object | None
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def to_dataframe(self):
        """One row per image: its COCO id, size ``(width, height)`` and first caption."""
        import pandas as pd

        return pd.DataFrame({"image_id": self.image_ids, "size": [im.size for im in self.images],
                             "caption": self.captions})

    def __repr__(self) -> str:
        masks = "with COCO masks" if self.coco is not None else "no masks"
        return f"SampleImages({len(self)} images from {self.source}, {masks})"


def sample_images(n: int, data_dir: str | Path | None = None, split: str = "dev") -> SampleImages:
    """``n`` images to analyse: annotated images of a COCO-style folder, else scikit-image's photos.

    Args:
        n: How many images.
        data_dir: A folder in the ``coco_mini`` layout (``metadata.jsonl``, ``instances.json``,
            images); its first ``n`` images of ``split`` that have instance annotations are taken.
            ``None``: scikit-image's bundled photos (no captions, no masks).
        split: The folder's split to take images from.

    Returns:
        The images, their first captions, COCO ids and annotations (see :class:`SampleImages`).

    Raises:
        TypeError: If ``n`` is not an int.
        ValueError: If ``n`` < 1 or there are fewer than ``n`` such images.
    """
    check_int(n, "n")
    if data_dir is None:
        if n > len(SKIMAGE_PHOTOS):
            raise ValueError(f"n={n} but scikit-image bundles {len(SKIMAGE_PHOTOS)} colour photos")
        from PIL import Image
        from skimage import data

        names = SKIMAGE_PHOTOS[:n]
        return SampleImages([Image.fromarray(getattr(data, name)()).convert("RGB") for name in names],
                            [None] * n, [None] * n, None, "scikit-image (" + ", ".join(names) + ")")
    from tl_multimodal.data.coco import load_coco

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = load_coco(data_dir)
    annotated = {a["image_id"] for a in coco.dataset["annotations"]}
    ds = load_coco_mini(data_dir, split)
    rows = [k for k, image_id in enumerate(ds["image_id"]) if image_id in annotated]
    if len(rows) < n:
        raise ValueError(f"n={n} but {data_dir} has {len(rows)} annotated {split!r} images")
    ds = ds.select(rows[:n])
    return SampleImages([r["image"].convert("RGB") for r in ds], [r["captions"][0] for r in ds],
                        [r["image_id"] for r in ds], coco, f"{data_dir} ({split})")


def write_coco_sample(instances: dict, captions: dict, image_ids: list[int], dest: str | Path,
                      read_image: Callable[[dict], bytes], n_dev: int) -> Path:
    """Write COCO images and their annotations as a ``coco_mini``-style folder.

    Args:
        instances: A COCO instances file (``images``, ``annotations``, ``categories``).
        captions: A COCO captions file (``annotations`` with ``image_id`` and ``caption``).
        image_ids: The images to keep, in order; the last ``n_dev`` form the ``dev`` split, the rest ``train``.
        dest: The folder to write (``images/``, ``metadata.jsonl``, ``instances.json``).
        read_image: The JPEG bytes of an image, given its entry of ``instances["images"]``.
        n_dev: How many images go to the ``dev`` split.

    Returns:
        ``dest``, readable by :func:`load_coco_mini` and :func:`tl_multimodal.data.coco.load_coco`.
    """
    infos = {i["id"]: i for i in instances["images"]}
    missing = [i for i in image_ids if i not in infos]
    if missing:
        raise ValueError(f"image ids {missing[:5]} are not in the instances file")
    if not 0 <= n_dev <= len(image_ids):
        raise ValueError(f"n_dev must be between 0 and {len(image_ids)} (the images kept), got {n_dev}")
    texts: dict[int, list[str]] = {}
    for a in captions["annotations"]:
        texts.setdefault(a["image_id"], []).append(a["caption"].strip())
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    keep, rows = set(image_ids), []
    for k, image_id in enumerate(image_ids):
        info = infos[image_id]
        (dest / "images" / info["file_name"]).write_bytes(read_image(info))
        rows.append({"file_name": f"images/{info['file_name']}", "image_id": image_id,
                     "split": "dev" if k >= len(image_ids) - n_dev else "train", "captions": texts.get(image_id, [])})
    (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dest / "instances.json").write_text(json.dumps({
        "categories": instances["categories"],
        "images": [infos[i] for i in image_ids],
        "annotations": [a for a in instances["annotations"] if a["image_id"] in keep]}))
    return dest


def download_coco_sample(dest: str | Path = "coco_sample", n: int = 32, n_dev: int = 16,
                         repo: str = COCO_HUB_REPO) -> Path:
    """Download ``n`` annotated COCO val2017 images into a ``coco_mini``-style folder (needs internet).

    The annotation files (instances and captions, about 25 MB) come from the hub dataset ``repo``, the
    images from COCO's own image server (each image's ``coco_url``). A folder that already holds a
    ``metadata.jsonl`` is returned as it is.

    Args:
        dest: The folder to write.
        n: Images to download: the ``n`` annotated val2017 images with the smallest ids.
        n_dev: How many of them form the ``dev`` split (the rest: ``train``).
        repo: The hub dataset holding ``annotations/instances_val2017.json`` and ``captions_val2017.json``.

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    if (dest / "metadata.jsonl").is_file():
        return dest
    import urllib.request

    from huggingface_hub import hf_hub_download

    def load(name):
        return json.loads(Path(hf_hub_download(repo, f"annotations/{name}", repo_type="dataset")).read_text())

    instances, captions = load("instances_val2017.json"), load("captions_val2017.json")
    ids = sorted({a["image_id"] for a in instances["annotations"]})[:n]

    def read_image(info):
        url = info.get("coco_url") or f"http://images.cocodataset.org/val2017/{info['file_name']}"
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()

    return write_coco_sample(instances, captions, ids, dest, read_image, n_dev)


class ImagesByIndex:
    """A dataset's images by row index: read when asked for from a ``datasets.Dataset``, or kept from a
    stream (webdataset, hub) for the indices wanted only, read up to the last of them.

    Args:
        data: What :func:`open_dataset` gives.
        indices: The row indices that will be asked for.
        image_column: The image column (default: the first of :data:`IMAGE_KEYS` present).

    Raises:
        ValueError: The data has fewer rows than an index needs, or no image column.
    """

    def __init__(self, data, indices: Sequence[int], image_column: str | None = None):
        import itertools

        if not indices:
            raise ValueError("indices is empty")
        last = max(indices)
        self.data, self.rows = data, None
        if hasattr(data, "select") and hasattr(data, "__len__"):
            n = len(data)
        else:
            wanted, self.rows, n = set(indices), {}, 0
            for n, row in enumerate(itertools.islice(iter(data), last + 1), 1):
                if n - 1 in wanted:
                    self.rows[n - 1] = row
        if n <= last:
            raise ValueError(f"the data has {n} rows but row {last} is wanted")
        self.key = find_column(self.row(indices[0]), IMAGE_KEYS, image_column, "image_column")

    def row(self, index: int) -> dict:
        """Row ``index`` of the data."""
        return self.data[int(index)] if self.rows is None else self.rows[int(index)]

    def __getitem__(self, index: int):
        return self.row(index)[self.key]
