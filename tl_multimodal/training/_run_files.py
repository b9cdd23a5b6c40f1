"""The files that make a runner folder safe to resume: a record beside every shard, the comparison of two
runs' fingerprints, and starting a folder over.

Every shard ``part-{start}-{stop}.parquet`` gets a record ``_part-{start}-{stop}.json`` (the leading
underscore keeps it out of ``pandas.read_parquet(folder)``), written atomically after the shard: its row
count, byte size and SHA-256, and a digest of the ids of the images it was made from. A resumed run keeps
a shard only if the file still matches its record and the data still has the same images at its rows
(:func:`shard_problem`); :func:`read_shard` reads a shard checked the same way, with errors naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tl_multimodal._io import atomic_write

RECORD_VERSION = 1


def record_path(shard: Path) -> Path:
    """The record of ``shard``: ``_part-....json`` beside it."""
    return shard.with_name(f"_{shard.stem}.json")


def ids_digest(ids: Iterable[Any]) -> str:
    """16 hex digits of a SHA-256 of the image ids (as strings, in order): which images a shard was made from."""
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()[:16]


def write_record(shard: Path, n_rows: int, ids: str) -> None:
    """Write ``shard``'s record (atomically): its row count, size and SHA-256, and the ``ids`` digest."""
    content = shard.read_bytes()
    record = {"version": RECORD_VERSION, "rows": n_rows, "bytes": len(content),
              "sha256": hashlib.sha256(content).hexdigest(), "ids": ids}
    atomic_write(record_path(shard), lambda f: f.write(json.dumps(record).encode()))


def _read_record(shard: Path) -> tuple[dict | None, str | None]:
    """``(record, None)``, or ``(None, why it cannot be used)``."""
    path = record_path(shard)
    if not path.is_file():
        return None, f"has no record {path.name} (written by an older version, or the run stopped before the record)"
    try:
        record = json.loads(path.read_text())
        if not {"rows", "bytes", "sha256", "ids"} <= set(record):
            raise ValueError("keys missing")
    except (ValueError, OSError, TypeError) as e:
        return None, f"has a damaged record {path.name} ({e})"
    return record, None


def _content_problem(content: bytes, record: dict) -> str | None:
    if len(content) != record["bytes"]:
        return f"is {len(content)} bytes, its record says {record['bytes']} (truncated or damaged)"
    if hashlib.sha256(content).hexdigest() != record["sha256"]:
        return "does not match the SHA-256 in its record (damaged)"
    return None


def shard_problem(shard: Path, ids: str) -> str | None:
    """Why ``shard`` cannot be kept by a resumed run (``None``: it can).

    Args:
        shard: An existing shard file.
        ids: The :func:`ids_digest` of the images this run has at the shard's rows.

    Returns:
        ``None`` when the shard matches its record; else what is wrong with it (no record, a
        damaged record, a size or checksum that does not match): the caller recomputes it.

    Raises:
        ValueError: The shard is intact but was made from other images than the data has at its
            rows (another dataset, split or order in the same folder).
    """
    record, problem = _read_record(shard)
    if problem is None:
        problem = _content_problem(shard.read_bytes(), record)
    if problem is None and record["ids"] != ids:
        raise ValueError(f"shard {shard} was made from other images than this data has at its rows (image ids "
                         "differ): the folder holds a run on another dataset, split or order; use another out, "
                         "or restart=True (--restart) to delete it and start over")
    return problem


def read_shard(shard: Path) -> pa.Table:
    """``shard``'s rows, checked against its record where it has one.

    Raises:
        ValueError: The file does not match its record, or is not a readable Parquet file (the message
            names the file and says how to recompute it).
    """
    content = shard.read_bytes()
    record, _ = _read_record(shard)
    fix = "rerun the same command (or run_attribution call) to recompute it"
    problem = None if record is None else _content_problem(content, record)
    if problem is not None:
        raise ValueError(f"shard {shard} {problem}; {fix}")
    try:
        table = pq.read_table(pa.BufferReader(content))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"shard {shard} is not a readable Parquet file ({e}): truncated or damaged; {fix}") from None
    if record is not None and table.num_rows != record["rows"]:
        raise ValueError(f"shard {shard} holds {table.num_rows} rows, its record says {record['rows']}; {fix}")
    return table


def remove_shard(shard: Path) -> None:
    """Delete a shard and its record."""
    shard.unlink(missing_ok=True)
    record_path(shard).unlink(missing_ok=True)


def clear_run(out: Path, manifest: str) -> list[Path]:
    """Delete a run from ``out``: its shards, their records, temporary files a killed run left, then
    ``manifest``; nothing else in the folder. Returns what was deleted."""
    gone = [*out.glob("part-*.parquet"), *out.glob("_part-*.json"), *out.glob(".part-*.tmp"),
            *out.glob(f".{manifest}.*.tmp"), out / manifest]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


def differences(old: dict, new: dict, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(field, old value, new value)`` for every field that differs; nested dicts by dotted name
    (``data.split``), a field missing on one side as ``None``."""
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b
