"""Dataset-scale attribution: every image of a dataset through captioning, target choice and
:func:`~tl_multimodal.analysis.attribution.attribute`, written as long-format Parquet shards.

The dataset is cut into fixed chunks of ``shard_size`` images (``[0, s)``, ``[s, 2s)``, ...); chunk
``i`` belongs to process ``i % world_size``, so the union of the rows does not depend on how many
processes ran. Each chunk becomes one file ``part-{start:09d}-{stop:09d}.parquet``, written to a
temporary file and renamed (a crash never leaves a partial shard), with a record of its rows, checksum
and image ids beside it (:mod:`~tl_multimodal.training._run_files`); a run started again skips the
chunks whose file matches its record and recomputes the others. ``_run.json`` fingerprints the run
(settings, data, model, layout, projection): a rerun with another one is refused, naming what differs,
or starts over with ``restart=True``. Memory holds one batch of attribution scores and one chunk of
top-``k`` rows at a time, whatever the dataset size.

    run_attribution(model, load_coco_mini("../shared/data/coco_mini", "dev"), "runs/attr", k=100)
    rows = load_rows("runs/attr")     # image_index, image_id, caption, target, ..., layer, unit, score

Across processes (``accelerate.PartialState`` gives the rank and world size)::

    accelerate launch --multi_gpu --num_processes 8 -m tl_multimodal attribute DATA --split train --out runs/attr

``--multi_gpu`` starts the processes with ``torchrun``; without GPUs they run on CPU over gloo. (In
accelerate 1.x, ``accelerate launch --cpu --num_processes N`` starts a single process unless MPI is
set up with ``--mpirun_hostfile``; the command line then starts the N processes itself, see
:func:`~tl_multimodal.training._distributed.relaunch_cpu_processes`.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tl_multimodal._io import atomic_write
from tl_multimodal._validate import check_flag
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.models.projection import projection_id
from tl_multimodal.pretrained.load import load
from tl_multimodal.sae.load import load_sae
from tl_multimodal.sae.model import sae_id
from tl_multimodal.training._distributed import partial_state
from tl_multimodal.training._run_files import (clear_run, differences, ids_digest, read_shard, remove_shard,
                                               shard_problem, write_record)
from tl_multimodal.training.config import RunConfig
from tl_multimodal.data.sources import IMAGE_KEYS, find_column, open_dataset, rows_naming_bad_images

#: Columns of every shard, in order. ``image_index``: position in the dataset; ``position``: the
#: sequence position whose prediction is the target; ``y``: the target's logit there; ``rank``: the
#: unit's rank within its image (0 = highest ``score``, its max-over-patches attribution, at ``patch``).
SCHEMA_COLUMNS = ("image_index", "image_id", "caption", "target", "target_id", "position", "y",
                  "rank", "layer", "unit", "patch", "score")
MANIFEST = "_run.json"  # leading underscore: ignored by pyarrow/pandas when reading the folder
_ID_KEYS = ("image_id", "__key__", "id")


@dataclass
class RunSummary:
    """What one process did in :func:`run_attribution`.

    Attributes:
        out: The output folder.
        rank, world_size: This process and the number of processes.
        shards_written: Shards this process computed now.
        shards_skipped: This process's shards that already existed and matched their records (resumed).
        images: Images attributed now.
        rows: Rows written now.
        shards_recomputed: Of ``shards_written``, those that existed but did not match their
            records (truncated, damaged, or without a record) and were computed again.
    """

    out: Path
    rank: int
    world_size: int
    shards_written: int
    shards_skipped: int
    images: int
    rows: int
    shards_recomputed: int = 0

    def __repr__(self) -> str:
        again = f", {self.shards_recomputed} of them damaged and recomputed" if self.shards_recomputed else ""
        return (f"RunSummary(rank {self.rank}/{self.world_size}: {self.shards_written} shards written "
                f"({self.images} images, {self.rows} rows){again}, {self.shards_skipped} already done, "
                f"out={str(self.out)!r})")

    def to_dataframe(self):
        """One row with the summary's fields."""
        import pandas as pd

        return pd.DataFrame([{**self.__dict__, "out": str(self.out)}])


# ---------------------------------------------------------------------------- data
def _chunks(data, shard_size: int, limit: int | None) -> Iterator[tuple[int, int, Callable[[], Iterable[dict]]]]:
    """``(start, stop, rows)`` for each chunk; ``rows()`` gives the chunk's rows (a map-style dataset's rows
    as a ``datasets.Dataset``, decoded lazily: read them through :func:`rows_naming_bad_images`; a stream's
    as a list, read through it here)."""
    if hasattr(data, "select") and hasattr(data, "__len__"):  # map-style datasets.Dataset: random access
        n = len(data) if limit is None else min(len(data), limit)
        for start in range(0, n, shard_size):
            stop = min(start + shard_size, n)
            yield start, stop, lambda a=start, b=stop: data.select(range(a, b))
        return
    rows = rows_naming_bad_images(iter(data) if limit is None else itertools.islice(data, limit))
    start = 0
    while chunk := list(itertools.islice(rows, shard_size)):
        yield start, start + len(chunk), lambda c=chunk: c
        start += len(chunk)


