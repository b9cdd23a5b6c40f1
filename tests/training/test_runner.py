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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_part-000000000-000000003.json", "_run.json",
                                                          shard_name(0, 3)]
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
    with pytest.raises(ValueError, match=r"another run \(shard_size: 2 -> 3\); .*restart=True \(--restart\)"):
        run_attribution(model, dataset, tmp_path, k=K, shard_size=3, rank=0, world_size=1, progress=False)
    (tmp_path / shard_name(2, 3)).write_bytes((tmp_path / shard_name(2, 4)).read_bytes())
    with pytest.raises(ValueError, match="overlap"):
        load_rows(tmp_path)
    with pytest.raises(ValueError, match=r"another run \(k: 5 -> 6\)"):
        run_attribution(model, dataset, tmp_path, k=6, shard_size=2, rank=0, world_size=1, progress=False)


def test_run_json_records_the_config_and_names_what_differs(model, dataset, tmp_path):
    config = RunConfig(k=K, shard_size=1, limit=1, prompt="A photo of")
    run_attribution(model, dataset, tmp_path, config, rank=0, world_size=1, progress=False)
    record = json.loads((tmp_path / "_run.json").read_text())
    settings = {k: v for k, v in config.to_dict().items() if k not in ("data_source", "split", "limit")}
    assert record == {**settings, "data": {"source": None, "split": None, "limit": 1}, "lm": "tiny",
                      "encoder": "vit_tiny_32", "bos": False, "n_image_tokens": 16,
                      "projection_id": projection_id(model.projection)}
    again = run_attribution(model, dataset, tmp_path, config, batch_size=1, rank=0, world_size=1, progress=False)
    assert again.shards_skipped == 1  # batch_size does not change the rows
    with pytest.raises(ValueError, match=r"another run \(prompt: 'A photo of' -> 'A picture of'; "
                                         r"data.source: None -> 'coco'\)"):
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


