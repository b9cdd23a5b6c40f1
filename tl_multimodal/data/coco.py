"""COCO in one place: the object masks heatmaps are scored against, and which object a caption names.

:func:`coco_category_mask` is the union of all instance masks of a category in an image (crowd
annotations included), via ``pycocotools``' ``annToMask``; :func:`object_for_noun` picks the
annotated category a caption's noun names (else the image's largest object); :func:`load_coco`
opens an annotation file and fills in image sizes a trimmed file leaves out; :func:`instance_crops`
turns annotated objects into extra training rows (the object's box, captioned "a photo of a dog").
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool
from PIL import Image
from torch import Tensor

from tl_multimodal._validate import check_int

PERSON = frozenset("""man men woman women person people boy boys girl girls child children kid kids guy guys lady
ladies player players baby skier surfer skateboarder snowboarder couple group family crowd rider batter
pitcher""".split())


def load_coco(data_dir: str | Path):
    """``pycocotools.coco.COCO`` of ``data_dir/instances.json``, with the image sizes it leaves out
    read from ``data_dir/images``."""
    from pycocotools.coco import COCO

    data_dir = Path(data_dir)
    path = data_dir / "instances.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data_dir must hold instances.json")
    coco = COCO(str(path))
    for info in coco.imgs.values():
        if "width" not in info:
            with Image.open(data_dir / "images" / info["file_name"]) as im:
                info["width"], info["height"] = im.size
    return coco


def object_for_noun(coco, image_id: int, noun: str | None) -> tuple[int, str, str] | None:
    """The annotated object a noun names: ``(category id, name, "noun")``; else the image's largest
    object ``(id, name, "largest")``; ``None`` if the image has no annotations.

    A noun names a category if it is the category's name or last word, up to a plural ``s``/``es``;
    people words ("woman", "skier", ...) name ``person``.
    """
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    if not anns:
        return None
    names = {c: coco.cats[c]["name"] for c in {a["category_id"] for a in anns}}
    if noun:
        w = noun.lower()
        cands = {w, w.removesuffix("s"), w.removesuffix("es")}
        for c, name in names.items():
            if name in cands or name.split()[-1] in cands or (name == "person" and w in PERSON):
                return c, name, "noun"
    largest = max(anns, key=lambda a: a["area"])
    return largest["category_id"], names[largest["category_id"]], "largest"


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
        ``[height, width]`` in original image pixels. Crowd (RLE) annotations are included. All
        False, with a warning naming the image and the category, if the image has no annotation
        of the category (or none at all) or its annotations cover no pixel. Masks come from ``coco.annToMask``, or from the same
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
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[category], iscrowd=None))
    for ann in anns:
        mask |= (coco.annToMask(ann) if has_size else _ann_to_mask(ann, h, w)).astype(bool)
    if not mask.any():
        name = coco.cats[category]["name"] if category in coco.cats else category
        why = ("its annotations cover no pixel" if anns else
               f"the image has no {name!r} annotation" if coco.getAnnIds(imgIds=[image_id], iscrowd=None) else
               "the image has no annotations at all")
        warnings.warn(f"the COCO mask of category {name!r} ({category}) in image {image_id} is empty: {why}",
                      stacklevel=2)
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


def instance_crops(coco, dataset, image_column: str = "image", min_size: int = 48,
                   max_per_image: int | None = None, margin: float = 0.1,
                   template: str = "a photo of {article} {name}"):
    """Rows for training: the annotated objects of each image, cropped, captioned by their category.

    Args:
        coco: A ``pycocotools.coco.COCO`` (:func:`load_coco`) annotating the rows' images.
        dataset: A ``datasets.Dataset`` with ``image_id`` and an image column (:func:`~tl_multimodal.data.sources.load_coco_mini`).
        image_column: The image column's name.
        min_size: Smallest box side (pixels) kept; crowd annotations are skipped.
        max_per_image: Most crops per image (the largest objects first); ``None`` for all.
        margin: Context kept around each box, as a fraction of its width and height per side.
        template: The caption, formatted with ``name`` (the COCO category) and ``article`` ("a"/"an").

    Returns:
        A dataset with the columns and features of ``dataset``; ``captions`` holds the one caption.
    """
    import datasets

    check_int(min_size, "min_size")
    if max_per_image is not None:
        check_int(max_per_image, "max_per_image")
    if not 0 <= margin <= 1:
        raise ValueError(f"margin must be in [0, 1], got {margin!r}")
    missing = [c for c in ("image_id", image_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column {missing} (columns: {dataset.column_names})")
    rows = []
    for row in dataset:
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[row["image_id"]], iscrowd=False))
                if min(a["bbox"][2:]) >= min_size]
        anns = sorted(anns, key=lambda a: -a["bbox"][2] * a["bbox"][3])[:max_per_image]
        if not anns:
            continue
        image = row[image_column].convert("RGB")
        for a in anns:
            x, y, w, h = a["bbox"]
            box = (max(0, round(x - margin * w)), max(0, round(y - margin * h)),
                   min(image.width, round(x + w + margin * w)), min(image.height, round(y + h + margin * h)))
            name = coco.cats[a["category_id"]]["name"]
            caption = template.format(name=name, article="an" if name[0] in "aeiou" else "a")
            extra = {k: row[k] for k in dataset.column_names if k not in ("image_id", image_column, "captions")}
            rows.append({**extra, image_column: image.crop(box), "image_id": row["image_id"], "captions": [caption]})
    return datasets.Dataset.from_list(rows, features=dataset.features)
