"""A minimal SAE trainer in plain PyTorch, and the reconstruction measurements.

:func:`train_sae` fits a TopK SAE (``f = TopK(relu((x - b_dec) W_enc + b_enc))``, loss ``||x - decode(f)||^2``;
no sparsity penalty to tune: ``k`` sets the L0) to a matrix of activations: ``b_dec`` starts at the
activations' mean, ``W_enc`` at ``W_dec^T`` with unit-norm decoder rows, which are kept at unit norm after
each Adam step. :func:`reconstruction_stats` gives explained variance and L0.

    sae = train_sae(acts, hook_name="blocks.15.hook_resid_post", d_sae=1152, k=32)
    reconstruction_stats(sae, dev_acts)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_multimodal._validate import check_int, check_number
from tl_multimodal.sae.model import SAE, SAEConfig


@dataclass
class ReconstructionStats:
    """How well an SAE reconstructs a set of activations.

    Attributes:
        explained_variance: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
        l0: Mean number of non-zero latents per activation.
        mse: Mean squared error per element.
        n: Activations measured.
    """

    explained_variance: float
    l0: float
    mse: float
    n: int

    def to_dataframe(self):
        """One row: explained_variance, l0, mse, n."""
        import pandas as pd

        return pd.DataFrame([self.__dict__])


@torch.no_grad()
def reconstruction_stats(sae: SAE, acts: Float[Tensor, "n d_in"], batch_size: int = 4096) -> ReconstructionStats:
    """Explained variance, L0 and MSE of ``sae`` on ``acts`` (rows are activations).

    Raises:
        ValueError: ``acts`` is not ``[n, d_in]`` with ``n >= 2``.
    """
    _check_acts(sae.cfg.d_in, acts)
    acts = acts.to(sae.W_dec.dtype)
    err = l0 = 0.0
    for chunk in acts.split(batch_size):
        f = sae.encode(chunk)
        err += (chunk - sae.decode(f, chunk)).pow(2).sum().item()
        l0 += (f != 0).sum().item()
    total = (acts - acts.mean(0)).pow(2).sum().item()
    return ReconstructionStats(1 - err / total, l0 / len(acts), err / acts.numel(), len(acts))


def _check_acts(d_in: int, acts) -> None:
    if not isinstance(acts, Tensor) or not acts.is_floating_point():
        raise TypeError(f"acts must be a float tensor [n, d_in], got {type(acts).__name__}")
    if acts.ndim != 2 or acts.shape[1] != d_in or len(acts) < 2:
        raise ValueError(f"acts must be [n >= 2, d_in={d_in}], got {tuple(acts.shape)}")
    if not torch.isfinite(acts).all():
        raise ValueError("acts contain NaN or infinite values")


def train_sae(acts: Float[Tensor, "n d_in"], hook_name: str, d_sae: int, k: int = 32, steps: int = 2000,
              batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, model_name: str | None = None,
              on_step=None) -> SAE:
    """Train a TopK SAE on ``acts``.

    Args:
        acts: ``[n, d_in]`` activations (e.g. a hook's values at chosen positions), shuffled by the trainer.
        hook_name: The hook they come from (stored in the SAE's config).
        d_sae: Number of latents.
        k: Latents active per activation.
        steps: Adam steps.
        batch_size: Activations per step (sampled without replacement within each pass over ``acts``).
        lr: Adam's learning rate.
        seed: Seeds the initialisation and the sampling.
        model_name: Stored in the config.
        on_step: Called as ``on_step(step, loss)`` after every step (progress).

    Returns:
        The SAE in eval mode (float32).
    """
    check_int(d_sae, "d_sae")
    check_int(k, "k", maximum=d_sae)
    check_int(steps, "steps")
    check_int(batch_size, "batch_size")
    check_number(lr, "lr", minimum=0.0)
    _check_acts(acts.shape[-1] if isinstance(acts, Tensor) and acts.ndim == 2 else -1, acts)
    acts = acts.float()
    d_in = acts.shape[1]
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    cfg = SAEConfig("topk", d_in, d_sae, hook_name, k=k, apply_b_dec_to_input=True, model_name=model_name)
    sae = SAE(cfg, {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
                    "b_dec": acts.mean(0)}).train()
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    order = torch.randperm(len(acts), generator=gen)
    at = 0
    for step in range(steps):
        if at + batch_size > len(acts):
            order, at = torch.randperm(len(acts), generator=gen), 0
        x = acts[order[at:at + batch_size]]
        at += batch_size
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        if on_step is not None:
            on_step(step, loss.item())
    return sae.eval()
