"""Attribution throughput and peak memory for GPT-2 small (real config, random weights) with 196
image patches (a tiny random timm ViT with a 14x14 grid; its features are precomputed, so the LM
does the work), against one plain forward + backward on the same batch. Prints figures only.

    HF_HUB_OFFLINE=1 python scripts/bench_attribution.py [--batch 8] [--reps 3] [--threads N]

Peak memory is the process's RSS high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
read after the model is built and after the attribution runs (before the baseline, whose parameter
gradients would raise it).
"""

import argparse
import resource
import time
from pathlib import Path

import timm
import torch
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_multimodal import HookedVisionPrefix, VisionEncoder
from tl_multimodal.attribution import attribute

ROOT = Path(__file__).resolve().parents[1]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = transformers.GPT2TokenizerFast.from_pretrained(ROOT / "tests" / "assets" / "gpt2_tokenizer")
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", model_name="gpt2")
    lm = HookedTransformer(cfg, tokenizer=tok)
    enc = VisionEncoder(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=56, patch_size=4,
                                          embed_dim=64, depth=1, num_heads=2, num_classes=0), name="vit_14x14")
    model = HookedVisionPrefix(lm, enc).eval()
    del lm
    assert model.n_image_tokens == 196
    feats = torch.randn(args.batch, 196, enc.d_img)
    print(f"GPT-2 small (random weights), batch {args.batch} x (196 image + 3 prompt tokens), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"RSS high-water after building the model: {rss_gb():.2f} GB")

    def run_attr():
        return attribute(model, image_features=feats, target=" dog", batch_size=args.batch)

    def run_plain():  # the same forward (full logits) and one backward, parameter gradients included
        logits = model("A picture of", image_features=feats)
        logits[:, -1, tok(" dog")["input_ids"][0]].sum().backward()
        model.zero_grad(set_to_none=True)

    def timed(fn):
        fn()  # warm-up
        t = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return min(t), sum(t) / len(t)

    a_min, a_mean = timed(run_attr)
    peak_attr = rss_gb()
    p_min, p_mean = timed(run_plain)
    print(f"attribution (1 forward + 1 autograd.grad of 12 x 196 x 3072 activations): "
          f"{a_min:.2f} s/batch best, {a_mean:.2f} mean -> {args.batch / a_min:.2f} images/s")
    print(f"plain forward + backward (parameter grads): {p_min:.2f} s/batch best, {p_mean:.2f} mean")
    print(f"ratio attribution / plain (best times): {a_min / p_min:.2f}  (target <= 1.5)")
    print(f"RSS high-water after attribution: {peak_attr:.2f} GB; after the baseline too: {rss_gb():.2f} GB "
          f"(target < 6 GB)")


if __name__ == "__main__":
    main()
