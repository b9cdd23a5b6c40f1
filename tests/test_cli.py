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
    PNG) and an empty folder."""
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
    return root


def test_importing_the_cli_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, tl_multimodal, tl_multimodal.cli; "
                          "print(sorted(m for m in ('torch', 'transformer_lens', 'PIL') if m in sys.modules))"],
                         capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"


def test_package_exports_resolve_lazily():
    import tl_multimodal
    from tl_multimodal.prefix import HookedVisionPrefix

    assert tl_multimodal.HookedVisionPrefix is HookedVisionPrefix
    for name in tl_multimodal.__all__:
        assert getattr(tl_multimodal, name) is not None, name
    assert set(dir(tl_multimodal)) >= set(tl_multimodal.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        tl_multimodal.no_such_name  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], ["caption", "--help"], ["report", "--help"], ["cache", "--help"]])
def test_help(argv):
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tl-multimodal")
    assert result.stdout == run(*argv, runner=False).stdout  # python -m tl_multimodal is the same program


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    assert set(subparsers.choices) == {"caption", "report", "attribute", "cache"}
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
    from tl_multimodal.loading import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ImportError as e:
        pytest.skip(str(e))
    return tmp_path_factory.mktemp("cli_cache")


def test_caption_end_to_end_with_the_offline_model(files, offline_cache, monkeypatch):
    """Cold cache, then warm: one progress line each, captions equal to ``model.caption`` on the same files."""
    from tl_multimodal.loading import load_offline

    env = _env(TL_MULTIMODAL_CACHE=str(offline_cache))
    argv = ["caption", str(files / "good"), str(files / "good" / "sub" / "*.png"), "--max-new-tokens", "5"]
    cold, warm = run(*argv, runner=False, env=env), run(*argv, runner=False, env=env)
    for result in (cold, warm):
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("Loading SmolLM2-135M + EfficientNet-Lite0 on cpu") == 1
        assert "Moving model to device" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    assert f"first run: converting the GGUF file takes about 2 min, then it is cached in {offline_cache}" in cold.stderr
    assert "(from the cache)" in warm.stderr and "de-quantizing" not in warm.stderr
    assert cold.stdout == warm.stdout

    monkeypatch.setenv("TL_MULTIMODAL_CACHE", str(offline_cache))
    model = load_offline()
    paths = [files / "good" / "a.jpg", files / "good" / "b.png", files / "good" / "sub" / "c.png"]
    captions = model.caption(paths, max_new_tokens=5)
    assert cold.stdout.splitlines() == [f"{p}: A picture of {c}" for p, c in zip(paths, captions)]
