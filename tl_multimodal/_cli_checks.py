"""The command line's argument types and input/output checks: each raises :class:`CLIError` with the exit
code the command ends with (cli.py's table). Imports nothing of the package, nothing heavy at module level."""

from __future__ import annotations

import argparse
import glob
import os
import re
from pathlib import Path

EXIT_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT, EXIT_MODEL, EXIT_INTERRUPTED = 1, 2, 3, 4, 5, 130
EXIT_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a program its pipe reader left
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$")
_GLOB_CHARS = set("*?[")

class CLIError(Exception):
    """A user error: printed as one line, and the process exits with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see prog --help)``, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's layout; show each option's default unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _int_from(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number in ``[minimum, maximum]``."""
    bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {value}")
        return value

    return parse


_nonnegative_int, _seed = _int_from(0), _int_from(0, 2**32 - 1)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or xpu, got {text!r}")
    return text


# ------------------------------------------------------------------------------------- files
def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _check_image(path: Path) -> None:
    """Raise ``CLIError`` unless PIL can open and decode ``path``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
    except UnidentifiedImageError:
        raise CLIError(f"{path} is not an image file PIL can read", EXIT_INPUT) from None
    except PermissionError:
        raise CLIError(f"{path} cannot be read (permission denied)", EXIT_INPUT) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or damaged image data
        raise CLIError(f"{path} is a damaged image ({e})", EXIT_INPUT) from None


def image_files(inputs: list[str]) -> list[Path]:
    """Expand files, folders (their image files, not recursive) and glob patterns; check each image.

    Every file is opened and decoded here, before any model loads, so a bad input fails at once.

    Args:
        inputs: Paths or glob patterns, as typed.

    Returns:
        The image files in the order given (sorted within a folder or pattern), without duplicates.

    Raises:
        CLIError: A missing path, a pattern or folder without images, or a file that is not an image.
    """
    extensions: set[str] = set()  # PIL's, read only when a folder or pattern needs them (it imports PIL)
    found: list[Path] = []
    for text in inputs:
        path = Path(text)
        pattern = not path.exists() and bool(_GLOB_CHARS & set(text))
        if (path.is_dir() or pattern) and not extensions:
            extensions = _image_extensions()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not files:
                raise CLIError(f"folder {path} has no image files", EXIT_INPUT)
        elif path.exists():
            if not path.is_file():
                raise CLIError(f"{path} is not a regular file", EXIT_INPUT)
            files = [path]
        elif pattern:
            files = sorted(Path(p) for p in glob.glob(text, recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in extensions)
            if not files:
                raise CLIError(f"no image file matches {text!r}", EXIT_INPUT)
        else:
            raise CLIError(f"{path} does not exist", EXIT_INPUT)
        found += files
    unique = list(dict.fromkeys(found))
    for path in unique:
        _check_image(path)
    return unique


def _check_output(path: Path) -> None:
    """Raise ``CLIError`` unless ``path`` can be written as a file (missing folders are created)."""
    if path.is_dir():
        raise CLIError(f"--out {path} is a folder; give a file name such as {path / 'report.html'}", EXIT_OUTPUT)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"--out {path}: {parent} is not a folder", EXIT_OUTPUT)
    if not os.access(parent, os.W_OK):
        raise CLIError(f"--out {path}: folder {parent} is not writable", EXIT_OUTPUT)


def _check_file(path: Path | None, option: str) -> None:
    if path is not None and not path.is_file():
        raise CLIError(f"{option} {path} does not exist" if not path.exists() else f"{option} {path} is not a file",
                       EXIT_INPUT)


def _writable_folder(path: Path, option: str) -> None:
    """Raise ``CLIError`` unless ``path`` is, or can be created as, a writable folder."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path} is a file, not a folder", EXIT_OUTPUT)
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CLIError(f"{option} {path}: {parent} is not a writable folder", EXIT_OUTPUT)
