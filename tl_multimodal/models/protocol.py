"""What the analyses need from a vision-language model: the ``VisionLM`` protocol, and the one door.

Every analysis module types its ``model`` argument as :class:`VisionLM` and uses only what the
protocol lists, so any backend that implements it (``HookedVisionPrefix`` on a
``HookedTransformer``, ``VisionBridge`` on a ``TransformerBridge``) runs every analysis. No analysis
module imports a model class.

:func:`soft_prompts` is how every public analysis entry takes its images: it normalises them once
(``model.preprocess``: PIL, paths, arrays, pixel tensors), encodes them once
(``model.embed_images``), and returns the soft prompts that all of the entry's passes then reuse
(``model(tokens, image_embed=emb)``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from tl_multimodal._validate import exactly_one

from jaxtyping import Bool, Float, Int
from torch import Tensor


@runtime_checkable
class VisionLM(Protocol):
    """A TransformerLens-style LM reading images as soft-prompt tokens at image-slot positions.

    Attributes:
        cfg: The TransformerLens config (``n_layers``, ``d_mlp``, ``d_vocab``, ``n_ctx``, ``device``).
        tokenizer: The HF tokenizer.
        W_U: ``[d_model, d_vocab]`` unembedding.
        unembed, ln_final: The unembedding and final-norm modules.
        blocks: The transformer blocks (``blocks[l].mlp.W_out``: the units' output rows).
        hook_dict: Hook names -> HookPoints, with TransformerLens's names
            (``blocks.{l}.mlp.hook_pre``/``hook_post``/``hook_pre_linear``, ``blocks.{l}.hook_resid_post``);
            a hook may run under another name (a bridge alias): key results by the name asked for.
        vision: The encoder, with ``grid`` ``(rows, cols)``, ``data_config``, ``input_size``.
        n_image_tokens: Image slots per image.
        image_token_id: The id marking an image slot.
        grad_through_kv_cache: Whether ``attribute`` differentiates through the captioning steps' KV cache
            (one pass: caption and attribution together); ``False``: it captions without gradients and
            attributes the caption in one more forward (for a backend where a differentiated cached step
            keeps much more than its activations).
    """

    cfg: Any
    tokenizer: Any
    vision: Any
    n_image_tokens: int
    image_token_id: int
    grad_through_kv_cache: bool
    hook_dict: dict
    blocks: Any
    unembed: Any
    ln_final: Any

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]: ...

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]: ...

    def image_mask(self, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]: ...

    def to_tokens(self, input, *args, image: bool = False, **kwargs) -> Int[Tensor, "batch pos"]: ...

    def to_str_tokens(self, input, *args, **kwargs) -> list: ...

    def preprocess(self, images) -> Float[Tensor, "batch channel height width"]: ...

    def embed_images(self, images=None, image_features=None) -> Float[Tensor, "batch patch d_model"]: ...

    def bind_images(self, images=None, image_features=None, image_embed=None): ...

    def __call__(self, input, *args, **kwargs): ...

    def run_with_hooks(self, *args, **kwargs): ...

    def run_with_cache(self, *args, **kwargs): ...

    def generate(self, input="", max_new_tokens: int = 10, *args, **kwargs): ...

    def caption(self, images, prompt: str = "A picture of", max_new_tokens: int = 20, **kwargs) -> list[str]: ...

    def kv_cache(self, batch: int) -> Any | None:
        """A fresh KV cache that ``forward``/``run_with_hooks`` take as ``past_kv_cache=`` (gradients
        flow through it), or None where the backend has none (each step then runs the whole sequence)."""


def soft_prompts(model: VisionLM, images=None, image_features: Float[Tensor, "batch patch d_img"] | None = None,
                 image_embed: Float[Tensor, "batch patch d_model"] | None = None,
                 ) -> Float[Tensor, "batch patch d_model"]:
    """The soft prompts of one image batch, made once: from images, encoder features, or given.

    Args:
        model: The vision LM.
        images: Anything ``model.preprocess`` takes (PIL, paths, arrays, pixel tensors, lists).
        image_features: Encoder features ``[batch, patch, d_img]`` instead of images.
        image_embed: Soft prompts already made by ``model.embed_images`` (returned as they are, checked).

    Returns:
        ``[batch, n_image_tokens, d_model]``, without gradient (analyses take gradients of activations).
    """
    exactly_one(images=images, image_features=image_features, image_embed=image_embed)
    with torch.no_grad():
        if image_embed is None:
            emb = model.embed_images(images) if images is not None else \
                model.embed_images(image_features=image_features)
        else:
            emb = image_embed
    want = (model.n_image_tokens, model.cfg.d_model)
    if not isinstance(emb, Tensor) or emb.ndim != 3 or tuple(emb.shape[1:]) != want:
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"image_embed must be [batch, {want[0]}, {want[1]}] (model.embed_images(...)), got {shape}")
    if emb.shape[0] == 0:
        raise ValueError("no images given (a batch of 0)")
    return emb.detach()
