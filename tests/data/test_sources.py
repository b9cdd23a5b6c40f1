"""The demo-image helpers of ``tl_multimodal.data.sources``: a COCO sample written by ``write_coco_sample`` reads back
through ``load_coco_mini`` / ``load_coco`` / ``coco_category_mask`` with the source annotations' captions and
masks, and ``sample_images`` takes annotated images only (else scikit-image's photos)."""

import io

import numpy as np
import pytest
from PIL import Image

from tl_multimodal.data.coco import coco_category_mask, load_coco
from tl_multimodal.data.sources import SKIMAGE_PHOTOS, load_coco_mini, sample_images, write_coco_sample


def _jpeg(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco_files():
    """A COCO instances file (image 1: a dog rectangle; 2: nothing; 3: a cat polygon) and its captions file."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30, "coco_url": f"http://x/{i}"}
              for i in (1, 2, 3, 4)]
    cats = [{"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 17, "name": "cat", "supercategory": "animal"}]
    anns = [{"id": 10, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 80.0, "bbox": [5, 5, 10, 8],
             "segmentation": [[5, 5, 15, 5, 15, 13, 5, 13]]},
            {"id": 11, "image_id": 3, "category_id": 17, "iscrowd": 0, "area": 50.0, "bbox": [20, 10, 10, 10],
             "segmentation": [[20, 10, 30, 10, 30, 20]]},
            {"id": 12, "image_id": 4, "category_id": 18, "iscrowd": 0, "area": 4.0, "bbox": [0, 0, 2, 2],
             "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}]
    caps = [{"id": 100 + k, "image_id": i, "caption": f" caption {k} of {i} "} for k, i in enumerate((1, 1, 2, 3, 4))]
    return {"images": images, "annotations": anns, "categories": cats}, {"annotations": caps}


@pytest.fixture(scope="module")
def sample_dir(coco_files, tmp_path_factory):
    instances, captions = coco_files
    colours = {1: (200, 0, 0), 2: (0, 200, 0), 3: (0, 0, 200)}
    return write_coco_sample(instances, captions, [1, 2, 3], tmp_path_factory.mktemp("coco") / "sample",
                             lambda info: _jpeg(colours[info["id"]]), n_dev=2)


def test_written_sample_reads_back_with_its_captions_splits_and_images(sample_dir):
    train, dev = load_coco_mini(sample_dir, "train"), load_coco_mini(sample_dir, "dev")
    assert train["image_id"] == [1] and dev["image_id"] == [2, 3]   # the last n_dev images are dev
    assert train["captions"] == [["caption 0 of 1", "caption 1 of 1"]]
    assert dev["captions"] == [["caption 2 of 2"], ["caption 3 of 3"]]
    pixel = np.asarray(dev[1]["image"])[15, 20]
    assert np.abs(pixel.astype(int) - (0, 0, 200)).max() < 10   # image 3's own bytes


def test_written_sample_keeps_only_the_chosen_images_annotations_and_their_masks(sample_dir, coco_files):
    coco = load_coco(sample_dir)
    assert sorted(coco.imgs) == [1, 2, 3] and sorted(coco.anns) == [10, 11]   # image 4 left out
    dog = coco_category_mask(coco, 1, "dog")
    assert dog.shape == (30, 40)
    assert dog[6:12, 6:14].all() and not dog[:4].any() and not dog[:, 17:].any()   # the planted rectangle
    # the same mask as pycocotools computes from the source annotation
    from pycocotools import mask as mask_utils
    ann = coco_files[0]["annotations"][1]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 30, 40)))
    assert np.array_equal(coco_category_mask(coco, 3, "cat").numpy(), expected.astype(bool))


def test_write_coco_sample_names_bad_arguments(coco_files, tmp_path):
    instances, captions = coco_files
    with pytest.raises(ValueError, match=r"image ids \[99\]"):
        write_coco_sample(instances, captions, [1, 99], tmp_path / "a", lambda info: b"", n_dev=1)
    with pytest.raises(ValueError, match="n_dev"):
        write_coco_sample(instances, captions, [1, 2], tmp_path / "b", lambda info: b"", n_dev=3)


def test_sample_images_takes_annotated_images_of_the_split(sample_dir):
    s = sample_images(1, sample_dir, "dev")   # dev is images 2 (no annotations) and 3
    assert s.image_ids == [3] and s.captions == ["caption 3 of 3"] and s.coco is not None
    assert s.images[0].mode == "RGB" and s.images[0].size == (40, 30)
    assert "1 images" in repr(s) and "with COCO masks" in repr(s)
    assert s.to_dataframe().to_dict("records") == [{"image_id": 3, "size": (40, 30), "caption": "caption 3 of 3"}]
    with pytest.raises(ValueError, match="n=2 but .* has 1 annotated 'dev' images"):
        sample_images(2, sample_dir, "dev")


def test_sample_images_without_data_are_scikit_images_photos():
    from skimage import data

    s = sample_images(2)
    assert s.coco is None and s.captions == [None, None] and s.image_ids == [None, None]
    assert np.array_equal(np.asarray(s.images[0]), data.chelsea()) and np.array_equal(np.asarray(s.images[1]), data.coffee())
    with pytest.raises(ValueError, match=f"bundles {len(SKIMAGE_PHOTOS)}"):
        sample_images(len(SKIMAGE_PHOTOS) + 1)
    for bad, error, message in ((0, ValueError, "n must be >= 1, got 0"), (-1, ValueError, "n must be >= 1, got -1"),
                                (1.5, TypeError, "n must be an int, got float"), (True, TypeError, "n must be an int")):
        with pytest.raises(error, match=message):
            sample_images(bad)
