"""Which unit ranking is most specific to the image? The controls' gaps per ranking option, on dev.

For each attributed hook (``pre``: the gate pre-activation of SmolLM2's gated MLP; ``post``: the
scalar that multiplies ``W_out[k]``) one attribution pass per image (grad x act, the first noun of
the greedy caption), then every ranking of those scores (``over_patches`` max or sum,
``normalize`` None or per layer) is measured by ``tl_multimodal.evaluation.controls.specificity_controls``:
ablation at k units, decoded-text similarity and heatmap IoU of the top ``--n-units`` units, own
vs another image's (other target), magnitude-matched and random same-layer units. Prints one
table per option and a summary of the gaps (own minus control; for ablation, negative = the own
units lower p(c) more).

    python scripts/ranking_options.py --n-images 16 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neurons_eval import add_data_args, load_split, sentence_embedder  # noqa: E402


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--n-units", type=int, default=100, help="top units for similarity and IoU")
    p.add_argument("--ks", default="10", help="units ablated")
    p.add_argument("--hooks", default="pre,post")
    p.add_argument("--draws", type=int, default=1, help="draws per control set")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="tl_multimodal.analysis.attribution")

    from tl_multimodal.analysis.attribution import attribute
    from tl_multimodal.data.coco import load_coco
    from tl_multimodal.evaluation.controls import specificity_controls, unit_magnitudes
    from tl_multimodal.evaluation.neurons import coco_object_masks
    from tl_multimodal.analysis.nouns import first_noun
    from tl_multimodal.analysis.probe import Probe

    ds, images, projection, ident, model = load_split(args)
    refs, ids = [list(c) for c in ds["captions"]], list(ds["image_id"])
    embed = sentence_embedder()
    coco = load_coco(args.data_dir)
    pixels = model.preprocess(images)
    magnitudes = unit_magnitudes(model, image_embed=model.embed_images(pixels), batch_size=args.batch_size)
    ks = [int(k) for k in args.ks.split(",")]
    n_keep = max(args.n_units, *ks)
    print(f"[{time.perf_counter() - t0:5.0f}s] {len(images)} {args.split} images, projection {projection} "
          f"(id {ident}), {args.draws} draws, k={ks}, top {args.n_units} for similarity/IoU", flush=True)
    summary = []
    for hook in args.hooks.split(","):
        options = [(o, n) for o in ("max", "sum") for n in (None, "layer")]
        ranked = {opt: [] for opt in options}
        probes = []
        for s in range(0, len(images), args.batch_size):
            attr = attribute(model, pixels[s:s + args.batch_size], hook=hook, until="caption", max_new_tokens=12,
                             batch_size=args.batch_size)
            probes.append(attr.probe)
            for opt in options:
                ranked[opt].append(attr.top_units(n_keep, over_patches=opt[0], normalize=opt[1]).units_per_image())
        probe = Probe.concat(probes)
        nouns = [found[0] if (found := first_noun(c)) else None for c in probe.captions]
        kept, _, masks = coco_object_masks(model, coco, ids, nouns, images)
        per_image = [None] * len(images)
        for i, m in zip(kept, masks):
            per_image[i] = m
        print(f"[{time.perf_counter() - t0:5.0f}s] hook_{hook}: attributed; targets {sorted(set(probe.targets))}",
              flush=True)
        for opt in options:
            units = torch.cat(ranked[opt])
            ctl = specificity_controls(model, pixels, units, probe, ks=ks, n_units=args.n_units, n_draws=args.draws,
                                       embed=embed, reference_captions=refs, object_masks=per_image,
                                       magnitudes=magnitudes, seed=args.seed, batch_size=args.batch_size)
            layers = units[:, :args.n_units, 0].float()
            name = f"hook_{hook}, {opt[0]} over patches, normalize={opt[1]}"
            print(f"\n[{time.perf_counter() - t0:5.0f}s] {name}: top-{args.n_units} units in layer 0: "
                  f"{(layers == 0).float().mean():.0%}, mean layer {layers.mean():.1f}\n{ctl}", flush=True)
            df = ctl.to_dataframe()
            for r in df[df.arm != "own"].itertuples():
                summary.append((name, r.measure, r.arm, r.gap, r.gap_low, r.gap_high))
            for r in df[df.arm == "own"].itertuples():
                summary.append((name, r.measure, "own (mean)", r.mean, r.low, r.high))
    import pandas as pd

    table = pd.DataFrame(summary, columns=["option", "measure", "arm", "value", "low", "high"])
    pd.set_option("display.width", 200)
    print("\nSummary: own mean, and gaps own minus control [95% CI]")
    piv = table.assign(cell=[f"{v:+.3f} [{lo:+.3f},{hi:+.3f}]" for v, lo, hi in
                             zip(table.value, table.low, table.high)])
    for measure, grp in piv.groupby("measure", sort=False):
        print(f"\n{measure}")
        print(grp.pivot(index="option", columns="arm", values="cell").to_string())
    print(f"\nruntime {time.perf_counter() - t0:.0f} s ({args.threads} threads)")


if __name__ == "__main__":
    main(sys.argv[1:])
