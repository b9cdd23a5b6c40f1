"""Notebook views of multimodal units that work offline: circuitsvis HTML with its JS inlined, heatmap PNGs.

circuitsvis loads its JavaScript from a CDN (unpkg) unless it believes it is offline. The views here
never do: they embed circuitsvis's own bundle (``circuitsvis/dist/cdn/iife.js``, the file its
``render_local`` inlines) once per view, so a saved page or a notebook output renders with no network
at all. Every view has ``_repr_html_`` (shows in Jupyter/Colab) and ``.save(path)`` (a standalone page).

* :func:`decoded_tokens_view` - the top tokens of units (a :class:`~tl_multimodal.decoding.UnitDecoding`),
  coloured by probability (circuitsvis ``ColoredTokens``, one row per unit).
* :func:`token_activations_view` - units' activations over an image-prefixed caption (circuitsvis
  ``ColoredTokensMulti``; image slots read ``<image_i>``).
* :func:`unit_heatmap_view` / :func:`patch_heatmap_view` - a unit's activation (or any patch-grid
  score) over the patch grid, upsampled onto the image, as inline base64 PNGs.

    view = unit_heatmap_view(model, pil_image, [(5, 1021), (7, 33)])
    view                      # renders in the notebook
    view.save("heatmaps.html")
"""

from __future__ import annotations

