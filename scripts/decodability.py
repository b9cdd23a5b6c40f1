"""The paper's decodability test of the image soft prompts, and the logit lens by depth, on the offline COCO sample.

SmolLM2-135M + EfficientNet-Lite0 + the shipped projection (``tl_multimodal.load("offline")``) over coco_mini
``dev``: (1) ``evaluation.decodability.decodability_test``: each soft prompt's ``--n-tokens`` nearest tokens
(by the input embeddings and by the logit lens) vs random vectors of matched norm, their similarity to the
image's 5 COCO captions (all-MiniLM-L6-v2 cosine) vs random pairing, and the KS test; (2) with ``--lens``, where
translation happens: ``evaluation.lens`` per depth, the similarity of the logit lens's tokens at the image
positions (and of the decoded top units of each layer's MLP) to the captions, own minus other images' captions,
with 95% bootstrap intervals over images, and the figure (``--figure``). The header prints the projection's id.

    python scripts/decodability.py --threads 1                      # the test on all 35 dev images
    python scripts/decodability.py --threads 1 --lens --figure docs/images/translation_lens.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neurons_eval import add_data_args, load_split, sentence_embedder  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--n-tokens", type=int, default=5, help="nearest tokens per soft prompt (paper: 5)")
    p.add_argument("--lens", action="store_true", help="also the logit lens by depth (residual stream, MLP units)")
    p.add_argument("--lens-tokens", type=int, default=5, help="tokens per image position and depth in the lens")
    p.add_argument("--lens-units", type=int, default=5, help="most active MLP units per layer and image")
    p.add_argument("--figure", type=Path, default=None, help="save the lens figure here (PNG)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    from tl_multimodal.evaluation.decodability import decodability_test
    from tl_multimodal.evaluation.lens import lens_similarity, resid_lens_texts, unit_lens_texts

    ds, images, projection, ident, model = load_split(args)
    captions = [list(c) for c in ds["captions"]]
    print(f"coco_mini {args.split}: {len(images)} images, SmolLM2-135M + EfficientNet-Lite0, "
          f"projection={'untrained' if projection is None else Path(projection).name} (id {ident}); "
          f"{model.n_image_tokens} image tokens; seed {args.seed}, {args.threads} threads", flush=True)
    embed = sentence_embedder()
    pixels = model.preprocess(images)
    dec = decodability_test(model, pixels, captions, embed, n_tokens=args.n_tokens, seed=args.seed)
    print(dec)
    print(f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    if not args.lens:
        return
    emb = model.embed_images(pixels)
    resid = lens_similarity(resid_lens_texts(model, image_embed=emb, n_tokens=args.lens_tokens,
                                             batch_size=args.batch_size),
                            captions, embed, source=f"logit lens at the image positions, top {args.lens_tokens} tokens",
                            seed=args.seed)
    print(resid)
    print(f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    units = lens_similarity(unit_lens_texts(model, image_embed=emb, n_units=args.lens_units,
                                            batch_size=args.batch_size),
                            captions, embed, source=f"top {args.lens_units} MLP units per layer (max |hook_post|), "
                                                    "top 10 decoded tokens", seed=args.seed)
    print(units)
    print(f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    if args.figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        fig = resid.plot(label="residual stream (logit lens)")
        units.plot(ax=fig.axes[0], label="MLP units (decoded output directions)")
        fig.axes[0].set_title(f"coco_mini {args.split}, {len(images)} images, projection {ident}", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=90)
        print(f"saved {args.figure}")


if __name__ == "__main__":
    main(sys.argv[1:])
