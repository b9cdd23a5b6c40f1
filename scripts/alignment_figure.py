"""Implicit multimodal alignment (Shukor & Cord, 2024) of the offline model on the COCO sample: each
image with one of its captions, the per-layer measures of tl_multimodal.analysis.alignment printed as tables
(all image tokens; without image token 0, the attention sink), the soft-prompt norm diagnostic, and
the figure docs/images/alignment.png (all image tokens).

    python scripts/alignment_figure.py --data-dir ../shared/data/coco_mini --split dev
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import torch  # noqa: E402

from tl_multimodal.analysis.alignment import alignment, soft_prompt_norms  # noqa: E402
from tl_multimodal.data.sources import load_coco_mini  # noqa: E402
import tl_multimodal  # noqa: E402
from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION  # noqa: E402
from tl_multimodal.training.features import encode_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=ROOT.parent / "shared" / "data" / "coco_mini", type=Path)
    p.add_argument("--split", default="dev")
    p.add_argument("--caption", type=int, default=0, help="which of each image's captions (index)")
    p.add_argument("--projection", default=SHIPPED_PROJECTION, type=Path,
                   help="projection checkpoint; 'none' for an untrained (random) projection, as a reference")
    p.add_argument("--out", default=ROOT / "docs" / "images" / "alignment.png", type=Path)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_coco_mini(args.data_dir, args.split)
    untrained = str(args.projection).lower() == "none"
    torch.manual_seed(0)  # the untrained projection's initialisation
    model = tl_multimodal.load("offline", projection=False if untrained else args.projection)
    captions = [caps[args.caption] for caps in data["captions"]]
    feats = encode_images(model, data, progress=False)
    al = alignment(model, captions, image_features=feats)
    no_sink = alignment(model, captions, image_features=feats, exclude_image_tokens=(0,))
    norms = soft_prompt_norms(model, image_features=feats)

    print(f"{args.split} split: {len(data)} images, caption {args.caption} of each; "
          f"projection {'untrained' if untrained else args.projection.name}")
    print("all image tokens:", al, sep="\n")
    print("without image token 0 (the attention sink):", no_sink, sep="\n")
    print(norms)
    fig = al.plot(title=f"SmolLM2-135M + EfficientNet-Lite0, {args.split} ({len(data)} images); "
                        f"soft prompts {norms.ratio:.0f}x text embedding norm")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
