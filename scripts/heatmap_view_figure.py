"""docs/images/heatmap_view.png: where one COCO sample image's top-attributed units fire, as
``tl_multimodal.views.heatmap_view.unit_heatmap_view`` draws them (offline model), saved with each panel's caption,
the colour bar and the note on the encoder's centre crop.

    python scripts/heatmap_view_figure.py --data-dir ../shared/data/coco_mini --image-id 63217 --threads 1
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tl_multimodal.analysis.attribution import attribute  # noqa: E402
import tl_multimodal  # noqa: E402
from tl_multimodal.views.heatmap_view import unit_heatmap_view  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=ROOT.parent / "shared" / "data" / "coco_mini", type=Path)
    p.add_argument("--image-id", type=int, default=63217, help="a COCO image id of the sample (default: a boat, dev)")
    p.add_argument("--k", type=int, default=4, help="top units shown")
    p.add_argument("--shared-scale", action="store_true", help="one colour scale for all units")
    p.add_argument("--out", default=ROOT / "docs" / "images" / "heatmap_view.png", type=Path)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = args.data_dir / "images" / f"{args.image_id:012d}.jpg"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data-dir (the COCO sample) and an --image-id it holds")
    image = Image.open(path).convert("RGB")
    model = tl_multimodal.load("offline")
    attr = attribute(model, [image])
    units = attr.top_units(args.k).units()
    view = unit_heatmap_view(model, image, units, shared_scale=args.shared_scale,
                             title=f"top {args.k} units for {attr.targets[0]!r}")
    print(f"caption: {attr.captions[0]!r}; target {attr.targets[0]!r}; units {units.tolist()}")
    print("panels:", "; ".join(view.captions))
    print(view.note)
    print("wrote", view.save(args.out))


if __name__ == "__main__":
    main()
