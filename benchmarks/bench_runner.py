"""Peak memory of the attribution runner at 50 and 250 images: flat, not growing with the dataset.

Each measurement runs in a fresh process (peak RSS is a per-process high-water mark). The model is
small (6 layers, d_mlp 1024, GPT-2 tokenizer, random weights) behind a tiny ViT with a 7x7 patch
grid, so one image's attribution scores take 6 x 49 x 1024 floats = 1.2 MB. For reference the same
images go through one ``attribute()`` call, which keeps every image's scores: that grows with N.

    python benchmarks/bench_runner.py [--data ../shared/data/coco_mini] [--sizes 50 250]

Without the data folder, random images are used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model():
    import timm
    import torch
    import transformers
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tl_multimodal import HookedVisionPrefix, VisionEncoder

    torch.manual_seed(0)
    tok = transformers.GPT2TokenizerFast.from_pretrained(ROOT / "tests" / "assets" / "gpt2_tokenizer")
    lm = HookedTransformer(HookedTransformerConfig(
        n_layers=6, d_model=128, d_head=32, n_heads=4, d_mlp=1024, n_ctx=128, d_vocab=50257,
        act_fn="gelu_new", normalization_type="LN", model_name="bench"), tokenizer=tok)
    enc = VisionEncoder(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=56, patch_size=8,
                                          embed_dim=64, depth=2, num_heads=2, num_classes=0), name="vit_tiny_56")
    return HookedVisionPrefix(lm, enc).eval()


def _data(data_dir: str, n: int):
    import datasets
    import numpy as np
    from PIL import Image

    if Path(data_dir, "metadata.jsonl").exists():
        from tl_multimodal import load_coco_mini

        ds = load_coco_mini(data_dir)
        if len(ds) < n:
            raise SystemExit(f"{data_dir} has {len(ds)} images, fewer than {n}")
        return ds.select(range(n))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


def _child(mode: str, n: int, data_dir: str) -> None:
    import torch

    from benchmarks._timing import peak_rss_gb
    from tl_multimodal.analysis.attribution import attribute
    from tl_multimodal.training.runner import run_attribution

    torch.set_num_threads(1)
    model, ds = _model(), _data(data_dir, n)
    before = peak_rss_gb()
    if mode == "runner":
        with tempfile.TemporaryDirectory() as out:
            s = run_attribution(model, ds, out, k=100, shard_size=32, batch_size=8, max_new_tokens=8,
                                rank=0, world_size=1, progress=False)
            assert s.images == n
    else:  # every image in one attribute() call: scores of all images kept
        attr = attribute(model, [row["image"] for row in ds], batch_size=8, max_new_tokens=8)
        assert len(attr) == n
    print(json.dumps({"before_gb": before, "peak_gb": peak_rss_gb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "coco_mini"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 250])
    parser.add_argument("--modes", nargs="+", default=["runner", "attribute"], choices=["runner", "attribute"])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], int(args.child[1]), args.data)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    source = args.data if Path(args.data, "metadata.jsonl").exists() else "random images"
    print(f"peak RSS (GB), fresh process per row; data: {source}; model: 6 layers x 1024 units, 49 patches")
    print(f"{'mode':<10} {'images':>6} {'after load':>10} {'peak':>8} {'peak - load':>11}")
    results = {}
    for mode in args.modes:
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--data", args.data, "--child", mode, str(n)],
                                 env=env, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode, n] = r["peak_gb"] - r["before_gb"]
            print(f"{mode:<10} {n:>6} {r['before_gb']:>10.3f} {r['peak_gb']:>8.3f} {results[mode, n]:>11.3f}",
                  flush=True)
    lo, hi = min(args.sizes), max(args.sizes)
    for mode in args.modes:
        print(f"{mode}: growth of peak over load from {lo} to {hi} images: "
              f"{results[mode, hi] - results[mode, lo]:+.3f} GB")


if __name__ == "__main__":
    main()
