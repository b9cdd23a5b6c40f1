"""attribute() end to end (greedy caption, first noun, gradients) vs one plain forward + backward on
the same batch, on the offline model (SmolLM2-135M + EfficientNet-Lite0 + the shipped projection).
Prints the ratio (target <= 1.5).

    HF_HUB_OFFLINE=1 python benchmarks/bench_attribute_e2e.py [--batch 8] [--repeats 3] [--threads 1]

The plain side runs the encoder and the LM forward on the attribution's own tokens
(``attr.probe.tokens``: image slots, prompt, caption up to the target) with full logits, then one
backward of the target logits with parameter gradients. Medians of interleaved runs, thread CPU
time (``_timing.interleaved``).
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved  # noqa: E402

from tl_multimodal.analysis.attribution import attribute  # noqa: E402
from tl_multimodal.data.sources import load_coco_mini  # noqa: E402
import tl_multimodal  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/coco_mini"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    ds = load_coco_mini(args.data_dir, "dev").select(range(args.batch))
    images = [im.convert("RGB") for im in ds["image"]]
    model = tl_multimodal.load("offline")
    pixels = model.preprocess(images)
    attr = attribute(model, pixels, batch_size=args.batch)
    probe = attr.probe
    print(f"SmolLM2-135M + EfficientNet-Lite0, batch {args.batch}, {probe.tokens.shape[1]} positions "
          f"(49 image slots), targets {attr.targets}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    def run_attr():
        attribute(model, pixels, batch_size=args.batch)

    def run_plain():
        logits = model(probe.tokens, images=pixels)
        rows = torch.arange(len(probe))
        logits[rows, probe.pred_pos, probe.target_ids].sum().backward()
        model.zero_grad(set_to_none=True)

    t = interleaved({"attribute": run_attr, "plain": run_plain}, repeats=args.repeats)
    print(f"attribute() end to end: {t['attribute']:.2f} s/batch; plain forward + backward: {t['plain']:.2f} s/batch")
    print(f"ratio attribute / plain: {t['attribute'] / t['plain']:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
