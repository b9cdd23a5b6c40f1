"""Caption NLL per token on a split of a folder in the COCO-sample layout (``metadata.jsonl`` + images),
with (a) the matched image, (b) a shuffled (wrong) image, (c) no image, for SmolLM2-135M +
EfficientNet-Lite0 + a projection (in the sequence layout it was trained with), and the norms of its
soft prompts against the text token embeddings.

    python scripts/eval_nll.py --data-dir ../shared/data/coco_mini --split dev

Each result line ends with the NLL, e.g. ``  (a) matched image      3.4780``.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tl_multimodal.analysis.alignment import soft_prompt_norms  # noqa: E402
from tl_multimodal.data.sources import load_coco_mini  # noqa: E402
import tl_multimodal  # noqa: E402
from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION  # noqa: E402
from tl_multimodal.training.features import encode_images  # noqa: E402
from tl_multimodal.training.nll import caption_nll  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shuffled_pairing(owner: torch.Tensor, n_images: int) -> torch.Tensor:
    """For each caption's image index, another image's index (a derangement of the pairing)."""
    wrong = (owner + 1 + torch.arange(len(owner)) % (n_images - 1)) % n_images
    assert not (wrong == owner).any()
    return wrong


def evaluate(model, data, batch_size: int = 16) -> tuple[dict[str, float], torch.Tensor]:
    """The three NLLs of every caption of every row of ``data`` (image + captions columns), and the
    encoder features of its images."""
    if len(data) < 2:
        raise ValueError(f"the shuffled pairing needs at least 2 images, the split has {len(data)}")
    feats = encode_images(model, data, progress=False)
    captions = [c for caps in data["captions"] for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(data["captions"]) for _ in caps])
    wrong = shuffled_pairing(owner, len(data))
    return {
        "(a) matched image": caption_nll(model, captions, feats[owner], batch_size),
        "(b) shuffled image": caption_nll(model, captions, feats[wrong], batch_size),
        "(c) no image": caption_nll(model, captions, None, batch_size),
    }, feats


def main(argv=None, model=None):
    """Run the evaluation; ``model`` replaces the offline model (tests pass a tiny one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=ROOT.parent / "shared" / "data" / "coco_mini", type=Path)
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--projection", default=SHIPPED_PROJECTION, type=Path)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 2:
        p.error(f"--limit must be at least 2 (the shuffled pairing needs two images), got {args.limit}")
    torch.set_num_threads(args.threads)

    data = load_coco_mini(args.data_dir, args.split)
    if args.limit is not None:
        data = data.select(range(min(args.limit, len(data))))
    if model is None:
        model = tl_multimodal.load("offline", projection=args.projection)
    results, feats = evaluate(model, data)
    n_captions = sum(map(len, data["captions"]))
    layout = "[BOS][image][text]" if model.image_bos else "[image][text]"
    print(f"caption NLL per token (nats), {args.split} split: {len(data)} images, {n_captions} captions, "
          f"layout {layout}")
    for name, value in results.items():
        print(f"  {name:20s} {value:.4f}")
    norms = soft_prompt_norms(model, image_features=feats)
    print(f"soft-prompt norm median {float(norms.image.median()):.2f}, text embedding norm median "
          f"{float(norms.text.median()):.2f} ({norms.ratio:.1f}x)")
    return results


if __name__ == "__main__":
    main()
