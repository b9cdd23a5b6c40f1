"""The command line answers at once: help, option errors and bad input files never load a model.

Each bad-input case runs ``tl-multimodal`` in a new process through a small runner that, after
``main`` returns, fails if torch was imported: the error came before any model could load.
The end-to-end test captions real files with the offline model and compares with ``model.caption``.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_multimodal import cli
from test_io import immutable  # noqa: F401  (a fixture: a folder chattr +i makes unwritable, even for root)

REPO = Path(__file__).resolve().parents[1]
# Runs main(argv); exit code 99 if torch got imported on the way.
RUNNER = ("import sys\nfrom tl_multimodal.cli import main\nrc = main(sys.argv[1:])\n"
          "sys.exit(99 if 'torch' in sys.modules else rc)\n")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def run(*args: str, runner: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", RUNNER, *args] if runner else [sys.executable, "-m", "tl_multimodal", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """good/ (two images, a text file, sub/ with one image), a text file, a fake .jpg, bad/ (a truncated
    PNG), an empty folder and coco/ (a coco_mini-style folder of 4 images, split dev, the third a truncated JPEG)."""
    root = tmp_path_factory.mktemp("cli_inputs")
    rng = np.random.default_rng(0)
    (root / "good" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "good" / name)
    Image.new("RGB", (8, 8)).save(root / "good" / "sub" / "c.png")
    (root / "good" / "notes.txt").write_text("skipped in a folder")
    (root / "notes.txt").write_text("not an image")
    (root / "fake.jpg").write_text("not an image either")
    png = (root / "good" / "b.png").read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "empty").mkdir()
    _coco_folder(root / "coco", n=4, damaged=2)
    return root


def _coco_folder(root: Path, n: int, damaged: int | None = None) -> Path:
    """A coco_mini-style folder of ``n`` random JPEGs (split dev); image ``damaged`` cut to half its bytes."""
    import json

    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
    if damaged is not None:
        jpeg = root / "images" / f"{damaged}.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (root / "metadata.jsonl").write_text("".join(json.dumps(
        {"file_name": f"images/{i}.jpg", "image_id": i, "split": "dev", "captions": [f"picture {i}"]}) + "\n"
        for i in range(n)))
    return root


def test_importing_the_cli_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, tl_multimodal, tl_multimodal.cli; "
                          "print(sorted(m for m in ('torch', 'transformer_lens', 'PIL') if m in sys.modules))"],
                         capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"


def test_package_exports_resolve_lazily():
    import tl_multimodal
    from tl_multimodal.models.prefix import HookedVisionPrefix

    assert tl_multimodal.HookedVisionPrefix is HookedVisionPrefix
    for name in tl_multimodal.__all__:
        assert getattr(tl_multimodal, name) is not None, name
    assert set(dir(tl_multimodal)) >= set(tl_multimodal.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        tl_multimodal.no_such_name  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], ["caption", "--help"], ["report", "--help"], ["train", "--help"],
                                  ["cache", "--help"], ["atlas", "--help"]])
def test_help(argv):
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tl-multimodal")
    assert result.stdout == run(*argv, runner=False).stdout  # python -m tl_multimodal is the same program


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    assert set(subparsers.choices) == {"caption", "report", "attribute", "atlas", "train", "cache"}
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, (name, action.dest)
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert f"default: {action.default}" in " ".join(text.split()), (name, action.dest)
    assert "-o FILE, --out FILE" in subparsers.choices["report"].format_help()


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["caption", "--bogus"], "unrecognized arguments: --bogus"),
    (["caption", "--max-new-tokens", "0"], "--max-new-tokens: expected a whole number >= 1, got 0"),
    (["caption", "--max-new-tokens", "ten"], "--max-new-tokens: expected a whole number >= 1, got 'ten'"),
    (["caption", "--temperature", "-1"], "--temperature: expected a finite number > 0, got -1"),
    (["caption", "--batch-size", "0"], "--batch-size: expected a whole number >= 1, got 0"),
    (["caption", "--device", "gpu"], "--device: expected cpu, cuda, cuda:N, mps or xpu, got 'gpu'"),
    (["report", "x.png", "--k", "0"], "--k: expected a whole number >= 1, got 0"),
    (["report"], "the following arguments are required: IMAGE"),
    (["train", "d", "--out", "o", "--warmup", "-5"], "--warmup: expected a whole number >= 0, got -5"),
    (["train", "d", "--out", "o", "--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["train", "d", "--out", "o", "--seed", "-1"], "--seed: expected a whole number from 0 to 4294967295, got -1"),
    (["caption", "--seed", str(2**32)], "--seed: expected a whole number from 0 to 4294967295, got 4294967296"),
    (["attribute", "d", "--out", "o", "--limit", "0"], "--limit: expected a whole number >= 1, got 0"),
])
def test_option_errors_are_one_line_exit_2(argv, message):
    result = run(*argv)
    assert result.returncode == cli.EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, message, code", [
    (["caption", "{root}/missing.png"], "{root}/missing.png does not exist", cli.EXIT_INPUT),
    (["caption", "{root}/good/a.jpg", "{root}/notes.txt"], "{root}/notes.txt is not an image file PIL can read",
     cli.EXIT_INPUT),
    (["caption", "{root}/fake.jpg"], "{root}/fake.jpg is not an image file PIL can read", cli.EXIT_INPUT),
    (["caption", "{root}/bad"], "{root}/bad/cut.png is a damaged image", cli.EXIT_INPUT),
    (["caption", "{root}/empty"], "folder {root}/empty has no image files", cli.EXIT_INPUT),
    (["caption", "{root}/*.gif"], "no image file matches '{root}/*.gif'", cli.EXIT_INPUT),
    (["caption", "{root}/good/a.jpg", "--projection", "{root}/none.pt"], "--projection {root}/none.pt does not exist",
     cli.EXIT_INPUT),
    (["report", "{root}/good"], "{root}/good is a folder; report takes one image file", cli.EXIT_INPUT),
    (["report", "{root}/good/*.*g"], "matches 2 images; report takes one", cli.EXIT_INPUT),
    (["report", "{root}/notes.txt"], "{root}/notes.txt is not an image file PIL can read", cli.EXIT_INPUT),
    (["report", "{root}/good/a.jpg", "-o", "{root}/good/sub"], "--out {root}/good/sub is a folder", cli.EXIT_OUTPUT),
    (["report", "{root}/good/a.jpg", "--out", "{root}/notes.txt/r.html"], "{root}/notes.txt is not a folder",
     cli.EXIT_OUTPUT),
    (["attribute", "{root}/nowhere", "--out", "{root}/o"], "{root}/nowhere does not exist", cli.EXIT_INPUT),
    (["attribute", "{root}/good/a.jpg", "--out", "{root}/o"], "{root}/good/a.jpg is a file; DATA must be",
     cli.EXIT_INPUT),
    (["attribute", "{root}/good", "--out", "{root}/o"], "{root}/good/metadata.jsonl not found", cli.EXIT_INPUT),
    (["attribute", "{root}/coco", "--split", "train", "--out", "{root}/o"], "split 'train' not in", cli.EXIT_INPUT),
    (["attribute", "{root}/coco", "--out", "{root}/o", "--image-column", "img"],
     "--image-column 'img' is not in the dataset", cli.EXIT_INPUT),
    (["attribute", "{root}/coco", "--out", "{root}/notes.txt"], "--out {root}/notes.txt is a file, not a folder",
     cli.EXIT_OUTPUT),
    (["attribute", "{root}/coco", "--out", "{root}/notes.txt/runs"], "{root}/notes.txt is not a writable folder",
     cli.EXIT_OUTPUT),
    (["attribute", "{root}/coco", "--out", "{root}/o", "--projection", "{root}/none.pt"],
     "--projection {root}/none.pt does not exist", cli.EXIT_INPUT),
    (["train", "{root}/nowhere", "--out", "{root}/o"], "{root}/nowhere does not exist", cli.EXIT_INPUT),
    (["train", "nowhere", "--out", "{root}/o"], "as a hub dataset name it needs a split (--split)", cli.EXIT_INPUT),
])
def test_bad_files_fail_before_the_model_loads(files, argv, message, code):
    result = run(*[a.format(root=files) for a in argv])
    assert result.returncode == code, result.stderr  # 99 would mean torch was imported
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message.format(root=files) in result.stderr, result.stderr
    assert result.stderr.startswith(f"tl-multimodal {argv[0]}: error: ")


def test_image_files_expands_folders_and_globs(files):
    good = files / "good"
    a, b, c = good / "a.jpg", good / "b.png", good / "sub" / "c.png"
    assert cli.image_files([str(good)]) == [a, b]  # image files only, not recursive
    assert cli.image_files([str(good / "*.png"), str(c), str(b)]) == [b, c]  # no duplicates
    assert cli.image_files([str(good / "**" / "*.png")]) == [b, c]
    assert cli.image_files([str(c), str(good)]) == [c, a, b]  # the order given


def test_cache_command_clears_the_cache(tmp_path):
    root = tmp_path / "cache"
    (root / "entry").mkdir(parents=True)
    (root / "entry" / "weights.pt").write_bytes(b"x" * 2_000_000)
    result = run("cache", env=_env(TL_MULTIMODAL_CACHE=str(root)), runner=False)
    assert result.returncode == 0 and result.stdout.strip() == f"{root} (2 MB)"
    result = run("cache", "--clear", env=_env(TL_MULTIMODAL_CACHE=str(root)), runner=False)
    assert result.returncode == 0 and result.stdout.strip() == f"deleted {root} (2 MB)"
    assert not root.exists()


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """An empty converted-model cache folder for the end-to-end test."""
    pytest.importorskip("gguf")
    from tl_multimodal.pretrained.offline import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ImportError as e:
        pytest.skip(str(e))
    return tmp_path_factory.mktemp("cli_cache")


def test_caption_end_to_end_with_the_offline_model(files, offline_cache, offline_model):
    """Cold cache, then warm: one progress line each, captions equal to ``model.caption`` on the same files
    (``offline_model``: the session's ``load("offline")``, the installed TransformerLens's default backend)."""
    env = _env(TL_MULTIMODAL_CACHE=str(offline_cache))
    argv = ["caption", str(files / "good"), str(files / "good" / "sub" / "*.png"), "--max-new-tokens", "5"]
    cold, warm = run(*argv, runner=False, env=env), run(*argv, runner=False, env=env)
    for result in (cold, warm):
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("Loading SmolLM2-135M + EfficientNet-Lite0 on cpu") == 1
        assert "Moving model to device" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    assert f"first run: converting the GGUF file takes about 2 min, then it is cached in {offline_cache}" in cold.stderr
    assert cold.stdout == warm.stdout

    paths = [files / "good" / "a.jpg", files / "good" / "b.png", files / "good" / "sub" / "c.png"]
    captions = offline_model.caption(paths, max_new_tokens=5)
    assert cold.stdout.splitlines() == [f"{p}: A picture of {c}" for p, c in zip(paths, captions)]
    assert "(from the cache)" in warm.stderr and "de-quantizing" not in warm.stderr


def test_caption_takes_the_load_vocabulary(files, tmp_path, capsys):
    """``--model`` is what ``tl_multimodal.load`` takes: a factory captions as the model it builds; a
    spec of no known form is a usage error, an argument the spec does not take a load error."""
    _train_inputs(tmp_path)
    from test_runner import build_tiny_vlm

    image = files / "good" / "a.jpg"
    assert cli.main(["caption", str(image), "--model", f"{tmp_path / 'factory.py'}:build",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    caption = build_tiny_vlm(str(tmp_path / "tiny.pt")).caption([image], max_new_tokens=4)[0]
    assert out.out == f"{image}: A picture of {caption}\n"
    assert f"Loading {tmp_path / 'factory.py'}:build on cpu ..." in out.err
    for argv, message, code in [
            (["--model", "ofline"], "--model: unknown model spec 'ofline'", cli.EXIT_USAGE),
            (["--model", "limber:beit"], "--model: unknown LiMBeR config 'beit'", cli.EXIT_USAGE),
            (["--model", "offline", "--encoder", "vit_tiny"], "spec 'offline' does not take encoder", cli.EXIT_MODEL)]:
        assert cli.main(["caption", str(image), *argv]) == code, argv
        last = capsys.readouterr().err.splitlines()[-1]  # after the progress line, if the load began
        assert last.startswith("tl-multimodal caption: error: ") and message in last, last


# ---------------------------------------------------------------------------- train
def _train_inputs(root: Path):
    """A coco_mini-style folder (6 random images, split train, varied captions), the same rows as
    webdataset shards (png + txt), and a model factory (the tiny LM of test_runner, saved weights)."""
    import json

    import torch
    import webdataset as wds

    sys.path.insert(0, str(REPO / "tests" / "training"))
    try:
        from test_runner import build_tiny_vlm
    except ImportError as e:  # test_runner's tiny LM is a HookedTransformer (TransformerLens 3 only)
        pytest.skip(f"the model factory is tests/training/test_runner.py's build_tiny_vlm, which does not import "
                    f"here: {e}")

    rng = np.random.default_rng(1)
    (root / "coco" / "images").mkdir(parents=True)
    (root / "shards").mkdir()
    words = ["a dog on grass", "two cats", "a red car parked", "people at a table", "a bird", "snow on a hill"]
    lines = []
    with wds.TarWriter(str(root / "shards" / "00000.tar")) as sink:
        for i, caption in enumerate(words):
            im = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
            im.save(root / "coco" / "images" / f"{i}.png")
            lines.append(json.dumps({"file_name": f"images/{i}.png", "image_id": i, "split": "train",
                                     "captions": [caption, caption.upper()]}))
            sink.write({"__key__": f"{i:04d}", "png": im, "txt": caption})
    (root / "coco" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    torch.save(build_tiny_vlm().state_dict(), root / "tiny.pt")
    (root / "factory.py").write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests' / 'training')!r})\n"
                                     "from test_runner import build_tiny_vlm\n"
                                     f"def build():\n    return build_tiny_vlm({str(root / 'tiny.pt')!r})\n")
    return build_tiny_vlm


def test_train_command_is_the_library_call(tmp_path):
    """``tl-multimodal train`` on a folder and on webdataset shards ends with the projection that
    ``train_projection`` gives on the same rows; ``--resume`` continues the run."""
    import torch

    from tl_multimodal import ImageProjection, load_coco_mini
    from tl_multimodal.data.sources import open_dataset
    from tl_multimodal.training.train import train_projection

    build = _train_inputs(tmp_path)
    common = ["--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--model",
              f"{tmp_path / 'factory.py'}:build", "--no-progress", "--threads", "1"]
    kw = dict(steps=3, batch_size=2, lr=1e-2, warmup=1, progress=False)
    for name, argv, data, columns in [
            ("folder", [str(tmp_path / "coco"), "--split", "train", "--feature-cache", str(tmp_path / "feats")],
             lambda: load_coco_mini(tmp_path / "coco", "train"), {}),
            ("shards", [str(tmp_path / "shards" / "00000.tar")], lambda: open_dataset(tmp_path / "shards" / "00000.tar"),
             {"image_column": "png", "caption_column": "txt"})]:
        out = tmp_path / f"out_{name}"
        assert cli.main(["train", *argv, "--out", str(out), *common]) == 0
        model = build(str(tmp_path / "tiny.pt"))
        train_projection(model, data(), **columns, **kw)
        saved = ImageProjection.load(out / "projection.pt")
        assert torch.equal(saved.linear.weight, model.projection.linear.weight), name
        assert sorted(p.name for p in out.iterdir()) == ["projection.pt", "training_state.pt"]
    assert [p.suffix for p in sorted((tmp_path / "feats").iterdir())] == [".json", ".npy"]
    # --resume: 3 more steps from the folder run's state = 6 steps in one library call
    assert cli.main(["train", str(tmp_path / "coco"), "--split", "train", "--out", str(tmp_path / "out_folder"),
                     "--resume", *common[:1], "6", *common[2:]]) == 0
    model = build(str(tmp_path / "tiny.pt"))
    train_projection(model, load_coco_mini(tmp_path / "coco", "train"), **{**kw, "steps": 6})
    assert torch.equal(ImageProjection.load(tmp_path / "out_folder" / "projection.pt").linear.weight,
                       model.projection.linear.weight)


def test_train_command_checks_its_inputs_before_the_model_loads(tmp_path, capsys):
    """Each case would otherwise fail loading the model (--model names a module that does not exist)."""
    _train_inputs(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "training_state.pt").write_bytes(b"x")
    coco, tar = str(tmp_path / "coco"), str(tmp_path / "shards" / "00000.tar")
    cases = [
        ([str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'} does not exist", cli.EXIT_INPUT),
        (["owner/name"], "owner/name is no local folder or file; as a hub dataset name it needs a split", cli.EXIT_INPUT),
        ([coco, "--split", "val"], "split 'val' not in", cli.EXIT_INPUT),
        ([str(tmp_path / "shards" / "9.tar")], "shards/9.tar does not exist", cli.EXIT_INPUT),
        ([tar, "--caption-column", "caps"], "--caption-column 'caps' is not in the dataset", cli.EXIT_INPUT),
        ([tar, "--feature-cache", str(tmp_path / "f")], "--feature-cache needs a folder DATA", cli.EXIT_USAGE),
        ([coco, "--split", "train", "--resume"], "--resume: ", cli.EXIT_INPUT),
        ([coco, "--split", "train", "--out", str(tmp_path / "state")], "holds a training state; add --resume",
         cli.EXIT_OUTPUT),
        ([coco, "--split", "train", "--out", str(tmp_path / "tiny.pt")], "is a file, not a folder", cli.EXIT_OUTPUT),
        ([coco, "--split", "train", "--projection", str(tmp_path / "p.pt")], "--projection", cli.EXIT_INPUT),
    ]
    for argv, message, code in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "out")]
        assert cli.main(["train", *argv, "--model", "no_such_module:build"]) == code, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tl-multimodal train: error: ") and message in err, err
    assert cli.main(["train", coco, "--split", "train", "--out", str(tmp_path / "out"), "--model",
                     "no_such_module:build"]) == cli.EXIT_MODEL
    assert "cannot load the model 'no_such_module:build'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- attribute, train: one-line errors
def _last_error(capsys, command: str) -> str:
    """The one error line the command printed (after its progress lines, if the model loaded)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"tl-multimodal {command}: error: "), err
    return last


