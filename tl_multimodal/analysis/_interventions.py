"""The one intervention ablation and patching share: swap a hooked activation for another value at
chosen positions and units (as pyvene's interventions do), then read ``p(c)`` off a probe.

``swap_hook`` replaces ``act[b, pos, unit]`` by ``source[b, pos, unit]`` where a position mask and a
unit mask are both True. Zero ablation swaps in zeros, mean ablation the mean activations, and
activation patching the source run's cached activations.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.probe import Probe
from tl_multimodal.models.protocol import VisionLM

Positions = slice | Sequence[int] | int


def swap_hook(act: Tensor, hook, pos_mask: Bool[Tensor, "batch pos"], source: Tensor,
              unit_mask: Bool[Tensor, "batch unit"] | None = None) -> Tensor:
    """A forward hook: ``act`` with ``source`` swapped in where ``pos_mask`` (and ``unit_mask``) hold.

    Args:
        act: The hooked activation ``[batch, pos, d]``.
        hook: The HookPoint (unused).
        pos_mask: ``[batch, pos]`` the positions to swap.
        source: The values swapped in, broadcastable to ``act`` (zeros, means, a cached activation).
        unit_mask: ``[batch, d]`` the units to swap; ``None``: all.
    """
    where = pos_mask[:, :, None] if unit_mask is None else pos_mask[:, :, None] & unit_mask[:, None, :]
    return torch.where(where.to(act.device), source.to(act.device, act.dtype), act)


def warn_if_training(model, what: str) -> None:
    """Warn (``UserWarning``) when ``model`` runs a stochastic module in training mode (dropout with
    ``p > 0``, e.g. the projection's; batch norm on batch statistics): an analysis then measures a
    different random network on each pass, and its numbers vary from run to run. The analyses run
    the model in the mode it is in (as TransformerLens does); ``model.eval()`` first makes them exact."""
    live = sorted({f"{name or type(model).__name__} ({type(m).__name__})" for name, m in model.named_modules()
                   if m.training and (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
                                      or isinstance(m, torch.nn.modules.batchnorm._BatchNorm))})
    if live:
        more = f" and {len(live) - 3} more" if len(live) > 3 else ""
        warnings.warn(f"{what}: the model is in training mode, with {', '.join(live[:3])}{more} active, so "
                      "p(c) differs from run to run (and before/after differ by noise); call model.eval() first",
                      UserWarning, stacklevel=3)


def position_mask(model: VisionLM, probe: Probe, positions: Positions | None) -> Bool[Tensor, "batch pos"]:
    """The positions an intervention touches: the image slots of each row (``None``) or given ones.

    ``positions`` (an int, a list of ints or a slice) index every row; each must lie inside the
    probe's sequences (negative values count from the end of the padded width).
    """
    n_pos = probe.tokens.shape[1]
    if positions is None:
        return probe.image_mask.clone()
    if isinstance(positions, slice):
        idx = list(range(n_pos)[positions])
    else:
        idx = [positions] if isinstance(positions, int) else list(positions)
        if any(isinstance(p, bool) or not isinstance(p, int) for p in idx):
            raise TypeError(f"positions must be ints, a list of ints or a slice, got {positions!r}")
        bad = [p for p in idx if not -n_pos <= p < n_pos]
        if bad:
            raise ValueError(f"positions {bad} are out of range for sequences of {n_pos} positions "
                             f"(image slots at {probe.image_positions[0].tolist()[:3]}...)")
        idx = [p % n_pos for p in idx]
    if not idx:
        raise ValueError("positions selects no position")
    mask = torch.zeros_like(probe.image_mask)
    mask[:, idx] = True
    return mask


def unit_masks(units: Tensor, n_images: int, d_mlp: int) -> dict[int, Bool[Tensor, "batch unit"]]:
    """``{layer: [batch, d_mlp] mask}`` of validated units, shared ``[n, 2]`` or per image ``[batch, n, 2]``."""
    per_image = units if units.ndim == 3 else units[None].expand(n_images, -1, -1)
    if per_image.shape[0] != n_images:
        raise ValueError(f"per-image units for {per_image.shape[0]} images, but {n_images} images given")
    masks: dict[int, Tensor] = {}
    for layer in per_image[..., 0].unique().tolist():
        m = torch.zeros(n_images, d_mlp, dtype=torch.bool)
        b, j = (per_image[..., 0] == layer).nonzero(as_tuple=True)
        m[b, per_image[b, j, 1]] = True
        masks[layer] = m
    return masks


@torch.no_grad()
def probe_p(model: VisionLM, emb: Float[Tensor, "batch patch d_model"], probe: Probe,
            hooks: Callable[[slice], list] | None = None, batch_size: int = 16) -> Float[Tensor, "batch"]:
    """``p(c)`` per image on bound soft prompts, in chunks, with ``hooks(rows)`` added to each chunk's run."""
    check_int(batch_size, "batch_size")
    out = []
    for start in range(0, len(probe), batch_size):
        rows = slice(start, start + batch_size)
        tokens = probe.tokens[rows].to(model.cfg.device)
        fwd = hooks(rows) if hooks is not None else []
        logits = model.run_with_hooks(tokens, image_embed=emb[rows], fwd_hooks=fwd)
        out.append(probe[rows].p(logits).cpu())
    return torch.cat(out)
