"""VisionBridge generation with and without the KV cache, on the offline model.

SmolLM2-135M + EfficientNet-Lite0 + the shipped projection as a ``VisionBridge``; the three bundled
sample images embedded once; greedy decoding of 20 new tokens at batch 3 with
``use_past_kv_cache=True`` (the default) and ``False`` (a full forward pass per step), one thread,
thread CPU time, interleaved runs, medians (``_timing.py``). Prints the ratio and whether the tokens
are identical.

    python benchmarks/bench_bridge_kv.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tl_multimodal import load
    from tl_multimodal.cli import _sample_images

    model = load("offline", backend="bridge")
    with torch.no_grad():
        emb = model.embed_images(list(_sample_images().values()))
    kwargs = dict(image_embed=emb, do_sample=False, stop_at_eos=False, return_type="tokens", verbose=False)
    out = {}

    def run(cache: bool):
        def fn():
            with torch.no_grad():
                out[cache] = model.generate("A picture of", 20, use_past_kv_cache=cache, **kwargs)
        return fn

    times = interleaved({"kv_cache": run(True), "full_forward": run(False)}, repeats=args.repeats)
    print(f"generate 20 tokens, batch {len(emb)}: kv_cache {times['kv_cache']:.2f} s, "
          f"full_forward {times['full_forward']:.2f} s (thread CPU, median of {args.repeats})")
    print(f"full_forward / kv_cache = {times['full_forward'] / times['kv_cache']:.2f}x; "
          f"identical tokens: {torch.equal(out[True], out[False])}")


if __name__ == "__main__":
    main()
