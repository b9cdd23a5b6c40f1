"""Training the LiMBeR projection, and the caption log-likelihood that measures it.

Only the projection learns: the LM and the encoder are frozen. From a ``datasets.Dataset``, encoder
features are computed once per image and kept (in RAM, or in a memory-mapped file), so a training
step runs only the projection and the LM; from a stream of rows (a ``datasets.IterableDataset``,
webdataset shards, any iterable of dicts) each step encodes the images it reads, and the dataset is
never held whole. The loss is next-token
cross-entropy on caption tokens (image positions are never targets), as in LiMBeR; the LM is
unembedded only at the positions that predict a caption token.

Training is checked before it starts (every row of the data, every argument), leaves the model's
train/eval modes and ``requires_grad`` flags as it found them on every exit, writes its state
atomically (:mod:`tl_multimodal._io`) and resumes from it bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import datasets
import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities.activation_functions import apply_softcap

from tl_multimodal._io import atomic_save, check_finite, load_checkpoint
from tl_multimodal.training._distributed import rank_and_world_size
from tl_multimodal.models.prefix import HookedVisionPrefix

STATE_FILE = "training_state.pt"
_STATE_FORMAT = "tl_multimodal training state v1"
# settings a resumed run must share with the run it continues (``steps`` may grow)
_RESUME_KEYS = ("batch_size", "lr", "warmup", "weight_decay", "clip", "seed", "n_images", "grad_accum",
                "processes", "shuffle", "bos", "augment")
# what states written before these keys ran with (streams always shuffled; no BOS; no augmentation)
_RESUME_DEFAULTS = {"shuffle": True, "bos": False, "augment": None}


@dataclass
class TrainingResult:
    """Losses of a :func:`train_projection` run.

    Attributes:
        train_losses: Mean caption NLL per token of every step (from step 1, also when resumed).
        dev_losses: ``(step, dev NLL per token)`` at each evaluation.
        steps: Steps taken.
        checkpoints: Paths of the projections saved by this call.
        state: Path of the last training state written (what ``resume_from=`` takes), if any.
    """

    train_losses: list[float]
    dev_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    checkpoints: list[Path] = field(default_factory=list)
    state: Path | None = None

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


@contextlib.contextmanager
def _restoring(model: torch.nn.Module):
    """Put back every submodule's train/eval mode and every parameter's ``requires_grad`` on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def encode_images(model: HookedVisionPrefix, dataset: datasets.Dataset, image_column: str = "image",
                  batch_size: int = 32, progress: bool = True, cache: str | Path | None = None,
                  ) -> Float[Tensor, "n patch d_img"]:
    """Encoder features of every image of ``dataset`` (computed once, kept on the CPU).

    Args:
        model: The model whose encoder runs.
        dataset: Rows with an image column.
        image_column: Its name.
        batch_size: Images per encoder pass.
        progress: Show a progress bar.
        cache: A ``.npy`` file for the features instead of RAM: written once (atomically, with a
            ``.json`` record of encoder and row count beside it), then memory-mapped, so a run
            reads only the rows it draws and later runs on the same data skip the encoder. You
            pair the file with its dataset; a record for another encoder or row count is refused.

    Returns:
        ``[n, patch, d_img]`` float32 features (memory-mapped, copy-on-write, with ``cache``).
    """
    _check_positive(batch_size=batch_size)
    _check_columns(dataset, "dataset", image_column)
    if cache is not None:
        return _cached_features(model, dataset, image_column, batch_size, progress, Path(cache))
    return torch.cat(list(_encode(model, dataset, image_column, batch_size, progress)))


@torch.no_grad()
def _encode_batch(model, images) -> Float[Tensor, "batch patch d_img"]:
    """Encoder features of a few images (float32, on the model's device); the caller sets eval mode."""
    return model.vision(model.preprocess(images)).float()