def test_webdataset_patterns_name_the_missing_shards(files, tmp_path, capsys):
    """(webdataset imports torch, so these run here: ``--model`` names no module, so a check that came after
    loading the model would give exit 5.)"""
    import webdataset as wds

    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "1.tar")) as sink:
        sink.write({"__key__": "0000", "png": Image.new("RGB", (8, 8)), "txt": "black"})
    for command in ("attribute", "train"):
        for pattern, message in [(f"{tmp_path}/shards/{{2..4}}.tar",
                                  f"webdataset pattern '{tmp_path}/shards/{{2..4}}.tar' matches no file (none of its 3"),
                                 (f"{tmp_path}/shards/{{0..2}}.tar", f"webdataset shard {tmp_path}/shards/0.tar does not "
                                  "exist (2 of the 3 shards"),
                                 (f"{tmp_path}/none/0.tar", f"webdataset shard {tmp_path}/none/0.tar does not exist")]:
            argv = [command, pattern, "--out", str(tmp_path / "out"), "--model", "no_such_module:build"]
            assert cli.main(argv) == cli.EXIT_INPUT, argv
            assert message in _last_error(capsys, command)
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_refused_before_the_model_loads(files, immutable):
    for argv in (["attribute", str(files / "coco")], ["train", str(files / "coco"), "--split", "dev"]):
        for out in (immutable, immutable / "runs"):
            result = run(*argv, "--out", str(out))
            assert result.returncode == cli.EXIT_OUTPUT, result.stderr  # 99 would mean torch was imported
            assert result.stderr == f"tl-multimodal {argv[0]}: error: --out {out}: {immutable} is not a writable folder\n"


