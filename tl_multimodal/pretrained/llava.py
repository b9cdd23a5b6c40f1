"""LLaVA-family VLMs as a HookedVisionPrefix: a HF ``LlavaForConditionalGeneration`` converted.

The parts map one to one:

* language model (Llama/Vicuna) -> a ``HookedTransformer`` through TransformerLens's own weight
  conversion (``convert_llama_weights``), unprocessed, so logits equal HF's;
* vision tower (CLIP/SigLIP) -> :class:`~tl_multimodal.models.encoders.HFVisionEncoder` at the config's
  ``vision_feature_layer`` (LLaVA-1.5: ``-2``), CLS dropped (``vision_feature_select_strategy="default"``);
* ``multi_modal_projector`` -> an ``"mlp"`` :class:`~tl_multimodal.models.projection.ImageProjection`;
* the image token -> ``model.image_token_id``: each placeholder in a prompt (``"USER: <image>\\n..."``)
  stands for ``n_image_tokens`` image positions, as in HF's processor.

    model = tl_multimodal.load("llava-hf/llava-1.5-7b-hf", dtype=torch.float16)  # or a loaded HF model
    logits = model("USER: <image>\\nWhat is shown? ASSISTANT:", images=pil_image)
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from tl_multimodal._compat import HookedTransformer, HookedTransformerConfig, require_hooked_transformer
from tl_multimodal.models.bridge import VisionBridge
from tl_multimodal.models.encoders import HFVisionEncoder
from tl_multimodal.models.projection import ImageProjection, ProjectionInfo


def _llama_cfg(text_config, name: str, dtype: torch.dtype, device: torch.device) -> HookedTransformerConfig:
    """TransformerLens's config for a HF Llama config (as its ``LlamaForCausalLM`` branch builds it)."""
    from transformer_lens.loading_from_pretrained import _apply_llama3_rope_scaling, _get_rope_theta

    d_head = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    n_kv = text_config.num_key_value_heads
    cfg = dict(
        d_model=text_config.hidden_size, d_head=d_head, n_heads=text_config.num_attention_heads,
        d_mlp=text_config.intermediate_size, n_layers=text_config.num_hidden_layers,
        n_ctx=text_config.max_position_embeddings, eps=text_config.rms_norm_eps, d_vocab=text_config.vocab_size,
        act_fn=text_config.hidden_act, n_key_value_heads=n_kv if n_kv != text_config.num_attention_heads else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, rotary_base=_get_rope_theta(text_config), final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", model_name=name, init_weights=False, dtype=dtype,
        device=str(device),
    )
    _apply_llama3_rope_scaling(cfg, text_config)
    return HookedTransformerConfig(**cfg)


def _check_supported(config, text: bool = True) -> None:
    """Name what this module cannot take from a LLaVA config (``text``: also the text model's kind)."""
    problems = []
    if text and config.text_config.model_type != "llama":
        problems.append(f"text model {config.text_config.model_type!r} (only 'llama' is converted)")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer {config.vision_feature_layer!r} (only one layer)")
    if config.vision_feature_select_strategy != "default":
        problems.append(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} (only 'default')")
    if config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act {config.projector_hidden_act!r} (only 'gelu')")
    if not getattr(config, "multimodal_projector_bias", True):
        problems.append("a projector without bias")
    if problems:
        raise ValueError("cannot convert this LLaVA model: " + "; ".join(problems))


def from_llava(model_or_name, image_processor=None, tokenizer=None, **hf_kwargs):
    """Convert a HF ``LlavaForConditionalGeneration`` into a :class:`~tl_multimodal.HookedVisionPrefix`.

    Args:
        model_or_name: A loaded ``LlavaForConditionalGeneration``, or a hub name (e.g.
            ``"llava-hf/llava-1.5-7b-hf"``), loaded with its processor.
        image_processor: The model's HF image processor (default: the name's; for a loaded model,
            the vision tower's default processor at its image size).
        tokenizer: The model's tokenizer (default: the name's; ``None`` for a loaded model means
            token-tensor input only: ``forward`` and ``generate`` take token ids, ``generate`` with
            ``eos_token_id=`` or ``stop_at_eos=False``; text methods raise a ``ValueError``).
        **hf_kwargs: Passed to ``from_pretrained`` when a name is given (``dtype``, ``revision``, ...).

    The converted model holds its own copy of the weights (the HF model may be deleted after), and
    briefly a second copy of the LM while it is built: for LLaVA-1.5-7B in float16 plan for about
    3 x 14 GB. It is built on the device and in the dtype of the HF model's language model (e.g.
    ``hf_kwargs``: ``dtype=torch.float16, device_map="cuda"``); the vision tower is shared, not copied.

    Returns:
        The model in eval mode: ``model(input_ids, images=pixel_values)`` gives HF's logits, with
        ``input_ids`` holding ``n_image_tokens`` image tokens per image, as HF's processor makes them.

    Raises:
        ValueError: A text model other than Llama, several feature layers, the ``"full"`` feature
            strategy, or a projector other than Linear-GELU-Linear with bias.
    """
    from tl_multimodal.models.prefix import HookedVisionPrefix

    require_hooked_transformer("from_llava")
    hf, name, image_processor, tokenizer = load_llava(model_or_name, image_processor, tokenizer, **hf_kwargs)
    config = hf.config
    _check_supported(config)
    inner = hf.model
    embed = inner.language_model.embed_tokens.weight

    cfg = _llama_cfg(config.text_config, name.split("/")[-1], embed.dtype, embed.device)
    lm = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    torch.nn.Module.to(lm, embed.device)  # (TransformerLens's .to prints)
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    state = convert_llama_weights(SimpleNamespace(model=inner.language_model, lm_head=hf.lm_head), cfg)
    lm.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    encoder, projection, image_token = llava_vision(hf, name, image_processor, cfg.model_name)
    model = HookedVisionPrefix(lm, encoder, projection, image_token_id=image_token)
    return model.eval()


