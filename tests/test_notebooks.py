"""Every demo notebook runs top to bottom offline (``TL_MULTIMODAL_OFFLINE=1``), in a kernel of this
very Python; a cell that raises fails the test. Plus the front-door furniture each notebook must have."""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

DEMOS = Path(__file__).resolve().parent.parent / "demos"
NOTEBOOKS = sorted(DEMOS.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; loading SmolLM2-135M takes about a minute here
KERNEL = "tl-multimodal-test"


def test_the_three_demos_exist():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "multimodal_neurons", "offline"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_front_door(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert (f"https://colab.research.google.com/github/tl-multimodal/tl_multimodal/blob/main/demos/{path.name}"
            in first.source)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "google.colab" in code[0].source and "%pip install" in code[0].source  # installs only on Colab
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[1] and re.search(r"^OFFLINE = ", params[0].source, re.M)
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks with cleared outputs"


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


@pytest.fixture(scope="module")
def kernel_of_this_python(tmp_path_factory):
    """A kernelspec that runs ipykernel with this interpreter (not whatever 'python3' resolves to)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tl_multimodal tests", "language": "python"}))
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline(path, kernel_of_this_python, monkeypatch):
    jupyter_path = [str(kernel_of_this_python), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(jupyter_path))
    monkeypatch.setenv("TL_MULTIMODAL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    if "OMP_NUM_THREADS" not in os.environ:  # one thread: on a shared 2-core machine, 2 threads ran twice as slow
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(DEMOS)}})
    try:
        client.execute()  # raises CellExecutionError (naming the cell) if any cell fails
    finally:
        _print_timings(path, nb)
        if os.environ.get("TL_MULTIMODAL_NOTEBOOK_OUT"):  # keep the executed notebooks (CI artifacts, screenshots)
            out = Path(os.environ["TL_MULTIMODAL_NOTEBOOK_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / path.name)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # the reader reaches pictures: at least one image (figure) and one HTML view were displayed
    assert any("image/png" in o.get("data", {}) for o in outputs)
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("data:image/png;base64," in h for h in html)  # a heatmap view
    assert not any(re.search(r"src=[\"']?https?://|from [\"']https?://|unpkg\.com", h) for h in html)  # offline HTML
