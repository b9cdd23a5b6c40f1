"""Ablation of MLP units at the image slots: p(c) before and after, and the top-k vs random curve.

The measured quantity is ``p(c)`` of a :class:`~tl_multimodal.analysis.probe.Probe` (``attr.probe``, or one
made from ``target=``/``prompt=``): the probability of the target token at the position that
predicts it. Units are ``(layer, unit)`` rows: ``[n, 2]`` shared by all images, ``[batch, n, 2]``
one set per image, or a list of pairs (:func:`~tl_multimodal.analysis.units.as_units`).

Which activation is a unit's? By default ``mlp.hook_post`` (``hook="post"``): the value that
multiplies the unit's output row ``W_out[l][k]``. Zeroing it removes exactly the unit's
contribution to the MLP output, for GELU MLPs and gated ones (SwiGLU) alike. Attribution scores the
*pre*-activation ``hook_pre``; zeroing that is the same intervention for GELU-type MLPs
(``gelu(0) = 0``), for a gated MLP it zeroes only the gate (``silu(0) = 0``, so also no output), and
a *mean* ablation of ``hook_pre`` differs from one of ``hook_post`` in both cases.

    attr = attribute(model, images)
    ablate_units(model, images, attr.top_units(10).units_per_image(), probe=attr.probe)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis._interventions import (Positions, position_mask, probe_p, swap_hook, unit_masks,
                                                  warn_if_training)
from tl_multimodal.analysis.probe import Probe, resolve_probe
from tl_multimodal.analysis.units import UnitsLike, as_units, cache_units, check_distinct, mlp_hook, unit_axis
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.model import SAE
from tl_multimodal.sae.splice import latent_edit_hook, saes_by_hook


@torch.no_grad()
def mean_unit_activations(model: VisionLM, images=None, hook: str = "post", per_position: bool = True,
                          batch_size: int = 16, *, image_features: Tensor | None = None,
                          image_embed: Tensor | None = None, sae: SAE | Sequence[SAE] | None = None,
                          ) -> Float[Tensor, "layer patch unit"] | Float[Tensor, "layer unit"]:
    """Mean activation of every MLP unit at the image slots over ``images`` (for mean ablation).

    The model runs on ``[image slots]`` alone (``to_tokens("", image=True)``): with causal attention
    text after the image cannot change the image slots' activations.

    Args:
        model: The vision LM.
        images, image_features, image_embed: A reference image set (e.g. held-out COCO images): exactly one.
        hook: The MLP hook whose activations are averaged (:func:`~tl_multimodal.analysis.units.mlp_hook`).
        per_position: Keep one mean per image slot (``[layer, patch, unit]``); otherwise average
            over slots too (``[layer, unit]``).
        batch_size: Images per forward pass.
        sae: An SAE or a list of them: the means of their latents instead (``[n_saes, ...]``; ``hook`` unused).
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    short = "sae" if saes is not None else mlp_hook(model, hook)
    warn_if_training(model, "mean_unit_activations")
    emb = soft_prompts(model, images, image_features, image_embed)
    tokens = model.to_tokens("", image=True)
    mask = model.image_mask(tokens)[0]
    names, width = unit_axis(model, short, saes)
    total = torch.zeros(len(names), model.n_image_tokens, width)
    for chunk in emb.split(batch_size):
        _, cache = cache_units(model, tokens.expand(len(chunk), -1), chunk, names, saes)
        total += torch.stack([cache[n][:, mask].float().sum(0).cpu() for n in names])
    mean = total / len(emb)
    return mean if per_position else mean.mean(1)


@dataclass(repr=False)
class AblationResult:
    """p(c) per image before and after ablating a set of units at the image positions.

    Attributes:
        p_before: ``[batch]`` p(c) of the unablated model.
        p_after: ``[batch]`` p(c) with the units ablated.
        target: ``[batch]`` target token ids.
        n_units: Units ablated per image.
        mode: ``"zero"`` or ``"mean"``.
    """

    p_before: Float[Tensor, "batch"]
    p_after: Float[Tensor, "batch"]
    target: Int[Tensor, "batch"]
    n_units: int
    mode: str

    @property
    def rel_change(self) -> Float[Tensor, "batch"]:
        """``(p_after - p_before) / p_before`` per image (-0.8 = p(c) fell by 80%)."""
        return (self.p_after - self.p_before) / self.p_before

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"image": range(len(self.p_before)), "target": self.target.tolist(),
                             "p_before": self.p_before.tolist(), "p_after": self.p_after.tolist(),
                             "rel_change": self.rel_change.tolist()})

    def __repr__(self) -> str:
        return (f"AblationResult({len(self.p_before)} images, {self.n_units} units {self.mode}-ablated: "
                f"mean p(c) {self.p_before.mean():.3g} -> {self.p_after.mean():.3g}, "
                f"mean rel. change {self.rel_change.mean():+.1%})")


