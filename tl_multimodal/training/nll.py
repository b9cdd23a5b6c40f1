"""The caption log-likelihood: what training minimises and what measures a projection.

Captions are checked and tokenized once (:func:`_caption_ids`), laid out after the image slots
(:func:`_batch`), and scored by next-token cross-entropy on caption tokens only, the LM unembedded
only at the positions that predict one (:func:`caption_token_nll`).
"""

from __future__ import annotations

import contextlib

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities.activation_functions import apply_softcap

from tl_multimodal._validate import check_int
from tl_multimodal.models.protocol import VisionLM


@contextlib.contextmanager
def _restoring(model: torch.nn.Module):
    """Put back every submodule's train/eval mode and every parameter's ``requires_grad`` on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)

def _problems(what: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    return f"{what}: {shown}"


def _tokenize(model: VisionLM, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as ``model.to_tokens(text, prepend_bos=False, truncate=False)`` gives them."""
    drop = 1 if model.cfg.tokenizer_prepends_bos else 0
    out = []
    for s in range(0, len(texts), 4096):
        out += [ids[drop:] for ids in model.tokenizer(texts[s:s + 4096])["input_ids"]]
    return out


def _caption_ids(model: VisionLM, rows: list, what: str, n_start: int,
                 first: int = 0) -> list[list[list[int]]]:
    """Every caption of every row, checked and tokenized (+ end-of-text): ``ids[row][option]``.

    Args:
        rows: Per row a string or a list of strings (options, one sampled per step).
        what: How errors name the rows' container, e.g. ``"dataset column 'captions'"``.
        n_start: Positions before the caption (image slots, or one start token).
        first: The number errors give the first row (rows of a stream are numbered as read).

    Raises:
        TypeError: A caption is not a string (rows named).
        ValueError: A row has no caption, an empty caption, or a caption that does not fit in
            ``n_ctx`` after the ``n_start`` positions (rows named).
    """
    bad_type = [f"row {i} holds {type(c).__name__} {c!r:.40}" for i, c in enumerate(rows, first)
                if not (isinstance(c, str) or isinstance(c, (list, tuple)) and all(isinstance(x, str) for x in c))]
    if bad_type:
        raise TypeError(_problems(f"{what} must hold a string or a list of strings per row", bad_type))
    options = [[c] if isinstance(c, str) else list(c) for c in rows]
    empty = [f"row {i} has no caption" if not opts else f"row {i} has an empty caption"
             for i, opts in enumerate(options, first) if not opts or any(not c.strip() for c in opts)]
    if empty:
        raise ValueError(_problems(what, empty))
    eos = model.tokenizer.eos_token or ""
    flat = _tokenize(model, [c.strip() + eos for opts in options for c in opts])
    room = model.cfg.n_ctx - n_start
    ids, long, k = [], [], 0
    for i, opts in enumerate(options):
        ids.append(flat[k:k + len(opts)])
        long += [f"row {first + i} caption {j} has {len(t)} tokens" for j, t in enumerate(ids[-1]) if len(t) > room]
        k += len(opts)
    if long:
        before = (f"{n_start} image slots" if n_start == model.n_image_tokens else "the start token" if n_start == 1
                  else f"the start token and {n_start - 1} image slots")
        raise ValueError(_problems(f"{what}: captions longer than n_ctx={model.cfg.n_ctx} allows after "
                                   f"{before} (at most {room} tokens with end-of-text)", long))
    return ids