def _encode(model, dataset, image_column, batch_size, progress):
    with _restoring(model):
        model.eval()
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoding images", disable=not progress):
            yield _encode_batch(model, dataset[start:start + batch_size][image_column]).cpu()


def _cached_features(model, dataset, image_column, batch_size, progress, path: Path) -> Tensor:
    """:func:`encode_images` through the on-disk cache ``path`` (rank 0 writes it, others wait)."""
    if path.suffix != ".npy":
        raise ValueError(f"cache must be a .npy file, got {str(path)!r}")
    record = {"encoder": model.vision.model_name, "n_images": len(dataset),
              "shape": [len(dataset), model.n_image_tokens, model.vision.d_img]}
    meta = path.with_suffix(".json")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(record["shape"]))
            start = 0
            for chunk in _encode(model, dataset, image_column, batch_size, progress):
                out[start:start + len(chunk)] = chunk.numpy()
                start += len(chunk)
            out.flush()
            del out
            meta.write_text(json.dumps(record))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    have = json.loads(meta.read_text()) if meta.exists() else None
    if have != record:
        raise ValueError(f"feature cache {path} was written for {have} (from {meta}), not for this data "
                         f"and encoder {record}; delete it or name another file")
    return torch.from_numpy(np.load(path, mmap_mode="c"))


# ---------------------------------------------------------------------------- checking inputs
def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _check_columns(dataset, what: str, *columns: str) -> None:
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"{what} must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} has no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(dataset.column_names)})")


