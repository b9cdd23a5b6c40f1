"""Activation patching of MLP units and the residual stream at the image slots, source -> base.

The measured quantity is ``p(c)`` of a :class:`~tl_multimodal.analysis.probe.Probe` (``attr.probe``, or one
made from ``target=``/``prompt=``). The *source* images give the activations (TransformerLens's
"clean" run), the *base* images receive them ("corrupted"); the tokens are the same, only the
images differ, so TransformerLens's own patching functions run unchanged inside
``with model.bind_images(image_embed=base_emb):``, with ``probe.metric`` as their metric.

The neuron axis for ``transformer_lens.patching``: the patch setters
:func:`layer_pos_neuron_patch_setter` and :func:`layer_neuron_patch_setter` plug into its
``generic_activation_patch``. The copy itself is :func:`~tl_multimodal.analysis._interventions.swap_hook`,
the intervention ablation uses too.

    patch_units(model, source_images, base_images, units, probe=attr.probe)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import patching as tl_patching
from transformer_lens.ActivationCache import ActivationCache

from tl_multimodal._validate import check_int
from tl_multimodal.analysis._interventions import Positions, position_mask, swap_hook, unit_masks, warn_if_training
from tl_multimodal.analysis.probe import Probe, resolve_probe
from tl_multimodal.analysis.units import (UnitsLike, as_units, cache_units, check_distinct, mlp_act_name, mlp_hook,
                                         unit_axis)
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.model import SAE
from tl_multimodal.sae.splice import latent_edit_hook, saes_by_hook


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

    Bind ``pos`` with ``functools.partial`` (positions, or a ``[batch, pos]`` bool mask such as
    ``probe.image_mask``); the default patches all positions, like TransformerLens's
    ``layer_head_vector_patch_setter`` for heads.
    """
    assert len(index) == 2
    layer, neuron = index
    if isinstance(pos, Tensor) and pos.dtype == torch.bool:  # a [batch, pos] mask
        where = pos.to(corrupted_activation.device)
        corrupted_activation[..., neuron] = torch.where(where, clean_activation[..., neuron],
                                                        corrupted_activation[..., neuron])
        return corrupted_activation
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


