"""Heatmaps: the resize/crop mapping against timm's own transform, the upsampling against
F.interpolate, IoU on synthetic grids and masks, COCO masks, and unit grids against the cache."""

import json

import matplotlib
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from tl_multimodal.data.coco import coco_category_mask, object_for_noun
from tl_multimodal.models.geometry import CropGeometry, grid_to_image, mask_to_input, upsample_grid
from tl_multimodal.analysis.heatmaps import activation_mask, heatmap_ious, mask_iou, unit_grid_activations, unit_heatmap

matplotlib.use("Agg")

CONFIGS = {  # timm eval data configs: EfficientNet-Lite0's, a ViT's, squash, a non-square input
    "effnet": dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center"),
    "vit": dict(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.9, crop_mode="center"),
    "squash": dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=0.95, crop_mode="squash"),
    "wide": dict(input_size=(3, 160, 224), interpolation="bilinear", crop_pct=0.875, crop_mode="center"),
}
SIZES = [(300, 200), (200, 300), (640, 427), (224, 224)]


def _rect_image(size, rect):
    im = Image.new("L", size, 0)
    ImageDraw.Draw(im).rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=255)  # [x0, x1) x [y0, y1)
    mask = torch.zeros(size[1], size[0], dtype=torch.bool)
    mask[rect[1]:rect[3], rect[0]:rect[2]] = True
    return im.convert("RGB"), mask


def _timm_input(cfg, image):
    """The image through timm's own eval transform, unnormalised: [h, w] in [0, 1]."""
    return timm.data.create_transform(**cfg, mean=(0, 0, 0), std=(1, 1, 1))(image)[0]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", SIZES)
def test_crop_geometry_matches_timm_transform(name, size):
    cfg = CONFIGS[name]
    w, h = size
    rect = (int(0.3 * w), int(0.25 * h), int(0.7 * w), int(0.9 * h))
    image, mask = _rect_image(size, rect)
    seen = _timm_input(cfg, image)  # what the model gets
    geo = CropGeometry.from_data_config(cfg, size)
    assert (geo.crop[3], geo.crop[2]) == tuple(seen.shape)
    # the rectangle's corners, mapped into the input frame, bound the bright pixels of timm's output
    x0, y0 = geo.to_input(rect[0], rect[1])
    x1, y1 = geo.to_input(rect[2], rect[3])
    ys, xs = (seen > 0.5).nonzero(as_tuple=True)
    H, W = seen.shape
    assert abs(xs.min() - max(x0, 0)) <= 1 and abs(ys.min() - max(y0, 0)) <= 1
    assert abs(xs.max() + 1 - min(x1, W)) <= 1 and abs(ys.max() + 1 - min(y1, H)) <= 1
    # both directions: timm's output read back onto the original, and the original mask carried into the input
    back = grid_to_image(seen, geo)
    visible = torch.isfinite(back)
    tol = 0.95 if H >= 100 else 0.85  # a 32-px input: half-covered edge pixels weigh ~7% of the IoU
    assert mask_iou(back > 0.5, mask, valid=visible) > tol
    assert mask_iou(mask_to_input(mask, geo), seen > 0.5) > tol
    # the visible area is the crop box
    bx0, by0, bx1, by1 = geo.box
    cols, rows = visible.any(0).nonzero()[:, 0], visible.any(1).nonzero()[:, 0]
    assert abs(cols.min() - max(bx0, 0)) <= 1 and abs(cols.max() + 1 - min(bx1, w)) <= 1
    assert abs(rows.min() - max(by0, 0)) <= 1 and abs(rows.max() + 1 - min(by1, h)) <= 1