def _batch(model: VisionLM, ids: list[list[int]], with_image: bool = True,
           ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-padded token rows ``[image slots | caption ids | pad]`` (after the LM's start token if the
    projection's layout has one; the start token alone in the image's place without image) and the
    mask of their real positions."""
    start = [model.start_token_id] if model.image_bos or not with_image else []
    if with_image:
        start += [model.image_token_id] * model.n_image_tokens
    rows = [start + r for r in ids]
    width = max(map(len, rows))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return tokens.to(model.cfg.device), mask.to(model.cfg.device)


class _ResidualReached(Exception):
    """Raised by the final norm's pre-hook once it holds the residual stream (the rest is not run)."""


def _final_norm(model) -> torch.nn.Module | None:
    """The LM's final norm module, or None (a HookedTransformer without normalization has none)."""
    if getattr(model.cfg, "normalization_type", "LN") is None:
        return None
    norm = getattr(model, "ln_final", None)
    return norm if isinstance(norm, torch.nn.Module) else None


def _final_residual(model, tokens: Int[Tensor, "batch pos"], **kwargs) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream after the last block (the final norm's input), for either backend.

    ``stop_at_layer=n_layers`` gives it on a HookedTransformer, but a TransformerBridge runs the
    HF model through to the logits whatever ``stop_at_layer`` says (it only stops *before* a
    block). So the final norm's input is caught by a forward pre-hook, which then stops the
    forward pass: neither backend runs the final norm or the unembedding over every position."""
    norm = _final_norm(model)
    if norm is None:
        return model(tokens, stop_at_layer=model.cfg.n_layers, **kwargs)
    caught = []

    def catch(module, args):
        caught.append(args[0])
        raise _ResidualReached

    handle = norm.register_forward_pre_hook(catch)
    try:
        model(tokens, **kwargs)
    except _ResidualReached:
        pass
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"the final norm ran {len(caught)} times in one forward pass (expected once)")
    return caught[0]


def caption_token_nll(model: VisionLM, tokens: Int[Tensor, "batch pos"],
                      attention_mask: Int[Tensor, "batch pos"],
                      image_features: Float[Tensor, "batch patch d_img"] | None = None,
                      ) -> Float[Tensor, "n_target"]:
    """Negative log-likelihood of every caption token, unembedding only the positions that predict one.

    The same numbers as ``model(tokens, image_features=..., attention_mask=..., return_type="loss",
    loss_per_token=True)`` at its target positions (text tokens that are not padding), without the
    final norm, unembedding and log-softmax at image slots and padding.

    Args:
        model: The model.
        tokens: Right-padded rows, image slots first (or plain text when ``image_features`` is None).
        attention_mask: 1 at real positions, 0 at padding.
        image_features: Encoder features, one image per row; ``None`` for text-only rows.

    Returns:
        One NLL per target, in row-major order of the target positions.

    Raises:
        ValueError: ``tokens`` and ``attention_mask`` differ in shape, or no position has a target.
    """
    if tokens.ndim != 2 or tokens.shape != attention_mask.shape:
        raise ValueError(f"tokens and attention_mask must both be [batch, pos], got {tuple(tokens.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    targets = attention_mask[:, 1:].bool() & ~model.image_mask(tokens[:, 1:])
    if not targets.any():
        raise ValueError("no caption token to predict: every position is an image slot or padding")
    kwargs = {} if image_features is None else {"image_features": image_features}
    resid = _final_residual(model, tokens, attention_mask=attention_mask, **kwargs)
    resid = resid[:, :-1][targets][None]  # [1, n_target, d_model]
    if _final_norm(model) is not None:
        resid = model.ln_final(resid)
    softcap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    logits = apply_softcap(model.unembed(resid), -1.0 if softcap is None else softcap)[0]
    return -logits.log_softmax(-1).gather(-1, tokens[:, 1:][targets][:, None])[:, 0]


def caption_nll(model: VisionLM, captions: list[str],
                image_features: Float[Tensor, "batch patch d_img"] | None = None,
                batch_size: int = 16) -> float:
    """Mean negative log-likelihood per caption token (end-of-text included), in nats.

    Args:
        model: The model.
        captions: One caption per row.
        image_features: Encoder features per caption; ``None`` scores the captions as plain text
            after the LM's start token (no image).
        batch_size: Rows per forward pass.

    Raises:
        TypeError: ``captions`` is not a list of strings, ``image_features`` not a tensor.
        ValueError: No captions, an empty or too long caption, features that do not match.
    """
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
    if not captions:
        raise ValueError("captions is empty")
    check_int(batch_size, "batch_size")
    if image_features is not None:
        if not isinstance(image_features, Tensor):
            raise TypeError(f"image_features must be a tensor, got {type(image_features).__name__}")
        if image_features.ndim != 3 or len(image_features) != len(captions):
            raise ValueError(f"image_features must be [{len(captions)} captions, patch, d_img], "
                             f"got {tuple(image_features.shape)}")
    bad = [f"row {i} holds {type(c).__name__}" for i, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        raise TypeError(_problems("captions must be strings", bad))
    n_start = 1 if image_features is None else model.n_image_tokens + model.image_bos
    ids = _caption_ids(model, list(captions), "captions", n_start)
    return _mean_nll(model, [r[0] for r in ids], image_features, batch_size)


def _mean_nll(model: VisionLM, ids: list[list[int]], image_features: Tensor | None,
              batch_size: int) -> float:
    """:func:`caption_nll` of captions already checked and tokenized."""
    total, count = 0.0, 0
    with _restoring(model), torch.no_grad():
        model.eval()
        for s in range(0, len(ids), batch_size):
            tokens, mask = _batch(model, ids[s:s + batch_size], image_features is not None)
            feats = None if image_features is None else image_features[s:s + batch_size]
            nll = caption_token_nll(model, tokens, mask, feats)
            total += nll.sum().item()
            count += nll.numel()
    return total / count
