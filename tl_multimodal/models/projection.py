"""Projections from image features to LM soft-prompt tokens, and their checkpoint files.

Three kinds, as in the models researchers study:

* ``"linear"`` (LiMBeR, per patch): ``Linear(d_img, d_model)`` on every patch; one token per patch.
* ``"pooled"`` (LiMBeR NF-ResNet50): the patch features averaged into one ``d_img`` vector (the
  encoder's global average pool), then ``Linear(d_img, n_tokens * d_model)`` reshaped
  ``b (s d) -> b s d`` into ``n_tokens`` tokens.
* ``"mlp"`` (LLaVA-1.5 ``mlp2x_gelu``): ``Linear(d_img, d_model)``, GELU, ``Linear(d_model, d_model)``
  per patch, with the key names of transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``).

Dropout follows (LiMBeR: 0.1 in training; LLaVA: none). A checkpoint stores the weights with the
metadata that says which kind, which encoder and which LM they belong to, so loading one into a
mismatched model fails loudly instead of producing garbage captions. LiMBeR's released
``proj.ckpt`` files (the bare state dict of one ``nn.Linear``) load with :meth:`ImageProjection.from_limber`.
:func:`projection_id` names a projection (in memory or in a file) by what it computes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_multimodal._validate import check_int, check_ints
from tl_multimodal._io import atomic_save, check_finite, load_checkpoint

KINDS = ("linear", "pooled", "mlp")


@dataclass
class ProjectionInfo:
    """What a projection was made for and how it was trained.

    Attributes:
        encoder: Encoder name (``VisionEncoder.model_name``).
        d_img: Width of the encoder's patch features.
        grid: ``(rows, cols)`` of the encoder's patch grid.
        lm: Name of the language model (``cfg.model_name``).
        d_model: Width of the LM's residual stream.
        training: Free-form record of data, steps, losses.
        kind: ``"linear"``, ``"pooled"`` or ``"mlp"`` (see the module docstring).
        n_tokens: Soft-prompt tokens per image: ``rows * cols`` for ``"linear"``/``"mlp"`` (filled in
            when ``None``), chosen for ``"pooled"``.
        bos: The sequence layout the projection was trained with: ``True`` puts the LM's BOS token
            before the image tokens (``[BOS][image][text]``), ``False`` lets the image tokens open the
            sequence (LiMBeR's layout, and that of checkpoints written before this field existed).
    """

    encoder: str
    d_img: int
    grid: tuple[int, int]
    lm: str
    d_model: int
    training: dict = field(default_factory=dict)
    kind: str = "linear"
    n_tokens: int | None = None
    bos: bool = False

    def __post_init__(self):
        self.grid = tuple(self.grid)
        if not isinstance(self.bos, bool):
            raise TypeError(f"bos must be True or False, got {self.bos!r}")
        if self.kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, got {self.kind!r}")
        check_ints(d_img=self.d_img, d_model=self.d_model)
        if len(self.grid) != 2:
            raise ValueError(f"grid must be (rows, cols) of positive ints, got {self.grid!r}")
        check_ints(grid_rows=self.grid[0], grid_cols=self.grid[1])
        n_patches = self.grid[0] * self.grid[1]
        if self.kind == "pooled":
            if self.n_tokens is None:
                raise ValueError("a 'pooled' projection needs n_tokens (a positive int), got None")
            check_int(self.n_tokens, "n_tokens")
        elif self.n_tokens is None:
            self.n_tokens = n_patches
        elif self.n_tokens != n_patches:
            raise ValueError(f"a {self.kind!r} projection makes one token per patch: n_tokens must be "
                             f"{n_patches} (grid {self.grid}), got {self.n_tokens}")

    @classmethod
    def from_dict(cls, d: dict, what: str = "projection info") -> "ProjectionInfo":
        """Rebuild from ``asdict(info)``, naming unknown or missing fields."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{what} has unknown fields {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{what} is incomplete: {e}") from None