import base64
import functools
import html
import io
from pathlib import Path
from typing import Callable, Sequence
from uuid import uuid4

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from tl_multimodal.decoding import UnitDecoding
from tl_multimodal.geometry import CropGeometry, grid_to_image
from tl_multimodal.heatmaps import one_image, unit_grid_activations
from tl_multimodal.probe import Probe
from tl_multimodal.units import as_units, mlp_act_name, mlp_hook
from tl_multimodal.vlm import VisionLM, soft_prompts

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font-family: sans-serif;">
{body}
</body></html>
"""


# ---------------------------------------------------------------------------------- views
class HTMLView:
    """Self-contained HTML (no network needed) that renders in a notebook and saves as a page.

    Attributes:
        html: The HTML fragment (what the notebook shows).
        title: A short title (the saved page's ``<title>``).
    """

    def __init__(self, html: str, title: str = "tl_multimodal"):
        self.html = html
        self.title = title

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def to_html(self) -> str:
        """A standalone HTML page holding the view."""
        return _PAGE.format(title=html.escape(self.title), body=self.html)

    def save(self, path: str | Path) -> Path:
        """Write the view as a standalone HTML page; returns the path."""
        path = Path(path)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.title!r}, {len(self.html) / 1e3:.0f} kB of HTML)"


class HeatmapView(HTMLView):
    """Patch-grid heatmaps drawn over an image: inline PNGs in HTML (no JavaScript).

    Attributes:
        heatmaps: ``[n, height, width]`` the grids upsampled onto the image (NaN outside the crop).
        grids: ``[n, rows, cols]`` the patch grids.
        labels: One label per heatmap.
        panels: The panels as displayed (PIL): the plain image first when shown, then one overlay
            per heatmap.
        image: The image under the heatmaps (PIL, original frame), or None.
    """

    def __init__(self, html: str, title: str, heatmaps: Tensor, grids: Tensor, labels: list[str],
                 panels: list[Image.Image], image: Image.Image | None):
        super().__init__(html, title)
        self.heatmaps, self.grids, self.labels, self.panels, self.image = heatmaps, grids, labels, panels, image

    def to_pil(self) -> Image.Image:
        """The panels side by side, on white (what :meth:`save` writes for ``.png``)."""
        w = sum(p.width for p in self.panels) + 4 * (len(self.panels) - 1)
        out = Image.new("RGB", (w, max(p.height for p in self.panels)), "white")
        x = 0
        for p in self.panels:
            out.paste(p, (x, 0))
            x += p.width + 4
        return out

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page, or the panels as one image if ``path`` ends in .png/.jpg."""
        path = Path(path)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            self.to_pil().save(path)
            return path
        return super().save(path)

    def __repr__(self) -> str:
        more = " ..." if len(self.labels) > 4 else ""
        return f"HeatmapView({len(self.labels)} heatmaps: {', '.join(self.labels[:4])}{more})"


# ---------------------------------------------------------------------------------- circuitsvis, inlined
@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (``dist/cdn/iife.js``), as its ``render_local`` inlines it.

    Raises:
        FileNotFoundError: If the installed circuitsvis has no bundle.
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(f"circuitsvis's JavaScript bundle is missing ({path}); reinstall circuitsvis")
    return path.read_text(encoding="utf-8").replace("</script>", "")


def _props_json(props: dict) -> str:
    from circuitsvis.utils.convert_props import convert_props

    # "</" inside a string (a token such as "</") would end the inline <script>; "<\/" is the same JS string
    return convert_props(props).replace("</", "<\\/")


def render_circuitsvis(elements: Sequence[tuple[str, dict]],
                       layout: Callable[[list[str]], str] | None = None) -> str:
    """HTML rendering circuitsvis React elements with the JS bundle inlined once (no CDN).

    Args:
        elements: ``(element name, props)`` pairs, e.g. ``("ColoredTokens", {"tokens": [...],
            "values": [...]})``; props use circuitsvis's (camelCase) names and may hold tensors.
        layout: Builds the body from the elements' ``<div>`` placeholders (default: one after another).

    Returns:
        An HTML fragment: the placeholders, then one ``<script type="module">`` holding the bundle
        and a ``CircuitsVis.render`` call per element.
    """
    if not elements:
        raise ValueError("nothing to render")
    ids = [f"tl-multimodal-{uuid4().hex[:12]}" for _ in elements]
    divs = [f'<div id="{i}" style="margin: 4px 0;"></div>' for i in ids]
    body = layout(divs) if layout is not None else "\n".join(divs)
    calls = "\n".join(f'CircuitsVis.render("{i}", CircuitsVis.{name}, {_props_json(props)});'
                      for i, (name, props) in zip(ids, elements))
    return f'{body}\n<script crossorigin type="module">\n{circuitsvis_bundle()}\n{calls}\n</script>'


def _unit_label(layer: int, unit: int) -> str:
    return f"L{layer}.{unit}"


# ---------------------------------------------------------------------------------- (a) decoded tokens
def decoded_tokens_view(decoding: UnitDecoding, n_tokens: int | None = None, title: str | None = None) -> HTMLView:
    """The top tokens of each unit's output direction, coloured by their probability (circuitsvis).

    One row per unit: its label (``L5.1021``, with a check mark when it passes the paper's
    interpretability filter), then its top tokens as circuitsvis ``ColoredTokens`` (values: the
    softmax probabilities, on a shared colour scale).

    Args:
        decoding: From :func:`~tl_multimodal.decoding.decode_units`.
        n_tokens: Tokens shown per unit (default: all of ``decoding``'s).
        title: Heading above the table.

    Returns:
        An :class:`HTMLView`.
    """
    if not isinstance(decoding, UnitDecoding):
        raise ValueError(f"decoded_tokens_view takes a UnitDecoding (decode_units(...)), got {type(decoding).__name__}")
    if len(decoding) == 0:
        raise ValueError("the decoding holds no units")
    n_k = decoding.token_ids.shape[1]
    k = n_k if n_tokens is None else n_tokens
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_k:
        raise ValueError(f"n_tokens must be an int in [1, {n_k}], got {k!r}")
    vmax = float(decoding.probs[:, :k].max())
    elements = [("ColoredTokens", {"tokens": toks[:k], "values": probs[:k], "minValue": 0.0, "maxValue": vmax})
                for toks, probs in zip(decoding.tokens, decoding.probs.tolist())]
    labels = [_unit_label(l, u) + (" \u2713" if ok else "") for l, u, ok in
              zip(decoding.layer.tolist(), decoding.unit.tolist(), decoding.interpretable.tolist())]
    title = title or f"Top {k} decoded tokens of {len(decoding)} units"

    def layout(divs: list[str]) -> str:
        rows = "\n".join(f'<tr><td style="padding: 0 8px; white-space: nowrap; font-family: monospace;">'
                         f"{html.escape(label)}</td><td>{div}</td></tr>" for label, div in zip(labels, divs))
        note = ("softmax(W_U^T W_out[layer][unit])" + (" through ln_final" if decoding.apply_ln else "")
                + "; \u2713 = at least 7 of the top 10 are English words")
        return (f"<div><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
                f"<div style='font-size: 80%; color: #555;'>{html.escape(note)}</div>"
                f"<table style='border-collapse: collapse;'>{rows}</table></div>")

    return HTMLView(render_circuitsvis(elements, layout), title)


# ---------------------------------------------------------------------------------- (b) activations over tokens
def _unit_list(model: VisionLM, units) -> list[tuple[int, int]]:
    return [tuple(u) for u in as_units(model, units, batched=False, allow_empty=False).tolist()]


class TokenActivationsView(HTMLView):
    """Units' activations over an image-prefixed text (circuitsvis ``ColoredTokensMulti``).

    Attributes:
        tokens: The string tokens, image slots as ``<image_i>``.
        values: ``[pos, n_units]`` the activations.
        labels: ``L{layer}.{unit}`` per unit.
        text: The text after the image slots.
    """

    def __init__(self, html: str, title: str, tokens: list[str], values: Tensor, labels: list[str], text: str):
        super().__init__(html, title)
        self.tokens, self.values, self.labels, self.text = tokens, values, labels, text

    def to_dataframe(self):
        """One row per position: position, token, then one column per unit."""
        import pandas as pd

        df = pd.DataFrame(self.values.numpy(), columns=self.labels)
        df.insert(0, "token", self.tokens)
        df.insert(0, "position", range(len(self.tokens)))
        return df

    def __repr__(self) -> str:
        return f"TokenActivationsView({len(self.labels)} units over {len(self.tokens)} tokens: {self.text!r})"


@torch.no_grad()
def token_activations_view(model: VisionLM, image, units, text: str | None = None, prompt: str = "A picture of",
                           hook: str = "post", max_new_tokens: int = 12, include_image: bool = True, *,
                           probe: Probe | None = None, image_index: int = 0) -> TokenActivationsView:
    """Activations of MLP units at every position of ``[image slots][text]`` (circuitsvis).

    Args:
        model: The vision LM.
        image: One image (PIL, a path, an array, or a pixel tensor ``[channel, h, w]``).
        units: ``(layer, unit)`` pairs (a list or an ``[n, 2]`` tensor); one button each in the view.
        text: The text after the image; default: ``prompt`` followed by the model's own greedy
            caption of the image (its generated tokens).
        prompt: Prompt for the caption when ``text`` is None.
        hook: The MLP hook read (``"post"``: the activation; ``"pre"``: what attribution scores).
        max_new_tokens: Caption length when ``text`` is None.
        include_image: Show the image positions too (``<image_0>`` ...), not only the text.
        probe: Show row ``image_index`` of this probe (its tokens up to and including the target)
            instead of ``text``; ``image`` is that row's image.
        image_index: The probe row.

    Returns:
        A :class:`TokenActivationsView`.
    """
    unit_list = _unit_list(model, units)
    short = mlp_hook(model, hook)
    _, pixels = one_image(model, image)
    emb = soft_prompts(model, pixels)
    if probe is not None:
        if text is not None:
            raise ValueError("pass either text= or probe=, not both")
        if not isinstance(image_index, int) or not -len(probe) <= image_index < len(probe):
            raise ValueError(f"image_index {image_index!r} out of range for a probe of {len(probe)} images")
        row = probe[image_index]
        tokens = torch.cat([row.tokens[:, :int(row.pred_pos[0]) + 1], row.target_ids[:, None]], 1).to(model.cfg.device)
        text = model.tokenizer.decode(tokens[0][~model.image_mask(tokens)[0]].tolist())
    else:
        if text is None:  # the model's own tokens, not a re-tokenization of their text
            tokens = model.generate(prompt, max_new_tokens, image_embed=emb, do_sample=False, verbose=False,
                                    return_type="tokens")
            text = model.tokenizer.decode(tokens[0][~model.image_mask(tokens)[0]].tolist())
        else:
            if not text.strip():
                raise ValueError("text is empty")
            tokens = model.to_tokens(text, image=True)
    layers = sorted({l for l, _ in unit_list})
    names = [mlp_act_name(short, l) for l in layers]
    _, cache = model.run_with_cache(tokens, image_embed=emb, names_filter=names, stop_at_layer=layers[-1] + 1)
    values = torch.stack([cache[mlp_act_name(short, l)][0, :, u].float().cpu() for l, u in unit_list], dim=1)
    str_tokens = model.to_str_tokens(tokens)
    if not include_image:
        keep = ~model.image_mask(tokens)[0].cpu()
        str_tokens = [t for t, k in zip(str_tokens, keep.tolist()) if k]
        values = values[keep]
    labels = [_unit_label(l, u) for l, u in unit_list]
    title = f"{hook} of {', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''} over: {text}"

    def layout(divs: list[str]) -> str:
        return (f"<div><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
                "<div style='font-size: 80%; color: #555;'>hover a token for its values; pick a unit "
                f"with its button</div>{divs[0]}</div>")

    out = render_circuitsvis([("ColoredTokensMulti", {"tokens": str_tokens, "values": values, "labels": labels})],
                             layout)
    return TokenActivationsView(out, title, str_tokens, values, labels, text)


# ---------------------------------------------------------------------------------- (c) patch heatmaps
def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colorize(heatmap: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """``[h, w]`` -> ``[h, w, 3]`` float RGB with the colormap's 256-entry table."""
    import matplotlib

    scale = (heatmap - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(heatmap)
    return matplotlib.colormaps[cmap](np.clip(np.nan_to_num(scale), 0, 1))[..., :3]


def overlay_heatmap(image: Image.Image | None, heatmap: Float[Tensor, "height width"], alpha: float = 0.5,
                    cmap: str = "jet", vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """A heatmap blended over its image (same size), as a PIL RGB image.

    ``out = (1 - alpha) * image + alpha * cmap((heatmap - vmin) / (vmax - vmin))``; NaN pixels (cut
    away by the crop, never seen by the model) show the image dimmed, or grey without an image.
    Without an image the colours are drawn opaque.

    Args:
        image: The image (``None``: the heatmap alone).
        heatmap: ``[height, width]``, in the image's frame.
        alpha: Heatmap opacity over the image.
        cmap: A matplotlib colormap name.
        vmin, vmax: Colour range (default: the heatmap's finite min and max).
    """
    hm = heatmap.detach().float().cpu().numpy()
    finite = np.isfinite(hm)
    if not finite.any():
        raise ValueError("the heatmap has no finite values")
    vmin = float(hm[finite].min()) if vmin is None else vmin
    vmax = float(hm[finite].max()) if vmax is None else vmax
    color = _colorize(hm, cmap, vmin, vmax)
    if image is None:
        rgb = np.where(finite[..., None], color, 0.8)
    else:
        if image.size != (hm.shape[1], hm.shape[0]):
            raise ValueError(f"heatmap is {hm.shape[1]}x{hm.shape[0]} but the image is {image.size[0]}x{image.size[1]}")
        base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
        rgb = np.where(finite[..., None], (1 - alpha) * base + alpha * color, 0.4 * base)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def _display_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    w, h = size
    if max_size is None or max(w, h) <= max_size:
        return w, h
    s = max_size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def patch_heatmap_view(image: Image.Image | None, grids: Float[Tensor, "n rows cols"] | Sequence[Tensor],
                       labels: Sequence[str] | None = None, geometry: CropGeometry | None = None,
                       alpha: float = 0.5, cmap: str = "jet", max_size: int | None = 256,
                       shared_scale: bool = False, show_image: bool = True, title: str | None = None,
                       ) -> HeatmapView:
    """Patch-grid scores (unit activations, attributions, ...) upsampled onto an image, as HTML.

    Each grid goes through :func:`~tl_multimodal.heatmaps.grid_to_image` (bilinear, in the model's
    input frame, read off at the original pixels through the resize/crop of ``geometry``) and is
    blended over the image (:func:`overlay_heatmap`); panels are inline base64 PNGs.

    Args:
        image: The original image (``None``: heatmaps alone, in the input frame of ``geometry``).
        grids: ``[n, rows, cols]`` (or ``[rows, cols]``, or a list of grids).
        labels: One caption per grid (default ``"0"``, ``"1"``, ...).
        geometry: Where the model input sits in ``image`` (``CropGeometry.from_data_config(
            model.vision.data_config, image.size)``); default: the image *is* the model input.
        alpha, cmap: Heatmap opacity and matplotlib colormap.
        max_size: Longest side of a displayed panel in pixels (``None``: full size).
        shared_scale: One colour range for all grids (default: each its own min..max).
        show_image: Put the plain image first.
        title: Heading above the panels.

    Returns:
        A :class:`HeatmapView`; ``.heatmaps`` holds the upsampled grids at full size.
    """
    g = torch.stack([torch.as_tensor(x) for x in grids]) if not isinstance(grids, Tensor) else grids
    g = g[None] if g.ndim == 2 else g
    if g.ndim != 3 or g.shape[0] == 0:
        raise ValueError(f"grids must be [n, rows, cols] (or one [rows, cols] grid), got shape {tuple(g.shape)}")
    g = g.detach().float().cpu()
    labels = [str(i) for i in range(len(g))] if labels is None else [str(s) for s in labels]
    if len(labels) != len(g):
        raise ValueError(f"{len(labels)} labels for {len(g)} grids")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if geometry is None:
        if image is None:
            raise ValueError("pass the image or a geometry (the heatmap needs a frame)")
        geometry = CropGeometry.identity(image.size)
    elif image is not None and tuple(geometry.image_size) != tuple(image.size):
        raise ValueError(f"the geometry is for a {geometry.image_size} image but the image is {image.size}")
    heatmaps = grid_to_image(g, geometry)  # [n, h, w]
    finite = heatmaps[torch.isfinite(heatmaps)]
    lo, hi = (float(finite.min()), float(finite.max())) if shared_scale and len(finite) else (None, None)
    size = _display_size(geometry.image_size, max_size)
    panels, figs = [], []
    if show_image and image is not None:
        plain = image.convert("RGB").resize(size, Image.BILINEAR) if size != image.size else image.convert("RGB")
        panels.append(plain)
        figs.append(("image", plain))
    for hm, label in zip(heatmaps, labels):
        full = overlay_heatmap(image, hm, alpha=alpha, cmap=cmap, vmin=lo, vmax=hi)
        panel = full.resize(size, Image.BILINEAR) if size != full.size else full
        rng = hm[torch.isfinite(hm)]
        caption = f"{label} ({float(rng.min()):.3g} .. {float(rng.max()):.3g})"
        panels.append(panel)
        figs.append((caption, panel))
    title = title or f"{len(g)} patch heatmaps ({cmap}: blue low, red high)"
    items = "\n".join(
        f'<figure style="margin: 4px;"><img src="{_png_data_uri(p)}" width="{p.width}" height="{p.height}" '
        f'alt="{html.escape(c)}" style="image-rendering: auto;"/>'
        f'<figcaption style="font-family: monospace; font-size: 80%; text-align: center;">{html.escape(c)}'
        "</figcaption></figure>" for c, p in figs)
    body = (f"<div><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
            f"<div style='display: flex; flex-wrap: wrap; align-items: flex-start;'>{items}</div></div>")
    return HeatmapView(body, title, heatmaps, g, labels, panels, image)


def display_image(model: VisionLM, image) -> tuple[Image.Image, CropGeometry, Tensor]:
    """The image to draw on, its geometry and its pixels: PIL originals (or paths) as they are, pixel
    tensors de-normalised."""
    pil, pixels = one_image(model, image)
    if pil is not None:
        return pil, CropGeometry.from_data_config(model.vision.data_config, pil.size), pixels
    _, pixels = one_image(model, image)
    cfg = model.vision.data_config
    mean = torch.tensor(cfg.get("mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(cfg.get("std", (1.0, 1.0, 1.0)))[:, None, None]
    rgb = (pixels[0].float().cpu() * std + mean).clamp(0, 1)
    pil = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return pil, CropGeometry.identity(pil.size), pixels


def unit_heatmap_view(model: VisionLM, image, units, hook: str = "post", *, image_embed: Tensor | None = None,
                      **kwargs) -> HeatmapView:
    """Where on the image each unit fires: its activations at the image positions, over the image.

    Args:
        model: The vision LM (:class:`~tl_multimodal.vlm.VisionLM`).
        image: One image: PIL (drawn in its original frame, through timm's resize/crop), or a pixel
            tensor ``[channel, h, w]`` (de-normalised with the encoder's mean/std, the input frame).
        units: ``(layer, unit)`` pairs (a list or an ``[n, 2]`` tensor).
        hook: The MLP hook read (see :func:`~tl_multimodal.heatmaps.unit_grid_activations`).
        image_embed: The image's soft prompts, if already made (the image is then not encoded again).
        **kwargs: Passed to :func:`patch_heatmap_view` (alpha, cmap, max_size, shared_scale, ...).

    Returns:
        A :class:`HeatmapView` (one panel per unit, after the plain image).
    """
    unit_list = _unit_list(model, units)
    pil, geometry, pixels = display_image(model, image)
    grids = unit_grid_activations(model, None if image_embed is not None else pixels, unit_list, hook,
                                  image_embed=image_embed)[0]
    labels = [_unit_label(l, u) for l, u in unit_list]
    kwargs.setdefault("title", f"{hook} of {len(labels)} units over the patch grid {tuple(model.vision.grid)}")
    return patch_heatmap_view(pil, grids, labels, geometry, **kwargs)
