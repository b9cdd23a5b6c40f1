"""LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Gemma 3 and Idefics3 (SmolVLM) on TransformerLens's own bridge
adapters, as a :class:`~tl_multimodal.models.vlm.VLMBridge` that takes the HF processor's batch as it is.

    model = tl_multimodal.load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")      # hub (needs internet)
    model = tl_multimodal.load(hf_model, processor=processor)                   # in memory
    batch = model.processor(text=[prompt], images=[image], return_tensors="pt")
    model(**batch)                                                              # HF's logits

What TransformerLens 4.3's adapters need that an in-memory model does not bring, done here (no fork):

* ``config.architectures``: the bridge picks its adapter by it; a model built from a config has none,
  so it is set to the model's class name;
* a tokenizer: without ``tokenizer=`` ``boot_transformers`` fetches one from the hub by name;
  the processor's tokenizer is passed.
"""

from __future__ import annotations

from tl_multimodal.models.vlm import VLMBridge
from tl_multimodal.models.vlm_geometry import MODEL_TYPES

# Hub names load() sends here (lower case substrings), checked before LLaVA-1.5's "llava".
HUB_NAME_MARKS = ("llava-v1.6", "llava-next", "onevision", "qwen2.5-vl", "qwen2_5_vl", "gemma-3", "smolvlm",
                  "idefics3")


def is_vlm_name(name: str) -> bool:
    """Whether a hub name is one of this module's architectures (by the marks of :data:`HUB_NAME_MARKS`)."""
    return any(mark in name.lower() for mark in HUB_NAME_MARKS)


def is_vlm_model(model) -> bool:
    """Whether an in-memory HF model is one of this module's architectures."""
    import transformers

    return isinstance(model, transformers.PreTrainedModel) and model.config.model_type in MODEL_TYPES


def vlm_bridge(model_or_name, processor=None, tokenizer=None, **hf_kwargs) -> VLMBridge:
    """A HF VLM of :data:`~tl_multimodal.models.vlm_geometry.MODEL_TYPES` on TransformerLens's bridge.

    Args:
        model_or_name: A loaded HF model (used in place: the bridge wraps it) or a hub name (needs
            internet; loaded with ``AutoModelForImageTextToText`` and ``AutoProcessor``).
        processor: The model's HF processor (a hub name brings its own). ``None`` for an in-memory
            model means token ids and pixel tensors only, and needs ``tokenizer=``.
        tokenizer: The tokenizer (default: the processor's).
        **hf_kwargs: Passed to ``from_pretrained`` for a hub name (``dtype``, ``device_map``, ...).

    Returns:
        The model in eval mode: ``model(**batch)`` gives HF's logits.

    Raises:
        ValueError: An in-memory model without processor or tokenizer, or kwargs with one.
        TypeError: An in-memory model of another architecture.
    """
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model_or_name, str):
        name = model_or_name
        processor = processor or transformers.AutoProcessor.from_pretrained(name)
        hf = transformers.AutoModelForImageTextToText.from_pretrained(name, **hf_kwargs)
    else:
        hf, name = model_or_name, getattr(model_or_name.config, "_name_or_path", "") or "vlm"
        if hf_kwargs:
            raise ValueError(f"an in-memory model takes no loading options ({', '.join(hf_kwargs)})")
        if not is_vlm_model(hf):
            raise TypeError(f"expected a HF VLM of model type {', '.join(MODEL_TYPES)}, got {type(hf).__name__}")
    tokenizer = tokenizer or getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("an in-memory VLM needs processor= or tokenizer= (else the bridge fetches one by name)")
    if not hf.config.architectures:  # an in-memory model has none; the bridge picks its adapter by it
        hf.config.architectures = [type(hf).__name__]
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer)
    return VLMBridge(bridge, processor)