def _chunk_ids(rows, start: int, id_column: str | None) -> list:
    """The image ids of a chunk's rows (a ``datasets.Dataset``: its id column alone, no image decoded)."""
    names = getattr(rows, "column_names", None)
    columns = sorted(names if names is not None else rows[0]) if len(rows) else []
    key = id_column if id_column is not None else next((k for k in _ID_KEYS if k in columns), None)
    if key is None:
        return list(range(start, start + len(rows)))
    if key not in columns:
        raise ValueError(f"id_column {id_column!r} is not in the dataset (columns: {columns})")
    return list(rows[key]) if names is not None else [r[key] for r in rows]


# ---------------------------------------------------------------------------- files
def shard_name(start: int, stop: int) -> str:
    """The file of the chunk ``[start, stop)`` of the dataset."""
    return f"part-{start:09d}-{stop:09d}.parquet"


def _manifest(config: RunConfig, model) -> dict:
    """What ``_run.json`` records, the run's fingerprint: its settings; ``data``: ``source`` (an absolute
    folder, a webdataset pattern or a hub name; ``None`` when the caller passed rows), ``split`` and
    ``limit``; then the model's LM, encoder, layout (``bos``, ``n_image_tokens``) and projection id."""
    settings = config.to_dict()
    source = settings.pop("data_source")
    data = {"source": None if source is None else _where(source), "split": settings.pop("split"),
            "limit": settings.pop("limit")}
    return {**settings, "data": data, "lm": model.cfg.model_name, "encoder": model.vision.model_name,
            "bos": bool(model.image_bos), "n_image_tokens": int(model.n_image_tokens),
            "projection_id": projection_id(model.projection)}


def _allowed(field: str, old, new) -> bool:
    """Whether a rerun may change ``field``: ``batch_size`` (the rows do not depend on it), and a
    ``data.limit`` that grows (the run extends; a smaller one would leave finished shards past it)."""
    if field in RunConfig.FREE:
        return True
    return field == "data.limit" and (new is None or old is not None and new >= old)


