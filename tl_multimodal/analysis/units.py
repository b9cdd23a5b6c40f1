"""MLP units as ``(layer, unit)`` index pairs and the MLP hooks that hold them: the one units
validator (:func:`as_units`) and the one hook vocabulary (:func:`mlp_hook`) every analysis shares."""

from __future__ import annotations

import numbers
import re
from collections import Counter
from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_multimodal._compat import get_act_name
from tl_multimodal.sae.splice import latent_store_hook

UnitsLike = Int[Tensor, "n 2"] | Int[Tensor, "batch n 2"] | Sequence[tuple[int, int]]


def as_units(model, units: UnitsLike, batched: bool = True, allow_empty: bool = True,
             saes: dict | None = None) -> Int[Tensor, "... n 2"]:
    """Validate ``(layer, unit)`` pairs into a long CPU tensor ``[n, 2]`` (or ``[batch, n, 2]``).

    Args:
        model: The HookedTransformer the units belong to (for ``n_layers`` and ``d_mlp``).
        units: A list of pairs, one pair, or an integer tensor ``[n, 2]`` / ``[batch, n, 2]``.
        batched: Whether a per-image ``[batch, n, 2]`` set is accepted.
        allow_empty: Whether no units at all is valid (ablating nothing is; decoding nothing is not).
        saes: ``{hook name: SAE}`` (:func:`~tl_multimodal.sae.splice.saes_by_hook`): the units are SAE latents,
            ``(index of the SAE, latent)``, checked against ``len(saes)`` and ``d_sae``.
    """
    if isinstance(units, Tensor):
        t = units.detach().cpu()
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"units must be an integer tensor of (layer, unit) rows, got {t.dtype}")
        t = t.long()
    else:
        units = list(units)
        rows = [units] if units and _is_index(units[0]) else units
        try:
            t = torch.tensor(_int_lists(rows), dtype=torch.long)  # never torch.tensor(2.9, dtype=long) == 2
        except ValueError:  # ragged
            raise ValueError("units must be (layer, unit) pairs") from None
        if t.ndim == 1 and t.numel() == 0:
            t = t.reshape(0, 2)
        if t.ndim < 2 or t.shape[-1] != 2:
            raise ValueError("units must be (layer, unit) pairs")
    if t.ndim == 1 and t.numel() == 2:
        t = t[None]
    if t.ndim not in ((2, 3) if batched else (2,)) or t.shape[-1] != 2 or (t.shape[-2] == 0 and not allow_empty):
        want = "[n, 2] or [batch, n, 2]" if batched else "[n, 2]"
        empty = "" if allow_empty else "non-empty "
        raise ValueError(f"units must be a {empty}{want} of (layer, unit), got shape {tuple(t.shape)}")
    layer, unit = t[..., 0], t[..., 1]
    names, width = unit_axis(model, "pre", saes)
    n_layers, kind, what = len(names), "layers" if saes is None else "SAE indices", "d_mlp" if saes is None else "d_sae"
    if ((layer < 0) | (layer >= n_layers)).any():
        raise ValueError(f"unit layers out of range: {kind} must be in [0, {n_layers}), "
                         f"got {layer.unique().tolist()}")
    if ((unit < 0) | (unit >= width)).any():
        raise ValueError(f"unit indices out of range: must be in [0, {width}) ({what})")
    return t


def _is_index(value) -> bool:
    """An integer (Python, numpy, or a 0-d integer tensor), not a bool and not a float."""
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool"


def _int_lists(x):
    """Nested sequences of integers as nested lists of Python ints; a ``TypeError`` at a non-integer."""
    if _is_index(x):
        return int(x)
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise TypeError(f"units must be (layer, unit) pairs of ints, got {x!r} ({type(x).__name__})")
    return [_int_lists(v) for v in x]


def check_distinct(units: Int[Tensor, "... n 2"], name: str = "units") -> Int[Tensor, "... n 2"]:
    """Refuse a unit set (``[n, 2]``, or ``[batch, n, 2]`` checked per image) that names a unit twice:
    ablating or patching it once while counting it ``k`` times would mislabel the set's size.

    Raises:
        ValueError: naming the repeated units (and the image, per image).
    """
    rows = [units] if units.ndim == 2 else list(units)
    for i, row in enumerate(rows):
        counts = Counter(map(tuple, row.tolist()))
        dup = [unit_label(*u) for u, c in counts.items() if c > 1]
        if dup:
            where = "" if units.ndim == 2 else f" (image {i})"
            raise ValueError(f"{name} name units more than once{where}: {dup[:5]}{'...' if len(dup) > 5 else ''}; "
                             "a unit set holds each (layer, unit) once")
    return units


