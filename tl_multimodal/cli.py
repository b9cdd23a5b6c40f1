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


def _model(args):
    """The hub models with --hub, else the offline SmolLM2 + EfficientNet-Lite0 (+ shipped projection).

    A VisionBridge with --bridge or on TransformerLens 4 (no HookedTransformer), else a HookedVisionPrefix.
    """
    from tl_multimodal.compat import HAS_HOOKED_TRANSFORMER
    from tl_multimodal.loading import SHIPPED_PROJECTION, load_offline
    from tl_multimodal.prefix import HookedVisionPrefix

    if args.bridge or not HAS_HOOKED_TRANSFORMER:
        from tl_multimodal.bridge import VisionBridge, load_offline_bridge

        if args.hub:
            return VisionBridge.from_pretrained(args.lm, args.encoder, projection=args.projection)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return load_offline_bridge(args.projection or SHIPPED_PROJECTION)
    if args.hub:
        return HookedVisionPrefix.from_pretrained(args.lm, args.encoder, projection=args.projection)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_offline(args.projection or SHIPPED_PROJECTION)


def _caption(args) -> None:
    import torch

    model = _model(args)
    images = {str(p): Image.open(p) for p in args.images} if args.images else _sample_images()
    torch.manual_seed(args.seed)
    captions = model.caption(list(images.values()), prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, temperature=args.temperature)
    for name, caption in zip(images, captions):
        print(f"{name}: {args.prompt} {caption}")


def _report(args) -> None:
    from tl_multimodal.report import write_report

    if not args.image.is_file():
        raise SystemExit(f"tl-multimodal report: image file {args.image} does not exist")
    if args.k < 1:
        raise SystemExit(f"tl-multimodal report: --k must be >= 1, got {args.k}")
    model = _model(args)
    try:
        out = write_report(model, Image.open(args.image), args.out, k=args.k, prompt=args.prompt,
                           max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        raise SystemExit(f"tl-multimodal report: {e}") from None
    print(out)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="A picture of")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--projection", type=Path, default=None, help="projection checkpoint")
    parser.add_argument("--hub", action="store_true", help="load --lm and --encoder from the hub instead")
    parser.add_argument("--lm", default="gpt2", help="with --hub: a HookedTransformer.from_pretrained name")
    parser.add_argument("--encoder", default="beit_base_patch16_224", help="with --hub: a timm model name")
    parser.add_argument("--bridge", action="store_true",
                        help="run the LM through TransformerBridge (VisionBridge); the default on TransformerLens 4")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tl-multimodal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="caption images (default: bundled samples, offline models)")
    cap.add_argument("images", nargs="*", type=Path, help="image files (default: scikit-image samples)")
    _model_options(cap)
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cap.add_argument("--temperature", type=float, default=1.0)
    cap.add_argument("--seed", type=int, default=0)
    cap.set_defaults(func=_caption)
    rep = sub.add_parser("report", help="write a self-contained HTML report of an image's top multimodal units")
    rep.add_argument("image", type=Path, help="an image file")
    rep.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file to write")
    rep.add_argument("--k", type=int, default=10, help="top units shown")
    _model_options(rep)
    rep.set_defaults(func=_report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