class ImageProjection(nn.Module):
    """Image features ``[batch, patch, d_img]`` -> soft-prompt tokens ``[batch, n_tokens, d_model]``.

    Args:
        info: The kind and the encoder/LM this projection connects.
        dropout: Dropout probability on the projected tokens (active only in train mode).

    Attributes:
        linear: The ``nn.Linear`` of a ``"linear"`` or ``"pooled"`` projection.
        linear_1, act, linear_2: The layers of an ``"mlp"`` projection.
    """

    def __init__(self, info: ProjectionInfo, dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.info = info
        if info.kind == "mlp":
            self.linear_1 = nn.Linear(info.d_img, info.d_model)
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(info.d_model, info.d_model)
        else:
            self.linear = nn.Linear(info.d_img, info.n_tokens * info.d_model if info.kind == "pooled" else info.d_model)
        self.dropout = nn.Dropout(dropout)

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def n_tokens(self) -> int:
        """Soft-prompt tokens per image."""
        return self.info.n_tokens

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, features: Float[Tensor, "batch patch d_img"]) -> Float[Tensor, "batch n_tokens d_model"]:
        if self.info.kind == "mlp":
            return self.dropout(self.linear_2(self.act(self.linear_1(features))))
        if self.info.kind == "pooled":
            flat = self.linear(features.mean(1))  # [batch, n_tokens * d_model]
            return self.dropout(flat.reshape(len(flat), self.info.n_tokens, self.info.d_model))
        return self.dropout(self.linear(features))

    # ------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Save weights and metadata (kind, shapes, encoder, LM) to ``path``, atomically."""
        info = asdict(self.info)
        info["grid"] = list(info["grid"])
        return atomic_save({"state_dict": self.state_dict(), "info": info, "dropout": self.dropout.p}, path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "ImageProjection":
        """Load a projection saved with :meth:`save`.

        Raises:
            ValueError: Not a projection checkpoint (a LiMBeR ``proj.ckpt`` is named as such), weights
                that do not have the shapes the recorded kind and widths give, or non-finite weights.
        """
        ckpt = load_checkpoint(path, map_location)
        if isinstance(ckpt, dict) and set(ckpt) == {"weight", "bias"}:
            raise ValueError(f"{path} is a bare nn.Linear state dict (LiMBeR's proj.ckpt format), which does "
                             "not record its encoder and LM; load it with ImageProjection.from_limber(path, info)")
        if not isinstance(ckpt, dict) or "info" not in ckpt or "state_dict" not in ckpt:
            raise ValueError(f"{path} is not a tl_multimodal projection checkpoint (no 'info' record)")
        proj = cls(ProjectionInfo.from_dict(ckpt["info"], f"projection {path}"), dropout=ckpt.get("dropout", 0.1))
        proj.load_weights(ckpt["state_dict"], f"projection {path}")
        return proj

    @classmethod
    def from_limber(cls, path: str | Path, info: ProjectionInfo, dropout: float = 0.1,
                    map_location: str | torch.device = "cpu") -> "ImageProjection":
        """Load LiMBeR's ``limber_weights/<config>/proj.ckpt``: the state dict of one ``nn.Linear``.

        The file records no encoder or LM, so ``info`` says which they are (``kind="linear"`` for the
        per-patch BEiT/CLIP configs, ``kind="pooled"`` with ``n_tokens`` for ``nfrn50_*``); the weight
        must have the shape they give.

        Raises:
            ValueError: Other keys than ``weight``/``bias``, a shape that does not fit ``info``
                (e.g. a checkpoint for another LM width), or non-finite weights.
        """
        if info.kind not in ("linear", "pooled"):
            raise ValueError(f"LiMBeR projections are 'linear' or 'pooled', got kind {info.kind!r}")
        state = load_checkpoint(path, map_location)
        if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is not a LiMBeR proj.ckpt (the state dict of one nn.Linear with keys "
                             f"['bias', 'weight']); found {keys}")
        proj = cls(info, dropout=dropout)
        proj.load_weights({f"linear.{k}": v for k, v in state.items()}, f"LiMBeR checkpoint {path}")
        return proj

    def load_weights(self, state: dict, what: str = "state dict") -> None:
        """``load_state_dict`` after checking keys, shapes (named with the kind and widths) and finiteness.

        Raises:
            ValueError: Other keys, another shape or non-finite values, each named with ``what``.
        """
        want = self.state_dict()
        if set(state) != set(want):
            raise ValueError(f"{what} holds {sorted(state)} but a {self.kind!r} projection has {sorted(want)}")
        bad = [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(want[k].shape)}"
               for k in want if tuple(state[k].shape) != tuple(want[k].shape)]
        if bad:
            i = self.info
            raise ValueError(f"{what} does not fit a {i.kind!r} projection from d_img={i.d_img} ({i.encoder}) "
                             f"to {i.n_tokens} tokens of d_model={i.d_model} ({i.lm}): " + "; ".join(bad))
        check_finite(state, what)
        self.load_state_dict(state)

    def check_fits(self, encoder: str, d_img: int, grid: tuple[int, int], lm: str, d_model: int) -> None:
        """Raise a ValueError naming every field in which this projection does not fit the model."""
        want = dict(encoder=encoder, d_img=d_img, grid=tuple(grid), lm=lm, d_model=d_model)
        have = {k: getattr(self.info, k) for k in want}
        bad = [f"{k}: projection has {have[k]!r}, model has {want[k]!r}" for k in want if have[k] != want[k]]
        if bad:
            raise ValueError("projection checkpoint was made for another model; " + "; ".join(bad))


def projection_id(projection: ImageProjection | str | Path) -> str:
    """The identity of a projection: 16 hex digits of a SHA-256 of what it computes.

    The hash covers, in this order, the JSON of :class:`ProjectionInfo` without its ``training``
    record (keys sorted: kind, encoder, d_img, grid, lm, d_model, n_tokens, bos), then for each
    state-dict entry in sorted key order its name, its shape and its values as little-endian float32
    bytes. So a projection in memory and the file it was saved to (or loaded from) have the same id,
    whatever device or float dtype holds it; changing any weight, or the layout (``bos``), changes
    it; the training record, dropout and the file's bytes (pickle layout) do not enter. The runner's
    ``_run.json``, the training record and the scripts all name projections with it.

    Args:
        projection: An :class:`ImageProjection`, or the path of a checkpoint saved by
            :meth:`ImageProjection.save` (loaded on the CPU).

    Returns:
        The first 16 hex digits of the SHA-256.
    """
    if not isinstance(projection, ImageProjection):
        projection = ImageProjection.load(projection)
    info = {k: v for k, v in asdict(projection.info).items() if k != "training"}
    info["grid"] = list(info["grid"])
    return content_id(info, projection.state_dict())


def content_id(header: dict, state: dict[str, Tensor]) -> str:
    """The identity of some weights: what :func:`projection_id` and :func:`~tl_multimodal.sae.model.sae_id` hash.

    Args:
        header: A JSON-able description (hashed as JSON, keys sorted).
        state: Named tensors (a state dict), hashed in sorted name order: each name, shape and its values as
            little-endian float32 bytes.

    Returns:
        The first 16 hex digits of the SHA-256.
    """
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(state.items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]