def _check_mean_acts(sizes: tuple[int, int], mode: str, mean_acts: Tensor | None, n_pos: int) -> Tensor | None:
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "zero":
        if mean_acts is not None:
            raise ValueError("mean_acts is only used with mode='mean'")
        return None
    if mean_acts is None:
        raise ValueError("mode='mean' needs mean_acts (see mean_unit_activations)")
    L, d = sizes
    if tuple(mean_acts.shape) not in ((L, d), (L, n_pos, d)):
        raise ValueError(f"mean_acts must be [n_layers={L}, d_mlp={d}] or [n_layers, n_positions={n_pos}, "
                         f"d_mlp] (for SAE latents [n_saes, d_sae]), got {tuple(mean_acts.shape)}")
    return mean_acts


class Ablator:
    """p(c) of one probe with unit sets ablated: the images embedded once, the positions fixed."""

    def __init__(self, model: VisionLM, emb: Tensor, probe: Probe, short: str, positions: Positions | None,
                 mode: str, mean_acts: Tensor | None, batch_size: int, saes: dict | None = None):
        self.model, self.emb, self.probe, self.short, self.batch_size = model, emb, probe, short, batch_size
        self.saes = saes  # {hook name: SAE}: the units are their latents, (SAE index, latent)
        self.names, self.width = unit_axis(model, short, saes)
        self.pos_mask = position_mask(model, probe, positions)
        n_pos = int(self.pos_mask[0].sum())
        if (self.pos_mask.sum(1) != n_pos).any():
            raise ValueError("the positions must be as many in every row")
        self.means = _check_mean_acts((len(self.names), self.width), mode, mean_acts, n_pos)

    def _hook(self, layer: int, swap) -> tuple:
        """The hook that applies ``swap`` to a layer's MLP units, or to an SAE's latents (error term kept)."""
        name = self.names[layer]
        return name, swap if self.saes is None else latent_edit_hook(self.saes[name], swap)

    def _source(self, layer: int) -> Tensor:
        if self.means is None:
            return torch.zeros(())
        if self.means.ndim == 2:
            return self.means[layer]
        src = torch.zeros(*self.pos_mask.shape, self.width, dtype=self.means.dtype)
        src[self.pos_mask] = self.means[layer].repeat(len(self.probe), 1)
        return src

    def p(self, units: Tensor | None) -> Float[Tensor, "batch"]:
        """p(c) per image with ``units`` (validated) ablated; ``None``: no intervention."""
        if units is None:
            return probe_p(self.model, self.emb, self.probe, batch_size=self.batch_size)
        masks = unit_masks(units, len(self.probe), self.width)
        sources = {layer: self._source(layer) for layer in masks}

        def hooks(rows: slice) -> list:
            return [self._hook(layer, partial(swap_hook, pos_mask=self.pos_mask[rows], unit_mask=m[rows],
                                              source=sources[layer][rows] if sources[layer].ndim == 3
                                              else sources[layer]))
                    for layer, m in masks.items()]

        return probe_p(self.model, self.emb, self.probe, hooks, self.batch_size)


