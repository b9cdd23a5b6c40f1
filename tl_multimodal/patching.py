"""Causal tests of MLP units at image positions: ablation, ablation curves, activation patching.

The measured quantity is ``p(c)``: the probability of a target token ``c`` (one token id per image)
at the position that predicts it, i.e. the last position of the text ``prompt`` that precedes ``c``
(``"A picture of a"`` for the caption "A picture of a dog", ``c`` = the id of ``" dog"``).

Units are ``(layer, unit)`` rows: an ``Int[Tensor, "n 2"]`` shared by all images, an
``Int[Tensor, "batch n 2"]`` with one set per image, or a list of ``(layer, unit)`` pairs.

Which activation is a unit's? By default ``blocks.{l}.mlp.hook_post``: the value that multiplies
the unit's output row ``W_out[l][k]``. Zeroing it removes exactly the unit's contribution to the MLP
output, for GELU MLPs and for gated ones (SwiGLU: ``hook_post = silu(gate) * up``) alike. Attribution
(METHOD.md) scores the *pre*-activation ``hook_pre``; zeroing that is the same intervention for
GELU-type MLPs (``gelu(0) = 0``) but for a gated MLP it zeroes only the gate (``silu(0) = 0``, so
also no output), and a *mean* ablation of ``hook_pre`` is a different intervention from one of
``hook_post`` in both cases. ``hook=`` picks another MLP hook.

Activation patching extends ``transformer_lens.patching`` with a neuron axis: the patch setters
:func:`layer_pos_neuron_patch_setter` and :func:`layer_neuron_patch_setter` plug into its
``generic_activation_patch``. The "corruption" here is the image (the tokens are the same), so
TransformerLens's functions run unchanged inside ``with model.bind_images(base_images):``, e.g.
``get_act_patch_resid_pre(model, tokens, source_cache, metric)``. Naming: the *source* image gives
the activations (TransformerLens's "clean" run), the *base* image receives them ("corrupted").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import patching as tl_patching
from transformer_lens.ActivationCache import ActivationCache

from tl_multimodal.prefix import HookedVisionPrefix, ImageInput
from tl_multimodal.units import UnitsLike, as_units

Positions = slice | Sequence[int] | int

_MLP_HOOKS = ("hook_post", "hook_pre", "hook_pre_linear")


# ---------------------------------------------------------------------------------- inputs
def _check_hook(model: HookedVisionPrefix, hook: str) -> None:
    if hook not in _MLP_HOOKS:
        raise ValueError(f"hook must be one of {_MLP_HOOKS} (an MLP hook with a unit axis), got {hook!r}")
    if f"blocks.0.mlp.{hook}" not in model.hook_dict:
        raise ValueError(f"this model's MLP has no {hook} (hook_pre_linear exists only in gated MLPs)")


def _prompt_tokens(model: HookedVisionPrefix, prompt: str | Sequence[str], batch: int,
                   ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch"]]:
    """Image-prefixed tokens (right-padded) and the position that predicts the target, per row."""
    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt, image=True)
        return tokens.expand(batch, -1), torch.full((batch,), tokens.shape[1] - 1, dtype=torch.long)
    prompts = list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} images")
    lengths = [model.to_tokens(p, image=True).shape[1] for p in prompts]
    return model.to_tokens(prompts, image=True, padding_side="right"), torch.tensor(lengths) - 1


def _as_target(target, batch: int, d_vocab: int) -> Int[Tensor, "batch"]:
    if isinstance(target, str) or (isinstance(target, Sequence) and any(isinstance(t, str) for t in target)):
        raise ValueError("target must be token ids (e.g. model.to_single_token(' dog')), not strings")
    t = torch.as_tensor(target).long().reshape(-1).cpu()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target must be one token id or one per image ({batch}), got {t.numel()}")
    if ((t < 0) | (t >= d_vocab)).any():
        raise ValueError(f"target token ids must be in [0, {d_vocab})")
    return t.clone()


def target_probability(logits: Float[Tensor, "batch pos d_vocab"], pred_pos: Int[Tensor, "batch"],
                       target: Int[Tensor, "batch"]) -> Float[Tensor, "batch"]:
    """``p(c)`` per row: softmax of ``logits[b, pred_pos[b]]`` at ``target[b]`` (in float32)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, pred_pos.to(logits.device)].float()
    return last.log_softmax(-1)[rows, target.to(logits.device)].exp()


