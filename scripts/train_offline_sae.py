"""Train a small TopK SAE on the offline model's residual stream, and measure it on the dev split.

SmolLM2-135M + EfficientNet-Lite0 + the shipped projection (``tl_multimodal.load("offline")``): the residual
stream after block ``--layer`` (``blocks.L.hook_resid_post``) at the image slots and at the caption tokens
(``[BOS][49 image slots][caption][eos]``, the first ``--captions`` COCO captions of each image; the BOS position
is left out: its norm is far larger than any other's) of coco_mini's ``train`` split trains the SAE
(``tl_multimodal.sae.train.train_sae``). On the ``dev`` split, separately at image and at text positions, the
script prints

- explained variance and L0 (``reconstruction_stats``);
- the caption NLL (``caption_token_nll``: every caption token) with the SAE spliced in *without* its error
  term at those positions only, against the clean model and against zero-ablating the residual stream at
  those positions: CE loss recovered = (NLL_zero - NLL_sae) / (NLL_zero - NLL_clean).

The SAE is saved in SAELens's format (fp16 weights) to ``--out`` (default: the package's
``tl_multimodal/assets/sae_smollm2_L{layer}``, shipped with it), and the numbers to ``--out/training.json``.

    python scripts/train_offline_sae.py                     # layer 15, d_sae 1152, k 32
    python scripts/train_offline_sae.py --steps 50 --n-images 8 --out /tmp/sae   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    """Raised once the hooked layer has been read (the rest of the forward is not needed)."""


def _rows(model, ds, n_captions: int):
    """Encoder features (one row per caption) and the right-padded token rows with their real-position mask."""
    from tl_multimodal.training.features import encode_images
    from tl_multimodal.training.nll import _batch, _caption_ids

    feats = encode_images(model, ds, progress=False)
    n_start = model.n_image_tokens + (1 if model.image_bos else 0)
    ids = _caption_ids(model, [c[:n_captions] for c in ds["captions"]], "captions", n_start)
    flat = [opt for per_image in ids for opt in per_image]
    image_of_row = torch.tensor([i for i, per_image in enumerate(ids) for _ in per_image])
    first_of_image = torch.tensor([j == 0 for per_image in ids for j in range(len(per_image))])
    return feats, flat, image_of_row, first_of_image


def _masks(model, tokens, real):
    img = model.image_mask(tokens)
    txt = real.bool() & ~img
    if model.image_bos:
        txt[:, 0] = False
    return img.cpu(), txt.cpu()


@torch.no_grad()
def collect(model, ds, hook: str, n_captions: int, batch_size: int):
    """Activations at ``hook``: image slots (each image once) and caption positions, ``[n, d_model]`` each."""
    from tl_multimodal.training.nll import _batch

    feats, flat, image_of_row, first = _rows(model, ds, n_captions)
    img_acts, txt_acts = [], []
    for s in range(0, len(flat), batch_size):
        tokens, real = _batch(model, flat[s:s + batch_size])
        kept = {}

        def keep(x, hook):
            kept["x"] = x.detach().float().cpu()
            raise _Stop

        try:
            model.run_with_hooks(tokens, image_features=feats[image_of_row[s:s + batch_size]], fwd_hooks=[(hook, keep)])
        except _Stop:
            pass
        img, txt = _masks(model, tokens, real)
        rows = first[s:s + batch_size]
        img_acts.append(kept["x"][rows][img[rows]])
        txt_acts.append(kept["x"][txt])
    return torch.cat(img_acts), torch.cat(txt_acts)


@torch.no_grad()
def caption_nlls(model, ds, hook: str, sae, n_captions: int, batch_size: int) -> dict:
    """Mean caption-token NLL: clean, and with the SAE (no error term) or zeros at image / text positions."""
    from tl_multimodal.sae.splice import without_error_hook
    from tl_multimodal.training.nll import _batch, caption_token_nll

    feats, flat, image_of_row, _ = _rows(model, ds, n_captions)
    recon = without_error_hook(sae)
    variants = {"clean": None, "sae_image": ("image", recon), "zero_image": ("image", None),
                "sae_text": ("text", recon), "zero_text": ("text", None)}
    total = {k: 0.0 for k in variants}
    count = 0
    for s in range(0, len(flat), batch_size):
        tokens, real = _batch(model, flat[s:s + batch_size])
        f = feats[image_of_row[s:s + batch_size]]
        masks = dict(zip(("image", "text"), _masks(model, tokens, real)))
        for name, v in variants.items():
            hooks = []
            if v is not None:
                where, fn = masks[v[0]].to(tokens.device)[:, :, None], v[1]

                def edit(x, hook, where=where, fn=fn):
                    return torch.where(where, fn(x, hook) if fn is not None else torch.zeros_like(x), x)
                hooks = [(hook, edit)]
            with model.hooks(fwd_hooks=hooks):
                nll = caption_token_nll(model, tokens, real, f)
            total[name] += nll.sum().item()
        count += len(nll)
    return {k: v / count for k, v in total.items()} | {"n_tokens": count}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "data" / "coco_mini")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--d-sae", type=int, default=1152)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-batch", type=int, default=512, help="activations per SAE step")
    p.add_argument("--captions", type=int, default=1, help="captions per image")
    p.add_argument("--n-images", type=int, default=None, help="first N images of each split (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="token rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tl_multimodal.data.sources import load_coco_mini
    from tl_multimodal.models.projection import projection_id
    from tl_multimodal.pretrained.load import load
    from tl_multimodal.sae.load import save_sae
    from tl_multimodal.sae.train import reconstruction_stats, train_sae

    t0 = time.time()
    model = load("offline").eval()
    hook = f"blocks.{args.layer}.hook_resid_post"
    splits = {}
    for split in ("train", "dev"):
        ds = load_coco_mini(args.data_dir, split)
        splits[split] = ds.select(range(min(args.n_images, len(ds)))) if args.n_images else ds
    print(f"offline model ({type(model).__name__}), projection {projection_id(model.projection)}; hook {hook}; "
          f"train {len(splits['train'])} images, dev {len(splits['dev'])}, {args.captions} captions each", flush=True)
    img, txt = collect(model, splits["train"], hook, args.captions, args.batch_size)
    print(f"train activations: {len(img)} image, {len(txt)} text ({time.time() - t0:.0f}s)", flush=True)
    acts = torch.cat([img, txt])
    sae = train_sae(acts, hook, d_sae=args.d_sae, k=args.k, steps=args.steps, batch_size=args.train_batch,
                    lr=args.lr, seed=args.seed, model_name="smollm2-135m+efficientnet-lite0",
                    on_step=lambda s, loss: print(f"  step {s + 1}: mse/token {loss:.3f}", flush=True)
                    if (s + 1) % max(1, args.steps // 10) == 0 else None)
    out = args.out or REPO / "tl_multimodal" / "assets" / f"sae_smollm2_L{args.layer}"
    save_sae(sae, out, dtype=torch.float16)
    from tl_multimodal.sae.load import load_sae

    sae = load_sae(out)  # measure what was shipped (fp16 weights)
    d_img, d_txt = collect(model, splits["dev"], hook, args.captions, args.batch_size)
    stats = {"image": reconstruction_stats(sae, d_img), "text": reconstruction_stats(sae, d_txt)}
    nll = caption_nlls(model, splits["dev"], hook, sae, args.captions, args.batch_size)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "projection": projection_id(model.projection),
              "dev_nll": nll}
    print(f"dev ({nll['n_tokens']} caption tokens): NLL clean {nll['clean']:.4f}")
    print("positions  explained_var  L0     NLL_sae  NLL_zero  CE_recovered")
    for where in ("image", "text"):
        st = stats[where]
        rec = (nll[f"zero_{where}"] - nll[f"sae_{where}"]) / (nll[f"zero_{where}"] - nll["clean"])
        result[where] = {"explained_variance": st.explained_variance, "l0": st.l0, "n": st.n, "ce_recovered": rec}
        print(f"{where:<10} {st.explained_variance:13.3f}  {st.l0:5.1f}  {nll[f'sae_{where}']:7.4f}  "
              f"{nll[f'zero_{where}']:8.4f}  {rec:12.3f}")
    (out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB); {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
