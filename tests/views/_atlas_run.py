"""A small attribution run (4 images, the tiny 2-layer model of the runner's tests) and its atlas, made
through the command lines ``tl-multimodal attribute`` and ``tl-multimodal atlas``, once per backend."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).parents[2]
N_IMAGES, K = 4, 6


def jpeg_folder(data: Path, first_id: int, seed: int) -> Path:
    """:data:`N_IMAGES` random JPEG files of different sizes in a coco_mini-style folder (split dev), ids from
    ``first_id``."""
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, (h, w) in enumerate([(40, 52), (64, 48), (36, 36), (50, 80)]):
        image_id = first_id + i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / "images" / f"{image_id}.jpg")
        lines.append(json.dumps({"file_name": f"images/{image_id}.jpg", "image_id": image_id, "split": "dev",
                                 "captions": ["a photo"]}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture(scope="module")
def atlas_run(backend, tmp_path_factory):
    """``(model, data folder, run folder, site folder, stdout of atlas)``: JPEG files of different sizes
    in a coco_mini-style folder, attributed and made into an atlas by the command line."""
    sys.path.insert(0, str(ROOT / "tests" / "training"))
    from test_runner import build_tiny_vlm, model_factory

    from tl_multimodal.cli import main

    root = tmp_path_factory.mktemp(f"atlas_{backend}")
    model = build_tiny_vlm(backend=backend)
    factory = model_factory(root, model, backend)
    data = jpeg_folder(root / "coco", 2000, seed=0)
    run, site = root / "run", root / "site"
    assert main(["attribute", str(data), "--split", "dev", "--out", str(run), "--k", str(K), "--batch-size", "2",
                 "--model", factory, "--no-progress"]) == 0
    assert main(["atlas", str(run), "-o", str(site), "--units-per-page", "5", "--images-per-unit", "3",
                 "--units-per-image", "4", "--no-progress"]) == 0
    return model, data, run, site
