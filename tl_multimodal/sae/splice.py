"""An SAE spliced into a model's forward pass with its error term, so that its latents are units.

At the SAE's hook the activation ``x`` becomes ``decode(f') + (x - decode(f))`` with ``f = encode(x)`` and
``f'`` the latents after an intervention (ablation, patching): the error term ``x - decode(f)`` stays, so
with ``f' = f`` the model's output is unchanged, and an intervention on latent ``i`` at a position
changes the residual stream there by exactly ``(f'_i - f_i) W_dec[i]`` (times the input scale, for SAEs
that normalise their input). For attribution the latents are made leaves of the autograd graph
(:func:`leaf_latents`), so ``dy/df`` is the gradient through the decoder with the error term held.

Hook names: an SAE names the hook it was trained on. :func:`model_hook_name` maps it onto the model's
TransformerLens name on either backend: ``HookedVisionPrefix`` (``blocks.L.hook_resid_post``, ...) and a
``VisionBridge`` (whose ``TransformerBridge`` has the same names as aliases, and its own names:
``blocks.L.hook_out`` is ``hook_resid_post``, ``blocks.L.hook_in`` ``hook_resid_pre``,
``blocks.L.mlp.hook_out`` ``hook_mlp_out``, ``blocks.L.attn.hook_out`` ``hook_attn_out``).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_multimodal.sae.model import SAE

# a TransformerBridge's own block hook names -> TransformerLens's (which the bridge also has as aliases)
_BRIDGE_NAMES = {"hook_in": "hook_resid_pre", "hook_out": "hook_resid_post", "mlp.hook_out": "hook_mlp_out",
                 "attn.hook_out": "hook_attn_out"}
_D_MODEL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")


def model_hook_name(model, hook_name: str) -> str:
    """The TransformerLens name of the hook ``hook_name`` on ``model`` (either backend).

    Args:
        model: A vision LM (or any HookedTransformer / TransformerBridge).
        hook_name: A hook name as an SAE config writes it (TransformerLens's, or a TransformerBridge's own).

    Raises:
        ValueError: The model has no such hook.
    """
    if not isinstance(hook_name, str):
        raise TypeError(f"hook_name must be a string, got {type(hook_name).__name__}")
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    name = f"blocks.{m.group(1)}.{_BRIDGE_NAMES[m.group(2)]}" if m and m.group(2) in _BRIDGE_NAMES else hook_name
    if name not in model.hook_dict:
        raise ValueError(f"the SAE's hook {hook_name!r} is not a hook of this model (e.g. "
                         f"'blocks.0.hook_resid_post'; the model has {model.cfg.n_layers} layers)")
    return name


def as_saes(model, sae: SAE | Sequence[SAE]) -> list[SAE]:
    """Validate one SAE or a list of them for ``model``: each on a distinct hook the model has, of the
    hook's width where it is known (the residual stream and block outputs: ``d_model``).

    Returns:
        The SAEs as a list, in the order given (that order numbers them: a latent unit is ``(sae index, latent)``).
    """
    saes = [sae] if isinstance(sae, SAE) else list(sae) if isinstance(sae, (list, tuple)) else None
    if not saes or not all(isinstance(s, SAE) for s in saes):
        raise TypeError(f"sae must be an SAE (tl_multimodal.load_sae) or a non-empty list of SAEs, got {sae!r:.80}")
    names = [model_hook_name(model, s.hook_name) for s in saes]
    if len(set(names)) != len(names):
        raise ValueError(f"two SAEs on one hook ({names}): give at most one SAE per hook")
    for s, name in zip(saes, names):
        if name.endswith(_D_MODEL_HOOKS) and s.cfg.d_in != model.cfg.d_model:
            raise ValueError(f"the SAE on {name} reads d_in={s.cfg.d_in}, but the model's d_model is "
                             f"{model.cfg.d_model}")
    return saes


def saes_by_hook(model, sae: SAE | Sequence[SAE]) -> dict[str, SAE]:
    """:func:`as_saes`, keyed by the model's hook name, for analyses that put the latents of several SAEs
    on one unit axis (so all must have one ``d_sae``)."""
    saes = as_saes(model, sae)
    if len({s.cfg.d_sae for s in saes}) > 1:
        raise ValueError(f"the SAEs of one analysis must have one d_sae, got {[s.cfg.d_sae for s in saes]}")
    return {model_hook_name(model, s.hook_name): s for s in saes}


def _check_width(sae: SAE, x: Tensor) -> None:
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"the SAE on {sae.hook_name} reads d_in={sae.cfg.d_in}, but the hook gives {x.shape[-1]}")


def leaf_latents(sae: SAE, x: Float[Tensor, "batch pos d_in"],
                 ) -> tuple[Float[Tensor, "batch pos d_sae"], Float[Tensor, "batch pos d_in"]]:
    """The latents of ``x`` as an autograd leaf, and ``x`` spliced through them with the error term.

    The returned activation equals ``x`` exactly (``x + decode(f) - decode(f)``, the two decodes of the
    same values); its gradient reaches ``f`` through the decoder, and ``x``'s upstream graph unchanged.
    """
    _check_width(sae, x)
    x_in = x.detach().to(sae.W_dec.dtype)
    f = sae.encode(x_in).detach().requires_grad_(True)
    delta = sae.decode(f, x_in) - sae.decode(f.detach(), x_in)
    return f, x + delta.to(x.dtype)


def latent_edit_hook(sae: SAE, edit: Callable[[Tensor, object], Tensor]) -> Callable:
    """A forward hook at ``sae``'s hook that edits its latents and keeps the error term.

    Args:
        sae: The SAE.
        edit: ``(f, hook) -> f'``, the latents after the intervention (``[batch, pos, d_sae]``).

    Returns:
        ``hook(x, hook) -> x + decode(f') - decode(f)`` (in ``x``'s dtype): only what the edit changed moves.
    """
    def hook(x, hook):
        _check_width(sae, x)
        x_in = x.to(sae.W_dec.dtype)
        f = sae.encode(x_in)
        return x + (sae.decode(edit(f, hook), x_in) - sae.decode(f, x_in)).to(x.dtype)

    return hook


def latent_store_hook(sae: SAE, store: dict, key) -> Callable:
    """A forward hook that keeps ``sae.encode(x)`` in ``store[key]`` and leaves the activation as it is."""
    def hook(x, hook):
        _check_width(sae, x)
        store[key] = sae.encode(x.to(sae.W_dec.dtype))

    return hook


def without_error_hook(sae: SAE) -> Callable:
    """A forward hook replacing the activation by the SAE's reconstruction (no error term): for measuring
    how much of the model's loss the SAE alone keeps."""
    def hook(x, hook):
        _check_width(sae, x)
        return sae(x.to(sae.W_dec.dtype)).to(x.dtype)

    return hook
