"""Train the projection shipped in tl_multimodal/assets: SmolLM2-135M + EfficientNet-Lite0 on the
`train` split of the offline COCO sample (220 images x 5 captions), evaluated on `dev`.

    python scripts/train_offline_projection.py --data-dir ../shared/data/coco_mini --steps 200 --batch-size 8 --lr 3e-3

The stronger recipe adds COCO instance crops captioned by category ("a photo of a dog", at most
``--crops`` per image), random-resized-crop + flip augmentation (``--augment``), the LM's start token
before the image tokens (``--bos``) and a warm start from an earlier projection (``--init``):

    python scripts/train_offline_projection.py --init tl_multimodal/assets/projection_smollm2_effnetlite0.pt \
        --bos --augment --crops 2 --image-repeats 2 --steps 400 --lr 1e-3 --warmup 20 --threads 1

With ``--checkpoint-dir DIR`` the run writes ``DIR/training_state.pt`` every ``--checkpoint-every``
steps; after an interruption, the same command with ``--resume`` continues where it stopped and
ends with the same projection as an uninterrupted run.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

from tl_multimodal.training.augment import random_resized_crop_flip  # noqa: E402
from tl_multimodal.data.coco import instance_crops, load_coco  # noqa: E402
from tl_multimodal.models.projection import projection_id  # noqa: E402
from tl_multimodal.data.sources import load_coco_mini  # noqa: E402
import tl_multimodal  # noqa: E402
from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION  # noqa: E402
from tl_multimodal.training.train import train_projection  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=ROOT.parent / "shared" / "data" / "coco_mini", type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--init", type=Path, default=None, help="a projection to start from (default: untrained)")
    p.add_argument("--bos", action="store_true", help="the LM's start token before the image tokens")
    p.add_argument("--augment", action="store_true", help="random-resized-crop + flip, images encoded per step")
    p.add_argument("--crops", type=int, default=0, help="COCO instance crops per image added as rows (0: none)")
    p.add_argument("--image-repeats", type=int, default=1, help="times each whole image appears among the rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=SHIPPED_PROJECTION, help="where the final projection goes")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="folder for checkpoints and the training state")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir's training state")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--feature-cache", type=Path, default=None, help="a .npy file for the encoder features")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = p.parse_args()
    if args.resume and args.checkpoint_dir is None:
        p.error("--resume needs --checkpoint-dir")
    torch.set_num_threads(args.threads)

    model = tl_multimodal.load("offline", projection=args.init or False)  # False: untrained
    train, dev = load_coco_mini(args.data_dir, "train"), load_coco_mini(args.data_dir, "dev")
    name = f"coco_mini train ({len(train)} images x 5 captions"
    rows = [train] * args.image_repeats
    if args.crops:
        crops = instance_crops(load_coco(args.data_dir), train, max_per_image=args.crops)
        rows.append(crops)
        name += f", x{args.image_repeats}, + {len(crops)} instance crops 'a photo of a <category>'"
    name += f"; init {args.init.name if args.init else 'random'})"
    train = datasets.concatenate_datasets(rows) if len(rows) > 1 else train
    result = train_projection(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              warmup=args.warmup, bos=args.bos,
                              augment=random_resized_crop_flip if args.augment else None,
                              dev_dataset=dev, eval_every=args.eval_every, seed=args.seed,
                              checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                              resume_from=args.checkpoint_dir if args.resume else None,
                              grad_accum=args.grad_accum, feature_cache=args.feature_cache,
                              dataset_name=name)
    print(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.projection.save(args.out)
    print(f"saved {args.out} (id {projection_id(model.projection)}): {model.projection.info.training}")


if __name__ == "__main__":
    main()
