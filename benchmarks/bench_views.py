"""Size of a page of four views: each saved on its own page vs all four on one page (``save_views``).

The offline model (SmolLM2-135M + EfficientNet-Lite0 + the shipped projection) on scikit-image's cat:
its top 4 attributed units as a heatmap view, a decoded-tokens view and two token-activation views
(the model's caption, and a given text). Printed: each page's size, their sum, the shared page's size
and the ratio; the target is a shared page under 2 MB (circuitsvis's bundle alone is 1.3 MB).

    python benchmarks/bench_views.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from PIL import Image
    from skimage import data

    from tl_multimodal import attribute, decode_units, load
    from tl_multimodal.views.heatmap_view import unit_heatmap_view
    from tl_multimodal.views.html import circuitsvis_bundle, save_views
    from tl_multimodal.views.tokens import decoded_tokens_view, token_activations_view

    model = load("offline")
    image = Image.fromarray(data.chelsea())
    units = attribute(model, [image]).top_units(4).units()
    views = [unit_heatmap_view(model, image, units), decoded_tokens_view(decode_units(model, units)),
             token_activations_view(model, image, units), token_activations_view(model, image, units, text="A cat.")]
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [v.save(Path(tmp) / f"view{i}.html").stat().st_size for i, v in enumerate(views)]
        shared = save_views(Path(tmp) / "page.html", views).stat().st_size
    mb = 1e6
    print(f"circuitsvis bundle: {len(circuitsvis_bundle().encode()) / mb:.2f} MB")
    for v, s in zip(views, sizes):
        print(f"{type(v).__name__:>22} alone: {s / mb:.2f} MB")
    print(f"four pages: {sum(sizes) / mb:.2f} MB; one page (save_views): {shared / mb:.2f} MB; "
          f"ratio {shared / sum(sizes):.2f}; target: one page < 2 MB: {'met' if shared < 2 * mb else 'NOT met'}")


if __name__ == "__main__":
    main()
