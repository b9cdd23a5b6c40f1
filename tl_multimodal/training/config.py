"""The settings of a training run and of a dataset-attribution run, as dataclasses saved with what they make.

:class:`TrainingConfig` holds every setting of :func:`~tl_multimodal.training.train.train_projection`
except the model and the data; the projection it trains records ``config.to_dict()`` in
``info.training["config"]``. :class:`RunConfig` holds the settings of one
:func:`~tl_multimodal.training.runner.run_attribution`, recorded in the run's ``_run.json``.
Each checks its fields once, when made (also by ``dataclasses.replace`` and ``from_dict``)::

    config = TrainingConfig(steps=200, batch_size=8, lr=3e-3)
    train_projection(model, data, config, seed=1)          # keyword overrides by field name
    TrainingConfig.from_dict(ImageProjection.load("p.pt").info.training["config"]) == config.replace(seed=1)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tl_multimodal._config import Config
from tl_multimodal._validate import check_int, check_ints
from tl_multimodal.training.augment import AUGMENTATIONS


def _set(config, name: str, value) -> None:
    object.__setattr__(config, name, value)  # normalising a field of a frozen dataclass in __post_init__


def _path(value) -> str | None:
    return None if value is None else str(value) if isinstance(value, (str, Path)) else value


def _positive_number(value, name: str, minimum_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if minimum_ok else value > 0)):
        raise ValueError(f"{name} must be {'a number >= 0' if minimum_ok else 'a positive number'}, got {value!r}")


@dataclass(frozen=True, repr=False)
class TrainingConfig(Config):
    """Every setting of :func:`~tl_multimodal.training.train.train_projection` but the model and the data.

    The defaults are LiMBeR's optimiser settings. Paths are kept as strings and a device as its
    name, so :meth:`to_dict` is JSON and :meth:`from_dict` gives an equal config back.

    Attributes:
        steps, batch_size, lr, warmup, weight_decay, clip: AdamW with linear warmup then a constant
            rate, gradient-norm clipping (LiMBeR: 15k steps, batch 256, lr 8e-4, warmup 100, wd 0, clip 1).
        eval_every: Steps between evaluations on the dev data (and at the last step).
        checkpoint_dir: Where to save ``projection_step{N}.pt`` every ``checkpoint_every`` steps and
            ``projection.pt`` at the end, each with ``training_state.pt`` beside it.
        checkpoint_every: Steps between checkpoints (needs ``checkpoint_dir``); ``None``: only the last.
        resume_from: A ``training_state.pt`` (or the folder holding one) to continue from.
        grad_accum: Micro-batches per step (their gradients add up to the full batch's).
        feature_cache: A ``.npy`` file for the encoder features (a ``datasets.Dataset`` only).
        image_column, caption_column: The data's columns.
        device: Where to train; ``None``: CUDA when present, else the model's device.
        mixed_precision: bf16 autocast; ``None``: on when training on CUDA.
        seed: Seeds caption sampling, batch order and dropout.
        shuffle: Draw a ``datasets.Dataset``'s rows in a random order each epoch (``False``: in order).
        progress: Show a progress bar.
        dataset_name: Recorded in the projection's training record.
        bos: The sequence layout to train (``True``: the LM's start token before the image tokens);
            ``None`` keeps the projection's layout.
        augment: A function ``(pil_image, rng) -> pil_image`` applied to each training image at each
            step, or the name of one in :data:`~tl_multimodal.training.augment.AUGMENTATIONS`
            (a function registered there is kept by its name); ``None``: no augmentation. Another
            function is recorded by its ``__name__``, which :meth:`from_dict` refuses (pass the function).

    Raises:
        TypeError, ValueError: A setting of the wrong type or out of range (named), ``checkpoint_every``
            without ``checkpoint_dir``, or ``augment`` with ``feature_cache``.
    """

    steps: int = 15_000
    batch_size: int = 256
    lr: float = 8e-4
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 500
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume_from: str | None = None
    grad_accum: int = 1
    feature_cache: str | None = None
    image_column: str = "image"
    caption_column: str = "captions"
    device: str | None = None
    mixed_precision: bool | None = None
    seed: int = 0
    shuffle: bool = True
    progress: bool = True
    dataset_name: str = ""
    bos: bool | None = None
    augment: str | Callable[[Any, Any], Any] | None = None

    def __post_init__(self):
        check_ints(steps=self.steps, batch_size=self.batch_size, eval_every=self.eval_every, grad_accum=self.grad_accum)
        check_int(self.warmup, "warmup", 0)
        check_int(self.seed, "seed", None)
        for name in ("checkpoint_dir", "resume_from", "feature_cache"):
            _set(self, name, _path(getattr(self, name)))
        if self.device is not None:
            _set(self, "device", str(self.device))
        if self.checkpoint_every is not None:
            check_int(self.checkpoint_every, "checkpoint_every")
            if self.checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir")
        _positive_number(self.lr, "lr")
        _positive_number(self.clip, "clip")
        _positive_number(self.weight_decay, "weight_decay", minimum_ok=True)
        for name in ("shuffle", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("bos", "mixed_precision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        for name in ("image_column", "caption_column", "dataset_name"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if isinstance(self.augment, str):
            if self.augment not in AUGMENTATIONS:
                raise ValueError(f"augment {self.augment!r} is not one of {sorted(AUGMENTATIONS)}; "
                                 "pass the function itself")
        elif self.augment is not None:
            if not callable(self.augment):
                raise TypeError(f"augment must be a function (image, rng) -> image, got {type(self.augment).__name__}")
            registered = [name for name, fn in AUGMENTATIONS.items() if fn is self.augment]
            if registered:
                _set(self, "augment", registered[0])
        if self.augment is not None and self.feature_cache is not None:
            raise ValueError("feature_cache holds one encoding per image; with augment every step encodes anew")


    @property
    def augment_fn(self) -> Callable | None:
        """``augment`` as a function (a registered name looked up)."""
        return AUGMENTATIONS[self.augment] if isinstance(self.augment, str) else self.augment

    @property
    def augment_name(self) -> str | None:
        """``augment`` as a name (a function by its ``__name__``), as the training record keeps it."""
        fn = self.augment
        return fn if fn is None or isinstance(fn, str) else getattr(fn, "__name__", repr(fn))


@dataclass(frozen=True, repr=False)
class RunConfig(Config):
    """The settings of one :func:`~tl_multimodal.training.runner.run_attribution` run (and its command line).

    ``_run.json`` records them with the model's LM, encoder, layout and :func:`projection_id
    <tl_multimodal.models.projection.projection_id>`; a run into the same folder with other values
    is refused (``data_source``, ``split`` and ``limit`` under its ``data`` key), but for :attr:`FREE`
    fields: ``batch_size`` (it does not change the rows) and a larger ``limit`` (it extends the run; a
    smaller one is refused: the finished shards past it would stay).

    Attributes:
        k: Units kept per image.
        shard_size: Images per shard (and per unit of resumption).
        batch_size: Images per forward/backward pass.
        limit: Use only the first ``limit`` images (``None``: all).
        prompt, max_new_tokens, hook: Passed to :func:`~tl_multimodal.analysis.attribution.attribute`.
        image_column: The column holding images; ``None``: the first of ``image``, ``jpg``, ``jpeg``,
            ``png``, ``webp``.
        id_column: The column holding image ids; ``None``: ``image_id``, ``__key__`` or ``id`` if
            present, else the image's index.
        data_source, split: Where the rows came from (a folder, shards or a hub name; ``None`` when
            the caller passes rows), as the command line's ``DATA`` and ``--split``.
        model_spec, projection_file: The model spec (``"offline"``, ``"module:function"``) and the
            projection checkpoint it was loaded with, as the command line's ``--model`` and
            ``--projection`` (``None`` when not known or not given; the projection itself is
            recorded by its id either way).
        sae: An SAE (:func:`~tl_multimodal.sae.load.load_sae`'s ``path``; loaded in the model's dtype): attribute
            its latents instead of the MLP units (the rows' ``layer`` is then 0 and ``unit`` the latent; ``hook``
            is not used).

    Raises:
        TypeError, ValueError: A setting of the wrong type or out of range (named).
    """

    k: int = 100
    shard_size: int = 64
    batch_size: int = 8
    limit: int | None = None
    prompt: str = "A picture of"
    max_new_tokens: int = 20
    hook: str = "pre"
    image_column: str | None = None
    id_column: str | None = None
    data_source: str | None = None
    split: str | None = None
    model_spec: str | None = None
    projection_file: str | None = None
    sae: str | None = None

    #: Fields a rerun into the same folder may change: they do not change the rows already written.
    FREE = ("batch_size", "limit")

    def __post_init__(self):
        check_ints(k=self.k, shard_size=self.shard_size, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
        if self.limit is not None:
            check_int(self.limit, "limit", 0)
        for name in ("data_source", "projection_file", "sae"):
            _set(self, name, _path(getattr(self, name)))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type.startswith("str") and not (value is None and "None" in f.type or isinstance(value, str)):
                raise TypeError(f"{f.name} must be a string{' or None' if 'None' in f.type else ''}, "
                                f"got {type(value).__name__}")
