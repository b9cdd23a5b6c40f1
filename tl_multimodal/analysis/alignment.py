"""Implicit multimodal alignment (Shukor & Cord, 2024): how image tokens sit among text tokens inside
the frozen LM, layer by layer.

For each block ``l`` it reads the residual stream ``blocks.{l}.hook_resid_pre`` at the image
positions and at the caption's text positions of ``[image slots][caption]`` sequences, and measures

- **alignment**: the cosine of the mean image token with the mean text token (``mean_cos``), and the
  mean cosine over all (image token, text token) pairs (``pair_cos``), for an image with its own
  caption and with the other captions of the batch (``*_other``); ``retrieval`` is how often an
  image's own caption has the highest ``pair_cos`` among all captions;
- **separability**: balanced accuracy of a nearest-centroid classifier of image vs text tokens
  (on unit vectors: the direction counts, not the norm), leave-one-sample-out;
- **stability**: the cosine of each token's residual before and after block ``l``
  (``resid_pre`` vs ``resid_post``), at image and at text positions;
- the mean residual norm at image and at text positions.

:func:`soft_prompt_norms` compares the projected image tokens' norms with the text token embeddings'.

    al = alignment(model, captions, images=pil_images)   # Alignment, one row per block
    al.to_dataframe()
    soft_prompt_norms(model, images=pil_images)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_multimodal.models.images import Images


# ---------------------------------------------------------------------------- results
@dataclass
class Alignment:
    """Per-block alignment measures, averaged over the images (each row is block ``l``'s input).

    Attributes:
        mean_cos: ``[n_layers]`` cosine of the mean image token with the mean token of its caption.
        mean_cos_other: Same with the other captions of the set (mean over them).
        pair_cos: ``[n_layers]`` mean cosine over (image token, own caption token) pairs.
        pair_cos_other: Same with the other captions' tokens.
        retrieval: ``[n_layers]`` fraction of images whose own caption has the highest ``pair_cos``.
        separability: ``[n_layers]`` nearest-centroid balanced accuracy, image vs text tokens
            scaled to unit norm (0.5: indistinguishable, 1: separate), leave-one-sample-out.
        image_step_cos, text_step_cos: ``[n_layers]`` cosine of a token's residual before and after
            the block, mean over image (text) positions.
        image_norm, text_norm: ``[n_layers]`` mean residual norm at image (text) positions.
        n_images: Images (= captions) measured.
    """

    mean_cos: Float[Tensor, "layer"]
    mean_cos_other: Float[Tensor, "layer"]
    pair_cos: Float[Tensor, "layer"]
    pair_cos_other: Float[Tensor, "layer"]
    retrieval: Float[Tensor, "layer"]
    separability: Float[Tensor, "layer"]
    image_step_cos: Float[Tensor, "layer"]
    text_step_cos: Float[Tensor, "layer"]
    image_norm: Float[Tensor, "layer"]
    text_norm: Float[Tensor, "layer"]
    n_images: int

    def to_dataframe(self) -> pd.DataFrame:
        """One row per block: ``layer`` and every measure."""
        cols = {f.name: getattr(self, f.name).tolist() for f in fields(self) if f.name != "n_images"}
        return pd.DataFrame({"layer": range(len(self.mean_cos)), **cols})

    def __repr__(self) -> str:
        df = self.to_dataframe().round(3).to_string(index=False)
        return f"Alignment({self.n_images} images, {len(self.mean_cos)} layers)\n{df}"

    def plot(self, title: str | None = None):
        """A 2x2 matplotlib figure: alignment, separability, stability and norms against the layer.

        Returns:
            The matplotlib Figure.
        """
        import matplotlib.pyplot as plt

        layer = range(len(self.mean_cos))
        fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
        panels = [
            ("cosine, image tokens vs caption tokens", [
                ("mean token, own caption", self.mean_cos, "C0", "-"),
                ("mean token, other captions", self.mean_cos_other, "C0", "--"),
                ("token pairs, own caption", self.pair_cos, "C1", "-"),
                ("token pairs, other captions", self.pair_cos_other, "C1", "--")]),
            ("image vs text tokens", [
                ("separability (nearest centroid)", self.separability, "C2", "-"),
                ("retrieval (own caption closest)", self.retrieval, "C4", "-")]),
            ("cosine of a token before vs after the block", [
                ("image tokens", self.image_step_cos, "C3", "-"),
                ("text tokens", self.text_step_cos, "C7", "-")]),
            ("mean residual norm (log)", [
                ("image tokens", self.image_norm, "C3", "-"), ("text tokens", self.text_norm, "C7", "-")]),
        ]
        for ax, (name, lines) in zip(axes.flat, panels):
            for label, y, color, style in lines:
                ax.plot(layer, y.tolist(), style, color=color, label=label)
            ax.set_title(name, fontsize=10)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        axes[1, 1].set_yscale("log")
        for ax in axes[1]:
            ax.set_xlabel("layer (residual stream before the block)")
        fig.suptitle(title or f"implicit multimodal alignment, {self.n_images} images")
        fig.tight_layout()
        return fig


@dataclass
class SoftPromptNorms:
    """Norms of the projected image tokens next to those of the text token embeddings.

    Attributes:
        image: ``[batch, patch]`` L2 norm of each soft-prompt token.
        text: ``[d_vocab]`` L2 norm of each row of ``W_E``.
    """

    image: Float[Tensor, "batch patch"]
    text: Float[Tensor, "vocab"]

    @property
    def ratio(self) -> float:
        """Median soft-prompt norm over median text embedding norm."""
        return float(self.image.median() / self.text.median())

    def to_dataframe(self) -> pd.DataFrame:
        """Rows ``soft prompt`` and ``text embedding``: n, mean, median, min, max."""
        rows = []
        for name, x in (("soft prompt", self.image.flatten()), ("text embedding", self.text)):
            rows.append({"tokens": name, "n": x.numel(), "mean": float(x.mean()), "median": float(x.median()),
                         "min": float(x.min()), "max": float(x.max())})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (f"SoftPromptNorms(median ratio {self.ratio:.1f}x)\n"
                f"{self.to_dataframe().round(3).to_string(index=False)}")


# ---------------------------------------------------------------------------- measures
def soft_prompt_norms(model, images: Images | None = None,
                      image_features: Float[Tensor, "batch patch d_img"] | None = None) -> SoftPromptNorms:
    """Norms of the soft prompts ``model.embed_images(...)`` and of the text embeddings ``W_E``.

    Args:
        model: A vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`: HookedVisionPrefix or VisionBridge).
        images, image_features: As for ``model.embed_images`` (exactly one).
    """
    with torch.no_grad():
        embed = model.embed_images(images, image_features)
        return SoftPromptNorms(image=embed.float().norm(dim=-1).cpu(),
                               text=model.W_E.float().norm(dim=-1).cpu())


def _check_captions(captions, n_images: int) -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of strings (one per image), got {type(captions).__name__}")
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError("captions must be non-empty strings")
    if len(captions) != n_images:
        raise ValueError(f"{len(captions)} captions for {n_images} images: give one caption per image")
    if n_images < 2:
        raise ValueError("alignment needs at least 2 images (other captions, leave-one-out)")
    return list(captions)


def residuals(model, captions: Sequence[str], images: Images | None = None,
              image_features: Float[Tensor, "batch patch d_img"] | None = None, batch_size: int = 8,
              ) -> tuple[Float[Tensor, "batch layer1 patch d_model"], list[Float[Tensor, "layer1 text d_model"]]]:
    """The residual stream of each ``[image slots][caption]`` sequence, split by modality.

    Args:
        model: A vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`: HookedVisionPrefix or VisionBridge).
        captions: One caption per image.
        images, image_features: As for the model's forward (exactly one).
        batch_size: Sequences per forward pass.

    Returns:
        ``(image, text)``: ``image[b, l]`` the residuals at image positions before block ``l``
        (``l = n_layers``: after the last block), float32 on the CPU; ``text[b]`` the same at the
        caption's text positions of sequence ``b``. They take ``4 * (n_layers + 1) * d_model`` bytes
        per token: about 150 MB for 35 images (49 tokens and a short caption each) with SmolLM2-135M.
    """
    with torch.no_grad():
        embed = model.embed_images(images, image_features)
    captions = _check_captions(captions, embed.shape[0])
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    image, text = [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        tokens = model.to_tokens(chunk, image=True, padding_side="right")
        lengths = [model.to_tokens(c, image=True).shape[1] for c in chunk]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, image_embed=embed[start:start + batch_size],
                                            names_filter=lambda n: n in names)
        resid = torch.stack([cache[n] for n in names], dim=1).float().cpu()  # [b, layer + 1, pos, d]
        slots = model.image_mask(tokens).cpu()
        for b, length in enumerate(lengths):
            last_slot = int(slots[b].nonzero().max())
            image.append(resid[b][:, slots[b]])
            text.append(resid[b][:, last_slot + 1:length])
    return torch.stack(image), text


def _nearest_centroid_accuracy(image: Tensor, text: list[Tensor]) -> Tensor:
    """Per-layer balanced accuracy of nearest-centroid on unit vectors, leave-one-sample-out.

    ``image`` is ``[batch, layer, patch, d]``, ``text[b]`` is ``[layer, n_b, d]``. Tokens are
    scaled to unit norm (the direction is compared, not the norm); a centroid is the mean unit
    vector of one modality's tokens in the other samples; a token goes to the nearer centroid
    (Euclidean), ties to text.
    """
    u_img = F.normalize(image, dim=-1)
    u_txt = [F.normalize(t, dim=-1) for t in text]
    img_sums = u_img.sum(2)  # [batch, layer, d]
    txt_sums = torch.stack([u.sum(1) for u in u_txt])  # [batch, layer, d]
    n_img = torch.full((len(text),), float(image.shape[2]))
    n_txt = torch.tensor([float(t.shape[1]) for t in text])
    hit_img = torch.zeros(image.shape[1])
    hit_txt = torch.zeros(image.shape[1])
    for b in range(image.shape[0]):
        c_img = (img_sums.sum(0) - img_sums[b]) / (n_img.sum() - n_img[b])  # [layer, d]
        c_txt = (txt_sums.sum(0) - txt_sums[b]) / (n_txt.sum() - n_txt[b])
        # |u - c_img|^2 < |u - c_txt|^2  <=>  2 u.(c_img - c_txt) > |c_img|^2 - |c_txt|^2
        w, bias = 2 * (c_img - c_txt), (c_img ** 2).sum(-1) - (c_txt ** 2).sum(-1)
        hit_img += (torch.einsum("lnd,ld->ln", u_img[b], w) > bias[:, None]).float().sum(-1)
        hit_txt += (torch.einsum("lnd,ld->ln", u_txt[b], w) <= bias[:, None]).float().sum(-1)
    return 0.5 * (hit_img / n_img.sum() + hit_txt / n_txt.sum())


def _kept_image_tokens(exclude: Sequence[int], n_image_tokens: int) -> list[int]:
    ints = not isinstance(exclude, (int, str)) and all(type(i) is int for i in exclude)
    if not ints:
        raise TypeError(f"exclude_image_tokens must be a sequence of ints, got {exclude!r}")
    bad = [i for i in exclude if not 0 <= i < n_image_tokens]
    if bad:
        raise ValueError(f"exclude_image_tokens {bad} out of range: image tokens are 0..{n_image_tokens - 1}")
    keep = [i for i in range(n_image_tokens) if i not in set(exclude)]
    if not keep:
        raise ValueError("exclude_image_tokens leaves no image token")
    return keep


def alignment(model, captions: Sequence[str], images: Images | None = None,
              image_features: Float[Tensor, "batch patch d_img"] | None = None,
              batch_size: int = 8, exclude_image_tokens: Sequence[int] = ()) -> Alignment:
    """Implicit multimodal alignment of images with their captions, per block (Shukor & Cord, 2024).

    Each image is run with its own caption, ``[image slots][caption]``. Image tokens come first, so
    their residuals do not depend on the caption; text residuals are those of each caption after its
    own image. "Other" captions are the other captions of the set, read from their own sequences.

    Args:
        model: A vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`: HookedVisionPrefix or VisionBridge).
        captions: One caption per image (at least two images).
        images, image_features: As for the model's forward (exactly one).
        batch_size: Sequences per forward pass.
        exclude_image_tokens: Image token indices (``0 .. n_image_tokens - 1``) to leave out of
            every measure, e.g. ``(0,)``: without a BOS the first image token becomes the
            attention sink, with a residual norm far above the others.

    Returns:
        An :class:`Alignment`, one value per block for each measure (see there).
    """
    keep = _kept_image_tokens(exclude_image_tokens, model.n_image_tokens)
    image, text = residuals(model, captions, images, image_features, batch_size)
    image = image[:, :, keep]
    resid_pre, n = slice(0, -1), image.shape[0]
    # [batch, layer + 1, d]: mean tokens, and mean unit vectors (their dot product = mean pairwise cosine)
    img_mean, txt_mean = image.mean(2), torch.stack([t.mean(1) for t in text])
    img_unit = F.normalize(image, dim=-1).mean(2)
    txt_unit = torch.stack([F.normalize(t, dim=-1).mean(1) for t in text])
    mean_mat = torch.einsum("ild,jld->lij", F.normalize(img_mean, dim=-1), F.normalize(txt_mean, dim=-1))
    pair_mat = torch.einsum("ild,jld->lij", img_unit, txt_unit)  # [layer + 1, image, caption]
    own = torch.eye(n, dtype=torch.bool)

    def own_and_other(mat):
        return mat[:, own].mean(-1)[resid_pre], mat[:, ~own].mean(-1)[resid_pre]

    mean_cos, mean_cos_other = own_and_other(mean_mat)
    pair_cos, pair_cos_other = own_and_other(pair_mat)
    retrieval = (pair_mat.argmax(-1) == torch.arange(n)).float().mean(-1)[resid_pre]
    img_step = F.cosine_similarity(image[:, :-1], image[:, 1:], dim=-1).mean((0, 2))
    txt_step = torch.cat([F.cosine_similarity(t[:-1], t[1:], dim=-1) for t in text], dim=1).mean(1)
    return Alignment(
        mean_cos=mean_cos, mean_cos_other=mean_cos_other, pair_cos=pair_cos, pair_cos_other=pair_cos_other,
        retrieval=retrieval,
        separability=_nearest_centroid_accuracy(image[:, resid_pre], [t[resid_pre] for t in text]),
        image_step_cos=img_step, text_step_cos=txt_step,
        image_norm=image.norm(dim=-1).mean((0, 2))[resid_pre],
        text_norm=torch.cat([t.norm(dim=-1) for t in text], dim=1).mean(1)[resid_pre],
        n_images=n,
    )
