"""Point the Colab badges and install cells at a GitHub repository: ONE setting, ``[project.urls]
Repository`` in pyproject.toml, rewritten together with every place that repeats it.

    python scripts/set_repo_url.py https://github.com/OWNER/NAME

rewrites ``pyproject.toml``, ``README.md`` and ``demos/*.ipynb`` (outputs kept): ``github.com/OLD_OWNER/OLD_NAME``
(``%pip install ... @ git+https://...``, links) and the Colab badge links
``colab.research.google.com/github/OLD_OWNER/OLD_NAME/``. Colab opens notebooks from GitHub, so the URL
must be a GitHub repository.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GITHUB = re.compile(r"https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?/?")


def repo_url(root: Path = ROOT) -> str:
    """The repository URL pyproject.toml names (``[project.urls] Repository``)."""
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def owner_name(url: str) -> str:
    """``OWNER/NAME`` of a GitHub repository URL.

    Raises:
        ValueError: If ``url`` is not ``https://github.com/OWNER/NAME``.
    """
    match = GITHUB.fullmatch(url)
    if match is None:
        raise ValueError(f"url must be a GitHub repository, https://github.com/OWNER/NAME (Colab opens "
                         f"notebooks from GitHub), got {url!r}")
    return f"{match[1]}/{match[2]}"


def files(root: Path = ROOT) -> list[Path]:
    """The files that repeat the repository URL."""
    return [root / "pyproject.toml", root / "README.md", *sorted((root / "demos").glob("*.ipynb"))]


def set_repo_url(url: str, root: Path = ROOT) -> list[Path]:
    """Rewrite the repository URL everywhere; returns the files that changed."""
    new, old = owner_name(url), owner_name(repo_url(root))
    changed = []
    for path in files(root):
        text = path.read_text()
        out = (text.replace(f"https://github.com/{old}", f"https://github.com/{new}")
                   .replace(f"colab.research.google.com/github/{old}/", f"colab.research.google.com/github/{new}/"))
        if out != text:
            path.write_text(out)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="https://github.com/OWNER/NAME")
    ap.add_argument("--root", type=Path, default=ROOT, help="the project folder (default: this checkout)")
    args = ap.parse_args(argv)
    try:
        changed = set_repo_url(args.url, args.root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in changed:
        print("rewrote", path.relative_to(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
