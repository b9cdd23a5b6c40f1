"""The image side of a vision-language model, shared by both backends: images in, soft prompts out.

``HookedVisionPrefix`` (a ``HookedTransformer``) and ``VisionBridge`` (a ``TransformerBridge``) differ in
how the LM runs, not in how images become soft-prompt tokens. :class:`ImageFrontEnd` holds that common
part once: the encoder and projection (checked to fit each other and the LM), the image door
(``preprocess``), ``embed_images`` with its two hooks (``hook_image_features``, ``hook_image_embed``),
the checks of precomputed features and soft prompts, the image-slot mask, and the parts of the LM's
entry points that concern images: ``to_tokens(..., image=True)``, ``to_str_tokens`` naming image slots,
``to_string`` leaving them out, ``tokens_to_residual_directions`` refusing them (``cache.logit_attrs``),
``bind_images`` and ``generate`` with images. Each backend supplies only what differs: how its LM
tokenizes (``_lm_to_tokens``, ``_lm_to_str_tokens``) and where a call's soft prompts are bound
(``_binding``).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_multimodal._validate import check_generation_options, check_int, check_token_ids, exactly_one
from tl_multimodal._compat import USE_DEFAULT_VALUE
from tl_multimodal.models.images import Images, to_pixels
from tl_multimodal.models.projection import ImageProjection, ProjectionInfo


class ImageFrontEnd:
    """Mixin for a model with ``vision``, ``projection``, ``hook_image_features``, ``hook_image_embed``,
    ``image_token_id``, ``cfg`` and a ``_device`` property (where soft prompts must be)."""

    def _attach_vision(self, encoder, projection: ImageProjection | None, lm_name: str, d_model: int) -> None:
        """Set ``vision``, ``projection`` (a fresh untrained one if ``None``) and ``n_image_tokens``.

        Raises:
            ValueError: The projection was made for another encoder or LM (each field named).
        """
        self.vision = encoder
        info = ProjectionInfo(encoder=encoder.model_name, d_img=encoder.d_img, grid=encoder.grid,
                              lm=lm_name, d_model=d_model)
        if projection is None:
            projection = ImageProjection(info)
        projection.check_fits(info.encoder, info.d_img, info.grid, info.lm, info.d_model)
        self.projection = projection
        self.n_image_tokens = projection.n_tokens  # one per patch, or k for a pooled projection

    def load_projection(self, path) -> None:
        """Replace the projection by a checkpoint, failing clearly if it was made for another model.

        The new projection takes the model's device and train/eval mode.
        """
        proj = ImageProjection.load(path)
        i = self.projection.info
        proj.check_fits(i.encoder, i.d_img, i.grid, i.lm, i.d_model)
        self.projection = proj.to(self._device).train(self.training)
        self.n_image_tokens = proj.n_tokens

    def to(self, *args, **kwargs):
        """The LM's ``to`` (device and/or dtype; TransformerLens updates ``cfg``), all or nothing: if the
        move fails (e.g. ``"cuda"`` on a machine without a GPU, or out of memory half way), every
        parameter and buffer is put back where it was, in its dtype, ``cfg`` is restored, and the
        error is raised."""
        cfg = dict(vars(self.cfg))
        tensors = [t for t in itertools.chain(torch.nn.Module.parameters(self), torch.nn.Module.buffers(self))]
        where = [(t.device, t.dtype) for t in tensors]
        try:
            return super().to(*args, **kwargs)
        except BaseException:
            with torch.no_grad():
                for t, (device, dtype) in zip(tensors, where):
                    if (t.device, t.dtype) != (device, dtype):
                        t.data = t.data.to(device, dtype)
            vars(self.cfg).clear()
            vars(self.cfg).update(cfg)
            raise

    def preprocess(self, images: Images) -> Float[Tensor, "batch channel height width"]:
        """Any image input -> the encoder's normalised pixel tensor, on the model's device, in the
        encoder's dtype (float32 unless the model was moved to half precision).

        Takes PIL images of any mode, paths, numpy arrays, lists or tuples of them, or pixel tensors
        (checked: shape, size, NaNs, normalised values); see :mod:`tl_multimodal.models.images`.
        """
        return to_pixels(self.vision, images).to(self._device, next(self.vision.parameters()).dtype)

    def embed_images(self, images: Images | None = None,
                     image_features: Float[Tensor, "batch patch d_img"] | None = None,
                     ) -> Float[Tensor, "batch patch d_model"]:
        """Encode images (or take precomputed encoder features) and project them to soft prompts.

        Runs ``hook_image_features`` and ``hook_image_embed``.
        """
        if (images is None) == (image_features is None):
            raise ValueError("pass exactly one of images= and image_features=")
        return self._embed(self._source(images, image_features, None))

    def _source(self, images, image_features, image_embed) -> tuple[str, Tensor]:
        """What a call's soft prompts come from, checked (images become pixels): ``(kind, tensor)``."""
        exactly_one(images=images, image_features=image_features, image_embed=image_embed)
        if images is not None:
            return "images", self.preprocess(images)
        if image_features is not None:
            self._check_image_features(image_features)
            return "image_features", image_features
        self._check_image_embed(image_embed)
        return "image_embed", image_embed.to(self._device)

    def _embed(self, source: tuple[str, Tensor]) -> Float[Tensor, "batch patch d_model"]:
        """The soft prompts of a :meth:`_source`: pixels and features run through the encoder (pixels
        only) and the projection, with ``hook_image_features`` and ``hook_image_embed``; soft prompts
        as given."""
        kind, value = source
        if kind == "image_embed":
            return value
        if kind == "images":
            with torch.set_grad_enabled(torch.is_grad_enabled() and value.requires_grad):
                value = self.vision(value)
        features = self.hook_image_features(value.to(self._device, self.projection.dtype))
        return self.hook_image_embed(self.projection(features))

    def _binding(self, source: tuple[str, Tensor]):
        """A context manager within which calls on tokens with image slots read ``source``'s soft prompts.

        Each backend says where they are kept (and when a source is embedded)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def bind_images(self, images: Images | None = None, image_features: Tensor | None = None,
                    image_embed: Tensor | None = None):
        """Within the block, calls given image-slot tokens but no images use these images.

        For code that runs the model itself on tokens, e.g. ``transformer_lens.patching``::

            tokens = model.to_tokens("A picture of", image=True).expand(len(corrupt_px), -1)
            with model.bind_images(corrupt_px):
                out = transformer_lens.patching.get_act_patch_resid_pre(model, tokens, clean_cache, metric)

        The images are embedded once, on entry: ``hook_image_features``/``hook_image_embed`` run
        then, not in each call inside the block. ``image_embed=`` binds soft prompts already made
        by :meth:`embed_images` (no hook runs).
        """
        with self._binding(("image_embed", self._embed(self._source(images, image_features, image_embed)))):
            yield self

    def _check_image_features(self, image_features: Tensor) -> None:
        expected = (self.vision.n_patches, self.vision.d_img)
        if image_features.ndim != 3 or tuple(image_features.shape[1:]) != expected:
            raise ValueError(f"image_features must be [batch, {expected[0]}, {expected[1]}], "
                             f"got {tuple(image_features.shape)}")
        if not torch.isfinite(image_features).all():
            raise ValueError("image_features contain NaN or infinite values")

    def _check_image_embed(self, image_embed: Tensor) -> None:
        expected = (self.n_image_tokens, self.cfg.d_model)
        if image_embed.ndim != 3 or tuple(image_embed.shape[1:]) != expected:
            raise ValueError(f"image_embed must be [batch, {expected[0]}, {expected[1]}] "
                             f"(model.embed_images(...)), got {tuple(image_embed.shape)}")

    def _check_length(self, n_pos: int) -> None:
        if n_pos > self.cfg.n_ctx:
            raise ValueError(f"sequence of {n_pos} positions ({self.n_image_tokens} image + "
                             f"{n_pos - self.n_image_tokens} text) is longer than n_ctx={self.cfg.n_ctx}")

    def _stack_rows(self, rows: list[Tensor], padding_side, move_to_device: bool) -> Int[Tensor, "batch pos"]:
        """Token rows holding image slots as one tensor: checked against ``n_ctx`` (never truncated),
        padded with the pad token on ``padding_side`` (default: the tokenizer's) of the whole row."""
        self._check_length(max(len(r) for r in rows))
        side = self.tokenizer.padding_side if padding_side in (USE_DEFAULT_VALUE, None) else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        width = max(len(r) for r in rows)
        fill = [torch.full((width - len(r),), self.tokenizer.pad_token_id, dtype=torch.long) for r in rows]
        tokens = torch.stack([torch.cat([f, r.long()] if side == "left" else [r.long(), f]) for r, f in zip(rows, fill)])
        return tokens.to(self.cfg.device) if move_to_device else tokens

    # ---------------------------------------------------------------- tokens with image slots
    def _lm_to_tokens(self, input, prepend_bos, padding_side, move_to_device: bool, truncate: bool,
                      ) -> Int[Tensor, "batch pos"]:
        """The LM's own ``to_tokens`` (``None``/``USE_DEFAULT_VALUE``: its defaults); each backend says how."""
        raise NotImplementedError

    def _lm_to_str_tokens(self, input, prepend_bos, padding_side):
        """The LM's own ``to_str_tokens``; each backend says how."""
        raise NotImplementedError

    def to_tokens(self, input, prepend_bos=USE_DEFAULT_VALUE, padding_side=USE_DEFAULT_VALUE,
                  move_to_device: bool = True, truncate: bool = True, image: bool = False,
                  ) -> Int[Tensor, "batch pos"]:
        """The LM's ``to_tokens``; with ``image=True``, each text follows an image's slots.

        With ``image=True`` the row is ``[BOS][image][text]`` if ``prepend_bos=True`` and
        ``[image][text]`` if ``False``; by default the projection's layout (:attr:`image_bos`).
        Nothing is truncated (a sequence longer than ``n_ctx`` raises), and padding goes
        on ``padding_side`` of the whole row: ``[pad][image][text]`` or ``[image][text][pad]``.
        A text holding the image placeholder (a VLM's ``<image>``, which tokenizes to
        ``image_token_id``) keeps its own layout and BOS default instead: each placeholder becomes
        ``n_image_tokens`` slots where it stands, as HF's processors expand it.
        """
        self._needs_tokenizer("to_tokens")
        if not image:
            return self._lm_to_tokens(input, prepend_bos, padding_side, move_to_device, truncate)
        return self._tokens_with_images(input, prepend_bos, padding_side, move_to_device)

    def to_str_tokens(self, input, prepend_bos=USE_DEFAULT_VALUE, padding_side=USE_DEFAULT_VALUE):
        """The LM's ``to_str_tokens``; image slots in token ids read ``<image_i>``.

        Takes every input the LM's takes (text, a list, token ids ``[pos]``/``[1, pos]``/one
        element, numpy arrays) and a batch ``[batch, pos]`` of token ids (a list per row).
        """
        self._needs_tokenizer("to_str_tokens")
        if isinstance(input, (Tensor, np.ndarray)):
            ids = torch.as_tensor(input)
            if ids.ndim == 2 and ids.shape[0] > 1:
                return [self.to_str_tokens(row, prepend_bos, padding_side) for row in ids]
            slots = self.image_mask(ids.reshape(-1))
            if slots.any():
                text = self._lm_to_str_tokens(ids.reshape(-1).masked_fill(slots, 0), prepend_bos, padding_side)
                names = iter(f"<image_{i}>" for i in range(int(slots.sum())))
                return [next(names) if s else t for t, s in zip(text, slots.tolist())]
        return self._lm_to_str_tokens(input, prepend_bos, padding_side)

    def to_string(self, tokens):
        """TransformerLens's ``to_string``; image slots are left out of the decoded text."""
        self._needs_tokenizer("to_string")
        ids = tokens if isinstance(tokens, Tensor) else torch.tensor(tokens)
        if ids.ndim == 2 and self.image_mask(ids).any():
            return [self.to_string(row) for row in ids]
        if ids.ndim <= 1 and self.image_mask(ids).any():
            return super().to_string(ids[~self.image_mask(ids)])
        return super().to_string(tokens)

    def tokens_to_residual_directions(self, tokens):
        """TransformerLens's ``tokens_to_residual_directions``, refusing image slots by name.

        An image slot is not a vocabulary entry and has no unembedding direction, so
        ``cache.logit_attrs(..., tokens=...)`` needs the *answer* tokens (text ids), e.g.
        ``tokens[:, 1:][~model.image_mask(tokens[:, 1:])]`` or the target ids.
        """
        if isinstance(tokens, int) and tokens == self.image_token_id or (
                isinstance(tokens, Tensor) and self.image_mask(tokens).any()):
            raise ValueError(f"tokens hold image slots (id {self.image_token_id}), which have no "
                             "unembedding direction; pass text token ids (the answers whose logits you "
                             "attribute), e.g. the target ids or the text tokens without image slots")
        return super().tokens_to_residual_directions(tokens)

    def _text_ids(self, text: str, prepend_bos) -> Int[Tensor, "pos"]:
        """One text's token ids from the LM's own ``to_tokens`` (BOS as asked, untruncated, on CPU)."""
        return self._lm_to_tokens(text, prepend_bos, USE_DEFAULT_VALUE, False, False)[0]

    def _tokens_with_images(self, input, prepend_bos, padding_side, move_to_device: bool) -> Int[Tensor, "batch pos"]:
        """``to_tokens(input, image=True)`` for both backends: each text after one image's slots.

        ``[BOS][image][text]`` if ``prepend_bos=True``, ``[image][text]`` if ``False``, by default the
        projection's layout (:attr:`image_bos`); nothing truncated; padding on ``padding_side`` of the
        whole row. A text holding the image placeholder (a VLM's ``<image>``,
        which tokenizes to ``image_token_id``) keeps its own layout and BOS default instead: the
        placeholder becomes ``n_image_tokens`` slots where it stands, as HF's processors expand it.
        """
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"to_tokens(..., image=True) takes a string or a non-empty list of strings, got {input!r}")
        bos = self.image_bos if prepend_bos in (USE_DEFAULT_VALUE, None) else prepend_bos
        rows = []
        for t in texts:
            row = None
            if self.image_token_id < self.cfg.d_vocab:  # a real token: it may stand in the text
                row = self._text_ids(t, prepend_bos).long()
                placeholders = row == self.image_token_id
                if placeholders.sum() > 1:
                    raise ValueError(f"prompt {t!r} holds {int(placeholders.sum())} image placeholders "
                                     f"(id {self.image_token_id}); the model takes one image per prompt: "
                                     "use exactly one placeholder")
                row = row.repeat_interleave(torch.where(placeholders, self.n_image_tokens, 1)) if placeholders.any() else None
            rows.append(row if row is not None else self._image_row(self._text_ids(t, False), bos))
        return self._stack_rows(rows, padding_side, move_to_device)

    def _image_tokens(self, input, batch: int, prepend_bos=None, padding_side=None,
                      what: str = "input") -> Int[Tensor, "batch pos"]:
        """Tokens with image slots for ``input`` (text, texts, or tokens already holding the slots), on the LM's device."""
        if isinstance(input, str):
            return self.to_tokens(input, prepend_bos, padding_side, image=True).expand(batch, -1)
        if isinstance(input, (list, tuple)):
            if not all(isinstance(t, str) for t in input):
                raise TypeError(f"{what} must be a string, a list of strings or a token tensor; got a "
                                f"{type(input).__name__} holding {sorted({type(t).__name__ for t in input})}")
            if len(input) != batch:
                raise ValueError(f"{len(input)} prompts for {batch} images ({what})")
            return self.to_tokens(list(input), prepend_bos, padding_side, image=True)
        if not isinstance(input, Tensor) or input.is_floating_point():
            raise TypeError(f"{what} must be a string, a list of strings or a token tensor with image slots "
                            f"(integer ids from model.to_tokens(text, image=True)), got {type(input).__name__}")
        tokens = input if input.ndim == 2 else input[None]
        check_token_ids(tokens, self.cfg.d_vocab, self.image_token_id, name=what)
        if not self.image_mask(tokens).any():
            raise ValueError("token tensor has no image slots; build it with "
                             "model.to_tokens(text, image=True)")
        self._check_length(tokens.shape[1])
        return tokens.to(self.cfg.device)

    @property
    def image_bos(self) -> bool:
        """Whether image prompts start with the LM's BOS token (``[BOS][image][text]``) or with the
        image tokens (``[image][text]``): the layout the projection was trained with
        (``projection.info.bos``), which ``to_tokens(text, image=True)`` follows by default."""
        return self.projection.info.bos

    def _needs_tokenizer(self, what: str):
        """The tokenizer; a clear error naming ``what`` where the model has none (token-ids mode)."""
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and this model has none (it was built without "
                             "tokenizer=, so it takes token ids only: pass integer token tensors, or build it "
                             "with tokenizer=...)")
        return self.tokenizer

    @property
    def start_token_id(self) -> int:
        """The token that opens a sequence: the tokenizer's BOS, else its end-of-text token."""
        tok = self._needs_tokenizer("start_token_id")
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither a BOS nor an end-of-text token to open a sequence with")
        return start

    def _image_row(self, text_ids: Int[Tensor, "pos"], bos: bool) -> Int[Tensor, "pos_out"]:
        """One row of the image-prompt layout: ``[BOS]`` (if ``bos``), the image slots, the text ids."""
        start = [self.start_token_id] if bos else []
        head = torch.tensor(start + [self.image_token_id] * self.n_image_tokens, dtype=torch.long)
        return torch.cat([head, text_ids.long().cpu()])

    def _bos_before_slots(self, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos_minus_1"]:
        """True at a start token right before an image slot (the BOS layout). When the pad token is the
        start token (GPT-2), a left pad and a BOS look alike: the projection's layout decides. Without a
        tokenizer (token ids only) no token is known as a start or pad token: none."""
        if self.tokenizer is None:
            return torch.zeros_like(tokens[:, :-1], dtype=torch.bool)
        bos = (tokens[:, :-1] == self.start_token_id) & self.image_mask(tokens[:, 1:])
        if self.tokenizer.pad_token_id == self.start_token_id and not self.image_bos:
            bos[:] = False
        return bos

    @property
    def image_positions(self) -> slice:
        """The image slots of ``to_tokens(text, image=True)`` in the default layout (after the BOS
        when :attr:`image_bos`; no placeholder, right padding); anywhere else use :meth:`image_mask`
        (or a probe's positions)."""
        start = int(self.image_bos)
        return slice(start, start + self.n_image_tokens)

    def image_mask(self, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        """True where ``tokens`` holds an image slot."""
        return tokens == self.image_token_id

    # ---------------------------------------------------------------- generation
    def _generate_with_images(self, input, max_new_tokens: int, prepend_bos, padding_side, options: dict,
                              source: tuple[str, Tensor], run: Callable[[Tensor, dict], Tensor]):
        """``generate`` with images, for both backends: the prompt's tokens with image slots (checked to
        fit ``n_ctx`` with the new tokens), the soft prompts embedded once (no gradients) and bound
        while ``run(tokens, options)`` generates token ids, and for ``return_type`` ``"input"``/``"str"``
        (``options`` is changed to ``"tokens"`` for ``run``; ``"input"`` with token input gives tokens, as in
        TransformerLens) the texts without the image slots.

        Prompts given as text are left-padded (new tokens follow each row's last token, at the positions
        it has alone), whatever the tokenizer's side; ``padding_side="right"`` with prompts of different
        lengths is refused."""
        if padding_side == "right" and isinstance(input, (list, tuple)) and len({
                self._image_tokens(t, 1, prepend_bos).shape[1] for t in input if isinstance(t, str)}) > 1:
            raise ValueError("padding_side='right' with prompts of different lengths: generation continues each "
                             "row after its last token, so rows are left-padded (leave padding_side out, or 'left')")
        if not isinstance(input, Tensor):
            padding_side = "left"
        tokens = self._image_tokens(input, source[1].shape[0], prepend_bos, padding_side)
        self._check_length(tokens.shape[1] + max_new_tokens)
        return_type = options.get("return_type", "input")
        decode = return_type == "str" or (return_type == "input" and not isinstance(input, Tensor))
        if decode:
            self._needs_tokenizer("generate(return_type='str')")
        if return_type in ("input", "str"):
            options["return_type"] = "tokens"
        with torch.no_grad():
            source = ("image_embed", self._embed(source))
        with self._binding(source):
            out = run(tokens, options)
        if not decode:
            return out
        return [self.tokenizer.decode(row[~self.image_mask(row)], skip_special_tokens=True) for row in out]

    @torch.no_grad()
    def caption(self, images: Images, prompt: str = "A picture of", max_new_tokens: int = 20,
                do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, batch_size: int = 16) -> list[str]:
        """Caption images: the text generated after ``prompt`` (greedy unless ``do_sample``).

        Args:
            images: Anything :meth:`preprocess` takes: PIL images, paths, numpy arrays (one or a
                list/tuple), or normalised pixels ``[batch, channel, height, width]``.
            prompt: Text after the image tokens (LiMBeR: "A picture of"), shared by all images.
            max_new_tokens: Most tokens generated per caption (>= 1); stops early at end-of-text.
            do_sample, temperature, top_k, top_p: Sampling settings, as in ``generate``.
            batch_size: Images per generation batch (>= 1).

        Returns:
            One caption per image, without the prompt.

        Raises:
            TypeError, ValueError: A bad argument, named.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string (shared by all images), got {type(prompt).__name__}; "
                            "for one prompt per image call model.generate(prompts, images=...)")
        batch_size = check_int(batch_size, "batch_size")
        options = check_generation_options(dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                temperature=temperature, top_k=top_k, top_p=top_p))
        max_new_tokens = options.pop("max_new_tokens")
        images = self.preprocess(images)
        n_prompt = self.to_tokens(prompt, image=True).shape[1]
        captions = []
        for chunk in images.split(batch_size):
            out = self.generate(prompt, max_new_tokens, images=chunk, **options, return_type="tokens", verbose=False)
            captions += [self.tokenizer.decode(row[n_prompt:], skip_special_tokens=True).strip() for row in out]
        return captions


@contextlib.contextmanager
def rebound(owner, name: str, value):
    """Within the block ``owner.name`` is ``value``; afterwards what it was (blocks nest)."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def check_slots(slots: Bool[Tensor, "batch pos"], image_embed: Tensor | None, image_token_id: int) -> None:
    """The one check of both backends' slot filling: images were given, one image's slots per row."""
    if image_embed is None:
        raise ValueError(f"tokens contain image slots but no images were given (id {image_token_id}, "
                         "e.g. an image placeholder in the prompt); pass images=...")
    n_slots = slots.sum(-1)
    batch, n_patch = image_embed.shape[:2]
    if slots.shape[0] != batch or (n_slots != n_patch).any():
        raise ValueError(f"got {batch} images of {n_patch} patches for tokens of batch "
                         f"{slots.shape[0]} with {n_slots.tolist()} image slots per row; each row "
                         f"needs one image's {n_patch} slots (one image per prompt)")
