"""Decoding MLP units and image soft prompts through the unembedding (Schwettmann et al., 2023).

A unit ``(layer, k)`` writes ``act * W_out[layer][k]`` into the residual stream. Its *decoding* is
``softmax(W_U^T . W_out[layer][k])``: the tokens its output direction promotes directly. The paper
ignores the final norm (``apply_ln=False``, the default here); ``apply_ln=True`` applies the
data-independent part of ``ln_final`` to the direction first (see :func:`unit_directions`).

A unit is *interpretable* when at least 7 of its 10 top tokens are English words of at least 3
letters (the shipped word list ``assets/english_words.tsv``, made by ``scripts/make_wordlist.py``).

:func:`decode_image_prompts` is the logit lens on the image soft prompts themselves
(``hook_image_embed``), which the paper reports are *not* decodable.

    dec = decode_units(model, [(5, 1021), (7, 33)])
    dec.to_dataframe()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.units import as_units, unit_label
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.splice import saes_by_hook

WORD_LIST = Path(__file__).parents[1] / "assets" / "english_words.tsv"
_STRIP = " \t\n\u0120\u2581\u010a"  # space, GPT-2's "Ġ" (space) and "Ċ" (newline), SentencePiece's "▁"


@functools.lru_cache(maxsize=1)
def load_word_list() -> dict[str, frozenset[str]]:
    """The shipped English word list: ``{word: parts of speech it can take}`` (most frequent first).

    ~38.6k lowercase ASCII words from wordfreq's English frequency list, each with the Universal
    POS tags lemminflect knows for it (``"dog" -> {"NOUN", "VERB"}``; empty when unknown).
    """
    words = {}
    for line in WORD_LIST.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        word, pos = line.split("\t")
        words[word] = frozenset() if pos == "-" else frozenset(pos.split(","))
    return words


def clean_token(token: str) -> str:
    """A token string without its leading/trailing whitespace markers (``" dog"``/``"Ġdog"`` -> ``"dog"``)."""
    return token.strip(_STRIP)


def is_english_word(token: str, min_letters: int = 3) -> bool:
    """True if ``token`` (whitespace markers stripped, any case) is a word of >= ``min_letters``
    letters in the shipped English word list."""
    word = clean_token(token)
    return len(word) >= min_letters and word.isalpha() and word.lower() in load_word_list()


def is_interpretable(tokens: Sequence[str], min_words: int = 7, top: int = 10, min_letters: int = 3) -> bool:
    """The paper's filter: at least ``min_words`` of the first ``top`` tokens are English words of
    at least ``min_letters`` letters."""
    if len(tokens) < top:
        raise ValueError(f"the filter reads the top {top} tokens; got only {len(tokens)}")
    return sum(is_english_word(t, min_letters) for t in tokens[:top]) >= min_words


# ---------------------------------------------------------------------------- unit decoding
def unit_directions(model: VisionLM, units, apply_ln: bool = False, sae=None) -> Float[Tensor, "n d_model"]:
    """The output directions ``W_out[layer][unit]`` of MLP units, optionally through ``ln_final``.

    ``apply_ln=True`` applies what ``ln_final`` does to *one direction* independently of the data:
    LayerNorm centres it (subtracts its mean over ``d_model``) and multiplies by ``ln_final.w``;
    RMSNorm multiplies by ``ln_final.w``; the folded variants (``LNPre``/``RMSPre``, whose weights
    are already in ``W_U``) only centre / do nothing. The data-dependent ``1/scale`` of the real
    residual stream is left out (it is one positive number per position, shared by all components),
    and so is the norm's bias (a constant, not the unit's). So, projected on ``W_U``, the direction
    is ``ActivationCache.apply_ln_to_stack`` of the unit's component ``act * W_out[k]`` (times
    ``ln_final.w`` when it is not folded), up to the positive factor ``act / scale``: the token
    ranking is the same, softmax probabilities are of the unscaled logits.

    Args:
        model: A vision LM (or any HookedTransformer / TransformerBridge).
        units: ``(layer, unit)`` pairs, a list or an ``[n, 2]`` tensor.
        apply_ln: Apply the final norm as above (default: no, as in the paper).
        sae: An SAE or a list of them: the units are ``(SAE index, latent)`` and a latent's direction is its
            decoder row ``W_dec[latent]`` (an SAE on the residual stream or a block's output).

    Returns:
        ``[n, d_model]`` directions.
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    units = as_units(model, units, batched=False, allow_empty=False, saes=saes)
    if saes is None:
        W_out = torch.stack([model.blocks[int(l)].mlp.W_out[int(u)] for l, u in units.tolist()])
    else:
        dec = [s.W_dec for s in saes.values()]
        W_out = torch.stack([dec[l][u] for l, u in units.tolist()]).to(model.W_U.dtype)
    if not apply_ln:
        return W_out
    norm = model.cfg.normalization_type
    if norm in ("LN", "LNPre"):
        W_out = W_out - W_out.mean(-1, keepdim=True)
    if norm in ("LN", "RMS"):
        W_out = W_out * model.ln_final.w
    return W_out


@dataclass
class UnitDecoding:
    """Top tokens of MLP units' output directions.

    Attributes:
        layer, unit: ``[n]`` the decoded units.
        token_ids: ``[n, k]`` top tokens of ``softmax(W_U^T . direction)``, best first.
        tokens: Their strings.
        probs: ``[n, k]`` their softmax probabilities (over the whole vocabulary).
        interpretable: ``[n]`` the paper's filter (>= 7 of the top 10 are English words of >= 3
            letters); all False when ``k < 10``.
        apply_ln: Whether the final norm was applied (see :func:`unit_directions`).
    """

    layer: Int[Tensor, "n"]
    unit: Int[Tensor, "n"]
    token_ids: Int[Tensor, "n k"]
    tokens: list[list[str]]
    probs: Float[Tensor, "n k"]
    interpretable: Bool[Tensor, "n"]
    apply_ln: bool

    def __len__(self) -> int:
        return len(self.layer)

    def __repr__(self) -> str:
        head = [f"{unit_label(l, u)}: {' '.join(repr(t) for t in toks[:5])}"
                for l, u, toks in zip(self.layer.tolist()[:3], self.unit.tolist()[:3], self.tokens[:3])]
        more = f" (+{len(self) - 3} more)" if len(self) > 3 else ""
        return (f"UnitDecoding({len(self)} units, k={self.token_ids.shape[1]}, apply_ln={self.apply_ln}, "
                f"{int(self.interpretable.sum())} interpretable; " + "; ".join(head) + more + ")")

    def to_dataframe(self):
        """Long format: one row per (unit, rank) with layer, unit, rank, token, token_id, prob, interpretable."""
        import pandas as pd

        n, k = self.token_ids.shape
        return pd.DataFrame({
            "layer": self.layer.repeat_interleave(k).numpy(),
            "unit": self.unit.repeat_interleave(k).numpy(),
            "rank": torch.arange(k).repeat(n).numpy(),
            "token": [t for toks in self.tokens for t in toks],
            "token_id": self.token_ids.flatten().numpy(),
            "prob": self.probs.flatten().numpy(),
            "interpretable": self.interpretable.repeat_interleave(k).numpy(),
        })


@torch.no_grad()
def decode_units(model: VisionLM, units, n_tokens: int = 10, apply_ln: bool = False,
                 batch_size: int = 1024, sae=None) -> UnitDecoding:
    """Decode many MLP units at once: top-``n_tokens`` tokens of ``softmax(W_U^T . W_out[layer][unit])``.

    The unembedding bias ``b_U`` is left out: it is not part of any unit's contribution.

    Args:
        model: A vision LM (or any HookedTransformer / TransformerBridge).
        units: ``(layer, unit)`` pairs, a list or an ``[n, 2]`` tensor.
        n_tokens: Tokens kept per unit.
        apply_ln: Apply the final norm's data-independent part (see :func:`unit_directions`).
        batch_size: Units per matrix product with ``W_U``.
        sae: An SAE or a list of them: decode latents ``(SAE index, latent)`` (see :func:`unit_directions`).

    Returns:
        A :class:`UnitDecoding`.
    """
    check_int(n_tokens, "n_tokens", maximum=model.cfg.d_vocab_out)
    saes = None if sae is None else saes_by_hook(model, sae)
    units = as_units(model, units, batched=False, allow_empty=False, saes=saes)
    ids, probs = [], []
    for chunk in units.split(batch_size):
        logits = unit_directions(model, chunk, apply_ln, list(saes.values()) if saes else None) @ model.W_U
        p, i = logits.float().softmax(-1).topk(n_tokens, dim=-1)
        ids.append(i.cpu())
        probs.append(p.cpu())
    token_ids, probs = torch.cat(ids), torch.cat(probs)
    tokens = [[model.tokenizer.decode([t]) for t in row] for row in token_ids.tolist()]
    interp = torch.tensor([n_tokens >= 10 and is_interpretable(t) for t in tokens], dtype=torch.bool)
    return UnitDecoding(units[:, 0].clone(), units[:, 1].clone(), token_ids, tokens, probs, interp, apply_ln)


def decode_unit(model: VisionLM, layer: int, unit: int, n_tokens: int = 10,
                apply_ln: bool = False) -> UnitDecoding:
    """:func:`decode_units` for one unit."""
    return decode_units(model, [(layer, unit)], n_tokens=n_tokens, apply_ln=apply_ln)


# ---------------------------------------------------------------------------- image soft prompts
@dataclass
class ImagePromptDecoding:
    """Nearest tokens of each image soft prompt (``hook_image_embed``).

    Attributes:
        token_ids: ``[batch, patch, k]`` best first.
        tokens: ``[batch][patch][k]`` strings.
        scores: ``[batch, patch, k]`` probabilities (``method="unembed"``) or cosine similarities
            (``method="embed"``).
        method: ``"unembed"`` (logit lens: ``softmax(W_U^T ln_final(x) + b_U)``) or ``"embed"``
            (cosine similarity to the token embeddings ``W_E``).
        interpretable: ``[batch, patch]`` the unit filter applied to each prompt's top 10 (all False
            when ``n_tokens < 10``).
    """

    token_ids: Int[Tensor, "batch patch k"]
    tokens: list[list[list[str]]]
    scores: Float[Tensor, "batch patch k"]
    method: str
    interpretable: Bool[Tensor, "batch patch"]

    def __repr__(self) -> str:
        b, p, k = self.token_ids.shape
        return (f"ImagePromptDecoding({b} images x {p} patches, k={k}, method={self.method!r}, "
                f"{int(self.interpretable.sum())} interpretable; image 0 patch 0: {self.tokens[0][0][:5]})")

    def to_dataframe(self):
        """Long format: image, patch, rank, token, token_id, score."""
        import pandas as pd

        b, p, k = self.token_ids.shape
        idx = torch.arange(b * p * k)
        return pd.DataFrame({
            "image": (idx // (p * k)).numpy(), "patch": (idx // k % p).numpy(), "rank": (idx % k).numpy(),
            "token": [t for img in self.tokens for patch in img for t in patch],
            "token_id": self.token_ids.flatten().numpy(), "score": self.scores.flatten().numpy(),
        })


def token_texts(model: VisionLM, token_ids: Int[Tensor, "... k"]) -> list:
    """Token ids as texts: each row of the last axis decoded, cleaned (:func:`clean_token`) and joined by
    spaces; nested lists of the leading axes (``[batch, patch, k]`` -> ``[batch][patch]`` strings)."""
    def text(x):
        if x and isinstance(x[0], list):
            return [text(r) for r in x]
        return " ".join(clean_token(model.tokenizer.decode([t])) for t in x)
    return text(token_ids.tolist())


@torch.no_grad()
def nearest_tokens(model: VisionLM, x: Float[Tensor, "... d_model"], n_tokens: int = 5,
                   method: Literal["unembed", "embed"] = "unembed",
                   ) -> tuple[Int[Tensor, "... k"], Float[Tensor, "... k"]]:
    """The ``n_tokens`` tokens nearest to residual-stream vectors, best first (on the CPU).

    Args:
        model: A vision LM (or any HookedTransformer / TransformerBridge).
        x: Residual-stream vectors (soft prompts, or the residual stream at any layer).
        n_tokens: Tokens kept per vector.
        method: ``"unembed"``: the logit lens, ``softmax(W_U^T ln_final(x) + b_U)`` with the real final
            norm (each vector's own scale); ``"embed"``: cosine similarity to the input embeddings ``W_E``.

    Returns:
        Token ids and their scores (probabilities or cosines).
    """
    if method not in ("unembed", "embed"):
        raise ValueError(f"method must be 'unembed' or 'embed', got {method!r}")
    check_int(n_tokens, "n_tokens", maximum=model.cfg.d_vocab)
    if method == "unembed":
        scores = model.unembed(model.ln_final(x) if hasattr(model, "ln_final") else x).float().softmax(-1)
    else:
        scores = torch.nn.functional.normalize(x.float(), dim=-1) @ \
            torch.nn.functional.normalize(model.W_E.float(), dim=-1).T
    vals, ids = scores.topk(n_tokens, dim=-1)
    return ids.cpu(), vals.cpu()


@torch.no_grad()
def decode_image_prompts(model: VisionLM, images=None, image_features=None, n_tokens: int = 5,
                         method: Literal["unembed", "embed"] = "unembed") -> ImagePromptDecoding:
    """Decode the image soft prompts themselves (the paper: they are *not* decodable).

    Args:
        model: A vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`).
        images, image_features: As for the model's forward (exactly one).
        n_tokens: Tokens kept per prompt (the paper: 5 nearest).
        method: ``"unembed"``: logit lens, ``softmax(W_U^T ln_final(x) + b_U)`` with the real final
            norm (each prompt is a real residual vector, so its own scale is used);
            ``"embed"``: cosine similarity to the input embeddings ``W_E``.

    Returns:
        An :class:`ImagePromptDecoding`.
    """
    check_int(n_tokens, "n_tokens")
    x = soft_prompts(model, images, image_features)  # [batch, patch, d_model]
    ids, vals = nearest_tokens(model, x, n_tokens, method)
    tokens = [[[model.tokenizer.decode([t]) for t in patch] for patch in img] for img in ids.tolist()]
    interp = torch.tensor([[n_tokens >= 10 and is_interpretable(p) for p in img] for img in tokens], dtype=torch.bool)
    return ImagePromptDecoding(ids, tokens, vals, method, interp.reshape(ids.shape[:2]))


def unit_texts(model: VisionLM, units: Int[Tensor, "n_images n_units 2"], n_tokens: int = 10, sae=None,
               ) -> tuple[list[list[str]], Bool[Tensor, "n_images n_units"]]:
    """Each unit's text: its top ``n_tokens`` decoded tokens, cleaned, joined by spaces.

    Args:
        model: The vision LM (units decoded through its unembedding, :func:`decode_units`).
        units: Per image, its ``(layer, unit)`` rows.
        n_tokens: Tokens per unit (the paper's filter needs 10).
        sae: An SAE or a list of them: the units are their latents (:func:`decode_units`).

    Returns:
        Per image, the texts of its interpretable units (in the order of ``units``), and the
        ``[n_images, n_units]`` interpretable mask.
    """
    if not isinstance(units, Tensor) or units.ndim != 3 or units.shape[-1] != 2:
        raise ValueError(f"units must be a [n_images, n_units, 2] tensor, got "
                         f"{tuple(units.shape) if isinstance(units, Tensor) else type(units).__name__}")
    n, k = units.shape[:2]
    dec = decode_units(model, units.reshape(-1, 2), n_tokens=n_tokens, sae=sae)
    interp = dec.interpretable.reshape(n, k)
    texts = [" ".join(clean_token(t) for t in toks) for toks in dec.tokens]
    return [[texts[i * k + r] for r in range(k) if interp[i, r]] for i in range(n)], interp