def ablate_units(model: VisionLM, images, units: UnitsLike, target=None, prompt: str | Sequence[str] | None = None,
                 *, probe: Probe | None = None, mode: Literal["zero", "mean"] = "zero",
                 mean_acts: Tensor | None = None, hook: str = "post", positions: Positions | None = None,
                 batch_size: int = 16, image_features: Tensor | None = None,
                 image_embed: Tensor | None = None, sae: SAE | Sequence[SAE] | None = None) -> AblationResult:
    """Ablate MLP units at the image slots and measure p(c) before and after.

    Args:
        model: The vision LM.
        images: Anything ``model.preprocess`` takes (or pass ``image_features=``/``image_embed=``).
        units: ``(layer, unit)`` rows, shared ``[n, 2]`` or per image ``[batch, n, 2]``.
        target: The token ``c`` (string or id), one per image or one for all; or pass ``probe``.
        prompt: The text before ``c`` (one for all images, or one per image); default "A picture of".
        probe: The query, e.g. ``attr.probe`` (instead of ``target``/``prompt``).
        mode: ``"zero"`` sets the activations to 0; ``"mean"`` to ``mean_acts``.
        mean_acts: ``[n_layers, d_mlp]`` or ``[n_layers, n_positions, d_mlp]`` replacement values
            for mode ``"mean"`` (:func:`mean_unit_activations`).
        hook: The MLP hook that holds the unit's activation (see the module docstring).
        positions: Positions to ablate at (ints or a slice, the same in every row); default each
            row's image slots.
        batch_size: Images per forward pass.
        sae: An SAE or a list of them (as in :func:`~tl_multimodal.analysis.attribution.attribute`): the units
            are ``(SAE index, latent)``; each SAE is spliced in with its error term, so only the chosen latents
            change (the residual moves by their decoder rows times the change). ``hook`` is then not used.

    The model runs in the mode it is in: in training mode (the projection's dropout on) p(c) varies
    from run to run, and a ``UserWarning`` says so; call ``model.eval()`` first.

    Raises:
        ValueError: A unit named twice (the set would be smaller than ``n_units`` says), a probe made
            for the other sequence layout, or another bad argument (named).
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    short = "sae" if saes is not None else mlp_hook(model, hook)
    warn_if_training(model, "ablate_units")
    emb = soft_prompts(model, images, image_features, image_embed)
    probe = resolve_probe(model, len(emb), probe, target, prompt)
    u = check_distinct(as_units(model, units, saes=saes), "units")
    run = Ablator(model, emb, probe, short, positions, mode, mean_acts, batch_size, saes)
    return AblationResult(p_before=run.p(None), p_after=run.p(u), target=probe.target_ids.clone(),
                          n_units=u.shape[-2], mode=mode)


def sample_matched_units(units: UnitsLike, d_mlp: int, generator: torch.Generator | None = None,
                         ) -> Int[Tensor, "... n 2"]:
    """Random units from the same layers as ``units``, as many per layer (per image if 3-D).

    Within a layer the units are drawn uniformly without replacement from all ``d_mlp`` units
    (they may include units of ``units`` itself). Rows come out sorted by layer.
    """
    t = units if isinstance(units, Tensor) else torch.tensor([tuple(u) for u in units], dtype=torch.long)
    t = t.detach().cpu().long()
    if t.numel() == 0:
        t = t.reshape(*t.shape[:-2], 0, 2) if t.ndim >= 2 else t.reshape(0, 2)
    if t.ndim == 3:
        return torch.stack([sample_matched_units(row, d_mlp, generator) for row in t])
    if t.ndim != 2:
        raise ValueError(f"units must be [n, 2] or [batch, n, 2], got {tuple(t.shape)}")
    layers, counts = t[:, 0].unique(return_counts=True)
    if (counts > d_mlp).any():
        raise ValueError(f"more units in a layer than d_mlp={d_mlp}")
    rows = [torch.stack([torch.full((c,), layer), torch.randperm(d_mlp, generator=generator)[:c]], 1)
            for layer, c in zip(layers.tolist(), counts.tolist())]
    return torch.cat(rows) if rows else t.clone()


@dataclass(repr=False)
class AblationCurve:
    """p(c) after ablating the top-k units vs k random units from the same layers.

    Attributes:
        ks: The k values.
        p_before: ``[batch]`` p(c) unablated.
        p_top: ``[k, batch]`` p(c) with the top-k units ablated.
        p_random: ``[k, seed, batch]`` p(c) with layer-matched random units ablated.
        mode: ``"zero"`` or ``"mean"``.
    """

    ks: list[int]
    p_before: Float[Tensor, "batch"]
    p_top: Float[Tensor, "k batch"]
    p_random: Float[Tensor, "k seed batch"]
    mode: str

    def rel_change(self, kind: Literal["top", "random"] = "top") -> Tensor:
        """Relative change of p(c): ``[k, batch]`` (top) or ``[k, seed, batch]`` (random)."""
        p = self.p_top if kind == "top" else self.p_random
        return (p - self.p_before) / self.p_before

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (k, kind, seed, image); ``seed`` is -1 for the top-k rows."""
        rows = []
        for i, k in enumerate(self.ks):
            for b, p0 in enumerate(self.p_before.tolist()):
                p = self.p_top[i, b].item()
                rows.append((k, "top", -1, b, p0, p, (p - p0) / p0))
                for s in range(self.p_random.shape[1]):
                    p = self.p_random[i, s, b].item()
                    rows.append((k, "random", s, b, p0, p, (p - p0) / p0))
        return pd.DataFrame(rows, columns=["k", "kind", "seed", "image", "p_before", "p_after", "rel_change"])

    def plot(self, ax=None):
        """Mean relative change of p(c) vs k (log x), top-k against random (mean +- sd over seeds); the Figure."""
        import matplotlib.pyplot as plt

        fig = ax.figure if ax is not None else plt.figure(figsize=(5, 3.5))
        ax = ax if ax is not None else fig.add_subplot()
        top = self.rel_change("top").mean(-1) * 100
        rand = self.rel_change("random").mean(-1) * 100  # [k, seed]
        ax.plot(self.ks, top, "o-", label="top-k attributed units")
        ax.plot(self.ks, rand.mean(1), "s--", color="gray", label="random units, same layers")
        if rand.shape[1] > 1:
            ax.fill_between(self.ks, rand.mean(1) - rand.std(1), rand.mean(1) + rand.std(1),
                            color="gray", alpha=0.25)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("units ablated (k)")
        ax.set_ylabel("mean change in p(c) (%)")
        ax.legend(frameon=False)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        top = self.rel_change("top").mean(-1)
        rand = self.rel_change("random").mean((-1, -2))
        pts = ", ".join(f"k={k}: {t:+.0%} vs {r:+.0%}" for k, t, r in zip(self.ks, top, rand))
        return f"AblationCurve({len(self.p_before)} images, {self.mode}; top vs random: {pts})"


