"""COCO instance crops: each kept object's box (with its margin) cut from the image, captioned by its
category; read back from a coordinate-coded image written with a hand-made annotation file."""

import json

import numpy as np
import pytest
from PIL import Image

from tl_multimodal.data.coco import instance_crops, load_coco
from tl_multimodal.data.sources import load_coco_mini


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    x, y = np.meshgrid(np.arange(200), np.arange(120))
    Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)).save(tmp_path / "images" / "1.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "images" / "2.png")
    rows = [{"file_name": "images/1.png", "image_id": 1, "split": "train", "captions": ["a cat and an apple"]},
            {"file_name": "images/2.png", "image_id": 2, "split": "train", "captions": ["nothing"]}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def ann(i, box, cat, crowd=0):
        return {"id": i, "image_id": 1, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd,
                "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3]]]}
    coco = {"images": [{"id": 1, "file_name": "1.png", "width": 200, "height": 120},
                       {"id": 2, "file_name": "2.png", "width": 50, "height": 50}],
            "categories": [{"id": 17, "name": "cat"}, {"id": 53, "name": "apple"}],
            "annotations": [ann(1, [20, 10, 100, 80], 17), ann(2, [150, 60, 40, 50], 53),
                            ann(3, [0, 0, 10, 10], 17), ann(4, [0, 0, 150, 100], 17, crowd=1)]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return tmp_path


def test_crops_are_the_boxes_with_margin_captioned_by_category(folder):
    data = load_coco_mini(folder, "train")
    crops = instance_crops(load_coco(folder), data, min_size=20, margin=0.1)
    assert crops.features == data.features and crops["image_id"] == [1, 1]  # tiny and crowd boxes left out
    assert crops["captions"] == [["a photo of a cat"], ["a photo of an apple"]]
    for crop, (x0, y0, x1, y1) in zip(crops["image"], [(10, 2, 130, 98), (146, 55, 194, 115)]):
        a = np.asarray(crop.convert("RGB"))
        assert a.shape[:2] == (y1 - y0, x1 - x0)
        assert (a[0, 0, 0], a[0, 0, 1], a[-1, -1, 0], a[-1, -1, 1]) == (x0, y0, x1 - 1, y1 - 1)
    largest = instance_crops(load_coco(folder), data, min_size=20, max_per_image=1, template="{name}")
    assert largest["captions"] == [["cat"]]


def test_bad_arguments_are_named(folder):
    data, coco = load_coco_mini(folder, "train"), load_coco(folder)
    for kwargs, match in [(dict(min_size=0), "min_size"), (dict(max_per_image=0), "max_per_image"),
                          (dict(margin=-1), "margin")]:
        with pytest.raises(ValueError, match=match):
            instance_crops(coco, data, **kwargs)
    with pytest.raises(ValueError, match="image_id"):
        instance_crops(coco, data.remove_columns("image_id"))