def target_prob_metric(pred_pos: Int[Tensor, "batch"], target: Int[Tensor, "batch"],
                       ) -> Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]:
    """A ``transformer_lens.patching`` metric: the batch mean of :func:`target_probability`."""
    return lambda logits: target_probability(logits, pred_pos, target).mean()


# ---------------------------------------------------------------------------------- ablation
def _masks_by_layer(units: Tensor, batch: int, d_mlp: int, device) -> dict[int, Tensor]:
    """``{layer: Bool[batch, d_mlp]}`` of the units to intervene on, per image."""
    per_image = units if units.ndim == 3 else units[None].expand(batch, -1, -1)
    if per_image.shape[0] != batch:
        raise ValueError(f"per-image units for {per_image.shape[0]} images, but {batch} images given")
    masks: dict[int, Tensor] = {}
    for layer in per_image[..., 0].unique().tolist():
        m = torch.zeros(batch, d_mlp, dtype=torch.bool)
        b, j = (per_image[..., 0] == layer).nonzero(as_tuple=True)
        m[b, per_image[b, j, 1]] = True
        masks[layer] = m.to(device)
    return masks


def _ablation_hook(act: Tensor, hook, mask: Tensor, replacement: Tensor | None, positions) -> Tensor:
    sub = act[:, positions]  # [batch, pos, d_mlp]
    rep = torch.zeros_like(sub) if replacement is None else replacement.to(sub.dtype).expand_as(sub)
    act[:, positions] = torch.where(mask[:, None, :], rep, sub)
    return act


def _check_positions(model: HookedVisionPrefix, positions: Positions | None) -> Positions:
    if positions is None:
        return model.image_positions
    if isinstance(positions, int):
        return [positions]
    return positions if isinstance(positions, slice) else list(positions)


def _n_positions(positions: Positions, n_pos: int) -> int:
    return len(range(n_pos)[positions]) if isinstance(positions, slice) else len(positions)


def _run_p(model: HookedVisionPrefix, pixels: Tensor, tokens: Tensor, pred_pos: Tensor, target: Tensor,
           units: Tensor | None, mode: str, mean_acts: Tensor | None, hook: str, positions,
           batch_size: int) -> Float[Tensor, "batch"]:
    """p(c) per image, with ``units`` ablated (``None``: no intervention), in chunks of images."""
    out = []
    for start in range(0, len(pixels), batch_size):
        sl = slice(start, start + batch_size)
        fwd_hooks = []
        if units is not None:
            chunk_units = units[sl] if units.ndim == 3 else units
            masks = _masks_by_layer(chunk_units, len(pixels[sl]), model.cfg.d_mlp, pixels.device)
            for layer, mask in masks.items():
                rep = None if mode == "zero" else mean_acts[layer].to(pixels.device)
                fwd_hooks.append((f"blocks.{layer}.mlp.{hook}",
                                  partial(_ablation_hook, mask=mask, replacement=rep, positions=positions)))
        with torch.no_grad():
            logits = model.run_with_hooks(tokens[sl], images=pixels[sl], fwd_hooks=fwd_hooks)
        out.append(target_probability(logits, pred_pos[sl], target[sl]).cpu())
    return torch.cat(out)


def _check_mean_acts(model: HookedVisionPrefix, mode: str, mean_acts: Tensor | None, n_pos: int) -> Tensor | None:
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "zero":
        if mean_acts is not None:
            raise ValueError("mean_acts is only used with mode='mean'")
        return None
    if mean_acts is None:
        raise ValueError("mode='mean' needs mean_acts (see mean_unit_activations)")
    L, d = model.cfg.n_layers, model.cfg.d_mlp
    if tuple(mean_acts.shape) not in ((L, d), (L, n_pos, d)):
        raise ValueError(f"mean_acts must be [n_layers={L}, d_mlp={d}] or [n_layers, n_positions={n_pos}, "
                         f"d_mlp], got {tuple(mean_acts.shape)}")
    return mean_acts[:, None] if mean_acts.ndim == 2 else mean_acts


