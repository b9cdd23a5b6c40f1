"""Caption NLL per token on the offline COCO sample's `dev` split, with (a) the matched image,
(b) a shuffled (wrong) image, (c) no image, for SmolLM2-135M + EfficientNet-Lite0 + a projection.

    python scripts/eval_nll.py --data-dir ../shared/data/coco_mini
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tl_multimodal.data import load_coco_mini  # noqa: E402
from tl_multimodal.loading import SHIPPED_PROJECTION, load_offline  # noqa: E402
from tl_multimodal.training import caption_nll, encode_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=ROOT.parent / "shared" / "data" / "coco_mini", type=Path)
    p.add_argument("--split", default="dev")
    p.add_argument("--projection", default=SHIPPED_PROJECTION, type=Path)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_offline(args.projection)
    data = load_coco_mini(args.data_dir, args.split)
    feats = encode_images(model, data)
    # every caption of every image; the shuffled pairing gives each caption another image's features
    captions = [c for caps in data["captions"] for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(data["captions"]) for _ in caps])
    wrong = (owner + 1 + torch.arange(len(owner)) % (len(data) - 1)) % len(data)
    assert not (wrong == owner).any()
    results = {
        "(a) matched image": caption_nll(model, captions, feats[owner]),
        "(b) shuffled image": caption_nll(model, captions, feats[wrong]),
        "(c) no image": caption_nll(model, captions, None),
    }
    print(f"caption NLL per token (nats), {args.split} split: {len(data)} images, {len(captions)} captions")
    for name, value in results.items():
        print(f"  {name:20s} {value:.4f}")


if __name__ == "__main__":
    main()
