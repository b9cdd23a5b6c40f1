"""The LiMBeR projection: one shared linear map from image patch features to LM soft-prompt tokens.

A checkpoint stores the weights with the metadata that says which encoder and which LM they belong
to, so loading one into a mismatched model fails loudly instead of producing garbage captions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn


@dataclass
class ProjectionInfo:
    """What a projection was made for and how it was trained.

    Attributes:
        encoder: Encoder name (timm architecture).
        d_img: Width of the encoder's patch features.
        grid: ``(rows, cols)`` of the encoder's patch grid.
        lm: Name of the language model (``cfg.model_name``).
        d_model: Width of the LM's residual stream.
        training: Free-form record of data, steps, losses.
    """

    encoder: str
    d_img: int
    grid: tuple[int, int]
    lm: str
    d_model: int
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        self.grid = tuple(self.grid)


class ImageProjection(nn.Module):
    """``Linear(d_img, d_model)`` applied to every patch, then dropout (LiMBeR: 0.1, no LayerNorm).

    Args:
        info: The encoder/LM this projection connects.
        dropout: Dropout probability on the projected tokens (active only in train mode).
    """

    def __init__(self, info: ProjectionInfo, dropout: float = 0.1):
        super().__init__()
        self.info = info
        self.linear = nn.Linear(info.d_img, info.d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Float[Tensor, "batch patch d_img"]) -> Float[Tensor, "batch patch d_model"]:
        return self.dropout(self.linear(features))

    def save(self, path: str | Path) -> None:
        """Save weights and metadata to ``path`` (a ``torch.save`` file)."""
        info = asdict(self.info)
        info["grid"] = list(info["grid"])
        torch.save({"state_dict": self.state_dict(), "info": info, "dropout": self.dropout.p}, path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "ImageProjection":
        """Load a projection saved with :meth:`save`."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(ckpt, dict) or "info" not in ckpt:
            raise ValueError(f"{path} is not a tl_multimodal projection checkpoint (no 'info' record)")
        proj = cls(ProjectionInfo(**ckpt["info"]), dropout=ckpt.get("dropout", 0.1))
        proj.load_state_dict(ckpt["state_dict"])
        return proj

    def check_fits(self, encoder: str, d_img: int, grid: tuple[int, int], lm: str, d_model: int) -> None:
        """Raise a ValueError naming every field in which this projection does not fit the model."""
        want = dict(encoder=encoder, d_img=d_img, grid=tuple(grid), lm=lm, d_model=d_model)
        have = {k: getattr(self.info, k) for k in want}
        bad = [f"{k}: projection has {have[k]!r}, model has {want[k]!r}" for k in want if have[k] != want[k]]
        if bad:
            raise ValueError("projection checkpoint was made for another model; " + "; ".join(bad))
