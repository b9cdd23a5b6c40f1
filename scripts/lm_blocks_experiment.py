"""Frozen LM block as a visual-encoder layer: baseline ViT vs ViT + frozen SmolLM2 block.

A small, offline replication of the set-up of Pang et al. (ICLR 2024, "Frozen Transformers in
Language Models Are Effective Visual Encoder Layers") with :class:`tl_multimodal.experiments.lm_blocks.ViTWithLMBlocks`.

Task: classify real MS-COCO objects (from ``coco_mini``) into the ``--num-classes`` most frequent
categories from a square crop around the object's box (every non-crowd instance whose box is at
least ``--min-box`` px on its short side). The split is by *image* (no image contributes to both
sides) and fixed across seeds; each seed changes the ViT initialisation and the data order, and
the baseline and the LM variant of one seed share both (paired comparison).

Models (both trained from scratch, since no pretrained ViT is available offline):

* ``baseline``: a tiny timm ViT (``vit_tiny_patch16_224`` width, ``--vit-depth`` blocks).
* ``lm-block``: the same ViT + Linear(d_vit, d_lm) -> the *last* block of SmolLM2-135M
  (frozen, non-causal, no rotary) -> Linear(d_lm, d_vit), before the ViT's final norm.

"Information filtering" analysis: for held-out crops, per-patch feature-norm maps of the tokens
entering and leaving the frozen block (and of the block's own residual update), before and after
training, are correlated (Pearson, per image, over the patch grid) with the fraction of each patch
covered by the object's COCO mask (``lm_blocks.token_norm_maps``, ``patch_coverage``, ``mask_correlation``,
``norm_peakiness``). Example maps are saved as a PNG heatmap in ``--out``.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 python scripts/lm_blocks_experiment.py --seeds 0 1 2 --epochs 8 --out runs/lm_blocks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*deprecated.*")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tl_multimodal.experiments.lm_blocks import (ViTWithLMBlocks, mask_correlation, norm_peakiness,  # noqa: E402
                                     patch_coverage, token_norm_maps)


# ----------------------------------------------------------------------------- data
def build_dataset(data_dir: pathlib.Path, num_classes: int, min_box: int, img_size: int,
                  patch_size: int, context: float, held_out_frac: float):
    """Crop COCO objects and their mask coverage on the patch grid.

    Returns:
        dict with ``x`` (uint8 [n, 3, img, img]), ``y`` [n], ``cover`` (float [n, g, g]: fraction
        of each patch covered by the object mask), ``is_test`` [n] bool, ``classes`` (names).
    """
    from PIL import Image
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(data_dir / "instances.json"))
    files = {}
    with open(data_dir / "metadata.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            files[rec["image_id"]] = rec["file_name"]

    anns = [a for a in coco.dataset["annotations"]
            if not a.get("iscrowd", 0) and min(a["bbox"][2], a["bbox"][3]) >= min_box
            and a["image_id"] in files]
    counts: dict[int, int] = {}
    for a in anns:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    top = sorted(counts, key=lambda c: (-counts[c], c))[:num_classes]
    label_of = {c: i for i, c in enumerate(top)}
    names = [coco.cats[c]["name"] for c in top]
    anns = [a for a in anns if a["category_id"] in label_of]

    image_ids = sorted({a["image_id"] for a in anns})
    rng = np.random.default_rng(12345)  # fixed split, independent of --seeds
    shuffled = rng.permutation(image_ids)
    test_images = set(int(i) for i in shuffled[: int(round(held_out_frac * len(image_ids)))])

    grid = img_size // patch_size
    xs, ys, covers, is_test = [], [], [], []
    cache: dict[int, Image.Image] = {}
    for a in anns:
        iid = a["image_id"]
        if iid not in cache:
            cache[iid] = Image.open(data_dir / files[iid]).convert("RGB")
            # coco_mini's image records carry no size; annToMask needs it.
            coco.imgs[iid].setdefault("height", cache[iid].height)
            coco.imgs[iid].setdefault("width", cache[iid].width)
        im = cache[iid]
        x0, y0, w, h = a["bbox"]
        side = max(w, h) * context
        cx, cy = x0 + w / 2, y0 + h / 2
        box = (int(round(cx - side / 2)), int(round(cy - side / 2)),
               int(round(cx + side / 2)), int(round(cy + side / 2)))
        crop = im.crop(box).resize((img_size, img_size), Image.BILINEAR)  # outside -> black
        mask = Image.fromarray(coco.annToMask(a) * 255).crop(box).resize(
            (img_size, img_size), Image.BILINEAR)
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
        cover = patch_coverage(m, patch_size)
        xs.append(torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1))
        ys.append(label_of[a["category_id"]])
        covers.append(cover)
        is_test.append(iid in test_images)
    assert covers[0].shape == (grid, grid)
    return {
        "x": torch.stack(xs), "y": torch.tensor(ys), "cover": torch.stack(covers),
        "is_test": torch.tensor(is_test), "classes": names,
        "n_images": (len(image_ids) - len(test_images), len(test_images)),
    }


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 1/8 of the side (zero padded)."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, s // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + s, dx:dx + s]


# ----------------------------------------------------------------------------- models
def load_frozen_lm(choice: str):
    """Return (HookedTransformer, description). Falls back to a random GPT-2-small block."""
    if choice == "smollm2":
        try:
            from tl_multimodal.pretrained.offline import load_smollm2

            lm = load_smollm2()
            return lm, "SmolLM2-135M-Instruct (pretrained, GGUF Q4_1 dequantized), last block"
        except Exception as exc:  # noqa: BLE001 - report and fall back
            print(f"!! could not load SmolLM2 ({type(exc).__name__}: {exc}); falling back to a "
                  "RANDOMLY INITIALISED GPT-2-small-config block -- NOT a pretrained LM", flush=True)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=768, n_layers=1, n_heads=12, d_head=64, d_mlp=3072,
                                  n_ctx=1024, d_vocab=50257, act_fn="gelu_new",
                                  normalization_type="LN", seed=0)
    return HookedTransformer(cfg).eval(), "RANDOM GPT-2-small-config block (no pretrained weights)"


def make_vit(args, seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.img_size,
                             patch_size=args.patch_size, depth=args.vit_depth,
                             num_classes=args.num_classes, drop_path_rate=0.1)


# ----------------------------------------------------------------------------- train / eval
def normalise(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - mean) / std


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        correct += (model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum().item()
    return correct / len(x)


def train(model: ViTWithLMBlocks, x: torch.Tensor, y: torch.Tensor, args, seed: int) -> None:
    params = list(model.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()


# ----------------------------------------------------------------------------- figure
def save_heatmap(path: pathlib.Path, images: torch.Tensor, cover: torch.Tensor,
                 panels: list[tuple[str, torch.Tensor]], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = 2 + len(panels)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(images[r].permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(labels[r], fontsize=8)
        axes[r, 1].imshow(cover[r].numpy(), cmap="gray", vmin=0, vmax=1)
        for c, (title, maps) in enumerate(panels):
            axes[r, 2 + c].imshow(maps[r].numpy(), cmap="inferno")
        for c in range(cols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    for c, title in enumerate(["crop", "object mask"] + [t for t, _ in panels]):
        axes[0, c].set_title(title, fontsize=7)
    fig.suptitle("Per-token feature norm over the patch grid (held-out crops)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=REPO_ROOT / ".." / "shared" / "data" / "coco_mini")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "runs" / "lm_blocks")
    parser.add_argument("--lm", choices=["smollm2", "random-gpt2"], default="smollm2")
    parser.add_argument("--num-classes", type=int, default=6)
    parser.add_argument("--min-box", type=int, default=16, help="min short side of a box, px")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--vit-depth", type=int, default=4)
    parser.add_argument("--context", type=float, default=1.5, help="crop side / box long side")
    parser.add_argument("--held-out", type=float, default=0.3, help="fraction of images held out")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    data = build_dataset(args.data_dir.resolve(), args.num_classes, args.min_box, args.img_size,
                         args.patch_size, args.context, args.held_out)
    tr, te = ~data["is_test"], data["is_test"]
    raw_tr, raw_te = data["x"][tr], data["x"][te]
    mean = (raw_tr.float() / 255).mean((0, 2, 3), keepdim=True)[0]
    std = (raw_tr.float() / 255).std((0, 2, 3), keepdim=True)[0]
    x_tr, x_te = normalise(raw_tr, mean, std), normalise(raw_te, mean, std)
    y_tr, y_te = data["y"][tr], data["y"][te]
    cover_te = data["cover"][te]
    majority = float((y_te == torch.bincount(y_tr).argmax()).float().mean())
    print(f"data: {len(y_tr)} train / {len(y_te)} held-out object crops from "
          f"{data['n_images'][0]} / {data['n_images'][1]} COCO images; classes: {data['classes']}")
    print(f"      {args.img_size}x{args.img_size} crops, patch {args.patch_size} "
          f"({args.img_size // args.patch_size}x{args.img_size // args.patch_size} grid); "
          f"held-out majority-class accuracy {majority:.3f}")

    t0 = time.time()
    lm, lm_desc = load_frozen_lm(args.lm)
    print(f"frozen LM: {lm_desc}: block {lm.cfg.n_layers - 1} of {lm.cfg.n_layers}, d_model "
          f"{lm.cfg.d_model}, {lm.cfg.positional_embedding_type} pos (removed) "
          f"[loaded in {time.time() - t0:.0f}s]", flush=True)

    acc = {"baseline": [], "lm-block": []}
    corr: dict[str, list[float]] = {}
    peak: dict[str, list[float]] = {}
    examples = None
    for seed in args.seeds:
        for variant in ("baseline", "lm-block"):
            t0 = time.time()
            vit = make_vit(args, seed)
            model = ViTWithLMBlocks(vit, None if variant == "baseline" else lm,
                                    baseline=variant == "baseline")
            before = token_norm_maps(model, x_te)
            train(model, x_tr, y_tr, args, seed)
            after = token_norm_maps(model, x_te)
            a = evaluate(model, x_te, y_te)
            acc[variant].append(a)
            for stage, maps in (("init", before), ("trained", after)):
                for site, m in maps.items():
                    key = f"{variant}/{site}/{stage}"
                    corr.setdefault(key, []).append(mask_correlation(m, cover_te))
                    peak.setdefault(key, []).append(norm_peakiness(m))
            if seed == args.seeds[0]:
                if examples is None:
                    examples = {}
                examples[variant] = (before, after)
            print(f"seed {seed} {variant:9s} held-out acc {a:.3f}  "
                  f"[{time.time() - t0:.0f}s, {args.epochs} epochs]", flush=True)

    def ms(v):
        return f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.3f}"

    print(f"\n== held-out accuracy over {len(args.seeds)} seeds (mean ± std; majority {majority:.3f}) ==")
    for variant, v in acc.items():
        print(f"  {variant:9s} {ms(v)}   per seed: {', '.join(f'{x:.3f}' for x in v)}")
    diff = np.array(acc["lm-block"]) - np.array(acc["baseline"])
    print(f"  paired difference (lm-block - baseline): {ms(diff)}")

    print("\n== information filtering: Pearson corr(token-norm map, object-mask coverage), "
          "mean over held-out crops, then mean ± std over seeds ==")
    print("   (peak = max/mean patch norm; higher = more concentrated)")
    for key in sorted(corr):
        print(f"  {key:30s} corr {ms(corr[key])}   peak {ms(peak[key])}")

    b_before, b_after = examples["baseline"]
    l_before, l_after = examples["lm-block"]
    pick = torch.argsort(cover_te.flatten(1).std(1), descending=True)[:6]
    panels = [
        ("LM in, init", l_before["lm_in"][pick]),
        ("LM in, trained", l_after["lm_in"][pick]),
        ("LM out, trained", l_after["lm_out"][pick]),
        ("LM update, init", l_before["lm_update"][pick]),
        ("LM update, trained", l_after["lm_update"][pick]),
        ("baseline ViT, trained", b_after["vit_out"][pick]),
    ]
    labels = [data["classes"][int(y_te[i])] for i in pick]
    png = args.out / "lm_blocks_info_filtering.png"
    save_heatmap(png, raw_te[pick], cover_te[pick], panels, labels)
    results = {"args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
               "lm": lm_desc, "classes": data["classes"], "majority": majority,
               "accuracy": acc, "mask_correlation": corr, "peakiness": peak}
    (args.out / "lm_blocks_results.json").write_text(json.dumps(results, indent=2))
    print(f"\nsaved {png} and {args.out / 'lm_blocks_results.json'}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
