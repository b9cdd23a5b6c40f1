"""The Python blocks of README.md and docs/guide.md run as pasted: offline, in order, one namespace per file,
as a reader would run them (one test per block, so a failure names its line); and every relative link of the
docs points at a file and heading that exist.

A block whose first line is ``# needs: internet`` or ``# needs: gpu`` (or both, comma-separated) is
skipped with that reason; ``# needs: coco_mini`` runs only where the COCO sample is found (``$TL_MULTIMODAL_DATA``, else
``<repo>/../shared/data/coco_mini``), offered to the blocks at the path they name
(``../shared/data/coco_mini`` from a scratch working directory, so what the blocks write lands there).
"""

import os
import re
from pathlib import Path

import matplotlib
import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNABLE = ["README.md", "docs/guide.md", "docs/vlms.md"]  # the files whose python blocks run, each in its own namespace
MIN_BLOCKS = {"README.md": 1, "docs/guide.md": 10, "docs/vlms.md": 0}  # blocks that run here (without the COCO sample;
# docs/vlms.md shows real hub models only: the tiny offline ones are in tests/pretrained/test_vlms.py)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
NEEDS = re.compile(r"#\s*needs:\s*(.+)")
NEVER_HERE = {"internet", "gpu"}
KNOWN = NEVER_HERE | {"coco_mini"}
# What a block cannot do where the bridge is the default model (TransformerLens 4): known VisionBridge bugs, and
# HookedTransformer-only features. A block containing the key skips there with the reason (the blocks after it
# still run).
BRIDGE_BUGS = {
    # not a bug: a feature of HookedTransformer (TransformerLens 3 only)
    "ViTWithLMBlocks(": "ViTWithLMBlocks copies HookedTransformer blocks: TransformerLens 3 only (TransformerLens 4 "
                        "removed HookedTransformer)",
}


def python_blocks(name: str) -> list[tuple[int, set[str], str]]:
    """``(line, needs, code)`` of every python block of ``name`` (relative to the repository), in order."""
    text = (REPO / name).read_text(encoding="utf-8")
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


BLOCKS = [(name, line, needs, code) for name in RUNNABLE for line, needs, code in python_blocks(name)]


@pytest.mark.parametrize("name", RUNNABLE)
def test_blocks_are_found_and_marked_with_known_needs(name):
    blocks = python_blocks(name)
    for line, needs, _ in blocks:
        assert needs <= KNOWN, f"{name}:{line}: unknown '# needs:' {sorted(needs - KNOWN)} (known: {sorted(KNOWN)})"
    assert sum(not needs for _, needs, _ in blocks) >= MIN_BLOCKS[name]  # most of them run here


@pytest.fixture(scope="module")
def sessions() -> dict[str, dict]:
    """Per file: the namespace and the scratch working folder its blocks share, in order."""
    return {}


def _session(sessions: dict, name: str, tmp_path_factory) -> dict:
    if name not in sessions:
        root = tmp_path_factory.mktemp(name.replace("/", "_"))
        (root / "work").mkdir()
        data = _coco_mini()
        if data is not None:
            (root / "shared" / "data").mkdir(parents=True)
            (root / "shared" / "data" / "coco_mini").symlink_to(data, target_is_directory=True)
        sessions[name] = {"namespace": {"__name__": "__readme__"}, "work": root / "work", "ran": [], "failed": None}
    return sessions[name]


@pytest.mark.parametrize(("name", "line", "needs", "code"), BLOCKS, ids=[f"{n}:{line}" for n, line, _, _ in BLOCKS])
def test_python_block_runs_offline_in_order(name, line, needs, code, sessions, tmp_path_factory, monkeypatch):
    if needs & NEVER_HERE:
        pytest.skip(f"# needs: {', '.join(sorted(needs))}")
    if "coco_mini" in needs and _coco_mini() is None:
        pytest.skip("# needs: coco_mini, and the COCO sample is not here ($TL_MULTIMODAL_DATA, ../shared/data/coco_mini)")
    from conftest import HAS_HOOKED_TRANSFORMER

    for key, bug in BRIDGE_BUGS.items():
        if not HAS_HOOKED_TRANSFORMER and key in code:
            pytest.skip(bug)
    session = _session(sessions, name, tmp_path_factory)
    if session["failed"] is not None:
        pytest.skip(f"the block at {name}:{session['failed']} failed; this one may need its names")
    matplotlib.use("Agg")
    monkeypatch.chdir(session["work"])
    import matplotlib.pyplot as plt

    try:
        exec(compile(code, f"{name}:{line}", "exec"), session["namespace"])
    except Exception as e:
        session["failed"] = line
        raise AssertionError(f"the python block at {name}:{line} fails: {type(e).__name__}: {e}") from e
    finally:
        plt.close("all")
    session["ran"].append(line)


@pytest.mark.parametrize("name", RUNNABLE)
def test_what_the_blocks_leave_behind(name, sessions):
    """Runs after the blocks of ``name`` (pytest keeps the file's order) and checks what they promise."""
    session = sessions.get(name)
    if session is None or session["failed"] is not None:
        pytest.skip(f"the blocks of {name} did not all run in this session")
    namespace, work = session["namespace"], session["work"]
    assert len(session["ran"]) >= MIN_BLOCKS[name]
    from tl_multimodal._compat import HAS_HOOKED_TRANSFORMER

    if HAS_HOOKED_TRANSFORMER:  # backend="auto" on TransformerLens 3.9: the offline model, not a hub one
        from tl_multimodal.models.prefix import HookedVisionPrefix

        assert isinstance(namespace["model"], HookedVisionPrefix)
    if name == "docs/guide.md":
        from tl_multimodal.models.bridge import VisionBridge

        assert isinstance(namespace["bridge"], VisionBridge)
        assert (work / "views.html").stat().st_size < 2_000_000  # three views, one JavaScript bundle
        assert (work / "report.html").is_file()
        if _coco_mini() is not None:
            assert namespace["mask"].any() and namespace["mask"].shape == namespace["cow_image"].size[::-1]
            assert len(namespace["rows"]) == 4 * 20  # limit=4 images, k=20 units each


# ------------------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
DOCS = ["README.md", "CONTRIBUTING.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("name", DOCS)
def test_relative_links_point_at_files_and_headings_that_exist(name):
    path = REPO / name
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{name}: broken links: {broken}"


def test_every_document_with_python_blocks_runs_them():
    """A python block added to any page of the docs is run by the tests above, not only shown."""
    assert {name for name in DOCS if python_blocks(name)} <= set(RUNNABLE)
