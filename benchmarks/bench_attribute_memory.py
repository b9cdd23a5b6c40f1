"""What ``attribute`` keeps for its backward pass, per backend, with the captioning steps differentiated through
the KV cache (``grad_through_kv_cache = True``) and without (caption, then one more forward).

The offline model (SmolLM2-135M + EfficientNet-Lite0 + the shipped projection) on the bundled sample images.
Counted exactly, with ``torch.autograd.graph.saved_tensors_hooks``: the bytes of every distinct storage autograd
saves that is not a parameter or buffer of the model (its own weights cost nothing extra). Also the process's
peak resident memory growth during the call (Linux: ``/proc/self/status`` ``VmHWM``, reset before each call).

    python benchmarks/bench_attribute_memory.py [--images 3] [--max-new-tokens 20]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in MiB (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            line = next((l for l in f if l.startswith(key)), None)
    except OSError:
        return 0
    return 0 if line is None else int(line.split()[1]) // 1024


def _reset_peak() -> None:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def measure(model, images, max_new_tokens: int, fused: bool) -> tuple[int, int, float]:
    """(MiB saved for backward beyond the model's weights, MiB of peak RSS growth, seconds) of one call."""
    from tl_multimodal import attribute

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    default = model.grad_through_kv_cache
    model.grad_through_kv_cache = fused
    _reset_peak()
    base, start = _status("VmRSS"), time.perf_counter()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attribute(model, images, max_new_tokens=max_new_tokens)
    finally:
        model.grad_through_kv_cache = default
    return sum(seen.values()) >> 20, _status("VmHWM") - base, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()
    from importlib.metadata import version

    from tl_multimodal import load
    from tl_multimodal.data.sources import sample_images
    from tl_multimodal._compat import HAS_HOOKED_TRANSFORMER

    images = sample_images(args.images).images
    print(f"TransformerLens {version('transformer-lens')}; {args.images} images, max_new_tokens "
          f"{args.max_new_tokens}; MiB kept for backward (not weights) | peak RSS growth | seconds")
    for backend in (["hooked"] if HAS_HOOKED_TRANSFORMER else []) + ["bridge"]:
        model = load("offline", backend=backend)
        for fused in (True, False):
            saved, peak, secs = measure(model, images, args.max_new_tokens, fused)
            print(f"{backend:6s} grad_through_kv_cache={str(fused):5s} (default {model.grad_through_kv_cache}): "
                  f"{saved:6d} MiB | {peak:6d} MiB | {secs:5.1f} s", flush=True)
        del model


if __name__ == "__main__":
    main()
