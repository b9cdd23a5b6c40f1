"""Command line: caption images with a frozen text-only LM.

    tl-multimodal caption                      # offline: bundled sample images, SmolLM2 + EfficientNet-Lite0
    tl-multimodal caption photo.jpg --hub      # GPT-2 small + BEiT from the hub (needs internet)
    tl-multimodal report photo.jpg --out report.html --k 10   # HTML report of the top multimodal units
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image


def _sample_images() -> dict[str, Image.Image]:
    """scikit-image's bundled photos (no download): a cat, a coffee cup, an astronaut."""
    from skimage import data

    return {f"skimage.data.{name}": Image.fromarray(getattr(data, name)()) for name in ("chelsea", "coffee", "astronaut")}


def _caption(args) -> None:
    import torch

    from tl_multimodal.loading import SHIPPED_PROJECTION, load_offline
    from tl_multimodal.prefix import HookedVisionPrefix

    if args.hub:
        model = HookedVisionPrefix.from_pretrained(args.lm, args.encoder, projection=args.projection)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = load_offline(args.projection or SHIPPED_PROJECTION)
    images = {str(p): Image.open(p) for p in args.images} if args.images else _sample_images()
    torch.manual_seed(args.seed)
    captions = model.caption(list(images.values()), prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, temperature=args.temperature)
    for name, caption in zip(images, captions):
        print(f"{name}: {args.prompt} {caption}")


def _report(args) -> None:
    from tl_multimodal.loading import SHIPPED_PROJECTION, load_offline
    from tl_multimodal.prefix import HookedVisionPrefix
    from tl_multimodal.report import write_report

    if not args.image.is_file():
        raise SystemExit(f"tl-multimodal report: image file {args.image} does not exist")
    if args.k < 1:
        raise SystemExit(f"tl-multimodal report: --k must be >= 1, got {args.k}")
    if args.hub:
        model = HookedVisionPrefix.from_pretrained(args.lm, args.encoder, projection=args.projection)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = load_offline(args.projection or SHIPPED_PROJECTION)
    try:
        out = write_report(model, Image.open(args.image), args.out, k=args.k, prompt=args.prompt,
                           max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        raise SystemExit(f"tl-multimodal report: {e}") from None
    print(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tl-multimodal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="caption images (default: bundled samples, offline models)")
    cap.add_argument("images", nargs="*", type=Path, help="image files (default: scikit-image samples)")
    cap.add_argument("--prompt", default="A picture of")
    cap.add_argument("--max-new-tokens", type=int, default=20)
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cap.add_argument("--temperature", type=float, default=1.0)
    cap.add_argument("--seed", type=int, default=0)
    cap.add_argument("--projection", type=Path, default=None, help="projection checkpoint")
    cap.add_argument("--hub", action="store_true", help="load --lm and --encoder from the hub instead")
    cap.add_argument("--lm", default="gpt2", help="with --hub: a HookedTransformer.from_pretrained name")
    cap.add_argument("--encoder", default="beit_base_patch16_224", help="with --hub: a timm model name")
    cap.set_defaults(func=_caption)
    rep = sub.add_parser("report", help="write a self-contained HTML report of an image's top multimodal units")
    rep.add_argument("image", type=Path, help="an image file")
    rep.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file to write")
    rep.add_argument("--k", type=int, default=10, help="top units shown")
    rep.add_argument("--prompt", default="A picture of")
    rep.add_argument("--max-new-tokens", type=int, default=20)
    rep.add_argument("--projection", type=Path, default=None, help="projection checkpoint")
    rep.add_argument("--hub", action="store_true", help="load --lm and --encoder from the hub instead")
    rep.add_argument("--lm", default="gpt2", help="with --hub: a HookedTransformer.from_pretrained name")
    rep.add_argument("--encoder", default="beit_base_patch16_224", help="with --hub: a timm model name")
    rep.set_defaults(func=_report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
