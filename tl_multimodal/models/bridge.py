"""VisionBridge: images as soft prompts in any LM that TransformerLens's ``TransformerBridge`` runs.

The same model as :class:`~tl_multimodal.models.prefix.HookedVisionPrefix` (a frozen vision encoder,
``hook_image_features``, a LiMBeR projection, ``hook_image_embed``, image slots = token id
``cfg.d_vocab``), built on ``TransformerBridge``, the model class of TransformerLens 4 (also
present in 3.x). The bridge runs the Hugging Face model itself; image slots are filled inside the
HF input embedding (a forward pre-hook maps slot ids to a valid id, a forward hook puts the
projected image tokens there), so tokens with image slots flow through every bridge entry point,
``hook_embed`` holds the image tokens at the slots, and ``run_with_cache``, ``run_with_hooks``,
``generate`` and ``transformer_lens.patching`` see one ordinary sequence.

    bridge = TransformerBridge.boot_transformers("gpt2")
    model = VisionBridge(bridge, VisionEncoder.from_timm("beit_base_patch16_224"), projection)
    assert model is bridge and isinstance(model, TransformerBridge)
    logits, cache = model.run_with_cache("A picture of", images=pixels)
    model.caption(pil_images)

Design: a VisionBridge *is* the ``TransformerBridge`` it is made from. ``VisionBridge`` subclasses
``TransformerBridge``, and ``VisionBridge(bridge, ...)`` turns the booted bridge into one in place
(``__new__`` checks the arguments, then reassigns the object's class; ``__init__`` adds the encoder,
the projection, the two image hook points and the embedding hooks). No weight is copied and
nothing is wrapped: every TransformerLens tool gets the bridge itself, with the bridge's own
``state_dict``, ``train``, ``to``, ``__getattr__``/``__setattr__``, ``__str__``, ``isinstance``
checks and safety checks, and without images it computes exactly what the bridge did. What it
adds to the bridge's behaviour:

* eval mode after construction, the encoder and projection included (analyses refuse training mode);
* ``state_dict()`` is the bridge's TransformerLens-format dict followed by the encoder's and the
  projection's entries under ``vision.`` and ``projection.``; ``load_state_dict`` takes them back;
  ``parameters()``/``named_parameters()`` are the bridge's followed by the encoder's and the
  projection's;
* ``loss_fn`` never predicts an image slot; ``to_str_tokens``/``to_string`` name or drop image
  slots; ``tokens_to_residual_directions`` (``cache.logit_attrs``) refuses them by name.

The booted bridge is used up: afterwards it is the VisionBridge (``model.bridge`` is ``model``,
for code written when this class wrapped the bridge).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from tl_multimodal._validate import check_generation_options, check_int, check_token_ids
from tl_multimodal.models.encoders import VisionEncoder
from tl_multimodal.models._frontend import ImageFrontEnd, check_slots, rebound
from tl_multimodal.models.images import Images
from tl_multimodal.models.projection import ImageProjection

_VISION_PARTS = ("vision", "projection")  # the submodules kept apart from the bridge's own state


class VisionBridge(ImageFrontEnd, TransformerBridge):
    """A ``TransformerBridge`` LM with a frozen vision encoder and a LiMBeR projection in front.

    ``VisionBridge(bridge, encoder, projection)`` returns ``bridge`` itself, now a VisionBridge
    (see the module docstring).

    Args:
        bridge: The text LM as a ``TransformerBridge`` (e.g. ``TransformerBridge.boot_transformers``),
            not yet a VisionBridge. It becomes the VisionBridge: two hook points
            (``hook_image_features``, ``hook_image_embed``) are added, its input embedding learns to
            fill image slots, and it is put in eval mode. Calls without image slots run exactly as before.
        encoder: The frozen vision encoder.
        projection: A trained :class:`ImageProjection`; ``None`` makes a fresh (untrained) one.
        image_token_id: The id of image slots; default ``cfg.d_vocab`` (never a real token). A
            bridged VLM uses its own image-placeholder id (:func:`tl_multimodal.pretrained.llava.llava_bridge`).

    Attributes:
        vision: The :class:`VisionEncoder`.
        projection: The :class:`ImageProjection`.
        n_image_tokens: Soft-prompt positions per image (= the encoder's patches).
        image_token_id: The id that marks an image slot in a token tensor (``cfg.d_vocab``).

    Raises:
        TypeError: ``bridge`` is not a ``TransformerBridge``.
        ValueError: No token embedding, a bad ``image_token_id``, an embedding without a row per ``cfg.d_vocab`` id, a
            projection made for another encoder or LM, or a bridge that is already a VisionBridge.
            The bridge is left untouched.
    """

    #: Let ``generate``/``caption`` with images decode in the lean KV-cached loop of
    #: :mod:`tl_multimodal.models._fast_generation` when no hook is attached (``False``: the bridge's ``generate``).
    use_lean_generation: bool = True
    #: ``attribute`` differentiates through the captioning steps' KV cache (the HF modules use their weights
    #: as they are: a cached step keeps its activations only).
    grad_through_kv_cache: bool = True

    def __new__(cls, bridge=None, encoder: VisionEncoder | None = None, projection: ImageProjection | None = None,
                *, image_token_id: int | None = None):
        if bridge is None:  # copy.deepcopy and pickle make an empty instance, then fill its __dict__
            return super().__new__(cls)
        if not isinstance(bridge, TransformerBridge):
            raise TypeError(f"bridge must be a transformer_lens TransformerBridge, got {type(bridge).__name__}")
        cfg = bridge.cfg
        if image_token_id is not None:  # the VLM's image placeholder, a real token
            check_int(image_token_id, "image_token_id", minimum=0, maximum=cfg.d_vocab - 1)
        embedding = getattr(getattr(bridge, "embed", None), "original_component", None)
        if not hasattr(embedding, "num_embeddings"):
            raise ValueError("the bridge has no token embedding (embed) to put image slots in")
        rows = embedding.num_embeddings
        if image_token_id is None and rows != cfg.d_vocab:
            raise ValueError(f"the LM's input embedding has {rows} rows but cfg.d_vocab is "
                             f"{cfg.d_vocab}; image slots (id d_vocab) need them equal")
        if projection is not None:
            projection.check_fits(encoder.model_name, encoder.d_img, encoder.grid, cfg.model_name, cfg.d_model)
        if isinstance(bridge, VisionBridge):
            raise ValueError("this bridge is already a VisionBridge; boot a fresh TransformerBridge")
        bridge.__class__ = cls if type(bridge) is TransformerBridge else _vision_class(cls, type(bridge))
        return bridge

    def __init__(self, bridge, encoder: VisionEncoder, projection: ImageProjection | None = None, *,
                 image_token_id: int | None = None):
        # ``self`` is ``bridge``, its class already reassigned by __new__; the bridge's own
        # __init__ ran when it was booted and must not run again.
        cfg = self.cfg
        self.image_token_id = cfg.d_vocab if image_token_id is None else image_token_id
        self._attach_vision(encoder, projection, cfg.model_name, cfg.d_model)
        self.projection.to(self._device)
        self.vision.to(self._device)
        # Registered by the bridge's __setattr__, so run_with_cache / run_with_hooks / hooks() know them by name.
        self.hook_image_features = HookPoint()  # [batch, patch, d_img]
        self.hook_image_embed = HookPoint()  # [batch, patch, d_model]
        driver = getattr(self, "_driver", None)  # TransformerLens 4: the hooks the backend declares it fires
        if getattr(driver, "supported_hook_points", None):
            driver.supported_hook_points = driver.supported_hook_points | {"hook_image_features", "hook_image_embed"}
        self._bound: Any = None  # the soft prompts (or what makes them) for the running call
        self._slots: Tensor | None = None
        embedding = self.embed.original_component
        embedding.register_forward_pre_hook(self._mask_slots)
        embedding.register_forward_hook(self._fill_slots)
        for block in getattr(self, "blocks", []):
            if hasattr(block, "attn"):
                block.attn.register_forward_pre_hook(_kv_cache_by_its_old_name, with_kwargs=True)
        self.eval()

    @classmethod
    def from_hf(cls, hf_model, tokenizer, encoder: VisionEncoder, projection: ImageProjection | None = None,
                model_name: str | None = None) -> "VisionBridge":
        """Bridge an in-memory Hugging Face causal LM (no download).

        Args:
            hf_model: E.g. a ``LlamaForCausalLM`` or ``GPT2LMHeadModel``.
            tokenizer: Its tokenizer.
            encoder: The frozen vision encoder.
            projection: A trained projection, or ``None`` for an untrained one.
            model_name: The LM's name as recorded in projection checkpoints; defaults to
                ``hf_model.config.name_or_path``.
        """
        name = model_name or hf_model.config.name_or_path or type(hf_model).__name__
        return cls(TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer),
                   encoder, projection)

    @classmethod
    def from_pretrained(cls, model_name: str = "gpt2", encoder: str = "microsoft/beit-large-patch16-224-pt22k",
                        projection=None, **boot_kwargs) -> "VisionBridge":
        """Boot an LM and a pretrained encoder from the hub (needs internet), plus a projection.

        Args:
            model_name: Any name ``TransformerBridge.boot_transformers`` accepts.
            encoder: A HF vision model (default LiMBeR's BEiT-large pt22k, CLS dropped) or a timm
                model name (:func:`~tl_multimodal.models._hub.hub_encoder`).
            projection: A projection checkpoint path (or an ``ImageProjection``). ``None`` builds an
                untrained one and warns (``UserWarning``); ``"untrained"`` builds one without warning.
            **boot_kwargs: Passed to ``TransformerBridge.boot_transformers``.
        """
        from tl_multimodal.models._hub import hub_encoder, hub_projection

        proj = hub_projection(projection, "VisionBridge.from_pretrained")  # before any download
        bridge = TransformerBridge.boot_transformers(model_name, **boot_kwargs)
        return cls(bridge, hub_encoder(encoder), proj)

    @property
    def bridge(self) -> "VisionBridge":
        """The model itself (this class used to wrap the bridge; the name stays for old code)."""
        return self

    @property
    def _own_hooks(self) -> tuple:
        """The hook functions this class registers itself (slot filling, the KV cache's name): they
        do not count as hooks attached to the LM (:func:`~tl_multimodal.models._fast_generation.hooks_attached`)."""
        return (VisionBridge._mask_slots, VisionBridge._fill_slots, _kv_cache_by_its_old_name)

    @property
    def _device(self) -> torch.device:
        return self.embed.original_component.weight.device

    # ---------------------------------------------------------------- the vision parts in PyTorch's views
    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """The bridge's ``state_dict`` followed by the encoder's and projection's under ``vision.`` /
        ``projection.``.

        A plain call gives the bridge's TransformerLens-format keys (``blocks.0.attn.q.weight``, ...)
        and then the vision parts; with ``destination`` or ``prefix`` (the model nested in another
        module) the bridge's recursive ``nn.Module`` keys, which hold the vision parts already.
        """
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if destination is None and not prefix:
            for name in _VISION_PARTS:
                for key, value in getattr(self, name).state_dict(keep_vars=keep_vars).items():
                    state[f"{name}.{key}"] = value
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The bridge's ``load_state_dict``, plus the ``vision.`` and ``projection.`` entries of :meth:`state_dict`.

        Every key format the bridge's takes is taken (TransformerLens, raw and clean HF keys). A dict
        without any ``vision.`` (or ``projection.``) key leaves that part as it is, so the LM-only
        state dict of a plain bridge loads, ``strict`` included; a part given in part is checked.

        Raises:
            RuntimeError: ``strict`` and keys missing or unexpected (bridge or vision parts), named.
        """
        parts = {name: {} for name in _VISION_PARTS}
        lm_state = {}
        for key, value in state_dict.items():
            head, _, rest = key.partition(".")
            if head in parts and rest:
                parts[head][rest] = value
            else:
                lm_state[key] = value
        result = super().load_state_dict(lm_state, strict=False, assign=assign)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        for name, part in parts.items():
            if not part:
                continue
            loaded = getattr(self, name).load_state_dict(part, strict=False, assign=assign)
            missing += [f"{name}.{k}" for k in loaded.missing_keys]
            unexpected += [f"{name}.{k}" for k in loaded.unexpected_keys]
        if strict and (missing or unexpected):
            errors = ([f"Unexpected key(s) in state_dict: {', '.join(map(repr, sorted(unexpected)))}"] if unexpected else []) + \
                     ([f"Missing key(s) in state_dict: {', '.join(map(repr, missing))}"] if missing else [])
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors))
        return type(result)(missing_keys=missing, unexpected_keys=unexpected)

    def parameters(self, recurse: bool = True):
        """The bridge's ``parameters()`` (the HF model's), then the encoder's and the projection's."""
        return itertools.chain(super().parameters(recurse), *(getattr(self, n).parameters(recurse) for n in _VISION_PARTS))

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The bridge's ``named_parameters()``, then the encoder's and projection's (``vision.``, ``projection.``)."""
        return itertools.chain(super().named_parameters(prefix, recurse, remove_duplicate), *(
            getattr(self, n).named_parameters(f"{prefix}.{n}" if prefix else n, recurse, remove_duplicate)
            for n in _VISION_PARTS))

    # ---------------------------------------------------------------- image slots in the embedding
    def _binding(self, source: tuple[str, Tensor]):
        """Bind the source itself: it is embedded by the input embedding's hook, inside the bridge's
        forward, so hooks that a run_with_hooks / run_with_cache call added to hook_image_features /
        hook_image_embed see it."""
        return rebound(self, "_bound", source)

    def _mask_slots(self, module: nn.Module, args: tuple) -> tuple | None:
        tokens = args[0]
        check_token_ids(tokens, self.cfg.d_vocab, self.image_token_id)
        slots = tokens == self.image_token_id
        if not slots.any():
            self._slots = None
            return None
        if self._bound is None:
            check_slots(slots, None, self.image_token_id)
        self._slots = slots
        return (tokens.masked_fill(slots, 0), *args[1:])

    def _fill_slots(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        slots, self._slots = self._slots, None
        if slots is None:
            return None
        image_embed = self._embed(self._bound)
        check_slots(slots, image_embed, self.image_token_id)
        return output.masked_scatter(slots[..., None], image_embed.to(output.dtype))

    # ---------------------------------------------------------------- tokens with image slots
    def _lm_to_tokens(self, input, prepend_bos, padding_side, move_to_device: bool, truncate: bool,
                      ) -> Int[Tensor, "batch pos"]:
        return super(ImageFrontEnd, self).to_tokens(input, prepend_bos, padding_side, move_to_device, truncate)

    def _lm_to_str_tokens(self, input, prepend_bos, padding_side):
        return super(ImageFrontEnd, self).to_str_tokens(input, prepend_bos, padding_side)

    def _padding_mask(self, tokens: Int[Tensor, "batch pos"], bos: bool = False) -> Int[Tensor, "batch pos"] | None:
        """The attention mask of left-padded rows. LiMBeR rows (``[pad][BOS][image][text]``): positions
        before a row's first slot are padding, except the start token right before it (the BOS layout;
        when the pad token is the start token, as for GPT-2, the projection's layout decides). A VLM's
        placeholder prompts (the image after text): the leading pad ids are padding (but the last of
        them where the pad id is also the BOS id: that one is the row's BOS). ``bos``: the call asked
        for a BOS (``prepend_bos=True``), so a start token right before the slots is one, whatever the
        projection's layout."""
        if self.image_token_id == self.cfg.d_vocab:
            head = self.image_mask(tokens)
            head[:, :-1] |= self._bos_before_slots(tokens) | (
                bos & (tokens[:, :-1] == self.start_token_id) & head[:, 1:])
            started = head.long().cummax(-1).values
        else:
            tok = self.tokenizer
            n_lead = (tokens == tok.pad_token_id).long().cumprod(-1).sum(-1)
            if tok.pad_token_id == tok.bos_token_id:
                n_lead = (n_lead - 1).clamp(min=0)
            started = (torch.arange(tokens.shape[1], device=tokens.device) >= n_lead[:, None]).long()
        return None if bool(started.all()) else started

    def _mask_padding(self, tokens: Int[Tensor, "batch pos"], kwargs: dict, bos: bool = False) -> None:
        """Put the :meth:`_padding_mask` of ``tokens`` in ``kwargs`` unless it holds an attention mask."""
        mask = self._padding_mask(tokens, bos)
        if mask is not None and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = mask

    # ---------------------------------------------------------------- running the model
    def _prepare(self, input, kwargs: dict, images, image_features, image_embed):
        """A call's checked soft-prompt source and its tokens (with the padding mask put in ``kwargs``)."""
        source = self._source(images, image_features, image_embed)
        prepend_bos = kwargs.pop("prepend_bos", None)
        tokens = self._image_tokens(input, source[1].shape[0], prepend_bos, kwargs.pop("padding_side", None))
        self._mask_padding(tokens, kwargs, bos=prepend_bos is True)
        return source, tokens

    def _run(self, method, input, args, kwargs, images, image_features, image_embed):
        """``method`` (a bridge entry point) on ``input``; with images, on its tokens with the images bound."""
        if images is None and image_features is None and image_embed is None:
            return method(input, *args, **kwargs)
        source, tokens = self._prepare(input, kwargs, images, image_features, image_embed)
        with self._binding(source):
            return method(tokens, *args, **kwargs)

    def forward(self, input, *args, images: Images | None = None, image_features: Tensor | None = None,
                image_embed: Tensor | None = None, **kwargs):
        """The bridge's ``forward`` with images.

        Args:
            input: Text (a string is shared by all images; a list gives one per image), or tokens
                with image slots (``model.to_tokens(text, image=True)``).
            images: Pixels ``[batch, channel, height, width]`` or PIL images.
            image_features: Precomputed encoder features ``[batch, patch, d_img]`` instead of images.
            image_embed: Soft prompts from :meth:`embed_images` ``[batch, patch, d_model]``.
            *args, **kwargs: As for ``TransformerBridge.forward`` (return_type, stop_at_layer, ...).
                ``return_type="loss"``/``"both"`` use :meth:`loss_fn` (text tokens only).
                ``past_kv_cache=``: a :meth:`kv_cache`, as on ``HookedTransformer``.
        """
        no_images = images is None and image_features is None and image_embed is None
        if kwargs.get("past_kv_cache") is not None:  # TransformerLens's KV-cache argument (see kv_cache)
            if not no_images:  # this method again, on the tokens with the images bound
                return self._run(self.forward, input, args, kwargs, images, image_features, image_embed)
            self._past_kv_cache_to_hf(input, kwargs)
        if no_images:
            return super().forward(input, *args, **kwargs)
        return_type = kwargs.get("return_type", "logits")
        if args or return_type not in ("loss", "both"):
            return self._run(super().forward, input, args, kwargs, images, image_features, image_embed)
        per_token = kwargs.pop("loss_per_token", False)
        source, tokens = self._prepare(input, kwargs, images, image_features, image_embed)
        with self._binding(source):
            logits = super().forward(tokens, **{**kwargs, "return_type": "logits"})
        loss = self.loss_fn(logits, tokens, kwargs.get("attention_mask"), per_token=per_token)
        return loss if return_type == "loss" else (logits, loss)

    def run_with_cache(self, input, *args, images: Images | None = None, image_features: Tensor | None = None,
                       image_embed: Tensor | None = None, **kwargs):
        """The bridge's ``run_with_cache`` with images (``hook_image_*`` are cached too)."""
        return self._run(super().run_with_cache, input, args, kwargs, images, image_features, image_embed)

    def run_with_hooks(self, input, *args, images: Images | None = None, image_features: Tensor | None = None,
                       image_embed: Tensor | None = None, **kwargs):
        """The bridge's ``run_with_hooks`` with images (hooks on ``hook_image_*`` run too)."""
        return self._run(super().run_with_hooks, input, args, kwargs, images, image_features, image_embed)

    def kv_cache(self, batch: int):
        """A fresh KV cache (the HF model's ``DynamicCache``) for the analyses' cached steps: ``forward``,
        ``run_with_hooks`` and ``run_with_cache`` take it as ``past_kv_cache=``, as on ``HookedTransformer``
        (each call appends its keys and values; gradients flow through them). ``batch`` is not needed:
        the cache takes its batch from the first call."""
        from transformers import DynamicCache

        return DynamicCache(config=self.original_model.config)

    @staticmethod
    def _past_kv_cache_to_hf(input, kwargs: dict) -> None:
        """TransformerLens's ``past_kv_cache=`` (a :meth:`kv_cache`) as the HF model's ``past_key_values``.

        As in TransformerLens, ``attention_mask`` covers the new tokens only; HF wants the whole
        sequence's, so the cache keeps the masks of the calls so far and the call gets them all.
        """
        cache = kwargs.pop("past_kv_cache", None)
        if cache is None:
            return
        mask = kwargs.get("attention_mask")
        previous = getattr(cache, "_tl_multimodal_mask", None)
        if mask is not None or previous is not None:
            if mask is None:  # no mask for this call: its tokens are all real
                if not isinstance(input, Tensor):
                    raise ValueError("past_kv_cache after a call with an attention_mask: pass tokens and "
                                     "their attention_mask")
                mask = torch.ones(previous.shape[0], input.shape[-1], dtype=previous.dtype, device=previous.device)
            full = mask if previous is None else torch.cat([previous, mask.to(previous.device)], dim=1)
            cache._tl_multimodal_mask = kwargs["attention_mask"] = full
        kwargs["past_key_values"], kwargs["use_cache"] = cache, True

    def loss_fn(self, logits, tokens, attention_mask=None, per_token: bool = False):
        """Next-token loss that never predicts an image slot (LiMBeR: loss on text tokens only);
        tokens without image slots get the bridge's own ``loss_fn``."""
        if not self.image_mask(tokens).any():
            return super().loss_fn(logits, tokens, attention_mask, per_token)
        tokens = tokens.to(logits.device)
        targets = ~self.image_mask(tokens[:, 1:])
        if attention_mask is not None:
            targets &= attention_mask[:, 1:].bool().to(logits.device)
        logprobs = logits[:, :-1].log_softmax(-1)
        nll = -logprobs.gather(-1, tokens[:, 1:].masked_fill(~targets, 0)[..., None])[..., 0] * targets
        return nll if per_token else nll.sum() / targets.sum()

    def generate(self, input="", max_new_tokens: int = 10, *args, images: Images | None = None,
                 image_features: Tensor | None = None, image_embed: Tensor | None = None,
                 use_past_kv_cache: bool = True, **kwargs):
        """The bridge's ``generate`` with images (embedded once, before the first step).

        With the KV cache (default, as in TransformerLens) the image is read once, by the first
        step; ``use_past_kv_cache=False`` runs a full forward pass per step (same tokens, slower).
        """
        kwargs = check_generation_options({"max_new_tokens": max_new_tokens, **kwargs,
                                           "use_past_kv_cache": use_past_kv_cache})
        max_new_tokens = kwargs.pop("max_new_tokens")
        if images is None and image_features is None and image_embed is None:
            return super().generate(input, max_new_tokens, *args, **kwargs)
        source = self._source(images, image_features, image_embed)
        generate = super().generate
        prepend_bos = kwargs.pop("prepend_bos", None)

        def run(tokens: Tensor, options: dict) -> Tensor:
            self._mask_padding(tokens, options, bos=prepend_bos is True)
            out = None if args else self._generate_lean(tokens, max_new_tokens, options)
            if out is not None:
                return out
            with torch.no_grad():
                return generate(tokens, max_new_tokens, *args, **options)

        return self._generate_with_images(input, max_new_tokens, prepend_bos, kwargs.pop("padding_side", None),
                                          kwargs, source, run)

    def _generate_lean(self, tokens: Tensor, max_new_tokens: int, options: dict) -> Tensor | None:
        """``generate``'s tokens from the lean KV-cached loop (:mod:`tl_multimodal.models._fast_generation`,
        on the HF model's own weights), or ``None`` where it does not apply (hooks attached, an option,
        layer type or dtype it does not take, ``use_lean_generation = False``)."""
        from tl_multimodal.models import _fast_generation as fast_generation

        a = {**_GENERATE_DEFAULTS, **options}
        extra = {k: v for k, v in a.items() if k not in _GENERATE_DEFAULTS and k != "attention_mask"}
        extra.update({k: a[k] for k in ("repetition_penalty", "output_logits") if a[k] != _GENERATE_DEFAULTS[k]})
        if a["return_type"] != "tokens" or fast_generation.why_not_fast(
                self, a["use_past_kv_cache"], a["freq_penalty"], extra) is not None:
            return None
        mask = a.get("attention_mask")
        return fast_generation.generate_tokens(
            self, tokens, torch.ones_like(tokens) if mask is None else mask, max_new_tokens,
            stop_at_eos=a["stop_at_eos"], eos_token_id=a["eos_token_id"], do_sample=a["do_sample"],
            top_k=a["top_k"], top_p=a["top_p"], temperature=a["temperature"])


#: ``TransformerBridge.generate``'s defaults of the options the lean loop takes (others send it to the bridge's).
_GENERATE_DEFAULTS = dict(stop_at_eos=True, eos_token_id=None, do_sample=True, top_k=None, top_p=None,
                          temperature=1.0, freq_penalty=0.0, repetition_penalty=1.0, use_past_kv_cache=True,
                          return_type="input", verbose=True, output_logits=False)


def _kv_cache_by_its_old_name(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Hand the bridge's attention the KV cache under the name it reads.

    transformers 5.24 passes the cache to attention as ``cache=``; TransformerLens's bridge
    attention (3.9 and 4.3) reads ``past_key_values=`` (or ``layer_past=``), so without this it
    never writes the cache and cached generation attends to the newest token alone.
    """
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


_VISION_CLASSES: dict[type, type] = {}


def _vision_class(cls: type, base: type) -> type:
    """``cls`` on top of ``base``, a subclass of ``TransformerBridge`` (made once per subclass)."""
    if base not in _VISION_CLASSES:
        _VISION_CLASSES[base] = type(f"{cls.__name__}[{base.__name__}]", (cls, base), {"__module__": cls.__module__})
    return _VISION_CLASSES[base]