def _problems(what: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    return f"{what}: {shown}"


def _tokenize(model: HookedVisionPrefix, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as ``model.to_tokens(text, prepend_bos=False, truncate=False)`` gives them."""
    drop = 1 if model.cfg.tokenizer_prepends_bos else 0
    out = []
    for s in range(0, len(texts), 4096):
        out += [ids[drop:] for ids in model.tokenizer(texts[s:s + 4096])["input_ids"]]
    return out


def _caption_ids(model: HookedVisionPrefix, rows: list, what: str, n_start: int,
                 first: int = 0) -> list[list[list[int]]]:
    """Every caption of every row, checked and tokenized (+ end-of-text): ``ids[row][option]``.

    Args:
        rows: Per row a string or a list of strings (options, one sampled per step).
        what: How errors name the rows' container, e.g. ``"dataset column 'captions'"``.
        n_start: Positions before the caption (image slots, or one start token).
        first: The number errors give the first row (rows of a stream are numbered as read).

    Raises:
        TypeError: A caption is not a string (rows named).
        ValueError: A row has no caption, an empty caption, or a caption that does not fit in
            ``n_ctx`` after the ``n_start`` positions (rows named).
    """
    bad_type = [f"row {i} holds {type(c).__name__} {c!r:.40}" for i, c in enumerate(rows, first)
                if not (isinstance(c, str) or isinstance(c, (list, tuple)) and all(isinstance(x, str) for x in c))]
    if bad_type:
        raise TypeError(_problems(f"{what} must hold a string or a list of strings per row", bad_type))
    options = [[c] if isinstance(c, str) else list(c) for c in rows]
    empty = [f"row {i} has no caption" if not opts else f"row {i} has an empty caption"
             for i, opts in enumerate(options, first) if not opts or any(not c.strip() for c in opts)]
    if empty:
        raise ValueError(_problems(what, empty))
    eos = model.tokenizer.eos_token or ""
    flat = _tokenize(model, [c.strip() + eos for opts in options for c in opts])
    room = model.cfg.n_ctx - n_start
    ids, long, k = [], [], 0
    for i, opts in enumerate(options):
        ids.append(flat[k:k + len(opts)])
        long += [f"row {first + i} caption {j} has {len(t)} tokens" for j, t in enumerate(ids[-1]) if len(t) > room]
        k += len(opts)
    if long:
        before = (f"{n_start} image slots" if n_start == model.n_image_tokens else "the start token" if n_start == 1
                  else f"the start token and {n_start - 1} image slots")
        raise ValueError(_problems(f"{what}: captions longer than n_ctx={model.cfg.n_ctx} allows after "
                                   f"{before} (at most {room} tokens with end-of-text)", long))
    return ids


def _batch(model: HookedVisionPrefix, ids: list[list[int]], with_image: bool = True,
           ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-padded token rows ``[image slots | caption ids | pad]`` (after the LM's start token if the
    projection's layout has one; the start token alone in the image's place without image) and the
    mask of their real positions."""
    start = [model.start_token_id] if model.image_bos or not with_image else []
    if with_image:
        start += [model.image_token_id] * model.n_image_tokens
    rows = [start + r for r in ids]
    width = max(map(len, rows))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return tokens.to(model.cfg.device), mask.to(model.cfg.device)


# ---------------------------------------------------------------------------- the loss
def caption_token_nll(model: HookedVisionPrefix, tokens: Int[Tensor, "batch pos"],
                      attention_mask: Int[Tensor, "batch pos"],
                      image_features: Float[Tensor, "batch patch d_img"] | None = None,
                      ) -> Float[Tensor, "n_target"]:
    """Negative log-likelihood of every caption token, unembedding only the positions that predict one.

    The same numbers as ``model(tokens, image_features=..., attention_mask=..., return_type="loss",
    loss_per_token=True)`` at its target positions (text tokens that are not padding), without the
    final norm, unembedding and log-softmax at image slots and padding.

    Args:
        model: The model.
        tokens: Right-padded rows, image slots first (or plain text when ``image_features`` is None).
        attention_mask: 1 at real positions, 0 at padding.
        image_features: Encoder features, one image per row; ``None`` for text-only rows.

    Returns:
        One NLL per target, in row-major order of the target positions.

    Raises:
        ValueError: ``tokens`` and ``attention_mask`` differ in shape, or no position has a target.
    """
    if tokens.ndim != 2 or tokens.shape != attention_mask.shape:
        raise ValueError(f"tokens and attention_mask must both be [batch, pos], got {tuple(tokens.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    targets = attention_mask[:, 1:].bool() & ~model.image_mask(tokens[:, 1:])
    if not targets.any():
        raise ValueError("no caption token to predict: every position is an image slot or padding")
    kwargs = {} if image_features is None else {"image_features": image_features}
    resid = model(tokens, attention_mask=attention_mask, stop_at_layer=model.cfg.n_layers, **kwargs)
    resid = resid[:, :-1][targets][None]  # [1, n_target, d_model]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)[0]
    return -logits.log_softmax(-1).gather(-1, tokens[:, 1:][targets][:, None])[:, 0]


def caption_nll(model: HookedVisionPrefix, captions: list[str],
                image_features: Float[Tensor, "batch patch d_img"] | None = None,
                batch_size: int = 16) -> float:
    """Mean negative log-likelihood per caption token (end-of-text included), in nats.

    Args:
        model: The model.
        captions: One caption per row.
        image_features: Encoder features per caption; ``None`` scores the captions as plain text
            after the LM's start token (no image).
        batch_size: Rows per forward pass.

    Raises:
        TypeError: ``captions`` is not a list of strings, ``image_features`` not a tensor.
        ValueError: No captions, an empty or too long caption, features that do not match.
    """
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
    if not captions:
        raise ValueError("captions is empty")
    _check_positive(batch_size=batch_size)
    if image_features is not None:
        if not isinstance(image_features, Tensor):
            raise TypeError(f"image_features must be a tensor, got {type(image_features).__name__}")
        if image_features.ndim != 3 or len(image_features) != len(captions):
            raise ValueError(f"image_features must be [{len(captions)} captions, patch, d_img], "
                             f"got {tuple(image_features.shape)}")
    bad = [f"row {i} holds {type(c).__name__}" for i, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        raise TypeError(_problems("captions must be strings", bad))
    n_start = 1 if image_features is None else model.n_image_tokens + model.image_bos
    ids = _caption_ids(model, list(captions), "captions", n_start)
    return _mean_nll(model, [r[0] for r in ids], image_features, batch_size)


def _mean_nll(model: HookedVisionPrefix, ids: list[list[int]], image_features: Tensor | None,
              batch_size: int) -> float:
    """:func:`caption_nll` of captions already checked and tokenized."""
    total, count = 0.0, 0
    with _restoring(model), torch.no_grad():
        model.eval()
        for s in range(0, len(ids), batch_size):
            tokens, mask = _batch(model, ids[s:s + batch_size], image_features is not None)
            feats = None if image_features is None else image_features[s:s + batch_size]
            nll = caption_token_nll(model, tokens, mask, feats)
            total += nll.sum().item()
            count += nll.numel()
    return total / count


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


def _load_state(path: str | Path, config: dict, steps: int) -> dict:
    """A training state written by :func:`train_projection`, checked against this run's settings."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"resume_from={str(path)!r} is not a training state written by train_projection "
                         f"(those are named {STATE_FILE})")
    have = {**_RESUME_DEFAULTS, **state["config"]}
    differ = [f"{k}: checkpoint has {have.get(k)!r}, this call {config[k]!r}"
              for k in _RESUME_KEYS if have.get(k) != config[k]]
    if differ:
        raise ValueError(f"resume_from={str(path)!r} was written by a run with other settings; " + "; ".join(differ))
    if state["step"] > steps:
        raise ValueError(f"resume_from={str(path)!r} is at step {state['step']}, past steps={steps}")
    check_finite(state["projection"], f"projection in {path}")
    return state


class _Stream:
    """The rows of an iterable dataset in order, epoch after epoch, from a saved ``(epoch, position)``.

    Nothing but the rows taken is held. On resume the first ``position`` rows of the epoch are read
    and dropped (a stream cannot seek). A ``datasets.IterableDataset`` gets ``set_epoch`` (from epoch 1
    on it reorders its shards and reseeds its shuffle buffer, reproducibly).
    """

    def __init__(self, data: Iterable[Mapping], epoch: int = 0, position: int = 0):
        self.data, self.epoch, self.position = data, epoch, position
        self._rows = self._open()

    def _open(self):
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.epoch)
        return itertools.islice(iter(self.data), self.position, None)

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
            self.position += 1
        return rows

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def _is_stream(dataset) -> bool:
    return (not isinstance(dataset, (datasets.Dataset, str, bytes, Mapping, Tensor))
            and isinstance(dataset, Iterable))


def train_projection(model: HookedVisionPrefix, dataset: datasets.Dataset | Iterable[Mapping], *,
                     steps: int = 15_000,
                     batch_size: int = 256, lr: float = 8e-4, warmup: int = 100, weight_decay: float = 0.0,
                     clip: float = 1.0, dev_dataset: datasets.Dataset | None = None, eval_every: int = 500,
                     checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
                     resume_from: str | Path | None = None, grad_accum: int = 1,
                     feature_cache: str | Path | None = None, image_column: str = "image",
                     caption_column: str = "captions",
                     device: str | torch.device | None = None, mixed_precision: bool | None = None,
                     seed: int = 0, shuffle: bool = True, progress: bool = True,
                     dataset_name: str = "", bos: bool | None = None,
                     augment: Callable[[Image.Image, random.Random], Image.Image] | None = None,
                     ) -> TrainingResult:
    """Train ``model.projection`` on image-caption pairs (LiMBeR's optimiser settings as defaults).

    Every row of a ``datasets.Dataset`` (and of ``dev_dataset``) is checked before anything runs;
    rows of a stream are checked as they are read (errors name the row's position in its epoch).
    Whatever happens (end, exception, Ctrl-C), the model's train/eval modes and ``requires_grad``
    flags are restored.

    Args:
        model: The model; only its projection is trained, everything else is frozen.
        dataset: Rows with an image column (PIL or path) and a caption column (a string or a list of
            strings, one sampled per step): a ``datasets.Dataset`` (features encoded once, batches
            drawn at random), or a stream, i.e. any other iterable of dict rows such as
            ``datasets.load_dataset(..., streaming=True)`` or ``webdataset.WebDataset(...).decode("pil")``
            (``image_column="jpg", caption_column="txt"``): read in order, ``batch_size`` rows per
            step, epoch after epoch, each step encoding its own images; nothing is materialised. A
            resumed stream skips the rows already consumed (their count is in the training state);
            shuffle a stream at its source (``IterableDataset.shuffle(buffer_size=...)``).
        steps, batch_size, lr, warmup, weight_decay, clip: AdamW with linear warmup then a constant
            rate, gradient-norm clipping (LiMBeR: 15k steps, batch 256, lr 8e-4, warmup 100, wd 0, clip 1).
        dev_dataset: Rows to evaluate the caption NLL on every ``eval_every`` steps (first caption).
        checkpoint_dir: Where to save ``projection_step{N}.pt`` every ``checkpoint_every`` steps and
            ``projection.pt`` at the end, each with ``training_state.pt`` beside it (projection,
            optimizer, scheduler, step, RNG states, sampling order), written atomically.
        resume_from: A ``training_state.pt`` (or the folder holding one) to continue from: the run
            goes on as if never interrupted (same settings required; ``steps`` may be larger).
        grad_accum: Micro-batches per step: each step's ``batch_size`` rows are split in this many
            passes whose gradients add up to the full batch's (less memory, same step).
        feature_cache: A ``.npy`` file for the encoder features (see :func:`encode_images`):
            memory-mapped instead of held in RAM, written once and reused by later runs (a
            ``datasets.Dataset`` only).
        device: Where to train; default CUDA when present, else the model's device.
        mixed_precision: bf16 autocast; default on when training on CUDA.
        seed: Seeds caption sampling, batch order and dropout.
        shuffle: Draw a ``datasets.Dataset``'s rows in a random order each epoch; ``False`` takes
            them in order, as a stream is read.
        dataset_name: Recorded in the checkpoint metadata.
        bos: The sequence layout to train: ``True`` puts the LM's start token before the image
            tokens, ``False`` not; recorded in ``model.projection.info.bos`` (so the trained
            projection is used with its layout). ``None`` keeps the projection's current layout.
        augment: ``augment(pil_image, rng) -> pil_image`` applied to each training image at each
            step (e.g. :func:`tl_multimodal.training.augment.random_resized_crop_flip`), which is then
            encoded anew (no feature cache); ``None`` encodes every image once. Its name is recorded.

    Launched on several processes (``accelerate launch --multi_gpu --num_processes N script.py`` on
    GPUs; ``torchrun --nproc_per_node N script.py`` on CPUs, gloo), every process
    draws the same global batches and runs its share of each (``batch_size / N``, then split by
    ``grad_accum``; every process reads a stream whole and encodes only its share); gradients are
    summed across processes before the shared optimizer step, so the projection follows the
    one-process run (up to float summation order, and dropout masks, which are drawn per process). Process 0 writes checkpoints; all resume from them.

    Returns:
        The losses; the trained projection is in ``model.projection`` (with its training record).

    Raises:
        TypeError, ValueError: Bad arguments or rows (each row named), before any work.
        FloatingPointError: The loss or gradient became NaN/infinite; the message names the last
            training state written (a good one, to resume from with a lower ``lr``).
    """
    _check_positive(steps=steps, batch_size=batch_size, eval_every=eval_every, grad_accum=grad_accum)
    rank, world = rank_and_world_size()
    if batch_size < world * grad_accum:
        raise ValueError(f"batch_size={batch_size} cannot be split over {world} processes x grad_accum={grad_accum}")
    if checkpoint_every is not None:
        _check_positive(checkpoint_every=checkpoint_every)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
    for name, value in {"lr": lr, "clip": clip}.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
    if bos is not None and not isinstance(bos, bool):
        raise TypeError(f"bos must be True, False or None, got {bos!r}")
    if augment is not None and not callable(augment):
        raise TypeError(f"augment must be a function (image, rng) -> image, got {type(augment).__name__}")
    if augment is not None and feature_cache is not None:
        raise ValueError("feature_cache holds one encoding per image; with augment every step encodes anew")
    layout = model.image_bos if bos is None else bos
    n_start = model.n_image_tokens + layout
    stream = _is_stream(dataset)
    if not stream and not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset or an iterable of dict rows (a stream), "
                        f"got {type(dataset).__name__}")
    if stream:
        if feature_cache is not None:
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
    config = {"batch_size": batch_size, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
              "clip": clip, "seed": seed, "n_images": None if stream else len(captions), "grad_accum": grad_accum,
              "processes": world, "shuffle": shuffle, "bos": layout,
              "augment": None if augment is None else getattr(augment, "__name__", repr(augment))}
    state = _load_state(resume_from, config, steps) if resume_from is not None else None
    model.projection.info.bos = layout  # every check passed: the projection learns this layout
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else model.W_E.device
    device = torch.device(device)
    mixed_precision = device.type == "cuda" if mixed_precision is None else mixed_precision
    if model.W_E.device != device:
        model.to(device)
    with _restoring(model):
        return _train(model, dataset, captions, dev_dataset, dev_captions, state, config, steps=steps,
                      eval_every=eval_every, ckpt_dir=ckpt_dir, checkpoint_every=checkpoint_every,
                      image_column=image_column, caption_column=caption_column, device=device,
                      mixed_precision=mixed_precision,
                      progress=progress and rank == 0, dataset_name=dataset_name, rank=rank, world=world,
                      feature_cache=feature_cache, augment=augment)


def _train(model, dataset, captions, dev_dataset, dev_captions, state, config, *, steps, eval_every,
           ckpt_dir, checkpoint_every, image_column, caption_column, device, mixed_precision, progress,
           dataset_name, rank, world, feature_cache, augment):
    """The loop of :func:`train_projection`, its inputs checked; the caller restores the model.

    ``captions`` is None for a stream (``dataset`` then is any iterable of rows). A stream, or
    ``augment``, encodes each step's images as it goes; else the features are encoded once."""
    model.requires_grad_(False)
    model.projection.requires_grad_(True)
    stream = captions is None
    features = None if stream or augment is not None else encode_images(model, dataset, image_column,
                                                                         progress=progress, cache=feature_cache)
    dev_features = None if dev_dataset is None else encode_images(model, dev_dataset, image_column, progress=progress)

    rng = random.Random(config["seed"])
    torch.manual_seed(config["seed"] + rank)  # dropout: each process its own masks
    params = list(model.projection.parameters())
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    warmup = config["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    result = TrainingResult(train_losses=[])
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
    rows = _Stream(dataset, **(state["stream"] if state is not None else {})) if stream else None

    def record() -> dict:  # the training record saved with the projection
        last = result.train_losses[-100:]
        return {"dataset": dataset_name, "n_images": config["n_images"], "steps": result.steps,
                **{k: config[k] for k in ("batch_size", "lr", "warmup", "weight_decay", "clip", "seed", "bos",
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
                "format": _STATE_FORMAT, "step": result.steps, "config": config,
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

    batch_size, grad_accum = config["batch_size"], config["grad_accum"]
    bar = tqdm(range(result.steps + 1, steps + 1), desc="training projection", disable=not progress,
               initial=result.steps, total=steps)
    model.train()
    model.vision.eval()  # frozen: images encoded per step (a stream, augment) stay in eval mode
    n_start = model.n_image_tokens + config["bos"]
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
                order += rng.sample(range(len(captions)), len(captions)) if config["shuffle"] else \
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
        norm = torch.nn.utils.clip_grad_norm_(params, config["clip"])
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
