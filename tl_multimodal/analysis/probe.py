"""The query ``c`` of an analysis, as one object: which token, predicted where, after which image slots.

A :class:`Probe` holds, per image row, the tokens ``[image slots][prompt][caption up to the
target]`` (right-padded), where the image slots are (``model.image_mask``: never assumed to be a
prefix), the position whose prediction is the target, the target id and string, and the caption.
It is made once per image batch: :func:`~tl_multimodal.analysis.attribution.attribute` returns it
(``attr.probe``), and ablation, patching, heatmaps, views and the report take it::

    attr = attribute(model, images)
    ablate_units(model, images, attr.top_units(10).units_per_image(), probe=attr.probe)

:meth:`Probe.metric` (the batch mean of ``p(c)``) is a ``transformer_lens.patching`` metric.
Targets are a string or a token id everywhere (:func:`target_id`); a multi-token string is an
explicit choice (``multi_token="first"``) or an error; special tokens map to their own ids.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_multimodal._validate import check_int, check_token_ids
from tl_multimodal.models.protocol import VisionLM

MultiToken = Literal["error", "first"]
Target = str | int | Tensor
NounFinder = Callable[[str], "tuple[str, int] | None"]


@dataclass(repr=False)
class Probe:
    """The query ``c`` for a batch of images.

    Attributes:
        tokens: ``[batch, pos]`` image slots, prompt and caption before the target, right-padded.
        image_mask: ``[batch, pos]`` True at the image slots (``model.image_mask(tokens)``).
        pred_pos: ``[batch]`` the position whose next-token prediction is the target.
        target_ids: ``[batch]`` the target token ids (-1 where the whole caption is the target).
        targets: The target tokens as strings.
        prompts: The prompt of each row (the text between the image and the caption).
        captions: The caption of each row (generated or given), or None.
        caption_spans: ``(start, length)`` of the caption tokens per row, when the whole caption is
            the target (``objective="caption_logprob"``); else None.
        image_bos: The sequence layout of the model the probe was made for (``model.image_bos``:
            ``[BOS][image][text]`` if True, ``[image][text]`` if False); a probe runs only on a model
            of the same layout (:meth:`check_model`). ``None`` (a probe built by hand): not checked.
    """

    tokens: Int[Tensor, "batch pos"]
    image_mask: Bool[Tensor, "batch pos"]
    pred_pos: Int[Tensor, "batch"]
    target_ids: Int[Tensor, "batch"]
    targets: list[str]
    prompts: list[str]
    captions: list[str] | None = None
    caption_spans: list[tuple[int, int]] | None = None
    image_bos: bool | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __repr__(self) -> str:
        more = "..." if len(self) > 4 else ""
        return (f"Probe({len(self)} images x {self.tokens.shape[1]} positions "
                f"({int(self.image_mask[0].sum())} image slots), targets={self.targets[:4]}{more})")

    def __getitem__(self, index: int | slice | Sequence[int]) -> "Probe":
        """The probe of some rows (``probe[2:4]``, ``probe[[0, 3]]``, ``probe[1]``)."""
        idx = [index] if isinstance(index, int) else range(len(self))[index] if isinstance(index, slice) else index
        idx = list(idx)
        if any(not -len(self) <= i < len(self) for i in idx):
            raise ValueError(f"probe rows {idx} out of range for {len(self)} images")
        t = torch.tensor(idx, dtype=torch.long)
        width = int(self.pred_pos[t].max()) + 1 if self.caption_spans is None else \
            max(s + n for s, n in (self.caption_spans[i] for i in idx))
        width = max(width, int(self.image_mask[t].nonzero()[:, 1].max()) + 1)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Probe(self.tokens[t, :width], self.image_mask[t, :width], self.pred_pos[t], self.target_ids[t],
                     pick(self.targets), pick(self.prompts), pick(self.captions), pick(self.caption_spans),
                     self.image_bos)

    @property
    def image_positions(self) -> Int[Tensor, "batch n_image_tokens"]:
        """``[batch, n_image_tokens]`` the positions of each row's image slots."""
        return self.image_mask.nonzero()[:, 1].reshape(len(self), -1)

    def check_batch(self, n_images: int) -> None:
        """Raise a ValueError unless the probe has one row per image."""
        if len(self) != n_images:
            raise ValueError(f"the probe has {len(self)} rows but {n_images} images were given")

    def check_model(self, model: VisionLM) -> None:
        """Raise a ValueError unless the probe fits ``model``: made for its sequence layout (BOS before
        the image or not), token ids in its vocabulary (or its image-slot id), targets in its vocabulary."""
        bos = getattr(model, "image_bos", None)
        if self.image_bos is not None and bos is not None and bool(bos) != self.image_bos:
            layout = lambda b: "[BOS][image][text]" if b else "[image][text]"  # noqa: E731
            raise ValueError(f"the probe was made for a model whose prompts read {layout(self.image_bos)}, "
                             f"but this model's read {layout(bos)} (image_bos={bool(bos)}); make the probe "
                             "with this model (make_probe, or attribute(...).probe)")
        check_token_ids(self.tokens, model.cfg.d_vocab, model.image_token_id, name="the probe's tokens")
        tids = self.target_ids
        bad = (tids >= model.cfg.d_vocab) | (tids < -1) | ((tids == -1) & (self.caption_spans is None))
        if bad.any():
            raise ValueError(f"the probe's target ids {sorted(set(tids[bad].tolist()))} are outside the "
                             f"vocabulary [0, {model.cfg.d_vocab})")

    def p(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch"]:
        """``p(c)`` per row: the softmax of ``logits[b, pred_pos[b]]`` at the target (float32)."""
        if (self.target_ids < 0).any():
            raise ValueError("this probe's target is a whole caption; p(c) needs one target token per image")
        if logits.shape[0] != len(self):
            raise ValueError(f"logits for {logits.shape[0]} rows, the probe has {len(self)}")
        return target_probability(logits, self.pred_pos, self.target_ids)

    def metric(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        """The batch mean of :meth:`p`: a ``transformer_lens.patching`` metric."""
        return self.p(logits).mean()

    def to_dataframe(self):
        """One row per image: image_index, prompt, caption, target, target_id, pred_pos."""
        import pandas as pd

        return pd.DataFrame({"image_index": range(len(self)), "prompt": self.prompts,
                             "caption": self.captions if self.captions is not None else [None] * len(self),
                             "target": self.targets, "target_id": self.target_ids.tolist(),
                             "pred_pos": self.pred_pos.tolist()})

    def to(self, device) -> "Probe":
        """The probe with its tensors on ``device``."""
        return replace(self, tokens=self.tokens.to(device), image_mask=self.image_mask.to(device))

    @staticmethod
    def concat(parts: Sequence["Probe"]) -> "Probe":
        """Join probes of consecutive image batches (re-padded to the widest)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        layouts = {p.image_bos for p in parts}
        if len(layouts) > 1:
            raise ValueError(f"the probes were made for models of different layouts (image_bos {layouts})")
        width = max(p.tokens.shape[1] for p in parts)
        pad = lambda x, v: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=v)  # noqa: E731
        join = lambda name: None if getattr(parts[0], name) is None else \
            [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return Probe(torch.cat([pad(p.tokens, 0) for p in parts]), torch.cat([pad(p.image_mask, False) for p in parts]),
                     torch.cat([p.pred_pos for p in parts]), torch.cat([p.target_ids for p in parts]),
                     join("targets"), join("prompts"), join("captions"), join("caption_spans"), layouts.pop())


def target_probability(logits: Float[Tensor, "batch pos d_vocab"], pred_pos: Int[Tensor, "batch"],
                       target_ids: Int[Tensor, "batch"]) -> Float[Tensor, "batch"]:
    """``p(c)`` per row: softmax of ``logits[b, pred_pos[b]]`` at ``target_ids[b]`` (in float32)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, pred_pos.to(logits.device)].float()
    return last.log_softmax(-1)[rows, target_ids.to(logits.device)].exp()


# ---------------------------------------------------------------------------------- targets
def _text_ids(model: VisionLM, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def target_id(model: VisionLM, target: Target, after: str = "", multi_token: MultiToken = "error") -> int:
    """The token id of a target given as a string or an id.

    A string that is a special token (``"<|endoftext|>"``) is that token's id. Another string gets
    a leading space when it follows text that does not end in one (``"dog"`` after ``"A picture
    of"`` is ``" dog"``). A string of several tokens is an error unless ``multi_token="first"``.

    Args:
        model: The vision LM (its tokenizer and ``cfg.d_vocab``).
        target: A string, or a token id (int or 0-d tensor).
        after: The text the target follows.
        multi_token: ``"error"`` (default) or ``"first"`` (keep the first sub-token).
    """
    if multi_token not in ("error", "first"):
        raise ValueError(f"multi_token must be 'error' or 'first', got {multi_token!r}")
    if isinstance(target, Tensor):
        if target.numel() != 1 or target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(f"a target tensor must be one integer token id, got {tuple(target.shape)} {target.dtype}")
        target = int(target)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        target = operator.index(target)  # numpy integers
    if isinstance(target, (bytes, bytearray)):
        raise TypeError(f"target must be a string or a token id, got bytes {target!r}; decode it first "
                        f"(target={target.decode(errors='replace')!r})")
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise TypeError(f"target must be a string or a token id, got {type(target).__name__}")
    if isinstance(target, int):
        if not 0 <= target < model.cfg.d_vocab:
            raise ValueError(f"target token id {target} is outside the vocabulary [0, {model.cfg.d_vocab})")
        _check_not_image_token(model, target, [target])
        return target
    if not target.strip():
        raise ValueError(f"target {target!r} is an empty string")
    tok = model.tokenizer
    if target in tok.all_special_tokens:
        special = tok.convert_tokens_to_ids(target)
        _check_not_image_token(model, target, [special])
        return special
    needs_space = after and not after[-1].isspace() and not target[0].isspace()
    ids = _text_ids(model, " " + target if needs_space else target)
    _check_not_image_token(model, target, ids)
    if len(ids) > 1 and multi_token == "error":
        pieces = [tok.decode([i]) for i in ids]
        raise ValueError(f"target {target!r} is {len(ids)} tokens {pieces}; pass a single token, its id, "
                         "or multi_token='first' to use the first sub-token")
    return ids[0]


def _check_not_image_token(model: VisionLM, target, ids: list[int], what: str = "target") -> None:
    """Refuse a target (or caption: ``what``) whose ids hold the image token (a VLM's ``<image>``): a target
    is text the model predicts, and that id marks where the image's soft prompts go."""
    if model.image_token_id in ids:
        raise ValueError(f"{what} {target!r} holds the image token (id {model.image_token_id}), which marks "
                         f"the image slots rather than text the model predicts; pass text without it")


def _per_image(x, n: int, what: str, arg: str) -> list:
    """``x`` once per image: one value for all, or a sequence of ``n`` (``arg``: the argument's name)."""
    if isinstance(x, (bytes, bytearray)):  # list(b"dog") would be three ints
        raise TypeError(f"{arg} must be a string or a token id (or one per image), got bytes {x!r}; "
                        f"decode it first ({arg}={x.decode(errors='replace')!r})")
    if isinstance(x, (str, numbers.Integral)) or (isinstance(x, Tensor) and x.ndim == 0):
        return [x] * n
    if not hasattr(x, "__iter__"):
        raise TypeError(f"{arg} must be a string, a token id or one per image, got {type(x).__name__}")
    x = list(x)
    if len(x) != n:
        raise ValueError(f"{len(x)} {what} for {n} images")
    return x


def image_prompt_ids(model: VisionLM, prompt: str) -> list[int]:
    """The token ids of ``[image slots][prompt]`` as the model lays them out (``to_tokens(image=True)``)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return model.to_tokens(prompt, image=True, move_to_device=False)[0].tolist()


def _assemble(model: VisionLM, rows: list[list[int]], tids: list[int], prompts: list[str],
              captions: list[str] | None = None, spans: list[tuple[int, int]] | None = None) -> Probe:
    width = max(len(r) for r in rows)
    if width > model.cfg.n_ctx:
        raise ValueError(f"sequence of {width} positions is longer than n_ctx={model.cfg.n_ctx}")
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = model.image_mask(tokens).cpu()
    mask &= torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
    if (mask.sum(1) != model.n_image_tokens).any():
        raise ValueError(f"each row must hold {model.n_image_tokens} image slots, got {mask.sum(1).tolist()}")
    targets = [model.tokenizer.decode([t]) if t >= 0 else c for t, c in zip(tids, captions or [None] * len(tids))]
    pred = torch.tensor([len(r) - 1 if t >= 0 else -1 for r, t in zip(rows, tids)], dtype=torch.long)
    return Probe(tokens, mask, pred, torch.tensor(tids, dtype=torch.long), targets, prompts, captions, spans,
                 getattr(model, "image_bos", None))


def noun_token(model: VisionLM, caption_ids: Sequence[int], noun_finder: NounFinder, image_index: int = 0,
               ) -> tuple[int, str]:
    """Index of the caption token where the caption's first noun starts, and the noun.

    Falls back (with a warning) to the first word when ``noun_finder`` finds no noun.
    """
    import re
    import warnings

    pieces = [model.tokenizer.decode([t]) for t in caption_ids]
    text = "".join(pieces)
    if not text.strip():
        raise ValueError(f"the caption of image {image_index} is empty; pass target= or captions=")
    found = noun_finder(text)
    if found is None:
        m = re.search(r"[A-Za-z]+", text)
        if m is None:
            raise ValueError(f"the caption of image {image_index} ({text!r}) has no word to attribute; pass target=")
        warnings.warn(f"no noun in the caption of image {image_index} ({text!r}); using its first word {m.group()!r}")
        found = (m.group(), m.start())
    word, start = found
    end = 0
    for j, piece in enumerate(pieces):
        end += len(piece)
        if start < end:
            return j, word
    raise ValueError(f"noun {word!r} at offset {start} is outside the caption {text!r}")


def probe_from_caption_ids(model: VisionLM, prompt: str, caption_ids: Sequence[Sequence[int]],
                           noun_finder: NounFinder | None = None, whole_caption: bool = False,
                           captions: Sequence[str] | None = None) -> Probe:
    """A probe whose target is the first noun of each caption (given as token ids after ``prompt``).

    Args:
        model: The vision LM.
        prompt: The text between the image and the caption.
        caption_ids: One list of caption token ids per image.
        noun_finder: ``text -> (word, char offset) | None``; default ``first_noun``.
        whole_caption: The target is the whole caption (``caption_spans`` set, ``target_ids`` -1).
        captions: The caption texts to record (default: the decoded ids).
    """
    if noun_finder is None:
        from tl_multimodal.analysis.nouns import first_noun as noun_finder
    prefix = image_prompt_ids(model, prompt)
    rows, tids, spans, texts = [], [], [], []
    for i, ids in enumerate(caption_ids):
        ids = [check_int(t, f"caption_ids[{i}]", minimum=None) for t in ids]  # 2.9 is no token id
        if not ids:
            raise ValueError(f"the caption of image {i} is empty; pass target= or another caption")
        if any(not 0 <= t < model.cfg.d_vocab for t in ids):
            raise ValueError(f"caption {i} holds token ids outside the vocabulary [0, {model.cfg.d_vocab})")
        texts.append(model.tokenizer.decode(ids) if captions is None else captions[i])
        if whole_caption:
            rows.append(prefix + ids)
            tids.append(-1)
            spans.append((len(prefix), len(ids)))
            continue
        j, _ = noun_token(model, ids, noun_finder, i)
        rows.append(prefix + ids[:j])
        tids.append(ids[j])
    return _assemble(model, rows, tids, [prompt] * len(rows), texts, spans if whole_caption else None)


def make_probe(model: VisionLM, n_images: int, target: Target | Sequence[Target] | None = None,
               prompt: str | Sequence[str] = "A picture of", captions: str | Sequence[str] | None = None,
               noun_finder: NounFinder | None = None, multi_token: MultiToken = "error",
               whole_caption: bool = False) -> Probe:
    """The probe of ``n_images`` images for a given target, or for the first noun of given captions.

    Args:
        model: The vision LM.
        n_images: Rows (images) of the probe.
        target: A string or token id for all images, or one per image; predicted right after
            ``prompt`` (a word not starting with a space gets one; see :func:`target_id`).
        prompt: The text after the image, one for all or one per image.
        captions: Instead of ``target``: one caption per image (or one for all); the target is the
            first sub-token of its first noun, predicted after ``prompt`` + the caption before it.
        noun_finder: ``text -> (word, char offset) | None`` for ``captions``; default ``first_noun``.
        multi_token: For string targets: ``"error"`` or ``"first"`` (see :func:`target_id`).
        whole_caption: With ``captions``: the target is the whole caption (``caption_logprob``).
    """
    check_int(n_images, "n_images")
    if (target is None) == (captions is None):
        raise ValueError("pass exactly one of target= and captions= (attribute() finds targets itself "
                         "from the model's own captions)")
    prompts = _per_image(prompt, n_images, "prompts", "prompt")
    if captions is not None:
        caps = _per_image(captions, n_images, "captions", "captions")
        if any(not isinstance(c, str) for c in caps):
            raise TypeError("captions must be strings")
        if len(set(prompts)) != 1:
            raise ValueError("captions= takes one prompt for all images")
        p = prompts[0]
        sep = "" if not p or p[-1].isspace() else " "
        ids = [_text_ids(model, sep + c.lstrip()) if c.strip() else [] for c in caps]
        for c, i in zip(caps, ids):
            _check_not_image_token(model, c, i, "caption")
        return probe_from_caption_ids(model, p, ids, noun_finder, whole_caption, caps)
    if whole_caption:
        raise ValueError("whole_caption=True needs captions=, not target=")
    rows = [image_prompt_ids(model, p) for p in prompts]
    tids = [target_id(model, t, p, multi_token) for t, p in zip(_per_image(target, n_images, "targets", "target"), prompts)]
    if any(len(r) == 0 for r in rows):
        raise ValueError("nothing precedes the target")
    return _assemble(model, rows, tids, prompts)


def resolve_probe(model: VisionLM, n_images: int, probe: Probe | None, target, prompt,
                  multi_token: MultiToken = "error") -> Probe:
    """The probe of an analysis call: the given one (checked), or one made from ``target``/``prompt``."""
    if probe is not None:
        if not isinstance(probe, Probe):
            raise TypeError(f"probe must be a Probe (e.g. attr.probe), got {type(probe).__name__}")
        if target is not None or prompt is not None:
            raise ValueError("pass either probe= or target=/prompt=, not both")
        probe.check_batch(n_images)
        probe.check_model(model)
        return probe
    if target is None:
        raise ValueError("pass target= (a string or token id per image) or probe= (e.g. attr.probe)")
    return make_probe(model, n_images, target, "A picture of" if prompt is None else prompt,
                      multi_token=multi_token)
