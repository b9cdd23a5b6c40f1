"""The logit lens by depth at the image positions: what the residual stream there decodes to, layer by layer.

At every depth ``l`` (``blocks.{l}.hook_resid_pre`` for ``l < n_layers``; ``l = n_layers`` is the last
block's ``hook_resid_post``, so the model's own logits), each image position's residual vector goes
through the final norm (its own scale, as the model applies it) and the unembedding
(:func:`~tl_multimodal.analysis.decoding.nearest_tokens`); depth 0 is the soft prompt itself (plus
position embeddings where the LM adds them). The model runs on the image slots alone
(``to_tokens("", image=True)``): under causal attention text after the image cannot change them.

    lens = image_logit_lens(model, images, n_tokens=5)
    lens.texts(model)[12][0][3]      # depth 12, image 0, patch 3: its 5 tokens joined
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.decoding import nearest_tokens, token_texts
from tl_multimodal.models.protocol import VisionLM, soft_prompts


def resid_name(model: VisionLM, depth: int) -> str:
    """The hook of depth ``depth``: ``blocks.{depth}.hook_resid_pre``, or the last block's ``hook_resid_post``."""
    n = model.cfg.n_layers
    return f"blocks.{depth}.hook_resid_pre" if depth < n else f"blocks.{n - 1}.hook_resid_post"


@dataclass(repr=False)
class ImageLens:
    """Top tokens of the residual stream at the image positions, per depth.

    Attributes:
        token_ids: ``[depth, batch, patch, k]`` best first; depth ``l`` is ``blocks.{l}.hook_resid_pre``,
            the last one the final ``hook_resid_post``.
        probs: ``[depth, batch, patch, k]`` their probabilities (softmax over the vocabulary).
    """

    token_ids: Int[Tensor, "depth batch patch k"]
    probs: Float[Tensor, "depth batch patch k"]

    def texts(self, model: VisionLM) -> list[list[list[str]]]:
        """``[depth][image][patch]``: each position's tokens, cleaned and joined by spaces."""
        return token_texts(model, self.token_ids)

    def to_dataframe(self):
        """Long format: depth, image, patch, rank, token_id, prob."""
        import pandas as pd

        d, b, p, k = self.token_ids.shape
        idx = torch.arange(d * b * p * k)
        return pd.DataFrame({"depth": (idx // (b * p * k)).numpy(), "image": (idx // (p * k) % b).numpy(),
                             "patch": (idx // k % p).numpy(), "rank": (idx % k).numpy(),
                             "token_id": self.token_ids.flatten().numpy(), "prob": self.probs.flatten().numpy()})

    def __repr__(self) -> str:
        d, b, p, k = self.token_ids.shape
        return f"ImageLens({d} depths x {b} images x {p} patches, top {k} tokens)"


@torch.no_grad()
def image_logit_lens(model: VisionLM, images=None, image_features: Tensor | None = None, *,
                     image_embed: Tensor | None = None, n_tokens: int = 5, batch_size: int = 8) -> ImageLens:
    """The logit lens at the image positions, every depth from the soft prompts to the final residual stream.

    Args:
        model: The vision LM.
        images, image_features, image_embed: The images, their encoder features or their soft prompts
            (exactly one).
        n_tokens: Tokens kept per position and depth.
        batch_size: Images per forward pass.

    Returns:
        An :class:`ImageLens` with ``n_layers + 1`` depths.
    """
    check_int(n_tokens, "n_tokens", maximum=model.cfg.d_vocab_out)
    check_int(batch_size, "batch_size")
    emb = soft_prompts(model, images, image_features, image_embed)
    tokens = model.to_tokens("", image=True)
    mask = model.image_mask(tokens)[0]
    names = [resid_name(model, d) for d in range(model.cfg.n_layers + 1)]
    ids, probs = [], []
    for chunk in emb.split(batch_size):
        _, cache = model.run_with_cache(tokens.expand(len(chunk), -1), image_embed=chunk, names_filter=names)
        per = [nearest_tokens(model, cache[name][:, mask.to(cache[name].device)], n_tokens) for name in names]
        ids.append(torch.stack([i for i, _ in per]))
        probs.append(torch.stack([p for _, p in per]))
    return ImageLens(torch.cat(ids, 1), torch.cat(probs, 1))
