"""VLMBridge: a whole Hugging Face VLM (LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Gemma 3, Idefics3) on
TransformerLens's own ``TransformerBridge`` adapter, taking the HF processor's batch as it is.

Unlike :class:`~tl_multimodal.models.bridge.VisionBridge` (this package's encoder and projection put soft
prompts into any LM), here the HF model computes its own image tokens (anyres tiles, dynamic resolution,
pan-and-scan crops, pixel shuffle) and the bridge gives TransformerLens's hooks on its language model:

    model = VLMBridge(TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok), processor)
    batch = processor(text=[prompt], images=[image], return_tensors="pt")
    logits = model(**batch)                                   # HF's logits
    logits, cache = model.run_with_cache(**batch, names_filter="blocks.0.mlp.hook_post")
    cache["blocks.0.mlp.hook_post"][model.image_mask(batch["input_ids"])]   # [n_image_tokens, d_mlp]
    geometry = model.image_geometry([image.size])             # each image token's box in the image

Like ``VisionBridge``, ``VLMBridge(bridge, processor)`` turns the booted bridge into one in place (its
class is reassigned; no weight is copied) and returns it, so every TransformerLens tool gets the bridge.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from tl_multimodal._validate import check_int
from tl_multimodal.models.vlm_geometry import MODEL_TYPES, ImageTokenGeometry, image_token_geometry


class VLMBridge(TransformerBridge):
    """A HF VLM on ``TransformerBridge``: ``model(**processor_batch)`` gives HF's logits.

    Args:
        bridge: ``TransformerBridge.boot_transformers(..., hf_model=vlm)`` of one of :data:`MODEL_TYPES`.
        processor: The model's HF processor (or ``None``: token ids and pixel tensors only; then
            ``image_processor`` gives the geometry).
        image_processor: The image processor (default: ``processor.image_processor``).
        image_token_id: The image placeholder's id (default: the config's ``image_token_id``/``image_token_index``).

    Attributes:
        hf_model: The HF model the bridge runs (for its config and its own rearrangement code).
        processor, image_processor: As given.
        image_token_id: The id of every image position in ``input_ids``.

    Raises:
        TypeError: ``bridge`` is not a ``TransformerBridge``.
        ValueError: An architecture without image-token geometry, or a bad ``image_token_id``.
    """

    def __new__(cls, bridge=None, processor=None, **kwargs):
        if bridge is None:  # copy.deepcopy and pickle make an empty instance, then fill its __dict__
            return super().__new__(cls)
        if not isinstance(bridge, TransformerBridge):
            raise TypeError(f"bridge must be a transformer_lens TransformerBridge, got {type(bridge).__name__}")
        if isinstance(bridge, VLMBridge):
            raise ValueError("this bridge is already a VLMBridge; boot a fresh TransformerBridge")
        kind = bridge.original_model.config.model_type
        if kind not in MODEL_TYPES:
            raise ValueError(f"VLMBridge takes model types {', '.join(MODEL_TYPES)}; got {kind!r}")
        bridge.__class__ = cls if type(bridge) is TransformerBridge else _vlm_class(type(bridge))
        return bridge

    def __init__(self, bridge, processor=None, *, image_processor=None, image_token_id: int | None = None):
        config = self.original_model.config
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_id", None)
            image_token_id = getattr(config, "image_token_index", None) if image_token_id is None else image_token_id
        check_int(image_token_id, "image_token_id", minimum=0, maximum=self.cfg.d_vocab - 1)
        self.__dict__["processor"] = processor
        self.__dict__["image_processor"] = image_processor or getattr(processor, "image_processor", None)
        self.__dict__["image_token_id"] = int(image_token_id)
        self.eval()

    @property
    def hf_model(self):
        """The HF VLM the bridge runs."""
        return self.original_model

    def image_mask(self, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        """True at the image positions of ``tokens`` (the image placeholder id)."""
        return tokens == self.image_token_id

    def image_geometry(self, image_sizes, **processor_kwargs) -> ImageTokenGeometry:
        """Each image token's image, view and box in original pixels, for images of ``image_sizes``
        (``(width, height)`` each, in batch order) prepared with ``processor_kwargs`` (as the batch was).

        Raises:
            ValueError: No image processor was given, or bad sizes.
        """
        if self.image_processor is None:
            raise ValueError("image_geometry needs the model's image processor (load it with processor=)")
        return image_token_geometry(self.hf_model, self.image_processor, image_sizes, **processor_kwargs)

    # ---------------------------------------------------------------- the processor's batch as it is
    def forward(self, input=None, *args, input_ids: Tensor | None = None, **kwargs):
        """The bridge's ``forward``; also takes the batch's ``input_ids=`` (so ``model(**batch)`` works)."""
        return super().forward(_input(input, input_ids), *args, **kwargs)

    def run_with_cache(self, input=None, *args, input_ids: Tensor | None = None, **kwargs):
        """The bridge's ``run_with_cache``; also takes ``input_ids=`` (``model.run_with_cache(**batch)``)."""
        return super().run_with_cache(_input(input, input_ids), *args, **kwargs)

    def run_with_hooks(self, input=None, *args, input_ids: Tensor | None = None, **kwargs):
        """The bridge's ``run_with_hooks``; also takes ``input_ids=`` (``model.run_with_hooks(**batch, fwd_hooks=...)``)."""
        return super().run_with_hooks(_input(input, input_ids), *args, **kwargs)


def _input(input: Any, input_ids: Tensor | None) -> Any:
    if (input is None) == (input_ids is None):
        raise TypeError("give the tokens once: as the first argument or as input_ids=")
    return input_ids if input is None else input


_VLM_CLASSES: dict[type, type] = {}


def _vlm_class(base: type) -> type:
    """:class:`VLMBridge` on top of ``base``, a subclass of ``TransformerBridge`` (made once per subclass)."""
    if base not in _VLM_CLASSES:
        _VLM_CLASSES[base] = type(f"VLMBridge[{base.__name__}]", (VLMBridge, base), {"__module__": __name__})
    return _VLM_CLASSES[base]
