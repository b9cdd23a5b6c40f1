"""Execute the demo notebooks in place, offline, and save them with their outputs (figures included), so
GitHub shows them rendered. Run it after changing the package or a notebook, then commit ``demos/``:

    python scripts/run_notebooks.py                      # every demos/*.ipynb
    python scripts/run_notebooks.py demos/offline.ipynb  # some of them
    python scripts/run_notebooks.py --data-dir /path/to/coco_mini   # the COCO sample is elsewhere

Each notebook runs top to bottom in a kernel of this very Python (not whatever ``python3`` resolves to),
with ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` and ``OMP_NUM_THREADS=1`` (unless set), from the
``demos/`` folder; a failing cell stops with the cell's error and leaves the file unchanged. The saved
notebook keeps its original kernel metadata and parameters cell (``--data-dir`` is set for the run only) (``python3``, as Colab expects). ``tests/test_notebooks.py``
executes copies with :func:`execute` and checks the committed files with :func:`check_outputs`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ROOT / "demos"
KERNEL = "tl-multimodal-this-python"
CELL_TIMEOUT = 600  # seconds per cell
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def kernel_of_this_python() -> Iterator[None]:
    """A kernelspec named :data:`KERNEL` that runs ipykernel with ``sys.executable``, found via ``JUPYTER_PATH``,
    and the offline environment the kernel inherits; both undone on exit."""
    saved = {k: os.environ.get(k) for k in (*OFFLINE_ENV, "OMP_NUM_THREADS", "JUPYTER_PATH")}
    with tempfile.TemporaryDirectory() as root:
        spec = Path(root) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "tl_multimodal (this Python)", "language": "python"}))
        os.environ.update(OFFLINE_ENV)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # on a shared 2-core machine, 2 threads ran twice as slow
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (root, saved["JUPYTER_PATH"]) if p)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def execute(nb: nbformat.NotebookNode, cwd: Path = DEMOS, timeout: int = CELL_TIMEOUT,
            record_timing: bool = False) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` (in place) offline in a kernel of this Python, working directory ``cwd``.

    Raises:
        nbclient.exceptions.CellExecutionError: A cell raised (the message names the cell and the error).
    """
    metadata = {k: nb.metadata[k] for k in ("kernelspec", "language_info") if k in nb.metadata}
    with kernel_of_this_python():
        NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, allow_errors=False, record_timing=record_timing,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    nb.metadata.update(metadata)
    return nb


def set_parameters(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """Append ``NAME = value`` lines to the notebook's cell tagged ``parameters`` (as papermill does).

    Raises:
        ValueError: If the notebook has no such cell, or a name is not assigned there already.
    """
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"the notebook has {len(cells)} cells tagged 'parameters', not one")
    unknown = [k for k in values if f"\n{k} = " not in "\n" + cells[0].source]
    if unknown:
        raise ValueError(f"{unknown} are not parameters of this notebook")
    cells[0].source += "".join(f"\n{k} = {v!r}  # set by set_parameters" for k, v in values.items())
    return nb


def drop_progress_bars(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove tqdm's progress bars (stderr stream outputs of ``\\r``-redrawn bars) from ``nb``'s outputs,
    which GitHub shows as pink error boxes; other stderr text (warnings) stays."""
    bar = re.compile(r"^[\r\n]*(\s*[^\r\n]*\d+%\|[^\r\n]*\|[^\r\n]*[\r\n]*)*$")
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr"
                                                            and bar.match(o.text))]
    return nb


def check_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """What is wrong with an executed notebook's outputs: a code cell never run, an error, no figure."""
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    never = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.execution_count is None]
    if never:
        problems.append(f"cells {never} were not executed")
    outputs = [o for c in code for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    if errors:
        problems.append(f"error outputs: {[o.ename + ': ' + o.evalue for o in errors]}")
    if not any("image/png" in o.get("data", {}) for o in outputs):
        problems.append("no figure (image/png output)")
    bundles = sum(o.get("data", {}).get("text/html", "").count("var CircuitsVis=") for o in outputs)
    if bundles > 1:
        problems.append(f"circuitsvis's bundle is in {bundles} outputs (one per notebook)")
    bars = [o for o in outputs if o.output_type == "stream" and o.name == "stderr" and "%|" in o.text]
    if bars:
        problems.append(f"{len(bars)} progress bars on stderr (drop_progress_bars)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: demos/*.ipynb)")
    ap.add_argument("--data-dir", type=Path, help="the notebooks' DATA_DIR for this run (default: theirs, "
                    "<repo>/../shared/data/coco_mini); the saved notebooks keep their own parameters cell")
    args = ap.parse_args(argv)
    for path in args.notebooks or sorted(DEMOS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        source = params.source
        if args.data_dir:
            set_parameters(nb, DATA_DIR=str(args.data_dir.resolve()))
        start = time.perf_counter()
        execute(nb, cwd=path.resolve().parent)
        params.source = source
        problems = check_outputs(drop_progress_bars(nb))
        if problems:
            print(f"{path}: {'; '.join(problems)}; not saved", file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s, saved ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