def _check_manifest(out: Path, settings: dict) -> None:
    """Record the run's fingerprint in ``out/_run.json``, or refuse to mix shards made with another one.

    Every recorded field is compared but those :func:`_allowed` to change (the record then holds the
    latest run's); the error names each one that differs as ``field: old -> new``.
    """
    path = out / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except ValueError as e:
            raise ValueError(f"{path} is damaged ({e}); restart=True (--restart) deletes the run in {out} "
                             "and starts over") from None
        changed = [f"{field}: {a!r} -> {b!r}" for field, a, b in differences(old, settings)
                   if not _allowed(field, a, b)]
        if changed:
            raise ValueError(f"{out} holds shards of another run ({'; '.join(changed)}); use the same settings, "
                             "another out folder, or restart=True (--restart) to delete them and start over")
        if old == settings:
            return
    # every rank writes the same content, so racing ranks agree
    atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def load_rows(out: str | Path):
    """Every row of a run's shards as one DataFrame (columns :data:`SCHEMA_COLUMNS`), sorted by
    image_index and rank.

    Raises:
        FileNotFoundError: ``out`` holds no shard.
        ValueError: Shards that overlap, or a shard that does not match its record or cannot be read
            (named: rerunning the run recomputes it).
    """
    out = Path(out)
    files = sorted(out.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{out} holds no part-*.parquet shards")
    ranges = [tuple(int(x) for x in f.stem.split("-")[1:]) for f in files]
    for (a, f_a), (b, f_b) in zip(zip(ranges, files), zip(ranges[1:], files[1:])):
        if b[0] < a[1]:
            raise ValueError(f"shards {f_a.name} and {f_b.name} overlap (files of another run in {out}?)")
    df = pa.concat_tables([read_shard(f) for f in files]).to_pandas()
    return df.sort_values(["image_index", "rank"], ignore_index=True)


# ---------------------------------------------------------------------------- the runner
def _batch_table(attr, k: int, indices: Sequence[int], ids: Sequence[Any]) -> pa.Table:
    tops = attr.top_units(k)
    img = tops.image_index
    per_image = lambda values: [values[i] for i in img.tolist()]  # noqa: E731
    return pa.table({
        "image_index": pa.array(per_image(list(indices)), pa.int64()),
        "image_id": per_image(list(ids)),
        "caption": pa.array(per_image(attr.captions or [None] * len(attr)), pa.string()),
        "target": pa.array(per_image(attr.targets), pa.string()),
        "target_id": pa.array(attr.target_ids[img].numpy(), pa.int64()),
        "position": pa.array(attr.positions[img].numpy(), pa.int64()),
        "y": pa.array(attr.y[img].numpy(), pa.float32()),
        "rank": pa.array(tops.rank.numpy(), pa.int32()),
        "layer": pa.array(tops.layer.numpy(), pa.int32()),
        "unit": pa.array(tops.unit.numpy(), pa.int32()),
        "patch": pa.array(tops.patch.numpy(), pa.int32()),
        "score": pa.array(tops.score.numpy(), pa.float32()),
    })


def _images_of_rank(data, limit, shard_size, rank, world_size) -> int | None:
    """How many images this rank attributes (at most, for a stream with a limit); None if unknown."""
    sizes = [n for n in (limit, len(data) if hasattr(data, "__len__") else None) if n is not None]
    if not sizes:
        return None
    n = min(sizes)
    return sum(min(shard_size, n - s) for i, s in enumerate(range(0, n, shard_size)) if i % world_size == rank)


def _process_state(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank= and world_size=, or neither")
    if rank is None:
        state = partial_state()
        return state.process_index, state.num_processes
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


def run_attribution(model, data, out: str | Path, config: RunConfig | None = None, *, rank: int | None = None,
                    world_size: int | None = None, progress: bool = True,
                    on_shard: Callable[[Path], None] | None = None, restart: bool = False,
                    **overrides) -> RunSummary:
    """Attribute every image of ``data`` and write each image's top ``k`` units to Parquet shards.

    For every image: the model's greedy caption, its first noun as the target, the attribution of
    the target's logit to every MLP unit at every image position (:func:`~tl_multimodal.attribute`),
    and the ``k`` units with the highest max-over-patches score, one row each.

    Args:
        model: A vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`: HookedVisionPrefix or VisionBridge), in eval mode.
        data: A ``datasets.Dataset`` (random access: a process reads only its own chunks), or any
            iterable of dict rows (``datasets.IterableDataset``, ``webdataset``; every process reads
            the stream and keeps its chunks).
        out: Output folder (created). Shards already there are kept if they match the records
            written with them (row count, size, SHA-256, image ids); a damaged one is recomputed,
            with a warning. Its ``_run.json`` records the run's fingerprint: the settings of
            ``config``, ``data`` (``{"source": ..., "split": ..., "limit": ...}``), the model's
            ``lm``, ``encoder``, layout (``bos``, ``n_image_tokens``) and ``projection_id``
            (:func:`~tl_multimodal.models.projection.projection_id`); a folder whose record differs
            is refused, each field named as ``field: old -> new`` (but ``batch_size``, and a larger
            ``limit``, which extends the run).
        config: The settings (:class:`~tl_multimodal.training.config.RunConfig`: ``k``,
            ``shard_size``, ``batch_size``, ``limit``, ``prompt``, ``max_new_tokens``, ``hook``,
            ``image_column``, ``id_column``, and where the data and model came from); default all
            defaults.
        rank, world_size: This process and the number of processes; default from
            ``accelerate.PartialState()`` (1 process when not launched by ``accelerate``).
        progress: Show a progress bar (one per process).
        on_shard: Called with each shard's path once it is written.
        restart: Delete the run in ``out`` (its shards, their records, ``_run.json``; nothing else)
            and start over. With several processes rank 0 deletes it and the others wait for it
            (under a ``torch.distributed`` process group; called one rank after another, rank 0 first).
        **overrides: :class:`~tl_multimodal.training.config.RunConfig` fields replacing those of
            ``config`` (``k=10, limit=8``).

    Returns:
        A :class:`RunSummary` of this process's work.

    Raises:
        TypeError: An override that is not a setting (the settings are named), or not a model.
        ValueError: A bad setting; ``out`` holding shards of a run with another fingerprint, or a
            shard made from other images than the data has at its rows.
        ImageReadError: An image cannot be decoded (a ``ValueError`` naming its row and file); the shards
            finished before it are kept.
    """
    config = RunConfig.resolve(config, overrides)
    k, shard_size, batch_size, limit = config.k, config.shard_size, config.batch_size, config.limit
    prompt, max_new_tokens, hook = config.prompt, config.max_new_tokens, config.hook
    image_column, id_column = config.image_column, config.id_column
    if not hasattr(model, "embed_images"):
        raise TypeError(f"model must be a vision LM (HookedVisionPrefix or VisionBridge), got {type(model).__name__}")
    restart = check_flag(restart, "restart")
    rank, world_size = _process_state(rank, world_size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    sae = None if config.sae is None else load_sae(config.sae, dtype=model.cfg.dtype, device=model.cfg.device)
    settings = _manifest(config, model)
    if sae is not None:  # the SAE by its content, as the projection (a moved copy keeps it; its path is in "sae")
        settings["sae_id"] = sae_id(sae)
    first = rank == 0 or not restart  # with restart, rank 0 clears the folder and the others wait for it
    if first:
        if restart:
            clear_run(out, MANIFEST)
        _check_manifest(out, settings)
    if restart:
        _wait_for_ranks(world_size)
        if not first:
            _check_manifest(out, settings)

    from tqdm.auto import tqdm

    bar = tqdm(total=_images_of_rank(data, limit, shard_size, rank, world_size), unit="img", position=rank,
               desc=f"attribute rank {rank}/{world_size}", disable=not progress)
    written = skipped = recomputed = n_images = n_rows = 0
    try:
        for i, (start, stop, rows) in enumerate(_chunks(data, shard_size, limit)):
            if i % world_size != rank:
                continue
            path = out / shard_name(start, stop)
            chunk = rows()
            chunk_ids = _chunk_ids(chunk, start, id_column)
            if path.exists():
                problem = shard_problem(path, ids_digest(chunk_ids))
                if problem is None:
                    skipped += 1
                    bar.update(stop - start)
                    continue
                warnings.warn(f"shard {path} {problem}: recomputing it", stacklevel=2)
                recomputed += 1
            tables = []
            batches = rows_naming_bad_images(chunk, data, start)  # an image that cannot be read is named
            for b_start in range(start, stop, batch_size):
                batch = list(itertools.islice(batches, batch_size))
                indices = list(range(b_start, b_start + len(batch)))
                key = find_column(batch[0], IMAGE_KEYS, image_column, "image_column")
                ids = chunk_ids[b_start - start:b_start - start + len(batch)]
                try:
                    attr = attribute(model, [r[key] for r in batch], prompt=prompt, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, hook=hook, sae=sae)
                except ValueError as e:
                    raise ValueError(f"attribution failed on images {indices[0]}..{indices[-1]} "
                                     f"(ids {ids}): {e}") from e
                tables.append(_batch_table(attr, k, indices, ids))
                bar.update(len(batch))
            table = pa.concat_tables(tables)
            atomic_write(path, lambda f: pq.write_table(table, f))
            write_record(path, table.num_rows, ids_digest(chunk_ids))
            for stale in out.glob(f"part-{start:09d}-*.parquet"):  # the shorter last chunk of a smaller limit
                if stale != path:
                    remove_shard(stale)
            written += 1
            n_images += stop - start
            n_rows += table.num_rows
            if on_shard is not None:
                on_shard(path)
    finally:
        bar.close()
    return RunSummary(out, rank, world_size, written, skipped, n_images, n_rows, recomputed)


def _wait_for_ranks(world_size: int) -> None:
    """A barrier across the processes of a ``torch.distributed`` group (nothing without one)."""
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------- command line
def _where(source) -> str:
    """A local file or folder, or a webdataset pattern in a local folder, as an absolute path (a rerun
    from elsewhere records the same); anything else (a hub name) as given."""
    path = Path(source)
    if path.exists():
        return str(path.resolve())
    if ".tar" in path.name and path.parent.is_dir():
        return str(path.parent.resolve() / path.name)
    return str(source)


def run_attribute(args: argparse.Namespace, *, data=None, model=None) -> RunSummary:
    """Run the ``attribute`` command from parsed arguments (one process of an ``accelerate launch``);
    ``data`` and ``model``, where the caller opened them already, are ``args.data`` and ``args.model``."""
    state = partial_state()
    if data is None:
        data = open_dataset(args.data, args.split)
    if model is None:
        model = load(args.model, backend=args.backend, projection=args.projection,
                     encoder=args.encoder, device=state.device)
    config = RunConfig(k=args.k, shard_size=args.shard_size, batch_size=args.batch_size, limit=args.limit,
                       prompt=args.prompt, max_new_tokens=args.max_new_tokens, hook=args.hook,
                       image_column=args.image_column, id_column=args.id_column, data_source=_where(args.data),
                       split=args.split, model_spec=args.model,
                       projection_file=None if args.projection is None else _where(args.projection),
                       sae=None if args.sae is None else _where(args.sae))
    summary = run_attribution(model, data, args.out, config, rank=state.process_index,
                              world_size=state.num_processes, progress=not args.no_progress,
                              restart=getattr(args, "restart", False))
    print(summary, flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        n = len(list(Path(args.out).glob("part-*.parquet")))
        print(f"done: {n} shards in {args.out}", flush=True)
    return summary