def load_llava(model_or_name, image_processor=None, tokenizer=None, **hf_kwargs):
    """``(hf_model, name, image_processor, tokenizer)`` of a loaded ``LlavaForConditionalGeneration``
    or a hub name (loaded with its processor, whose parts fill in what is not given)."""
    import transformers

    if isinstance(model_or_name, str):
        processor = transformers.AutoProcessor.from_pretrained(model_or_name)
        image_processor = image_processor or processor.image_processor
        tokenizer = tokenizer or processor.tokenizer
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(model_or_name, **hf_kwargs)
        name = model_or_name
    else:
        hf = model_or_name
        name = getattr(hf.config, "_name_or_path", "") or "llava"
    if not isinstance(hf, transformers.LlavaForConditionalGeneration):
        raise TypeError(f"expected a LlavaForConditionalGeneration, got {type(hf).__name__}")
    return hf, name, image_processor, tokenizer


def llava_vision(hf, name: str, image_processor, lm_name: str, copy_tower: bool = False,
                 ) -> tuple[HFVisionEncoder, ImageProjection, int]:
    """The vision side of a HF ``LlavaForConditionalGeneration`` as this package's parts.

    Args:
        hf: The LLaVA model (its vision tower is shared, not copied; read it before a bridge wraps it).
        name: The model's name, for the parts' records.
        image_processor: The vision tower's HF image processor (None: its default at its image size).
        lm_name: The language model's name as the model records it (``cfg.model_name``).
        copy_tower: Give the encoder its own copy of the vision tower (a ``TransformerBridge`` rewires
            the HF model's modules in place, its vision tower's too).

    Returns:
        ``(encoder, projection, image_token_id)``: the vision tower at ``vision_feature_layer``, the
        ``multi_modal_projector`` as an ``"mlp"`` projection, and the image placeholder's id.
    """
    config, inner = hf.config, hf.model
    _check_supported(config, text=False)
    tower = copy.deepcopy(inner.vision_tower) if copy_tower else inner.vision_tower
    encoder = HFVisionEncoder(tower, feature_layer=config.vision_feature_layer,
                              image_processor=image_processor, name=f"{name}:vision_tower")
    info = ProjectionInfo(encoder=encoder.model_name, d_img=encoder.d_img, grid=encoder.grid, lm=lm_name,
                          d_model=config.text_config.hidden_size, kind="mlp",
                          training={"source": f"{name} multi_modal_projector"})
    projection = ImageProjection(info, dropout=0.0).to(inner.multi_modal_projector.linear_1.weight.dtype)
    projection.load_weights(inner.multi_modal_projector.state_dict(), f"{name} multi_modal_projector")
    image_token = getattr(config, "image_token_id", None)
    return encoder, projection, config.image_token_index if image_token is None else image_token


def llava_bridge(model_or_name, image_processor=None, tokenizer=None, **hf_kwargs) -> VisionBridge:
    """A HF ``LlavaForConditionalGeneration`` on TransformerLens's own LLaVA bridge adapter.

    The bridge runs the whole HF model (``TransformerBridge.boot_transformers``; its blocks are the
    language model's). The image side is the model's own vision tower and projector as this
    package's encoder and ``"mlp"`` projection (:func:`~tl_multimodal.pretrained.llava.llava_vision`), so images
    become soft prompts at the image placeholder's positions (``image_token_id`` in the tokens,
    as HF's processor expands them; a prompt holding ``<image>`` is expanded the same way) through
    ``hook_image_features`` / ``hook_image_embed``, and every analysis knows where they are. The
    encoder keeps its own copy of the vision tower (the bridge rewires the HF modules in place).

    Args:
        model_or_name: A loaded ``LlavaForConditionalGeneration`` (used in place: the bridge wraps
            it), or a hub name (needs internet).
        image_processor, tokenizer: As for :func:`~tl_multimodal.pretrained.llava.from_llava`, but a
            loaded model needs its tokenizer here (the bridge has no token-ids-only mode).
        **hf_kwargs: Passed to ``from_pretrained`` when a name is given.

    Returns:
        The model in eval mode: ``model(input_ids, images=pixel_values)`` gives HF's logits.

    Raises:
        ValueError: A loaded model without ``tokenizer`` (nothing is fetched from the hub).
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf, name, image_processor, tokenizer = load_llava(model_or_name, image_processor, tokenizer, **hf_kwargs)
    lm_name = name.split("/")[-1]
    encoder, projection, image_token = llava_vision(hf, name, image_processor, lm_name, copy_tower=True)
    if tokenizer is None:  # TransformerLens's bridge would fetch one from the hub by the model's name
        raise ValueError("llava_bridge of a loaded LLaVA model needs its tokenizer (tokenizer=...): the bridge "
                         "cannot run without one; for token ids alone use from_llava (HookedVisionPrefix, "
                         "TransformerLens 3)")
    if not hf.config.architectures:  # an in-memory model has none; the bridge picks its adapter by it
        hf.config.architectures = [type(hf).__name__]
    bridge = TransformerBridge.boot_transformers(lm_name, hf_model=hf, tokenizer=tokenizer)
    return VisionBridge(bridge, encoder, projection, image_token_id=image_token).eval()
