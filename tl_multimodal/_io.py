"""Checkpoint files that survive interruption: atomic writes, safe loads, finite weights only.

A checkpoint is written to a temporary file in the same folder and renamed over the target, so an
interrupted save leaves the previous file intact (``os.replace`` is atomic on POSIX and Windows).
Loading uses ``torch.load(weights_only=True)`` (no arbitrary pickles) and names the file in every error.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch
from torch import Tensor


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` all or nothing: ``write(f)`` fills a temporary file ``f`` (open for binary
    writing) in the same folder, which is flushed to disk and renamed over ``path``. An exception or
    an interrupt anywhere leaves ``path`` as it was and no temporary file behind.

    Args:
        path: The file to (over)write; its folder must exist.
        write: Writes the content to the file object it gets, e.g. ``lambda f: torch.save(obj, f)``
            or ``lambda f: pyarrow.parquet.write_table(table, f)``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_folder(path: str | Path, fill: Callable[[Path], object]) -> Path:
    """Make the folder ``path`` all or nothing: ``fill(tmp)`` fills a temporary folder beside it, which then
    replaces ``path`` (an older ``path`` is removed first). An exception leaves no temporary folder behind.

    Args:
        path: The folder to (re)make; its parent is created if missing.
        fill: Writes the folder's content into the folder it gets.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_write`: ``path`` is either the old file or the
    complete new one, never a partial write.

    Args:
        obj: Anything ``torch.save`` takes.
        path: The file to (over)write; its folder must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is empty, truncated, not a torch checkpoint, or holds objects other
            than tensors and plain containers (refused unread: unpickling them could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted write?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} could not be read safely: it holds objects other than tensors "
                         f"and plain containers, and loading it could run code ({first})") from None
    except (EOFError, RuntimeError, OSError) as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                         "it is truncated or not a torch checkpoint") from None


def check_finite(state_dict: Mapping[str, Tensor], what: str) -> None:
    """Raise ``ValueError`` naming each tensor of ``state_dict`` that holds NaN or infinite values."""
    bad = [k for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{what} holds NaN or infinite values in {', '.join(bad)}")