def ablation_curve(model: VisionLM, images, ranked_units: UnitsLike, target=None,
                   prompt: str | Sequence[str] | None = None, ks: Sequence[int] = (1, 10, 100, 1000), *,
                   probe: Probe | None = None, n_random_seeds: int = 3, seed: int = 0,
                   mode: Literal["zero", "mean"] = "zero", mean_acts: Tensor | None = None, hook: str = "post",
                   batch_size: int = 16, image_features: Tensor | None = None,
                   image_embed: Tensor | None = None, sae: SAE | Sequence[SAE] | None = None) -> AblationCurve:
    """Ablate the top-k ranked units, and k layer-matched random units, for each k.

    The images are embedded once for all ``1 + len(ks) * (1 + n_random_seeds)`` runs.

    Args:
        model: The vision LM.
        images, image_features, image_embed: As for :func:`ablate_units`.
        ranked_units: ``(layer, unit)`` rows, best first: ``[n, 2]`` shared or ``[batch, n, 2]``
            (``attr.top_units(n).units_per_image()``).
        target, prompt, probe, mode, mean_acts, hook, batch_size: As for :func:`ablate_units`.
        ks: Numbers of units to ablate (each at most ``n``).
        n_random_seeds: Random draws per k; each draws, per image, as many units from each layer
            as the top-k set holds (:func:`sample_matched_units`).
        seed: Seed of the random draws.
        sae: An SAE or a list of them: the units are their latents (as for :func:`ablate_units`); the random
            latents come from the same SAEs.

    Raises:
        TypeError: A k that is not an int (``2.9`` is not truncated).
        ValueError: A unit ranked twice (top-k would ablate fewer than k units), a k out of range,
            or another bad argument (named). In training mode a ``UserWarning`` (see :func:`ablate_units`).
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    short = "sae" if saes else mlp_hook(model, hook)
    warn_if_training(model, "ablation_curve")
    emb = soft_prompts(model, images, image_features, image_embed)
    probe = resolve_probe(model, len(emb), probe, target, prompt)
    ranked = check_distinct(as_units(model, ranked_units, saes=saes), "ranked_units")
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a sequence of ints, got {type(ks).__name__}")
    ks = [check_int(k, "ks", minimum=None) for k in ks]  # no silent int(2.9) == 2
    if not ks or min(ks) < 0 or max(ks) > ranked.shape[-2]:
        raise ValueError(f"ks must be in [0, {ranked.shape[-2]}] (the number of ranked units), got {ks}")
    check_int(n_random_seeds, "n_random_seeds")
    seed = check_int(seed, "seed", minimum=None)
    run = Ablator(model, emb, probe, short, None, mode, mean_acts, batch_size, saes)
    gen = torch.Generator().manual_seed(seed)
    p_top, p_rand = [], []
    for k in ks:
        top = ranked[..., :k, :]
        p_top.append(run.p(top))
        p_rand.append(torch.stack([run.p(sample_matched_units(top, run.width, gen))
                                   for _ in range(n_random_seeds)]))
    return AblationCurve(ks=ks, p_before=run.p(None), p_top=torch.stack(p_top), p_random=torch.stack(p_rand),
                         mode=mode)
