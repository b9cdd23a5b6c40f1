"""The dataset runner with an SAE (``attribute --sae``): the shards hold what ``attribute(..., sae=sae).top_units(k)``
gives on the whole dataset at once, and two ``accelerate`` processes write the same rows as one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_multimodal import load_coco_mini
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.sae.load import load_sae, save_sae
from tl_multimodal.sae.model import SAE, SAEConfig
from tl_multimodal.training.runner import load_rows, run_attribution

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from test_runner import _assert_rows_equal, _coco_folder, _images, build_tiny_vlm, model_factory  # noqa: E402

K = 5


@pytest.fixture(scope="module")
def model(backend):
    return build_tiny_vlm(backend=backend)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 32, 40
    params = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "b_enc": torch.full((d_sae,), 0.3),
              "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g) * 0.1}
    sae = SAE(SAEConfig("standard", d_in, d_sae, "blocks.0.hook_resid_post"), params)
    return save_sae(sae, tmp_path_factory.mktemp("sae") / "sae")


def test_runner_with_an_sae_one_and_two_processes(backend, model, sae_dir, tmp_path):
    images = _images(6)
    attr = attribute(model, images, batch_size=len(images), sae=load_sae(sae_dir, dtype=torch.float64))
    tops = attr.top_units(K)
    img = tops.image_index.numpy()
    oracle = {"image_index": img, "image_id": 1000 + img, "caption": np.array(attr.captions)[img],
              "target": np.array(attr.targets)[img], "target_id": attr.target_ids.numpy()[img],
              "position": attr.positions.numpy()[img], "y": attr.y.numpy()[img], "rank": tops.rank.numpy(),
              "layer": tops.layer.numpy(), "unit": tops.unit.numpy(), "patch": tops.patch.numpy(),
              "score": tops.score.numpy()}
    assert (tops.layer == 0).all() and tops.unit.max() < 40 and np.abs(oracle["score"]).max() > 0

    data = _coco_folder(tmp_path / "coco", images)
    factory = model_factory(tmp_path, model, backend)
    args = ["attribute", str(data), "--split", "dev", "--k", str(K), "--shard-size", "2", "--model", factory,
            "--no-progress", "--sae", str(sae_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    two = subprocess.run([*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tl_multimodal", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0/2: 2 shards written" in two.stdout and "rank 1/2: 1 shards written" in two.stdout, two.stdout
    one = subprocess.run([sys.executable, "-m", "tl_multimodal", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_rows(tmp_path / "one"), load_rows(tmp_path / "two")
    assert a.equals(b)
    _assert_rows_equal(a, oracle)  # the runner loads the SAE in the model's dtype (float64 here)
    assert json.loads((tmp_path / "one" / "_run.json").read_text())["sae"] == str(sae_dir.resolve())
    # another SAE into the same folder is refused (the record names it)
    other = shutil.copytree(sae_dir, tmp_path / "other_sae")
    with pytest.raises(ValueError, match="sae: "):
        run_attribution(model, load_coco_mini(data, "dev"), tmp_path / "one", k=K, shard_size=2, sae=str(other),
                        data_source=str(data.resolve()), split="dev", model_spec=factory, rank=0,
                        world_size=1, progress=False)
