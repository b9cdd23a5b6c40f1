"""Training step time: unembedding only the caption-target positions vs every position (issue 12).

One projection training step (batch, loss, backward, clip, AdamW) on the offline model (SmolLM2-135M +
EfficientNet-Lite0, 49 image slots) at batch 8 with COCO captions, two ways, interleaved in one
process on one thread (thread CPU time, median):
  old: ``model(tokens, image_features=..., return_type="loss")``: final norm, unembedding and
       log-softmax at all positions (image slots and padding included), captions tokenized per step;
  new: :func:`tl_multimodal.training.nll.caption_token_nll`: the same loss, unembedded only where a
       caption token is predicted, captions tokenized once.
Also prints the two losses on the same batch (they must agree).

    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py [--data-dir ../shared/data/coco_mini] [--batch 8] [--repeats 5]

Measured on the shared 2-core CPU machine (target new/old <= 0.85): batch 8, 512 positions, 101
targets, losses equal (3.046745); new/old 0.839 and 0.804 in two runs (old 8.3/8.2 s, new 6.9/6.6 s).
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _timing import interleaved  # noqa: E402

from tl_multimodal.data.sources import load_coco_mini  # noqa: E402
import tl_multimodal  # noqa: E402
from tl_multimodal.training.features import encode_images  # noqa: E402
from tl_multimodal.training.nll import _batch, _caption_ids, caption_token_nll  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=ROOT.parent / "shared" / "data" / "coco_mini", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(1)

    model = tl_multimodal.load("offline", device=args.device)
    data = load_coco_mini(args.data_dir, "train").select(range(args.batch))
    features = encode_images(model, data, progress=False).to(args.device)
    texts = [caps[0] for caps in data["captions"]]
    ids = [r[0] for r in _caption_ids(model, texts, "captions", model.n_image_tokens + model.image_bos)]
    model.requires_grad_(False)
    model.projection.requires_grad_(True)
    params = list(model.projection.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)

    def old_batch():  # what train_projection did per step before
        eos = model.tokenizer.eos_token
        full = [t.strip() + eos for t in texts]
        tokens = model.to_tokens(full, image=True, padding_side="right")
        start = model.image_bos + model.n_image_tokens  # [BOS] (the projection's layout) + image slots
        lengths = torch.tensor([start + model.to_tokens(t, prepend_bos=False, truncate=False).shape[1]
                                for t in full])
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long().to(tokens.device)
        return tokens, mask

    def step(loss_of_batch):
        opt.zero_grad(set_to_none=True)
        loss = loss_of_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    def old():
        tokens, mask = old_batch()
        return model(tokens, image_features=features, return_type="loss", attention_mask=mask)

    def new():
        tokens, mask = _batch(model, ids)
        return caption_token_nll(model, tokens, mask, features).mean()

    model.eval()  # no dropout: the two losses are compared on identical soft prompts
    with torch.no_grad():
        a, b = old().item(), new().item()
    tokens, mask = old_batch()
    n_pos, n_target = tokens.numel(), (mask[:, 1:].bool() & ~model.image_mask(tokens[:, 1:])).sum().item()
    print(f"batch {args.batch}: {n_pos} positions, {n_target} caption targets; loss old {a:.6f} new {b:.6f}")
    model.train()
    t = interleaved({"old": lambda: step(old), "new": lambda: step(new)}, repeats=args.repeats)
    print(f"step time (thread CPU, 1 thread, median of {args.repeats}): old {t['old']:.3f} s, "
          f"new {t['new']:.3f} s, new/old = {t['new'] / t['old']:.3f}")


if __name__ == "__main__":
    main()
