"""Frozen language-model transformer blocks used as visual-encoder layers.

This module implements the architecture of Pang et al., "Frozen Transformers in Language
Models Are Effective Visual Encoder Layers" (ICLR 2024, LM4VisualEncoding) on top of
TransformerLens::

    image -> ViT patch embed + ViT blocks            (trainable, timm)
          -> Linear(d_vit, d_lm)                     (trainable, no bias by default)
          -> frozen LM TransformerBlock(s)           (frozen, non-causal, no positional encoding)
          -> Linear(d_lm, d_vit)                     (trainable, no bias by default)
          -> ViT final norm -> ViT head              (trainable)

Only the two linears and the ViT train; the LM block weights never change.

How the LM block is made non-causal and position-free without touching the user's LM
-------------------------------------------------------------------------------------
In TransformerLens every block of a :class:`~transformer_lens.HookedTransformer` shares the
model's single ``cfg`` object, and the causal mask and rotary embedding are switched on by
``cfg.attention_dir`` / ``cfg.positional_embedding_type`` at forward time. Flipping those
fields (even temporarily) would therefore make the *whole* user LM bidirectional and
position-free while it is flipped; freezing shared parameters would set ``requires_grad=False``
on the user's LM; and registering shared blocks under a second :class:`HookedRootModule` would
rename the LM's hook points (``setup()`` writes ``HookPoint.name``) and share their hooks.

So :class:`ViTWithLMBlocks` builds, for each chosen LM block, a new instance of the very same
TransformerLens :class:`~transformer_lens.components.TransformerBlock` class from a *private
deep copy* of the LM config, loads the LM block's ``state_dict`` into it (bit-identical
weights and buffers, strict loading), and only then edits the private config:

* ``attention_dir = "bidirectional"`` (and the attention's ``_attention_dir_override``), so the
  causal mask is never applied;
* ``positional_embedding_type = "standard"`` when the LM used ``"rotary"``, ``"alibi"`` or
  ``"shortformer"``, so no rotary rotation / ALiBi bias is applied inside the block (for a
  GPT-2-style LM with learned absolute position embeddings nothing has to be done: those are
  added by the LM's embedding, which is not used here), and ``use_logn_attn = False``.

The user's LM is never mutated. The copy is frozen (``requires_grad=False``) and stays in eval
mode even when the wrapper is put in train mode. Its TransformerLens hook points fire as usual
and are reachable through the wrapper, which is itself a :class:`HookedRootModule`, e.g.
``wrapper.run_with_cache(images)`` returns ``lm_blocks.0.hook_resid_post`` and
``lm_blocks.0.attn.hook_pattern``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_multimodal._validate import check_int
from tl_multimodal._compat import HookedTransformer, TransformerBlock  # TL 4: stand-ins naming VisionBridge

try:  # TransformerLens >= 3.0 keeps it in its own module
    from transformer_lens.HookedRootModule import HookedRootModule
except ImportError:  # pragma: no cover - older TransformerLens
    from transformer_lens.hook_points import HookedRootModule  # type: ignore[attr-defined,no-redef]

__all__ = ["NORM_SITES", "ViTWithLMBlocks", "frozen_position_free_block", "mask_correlation", "norm_peakiness",
           "patch_coverage", "token_norm_map", "token_norm_maps"]

_POSITIONAL_TYPES_INSIDE_ATTENTION = ("rotary", "alibi", "shortformer")
_REQUIRED_VIT_ATTRIBUTES = ("patch_embed", "blocks", "norm", "forward_head", "num_prefix_tokens")


def frozen_position_free_block(block: TransformerBlock, block_index: int) -> TransformerBlock:
    """Make a frozen, non-causal, position-free copy of a TransformerLens block.

    The copy is a new :class:`TransformerBlock` built from a deep copy of ``block.cfg`` with
    the block's weights and buffers loaded strictly (so the weights are bit-identical). The
    copy's private config then gets ``attention_dir="bidirectional"`` and, for rotary / ALiBi /
    shortformer LMs, ``positional_embedding_type="standard"``. ``block`` and its config are
    left untouched.

    Args:
        block: A block of a :class:`HookedTransformer` (``lm.blocks[i]``).
        block_index: The index of ``block`` in its LM (used for per-layer options such as
            local-attention types and inverse-layer attention scaling).

    Returns:
        The frozen copy, in eval mode, on the device of ``block``.

    Raises:
        TypeError: If ``block`` is not a TransformerLens ``TransformerBlock``.
    """
    if not isinstance(block, TransformerBlock):
        raise TypeError(
            f"LM block {block_index} is a {type(block).__name__}, not a TransformerLens "
            "TransformerBlock; only decoder-style HookedTransformer blocks are supported."
        )
    private_cfg = copy.deepcopy(block.cfg)
    new_block = TransformerBlock(private_cfg, block_index)
    new_block.load_state_dict(block.state_dict(), strict=True)
    try:
        device = next(block.parameters()).device
    except StopIteration:  # pragma: no cover - a block always has parameters
        device = torch.device("cpu")
    new_block.to(device)

    # Only the private copy of the config is edited; the user's LM keeps its own cfg.
    private_cfg.attention_dir = "bidirectional"
    if private_cfg.positional_embedding_type in _POSITIONAL_TYPES_INSIDE_ATTENTION:
        private_cfg.positional_embedding_type = "standard"
        # These never fire / are never read once rotary is off: drop them so that the
        # copy does not advertise hooks (``attn.hook_rot_q``) that cannot fire.
        for name in ("hook_rot_q", "hook_rot_k", "rotary_sin", "rotary_cos", "hook_attn_input"):
            if hasattr(new_block.attn, name):
                delattr(new_block.attn, name)
    if getattr(private_cfg, "use_logn_attn", False):
        private_cfg.use_logn_attn = False
    if hasattr(new_block.attn, "_attention_dir_override"):
        new_block.attn._attention_dir_override = "bidirectional"

    for param in new_block.parameters():
        param.requires_grad_(False)
    new_block.eval()
    return new_block


def token_norm_map(
    tokens: Float[Tensor, "batch token d"],
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
) -> Float[Tensor, "batch grid_h grid_w"]:
    """L2 norm of each patch token, laid out on the patch grid.

    Args:
        tokens: Token activations (prefix tokens such as CLS first, then patches in raster order).
        num_prefix_tokens: How many leading non-patch tokens to drop.
        grid_size: ``(grid_h, grid_w)`` of the patch grid.

    Returns:
        The per-patch feature norms.

    Raises:
        ValueError: If the number of patch tokens does not match ``grid_size``.
    """
    patches = tokens[:, num_prefix_tokens:]
    grid_h, grid_w = grid_size
    if patches.shape[1] != grid_h * grid_w:
        raise ValueError(
            f"got {patches.shape[1]} patch tokens after dropping {num_prefix_tokens} prefix "
            f"tokens, but the grid {grid_h}x{grid_w} needs {grid_h * grid_w}"
        )
    return patches.norm(dim=-1).reshape(tokens.shape[0], grid_h, grid_w)


def _normalise_indices(block_indices: Union[int, Sequence[int], None], n_layers: int) -> list[int]:
    if block_indices is None:
        return [n_layers - 1]
    if isinstance(block_indices, bool) or not isinstance(block_indices, (int, Sequence)):
        raise TypeError(
            f"block_indices must be an int or a sequence of ints, got {block_indices!r}"
        )
    raw = [block_indices] if isinstance(block_indices, int) else list(block_indices)
    if not raw:
        raise ValueError("block_indices is empty: give at least one LM block index")
    out = []
    for i, index in enumerate(raw):
        check_int(index, f"block_indices[{i}]", minimum=None)
        if not -n_layers <= index < n_layers:
            raise IndexError(
                f"LM block index {index} is out of range for an LM with {n_layers} blocks "
                f"(valid: {-n_layers}..{n_layers - 1})"
            )
        out.append(index % n_layers)
    return out


class ViTWithLMBlocks(HookedRootModule):
    """A timm ViT with frozen LM transformer block(s) inserted before its final norm.

    Forward pass (``tokens`` include the ViT's prefix tokens, e.g. CLS)::

        x = vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images)))))
        x = proj_out(lm_blocks(proj_in(x)))          # skipped when baseline=True
        logits = vit.forward_head(vit.norm(x))

    Hook points of the wrapper (besides every hook of the inserted blocks, named
    ``lm_blocks.{k}.<TransformerLens hook name>`` for the k-th inserted block):

    * ``hook_vit_out``: ``[batch, token, d_vit]`` ViT tokens after the last ViT block.
    * ``hook_lm_in``: ``[batch, token, d_lm]`` after ``proj_in`` (not in the baseline).
    * ``hook_lm_out``: ``[batch, token, d_lm]`` after the last inserted block (not in the baseline).
    * ``hook_features``: ``[batch, token, d_vit]`` what enters the ViT's final norm.

    Attributes:
        vit: The wrapped timm ViT (trainable).
        proj_in: ``Linear(d_vit, d_lm)`` (``None`` for the baseline).
        proj_out: ``Linear(d_lm, d_vit)`` (``None`` for the baseline).
        lm_blocks: The frozen, non-causal, position-free block copies (empty for the baseline).
        lm_block_indices: The LM layer index each entry of ``lm_blocks`` was copied from.
        baseline: Whether this is the plain ViT (no LM block).
        d_vit: ViT width.
        d_lm: LM width (``None`` for the baseline).
    """

    def __init__(
        self,
        vit: nn.Module,
        lm: Optional[HookedTransformer] = None,
        block_indices: Union[int, Sequence[int], None] = None,
        *,
        baseline: bool = False,
        proj_bias: bool = False,
        proj_in: Optional[nn.Linear] = None,
        proj_out: Optional[nn.Linear] = None,
    ) -> None:
        """Build the wrapper.

        Args:
            vit: A timm VisionTransformer-like model with ``patch_embed``, ``blocks``, ``norm``,
                ``forward_head`` and ``num_prefix_tokens`` (e.g.
                ``timm.create_model("vit_tiny_patch16_224", ...)``). It is used (and trained)
                in place, not copied.
            lm: The TransformerLens LM that provides the frozen blocks. Not modified: its blocks
                are copied (see the module docstring). May be ``None`` only if ``baseline``.
            block_indices: LM block index or indices to insert, in order; negative indices
                count from the end. Defaults to the last block (as in the paper).
            baseline: If True, build the plain ViT (no projections, no LM block) for comparison.
            proj_bias: Whether the default projections have a bias (the paper's do not).
            proj_in: Optional ``Linear(d_vit, d_lm)`` to use instead of a fresh one.
            proj_out: Optional ``Linear(d_lm, d_vit)`` to use instead of a fresh one.

        Raises:
            TypeError: If ``vit`` lacks the needed ViT attributes, ``lm`` is not a
                HookedTransformer, or a block index is not an int.
            ValueError: If widths do not match (ViT norm vs ViT width, custom projections vs
                ViT/LM widths), ``lm`` is missing, or ``block_indices`` is empty.
            IndexError: If a block index is out of range.
        """
        super().__init__()
        missing = [name for name in _REQUIRED_VIT_ATTRIBUTES if not hasattr(vit, name)]
        if missing:
            raise TypeError(
                f"vit must be a timm VisionTransformer-like model; {type(vit).__name__} lacks "
                f"{', '.join(missing)}"
            )
        d_vit = getattr(vit, "embed_dim", None) or getattr(vit, "num_features", None)
        if not isinstance(d_vit, int):
            raise TypeError("cannot read the ViT width: vit has neither embed_dim nor num_features")
        norm_shape = getattr(vit.norm, "normalized_shape", None)
        if norm_shape is not None and tuple(norm_shape) != (d_vit,):
            raise ValueError(
                f"the ViT's final norm expects width {tuple(norm_shape)}, but its embed_dim is {d_vit}"
            )

        self.vit = vit
        self.baseline = bool(baseline)
        self.d_vit: int = d_vit
        self.d_lm: Optional[int] = None
        self.lm_block_indices: list[int] = []
        self.lm_blocks = nn.ModuleList()
        self.proj_in: Optional[nn.Linear] = None
        self.proj_out: Optional[nn.Linear] = None

        if self.baseline:
            if proj_in is not None or proj_out is not None:
                raise ValueError("baseline=True has no projections; do not pass proj_in/proj_out")
        else:
            if lm is None:
                raise ValueError("an LM (HookedTransformer) is required unless baseline=True")
            if not isinstance(lm, HookedTransformer):
                raise TypeError(f"lm must be a transformer_lens.HookedTransformer, got {type(lm).__name__}")
            d_lm = int(lm.cfg.d_model)
            self.d_lm = d_lm
            self.lm_block_indices = _normalise_indices(block_indices, len(lm.blocks))
            for index in self.lm_block_indices:
                block = frozen_position_free_block(lm.blocks[index], index)
                if block.cfg.d_model != d_lm:  # pragma: no cover - defensive
                    raise ValueError(f"LM block {index} has width {block.cfg.d_model}, LM has {d_lm}")
                self.lm_blocks.append(block)

            if proj_in is None:
                proj_in = nn.Linear(d_vit, d_lm, bias=proj_bias)
            if proj_out is None:
                proj_out = nn.Linear(d_lm, d_vit, bias=proj_bias)
            for name, layer, want_in, want_out, what in (
                ("proj_in", proj_in, d_vit, d_lm, "ViT width -> LM width"),
                ("proj_out", proj_out, d_lm, d_vit, "LM width -> ViT width"),
            ):
                got = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
                if got != (want_in, want_out):
                    raise ValueError(
                        f"{name} maps {got[0]} -> {got[1]}, but it must map {what}: "
                        f"{want_in} -> {want_out} (ViT embed_dim={d_vit}, LM d_model={d_lm})"
                    )
            device = next(vit.parameters()).device
            self.proj_in = proj_in.to(device)
            self.proj_out = proj_out.to(device)

        self.hook_vit_out = HookPoint()  # [batch, token, d_vit]
        self.hook_lm_in = HookPoint()  # [batch, token, d_lm]
        self.hook_lm_out = HookPoint()  # [batch, token, d_lm]
        self.hook_features = HookPoint()  # [batch, token, d_vit]
        self.setup()

    # ------------------------------------------------------------------ properties
    @property
    def num_prefix_tokens(self) -> int:
        """Number of non-patch tokens (CLS, registers) in front of the patch tokens."""
        return int(self.vit.num_prefix_tokens)

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(grid_h, grid_w)`` of the ViT patch grid."""
        grid = self.vit.patch_embed.grid_size
        return int(grid[0]), int(grid[1])

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Yield the parameters that train (ViT and projections; never the LM blocks)."""
        return (p for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> "ViTWithLMBlocks":
        """Set train/eval mode; the frozen LM blocks always stay in eval mode."""
        super().train(mode)
        for block in self.lm_blocks:
            block.eval()
        return self

    # ------------------------------------------------------------------ forward pieces
    def vit_tokens(self, images: Float[Tensor, "batch channel height width"]) -> Float[Tensor, "batch token d_vit"]:
        """Run the ViT up to and including its last block (before the final norm).

        Args:
            images: Input images.

        Returns:
            ViT tokens (prefix tokens first, then patches).
        """
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        if hasattr(vit, "patch_drop"):
            x = vit.patch_drop(x)
        if hasattr(vit, "norm_pre"):
            x = vit.norm_pre(x)
        x = vit.blocks(x)
        return self.hook_vit_out(x)

    def apply_lm_blocks(self, tokens: Float[Tensor, "batch token d_vit"]) -> Float[Tensor, "batch token d_vit"]:
        """Project ViT tokens into the LM, run the frozen blocks, and project back.

        Identity for the baseline. Every token (prefix and patch) goes through the blocks, which
        are non-causal and get no positional information.

        Args:
            tokens: ViT tokens.

        Returns:
            Tokens after ``proj_out`` (the input of the ViT's final norm).

        Raises:
            ValueError: If ``tokens`` does not have the ViT width.
        """
        if tokens.shape[-1] != self.d_vit:
            raise ValueError(f"expected tokens of width d_vit={self.d_vit}, got {tokens.shape[-1]}")
        if self.baseline:
            return tokens
        assert self.proj_in is not None and self.proj_out is not None
        x = self.hook_lm_in(self.proj_in(tokens))
        out_dtype = x.dtype
        for block in self.lm_blocks:
            x = block(x.to(block.cfg.dtype))
        x = self.hook_lm_out(x)
        return self.proj_out(x.to(out_dtype))

    def forward_features(
        self, images: Float[Tensor, "batch channel height width"]
    ) -> Float[Tensor, "batch token d_vit"]:
        """Tokens after the (optional) LM stage and the ViT's final norm.

        Args:
            images: Input images.

        Returns:
            Normalised tokens, as timm's ``forward_features`` returns them.
        """
        x = self.apply_lm_blocks(self.vit_tokens(images))
        return self.vit.norm(self.hook_features(x))

    def forward(self, images: Float[Tensor, "batch channel height width"]) -> Float[Tensor, "batch n_classes"]:
        """Classify images.

        Args:
            images: Input images.

        Returns:
            The ViT head's logits.
        """
        return self.vit.forward_head(self.forward_features(images))

    def extra_repr(self) -> str:
        if self.baseline:
            return f"baseline=True, d_vit={self.d_vit}"
        return f"d_vit={self.d_vit}, d_lm={self.d_lm}, lm_block_indices={self.lm_block_indices}"


# ------------------------------------------------------------------ information-filtering measures
#: Where :func:`token_norm_maps` reads token norms: site name -> hook (``lm_update`` is
#: ``resid_post - resid_pre`` of the first inserted block, what the frozen block itself writes).
NORM_SITES = {
    "vit_out": "hook_vit_out",
    "lm_in": "lm_blocks.0.hook_resid_pre",
    "lm_out": "lm_blocks.0.hook_resid_post",
    "lm_update": None,
    "features": "hook_features",
}


@torch.no_grad()
def token_norm_maps(model: ViTWithLMBlocks, images: Float[Tensor, "batch channel height width"],
                    batch_size: int = 256) -> dict[str, Float[Tensor, "batch grid_h grid_w"]]:
    """Per-patch token-norm maps at each :data:`NORM_SITES` site the model has (the model is put in eval mode).

    The baseline has ``vit_out`` and ``features``; with LM blocks also ``lm_in``, ``lm_out`` and ``lm_update``.

    Args:
        model: The ViT with (or without) frozen LM blocks.
        images: Normalised images.
        batch_size: Images per forward pass.
    """
    if not isinstance(model, ViTWithLMBlocks):
        raise TypeError(f"model must be a ViTWithLMBlocks, got {type(model).__name__}")
    model.eval()
    names = {n for n in NORM_SITES.values() if n is not None}
    out: dict[str, list[Tensor]] = {}
    for i in range(0, len(images), batch_size):
        _, cache = model.run_with_cache(images[i:i + batch_size], names_filter=lambda n: n in names)
        for key, hook in NORM_SITES.items():
            if key == "lm_update":
                if model.baseline:
                    continue
                t = cache["lm_blocks.0.hook_resid_post"] - cache["lm_blocks.0.hook_resid_pre"]
            elif hook in cache:
                t = cache[hook]
            else:
                continue
            out.setdefault(key, []).append(token_norm_map(t, model.num_prefix_tokens, model.grid_size))
    return {k: torch.cat(v) for k, v in out.items()}


def patch_coverage(mask: Float[Tensor, "... height width"], patch_size: int) -> Float[Tensor, "... grid_h grid_w"]:
    """Fraction of each ``patch_size`` x ``patch_size`` patch that the (soft) mask covers.

    Raises:
        ValueError: If the mask's sides are not multiples of ``patch_size``.
    """
    h, w = mask.shape[-2:]
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"mask of {h}x{w} pixels does not tile into patches of {patch_size}")
    flat = mask.float().reshape(-1, 1, h, w)
    return F.avg_pool2d(flat, patch_size).reshape(*mask.shape[:-2], h // patch_size, w // patch_size)


def mask_correlation(maps: Float[Tensor, "batch grid_h grid_w"], cover: Float[Tensor, "batch grid_h grid_w"]) -> float:
    """Mean over images of the Pearson correlation (over patches) of a norm map with the mask coverage.

    Images where either map is constant are skipped (NaN if all are).

    Raises:
        ValueError: If the shapes differ.
    """
    if maps.shape != cover.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and cover {tuple(cover.shape)} differ in shape")
    a = maps.flatten(1) - maps.flatten(1).mean(1, keepdim=True)
    b = cover.flatten(1) - cover.flatten(1).mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    ok = denom > 1e-8
    return float(((a * b).sum(1)[ok] / denom[ok]).mean())


def norm_peakiness(maps: Float[Tensor, "batch grid_h grid_w"]) -> float:
    """Mean over images of max / mean patch norm: how concentrated each norm map is."""
    flat = maps.flatten(1)
    return float((flat.max(1).values / flat.mean(1).clamp_min(1e-8)).mean())
