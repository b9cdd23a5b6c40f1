"""Training the LiMBeR projection: :func:`train_projection` and its resumable state.

Only the projection learns: the LM and the encoder are frozen. From a ``datasets.Dataset``, encoder
features are computed once per image and kept (in RAM, or in a memory-mapped file,
:mod:`~tl_multimodal.training.features`), so a training step runs only the projection and the LM;
from a stream of rows (a ``datasets.IterableDataset``, webdataset shards, any iterable of dicts) each
step encodes the images it reads, and the dataset is never held whole. The loss is next-token
cross-entropy on caption tokens (image positions are never targets), as in LiMBeR
(:mod:`~tl_multimodal.training.nll`). The settings are a :class:`~tl_multimodal.training.config.TrainingConfig`,
recorded with the trained projection.

Training is checked before it starts (every row of the data, every setting), leaves the model's
train/eval modes and ``requires_grad`` flags as it found them on every exit, writes its state
atomically (:mod:`tl_multimodal._io`) and resumes from it bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import datasets
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from tl_multimodal._io import atomic_save, check_finite, check_writable_folder, load_checkpoint
from tl_multimodal.data.sources import rows_naming_bad_images
from tl_multimodal.models.protocol import VisionLM
from tl_multimodal.models.projection import projection_id
from tl_multimodal.training._distributed import rank_and_world_size
from tl_multimodal.training._fingerprint import captions_id, encoder_identity, images_id, update_row
from tl_multimodal.training.config import TrainingConfig
from tl_multimodal.training.features import _check_columns, _encode_batch, encode_images
from tl_multimodal.training.nll import _batch, _caption_ids, _mean_nll, _restoring, caption_token_nll

STATE_FILE = "training_state.pt"
_STATE_FORMAT = "tl_multimodal training state v1"
# settings a resumed run must share with the run it continues (``steps`` may grow)
_RESUME_KEYS = ("batch_size", "lr", "warmup", "weight_decay", "clip", "seed", "n_images", "grad_accum",
                "processes", "shuffle", "bos", "augment")
# what states written before these keys ran with (streams always shuffled; no BOS; no augmentation)
_RESUME_DEFAULTS = {"shuffle": True, "bos": False, "augment": None}
# what a resumed run must have been made from, compared where the state records it (older states do not):
# the images and captions of a datasets.Dataset (a stream checks the rows it skips instead), the encoder
# (name and weights) and the LM (name and width)
_IDENTITY_KEYS = {"images": "a hash of the images", "captions": "a hash of the captions",
                  "encoder": "name and weights", "lm": "name and width"}


@dataclass
class TrainingResult:
    """Losses of a :func:`train_projection` run.

    Attributes:
        train_losses: Mean caption NLL per token of every step (from step 1, also when resumed).
        dev_losses: ``(step, dev NLL per token)`` at each evaluation.
        steps: Steps taken.
        checkpoints: Paths of the projections saved by this call.
        state: Path of the last training state written (what ``resume_from=`` takes), if any.
        config: The settings of the run.
    """

    train_losses: list[float]
    dev_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    checkpoints: list[Path] = field(default_factory=list)
    state: Path | None = None
    config: TrainingConfig | None = None

    def __repr__(self) -> str:
        last = f"{self.train_losses[-1]:.3f}" if self.train_losses else "-"
        dev = f", dev {self.dev_losses[-1][1]:.3f}" if self.dev_losses else ""
        return f"TrainingResult(steps={self.steps}, train loss {last}{dev})"

    def to_frame(self):
        """The per-step losses as a ``pandas.DataFrame`` (columns step, train_loss, dev_loss)."""
        import pandas as pd

        dev = dict(self.dev_losses)
        return pd.DataFrame({"step": range(1, len(self.train_losses) + 1), "train_loss": self.train_losses,
                             "dev_loss": [dev.get(s) for s in range(1, len(self.train_losses) + 1)]})


# ---------------------------------------------------------------------------- training
def _rng_states(rng: random.Random, world: int) -> dict:
    """The sampling RNG (shared by all processes) and every process's torch RNGs (dropout)."""
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    return {"python": rng.getstate(), "ranks": ranks}


