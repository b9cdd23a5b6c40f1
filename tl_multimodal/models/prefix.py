"""HookedVisionPrefix: a HookedTransformer that reads images as soft-prompt tokens (LiMBeR).

An image goes through a frozen vision encoder (``hook_image_features``, ``[batch, patch, d_img]``)
and a linear projection (``hook_image_embed``, ``[batch, patch, d_model]``). The projected patches
take the place of *image slots* in the token sequence: positions holding ``model.image_token_id``
(one id past the vocabulary, so it can never be a real token). Everything downstream is the
unchanged TransformerLens model, so ``run_with_cache``, ``run_with_hooks``, ``generate``,
``ActivationCache`` decompositions and ``transformer_lens.patching`` all see one ordinary sequence
of ``n_image_tokens + n_text`` positions, and cache entries line up with the token tensor.

    model = HookedVisionPrefix(lm, VisionEncoder.from_timm("beit_base_patch16_224"))
    logits, cache = model.run_with_cache("A picture of", images=pixels)
    model.caption(pil_images)
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import lm_cross_entropy_loss

from tl_multimodal._validate import check_generation_options, check_int, check_token_ids
from tl_multimodal._compat import (HAS_HOOKED_TRANSFORMER, USE_DEFAULT_VALUE, Embed, HookedTransformer,
                                  require_hooked_transformer)  # TL 4: stand-ins naming VisionBridge
from tl_multimodal.models.encoders import VisionEncoder
from tl_multimodal.models._frontend import ImageFrontEnd, check_slots, rebound
from tl_multimodal.models.images import Images
from tl_multimodal.models.projection import ImageProjection

# the parent's arguments, by name (TransformerLens 4 has no HookedTransformer: see compat)
_PARENT_FORWARD = inspect.signature(HookedTransformer.forward) if HAS_HOOKED_TRANSFORMER else None


class _ImageSlotEmbed(Embed):
    """Token embedding in which image slots take the projected image tokens bound for this call."""

    def __init__(self, cfg, image_token_id: int):
        super().__init__(cfg)
        self.image_token_id = image_token_id
        self.image_embed: Tensor | None = None  # set by HookedVisionPrefix for one call

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        check_token_ids(tokens, self.cfg.d_vocab, self.image_token_id)  # -1 would read W_E's last row
        slots = tokens == self.image_token_id
        if not slots.any():
            return super().forward(tokens)
        check_slots(slots, self.image_embed, self.image_token_id)
        embed = super().forward(tokens.masked_fill(slots, 0))
        return embed.masked_scatter(slots[..., None], self.image_embed.to(embed.dtype))


class HookedVisionPrefix(ImageFrontEnd, HookedTransformer):
    """A HookedTransformer with a frozen vision encoder and a LiMBeR projection in front.

    Args:
        lm: The text-only language model. Its weights are copied; ``lm`` itself is left as it was.
        encoder: The frozen vision encoder.
        projection: A trained :class:`ImageProjection`; ``None`` makes a fresh (untrained) one.
        image_token_id: The id of image slots; default ``cfg.d_vocab`` (never a real token). A
            converted VLM uses its own image-placeholder id (:func:`tl_multimodal.pretrained.llava.from_llava`).

    Attributes:
        vision: The :class:`VisionEncoder`.
        projection: The :class:`ImageProjection`.
        n_image_tokens: Soft-prompt positions per image (= the encoder's patches).
        image_token_id: The id that marks an image slot in a token tensor (``cfg.d_vocab``).
        hook_image_features: HookPoint on encoder features, ``[batch, patch, d_img]``.
        hook_image_embed: HookPoint on projected image tokens, ``[batch, patch, d_model]``.
        use_lean_generation: Let ``generate``/``caption`` with images decode in the lean KV-cached
            loop of :mod:`tl_multimodal.models._fast_generation` when no hook is attached (default ``True``;
            ``False``: always TransformerLens's ``generate``).
        grad_through_kv_cache: ``False``: ``attribute`` captions without gradients, then attributes in one
            more forward. TransformerLens 3's components call ``W.T.contiguous()`` on their weights in every
            forward and autograd keeps that copy for the backward: differentiated cached steps would keep one
            copy of every weight matrix per generated token (0.53 GB a token for the offline SmolLM2-135M).
    """

    use_lean_generation: bool = True
    grad_through_kv_cache: bool = False

    def __init__(self, lm: HookedTransformer, encoder: VisionEncoder, projection: ImageProjection | None = None,
                 *, image_token_id: int | None = None):
        if image_token_id is not None:
            check_int(image_token_id, "image_token_id", minimum=0, maximum=lm.cfg.d_vocab)
        cfg = copy.deepcopy(lm.cfg)
        cfg.init_weights = False  # the weights come from `lm` below: no random init to throw away
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                super().__init__(cfg, tokenizer=lm.tokenizer, move_to_device=False)
        finally:  # model.cfg is the LM's config: HookedTransformer(model.cfg) initialises as HookedTransformer(lm.cfg)
            cfg.init_weights = lm.cfg.init_weights
        self.image_token_id = cfg.d_vocab if image_token_id is None else image_token_id  # LLaVA: its <image> id
        self.embed = _ImageSlotEmbed(cfg, self.image_token_id)
        missing, unexpected = self.load_state_dict(lm.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"could not copy the LM's weights: missing {missing}, unexpected {unexpected}")
        self._attach_vision(encoder, projection, cfg.model_name, cfg.d_model)
        self.hook_image_features = HookPoint()  # [batch, patch, d_img]
        self.hook_image_embed = HookPoint()  # [batch, patch, d_model]
        self.setup()
        torch.nn.Module.to(self, lm.W_E.device)

    @classmethod
    def from_pretrained(cls, model_name: str = "gpt2", *lm_args,
                        encoder: str = "microsoft/beit-large-patch16-224-pt22k", projection=None,
                        **lm_kwargs) -> "HookedVisionPrefix":
        """Load an LM and a pretrained encoder from the hub (needs internet), plus a projection.

        Positional arguments are the parent's (``fold_ln``, ``center_writing_weights``, ...); the
        vision arguments are keyword-only. For the paper's exact model (GPT-J-6B + LiMBeR's trained
        projection) or LLaVA use :func:`tl_multimodal.load`.

        Args:
            model_name: Any name ``HookedTransformer.from_pretrained`` accepts.
            *lm_args: Passed to ``HookedTransformer.from_pretrained`` after ``model_name``.
            encoder: A HF vision model (a name with ``/``; default LiMBeR's self-supervised BEiT-large,
                last hidden state without CLS: 196 x 1024) or a timm model name
                (:func:`~tl_multimodal.models._hub.hub_encoder`).
            projection: A projection checkpoint path (or an ``ImageProjection``). ``None`` builds an
                untrained one and warns (``UserWarning``); ``"untrained"`` builds one without warning.
            **lm_kwargs: Passed to ``HookedTransformer.from_pretrained``.
        """
        require_hooked_transformer(cls.__name__)
        from tl_multimodal.models._hub import hub_encoder, hub_projection

        if not isinstance(encoder, str):
            raise TypeError(f"encoder must be a HF or timm model name (str), got {type(encoder).__name__}")
        proj = hub_projection(projection, "HookedVisionPrefix.from_pretrained")  # before any download
        lm = HookedTransformer.from_pretrained(model_name, *lm_args, **lm_kwargs)
        return cls(lm, hub_encoder(encoder), proj)

    # ---------------------------------------------------------------- parameter counts
    @property
    def n_params_total(self) -> int:
        """Parameters of the language model alone, as ``HookedTransformer.n_params_total`` counts them.

        The vision encoder and the projection are counted by :attr:`n_params_vision` and
        :attr:`n_params_projection`.
        """
        return sum(p.numel() for name, p in self.named_parameters()
                   if not name.startswith(("vision.", "projection.")))

    @property
    def n_params_vision(self) -> int:
        """Parameters of the (frozen) vision encoder."""
        return sum(p.numel() for p in self.vision.parameters())

    @property
    def n_params_projection(self) -> int:
        """Parameters of the image projection (the only trained part)."""
        return sum(p.numel() for p in self.projection.parameters())

    # ---------------------------------------------------------------- the LM's weights alone
    _IMAGE_SIDE = ("vision.", "projection.")

    def lm_state_dict(self) -> dict[str, Tensor]:
        """The language model's weights: ``state_dict()`` without the encoder's and the projection's keys.

        It is a ``HookedTransformer`` state dict: ``HookedTransformer(model.cfg).load_state_dict(sd, strict=True)``
        takes it.
        """
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self._IMAGE_SIDE)}

    def load_lm_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a ``HookedTransformer`` state dict (e.g. ``lm.state_dict()``) into the language model;
        the encoder and the projection are kept as they are.

        Args:
            state_dict: The LM's weights, without ``vision.``/``projection.`` keys (those are refused:
                use ``load_state_dict`` for a whole ``HookedVisionPrefix`` state dict).
            strict: As for ``torch.nn.Module.load_state_dict``, over the LM's keys: every one must be
                given, and nothing else.

        Returns:
            ``(missing_keys, unexpected_keys)`` of the LM, as torch returns them.
        """
        image_keys = [k for k in state_dict if k.startswith(self._IMAGE_SIDE)]
        if image_keys:
            raise ValueError(f"state_dict holds encoder/projection keys ({image_keys[:3]}...): it is not a "
                             "HookedTransformer state dict; use model.load_state_dict for a whole model's")
        missing, unexpected = super().load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith(self._IMAGE_SIDE)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading the LM's state_dict: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """``torch.nn.Module.load_state_dict``; a strict load of a state dict with no encoder or projection
        keys (a ``HookedTransformer``'s) names :meth:`load_lm_state_dict`, which loads it strictly into the LM."""
        if strict and not any(k.startswith(self._IMAGE_SIDE) for k in state_dict):
            missing = [k for k in self.state_dict() if k.startswith(self._IMAGE_SIDE) and k not in state_dict]
            if missing:
                raise RuntimeError(f"state_dict has no encoder or projection weights (missing {missing[:3]}...): "
                                   "a HookedTransformer state dict loads into the language model with "
                                   "model.load_lm_state_dict(state_dict) (strict over the LM's keys)")
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    # ---------------------------------------------------------------- images -> soft prompts
    def load_projection(self, path) -> None:
        """Replace the projection by a checkpoint, failing clearly if it was made for another model."""
        super().load_projection(path)
        self.setup()  # TransformerLens: register the new module's hook points

    @property
    def _device(self) -> torch.device:
        return self.W_E.device

    # ---------------------------------------------------------------- tokens with image slots
    def _lm_to_tokens(self, input, prepend_bos, padding_side, move_to_device: bool, truncate: bool,
                      ) -> Int[Tensor, "batch pos"]:
        return HookedTransformer.to_tokens(self, input, prepend_bos, padding_side, move_to_device, truncate)

    def _lm_to_str_tokens(self, input, prepend_bos, padding_side):
        return HookedTransformer.to_str_tokens(self, input, prepend_bos, padding_side)

    def _binding(self, source: tuple[str, Tensor]):
        """Embed the source now; the slot embedding holds the soft prompts for the block."""
        return rebound(self.embed, "image_embed", self._embed(source))

    # ---------------------------------------------------------------- running the model
    def forward(self, input, *args, images: Images | None = None,
                image_features: Tensor | None = None, image_embed: Tensor | None = None, **kwargs):
        """``HookedTransformer.forward`` with images.

        Args:
            input: Text (a string is shared by all images; a list gives one per image), or tokens
                with image slots (``model.to_tokens(text, image=True)``).
            images: Pixels ``[batch, channel, height, width]`` or PIL images.
            image_features: Precomputed encoder features ``[batch, patch, d_img]`` instead of images.
            image_embed: Soft prompts from :meth:`embed_images` ``[batch, patch, d_model]``: the
                images are not encoded again (analyses embed once and run many passes).
            *args, **kwargs: As for ``HookedTransformer.forward`` (return_type, stop_at_layer, ...).
        """
        if images is None and image_features is None and image_embed is None:
            return super().forward(input, *args, **kwargs)
        source = self._source(images, image_features, image_embed)
        # Name the parent's arguments, however given: to_tokens(image=True) decides the BOS (none before
        # leading image slots unless asked for; a placeholder prompt keeps the tokenizer's default).
        bound = _PARENT_FORWARD.bind(self, input, *args, **kwargs).arguments
        del bound["self"]
        bound["input"] = self._image_tokens(input, source[1].shape[0], bound.get("prepend_bos", USE_DEFAULT_VALUE),
                                            bound.get("padding_side", USE_DEFAULT_VALUE))
        # the tokens are made: the parent must read a leading pad as a BOS only where one stands (BOS layout)
        bound["prepend_bos"] = bool(self._bos_before_slots(bound["input"]).any())
        with self._binding(source):
            return super().forward(**bound)

    def kv_cache(self, batch: int):
        """A fresh TransformerLens KV cache for ``batch`` rows, for ``past_kv_cache=`` (the analyses' cached steps)."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache.init_cache(self.cfg, self.cfg.device, batch)

    def loss_fn(self, logits, tokens, attention_mask=None, per_token: bool = False):
        """Next-token loss that never predicts an image slot (LiMBeR: loss on text tokens only).

        The prediction of the first text token from the last image position counts; predictions
        *of* image slots, and of masked (padding) positions, do not.
        """
        tokens = tokens.to(logits.device)
        targets = ~self.image_mask(tokens[:, 1:])
        if attention_mask is not None:  # as TransformerLens: both the position and its next one unmasked
            mask = attention_mask.bool().to(logits.device)
            targets &= mask[:, :-1] & mask[:, 1:]
        nll = lm_cross_entropy_loss(logits, tokens.masked_fill(self.image_mask(tokens), 0), per_token=True)
        nll = nll.masked_fill(~targets, 0.0)
        return nll if per_token else nll.sum() / targets.sum()

    def generate(self, input="", max_new_tokens: int = 10, *args, images: Images | None = None,
                 image_features: Tensor | None = None, image_embed: Tensor | None = None, **kwargs):
        """``HookedTransformer.generate`` with images (KV cache on by default, as there).

        The sampling arguments (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ...), however given, are checked first, with or without images. With images and
        no hook attached to the LM, the tokens come from :mod:`tl_multimodal.models._fast_generation` (the
        same computation without TransformerLens's per-token overhead); with hooks, or options and
        architectures it does not take, from TransformerLens's ``generate``, so hooks fire.
        """
        bound = _PARENT_GENERATE.bind(self, input, max_new_tokens, *args, **kwargs).arguments
        del bound["self"]
        bound.update(bound.pop("generation_kwargs", {}))  # e.g. output_logits=True, passed on by name
        bound = check_generation_options(bound)  # what the parent accepts, as Python values
        if images is None and image_features is None and image_embed is None:
            return super().generate(**bound)
        source = self._source(images, image_features, image_embed)

        def run(tokens: Tensor, options: dict) -> Tensor:
            options["prepend_bos"] = bool(self._bos_before_slots(tokens).any())  # as in forward
            tok = self.tokenizer
            if self.image_token_id < self.cfg.d_vocab and tok is not None and tok.pad_token_id == tok.bos_token_id:
                options["prepend_bos"] = True  # a placeholder prompt opens with the BOS: the last leading pad id
            options["input"] = tokens
            if not isinstance(input, Tensor):  # rows made from text are left-padded (_generate_with_images)
                options["padding_side"] = "left"
            out = self._generate_lean(tokens, options)
            if out is not None:
                return out
            side = options.get("padding_side")
            if self.tokenizer is None or side not in ("left", "right"):
                return HookedTransformer.generate(self, **options)
            with rebound(self.tokenizer, "padding_side", side):  # TransformerLens reads token input's padding there
                return HookedTransformer.generate(self, **options)

        return self._generate_with_images(input, bound["max_new_tokens"], bound.get("prepend_bos", USE_DEFAULT_VALUE),
                                          bound.get("padding_side", USE_DEFAULT_VALUE), bound, source, run)

    def _generate_lean(self, tokens: Tensor, bound: dict) -> Tensor | None:
        """``generate``'s tokens from the lean KV-cached loop (:mod:`tl_multimodal.models._fast_generation`),
        or ``None`` where it does not apply (hooks attached, an unsupported option or architecture)."""
        from transformer_lens.utilities import get_attention_mask

        from tl_multimodal.models import _fast_generation as fast_generation

        args = _PARENT_GENERATE.bind(self, **bound)
        args.apply_defaults()
        a = args.arguments  # with TransformerLens's defaults; options it has no argument for in generation_kwargs
        if a["return_type"] == "embeds" or not self.use_lean_generation or fast_generation.why_not_fast(
                self, a["use_past_kv_cache"], a["freq_penalty"], a["generation_kwargs"]) is not None:
            return None
        side = None if a["padding_side"] in (USE_DEFAULT_VALUE, None) else a["padding_side"]
        mask = (torch.ones_like(tokens) if self.tokenizer is None else  # as TransformerLens computes it
                get_attention_mask(self.tokenizer, tokens, bool(a["prepend_bos"]), padding_side=side))
        return fast_generation.generate_tokens(
            self, tokens, mask, a["max_new_tokens"], stop_at_eos=a["stop_at_eos"], eos_token_id=a["eos_token_id"],
            do_sample=a["do_sample"], top_k=a["top_k"], top_p=a["top_p"], temperature=a["temperature"])


_PARENT_GENERATE = inspect.signature(HookedTransformer.generate) if HAS_HOOKED_TRANSFORMER else None