def test_attribute_names_a_bad_model_before_any_work(files, tmp_path, capsys):
    for spec, code, message in [("ofline", cli.EXIT_USAGE, "--model: unknown model spec 'ofline'"),
                                ("no_such_module:build", cli.EXIT_MODEL,
                                 "cannot load the model 'no_such_module:build': No module named 'no_such_module'")]:
        assert cli.main(["attribute", str(files / "coco"), "--out", str(tmp_path / "out"), "--model", spec]) == code
        assert message in _last_error(capsys, "attribute")
    assert not (tmp_path / "out").exists()


def test_a_damaged_image_stops_attribute_and_train_naming_its_file(files, tmp_path, capsys):
    """The rule: an image that cannot be decoded stops the command (exit 3) naming its row and file; nothing is
    skipped. ``attribute`` keeps the shard finished before it (images 0-1; image 2 is the damaged one)."""
    _train_inputs(tmp_path)
    coco, damaged = files / "coco", files / "coco" / "images" / "2.jpg"
    model = ["--model", f"{tmp_path / 'factory.py'}:build", "--no-progress"]
    out = tmp_path / "attr"
    assert cli.main(["attribute", str(coco), "--out", str(out), "--shard-size", "2", "--k", "3", *model]) == cli.EXIT_INPUT
    assert f"image 2 (file {damaged}) cannot be read: image file is truncated" in _last_error(capsys, "attribute")
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000000-000000002.parquet"]
    assert cli.main(["train", str(coco), "--out", str(tmp_path / "p"), "--steps", "1", "--batch-size", "2",
                     *model]) == cli.EXIT_INPUT
    assert f"image 2 (file {damaged}) cannot be read: image file is truncated" in _last_error(capsys, "train")
    assert not (tmp_path / "p" / "projection.pt").exists()

    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:  # the same in a stream: the key and the shard
        for i in range(3):
            sink.write({"__key__": f"{i:04d}", "jpg": (coco / "images" / f"{i}.jpg").read_bytes(), "txt": "a picture"})
    for command, extra in [("attribute", ["--shard-size", "2", "--k", "3"]), ("train", ["--steps", "2", "--batch-size", "2"])]:
        assert cli.main([command, str(tmp_path / "bad.tar"), "--out", str(tmp_path / f"{command}_tar"), *extra,
                         *model]) == cli.EXIT_INPUT
        assert f"image 2 (key '0002' of {tmp_path / 'bad.tar'}) cannot be read: " in _last_error(capsys, command)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.CLIError, match="nowhere does not exist") as e:
        cli.main(["--debug", "attribute", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert isinstance(e.value.__context__, FileNotFoundError)  # the library's error it replaced
    assert e.value.code == cli.EXIT_INPUT


@pytest.mark.parametrize("argv", [["cache"], ["--help"]])
def test_a_closed_output_pipe_ends_quietly(argv, tmp_path):
    """``tl-multimodal ... | head``: the reader is gone before the first line (its end closed at once)."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "tl_multimodal", *argv], stdout=write, stderr=subprocess.PIPE,
                                text=True, env=_env(TL_MULTIMODAL_CACHE=str(tmp_path / "cache")), cwd=REPO, timeout=600)
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == (cli.EXIT_PIPE if argv == ["cache"] else 0)  # argparse's help ignores the pipe