def _set_rng_states(rng: random.Random, states: dict, rank: int) -> None:
    version, internal, gauss = states["python"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["ranks"][rank]["torch"])
    if states["ranks"][rank]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["ranks"][rank]["cuda"])


def _load_state(path: str | Path, resume: dict, steps: int, projection: torch.nn.Module) -> dict:
    """A training state written by :func:`train_projection`, checked against this run's settings and the
    model's ``projection``."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"resume_from={str(path)!r} is not a training state written by train_projection "
                         f"(those are named {STATE_FILE})")
    have = {**_RESUME_DEFAULTS, **state["config"]}
    differ = [f"{k}: checkpoint has {have.get(k)!r}, this call {resume[k]!r}"
              for k in _RESUME_KEYS if have.get(k) != resume[k]]
    differ += [f"{k} ({what}): checkpoint has {have[k]!r}, this call {resume[k]!r}"
               for k, what in _IDENTITY_KEYS.items() if k in have and have[k] != resume[k]]
    if differ:
        raise ValueError(f"resume_from={str(path)!r} was written by a run with other settings; " + "; ".join(differ))
    _check_state(state, path, steps, resume)
    mine = {k: list(v.shape) for k, v in projection.state_dict().items()}
    theirs = {k: list(v.shape) for k, v in state["projection"].items()}
    if mine != theirs:
        shapes = [f"{k}: {theirs.get(k)} in the state, {mine.get(k)} in this model"
                  for k in dict.fromkeys([*theirs, *mine]) if theirs.get(k) != mine.get(k)]
        raise ValueError(f"resume_from={str(path)!r} holds a projection for another encoder or LM width "
                         f"({'; '.join(shapes)})")
    return state


def _check_state(state: dict, path: Path, steps: int, resume: dict) -> None:
    """Refuse a state whose fields are not what :func:`train_projection` writes (an edited or damaged file)."""
    where = f"resume_from={str(path)!r}"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{where} is not a valid training state: step is {step!r}, not a whole number >= 0")
    if step > steps:
        raise ValueError(f"{where} is at step {step}, past steps={steps}")
    losses, order, stream = state.get("train_losses"), state.get("order"), state.get("stream")
    n_images = resume["n_images"]
    problems = {
        "train_losses": isinstance(losses, list) and len(losses) == step,
        "scheduler": isinstance(state.get("scheduler"), dict) and state["scheduler"].get("last_epoch") == step,
        "optimizer": isinstance(state.get("optimizer"), dict),
        "rng": isinstance(state.get("rng"), dict) and len(state["rng"].get("ranks", ())) == resume["processes"],
        "order": isinstance(order, list) and (n_images is None and not order or n_images is not None and all(
            isinstance(i, int) and 0 <= i < n_images for i in order)),
        "stream": stream is None if n_images is not None else isinstance(stream, dict) and all(
            isinstance(stream.get(k), int) and stream[k] >= 0 for k in ("epoch", "position")),
    }
    bad = [name for name, ok in problems.items() if not ok]
    if bad:
        raise ValueError(f"{where} is not a valid training state: {', '.join(bad)} "
                         f"{'does' if len(bad) == 1 else 'do'} not agree with its step {step} and settings")
    projection = state.get("projection")
    if not isinstance(projection, dict) or not all(isinstance(v, Tensor) for v in projection.values()):
        raise ValueError(f"{where} is not a valid training state: its projection is not a dict of tensors")
    check_finite(projection, f"projection in {path}")


class _Stream:
    """The rows of an iterable dataset in order, epoch after epoch, from a saved ``(epoch, position)``.

    Nothing but the rows taken is held. On resume the first ``position`` rows of the epoch are read
    and dropped (a stream cannot seek), and checked against ``digest``, the running SHA-256 of the
    epoch's rows (images and captions) the state recorded: another stream is refused. A
    ``datasets.IterableDataset`` gets ``set_epoch`` (from epoch 1 on it reorders its shards and
    reseeds its shuffle buffer, reproducibly).
    """

    def __init__(self, data: Iterable[Mapping], image_column: str, caption_column: str, epoch: int = 0,
                 position: int = 0, digest: str | None = None):
        self.data, self.columns, self.epoch, self.position = data, (image_column, caption_column), epoch, 0
        self._rows = self._open()
        for _ in range(position):
            row = next(self._rows, None)
            if row is None:
                raise ValueError(f"the training stream has {self.position} rows in epoch {epoch}, but the training "
                                 f"state had read {position} of them: it was written on another stream")
            self._add(row)
        if digest is not None and self._digest.hexdigest()[:16] != digest:
            raise ValueError(f"the first {position} rows of epoch {epoch} of the training stream are not those the "
                             "training state read (other images or captions): it was written on another stream")

    def _open(self):
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.epoch)
        self._digest = hashlib.sha256()
        return rows_naming_bad_images(iter(self.data))

    def _add(self, row) -> None:
        if isinstance(row, Mapping):
            update_row(self._digest, row.get(self.columns[0]), row.get(self.columns[1]))
        self.position += 1

    def take(self, n: int) -> list[tuple[int, int, Mapping]]:
        """The next ``n`` rows as ``(epoch, position in the epoch, row)``, going on to the next epoch as needed."""
        rows = []
        while len(rows) < n:
            row = next(self._rows, None)
            if row is None:
                if self.position == 0:
                    raise ValueError(f"the training stream gave no rows in epoch {self.epoch} (a generator can be "
                                     "read only once: pass a list, a datasets.IterableDataset or webdataset shards)")
                self.epoch, self.position = self.epoch + 1, 0
                self._rows = self._open()
                continue
            if not isinstance(row, Mapping):
                raise TypeError(f"the training stream must give dict rows, got {type(row).__name__} "
                                f"at row {self.position} of epoch {self.epoch}")
            rows.append((self.epoch, self.position, row))
            self._add(row)
        return rows

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "digest": self._digest.hexdigest()[:16]}


def _is_stream(dataset) -> bool:
    return (not isinstance(dataset, (datasets.Dataset, str, bytes, Mapping, Tensor))
            and isinstance(dataset, Iterable))


def train_projection(model: VisionLM, dataset: datasets.Dataset | Iterable[Mapping],
                     config: TrainingConfig | None = None, *, dev_dataset: datasets.Dataset | None = None,
                     **overrides) -> TrainingResult:
    """Train ``model.projection`` on image-caption pairs (LiMBeR's optimiser settings as defaults).

    Every row of a ``datasets.Dataset`` (and of ``dev_dataset``) is checked before anything runs;
    rows of a stream are checked as they are read (errors name the row's position in its epoch).
    Whatever happens (end, exception, Ctrl-C), the model's train/eval modes and ``requires_grad``
    flags are restored.

    Args:
        model: The vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`: a HookedVisionPrefix or a
            VisionBridge); only its projection is trained (in train mode: its dropout), everything else is
            frozen and runs in eval mode (a bridge's HF dropout stays off).
        dataset: Rows with an image column (PIL or path) and a caption column (a string or a list of
            strings, one sampled per step): a ``datasets.Dataset`` (features encoded once, batches
            drawn at random), or a stream, i.e. any other iterable of dict rows such as
            ``datasets.load_dataset(..., streaming=True)`` or ``webdataset.WebDataset(...).decode("pil")``
            (``image_column="jpg", caption_column="txt"``): read in order, ``batch_size`` rows per
            step, epoch after epoch, each step encoding its own images; nothing is materialised. A
            resumed stream skips the rows already consumed (their count is in the training state);
            shuffle a stream at its source (``IterableDataset.shuffle(buffer_size=...)``).
        config: The settings (:class:`~tl_multimodal.training.config.TrainingConfig`); default all
            defaults.
        dev_dataset: Rows to evaluate the caption NLL on every ``eval_every`` steps (first caption).
        **overrides: :class:`~tl_multimodal.training.config.TrainingConfig` fields replacing those of
            ``config`` (``steps=200, lr=3e-3``).

    The saved projections (``checkpoint_dir``) and ``model.projection`` record the run in
    ``info.training``: ``config`` (``config.to_dict()``), ``init_projection`` (the
    :func:`~tl_multimodal.models.projection.projection_id` training started from), the dataset
    name, steps, the main settings, the last losses. ``bos`` sets ``model.projection.info.bos``, so
    the trained projection is used with its layout.

    Launched on several processes (``accelerate launch --multi_gpu --num_processes N script.py`` on
    GPUs; ``torchrun --nproc_per_node N script.py`` on CPUs, gloo), every process draws the same
    global batches and runs its share of each (``batch_size / N``, then split by ``grad_accum``;
    every process reads a stream whole and encodes only its share); gradients are summed across
    processes before the shared optimizer step, so the projection follows the one-process run (up
    to float summation order, and dropout masks, which are drawn per process). Process 0 writes
    checkpoints; all resume from them.

    Returns:
        The losses and the config; the trained projection is in ``model.projection`` (with its
        training record).

    Raises:
        TypeError: An override that is not a setting (the settings are named).
        TypeError, ValueError: Bad settings or rows (each row named), before any work.
        ImageReadError: An image cannot be decoded (a ``ValueError`` naming its row and file).
        FloatingPointError: The loss or gradient became NaN/infinite; the message names the last
            training state written (a good one, to resume from with a lower ``lr``).
    """
    config = TrainingConfig.resolve(config, overrides)
    rank, world = rank_and_world_size()
    if config.batch_size < world * config.grad_accum:
        raise ValueError(f"batch_size={config.batch_size} cannot be split over {world} processes x "
                         f"grad_accum={config.grad_accum}")
    image_column, caption_column = config.image_column, config.caption_column
    layout = model.image_bos if config.bos is None else config.bos
    n_start = model.n_image_tokens + layout
    stream = _is_stream(dataset)
    if not stream and not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset or an iterable of dict rows (a stream), "
                        f"got {type(dataset).__name__}")
    if stream:
        if config.feature_cache is not None:
            raise ValueError("feature_cache needs a datasets.Dataset (rows by index); a stream is encoded as it "
                             "is read")
        captions = None
    else:
        _check_columns(dataset, "dataset", image_column, caption_column)
        captions = _caption_ids(model, dataset[caption_column], f"dataset column {caption_column!r}", n_start)
    dev_captions = None
    if dev_dataset is not None:
        _check_columns(dev_dataset, "dev_dataset", image_column, caption_column)
        dev_captions = [c[0] for c in _caption_ids(model, dev_dataset[caption_column],
                                                   f"dev_dataset column {caption_column!r}", n_start)]
    resume = {"batch_size": config.batch_size, "lr": config.lr, "warmup": config.warmup,
              "weight_decay": config.weight_decay, "clip": config.clip, "seed": config.seed,
              "n_images": None if stream else len(captions), "grad_accum": config.grad_accum, "processes": world,
              "shuffle": config.shuffle, "bos": layout, "augment": config.augment_name}
    if config.checkpoint_dir is not None or config.resume_from is not None:  # what the state is made from
        resume.update(images=None if stream else images_id(dataset, image_column),
                      captions=None if stream else captions_id(dataset[caption_column]),
                      encoder=encoder_identity(model), lm=f"{model.cfg.model_name} (d_model {model.cfg.d_model})")
    state = None
    if config.resume_from is not None:
        state = _load_state(config.resume_from, resume, config.steps, model.projection)
    rows = _Stream(dataset, image_column, caption_column, **(state["stream"] if state is not None else {})) \
        if stream else None
    init = state.get("init_projection") if state is not None else projection_id(model.projection)
    if config.checkpoint_dir is not None:  # a folder that cannot be written fails now, not at the first checkpoint
        check_writable_folder(config.checkpoint_dir, "checkpoint_dir")
    device = config.device
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else model.W_E.device
    device = torch.device(device)
    mixed_precision = device.type == "cuda" if config.mixed_precision is None else config.mixed_precision
    if model.W_E.device != device:
        model.to(device)  # all or nothing: a failed move leaves the model as it was
    model.projection.info.bos = layout  # every check passed and the model moved: the projection learns this layout
    with _restoring(model):
        return _train(model, rows if stream else dataset, captions, dev_dataset, dev_captions, state, config, resume,
                      init=init, device=device, mixed_precision=mixed_precision,
                      progress=config.progress and rank == 0, rank=rank, world=world)


def _train(model, dataset, captions, dev_dataset, dev_captions, state, config: TrainingConfig, resume: dict, *,
           init, device, mixed_precision, progress, rank, world):
    """The loop of :func:`train_projection`, its inputs checked; the caller restores the model.

    ``captions`` is None for a stream (``dataset`` then is its :class:`_Stream`). A stream, or
    ``augment``, encodes each step's images as it goes; else the features are encoded once.
    ``resume`` holds the settings a resumed run must share (saved in the state)."""
    steps, eval_every, checkpoint_every = config.steps, config.eval_every, config.checkpoint_every
    image_column, caption_column, augment = config.image_column, config.caption_column, config.augment_fn
    ckpt_dir = None if config.checkpoint_dir is None else Path(config.checkpoint_dir)
    model.requires_grad_(False)
    model.projection.requires_grad_(True)
    stream = captions is None
    features = None if stream or augment is not None else encode_images(model, dataset, image_column,
                                                                         progress=progress, cache=config.feature_cache)
    dev_features = None if dev_dataset is None else encode_images(model, dev_dataset, image_column, progress=progress)

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed + rank)  # dropout: each process its own masks
    params = list(model.projection.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    result = TrainingResult(train_losses=[], config=config)
    order: list[int] = []
    if state is not None:
        model.projection.load_state_dict(state["projection"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_states(rng, state["rng"], rank)
        order = list(state["order"])
        result.train_losses = list(state["train_losses"])
        result.dev_losses = [tuple(d) for d in state["dev_losses"]]
        result.steps = state["step"]
    rows = dataset if stream else None

    def record() -> dict:  # the training record saved with the projection
        last = result.train_losses[-100:]
        return {"config": config.to_dict(), "init_projection": init,
                "dataset": config.dataset_name, "n_images": resume["n_images"], "steps": result.steps,
                **{k: resume[k] for k in ("batch_size", "lr", "warmup", "weight_decay", "clip", "seed", "bos",
                                          "augment")},
                "train_loss_last100": sum(last) / len(last) if last else None,
                "dev_nll": result.dev_losses[-1][1] if result.dev_losses else None,
                "dev_nll_by_step": [list(d) for d in result.dev_losses]}

    saved_at = [None]  # step of the last state written

    def save(name: str) -> None:  # the projection for users, then the state to resume from
        model.projection.info.training = record()
        result.checkpoints.append(ckpt_dir / name)
        result.state = ckpt_dir / STATE_FILE
        rngs = _rng_states(rng, world)  # every process takes part
        if rank == 0:
            model.projection.save(result.checkpoints[-1])
            atomic_save({
                "format": _STATE_FORMAT, "step": result.steps, "config": resume, "init_projection": init,
                "projection": model.projection.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rngs, "order": order,
                "stream": rows.state() if stream else None,
                "train_losses": result.train_losses, "dev_losses": [list(d) for d in result.dev_losses],
            }, result.state)
        if world > 1:
            dist.barrier()
        saved_at[0] = result.steps

    def fail(what: str, value: float, step: int):
        kept = (f"the last good state is {result.state} (step {saved_at[0]})" if result.state is not None
                else "no checkpoint was written")
        return FloatingPointError(f"{what} became {value} at step {step}; training stopped, {kept}. "
                                  "Try a lower lr or check the data.")

    batch_size, grad_accum = config.batch_size, config.grad_accum
    bar = tqdm(range(result.steps + 1, steps + 1), desc="training projection", disable=not progress,
               initial=result.steps, total=steps)
    # Frozen LM and encoder in eval mode (a bridge runs the HF model, whose dropout would otherwise
    # fire; images encoded per step, from a stream or augment, stay in eval mode); only the
    # projection trains (its dropout).
    model.eval()
    model.projection.train()
    n_start = model.n_image_tokens + resume["bos"]
    for step in bar:
        if stream:  # every process reads every row (captions of the whole batch), encodes only its own
            batch = rows.take(batch_size)
            options = []
            for epoch, position, row in batch:
                missing = [c for c in (image_column, caption_column) if c not in row]
                if missing:
                    raise ValueError(f"row {position} of the training stream (epoch {epoch}) has no column "
                                     f"{', '.join(map(repr, missing))} (columns: {', '.join(map(str, row))}); "
                                     "pass image_column= and caption_column=")
                options += _caption_ids(model, [row[caption_column]], f"training stream (epoch {epoch}) column "
                                        f"{caption_column!r}", n_start, first=position)
        else:
            while len(order) < batch_size:
                order += rng.sample(range(len(captions)), len(captions)) if config.shuffle else \
                    list(range(len(captions)))
            idx, order = order[:batch_size], order[batch_size:]
            options = [captions[i] for i in idx]
        chosen = [rng.choice(opts) for opts in options]  # the same draws in every process
        views = [rng.getrandbits(32) for _ in chosen] if augment is not None else None  # seeds of the views
        n_targets = sum(map(len, chosen))  # every caption token (end-of-text included) is a target
        parts = np.array_split(np.arange(batch_size), world * grad_accum)[rank * grad_accum:(rank + 1) * grad_accum]
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for part in parts:
            tokens, mask = _batch(model, [chosen[j] for j in part])
            if stream or augment is not None:
                images = [batch[j][2][image_column] if stream else dataset[idx[j]][image_column] for j in part]
                if augment is not None:
                    images = [augment(image, random.Random(views[j])) for image, j in zip(images, part)]
                feats = _encode_batch(model, images).to(device)
            else:
                feats = features[[idx[j] for j in part]].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
                nll = caption_token_nll(model, tokens.to(device), mask.to(device), feats).sum()
            if torch.isfinite(nll):  # else the step fails below, in every process alike
                (nll / n_targets).backward()  # micro-batch gradients add up to the full batch's
            total += nll.detach().double()
        if world > 1:  # sum the gradients and the loss over processes
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            dist.all_reduce(total)
        value = total.item() / n_targets
        if not math.isfinite(value):
            raise fail("loss", value, step)
        norm = torch.nn.utils.clip_grad_norm_(params, config.clip)
        if not torch.isfinite(norm):
            raise fail("gradient norm", norm.item(), step)
        opt.step()
        sched.step()
        result.train_losses.append(value)
        result.steps = step
        bar.set_postfix(loss=f"{value:.3f}")
        if dev_features is not None and (step % eval_every == 0 or step == steps):
            result.dev_losses.append((step, _mean_nll(model, dev_captions, dev_features, 16)))
            bar.write(f"step {step}: dev NLL/token {result.dev_losses[-1][1]:.4f}")
        if ckpt_dir is not None and checkpoint_every and step % checkpoint_every == 0:
            save(f"projection_step{step}.pt")
    model.projection.info.training = record()
    if ckpt_dir is not None:
        save("projection.pt")
    return result
