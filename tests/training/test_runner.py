"""Oracles for tl_multimodal.training.runner: the shards hold exactly what ``attribute(...).top_units(k)`` gives
on the whole dataset at once; two ``accelerate`` processes write the same rows as one; a run stopped
after its first shard resumes without recomputing it; bad input is named."""

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image
from tl_multimodal import VisionEncoder, load_coco_mini
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.cli import build_parser
from tl_multimodal.models.projection import projection_id
from tl_multimodal.pretrained.load import load
from tl_multimodal.training.config import RunConfig
from tl_multimodal.training.runner import (SCHEMA_COLUMNS, load_rows, open_dataset, run_attribute, run_attribution,
                                           shard_name)

ROOT = Path(__file__).parents[2]
K = 5


def build_tiny_vlm(weights: str | None = None, backend: str | None = None):
    """A 2-layer GPT-2 LM (real GPT-2 tokenizer, seeded random weights, float64) behind a tiny ViT, on
    ``backend`` (``"hooked"`` or ``"bridge"``, :func:`conftest.build_vlm`; default as ``load``'s
    ``backend="auto"``: hooked where TransformerLens has HookedTransformer); or with ``weights``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import HookedTransformer, build_vlm, tiny_hf

    if backend is None:
        backend = "bridge" if HookedTransformer is None else "hooked"

    tok = transformers.GPT2TokenizerFast.from_pretrained(ROOT / "tests" / "assets" / "gpt2_tokenizer")
    torch.manual_seed(0)
    enc = VisionEncoder(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          embed_dim=64, depth=2, num_heads=2, num_classes=0), name="vit_tiny_32")
    hf = tiny_hf("gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=24, n_ctx=64, dtype=torch.float64, seed=0)
    model = build_vlm(backend, hf, tok, enc)
    model.projection.float()  # as ImageProjection.load gives it (test_cli compares trained projections with saved ones)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def model(backend):
    return build_tiny_vlm(backend=backend)


@pytest.fixture(scope="module")
def images():
    return _images(7)


@pytest.fixture(scope="module")
def dataset(images):
    return datasets.Dataset.from_dict({"image": images, "image_id": [1000 + i for i in range(len(images))]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "image_id": datasets.Value("int64")}))


@pytest.fixture(scope="module")
def oracle(model, images):
    """The whole dataset in one ``attribute`` call, top units per image: what the shards must hold."""
    attr = attribute(model, images, batch_size=len(images))
    tops = attr.top_units(K)
    img = tops.image_index.numpy()
    return {"image_index": img, "image_id": 1000 + img, "caption": np.array(attr.captions)[img],
            "target": np.array(attr.targets)[img], "target_id": attr.target_ids.numpy()[img],
            "position": attr.positions.numpy()[img], "y": attr.y.numpy()[img], "rank": tops.rank.numpy(),
            "layer": tops.layer.numpy(), "unit": tops.unit.numpy(), "patch": tops.patch.numpy(),
            "score": tops.score.numpy()}


def _assert_rows_equal(df, expected):
    assert list(df.columns) == list(SCHEMA_COLUMNS)
    assert len(df) == len(expected["rank"])
    for col in SCHEMA_COLUMNS:
        if col in ("y", "score"):
            np.testing.assert_allclose(df[col].to_numpy(), expected[col], rtol=1e-5, atol=1e-6, err_msg=col)
        else:
            np.testing.assert_array_equal(df[col].to_numpy(), expected[col], err_msg=col)


def test_shards_hold_the_top_units_of_every_image(model, dataset, oracle, tmp_path):
    s = run_attribution(model, dataset, tmp_path, k=K, shard_size=3, batch_size=2, rank=0, world_size=1,
                        progress=False)
    assert (s.shards_written, s.shards_skipped, s.images, s.rows) == (3, 0, 7, 7 * K)
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [shard_name(0, 3), shard_name(3, 6), shard_name(6, 7)]
    _assert_rows_equal(load_rows(tmp_path), oracle)
    assert "3 shards written" in repr(s)


@pytest.mark.parametrize("source", ["dataset", "stream"])
def test_ranks_split_the_chunks_and_their_union_is_one_run(model, dataset, images, oracle, tmp_path, source):
    """Chunk i goes to rank i % world_size; together the ranks write every chunk once (random-access
    datasets and streams of rows alike)."""
    if source == "stream":
        dataset = [{"image": im, "image_id": 1000 + i} for i, im in enumerate(images)]  # no len/select
    s0 = run_attribution(model, dataset, tmp_path, k=K, shard_size=2, rank=0, world_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [shard_name(0, 2), shard_name(4, 6)]
    s1 = run_attribution(model, dataset, tmp_path, k=K, shard_size=2, rank=1, world_size=2, progress=False)
    assert (s0.images, s1.images) == (4, 3)
    _assert_rows_equal(load_rows(tmp_path), oracle)


def test_stopped_run_resumes_without_recomputing_finished_shards(model, images, oracle, tmp_path):
    """An iterable of rows whose 5th image is broken stops the run inside the second shard: the first
    shard is on disk, nothing partial is; the fixed run skips the first shard and writes the rest."""
    rows = [{"image": im, "image_id": 1000 + i} for i, im in enumerate(images)]
    broken = rows[:4] + [{"image": Image.new("RGB", (0, 0)), "image_id": 1004}] + rows[5:]
    with pytest.raises(ValueError, match=r"images 4\.\.4 \(ids \[1004\]\)"):
        run_attribution(model, broken, tmp_path, k=K, shard_size=3, batch_size=1, rank=0, world_size=1,
                        progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name != "_run.json"] == [shard_name(0, 3)]
    first = tmp_path / shard_name(0, 3)
    stamp = first.stat().st_mtime_ns
    written = []
    s = run_attribution(model, rows, tmp_path, k=K, shard_size=3, batch_size=1, rank=0, world_size=1,
                        progress=False, on_shard=written.append)
    assert [p.name for p in written] == [shard_name(3, 6), shard_name(6, 7)]
    assert (s.shards_written, s.shards_skipped, s.images) == (2, 1, 4)
    assert first.stat().st_mtime_ns == stamp
    _assert_rows_equal(load_rows(tmp_path), oracle)
    again = run_attribution(model, rows, tmp_path, k=K, shard_size=3, rank=0, world_size=1, progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 3)


def test_limit_then_a_larger_limit_and_other_settings(model, dataset, oracle, tmp_path):
    """A larger limit later recomputes only the short last chunk (replacing its file) and the new ones."""
    s = run_attribution(model, dataset, tmp_path, k=K, shard_size=2, limit=3, rank=0, world_size=1, progress=False)
    assert s.images == 3
    _assert_rows_equal(load_rows(tmp_path), {c: v[: 3 * K] for c, v in oracle.items()})
    s = run_attribution(model, dataset, tmp_path, k=K, shard_size=2, limit=7, rank=0, world_size=1, progress=False)
    assert (s.shards_skipped, s.shards_written, s.images) == (1, 3, 5)
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [shard_name(0, 2), shard_name(2, 4), shard_name(4, 6),
                                                                shard_name(6, 7)]
    _assert_rows_equal(load_rows(tmp_path), oracle)
    with pytest.raises(ValueError, match="other settings.*'shard_size': \\(2, 3\\)"):
        run_attribution(model, dataset, tmp_path, k=K, shard_size=3, rank=0, world_size=1, progress=False)
    (tmp_path / shard_name(2, 3)).write_bytes((tmp_path / shard_name(2, 4)).read_bytes())
    with pytest.raises(ValueError, match="overlap"):
        load_rows(tmp_path)
    with pytest.raises(ValueError, match="other settings.*'k': \\(5, 6\\)"):
        run_attribution(model, dataset, tmp_path, k=6, shard_size=2, rank=0, world_size=1, progress=False)


def test_run_json_records_the_config_and_names_what_differs(model, dataset, tmp_path):
    config = RunConfig(k=K, shard_size=1, limit=1, prompt="A photo of")
    run_attribution(model, dataset, tmp_path, config, rank=0, world_size=1, progress=False)
    record = json.loads((tmp_path / "_run.json").read_text())
    assert {k: record[k] for k in RunConfig.names()} == config.to_dict()
    assert record["projection_id"] == projection_id(model.projection) and record["bos"] is False
    again = run_attribution(model, dataset, tmp_path, config, batch_size=1, rank=0, world_size=1, progress=False)
    assert again.shards_skipped == 1  # batch_size does not change the rows
    with pytest.raises(ValueError, match=r"other settings \({'prompt': \('A photo of', 'A picture of'\), "
                                         r"'data_source': \(None, 'coco'\)}"):
        run_attribution(model, dataset, tmp_path, config, prompt="A picture of", data_source="coco", rank=0,
                        world_size=1)
    with pytest.raises(TypeError, match="unknown RunConfig setting kk; the settings are: k, shard_size"):
        run_attribution(model, dataset, tmp_path, kk=3, rank=0, world_size=1)
    assert RunConfig.from_dict(config.to_dict()) == config and repr(config) == (
        "RunConfig(k=5, shard_size=1, limit=1, prompt='A photo of')")


def test_bad_input_is_named(model, dataset, tmp_path):
    kw = dict(rank=0, world_size=1, progress=False)
    with pytest.raises(ValueError, match="k must be"):
        run_attribution(model, dataset, tmp_path, k=0, **kw)
    with pytest.raises(ValueError, match="shard_size must be"):
        run_attribution(model, dataset, tmp_path, shard_size=0, **kw)
    with pytest.raises(ValueError, match="limit must be"):
        run_attribution(model, dataset, tmp_path, limit=-1, **kw)
    with pytest.raises(ValueError, match="rank must be in"):
        run_attribution(model, dataset, tmp_path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="both rank= and world_size="):
        run_attribution(model, dataset, tmp_path, rank=0)
    with pytest.raises(ValueError, match="image_column 'pixels' is not in the dataset"):
        run_attribution(model, dataset, tmp_path / "a", image_column="pixels", **kw)
    with pytest.raises(TypeError, match="HookedVisionPrefix"):
        run_attribution(object(), dataset, tmp_path, **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_attribution(model, dataset, tmp_path / "file", **kw)
    with pytest.raises(ValueError, match="DATA must be"):
        open_dataset(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "missing.tar")
    with pytest.raises(ValueError, match="unknown model spec 'tiny'"):
        load("tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(f"{tmp_path / 'nope.py'}:build")


def _coco_folder(root: Path, images) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i, im in enumerate(images):
        im.save(root / "images" / f"{1000 + i}.png")
        lines.append(json.dumps({"file_name": f"images/{1000 + i}.png", "image_id": 1000 + i,
                                 "split": "dev", "captions": ["a photo"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_webdataset_shards_give_the_same_rows(model, images, oracle, tmp_path):
    tar = tmp_path / "shard-00000.tar"
    with tarfile.open(tar, "w") as t:
        for i, im in enumerate(images):
            buf = BytesIO()
            im.save(buf, format="PNG")
            for name, data in ((f"{1000 + i}.png", buf.getvalue()), (f"{1000 + i}.txt", b"a photo")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, BytesIO(data))
    data = open_dataset(tar)
    run_attribution(model, data, tmp_path / "out", k=K, shard_size=4, rank=0, world_size=1, progress=False)
    df = load_rows(tmp_path / "out")
    assert df.image_id.tolist() == [str(i) for i in oracle["image_id"]]
    _assert_rows_equal(df.assign(image_id=df.image_id.astype(int)), oracle)


def test_command_line_one_process(backend, model, images, oracle, tmp_path):
    data = _coco_folder(tmp_path / "coco", images)
    assert len(open_dataset(data, "dev")) == len(load_coco_mini(data, "dev")) == 7
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    factory = tmp_path / "factory.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests' / 'training')!r})\nfrom test_runner import build_tiny_vlm\n"
                       f"def build():\n    return build_tiny_vlm({str(weights)!r}, {backend!r})\n")
    s = run_attribute(build_parser().parse_args([
        "attribute", str(data), "--split", "dev", "--out", str(tmp_path / "out"), "--k", str(K),
        "--shard-size", "4", "--model", f"{factory}:build", "--no-progress"]))
    assert (s.rank, s.world_size, s.images) == (0, 1, 7)
    _assert_rows_equal(load_rows(tmp_path / "out"), oracle)
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert RunConfig.from_dict({k: v for k, v in record.items() if k in RunConfig.names()}) == RunConfig(
        k=K, shard_size=4, data_source=str(data.resolve()), split="dev", model_spec=f"{factory}:build")
    assert {k: record[k] for k in ("lm", "encoder", "bos", "projection_id")} == {
        "lm": "tiny", "encoder": "vit_tiny_32", "bos": False, "projection_id": projection_id(model.projection)}
    with pytest.raises(FileNotFoundError, match="no/such/thing does not exist"):
        run_attribute(build_parser().parse_args(["attribute", "no/such/thing", "--out", str(tmp_path / "o2")]))
    with pytest.raises(ValueError, match="--split"):  # `name` or `owner/name`: a hub dataset
        run_attribute(build_parser().parse_args(["attribute", "no_such_thing", "--out", str(tmp_path / "o2")]))


def test_two_accelerate_processes_write_the_same_rows_as_one(backend, model, images, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m tl_multimodal attribute`` (torchrun, 2 CPU
    processes over gloo) and the acceptance command ``accelerate launch --cpu --num_processes 2 ...
    --limit 4`` (accelerate starts one process; it relaunches itself as two) vs ``python -m tl_multimodal``."""
    data = _coco_folder(tmp_path / "coco", images)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    factory = tmp_path / "factory.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests' / 'training')!r})\nfrom test_runner import build_tiny_vlm\n"
                       f"def build():\n    return build_tiny_vlm({str(weights)!r}, {backend!r})\n")
    args = ["attribute", str(data), "--split", "dev", "--k", str(K), "--shard-size", "2",
            "--model", f"{factory}:build", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    two = subprocess.run([*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tl_multimodal", *args,
                          "--limit", "6", "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0/2: 2 shards written" in two.stdout and "rank 1/2: 1 shards written" in two.stdout, two.stdout
    cpu = subprocess.run([*accelerate, "--cpu", "--num_processes", "2", "-m", "tl_multimodal", *args, "--limit", "4",
                          "--out", str(tmp_path / "cpu")], env=env, capture_output=True, text=True, timeout=600)
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    assert "relaunching as 2 CPU processes" in cpu.stderr, cpu.stderr[-3000:]
    assert "rank 0/2: 1 shards written" in cpu.stdout and "rank 1/2: 1 shards written" in cpu.stdout, cpu.stdout
    one = subprocess.run([sys.executable, "-m", "tl_multimodal", *args, "--limit", "6", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "rank 0/1: 3 shards written" in one.stdout, one.stdout
    a, b, c = load_rows(tmp_path / "one"), load_rows(tmp_path / "two"), load_rows(tmp_path / "cpu")
    assert len(a) == 6 * K and a.image_id.tolist() == sorted(a.image_id.tolist())
    assert a.equals(b)
    assert sorted(p.name for p in (tmp_path / "cpu").glob("part-*")) == [shard_name(0, 2), shard_name(2, 4)]
    assert a[a.image_index < 4].equals(c)


def test_accelerate_cpu_without_a_process_count_fails_loudly(monkeypatch, tmp_path, capsys):
    """The one process of ``accelerate launch --cpu`` whose N cannot be read (here the parent is not
    accelerate) must not run as 1 process: the command stops before any work, naming what works."""
    from tl_multimodal.cli import main
    from tl_multimodal.training._distributed import partial_state, requested_processes

    assert requested_processes(["python", "accelerate", "launch", "--cpu", "--num_processes", "3", "-m", "x"]) == 3
    assert requested_processes(["accelerate", "launch", "--num-processes=4", "x.py"]) == 4
    assert requested_processes(["accelerate", "launch", "--cpu", "x.py"]) is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["attribute", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "accelerate launch --multi_gpu --num_processes N -m tl_multimodal" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match="started only ONE process"):
        partial_state()
