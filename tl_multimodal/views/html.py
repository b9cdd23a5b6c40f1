"""Notebook views of multimodal units that work offline: circuitsvis HTML with its JS inlined, heatmap PNGs.

circuitsvis loads its JavaScript from a CDN (unpkg) unless it believes it is offline. The views here
never do: they embed circuitsvis's own bundle (``circuitsvis/dist/cdn/iife.js``, the file its
``render_local`` inlines) once per view, so a saved page or a notebook output renders with no network
at all. Every view has ``_repr_html_`` (shows in Jupyter/Colab) and ``.save(path)`` (a standalone page);
:func:`save_views` puts several views on one page with the 1.3 MB bundle written once.

circuitsvis writes each token into the page as HTML, so tokens are HTML-escaped before they go in and
image slots are labelled ``[img 0]``, ``[img 1]``, ... (plain text that shows as written).

* :func:`decoded_tokens_view` - the top tokens of units (a :class:`~tl_multimodal.analysis.decoding.UnitDecoding`),
  coloured by probability (circuitsvis ``ColoredTokens``, one row per unit).
* :func:`token_activations_view` - units' activations over an image-prefixed caption (circuitsvis
  ``ColoredTokensMulti``; image slots read ``[img i]``).
* :func:`unit_heatmap_view` / :func:`patch_heatmap_view` - a unit's activation (or any patch-grid
  score) over the patch grid, upsampled onto the image, as inline base64 PNGs.

    view = unit_heatmap_view(model, pil_image, [(5, 1021), (7, 33)])
    view                      # renders in the notebook
    view.save("heatmaps.html")
    save_views("page.html", [view, decoded_tokens_view(decode_units(model, units))])
"""

from __future__ import annotations

