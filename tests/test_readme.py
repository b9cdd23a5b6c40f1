"""The README's Python blocks run as pasted: offline, in order, in one namespace, as a reader would run them.

A block whose first line is ``# needs: internet`` or ``# needs: gpu`` (or both, comma-separated) is
skipped; ``# needs: coco_mini`` runs only where the COCO sample is found (``$TL_MULTIMODAL_DATA``, else
``<repo>/../shared/data/coco_mini``), offered to the blocks at the path they name
(``../shared/data/coco_mini`` from a scratch working directory, so what the blocks write lands there).
"""

import os
import re
import time
from pathlib import Path

import matplotlib
import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
NEEDS = re.compile(r"#\s*needs:\s*(.+)")
NEVER_HERE = {"internet", "gpu"}
KNOWN = NEVER_HERE | {"coco_mini"}


def readme_blocks() -> list[tuple[int, set[str], str]]:
    """``(line, needs, code)`` of every python block of the README, in order."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        code = m.group(1)
        first = code.splitlines()[0] if code.strip() else ""
        need = NEEDS.fullmatch(first.strip())
        needs = {w.strip() for w in need.group(1).split(",")} if need else set()
        out.append((text.count("\n", 0, m.start()) + 2, needs, code))
    return out


def _coco_mini() -> Path | None:
    for d in (os.environ.get("TL_MULTIMODAL_DATA"), REPO.parent / "shared" / "data" / "coco_mini"):
        if d and (Path(d) / "instances.json").is_file() and (Path(d) / "metadata.jsonl").is_file():
            return Path(d).resolve()
    return None


def test_blocks_are_found_and_marked_with_known_needs():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for line, needs, _ in blocks:
        assert needs <= KNOWN, f"README.md:{line}: unknown '# needs:' {sorted(needs - KNOWN)} (known: {sorted(KNOWN)})"
    assert sum(not (n & NEVER_HERE) for _, n, _ in blocks) >= 5  # most of them run here


def test_readme_python_blocks_run_offline_in_order(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    data = _coco_mini()
    work = tmp_path / "work"
    work.mkdir()
    if data is not None:
        (tmp_path / "shared" / "data").mkdir(parents=True)
        (tmp_path / "shared" / "data" / "coco_mini").symlink_to(data, target_is_directory=True)
    monkeypatch.chdir(work)
    namespace = {"__name__": "__readme__"}
    ran, timings = [], []
    for line, needs, code in readme_blocks():
        if needs & NEVER_HERE or ("coco_mini" in needs and data is None):
            continue
        start, cpu = time.perf_counter(), time.process_time()
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the README's python block at line {line} fails: {type(e).__name__}: {e}") from e
        timings.append(f"README.md:{line} {time.perf_counter() - start:.0f}s ({time.process_time() - cpu:.0f}s CPU)")
        ran.append(line)
    print("\n" + "; ".join(timings))
    import matplotlib.pyplot as plt

    plt.close("all")
    assert len(ran) >= 5
    # what the blocks promise, checked on what they left behind
    from tl_multimodal.models.prefix import HookedVisionPrefix

    assert isinstance(namespace["model"], HookedVisionPrefix)  # the offline model, not a hub one
    assert (work / "views.html").stat().st_size < 2_000_000  # three views, one JavaScript bundle
    if data is not None:
        assert namespace["mask"].any() and namespace["mask"].shape == namespace["cow_image"].size[::-1]
