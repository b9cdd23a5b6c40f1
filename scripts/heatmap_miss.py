"""Why the top units' heatmaps miss the COCO object, with numbers, on the offline COCO sample.

SmolLM2-135M + EfficientNet-Lite0 + the shipped projection over coco_mini ``dev``; units ranked as
``evaluate_neurons`` ranks them (``hook_post``, sum over patches, per-layer RMS; ``--candidates`` kept per image).
Prints (``tl_multimodal.evaluation.selectivity``): how spread the top ``--k`` units' activations are over the
patches (normalised entropy, mass in the top 5% of patches) against random same-layer units; the best IoU a
95th-percentile mask could reach with each object (its area share caps it); how generic the top units are (top
units of images with other targets too); then the specificity controls (``evaluation.controls``: ablation at
k=10, decoded similarity, heatmap IoU, each against another image's, magnitude-matched and random same-layer
units) for three rankings of the same candidates: the attribution's, without the generic units, and with a
spatial-selectivity term (score x mass in the top patches). The header prints the projection's id.

    python scripts/heatmap_miss.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neurons_eval import add_data_args, load_split, sentence_embedder  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--k", type=int, default=100, help="top units per image (decoded similarity, IoU, spread)")
    p.add_argument("--candidates", type=int, default=300, help="ranked units per image the rankings choose from")
    p.add_argument("--min-share", type=float, default=0.25,
                   help="generic: a top unit of >= this share of the images with another target")
    p.add_argument("--control-draws", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=UserWarning, module="tl_multimodal.analysis.attribution")
    t0 = time.perf_counter()
    tic = lambda: f"[{time.perf_counter() - t0:5.0f} s]"  # noqa: E731

    from tl_multimodal.analysis.ablation import sample_matched_units
    from tl_multimodal.analysis.attribution import attribute_dataset
    from tl_multimodal.analysis.nouns import first_noun
    from tl_multimodal.data.coco import load_coco
    from tl_multimodal.evaluation.config import EvalConfig
    from tl_multimodal.evaluation.controls import specificity_controls, unit_magnitudes
    from tl_multimodal.evaluation.neurons import coco_object_masks
    from tl_multimodal.evaluation.selectivity import drop_units, generic_units, iou_ceiling, rerank, unit_spread

    ds, images, projection, ident, model = load_split(args)
    n, cfg = len(images), EvalConfig()
    print(f"coco_mini {args.split}: {n} images, SmolLM2-135M + EfficientNet-Lite0, "
          f"projection={'untrained' if projection is None else Path(projection).name} (id {ident}); ranking "
          f"hook_{cfg.hook}, {cfg.over_patches} over patches, normalize={cfg.normalize}; top {args.k} of "
          f"{args.candidates} candidates; seed {args.seed}", flush=True)
    res = attribute_dataset(model, [images[s:s + args.batch_size] for s in range(0, n, args.batch_size)],
                            n_units=args.candidates, prompt=cfg.prompt, batch_size=args.batch_size, hook=cfg.hook,
                            over_patches=cfg.over_patches, normalize=cfg.normalize,
                            max_new_tokens=cfg.max_new_tokens, until="caption")
    ranked = res.top_units.units_per_image()
    scores = res.top_units.score.reshape(n, args.candidates)
    targets = res.probe.target_ids.tolist()
    nouns = [found[0] if (found := first_noun(c)) else None for c in res.captions]
    coco = load_coco(args.data_dir)
    kept, cats, masks = coco_object_masks(model, coco, list(ds["image_id"]), nouns, images)
    pixels = model.preprocess(images)
    emb = model.embed_images(pixels)
    print(f"{tic()} attributed; {len(kept)} images with an object mask", flush=True)

    top = ranked[:, :args.k]
    gen = torch.Generator().manual_seed(args.seed)
    spread_cand = unit_spread(model, units=ranked, image_embed=emb, batch_size=args.batch_size)
    spread_rand = unit_spread(model, units=sample_matched_units(top, model.cfg.d_mlp, gen), image_embed=emb,
                              batch_size=args.batch_size)
    print(f"\nSpread over the {spread_cand.n_patches} patches (normalised entropy of a - min(a): 1 flat, 0 one patch; "
          f"mass in the top {spread_cand.n_top} patches, flat {spread_cand.n_top / spread_cand.n_patches:.3f}):")
    for name, ent, mass in (("top units", spread_cand.entropy[:, :args.k], spread_cand.top_mass[:, :args.k]),
                            ("random same-layer units", spread_rand.entropy, spread_rand.top_mass)):
        print(f"  {name:24} entropy {ent.nanmean():.3f} (median {ent.nanmedian():.3f})   top-patch mass "
              f"{mass.nanmean():.3f} (median {mass.nanmedian():.3f}); share with mass >= 0.5: "
              f"{(mass >= 0.5).float().nanmean():.1%}")
    ceiling = iou_ceiling(masks, 0.05)
    area = np.array([np.asarray(m).mean() for m in masks])
    print(f"  objects: mean area {area.mean():.1%} of the model input (median {np.median(area):.1%}); "
          f"best IoU a 5% mask "
          f"can reach: mean {ceiling.mean():.3f} (median {np.median(ceiling):.3f}, min {ceiling.min():.3f})")

    g = generic_units(top, targets, args.min_share)
    print(f"\n{g}")
    g_cand = generic_units(ranked, targets, args.min_share)
    rankings = {"attribution (default)": top,
                f"generic units dropped (top-{args.candidates} of >= {args.min_share:.0%} other images)":
                    drop_units(ranked, g_cand.generic, args.k),
                "x spatial selectivity (score x top-patch mass)":
                    rerank(ranked, scores * torch.nan_to_num(spread_cand.top_mass, nan=0.0), args.k)}
    mags = unit_magnitudes(model, image_embed=emb, batch_size=args.batch_size)
    per_image = [None] * n
    for i, m in zip(kept, masks):
        per_image[i] = m
    embed = sentence_embedder()
    for name, units in rankings.items():
        s = unit_spread(model, units=units, image_embed=emb, batch_size=args.batch_size)
        gu = generic_units(units, targets, args.min_share)
        kept_share = np.mean([len(set(map(tuple, a)) & set(map(tuple, b))) / args.k
                              for a, b in zip(units.tolist(), top.tolist())])
        print(f"\n{tic()} ranking: {name}: {kept_share:.0%} of the default top {args.k} kept; mean layer "
              f"{units[..., 0].float().mean():.1f}; entropy {s.entropy.nanmean():.3f}, top-patch mass "
              f"{s.top_mass.nanmean():.3f}; generic {gu.generic.float().mean():.1%}, overlap "
              f"{np.nanmean(gu.overlap.numpy()):.1%}", flush=True)
        ctl = specificity_controls(model, pixels, units, res.probe, ks=(10,), n_units=args.k,
                                   n_draws=args.control_draws, embed=embed,
                                   reference_captions=[list(c) for c in ds["captions"]], object_masks=per_image,
                                   magnitudes=mags, seed=args.seed, batch_size=args.batch_size)
        print(ctl, flush=True)
    print(f"\n{tic()} done")


if __name__ == "__main__":
    main(sys.argv[1:])