@torch.no_grad()
def mean_unit_activations(model: HookedVisionPrefix, images: ImageInput, hook: str = "hook_post",
                          per_position: bool = True, batch_size: int = 16,
                          ) -> Float[Tensor, "layer patch unit"] | Float[Tensor, "layer unit"]:
    """Mean activation of every MLP unit at the image positions over ``images`` (for mean ablation).

    The text prompt cannot affect image positions (they come first and attention is causal), so
    none is needed.

    Args:
        model: The vision-prefixed model.
        images: Pixels or PIL images (a reference set, e.g. held-out COCO images).
        hook: The MLP hook whose activations are averaged.
        per_position: Keep one mean per image position (``[layer, patch, unit]``); otherwise
            average over positions too (``[layer, unit]``).
        batch_size: Images per forward pass.
    """
    _check_hook(model, hook)
    pixels = model.preprocess(images)
    tokens = model.to_tokens("", image=True)
    names = [f"blocks.{layer}.mlp.{hook}" for layer in range(model.cfg.n_layers)]
    total = torch.zeros(model.cfg.n_layers, model.n_image_tokens, model.cfg.d_mlp)
    for chunk in pixels.split(batch_size):
        _, cache = model.run_with_cache(tokens.expand(len(chunk), -1), images=chunk, names_filter=names)
        total += torch.stack([cache[n][:, model.image_positions].float().sum(0).cpu() for n in names])
    mean = total / len(pixels)
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


def ablate_units(model: HookedVisionPrefix, images: ImageInput, units: UnitsLike, target,
                 prompt: str | Sequence[str] = "A picture of", mode: Literal["zero", "mean"] = "zero",
                 mean_acts: Tensor | None = None, hook: str = "hook_post", positions: Positions | None = None,
                 batch_size: int = 16) -> AblationResult:
    """Ablate MLP units at the image positions and measure p(c) before and after.

    Args:
        model: The vision-prefixed model.
        images: Pixels ``[batch, channel, height, width]`` or PIL images.
        units: ``(layer, unit)`` rows, shared ``[n, 2]`` or per image ``[batch, n, 2]``.
        target: Token id of ``c``, one per image (or one for all).
        prompt: The text before ``c`` (one for all images, or one per image); p(c) is read at its
            last position.
        mode: ``"zero"`` sets the activations to 0; ``"mean"`` to ``mean_acts``.
        mean_acts: ``[n_layers, d_mlp]`` or ``[n_layers, n_positions, d_mlp]`` replacement values
            for mode ``"mean"`` (:func:`mean_unit_activations`).
        hook: The MLP hook that holds the unit's activation (see the module docstring).
        positions: Positions to ablate at; default ``model.image_positions``.
        batch_size: Images per forward pass.
    """
    _check_hook(model, hook)
    pixels = model.preprocess(images)
    tokens, pred_pos = _prompt_tokens(model, prompt, len(pixels))
    target = _as_target(target, len(pixels), model.cfg.d_vocab)
    u = as_units(model, units)
    positions = _check_positions(model, positions)
    means = _check_mean_acts(model, mode, mean_acts, _n_positions(positions, tokens.shape[1]))
    run = partial(_run_p, model, pixels, tokens, pred_pos, target, mode=mode, mean_acts=means, hook=hook,
                  positions=positions, batch_size=batch_size)
    return AblationResult(p_before=run(None), p_after=run(u), target=target, n_units=u.shape[-2], mode=mode)


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
        """Mean relative change of p(c) vs k (log x), top-k against random (mean ± sd over seeds)."""
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