def _ints(values, name: str) -> list[int]:
    """A sequence of integers as Python ints (numpy and 0-d tensors too); a TypeError naming ``name`` otherwise."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    return [check_int(v, name, minimum=None) for v in values]


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
    layers = list(range(model.cfg.n_layers)) if layers is None else _ints(layers, "layers")
    positions = list(range(corrupted_tokens.shape[-1])) if positions is None else _ints(positions, "positions")
    neurons = list(range(model.cfg.d_mlp)) if neurons is None else _ints(neurons, "neurons")
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


def _pair(model: VisionLM, source_images, base_images, source_embed, base_embed) -> tuple[Tensor, Tensor]:
    src = soft_prompts(model, source_images, image_embed=source_embed)
    base = soft_prompts(model, base_images, image_embed=base_embed)
    if src.shape[0] != base.shape[0]:
        raise ValueError(f"{src.shape[0]} source images but {base.shape[0]} base images; pair them one to one")
    return src, base


@torch.no_grad()
def _patch(model: VisionLM, src: Tensor, base: Tensor, probe: Probe, masks: dict[str, Tensor | None],
           pos_mask: Tensor, what: str, saes: dict | None = None) -> PatchResult:
    tokens = probe.tokens.to(model.cfg.device)
    src_logits, cache = cache_units(model, tokens, src, list(masks), saes)
    base_logits = model(tokens, image_embed=base)
    hooks = [(n, partial(swap_hook, pos_mask=pos_mask, source=cache[n], unit_mask=m)) for n, m in masks.items()]
    if saes:  # the masks' names are the SAEs' hooks: patch their latents, the base keeping its error term
        hooks = [(n, latent_edit_hook(saes[n], swap)) for n, swap in hooks]
    patched_logits = model.run_with_hooks(tokens, image_embed=base, fwd_hooks=hooks)
    return PatchResult(probe.p(base_logits).cpu(), probe.p(src_logits).cpu(), probe.p(patched_logits).cpu(),
                       probe.target_ids.clone(), what)


def patch_units(model: VisionLM, source_images, base_images, units: UnitsLike, target=None,
                prompt: str | Sequence[str] | None = None, *, probe: Probe | None = None, hook: str = "post",
                positions: Positions | None = None, source_embed: Tensor | None = None,
                base_embed: Tensor | None = None, sae: SAE | Sequence[SAE] | None = None) -> PatchResult:
    """Patch the activations of ``units`` from the source images into the base images, together.

    Args:
        model: The vision LM.
        source_images: Images whose activations are copied (TransformerLens's "clean" run).
        base_images: Images that receive them ("corrupted" run); paired one to one with the sources.
        units: ``(layer, unit)`` rows, ``[n, 2]`` or per pair ``[batch, n, 2]``.
        target, prompt, probe: The query, as for :func:`~tl_multimodal.analysis.ablation.ablate_units`.
        hook: The MLP hook patched (:func:`~tl_multimodal.analysis.units.mlp_hook`).
        positions: Positions patched; default each row's image slots.
        source_embed, base_embed: Soft prompts instead of ``source_images``/``base_images``.
        sae: An SAE or a list of them: patch latents ``(SAE index, latent)`` instead (``hook`` unused); the
            source's latents replace the base's, the base keeps its own error term.

    Raises:
        ValueError: A unit named twice, a probe made for the other sequence layout, or another bad
            argument (named). In training mode a ``UserWarning`` (see ``ablate_units``).
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    short = "sae" if saes else mlp_hook(model, hook)
    warn_if_training(model, "patch_units")
    u = check_distinct(as_units(model, units, saes=saes), "units")
    src, base = _pair(model, source_images, base_images, source_embed, base_embed)
    probe = resolve_probe(model, len(src), probe, target, prompt)
    names, width = unit_axis(model, short, saes)
    masks = {names[layer]: m for layer, m in unit_masks(u, len(src), width).items()}
    return _patch(model, src, base, probe, masks, position_mask(model, probe, positions),
                  f"{u.shape[-2]} units ({short})", saes)


def patch_resid(model: VisionLM, source_images, base_images, target=None, layer: int = 0,
                positions: Positions | None = None, prompt: str | Sequence[str] | None = None, *,
                probe: Probe | None = None, activation: str = "resid_pre", source_embed: Tensor | None = None,
                base_embed: Tensor | None = None) -> PatchResult:
    """Patch the residual stream at ``positions`` of one layer from the source into the base images.

    Args:
        layer: Block whose ``hook_{activation}`` is patched.
        positions: Positions patched; default each row's image slots.
        activation: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``.
        source_images, base_images, target, prompt, probe, source_embed, base_embed: As for :func:`patch_units`.
    """
    if activation not in ("resid_pre", "resid_mid", "resid_post"):
        raise ValueError(f"activation must be resid_pre, resid_mid or resid_post, got {activation!r}")
    check_int(layer, "layer", minimum=0, maximum=model.cfg.n_layers - 1)
    warn_if_training(model, "patch_resid")
    src, base = _pair(model, source_images, base_images, source_embed, base_embed)
    probe = resolve_probe(model, len(src), probe, target, prompt)
    return _patch(model, src, base, probe, {f"blocks.{layer}.hook_{activation}": None},
                  position_mask(model, probe, positions), f"{activation} of layer {layer}")


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


def unit_patch_sweep(model: VisionLM, source_images, base_images, units: UnitsLike, target=None,
                     prompt: str | Sequence[str] | None = None, *, probe: Probe | None = None, hook: str = "post",
                     positions: Positions | None = None, source_embed: Tensor | None = None,
                     base_embed: Tensor | None = None) -> UnitPatchSweep:
    """Patch each unit alone at the image slots, source -> base, via ``transformer_lens.patching``.

    Runs :func:`get_act_patch_mlp_neuron_over_pos` (``generic_activation_patch``) inside
    ``model.bind_images(image_embed=base)`` with ``probe.metric``; one forward pass per unit.
    """
    short = mlp_hook(model, hook)
    warn_if_training(model, "unit_patch_sweep")
    u = as_units(model, units, batched=False)
    src, base = _pair(model, source_images, base_images, source_embed, base_embed)
    probe = resolve_probe(model, len(src), probe, target, prompt)
    tokens = probe.tokens.to(model.cfg.device)
    names = [mlp_act_name(short, layer) for layer in u[:, 0].unique().tolist()]
    with torch.no_grad():
        src_logits, cache = model.run_with_cache(tokens, image_embed=src, names_filter=names)
        with model.bind_images(image_embed=base):
            p_base = probe.metric(model(tokens)).item()
            p = get_act_patch_mlp_neuron_over_pos(model, tokens, cache, probe.metric, u,
                                                  pos=position_mask(model, probe, positions),
                                                  activation_name=short)
    return UnitPatchSweep(units=u, p_patched=p.cpu(), p_base=p_base, p_source=probe.metric(src_logits).item())

