"""What projection training at CC3M scale should take on one and on eight GPUs: an ESTIMATE.

No GPU was measured. The script measures one training step on this CPU (the offline SmolLM2-135M +
EfficientNet-Lite0, features precomputed as with a feature cache, 1 thread, thread CPU time, median),
counts the step's floating-point operations, and scales by an assumed GPU throughput:

  FLOPs of a step = forward + backward of the frozen LM over ``image tokens + caption tokens`` per row.
    forward: 2 x (matmul weights of the blocks) per token + attention 4 x layers x T^2 x d_model per row
             + unembedding 2 x d_model x vocab per caption-token target;
    backward: the same again (gradients flow to the soft prompt only; no weight gradients: x 1, not x 2).
  The measured step gives this CPU's achieved FLOP/s (a check of the count, not of the GPU).
  Caption length: the mean COCO caption in SmolLM2 tokens (GPT-J's tokenizer is close to it). The
  encoder (EfficientNet-Lite0 is a CNN: its count 2 x weights x 49 is a rough stand-in) runs once
  per image with a feature cache.
  GPU time = FLOPs / (peak bf16 dense FLOP/s x utilisation); eight GPUs: data parallel, x scaling efficiency.

    HF_HUB_OFFLINE=1 python benchmarks/bench_scale.py [--data-dir ../shared/data/coco_mini] [--batch 8]
        [--gpu-tflops 989] [--utilisation 0.35] [--scaling 0.9]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
CC3M_IMAGES = 3_300_000
LIMBER_STEPS, LIMBER_BATCH = 15_000, 256


def step_flops(block_weights: float, n_layers: int, d_model: int, d_vocab: int, n_image: int,
               caption_tokens: float) -> float:
    """FLOPs of one row (forward + backward of a frozen LM) with ``n_image`` soft-prompt tokens."""
    t = n_image + caption_tokens
    forward = 2 * block_weights * t + 4 * n_layers * t * t * d_model + 2 * d_model * d_vocab * caption_tokens
    return 2 * forward


def encoder_flops(weights: float, tokens: int) -> float:
    """Forward FLOPs of a frozen encoder on one image (run once per image with a feature cache)."""
    return 2 * weights * tokens


def _duration(flops: float, tflops: float) -> str:
    seconds = flops / (tflops * 1e12)
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=ROOT.parent / "shared" / "data" / "coco_mini", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="assumed peak bf16 dense TFLOP/s (H100 SXM)")
    p.add_argument("--utilisation", type=float, default=0.35, help="assumed fraction of peak reached")
    p.add_argument("--scaling", type=float, default=0.9, help="assumed efficiency of 8-GPU data parallelism")
    args = p.parse_args()

    import torch
    from _timing import interleaved

    from tl_multimodal.data.sources import load_coco_mini
    from tl_multimodal.pretrained.load import load
    from tl_multimodal.training.features import encode_images
    from tl_multimodal.training.nll import _batch, _caption_ids, caption_token_nll

    torch.set_num_threads(1)
    model = load("offline", projection=False)  # untrained
    data = load_coco_mini(args.data_dir, "train")
    ids = [r[0] for r in _caption_ids(model, [c[0] for c in data["captions"]], "captions", model.n_image_tokens)]
    cap_tokens = sum(map(len, ids)) / len(ids)  # with end-of-text
    rows = data.select(range(args.batch))
    features = encode_images(model, rows, progress=False)
    model.requires_grad_(False)
    model.projection.requires_grad_(True)
    params = list(model.projection.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    tokens, mask = _batch(model, ids[:args.batch])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = caption_token_nll(model, tokens, mask, features).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def encode():
        encode_images(model, rows, batch_size=args.batch, progress=False)

    model.train()
    t = interleaved({"step": step, "encode": encode}, repeats=args.repeats)
    cfg = model.cfg
    block_weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim >= 2)
    per_row = step_flops(block_weights, cfg.n_layers, cfg.d_model, cfg.d_vocab, model.n_image_tokens, cap_tokens)
    measured_rows = sum(len(r) for r in ids[:args.batch])
    batch_flops = sum(step_flops(block_weights, cfg.n_layers, cfg.d_model, cfg.d_vocab, model.n_image_tokens, len(r))
                      for r in ids[:args.batch])
    enc_weights = sum(p.numel() for p in model.vision.parameters())
    print(f"measured on CPU (1 thread, thread time, median of {args.repeats}): SmolLM2-135M + EfficientNet-Lite0, "
          f"batch {args.batch}, {model.n_image_tokens} image + {measured_rows / args.batch:.1f} caption tokens per row")
    print(f"  training step {t['step']:.2f} s = {batch_flops / 1e9:.1f} GFLOP counted -> "
          f"{batch_flops / t['step'] / 1e9:.1f} GFLOP/s achieved; encoder {t['encode'] / args.batch * 1e3:.0f} ms/image")
    print(f"  CPU, 1 thread, LiMBeR schedule ({LIMBER_STEPS} steps x {LIMBER_BATCH}): "
          f"{t['step'] / args.batch * LIMBER_BATCH * LIMBER_STEPS / 86400:.0f} days")

    gpu = args.gpu_tflops * args.utilisation
    print(f"\nESTIMATE, not measured: GPU at {args.gpu_tflops:.0f} TFLOP/s bf16 peak x {args.utilisation:.0%} "
          f"utilisation = {gpu:.0f} TFLOP/s; 8 GPUs at {args.scaling:.0%} scaling; "
          f"mean COCO caption {cap_tokens:.1f} tokens; LiMBeR schedule {LIMBER_STEPS} x {LIMBER_BATCH} "
          f"= {LIMBER_STEPS * LIMBER_BATCH / 1e6:.2f}M rows")
    gptj = 12 * 28 * 4096 ** 2  # GPT-J 6B: 28 layers x (4 d^2 attention + 8 d^2 MLP), d_model 4096
    setups = {
        "SmolLM2-135M + Lite0 (49 tokens)": (per_row, encoder_flops(enc_weights, 49)),
        "GPT-J 6B + BEiT-large (196 tokens)": (step_flops(gptj, 28, 4096, 50400, 196, cap_tokens),
                                               encoder_flops(304e6, 197)),  # BEiT-large: 304M weights, 197 tokens
    }
    print(f"{'setup':<36} {'TFLOP/row':>9} {'train, 1 GPU':>13} {'train, 8 GPUs':>14} {'encode CC3M once, 1 GPU':>24}")
    for name, (row, enc) in setups.items():
        total = row * LIMBER_STEPS * LIMBER_BATCH
        print(f"{name:<36} {row / 1e12:>9.3f} {_duration(total, gpu):>13} {_duration(total, gpu * 8 * args.scaling):>14}"
              f" {_duration(enc * CC3M_IMAGES, gpu):>24}")


if __name__ == "__main__":
    main()