import base64
import functools
import html
import io
import numbers
from pathlib import Path
from typing import Callable, Sequence
from uuid import uuid4

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.decoding import UnitDecoding
from tl_multimodal.models.geometry import CropGeometry, grid_to_image
from tl_multimodal.analysis.heatmaps import one_image, unit_grid_activations
from tl_multimodal.analysis.probe import Probe
from tl_multimodal.analysis.units import as_units, mlp_act_name, mlp_hook
from tl_multimodal.models.protocol import VisionLM, soft_prompts

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
        html: The HTML fragment (what the notebook shows), circuitsvis's bundle included if it needs it.
        title: A short title (the saved page's ``<title>``).
        body: ``html`` without circuitsvis's script (what :func:`save_views` puts on a shared page).
        js: The ``CircuitsVis.render`` calls that ``body`` needs, run after the bundle ("" if none).
    """

    def __init__(self, html: str, title: str = "tl_multimodal", *, body: str | None = None, js: str = ""):
        self.html = html
        self.title = title
        self.body = html if body is None else body
        self.js = js

    @classmethod
    def from_circuitsvis(cls, elements: Sequence[tuple[str, dict]], layout: Callable[[list[str]], str] | None,
                         title: str, **attributes) -> "HTMLView":
        """A view of circuitsvis elements (see :func:`render_circuitsvis`); ``attributes`` go to ``cls``."""
        body, js = circuitsvis_parts(elements, layout)
        return cls(_with_bundle(body, js), title, body=body, js=js, **attributes)

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
        captions: One caption per panel (label and colour range).
        colorbar: The colour bar (PIL), its end labels in ``colorbar_labels``.
        note: What the colours and the darkened border mean (lines of text).
    """

    def __init__(self, html: str, title: str, heatmaps: Tensor, grids: Tensor, labels: list[str],
                 panels: list[Image.Image], image: Image.Image | None, captions: list[str] | None = None,
                 colorbar: Image.Image | None = None, colorbar_labels: tuple[str, str] = ("low", "high"),
                 note: str = ""):
        super().__init__(html, title)
        self.heatmaps, self.grids, self.labels, self.panels, self.image = heatmaps, grids, labels, panels, image
        self.captions = [""] * len(panels) if captions is None else captions
        self.colorbar, self.colorbar_labels, self.note = colorbar, colorbar_labels, note

    @property
    def cropped(self) -> bool:
        """Whether the encoder's crop cut part of the image away (those pixels are NaN and drawn dark)."""
        return self.image is not None and not bool(torch.isfinite(self.heatmaps).all())

    def to_pil(self, labels: bool = True) -> Image.Image:
        """The panels side by side, on white (what :meth:`save` writes for ``.png``).

        Args:
            labels: Write each panel's caption under it, then the colour bar and the note on the
                crop (``False``: the panels alone).
        """
        w = sum(p.width for p in self.panels) + 4 * (len(self.panels) - 1)
        h = max(p.height for p in self.panels)
        if not labels:
            out = Image.new("RGB", (w, h), "white")
            for x, p in zip(_offsets(self.panels), self.panels):
                out.paste(p, (x, 0))
            return out
        from PIL import ImageDraw, ImageFont

        font = ImageFont.load_default(size=12)
        line = 16
        bar = self.colorbar
        notes = [n for n in self.note.split("\n") if n]
        out = Image.new("RGB", (w, h + line + 6 + (bar.height + line + 8 if bar else 0) + line * len(notes)), "white")
        draw = ImageDraw.Draw(out)
        for x, p, c in zip(_offsets(self.panels), self.panels, self.captions):
            out.paste(p, (x, 0))
            draw.text((x + p.width / 2, h + 3), c, fill="black", font=font, anchor="ma")
        y = h + line + 6
        if bar is not None:
            out.paste(bar, (4, y))
            lo, hi = self.colorbar_labels
            draw.text((4, y + bar.height + 2), lo, fill="black", font=font, anchor="la")
            draw.text((4 + bar.width, y + bar.height + 2), hi, fill="black", font=font, anchor="ra")
            y += bar.height + line + 8
        for n in notes:
            draw.text((4, y), n, fill="#444", font=font)
            y += line
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


def circuitsvis_parts(elements: Sequence[tuple[str, dict]],
                      layout: Callable[[list[str]], str] | None = None) -> tuple[str, str]:
    """The HTML and the JavaScript of circuitsvis React elements, apart (the bundle in neither).

    Args:
        elements: ``(element name, props)`` pairs, e.g. ``("ColoredTokens", {"tokens": [...],
            "values": [...]})``; props use circuitsvis's (camelCase) names and may hold tensors.
        layout: Builds the body from the elements' ``<div>`` placeholders (default: one after another).

    Returns:
        ``(body, js)``: the placeholders laid out, and one ``CircuitsVis.render`` call per element
        (to run after :func:`circuitsvis_bundle`).
    """
    if not elements:
        raise ValueError("nothing to render")
    ids = [f"tl-multimodal-{uuid4().hex[:12]}" for _ in elements]
    divs = [f'<div id="{i}" style="margin: 4px 0;"></div>' for i in ids]
    body = layout(divs) if layout is not None else "\n".join(divs)
    js = "\n".join(f'CircuitsVis.render("{i}", CircuitsVis.{name}, {_props_json(props)});'
                    for i, (name, props) in zip(ids, elements))
    return body, js


def _with_bundle(body: str, js: str) -> str:
    """``body``, then one module script: circuitsvis's bundle and ``js`` (``body`` alone if no ``js``)."""
    if not js:
        return body
    return f'{body}\n<script crossorigin type="module">\n{circuitsvis_bundle()}\n{js}\n</script>'


def render_circuitsvis(elements: Sequence[tuple[str, dict]],
                       layout: Callable[[list[str]], str] | None = None) -> str:
    """HTML rendering circuitsvis React elements with the JS bundle inlined once (no CDN).

    Args:
        elements, layout: As for :func:`circuitsvis_parts`.

    Returns:
        An HTML fragment: the placeholders, then one ``<script type="module">`` holding the bundle
        and a ``CircuitsVis.render`` call per element.
    """
    return _with_bundle(*circuitsvis_parts(elements, layout))


def join_views(views: Sequence[HTMLView], title: str = "tl_multimodal views") -> HTMLView:
    """Several views as one, one after another, with circuitsvis's bundle inlined once for all.

    Args:
        views: :class:`HTMLView` objects (circuitsvis views, heatmap views, ...).
        title: The page title.

    Returns:
        An :class:`HTMLView` (shows in a notebook; ``.save(path)`` writes the page).
    """
    views = list(views) if not isinstance(views, HTMLView) else [views]
    if not views:
        raise ValueError("views is empty: pass at least one view")
    for i, v in enumerate(views):
        if not isinstance(v, HTMLView):
            raise TypeError(f"views[{i}] is a {type(v).__name__}, not a view (HTMLView)")
    body = "\n<hr style='border: none; border-top: 1px solid #ddd;'/>\n".join(v.body for v in views)
    js = "\n".join(v.js for v in views if v.js)
    return HTMLView(_with_bundle(body, js), title, body=body, js=js)


def save_views(path: str | Path, views: Sequence[HTMLView], title: str = "tl_multimodal views") -> Path:
    """Write several views on one standalone page, circuitsvis's 1.3 MB bundle written once.

    Args:
        path: The HTML file to write.
        views: :class:`HTMLView` objects.
        title: The page title.

    Returns:
        The path written.
    """
    return join_views(views, title).save(path)


def label_image_slots(tokens: Sequence[str], image_slots: Sequence[bool] | Tensor) -> list[str]:
    """``tokens`` with the image slots renamed ``[img 0]``, ``[img 1]``, ... in order (text tokens kept).

    Args:
        tokens: String tokens (``model.to_str_tokens(tokens)``).
        image_slots: ``[pos]`` True where a token is an image slot (``model.image_mask(tokens)[0]``).
    """
    slots = [bool(x) for x in (image_slots.tolist() if isinstance(image_slots, Tensor) else image_slots)]
    if len(slots) != len(tokens):
        raise ValueError(f"image_slots has {len(slots)} entries for {len(tokens)} tokens")
    n = iter(range(len(slots)))
    return [f"[img {next(n)}]" if s else t for t, s in zip(tokens, slots)]


def cv_tokens(tokens: Sequence[str], image_slots: Sequence[bool] | Tensor | None = None) -> list[str]:
    """Tokens as circuitsvis must get them to show them: it writes each one into the page as HTML.

    Text tokens are HTML-escaped (``"</b>"`` shows as written instead of vanishing as a tag); image
    slots read ``[img 0]``, ``[img 1]``, ... (:func:`label_image_slots`).

    Args:
        tokens: String tokens.
        image_slots: ``[pos]`` True where a token is an image slot (default: none is).
    """
    slots = [False] * len(tokens) if image_slots is None else image_slots
    flags = [bool(x) for x in (slots.tolist() if isinstance(slots, Tensor) else slots)]
    return [t if s else html.escape(t, quote=False) for t, s in zip(label_image_slots(tokens, flags), flags)]


def _unit_label(layer: int, unit: int) -> str:
    return f"L{layer}.{unit}"


# ---------------------------------------------------------------------------------- (a) decoded tokens
def decoded_tokens_view(decoding: UnitDecoding, n_tokens: int | None = None, title: str | None = None) -> HTMLView:
    """The top tokens of each unit's output direction, coloured by their probability (circuitsvis).

    One row per unit: its label (``L5.1021``, with a check mark when it passes the paper's
    interpretability filter), then its top tokens as circuitsvis ``ColoredTokens`` (values: the
    softmax probabilities, on a shared colour scale).

    Args:
        decoding: From :func:`~tl_multimodal.analysis.decoding.decode_units`.
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
    check_int(k, "n_tokens", maximum=n_k)
    vmax = float(decoding.probs[:, :k].max())
    elements = [("ColoredTokens", {"tokens": cv_tokens(toks[:k]), "values": probs[:k], "minValue": 0.0, "maxValue": vmax})
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

    return HTMLView.from_circuitsvis(elements, layout, title)


# ---------------------------------------------------------------------------------- (b) activations over tokens
def _unit_list(model: VisionLM, units) -> list[tuple[int, int]]:
    return [tuple(u) for u in as_units(model, units, batched=False, allow_empty=False).tolist()]


class TokenActivationsView(HTMLView):
    """Units' activations over an image-prefixed text (circuitsvis ``ColoredTokensMulti``).

    Attributes:
        tokens: The string tokens, image slots as ``[img i]``.
        values: ``[pos, n_units]`` the activations.
        labels: ``L{layer}.{unit}`` per unit.
        text: The text after the image slots.
    """

    def __init__(self, html: str, title: str, tokens: list[str], values: Tensor, labels: list[str], text: str,
                 **parts):
        super().__init__(html, title, **parts)
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
        include_image: Show the image positions too (labelled ``[img 0]`` ...), not only the text.
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
        check_int(image_index, "image_index", minimum=-len(probe), maximum=len(probe) - 1)
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
    slots = model.image_mask(tokens)[0].cpu()
    str_tokens = model.to_str_tokens(tokens)
    if not include_image:
        str_tokens = [t for t, s in zip(str_tokens, slots.tolist()) if not s]
        values, slots = values[~slots], slots[~slots]
    labels = [_unit_label(l, u) for l, u in unit_list]
    title = f"{hook} of {', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''} over: {text}"

    def layout(divs: list[str]) -> str:
        return (f"<div><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
                "<div style='font-size: 80%; color: #555;'>hover a token for its values; pick a unit "
                "with its button; [img i] = image position i (patch i of the encoder's grid, row by row)"
                f"</div>{divs[0]}</div>")

    element = ("ColoredTokensMulti", {"tokens": cv_tokens(str_tokens, slots), "values": values, "labels": labels})
    return TokenActivationsView.from_circuitsvis([element], layout, title, values=values, labels=labels, text=text,
                                                 tokens=label_image_slots(str_tokens, slots))


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


def _offsets(panels: Sequence[Image.Image], gap: int = 4) -> list[int]:
    """Left edge of each panel laid out side by side."""
    return [sum(p.width + gap for p in panels[:i]) for i in range(len(panels))]


def colorbar_image(cmap: str = "jet", width: int = 256, height: int = 12) -> Image.Image:
    """A horizontal colour bar of a matplotlib colormap, low on the left (PIL RGB)."""
    row = _colorize(np.linspace(0.0, 1.0, width), cmap, 0.0, 1.0)
    return Image.fromarray(np.round(np.repeat(row[None], height, 0) * 255).astype(np.uint8))


def _check_range(vmin, vmax) -> None:
    for name, v in (("vmin", vmin), ("vmax", vmax)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v)):
            raise ValueError(f"{name} must be a finite number or None, got {v!r}")
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise ValueError(f"vmin must be below vmax, got vmin={vmin} vmax={vmax}")


def patch_heatmap_view(image: Image.Image | None, grids: Float[Tensor, "n rows cols"] | Sequence[Tensor],
                       labels: Sequence[str] | None = None, geometry: CropGeometry | None = None,
                       alpha: float = 0.5, cmap: str = "jet", max_size: int | None = 256,
                       shared_scale: bool = False, show_image: bool = True, title: str | None = None,
                       vmin: float | None = None, vmax: float | None = None) -> HeatmapView:
    """Patch-grid scores (unit activations, attributions, ...) upsampled onto an image, as HTML.

    Each grid goes through :func:`~tl_multimodal.analysis.heatmaps.grid_to_image` (bilinear, in the model's
    input frame, read off at the original pixels through the resize/crop of ``geometry``) and is
    blended over the image (:func:`overlay_heatmap`); panels are inline base64 PNGs, each captioned
    with its label and value range, followed by a colour bar and a note on what the colours and a
    darkened border (the part of the image the encoder's centre crop cut away) mean.

    Args:
        image: The original image (``None``: heatmaps alone, in the input frame of ``geometry``).
        grids: ``[n, rows, cols]`` (or ``[rows, cols]``, or a list of grids).
        labels: One caption per grid (default ``"0"``, ``"1"``, ...).
        geometry: Where the model input sits in ``image`` (``CropGeometry.from_data_config(
            model.vision.data_config, image.size)``); default: the image *is* the model input.
        alpha, cmap: Heatmap opacity and matplotlib colormap.
        max_size: Longest side of a displayed panel in pixels (``None``: full size).
        shared_scale: One colour range for all grids, their joint min..max (default: each its own
            min..max, so colours compare only within a panel).
        show_image: Put the plain image first.
        title: Heading above the panels.
        vmin, vmax: A fixed colour range for all grids (either one alone fixes that end of the shared
            range; values outside take the end colours).

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
    _check_range(vmin, vmax)
    if geometry is None:
        if image is None:
            raise ValueError("pass the image or a geometry (the heatmap needs a frame)")
        geometry = CropGeometry.identity(image.size)
    elif image is not None and tuple(geometry.image_size) != tuple(image.size):
        raise ValueError(f"the geometry is for a {geometry.image_size} image but the image is {image.size}")
    heatmaps = grid_to_image(g, geometry)  # [n, h, w]
    finite = heatmaps[torch.isfinite(heatmaps)]
    shared = shared_scale or vmin is not None or vmax is not None
    lo, hi = None, None
    if shared and len(finite):
        lo = float(finite.min()) if vmin is None else float(vmin)
        hi = float(finite.max()) if vmax is None else float(vmax)
        if not lo < hi and (vmin is not None or vmax is not None):
            raise ValueError(f"the colour range is empty ({lo:.3g} .. {hi:.3g}): pass both vmin and vmax")
    size = _display_size(geometry.image_size, max_size)
    panels, captions = [], []
    if show_image and image is not None:
        plain = image.convert("RGB").resize(size, Image.BILINEAR) if size != image.size else image.convert("RGB")
        panels.append(plain)
        captions.append("image")
    for hm, label in zip(heatmaps, labels):
        full = overlay_heatmap(image, hm, alpha=alpha, cmap=cmap, vmin=lo, vmax=hi)
        panels.append(full.resize(size, Image.BILINEAR) if size != full.size else full)
        rng = hm[torch.isfinite(hm)]
        captions.append(f"{label} ({float(rng.min()):.3g} .. {float(rng.max()):.3g})")
    title = title or f"{len(g)} patch heatmaps"
    bar = colorbar_image(cmap, width=min(256, max(64, size[0])))
    ends = (f"{lo:.3g}", f"{hi:.3g}") if lo is not None else ("each panel's min", "its max")
    notes = [f"{cmap}: {ends[0]} (left) .. {ends[1]} (right)"
             + ("; one colour scale for all panels" if lo is not None else
                "; each panel has its own scale (shared_scale=True for one scale)")]
    if image is not None and not torch.isfinite(heatmaps[0]).all():
        notes.append("darkened border: cut away by the encoder's centre crop (the model saw only the "
                     f"{geometry.crop[2]}x{geometry.crop[3]} centre of the resized image)")
    note = "\n".join(notes)
    items = "\n".join(
        f'<figure style="margin: 4px;"><img src="{_png_data_uri(p)}" width="{p.width}" height="{p.height}" '
        f'alt="{html.escape(c)}" style="image-rendering: auto;"/>'
        f'<figcaption style="font-family: monospace; font-size: 80%; text-align: center;">{html.escape(c)}'
        "</figcaption></figure>" for c, p in zip(captions, panels))
    legend = (f"<div class='colorbar' style='font-size: 80%; display: flex; align-items: center; gap: 6px;'>"
              f'<span>{html.escape(ends[0])}</span><img src="{_png_data_uri(bar)}" width="{bar.width}" '
              f'height="{bar.height}" alt="colour bar ({html.escape(cmap)})"/><span>{html.escape(ends[1])}</span></div>'
              + "".join(f"<div class='note' style='font-size: 80%; color: #555;'>{html.escape(n)}</div>" for n in notes))
    body = (f"<div><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
            f"<div style='display: flex; flex-wrap: wrap; align-items: flex-start;'>{items}</div>{legend}</div>")
    return HeatmapView(body, title, heatmaps, g, labels, panels, image, captions=captions, colorbar=bar,
                       colorbar_labels=ends, note=note)


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
        model: The vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`).
        image: One image: PIL (drawn in its original frame, through timm's resize/crop), or a pixel
            tensor ``[channel, h, w]`` (de-normalised with the encoder's mean/std, the input frame).
        units: ``(layer, unit)`` pairs (a list or an ``[n, 2]`` tensor).
        hook: The MLP hook read (see :func:`~tl_multimodal.analysis.heatmaps.unit_grid_activations`).
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