def ablation_curve(model: HookedVisionPrefix, images: ImageInput, ranked_units: UnitsLike, target,
                   prompt: str | Sequence[str] = "A picture of", ks: Sequence[int] = (1, 10, 100, 1000),
                   n_random_seeds: int = 3, seed: int = 0, mode: Literal["zero", "mean"] = "zero",
                   mean_acts: Tensor | None = None, hook: str = "hook_post", batch_size: int = 16,
                   ) -> AblationCurve:
    """Ablate the top-k ranked units, and k layer-matched random units, for each k.

    Args:
        model: The vision-prefixed model.
        images: Pixels or PIL images.
        ranked_units: ``(layer, unit)`` rows, best first: ``[n, 2]`` shared or ``[batch, n, 2]``.
        target, prompt, mode, mean_acts, hook, batch_size: As for :func:`ablate_units`.
        ks: Numbers of units to ablate (each at most ``n``).
        n_random_seeds: Random draws per k; each draws, per image, as many units from each layer
            as the top-k set holds (:func:`sample_matched_units`).
        seed: Seed of the random draws.
    """
    _check_hook(model, hook)
    pixels = model.preprocess(images)
    tokens, pred_pos = _prompt_tokens(model, prompt, len(pixels))
    target = _as_target(target, len(pixels), model.cfg.d_vocab)
    ranked = as_units(model, ranked_units)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 0 or max(ks) > ranked.shape[-2]:
        raise ValueError(f"ks must be in [0, {ranked.shape[-2]}] (the number of ranked units), got {ks}")
    if n_random_seeds < 1:
        raise ValueError("n_random_seeds must be at least 1")
    positions = model.image_positions
    means = _check_mean_acts(model, mode, mean_acts, model.n_image_tokens)
    run = partial(_run_p, model, pixels, tokens, pred_pos, target, mode=mode, mean_acts=means, hook=hook,
                  positions=positions, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    p_top, p_rand = [], []
    for k in ks:
        top = ranked[..., :k, :]
        p_top.append(run(top))
        p_rand.append(torch.stack([run(sample_matched_units(top, model.cfg.d_mlp, gen))
                                   for _ in range(n_random_seeds)]))
    return AblationCurve(ks=ks, p_before=run(None), p_top=torch.stack(p_top), p_random=torch.stack(p_rand),
                         mode=mode)


# ---------------------------------------------------------------------------------- patching
def layer_pos_neuron_patch_setter(corrupted_activation, index, clean_activation):
    """Patch setter for ``generic_activation_patch`` with ``index = [layer, pos, neuron]``.

    Assumes the activation is ``[batch, pos, neuron]`` (``mlp.hook_pre``/``hook_post``), the
    neuron-axis counterpart of TransformerLens's ``layer_pos_head_vector_patch_setter``.
    """
    assert len(index) == 3
    layer, pos, neuron = index
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


def layer_neuron_patch_setter(corrupted_activation, index, clean_activation, pos: Positions = slice(None)):
    """Patch setter with ``index = [layer, neuron]``: the neuron at every position in ``pos``.

    Bind ``pos`` with ``functools.partial`` (e.g. ``pos=model.image_positions``); the default
    patches all positions, like TransformerLens's ``layer_head_vector_patch_setter`` for heads.
    """
    assert len(index) == 2
    layer, neuron = index
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


def get_act_patch_mlp_neuron(model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: ActivationCache,
                             patching_metric: Callable, layers: Sequence[int] | None = None,
                             positions: Sequence[int] | None = None, neurons: Sequence[int] | None = None,
                             activation_name: str = "post") -> Float[Tensor, "layer pos neuron"]:
    """Patch each MLP neuron at each position alone: ``generic_activation_patch`` with a neuron axis.

    One forward pass per (layer, position, neuron): restrict the ranges, the full product is
    ``n_layers * pos * d_mlp`` runs. For a :class:`HookedVisionPrefix`, call it inside
    ``with model.bind_images(corrupted_images):``.

    Args:
        model, corrupted_tokens, clean_cache, patching_metric: As for TransformerLens's patching
            functions.
        layers, positions, neurons: The values to sweep (default: all).
        activation_name: ``"post"`` (``mlp.hook_post``) or ``"pre"``.

    Returns:
        The metric per patch, ``[len(layers), len(positions), len(neurons)]``.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    positions = list(range(corrupted_tokens.shape[-1])) if positions is None else list(positions)
    neurons = list(range(model.cfg.d_mlp)) if neurons is None else list(neurons)
    index_df = pd.DataFrame(list(itertools.product(layers, positions, neurons)), columns=["layer", "pos", "neuron"])
    out = tl_patching.generic_activation_patch(
        model, corrupted_tokens, clean_cache, patching_metric, patch_setter=layer_pos_neuron_patch_setter,
        activation_name=activation_name, index_df=index_df)
    return out.reshape(len(layers), len(positions), len(neurons))


def get_act_patch_mlp_neuron_over_pos(model, corrupted_tokens: Int[Tensor, "batch pos"],
                                      clean_cache: ActivationCache, patching_metric: Callable, units: UnitsLike,
                                      pos: Positions = slice(None), activation_name: str = "post",
                                      ) -> Float[Tensor, "n"]:
    """Patch each (layer, neuron) of ``units`` alone, at all positions ``pos`` at once.

    ``generic_activation_patch`` with ``index_df`` columns ``[layer, neuron]`` and
    :func:`layer_neuron_patch_setter`. Returns the metric per unit, in the order of ``units``.
    """
    u = as_units(model, units)
    if u.ndim != 2:
        raise ValueError("units must be [n, 2] here (the same units for the whole batch)")
    index_df = pd.DataFrame(u.tolist(), columns=["layer", "neuron"], dtype="int64")
    return tl_patching.generic_activation_patch(
        model, corrupted_tokens, clean_cache, patching_metric,
        patch_setter=partial(layer_neuron_patch_setter, pos=pos), activation_name=activation_name,
        index_df=index_df)


@dataclass(repr=False)
class PatchResult:
    """p(c) on the base images, on the source images, and on the base images with the patch.

    Attributes:
        p_base: ``[batch]`` p(c) of the base (receiving) run.
        p_source: ``[batch]`` p(c) of the source run.
        p_patched: ``[batch]`` p(c) of the base run with source activations patched in.
        target: ``[batch]`` target token ids.
        what: A short description of the patch.
    """

    p_base: Float[Tensor, "batch"]
    p_source: Float[Tensor, "batch"]
    p_patched: Float[Tensor, "batch"]
    target: Int[Tensor, "batch"]
    what: str = ""

    @property
    def recovered(self) -> Float[Tensor, "batch"]:
        """``(p_patched - p_base) / (p_source - p_base)``: 1 = the patch carries the whole effect."""
        return (self.p_patched - self.p_base) / (self.p_source - self.p_base)

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"image": range(len(self.p_base)), "target": self.target.tolist(),
                             "p_base": self.p_base.tolist(), "p_source": self.p_source.tolist(),
                             "p_patched": self.p_patched.tolist(), "recovered": self.recovered.tolist()})

    def __repr__(self) -> str:
        return (f"PatchResult({len(self.p_base)} pairs, {self.what}: mean p(c) base {self.p_base.mean():.3g}, "
                f"source {self.p_source.mean():.3g}, patched {self.p_patched.mean():.3g})")


def _setter_hook(act: Tensor, hook, source: Tensor, mask: Tensor | None, positions) -> Tensor:
    """Copy ``source`` into ``act`` at ``positions`` (and, with ``mask [batch, unit]``, those units)."""
    if mask is None:
        act[:, positions] = source[:, positions].to(act.dtype)
    else:
        act[:, positions] = torch.where(mask[:, None, :], source[:, positions].to(act.dtype), act[:, positions])
    return act


def _pair(model: HookedVisionPrefix, source_images, base_images) -> tuple[Tensor, Tensor]:
    src, base = model.preprocess(source_images), model.preprocess(base_images)
    if src.shape[0] != base.shape[0]:
        raise ValueError(f"{src.shape[0]} source images but {base.shape[0]} base images; pair them one to one")
    return src, base


def _patch(model: HookedVisionPrefix, src: Tensor, base: Tensor, target, prompt, names: list[str],
           make_hook: Callable[[str, Tensor], Callable], what: str) -> PatchResult:
    tokens, pred_pos = _prompt_tokens(model, prompt, len(src))
    target = _as_target(target, len(src), model.cfg.d_vocab)
    with torch.no_grad():
        src_logits, cache = model.run_with_cache(tokens, images=src, names_filter=names)
        base_logits = model(tokens, images=base)
        hooks = [(n, make_hook(n, cache[n])) for n in names]
        patched_logits = model.run_with_hooks(tokens, images=base, fwd_hooks=hooks)
    p = partial(target_probability, pred_pos=pred_pos, target=target)
    return PatchResult(p(base_logits).cpu(), p(src_logits).cpu(), p(patched_logits).cpu(), target, what)


def patch_units(model: HookedVisionPrefix, source_images: ImageInput, base_images: ImageInput,
                units: UnitsLike, target, prompt: str | Sequence[str] = "A picture of",
                hook: str = "hook_post", positions: Positions | None = None) -> PatchResult:
    """Patch the activations of ``units`` from the source images into the base images, together.

    Args:
        model: The vision-prefixed model.
        source_images: Images whose activations are copied (TransformerLens's "clean" run).
        base_images: Images that receive them ("corrupted" run); paired one to one with the sources.
        units: ``(layer, unit)`` rows, ``[n, 2]`` or per pair ``[batch, n, 2]``.
        target, prompt, hook: As for :func:`ablate_units`.
        positions: Positions patched; default ``model.image_positions``.
    """
    _check_hook(model, hook)
    u = as_units(model, units)
    positions = _check_positions(model, positions)
    src, base = _pair(model, source_images, base_images)
    masks = _masks_by_layer(u, len(src), model.cfg.d_mlp, model.W_E.device)
    names = [f"blocks.{layer}.mlp.{hook}" for layer in masks]
    by_name = dict(zip(names, masks.values()))
    return _patch(model, src, base, target, prompt, names,
                  lambda n, s: partial(_setter_hook, source=s, mask=by_name[n], positions=positions),
                  f"{u.shape[-2]} units ({hook})")


def patch_resid(model: HookedVisionPrefix, source_images: ImageInput, base_images: ImageInput, target,
                layer: int, positions: Positions | None = None, prompt: str | Sequence[str] = "A picture of",
                activation: str = "resid_pre") -> PatchResult:
    """Patch the residual stream at ``positions`` of one layer from the source into the base images.

    Args:
        layer: Block whose ``hook_{activation}`` is patched.
        positions: Positions patched; default ``model.image_positions`` (all image tokens).
        activation: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``.
        source_images, base_images, target, prompt: As for :func:`patch_units`.
    """
    if activation not in ("resid_pre", "resid_mid", "resid_post"):
        raise ValueError(f"activation must be resid_pre, resid_mid or resid_post, got {activation!r}")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers}), got {layer}")
    positions = _check_positions(model, positions)
    src, base = _pair(model, source_images, base_images)
    return _patch(model, src, base, target, prompt, [f"blocks.{layer}.hook_{activation}"],
                  lambda n, s: partial(_setter_hook, source=s, mask=None, positions=positions),
                  f"{activation} of layer {layer}")


@dataclass(repr=False)
class UnitPatchSweep:
    """Batch-mean p(c) with each unit patched alone (source -> base) at the image positions.

    Attributes:
        units: ``[n, 2]`` (layer, unit) rows.
        p_patched: ``[n]`` mean p(c) of the base run with that unit patched.
        p_base: Mean p(c) of the base run.
        p_source: Mean p(c) of the source run.
    """

    units: Int[Tensor, "n 2"]
    p_patched: Float[Tensor, "n"]
    p_base: float
    p_source: float

    def to_dataframe(self) -> pd.DataFrame:
        """One row per unit, with ``delta = p_patched - p_base``, largest first."""
        df = pd.DataFrame({"layer": self.units[:, 0].tolist(), "unit": self.units[:, 1].tolist(),
                           "p_patched": self.p_patched.tolist()})
        df["delta"] = df["p_patched"] - self.p_base
        return df.sort_values("delta", ascending=False, ignore_index=True)

    def __repr__(self) -> str:
        best = self.p_patched.max().item() if len(self.p_patched) else float("nan")
        return (f"UnitPatchSweep({len(self.units)} units: p(c) base {self.p_base:.3g}, source "
                f"{self.p_source:.3g}, best single-unit patch {best:.3g})")


def unit_patch_sweep(model: HookedVisionPrefix, source_images: ImageInput, base_images: ImageInput,
                     units: UnitsLike, target, prompt: str | Sequence[str] = "A picture of",
                     hook: str = "hook_post", positions: Positions | None = None) -> UnitPatchSweep:
    """Patch each unit alone at the image positions, source -> base, via ``transformer_lens.patching``.

    Runs :func:`get_act_patch_mlp_neuron_over_pos` (``generic_activation_patch``) inside
    ``model.bind_images(base_images)``; one forward pass per unit.
    """
    _check_hook(model, hook)
    u = as_units(model, units)
    src, base = _pair(model, source_images, base_images)
    tokens, pred_pos = _prompt_tokens(model, prompt, len(src))
    metric = target_prob_metric(pred_pos, _as_target(target, len(src), model.cfg.d_vocab))
    names = [f"blocks.{layer}.mlp.{hook}" for layer in u[:, 0].unique().tolist()]
    with torch.no_grad():
        src_logits, cache = model.run_with_cache(tokens, images=src, names_filter=names)
        with model.bind_images(base):
            p_base = metric(model(tokens)).item()
            p = get_act_patch_mlp_neuron_over_pos(model, tokens, cache, metric, u,
                                                  pos=_check_positions(model, positions),
                                                  activation_name=hook.removeprefix("hook_"))
    return UnitPatchSweep(units=u, p_patched=p.cpu(), p_base=p_base, p_source=metric(src_logits).item())
