"""Training the LiMBeR projection, and the caption log-likelihood that measures it.

Only the projection learns: the LM and the encoder are frozen. Encoder features are computed once
per image and kept, so a training step runs only the projection and the LM. The loss is next-token
cross-entropy on caption tokens (image positions are never targets), as in LiMBeR.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_multimodal.prefix import HookedVisionPrefix


@dataclass
class TrainingResult:
    """Losses of a :func:`train_projection` run.

    Attributes:
        train_losses: Mean caption NLL per token of every step.
        dev_losses: ``(step, dev NLL per token)`` at each evaluation.
        steps: Steps taken.
        checkpoints: Paths of the saved projections.
    """

    train_losses: list[float]
    dev_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    checkpoints: list[Path] = field(default_factory=list)

    def __repr__(self) -> str:
        last = f"{self.train_losses[-1]:.3f}" if self.train_losses else "-"
        dev = f", dev {self.dev_losses[-1][1]:.3f}" if self.dev_losses else ""
        return f"TrainingResult(steps={self.steps}, train loss {last}{dev})"


@torch.no_grad()
def encode_images(model: HookedVisionPrefix, dataset: datasets.Dataset, image_column: str = "image",
                  batch_size: int = 32, progress: bool = True) -> Float[Tensor, "n patch d_img"]:
    """Encoder features of every image of ``dataset`` (computed once, kept on the CPU)."""
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding images", disable=not progress):
        images = dataset[start:start + batch_size][image_column]
        out.append(model.vision(model.preprocess(images)).float().cpu())
    return torch.cat(out)


def _captions(dataset: datasets.Dataset, column: str) -> list[list[str]]:
    captions = [[c] if isinstance(c, str) else list(c) for c in dataset[column]]
    for i, options in enumerate(captions):
        if not options or any(not c.strip() for c in options):
            raise ValueError(f"row {i} of the dataset has an empty caption")
    return captions


def _caption_batch(model: HookedVisionPrefix, captions: list[str], with_image: bool = True):
    """Right-padded tokens of ``captions`` (+ end-of-text) and the mask of their real positions."""
    eos = model.tokenizer.eos_token or ""
    texts = [c.strip() + eos for c in captions]
    if with_image:
        tokens = model.to_tokens(texts, image=True, padding_side="right")
        start = model.n_image_tokens
    else:  # text only: the LM's own start token in the image's place
        first = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.eos_token_id
        tokens = model.to_tokens(texts, prepend_bos=False, padding_side="right", truncate=False)
        tokens = torch.cat([torch.full_like(tokens[:, :1], first), tokens], dim=1)
        start = 1
    lengths = torch.tensor([start + model.to_tokens(t, prepend_bos=False, truncate=False).shape[1] for t in texts])
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    return tokens, mask.to(tokens.device)


def caption_nll(model: HookedVisionPrefix, captions: list[str],
                image_features: Float[Tensor, "batch patch d_img"] | None = None,
                batch_size: int = 16) -> float:
    """Mean negative log-likelihood per caption token (end-of-text included), in nats.

    Args:
        model: The model.
        captions: One caption per row.
        image_features: Encoder features per caption; ``None`` scores the captions as plain text
            after the LM's start token (no image).
        batch_size: Rows per forward pass.
    """
    if image_features is not None and len(image_features) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(image_features)} images")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(captions), batch_size):
            tokens, mask = _caption_batch(model, captions[s:s + batch_size], image_features is not None)
            kwargs = {} if image_features is None else {"image_features": image_features[s:s + batch_size]}
            nll = model(tokens, return_type="loss", loss_per_token=True, attention_mask=mask, **kwargs)
            targets = mask[:, 1:].bool() & ~model.image_mask(tokens[:, 1:])
            total += nll[targets].sum().item()
            count += targets.sum().item()
    model.train(was_training)
    return total / count


def train_projection(model: HookedVisionPrefix, dataset: datasets.Dataset, *, steps: int = 15_000,
                     batch_size: int = 256, lr: float = 8e-4, warmup: int = 100, weight_decay: float = 0.0,
                     clip: float = 1.0, dev_dataset: datasets.Dataset | None = None, eval_every: int = 500,
                     checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
                     image_column: str = "image", caption_column: str = "captions",
                     device: str | torch.device | None = None, mixed_precision: bool | None = None,
                     seed: int = 0, progress: bool = True, dataset_name: str = "") -> TrainingResult:
    """Train ``model.projection`` on image-caption pairs (LiMBeR's optimiser settings as defaults).

    Args:
        model: The model; only its projection is trained, everything else is frozen.
        dataset: Rows with an image column (PIL or path) and a caption column (a string or a list of
            strings, one sampled per step).
        steps, batch_size, lr, warmup, weight_decay, clip: AdamW with linear warmup then a constant
            rate, gradient-norm clipping (LiMBeR: 15k steps, batch 256, lr 8e-4, warmup 100, wd 0, clip 1).
        dev_dataset: Rows to evaluate the caption NLL on every ``eval_every`` steps (first caption).
        checkpoint_dir: Where to save ``projection_step{N}.pt`` every ``checkpoint_every`` steps
            and ``projection.pt`` at the end.
        device: Where to train; default CUDA when present, else the model's device.
        mixed_precision: bf16 autocast; default on when training on CUDA.
        seed: Seeds caption sampling, batch order and dropout.
        dataset_name: Recorded in the checkpoint metadata.

    Returns:
        The losses; the trained projection is in ``model.projection`` (with its training record).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else model.W_E.device))
    mixed_precision = device.type == "cuda" if mixed_precision is None else mixed_precision
    if model.W_E.device != device:
        model.to(device)
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    model.projection.requires_grad_(True)
    captions = _captions(dataset, caption_column)
    features = encode_images(model, dataset, image_column, progress=progress)
    dev = None
    if dev_dataset is not None:
        dev = (encode_images(model, dev_dataset, image_column, progress=progress),
               [c[0] for c in _captions(dev_dataset, caption_column)])

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.projection.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    result = TrainingResult(train_losses=[])
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    order: list[int] = []

    def record() -> dict:  # the training record saved with the projection
        last = result.train_losses[-100:]
        return {"dataset": dataset_name, "n_images": len(captions), "steps": result.steps,
                "batch_size": batch_size, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
                "clip": clip, "seed": seed, "train_loss_last100": sum(last) / len(last),
                "dev_nll": result.dev_losses[-1][1] if result.dev_losses else None}

    bar = tqdm(range(1, steps + 1), desc="training projection", disable=not progress)
    model.train()
    for step in bar:
        if len(order) < batch_size:
            order += rng.sample(range(len(captions)), len(captions))
        idx, order = order[:batch_size], order[batch_size:]
        tokens, mask = _caption_batch(model, [rng.choice(captions[i]) for i in idx])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
            loss = model(tokens.to(device), image_features=features[idx].to(device), return_type="loss",
                         attention_mask=mask.to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.projection.parameters(), clip)
        opt.step()
        sched.step()
        result.train_losses.append(loss.item())
        result.steps = step
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if dev is not None and (step % eval_every == 0 or step == steps):
            result.dev_losses.append((step, caption_nll(model, dev[1], dev[0])))
            bar.write(f"step {step}: dev NLL/token {result.dev_losses[-1][1]:.4f}")
        if ckpt_dir is not None and checkpoint_every and step % checkpoint_every == 0:
            model.projection.info.training = record()
            result.checkpoints.append(ckpt_dir / f"projection_step{step}.pt")
            model.projection.save(result.checkpoints[-1])
    model.projection.info.training = record()
    model.eval()
    for p, flag in frozen.items():
        p.requires_grad_(flag)
    if ckpt_dir is not None:
        result.checkpoints.append(ckpt_dir / "projection.pt")
        model.projection.save(result.checkpoints[-1])
    return result
