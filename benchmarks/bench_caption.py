"""Captioning speed against Hugging Face ``generate`` on the same weights and the same soft prompts.

Loads the offline model (SmolLM2-135M + EfficientNet-Lite0 + the shipped projection) and its HF
oracle, embeds a few COCO images once, and times greedy decoding of 20 new tokens at batch 1 and 8
(one thread, thread CPU time, interleaved runs, medians; see ``_timing.py``):

* ``hf``: ``LlamaForCausalLM.generate(inputs_embeds=soft prompts + prompt embeddings)``;
* ``generate``: ``model.generate(prompt, image_embed=...)`` (the same embeddings, no encoder);
* ``caption``: ``model.caption(pixels)`` (encoder and projection included; no hook attached, so the
  lean loop of ``tl_multimodal.models._fast_generation`` decodes);
* ``tl``: ``caption`` decoded by TransformerLens's ``generate`` (``model.use_lean_generation = False``,
  what runs when a hook is attached).

It prints the ratios to HF and whether every token matches HF greedy decoding and the
TransformerLens path.

    python benchmarks/bench_caption.py [--data /work/shared/data/coco_mini] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved  # noqa: E402

PROMPT = "A picture of"
N_NEW = 20


@contextlib.contextmanager
def _transformer_lens_path(model):
    """Within the block, ``model`` decodes with TransformerLens's ``generate``."""
    model.use_lean_generation = False
    try:
        yield
    finally:
        model.use_lean_generation = True


def _caption_tl(model, pixels):
    with _transformer_lens_path(model):
        return model.caption(pixels, max_new_tokens=N_NEW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"),
                        help="COCO-style folder with metadata.jsonl and images (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from tl_multimodal.data.sources import load_coco_mini
    from tl_multimodal import load
    from tl_multimodal.pretrained.offline import load_hf_smollm2

    images = [row["image"] for row in load_coco_mini(args.data, split="dev").select(range(8))]  # before loading
    model = load("offline")
    hf, _ = load_hf_smollm2()
    eos = model.tokenizer.eos_token_id

    with torch.no_grad():
        pixels = model.preprocess(images)
        embed = model.embed_images(pixels)
        tokens = model.to_tokens(PROMPT, image=True)  # the projection's layout: [BOS] image slots, prompt
        slots = model.image_mask(tokens)[0]
        text_embed = hf.get_input_embeddings()(tokens[0].masked_fill(slots, 0))  # slots filled below
        for batch in (1, 8):
            px, emb = pixels[:batch], embed[:batch]
            inputs = text_embed[None].repeat(batch, 1, 1)
            inputs[:, slots] = emb
            mask = torch.ones(inputs.shape[:2], dtype=torch.long)

            def run_hf():
                return hf.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=N_NEW,
                                   do_sample=False, eos_token_id=eos, pad_token_id=eos)

            def run_generate():
                return model.generate(PROMPT, N_NEW, image_embed=emb, do_sample=False, verbose=False,
                                      return_type="tokens")

            times = interleaved({"hf": run_hf, "generate": run_generate,
                                 "caption": lambda: model.caption(px, max_new_tokens=N_NEW),
                                 "tl": lambda: _caption_tl(model, px)},
                                repeats=args.repeats)
            hf_text = [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in run_hf()]
            captions = model.caption(px, max_new_tokens=N_NEW)
            same_hf = captions == hf_text
            same_tl = captions == _caption_tl(model, px)
            gen = run_generate()[:, tokens.shape[1]:]
            same_gen = [model.tokenizer.decode(r, skip_special_tokens=True).strip() for r in gen] == captions
            print(f"batch {batch}: hf {times['hf']:.3f}s  generate {times['generate']:.3f}s  "
                  f"caption {times['caption']:.3f}s  tl {times['tl']:.3f}s (thread CPU, median of "
                  f"{args.repeats})")
            print(f"  generate/hf {times['generate'] / times['hf']:.2f}  caption/hf "
                  f"{times['caption'] / times['hf']:.2f}  tl/hf {times['tl'] / times['hf']:.2f}  "
                  f"caption speed-up over tl {times['tl'] / times['caption']:.2f}x")
            print(f"  identical: caption == HF greedy {same_hf}, caption == tl {same_tl}, "
                  f"generate == caption {same_gen}")
            print(f"  first caption: {captions[0]!r}")


if __name__ == "__main__":
    main()