_MLP_HOOKS = ("pre", "post", "pre_linear")


def mlp_hook(model, hook: str) -> str:
    """The one hook vocabulary: an MLP hook with a unit axis, as TransformerLens's short name.

    Accepts the short names of ``transformer_lens.utils.get_act_name`` (``"pre"``, ``"post"``,
    ``"pre_linear"``) and the spellings ``"hook_pre"``, ``"mlp.hook_pre"``; checks the model has it.

    Returns:
        The short name (``"pre"``, ``"post"`` or ``"pre_linear"``); :func:`mlp_act_name` makes the full name.
    """
    if not isinstance(hook, str):
        raise TypeError(f"hook must be a string such as 'pre' or 'post', got {type(hook).__name__}")
    short = hook.removeprefix("mlp.").removeprefix("hook_")
    if short not in _MLP_HOOKS:
        raise ValueError(f"unknown hook {hook!r}: an MLP hook is one of {list(_MLP_HOOKS)} "
                         "(or 'hook_pre', 'mlp.hook_pre', ...)")
    if model.cfg.attn_only:
        raise ValueError("the model is attention-only: it has no MLP units")
    if mlp_act_name(short, 0) not in model.hook_dict:
        raise ValueError(f"this model's MLPs have no hook_{short} (hook_pre_linear exists only for gated MLPs)")
    return short


def mlp_act_name(hook: str, layer: int) -> str:
    """``blocks.{layer}.mlp.hook_{hook}`` for a short name from :func:`mlp_hook` (``get_act_name``)."""
    return get_act_name(hook, layer)


def unit_axis(model, hook: str, saes: dict | None = None) -> tuple[list[str], int]:
    """Where units live: the hook name of each unit "layer" and the number of units in each, for MLP units
    (``blocks.{l}.mlp.hook_{hook}`` per layer, ``d_mlp``) or SAE latents (``saes``, ``{hook name: SAE}``: one
    "layer" per SAE, ``d_sae``)."""
    if saes:
        return list(saes), next(iter(saes.values())).cfg.d_sae
    return [mlp_act_name(hook, layer) for layer in range(model.cfg.n_layers)], model.cfg.d_mlp


def cache_units(model, tokens: Tensor, image_embed: Tensor, names: list[str], saes: dict | None = None, **kwargs):
    """Run the model keeping the activations at hooks ``names``: the hooks' own (``run_with_cache``) or, at the
    hooks of ``saes`` (``{hook name: SAE}``), the SAEs' latents (the model's output is unchanged).

    Returns:
        The model's output and ``{name: activation}``.
    """
    if not saes:
        return model.run_with_cache(tokens, image_embed=image_embed, names_filter=names, **kwargs)
    cache: dict = {}
    out = model.run_with_hooks(tokens, image_embed=image_embed, **kwargs,
                               fwd_hooks=[(n, latent_store_hook(saes[n], cache, n)) for n in names])
    return out, cache


def unit_list(model, units: UnitsLike, saes: dict | None = None) -> list[tuple[int, int]]:
    """At least one validated ``(layer, unit)`` pair (:func:`as_units`, unbatched; SAE latents with ``saes``)
    as a list of int tuples."""
    return [tuple(u) for u in as_units(model, units, batched=False, allow_empty=False, saes=saes).tolist()]


def sae_tags(hook_names: Sequence[str]) -> list[str]:
    """A short name per SAE, from the hook names it reads: ``L{layer}`` (``blocks.15.hook_resid_post`` ->
    ``L15``), or ``SAE{index}`` for all when two SAEs share a layer or a hook names none."""
    layers = [re.match(r"blocks\.(\d+)\.", name) for name in hook_names]
    tags = [f"L{m.group(1)}" if m else "" for m in layers]
    if "" in tags or len(set(tags)) < len(tags):
        return [f"SAE{i}" for i in range(len(tags))]
    return tags


def unit_label(layer: int, unit: int, tags: Sequence[str] | None = None) -> str:
    """A unit's name in tables and figures: ``L{layer}.{unit}``; with ``tags`` (:func:`sae_tags`), latent
    ``unit`` of SAE ``layer``: ``{tags[layer]}.F{unit}`` (``L15.F123``)."""
    return f"L{layer}.{unit}" if tags is None else f"{tags[layer]}.F{unit}"
