"""Attribution vs one plain forward + backward, GPT-2 small (real config, random weights) with 196
image patches (a tiny random timm ViT with a 14x14 grid; features precomputed, so the LM does the
work). Prints the ratio (target <= 1.0) and peak memory.

    HF_HUB_OFFLINE=1 python benchmarks/bench_attribution.py [--batch 8] [--repeats 3] [--threads 1]

Times are medians of interleaved runs (``_timing.interleaved``: A B A B, this thread's CPU time).
"""

import argparse
import sys
from pathlib import Path

import timm
import torch
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, peak_rss_gb  # noqa: E402

from tl_multimodal import HookedVisionPrefix, VisionEncoder  # noqa: E402
from tl_multimodal.analysis.attribution import attribute  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
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
    feats = torch.randn(args.batch, 196, enc.d_img)
    dog = tok(" dog")["input_ids"][0]
    print(f"GPT-2 small (random weights), batch {args.batch} x (196 image + 3 prompt tokens), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def run_attr():
        attribute(model, image_features=feats, target=" dog", batch_size=args.batch)

    def run_plain():  # the same forward (full logits) and one backward, parameter gradients included
        logits = model("A picture of", image_features=feats)
        logits[:, -1, dog].sum().backward()
        model.zero_grad(set_to_none=True)

    t = interleaved({"attribute": run_attr, "plain": run_plain}, repeats=args.repeats)
    print(f"attribute (1 forward + 1 autograd.grad of 12 x 196 x 3072 activations): {t['attribute']:.2f} s/batch")
    print(f"plain forward + backward (parameter grads): {t['plain']:.2f} s/batch")
    print(f"ratio attribute / plain: {t['attribute'] / t['plain']:.2f}  (target <= 1.0)")
    print(f"peak RSS: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
