"""Checkpoint files that survive interruption: atomic writes, safe loads, finite weights only.

A checkpoint is written to a temporary file in the same folder and renamed over the target, so an
interrupted save leaves the previous file intact (``os.replace`` is atomic on POSIX and Windows).
The temporary file is named ``.NAME.PID-RANDOM.tmp``; one left by a killed process is deleted by the next
save of the same target (:func:`_remove_stale_temps`), and a failed save names the target, not the
temporary file. Loading uses ``torch.load(weights_only=True)`` (no arbitrary pickles) and names the file in
every error.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch
from torch import Tensor

#: A temporary file or folder older than this (seconds since its last change) whose process is gone is stale.
STALE_AFTER_S = 60.0


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _last_change(entry: os.DirEntry) -> float:
    """The newest modification time of a file, or of a folder and everything in it."""
    newest = entry.stat(follow_symlinks=False).st_mtime
    if entry.is_dir(follow_symlinks=False):
        for root, dirs, files in os.walk(entry.path):
            for name in dirs + files:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _remove_stale_temps(path: Path) -> None:
    """Delete the temporary files and folders that a killed write of ``path`` left beside it.

    Only this module's names for ``path`` (``.NAME.PID-RANDOM.tmp``) are candidates, and only stale ones:
    their process is not running on this machine and nothing in them changed for :data:`STALE_AFTER_S`
    seconds (a live writer on another machine sharing the folder keeps writing, so it is left alone).
    Anything that cannot be checked or removed is left as it is.
    """
    own = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[a-z0-9_]+\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = own.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        try:
            if now - _last_change(entry) < STALE_AFTER_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue


def _naming_target(error: OSError, path: Path, unnamed: bool = True) -> OSError:
    """``error`` as raised for ``path`` where it names a temporary file or folder of ``path`` (or, with
    ``unnamed``, no file): the same type and errno, so callers that catch it by type still do."""
    name, temp = error.filename, os.path.abspath(path.parent / _temp_prefix(path))
    ours = os.path.abspath(name).startswith(temp) if isinstance(name, (str, os.PathLike)) else unnamed and name is None
    if error.errno is None or not ours:
        return error
    return type(error)(error.errno, error.strerror, str(path))


def temp_path(path: str | Path) -> Path:
    """A fresh temporary file name beside ``path``, in this module's naming (``.NAME.PID-RANDOM.tmp``), for a
    writer that needs a name rather than a file object (a numpy memmap); it renames the file over ``path``
    when done. Stale temporary files of ``path`` (see :func:`atomic_write`) are deleted first, and one this
    writer leaves when killed is deleted by a later write of ``path``."""
    path = Path(path)
    _remove_stale_temps(path)
    return path.with_name(f"{_temp_prefix(path)}{os.urandom(4).hex()}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` all or nothing: ``write(f)`` fills a temporary file ``f`` (open for binary
    writing) in the same folder, which is flushed to disk and renamed over ``path``. An exception or
    an interrupt anywhere leaves ``path`` as it was and no temporary file behind; a process killed
    mid-write leaves one, which a later write of ``path`` deletes. An ``OSError`` names ``path`` (not the
    temporary file).

    Args:
        path: The file to (over)write; its folder must exist.
        write: Writes the content to the file object it gets, e.g. ``lambda f: torch.save(obj, f)``
            or ``lambda f: pyarrow.parquet.write_table(table, f)``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    prefix = _temp_prefix(path)
    _remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming_target(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _naming_target(e, path) from None
        raise
    return path


def atomic_folder(path: str | Path, fill: Callable[[Path], object]) -> Path:
    """Make the folder ``path`` all or nothing: ``fill(tmp)`` fills a temporary folder beside it, which then
    replaces ``path`` (an older ``path`` is removed first). An exception leaves no temporary folder behind
    (one a killed process left is deleted by a later call for ``path``); an ``OSError`` about the temporary
    folder names ``path``.

    Args:
        path: The folder to (re)make; its parent is created if missing.
        fill: Writes the folder's content into the folder it gets.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    prefix = _temp_prefix(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _naming_target(e, path) from None
    try:
        fill(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as e:
        raise _naming_target(e, path, unnamed=False) from None
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


def check_writable_folder(path: str | Path, name: str) -> Path:
    """Create the folder ``path`` if missing and write (then delete) a file in it, so that a folder that
    cannot be written fails at once rather than at the first save.

    Args:
        path: The folder.
        name: The argument it came from, for the error.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``path`` is a file, cannot be created, or cannot be written (read-only, immutable,
            no permission).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{name}={str(path)!r} is not a writable folder ({e.strerror or e})") from None
    return path


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
