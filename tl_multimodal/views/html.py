"""Self-contained HTML views that work offline: the view class, circuitsvis with its JavaScript inlined,
inline PNGs, and pages of several views.

circuitsvis loads its JavaScript from a CDN (unpkg) unless it believes it is offline. The views here
never do: they embed circuitsvis's own bundle (``circuitsvis/dist/cdn/iife.js``, the file its
``render_local`` inlines) once per view, so a saved page or a notebook output renders with no network
at all. Every view has ``_repr_html_`` (shows in Jupyter/Colab) and ``.save(path)`` (a standalone page);
:func:`save_views` puts several views on one page with the 1.3 MB bundle written once.

The views themselves:

* :mod:`tl_multimodal.views.tokens` - units' top decoded tokens and their activations over an
  image-prefixed caption (circuitsvis).
* :mod:`tl_multimodal.views.heatmap_view` - a unit's activation (or any patch-grid score) over the
  patch grid, upsampled onto the image, as inline base64 PNGs.

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
from pathlib import Path
from typing import Callable, Sequence
from uuid import uuid4

from PIL import Image

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
                         title: str, *, fallbacks: Sequence[str] | None = None, **attributes) -> "HTMLView":
        """A view of circuitsvis elements (see :func:`circuitsvis_parts`): the placeholders (holding
        ``fallbacks``, plain HTML shown until circuitsvis renders), then one ``<script type="module">``
        holding the bundle and a ``CircuitsVis.render`` call per element; ``attributes`` go to ``cls``."""
        body, js = circuitsvis_parts(elements, layout, fallbacks)
        return cls(_with_bundle(body, js), title, body=body, js=js, **attributes)

    def _repr_html_(self) -> str:
        """The view for Jupyter: in a kernel, circuitsvis's bundle goes into the first output only (one
        1.3 MB copy per notebook); later views wait for it (their plain-HTML copies show meanwhile, or
        for good where scripts do not run)."""
        global _BUNDLE_SHOWN
        if not self.js or not _in_kernel():
            return self.html
        if not _BUNDLE_SHOWN:
            _BUNDLE_SHOWN = True
            return self.html
        return f"{self.body}\n{_waiting_script(self.js)}"

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



_BUNDLE_SHOWN = False  # whether this kernel has shown an output carrying circuitsvis's bundle


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (where outputs of one notebook share a page)."""
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _waiting_script(js: str) -> str:
    """``js`` run once an earlier output's bundle has defined ``CircuitsVis`` (checked every 25 ms, 20 s at most)."""
    return ('<script type="module">\n(function go(n) { if (globalThis.CircuitsVis) {\n'
            f"{js}\n}} else if (n < 800) {{ setTimeout(function () {{ go(n + 1); }}, 25); }} }})(0);\n</script>")


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


def circuitsvis_parts(elements: Sequence[tuple[str, dict]], layout: Callable[[list[str]], str] | None = None,
                      fallbacks: Sequence[str] | None = None) -> tuple[str, str]:
    """The HTML and the JavaScript of circuitsvis React elements, apart (the bundle in neither).

    Args:
        elements: ``(element name, props)`` pairs, e.g. ``("ColoredTokens", {"tokens": [...],
            "values": [...]})``; props use circuitsvis's (camelCase) names and may hold tensors.
        layout: Builds the body from the elements' ``<div>`` placeholders (default: one after another).
        fallbacks: Plain HTML inside each placeholder, what a reader without JavaScript sees (GitHub's
            notebook preview): circuitsvis replaces it when it renders (default: empty placeholders).

    Returns:
        ``(body, js)``: the placeholders laid out, and one ``CircuitsVis.render`` call per element
        (to run after :func:`circuitsvis_bundle`).
    """
    if not elements:
        raise ValueError("nothing to render")
    fallbacks = [""] * len(elements) if fallbacks is None else list(fallbacks)
    if len(fallbacks) != len(elements):
        raise ValueError(f"{len(fallbacks)} fallbacks for {len(elements)} elements")
    ids = [f"tl-multimodal-{uuid4().hex[:12]}" for _ in elements]
    divs = [f'<div id="{i}" style="margin: 4px 0;">{f}</div>' for i, f in zip(ids, fallbacks)]
    body = layout(divs) if layout is not None else "\n".join(divs)
    js = "\n".join(f'CircuitsVis.render("{i}", CircuitsVis.{name}, {_props_json(props)});'
                    for i, (name, props) in zip(ids, elements))
    return body, js


def _with_bundle(body: str, js: str) -> str:
    """``body``, then one module script: circuitsvis's bundle and ``js`` (``body`` alone if no ``js``)."""
    if not js:
        return body
    return (f'{body}\n<script crossorigin type="module">\n{circuitsvis_bundle()}\nglobalThis.CircuitsVis = CircuitsVis;\n'
            f"{js}\n</script>")


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


def png_data_uri(img: Image.Image) -> str:
    """``img`` as an inline ``data:image/png;base64,...`` URI (RGB), for an ``<img src=...>``."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