def test_crop_geometry_known_numbers():
    geo = CropGeometry.from_data_config(CONFIGS["effnet"], (640, 480))
    # short side 480 -> floor(224 / 0.875) = 256, long side int(256 * 640 / 480) = 341; crop 224 centred
    assert geo.resized == (341, 256) and geo.crop == (58, 16, 224, 224)
    x0, y0, x1, y1 = geo.box  # the resize scales x by 341/640 (not exactly 256/480)
    assert (x0, y0) == pytest.approx((58 * 640 / 341, 16 * 480 / 256))
    assert (x1, y1) == pytest.approx((282 * 640 / 341, 240 * 480 / 256))
    with pytest.raises(ValueError, match="crop_mode"):
        CropGeometry.from_data_config({**CONFIGS["effnet"], "crop_mode": "border"}, (640, 480))


def test_grid_to_image_is_bilinear_interpolate_when_nothing_is_cropped():
    grid = torch.randn(2, 7, 7)
    geo = CropGeometry.identity((224, 224))
    torch.testing.assert_close(grid_to_image(grid, geo), upsample_grid(grid, (224, 224)), rtol=1e-5, atol=1e-5)
    ref = F.interpolate(grid[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(upsample_grid(grid, (224, 224)), ref)
    # crop_pct 1 on a square image of the input size is the identity too
    geo1 = CropGeometry.from_data_config({**CONFIGS["effnet"], "crop_pct": 1.0}, (224, 224))
    assert geo1 == geo


def _patch_mask(geo, grid, patches):
    """Original-image mask of the given (row, col) patches of the model input."""
    rows, cols = grid
    (w, h), (_, _, cw, ch) = geo.image_size, geo.crop
    x, y = geo.to_input(torch.arange(w) + 0.5, torch.arange(h) + 0.5)
    r, c = (y * rows / ch).floor().long(), (x * cols / cw).floor().long()
    inside = ((x >= 0) & (x < cw))[None] & ((y >= 0) & (y < ch))[:, None]
    m = torch.zeros(h, w, dtype=torch.bool)
    for pr, pc in patches:
        m |= (r[:, None] == pr) & (c[None, :] == pc)
    return m & inside


@pytest.mark.parametrize("size", [(300, 200), (224, 224), (500, 700)])
def test_iou_of_synthetic_grids(size):
    geo = CropGeometry.from_data_config(CONFIGS["effnet"], size)
    block = [(r, c) for r in (1, 2) for c in (2, 3)]  # 4 of 49 patches
    obj = _patch_mask(geo, (7, 7), block)
    q = 100 * (1 - 4 / 49)  # the percentile at which the mask has the object's area
    on = torch.zeros(7, 7)
    on[1:3, 2:4] = 1.0
    hm = grid_to_image(on, geo)
    valid = torch.isfinite(hm)
    act = activation_mask(hm, q)
    assert mask_iou(act, obj, valid) > 0.85  # not 1: bilinear upsampling rounds the block's corners
    yx = [torch.stack(torch.nonzero(m, as_tuple=True)).double().mean(1) for m in (act, obj)]
    torch.testing.assert_close(yx[0], yx[1], atol=1.0, rtol=0)  # ... but puts it in the right place
    off = torch.zeros(7, 7)
    off[4:6, 4:6] = 1.0
    assert mask_iou(activation_mask(grid_to_image(off, geo), q), obj, valid) == 0.0
    # transposing the grid (a row/column mix-up) would not find the object
    assert mask_iou(activation_mask(grid_to_image(on.T, geo), q), obj, valid) < 0.5


def test_activation_mask_and_mask_iou():
    torch.manual_seed(0)
    hm = torch.rand(100, 200)
    hm[:, :20] = float("nan")
    m = activation_mask(hm)
    assert not m[:, :20].any() and abs(m.sum().item() - 0.05 * 100 * 180) <= 2
    assert (hm[m].min() >= hm[~m & torch.isfinite(hm)].max())
    a = torch.zeros(10, 10, dtype=torch.bool)
    b = a.clone()
    a[:, :4] = True
    b[:, 2:6] = True  # intersection 20, union 60
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    valid = torch.zeros(10, 10, dtype=torch.bool)
    valid[:, :3] = True  # only columns 0-2: a has 30, b has 10 (column 2), intersection 10
    assert mask_iou(a, b, valid) == pytest.approx(1 / 3)
    assert np.isnan(mask_iou(torch.zeros_like(a), torch.zeros_like(a)))
    with pytest.raises(ValueError, match="percentile"):
        activation_mask(hm, 101)


def test_coco_category_mask_is_the_union_of_instances(tmp_path):
    def poly(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    ann = {
        "images": [{"id": 7, "width": 60, "height": 40, "file_name": "x.jpg"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "segmentation": poly(5, 5, 20, 20), "area": 225,
             "bbox": [5, 5, 15, 15], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 18, "segmentation": poly(30, 10, 50, 30), "area": 400,
             "bbox": [30, 10, 20, 20], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 17, "segmentation": poly(0, 30, 10, 40), "area": 100,
             "bbox": [0, 30, 10, 10], "iscrowd": 0},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    dog = coco_category_mask(path, 7, "dog")
    expected = torch.zeros(40, 60, dtype=torch.bool)
    expected[5:20, 5:20] = True
    expected[10:30, 30:50] = True
    assert dog.shape == (40, 60) and mask_iou(dog, expected) > 0.85
    assert not dog[30:, :10].any()  # the cat is not a dog
    assert coco_category_mask(path, 7, 17)[32:38, 2:8].all()
    with pytest.raises(ValueError, match="unknown COCO category"):
        coco_category_mask(path, 7, "zebra")
    with pytest.raises(ValueError, match="differs from the annotation"):
        coco_category_mask(path, 7, "dog", image_size=(40, 60))
    # a trimmed file without image sizes: the same masks, given the size
    del ann["images"][0]["width"], ann["images"][0]["height"]
    ann["annotations"].append({"id": 4, "image_id": 7, "category_id": 18, "iscrowd": 1, "area": 16,
                               "bbox": [0, 0, 4, 4],
                               "segmentation": {"size": [40, 60], "counts": [0, 4, 36, 4, 36, 4, 36, 4, 36 + 40 * 56]}})
    trimmed = tmp_path / "trimmed.json"
    trimmed.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="pass image_size"):
        coco_category_mask(trimmed, 7, "dog")
    dog2 = coco_category_mask(trimmed, 7, "dog", image_size=(60, 40))
    crowd = torch.zeros(40, 60, dtype=torch.bool)
    crowd[:4, :4] = True  # column-major RLE: 4 ones, then 36 zeros, per column, for 4 columns
    assert torch.equal(dog2, dog | crowd)


def test_empty_coco_mask_warns_naming_image_and_category(tmp_path):
    ann = {"images": [{"id": 7, "width": 20, "height": 10}, {"id": 8, "width": 20, "height": 10}],
           "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "area": 25, "bbox": [0, 0, 5, 5], "iscrowd": 0,
                            "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    with pytest.warns(UserWarning, match=r"category 'cat' \(17\) in image 7 is empty: the image has no 'cat' annotation"):
        cat = coco_category_mask(path, 7, "cat")
    assert cat.shape == (10, 20) and not cat.any()
    with pytest.warns(UserWarning, match=r"'dog' \(18\) in image 8 is empty: the image has no annotations at all"):
        assert not coco_category_mask(path, 8, 18).any()
    ann["annotations"][0]["segmentation"] = {"size": [10, 20], "counts": [200]}  # an RLE of zeros only
    path.write_text(json.dumps(ann))
    with pytest.warns(UserWarning, match="in image 7 is empty: its annotations cover no pixel"):
        assert not coco_category_mask(path, 7, "dog").any()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a mask with pixels: no warning
        ann["annotations"][0]["segmentation"] = [[0, 0, 5, 0, 5, 5, 0, 5]]
        path.write_text(json.dumps(ann))
        assert coco_category_mask(path, 7, "dog").any()


def test_object_for_noun(tmp_path):
    from pycocotools.coco import COCO

    ann = {"images": [{"id": 1, "width": 10, "height": 10}, {"id": 2, "width": 10, "height": 10}],
           "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "hot dog"}, {"id": 4, "name": "bus"}],
           "annotations": [{"id": i, "image_id": 1, "category_id": c, "area": a, "bbox": [0, 0, 1, 1], "iscrowd": 0,
                            "segmentation": [[0, 0, 1, 0, 1, 1]]} for i, (c, a) in enumerate([(1, 5), (3, 2), (4, 9)])]}
    path = tmp_path / "i.json"
    path.write_text(json.dumps(ann))
    coco = COCO(str(path))
    assert object_for_noun(coco, 1, "Skier") == (1, "person", "noun")
    assert object_for_noun(coco, 1, "dogs") == (3, "hot dog", "noun")  # last word, plural
    assert object_for_noun(coco, 1, "buses") == (4, "bus", "noun")
    assert object_for_noun(coco, 1, "tree") == (4, "bus", "largest")
    assert object_for_noun(coco, 1, None) == (4, "bus", "largest")
    assert object_for_noun(coco, 2, "bus") is None  # no annotations


def test_unit_grids_match_the_cache(vlm_on, pixels):
    units = torch.tensor([[0, 5], [3, 100], [11, 3071]])
    grids = unit_grid_activations(vlm_on, pixels, units)
    assert grids.shape == (3, 3, 4, 4) and vlm_on.vision.grid == (4, 4)
    with torch.no_grad():
        _, cache = vlm_on.run_with_cache("A picture of a", images=pixels)  # with a prompt: same image activations
    for i, (layer, k) in enumerate(units.tolist()):
        ref = cache[f"blocks.{layer}.mlp.hook_post"][:, vlm_on.image_positions, k].reshape(3, 4, 4)
        torch.testing.assert_close(grids[:, i], ref, rtol=1e-4, atol=1e-5)
    per_image = torch.stack([units, units.flip(0), units[[1, 0, 2]]])
    g2 = unit_grid_activations(vlm_on, pixels, per_image, hook="hook_pre")
    torch.testing.assert_close(g2[1, 0], cache["blocks.11.mlp.hook_pre"][1, :16, 3071].reshape(4, 4),
                               rtol=1e-4, atol=1e-5)


def test_unit_heatmap_on_a_pil_image(vlm_on):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    hm = unit_heatmap(vlm_on, image, layer=2, unit=7)
    assert hm.heatmap.shape == (50, 70) and hm.grid.shape == (4, 4)
    geo = CropGeometry.from_data_config(vlm_on.vision.data_config, image.size)
    torch.testing.assert_close(hm.grid, unit_grid_activations(vlm_on, vlm_on.preprocess(image), [(2, 7)])[0, 0])
    assert geo.resized == (49, 35) and geo.crop == (8, 2, 32, 32)  # 70x50: short side -> floor(32/0.9) = 35
    x0, y0, x1, y1 = geo.box  # outside the crop box the heatmap is NaN
    inside = torch.zeros(50, 70, dtype=torch.bool)
    inside[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)] = True
    assert torch.isfinite(hm.heatmap[inside]).all()
    outside = torch.ones(50, 70, dtype=torch.bool)
    outside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = False
    assert torch.isnan(hm.heatmap[outside]).all() and outside.any()
    obj = torch.zeros(50, 70, dtype=torch.bool)
    obj[10:30, 20:40] = True
    assert 0 <= hm.iou(obj) <= 1
    assert isinstance(hm.plot(obj), matplotlib.figure.Figure)
    assert len(hm.to_dataframe()) == 16 and repr(hm).startswith("UnitHeatmap(L2.7, 4x4 grid on a 70x50 image")
    res = heatmap_ious(vlm_on, [image, image], [(2, 7), (5, 1)], [obj, obj])
    assert res.iou.shape == (2, 2) and res.iou[0, 0].item() == pytest.approx(hm.iou(obj))
    assert len(res.to_dataframe()) == 4
