"""MLP units as ``(layer, unit)`` index pairs: the one validator that every analysis module shares."""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

UnitsLike = Int[Tensor, "n 2"] | Int[Tensor, "batch n 2"] | Sequence[tuple[int, int]]


def as_units(model, units: UnitsLike, batched: bool = True, allow_empty: bool = True) -> Int[Tensor, "... n 2"]:
    """Validate ``(layer, unit)`` pairs into a long CPU tensor ``[n, 2]`` (or ``[batch, n, 2]``).

    Args:
        model: The HookedTransformer the units belong to (for ``n_layers`` and ``d_mlp``).
        units: A list of pairs, one pair, or an integer tensor ``[n, 2]`` / ``[batch, n, 2]``.
        batched: Whether a per-image ``[batch, n, 2]`` set is accepted.
        allow_empty: Whether no units at all is valid (ablating nothing is; decoding nothing is not).
    """
    if isinstance(units, Tensor):
        t = units.detach().cpu()
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"units must be an integer tensor of (layer, unit) rows, got {t.dtype}")
        t = t.long()
    else:
        units = list(units)
        rows = [tuple(units)] if units and isinstance(units[0], int) else [tuple(u) for u in units]
        if any(len(r) != 2 for r in rows):
            raise ValueError("units must be (layer, unit) pairs")
        t = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
    if t.ndim == 1 and t.numel() == 2:
        t = t[None]
    if t.ndim not in ((2, 3) if batched else (2,)) or t.shape[-1] != 2 or (t.shape[-2] == 0 and not allow_empty):
        want = "[n, 2] or [batch, n, 2]" if batched else "[n, 2]"
        empty = "" if allow_empty else "non-empty "
        raise ValueError(f"units must be a {empty}{want} of (layer, unit), got shape {tuple(t.shape)}")
    layer, unit = t[..., 0], t[..., 1]
    if ((layer < 0) | (layer >= model.cfg.n_layers)).any():
        raise ValueError(f"unit layers out of range: layers must be in [0, {model.cfg.n_layers}), "
                         f"got {layer.unique().tolist()}")
    if ((unit < 0) | (unit >= model.cfg.d_mlp)).any():
        raise ValueError(f"unit indices out of range: must be in [0, {model.cfg.d_mlp}) (d_mlp)")
    return t