def _coco_folder(root: Path, images, splits=None) -> Path:
    """``images`` as a coco_mini-style folder, ids 1000, 1001, ...; ``splits``: each image's (default all dev)."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i, im in enumerate(images):
        im.save(root / "images" / f"{1000 + i}.png")
        lines.append(json.dumps({"file_name": f"images/{1000 + i}.png", "image_id": 1000 + i,
                                 "split": "dev" if splits is None else splits[i], "captions": ["a photo"]}))
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
    factory = model_factory(tmp_path, model, backend)
    s = run_attribute(build_parser().parse_args([
        "attribute", str(data), "--split", "dev", "--out", str(tmp_path / "out"), "--k", str(K),
        "--shard-size", "4", "--model", factory, "--no-progress"]))
    assert (s.rank, s.world_size, s.images) == (0, 1, 7)
    _assert_rows_equal(load_rows(tmp_path / "out"), oracle)
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert record["data"] == {"source": str(data.resolve()), "split": "dev", "limit": None}
    assert RunConfig.from_dict({k: v for k, v in record.items() if k in RunConfig.names()}) == RunConfig(
        k=K, shard_size=4, model_spec=factory)
    assert {k: record[k] for k in ("lm", "encoder", "bos", "n_image_tokens", "projection_id")} == {
        "lm": "tiny", "encoder": "vit_tiny_32", "bos": False, "n_image_tokens": 16,
        "projection_id": projection_id(model.projection)}
    with pytest.raises(FileNotFoundError, match="no/such/thing does not exist"):
        run_attribute(build_parser().parse_args(["attribute", "no/such/thing", "--out", str(tmp_path / "o2")]))
    with pytest.raises(ValueError, match="--split"):  # `name` or `owner/name`: a hub dataset
        run_attribute(build_parser().parse_args(["attribute", "no_such_thing", "--out", str(tmp_path / "o2")]))


def test_two_accelerate_processes_write_the_same_rows_as_one(backend, model, images, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m tl_multimodal attribute`` (torchrun, 2 CPU
    processes over gloo) and the acceptance command ``accelerate launch --cpu --num_processes 2 ...
    --limit 4`` (accelerate starts one process; it relaunches itself as two) vs ``python -m tl_multimodal``."""
    data = _coco_folder(tmp_path / "coco", images)
    factory = model_factory(tmp_path, model, backend)
    args = ["attribute", str(data), "--split", "dev", "--k", str(K), "--shard-size", "2",
            "--model", factory, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    two = subprocess.run([*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tl_multimodal", *args,
                          "--limit", "6", "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0/2: 2 shards written" in two.stdout and "rank 1/2: 1 shards written" in two.stdout, two.stdout
    first = load_rows(tmp_path / "two")
    again = subprocess.run([*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tl_multimodal", *args,
                            "--limit", "6", "--out", str(tmp_path / "two"), "--restart"], env=env, capture_output=True,
                           text=True, timeout=600)  # rank 0 deletes the run, rank 1 waits, both write theirs again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rank 0/2: 2 shards written" in again.stdout and "rank 1/2: 1 shards written" in again.stdout, again.stdout
    assert load_rows(tmp_path / "two").equals(first)
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


# ---------------------------------------------------------------------------- fingerprints and damaged shards
def model_factory(tmp_path: Path, model, backend: str) -> str:
    """A ``--model`` factory rebuilding ``model`` from its saved weights."""
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    factory = tmp_path / "factory.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests' / 'training')!r})\nfrom test_runner import "
                       f"build_tiny_vlm\ndef build():\n    return build_tiny_vlm({str(weights)!r}, {backend!r})\n")
    return f"{factory}:build"


def _subset(oracle: dict, image_indices: list[int]) -> dict:
    """The oracle's rows of the images ``image_indices``, in that order, numbered from 0 and with ids from 1000
    as in a folder of those images alone."""
    where = [np.flatnonzero(oracle["image_index"] == i) for i in image_indices]
    rows = {c: np.concatenate([v[w] for w in where]) for c, v in oracle.items()}
    rows["image_index"] = np.repeat(np.arange(len(where)), [len(w) for w in where])
    rows["image_id"] = 1000 + rows["image_index"]
    return rows


def test_a_rerun_on_other_data_split_or_limit_never_returns_the_old_rows(backend, model, images, oracle, tmp_path):
    """The acceptance case: a finished --out rerun with another --split, another DATA folder or a smaller
    --limit is refused, naming the field (old -> new), and leaves the old run whole; --restart gives exactly
    the new run's rows (oracle: one ``attribute`` call over all the images)."""
    data = _coco_folder(tmp_path / "coco", images, splits=["dev"] * 4 + ["train"] * 3)
    other = _coco_folder(tmp_path / "other", images[::-1])
    out = tmp_path / "out"
    spec = model_factory(tmp_path, model, backend)

    def run(*args):
        return run_attribute(build_parser().parse_args(["attribute", *args, "--out", str(out), "--k", str(K),
                                                        "--shard-size", "2", "--model", spec, "--no-progress"]))

    run(str(data), "--split", "dev")
    _assert_rows_equal(load_rows(out), _subset(oracle, [0, 1, 2, 3]))
    refusals = {("--split", "train"): r"data.split: 'dev' -> 'train'",
                ("--split", "dev", "--limit", "3"): r"data.limit: None -> 3",
                (): r"data.split: 'dev' -> None"}
    for args, message in refusals.items():
        with pytest.raises(ValueError, match=r"holds shards of another run \(" + message + r"\); .*--restart"):
            run(str(data), *args)
    with pytest.raises(ValueError, match=f"data.source: '{data.resolve()}' -> '{other.resolve()}'"):
        run(str(other), "--split", "dev")
    _assert_rows_equal(load_rows(out), _subset(oracle, [0, 1, 2, 3]))  # the refused runs changed nothing

    s = run(str(data), "--split", "train", "--restart")
    assert (s.shards_written, s.shards_skipped) == (2, 0)
    _assert_rows_equal(load_rows(out), _subset(oracle, [4, 5, 6]) | {"image_id": np.repeat([1004, 1005, 1006], K)})

    run(str(other), "--split", "dev", "--restart", "--limit", "5")  # the issue's --limit 10 then --limit 6
    with pytest.raises(ValueError, match=r"data.limit: 5 -> 3"):
        run(str(other), "--split", "dev", "--limit", "3")
    s = run(str(other), "--split", "dev", "--limit", "3", "--restart")
    assert sorted(p.name for p in out.glob("part-*")) == [shard_name(0, 2), shard_name(2, 3)]
    _assert_rows_equal(load_rows(out), _subset(oracle, [6, 5, 4]))  # other's images 0, 1, 2 are images 6, 5, 4
    s = run(str(other), "--split", "dev", "--limit", "6")  # a larger limit extends the run
    assert (s.shards_skipped, s.shards_written) == (1, 2)
    assert load_rows(out).image_index.unique().tolist() == list(range(6))


def test_the_library_refuses_other_rows_in_a_finished_folder(model, dataset, images, tmp_path, monkeypatch):
    """Without a recorded source (the caller passes rows), the image ids each shard was made from tell
    another dataset of the same size; the other layout is refused; ``restart=True`` starts over, sparing
    files that are not the run's."""
    kw = dict(k=K, shard_size=4, rank=0, world_size=1, progress=False)
    run_attribution(model, dataset, tmp_path, **kw)
    with monkeypatch.context() as m:
        m.setattr(model.projection.info, "bos", True)  # [BOS][image][text] instead of [image][text]
        with pytest.raises(ValueError, match=r"another run \(bos: False -> True; projection_id: '\w+' -> '\w+'\)"):
            run_attribution(model, dataset, tmp_path, **kw)
    shuffled = dataset.select([1, 0, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match=f"shard {tmp_path / shard_name(0, 4)} was made from other images"):
        run_attribution(model, shuffled, tmp_path, **kw)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".part-000000000-000000004.parquet.x1.tmp").write_bytes(b"left by a killed run")
    s = run_attribution(model, shuffled, tmp_path, restart=True, **kw)
    assert (s.shards_written, s.shards_skipped) == (2, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "_part-000000000-000000004.json", "_part-000000004-000000007.json", "_run.json", "notes.txt",
        shard_name(0, 4), shard_name(4, 7)]
    assert load_rows(tmp_path).image_id.unique().tolist() == [1001, 1000, 1002, 1003, 1004, 1005, 1006]
    with pytest.raises(TypeError, match="restart must be True or False"):
        run_attribution(model, dataset, tmp_path, restart="yes", **kw)
    (tmp_path / "_run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"_run.json is damaged .*restart=True"):
        run_attribution(model, dataset, tmp_path, **kw)


def test_damaged_shards_are_recomputed_on_resume_and_named_by_load_rows(model, dataset, oracle, tmp_path):
    """Each shard's record (rows, bytes, SHA-256) is checked on resume: a truncated, a zeroed and an
    unrecorded shard are recomputed (with a warning), the intact one kept; load_rows names a damaged file
    instead of failing inside pyarrow."""
    kw = dict(k=K, shard_size=2, rank=0, world_size=1, progress=False)
    run_attribution(model, dataset, tmp_path, **kw)
    shards = [tmp_path / shard_name(a, min(a + 2, 7)) for a in range(0, 7, 2)]
    record = json.loads((tmp_path / "_part-000000000-000000002.json").read_text())
    assert record["rows"] == 2 * K and record["bytes"] == shards[0].stat().st_size
    content = shards[0].read_bytes()
    shards[0].write_bytes(content[: len(content) // 2])                   # truncated
    shards[1].write_bytes(bytes(shards[1].stat().st_size))                # zeroed, same size
    (tmp_path / "_part-000000004-000000006.json").unlink()                # no record (killed before it)
    stamp = shards[3].stat().st_mtime_ns
    with pytest.raises(ValueError, match=f"shard {shards[0]} is {len(content) // 2} bytes, its record says "
                                         f"{len(content)} .*rerun the same command"):
        load_rows(tmp_path)
    shards[0].write_bytes(content[: len(content) // 2])
    (tmp_path / "_part-000000000-000000002.json").unlink()
    with pytest.raises(ValueError, match=f"shard {shards[0]} is not a readable Parquet file"):
        load_rows(tmp_path)
    with pytest.warns(UserWarning) as caught:
        s = run_attribution(model, dataset, tmp_path, **kw)
    messages = sorted(str(w.message) for w in caught if w.category is UserWarning)  # not transformers' deprecations
    assert len(messages) == 3 and all("recomputing it" in m for m in messages)
    assert "does not match the SHA-256" in messages[1] and messages[0].count("has no record") == 1
    assert (s.shards_written, s.shards_recomputed, s.shards_skipped, s.images) == (3, 3, 1, 6)
    assert "3 of them damaged and recomputed" in repr(s)
    assert shards[3].stat().st_mtime_ns == stamp
    _assert_rows_equal(load_rows(tmp_path), oracle)
