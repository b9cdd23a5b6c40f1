"""Units seen through tokens, as circuitsvis views (offline, :mod:`tl_multimodal.views.html`).

* :func:`decoded_tokens_view` - the top tokens of units (a :class:`~tl_multimodal.analysis.decoding.UnitDecoding`),
  coloured by probability (circuitsvis ``ColoredTokens``, one row per unit).
* :func:`token_activations_view` - units' activations over an image-prefixed caption (circuitsvis
  ``ColoredTokensMulti``).

circuitsvis writes each token into the page as HTML, so tokens are HTML-escaped before they go in and
image slots are labelled ``[img 0]``, ``[img 1]``, ... (plain text that shows as written).
"""

from __future__ import annotations

import html
from typing import Sequence

import torch
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.decoding import UnitDecoding
from tl_multimodal.analysis.heatmaps import one_image
from tl_multimodal.analysis.probe import Probe
from tl_multimodal.analysis.units import cache_units, mlp_hook, sae_tags, unit_axis, unit_label, unit_list
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.splice import saes_by_hook
from tl_multimodal.views.html import HTMLView


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



_CELL = "text-align: left; vertical-align: top; padding: 2px 8px;"  # inline: notebooks' stylesheets right-align cells
_CHIP = ("display: inline-block; border: 1px solid #bbb; border-radius: 3px; padding: 0 3px; margin: 1px 2px; "
         "font-family: monospace; white-space: pre; text-align: left; vertical-align: top;")


def _visible(token: str) -> str:
    """A token as HTML with its whitespace visible: leading spaces as \u2423, newlines \u23ce, tabs \u21e5."""
    if token == "":
        return '<span style="color: #999;">\u2205</span>'
    stripped = token.lstrip(" ")
    lead = len(token) - len(stripped)
    body = html.escape(stripped, quote=False).replace("\n", "\u23ce").replace("\t", "\u21e5")
    marks = "\u2423" * lead
    return (f'<span style="color: #999;">{marks}</span>' if lead else "") + body


def _shade(value: float, bound: float) -> str:
    """Red for positive, blue for negative, the alpha ``|value| / bound`` (a symmetric scale, 0 white)."""
    a = min(1.0, abs(value) / bound) if bound > 0 else 0.0
    return f"background: rgba({'220, 40, 40' if value >= 0 else '40, 80, 220'}, {a:.2f});"


def tokens_html(tokens: Sequence[str], values: Sequence[float] | None = None, fmt: str = "{:.1%}",
                bound: float | None = None) -> str:
    """Tokens as separate boxes left to right (plain HTML, no JavaScript): every token's edges visible, a
    leading space shown as \u2423, newlines as \u23ce, and its value (e.g. a probability) under it.

    Args:
        tokens: String tokens.
        values: One number per token shown under it (default: none).
        fmt: How a value is written.
        bound: Colour each box by its value on the symmetric scale ``-bound .. bound`` (red positive,
            blue negative, white 0; values beyond take the end colours); default: no colour.
    """
    if values is not None and len(values) != len(tokens):
        raise ValueError(f"values has {len(values)} entries for {len(tokens)} tokens")
    if bound is not None and values is None:
        raise ValueError("bound colours the tokens by their values: pass values too")
    under = [""] * len(tokens) if values is None else [
        f'<br><span style="font-size: 80%; color: #333;">{html.escape(fmt.format(v))}</span>' for v in values]
    shades = [""] * len(tokens) if bound is None else [_shade(float(v), float(bound)) for v in values]
    return "".join(f'<span class="tlmm-tok" style="{_CHIP} {c}">{_visible(t)}{u}</span>'
                   for t, u, c in zip(tokens, under, shades))

def probs_html(tokens: Sequence[str], probs: Sequence[float], bound: float | None = None) -> str:
    """:func:`tokens_html` with each token's probability written as a percentage to two significant digits
    (``0.0021%``: a near-uniform decoding over a large vocabulary does not read as 0.0%); ``bound`` is a
    probability (0..1)."""
    return tokens_html(tokens, [100 * p for p in probs], fmt="{:.2g}%", bound=None if bound is None else 100 * bound)


# ---------------------------------------------------------------------------------- (a) decoded tokens
def decoded_tokens_view(decoding: UnitDecoding, n_tokens: int | None = None, title: str | None = None) -> HTMLView:
    """The top tokens of each unit's output direction with their probabilities (plain HTML, no JavaScript).

    One row per unit: its label (``L5.1021``, with a check mark when it passes the paper's
    interpretability filter), then its top tokens as boxes (:func:`tokens_html`: edges visible, leading
    spaces as \u2423), each with its probability written under it and shaded by it (one scale for all rows).

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
    labels = [unit_label(l, u) + (" \u2713" if ok else "") for l, u, ok in
              zip(decoding.layer.tolist(), decoding.unit.tolist(), decoding.interpretable.tolist())]
    title = title or f"Top {k} decoded tokens of {len(decoding)} units"
    rows = "\n".join(f'<tr class="tlmm-unit"><td style="{_CELL} white-space: nowrap; font-family: monospace;">'
                     f'{html.escape(label)}</td><td style="{_CELL}">'
                     f'{probs_html(toks[:k], probs[:k], bound=vmax)}</td></tr>'
                     for label, toks, probs in zip(labels, decoding.tokens, decoding.probs.tolist()))
    note = ("softmax(W_U^T W_out[layer][unit])" + (" through ln_final" if decoding.apply_ln else "")
            + "; probability under each token; \u2423 = a leading space; \u2713 = at least 7 of the top 10 are "
              "English words")
    body = (f"<div style='text-align: left;'><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
            f"<div style='font-size: 80%; color: #555;'>{html.escape(note)}</div>"
            f"<table style='border-collapse: collapse; margin: 0;'>{rows}</table></div>")
    return HTMLView(body, title)


class TokenActivationsView(HTMLView):
    """Units' activations over an image-prefixed text: one row per unit (circuitsvis ``ColoredTokens`` with
    a plain-HTML copy inside for readers without JavaScript), each on its own symmetric colour scale set by
    its text tokens; image slots and special tokens (BOS, ``<|im_start|>``, ...) shown apart, on theirs.

    Attributes:
        tokens: The string tokens, image slots as ``[img i]``.
        values: ``[pos, n_units]`` the activations.
        labels: ``L{layer}.{unit}`` per unit.
        text: The text after the image slots (special tokens left out).
        text_mask: ``[pos]`` True at the text tokens (not an image slot, not a special token).
        bounds: ``[n_units]`` each unit's colour bound: the largest ``|activation|`` over the text tokens
            (its scale is ``-bound .. bound``).
    """

    def __init__(self, html: str, title: str, tokens: list[str], values: Tensor, labels: list[str], text: str,
                 text_mask: Tensor | None = None, bounds: Tensor | None = None, **parts):
        super().__init__(html, title, **parts)
        self.tokens, self.values, self.labels, self.text = tokens, values, labels, text
        self.text_mask, self.bounds = text_mask, bounds

    def to_dataframe(self):
        """One row per position: position, token, then one column per unit."""
        import pandas as pd

        df = pd.DataFrame(self.values.numpy(), columns=self.labels)
        df.insert(0, "token", self.tokens)
        df.insert(0, "position", range(len(self.tokens)))
        return df

    def __repr__(self) -> str:
        return f"TokenActivationsView({len(self.labels)} units over {len(self.tokens)} tokens: {self.text!r})"


def _special_mask(model: VisionLM, tokens: Tensor) -> Tensor:
    """``[pos]`` True at the tokenizer's special tokens (BOS, EOS, ``<|im_start|>``, ...)."""
    special = set(getattr(model.tokenizer, "all_special_ids", None) or [])
    return torch.tensor([t in special for t in tokens[0].tolist()], dtype=torch.bool)


@torch.no_grad()
def token_activations_view(model: VisionLM, image, units, text: str | None = None, prompt: str = "A picture of",
                           hook: str = "post", max_new_tokens: int = 12, include_image: bool = True, *,
                           probe: Probe | None = None, image_index: int = 0, sae=None) -> TokenActivationsView:
    """Activations of MLP units (or SAE latents) at every position of ``[image slots][text]``.

    One row per unit: the text tokens coloured on the unit's own symmetric scale (``-b .. b``, ``b`` its
    largest ``|activation|`` over the text tokens: red positive, blue negative), as circuitsvis
    ``ColoredTokens`` (hover for values) over a plain-HTML copy that shows without JavaScript; then, apart
    and on their own scale, the image slots and special tokens, whose activations are often far larger.

    Args:
        model: The vision LM.
        image: One image (PIL, a path, an array, or a pixel tensor ``[channel, h, w]``).
        units: ``(layer, unit)`` pairs (a list or an ``[n, 2]`` tensor); one row each in the view.
        text: The text after the image; default: ``prompt`` followed by the model's own greedy
            caption of the image (its generated tokens).
        prompt: Prompt for the caption when ``text`` is None.
        hook: The MLP hook read (``"post"``: the activation; ``"pre"``: what attribution scores).
        max_new_tokens: Caption length when ``text`` is None.
        include_image: Keep the image positions (labelled ``[img 0]`` ...) in ``tokens``/``values`` and
            show them apart.
        probe: Show row ``image_index`` of this probe (its tokens up to and including the target)
            instead of ``text``; ``image`` is that row's image.
        image_index: The probe row.
        sae: An SAE or a list of them: the units are ``(SAE index, latent)`` and the rows their latents
            (``hook`` unused; the SAEs spliced in with their error term, so the text is the model's own),
            labelled ``L15.F123`` (:func:`~tl_multimodal.analysis.units.sae_tags`).

    Returns:
        A :class:`TokenActivationsView`.
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    pairs = unit_list(model, units, saes)
    short = "sae" if saes else mlp_hook(model, hook)
    _, pixels = one_image(model, image)
    emb = soft_prompts(model, pixels)
    if probe is not None:
        if text is not None:
            raise ValueError("pass either text= or probe=, not both")
        check_int(image_index, "image_index", minimum=-len(probe), maximum=len(probe) - 1)
        row = probe[image_index]
        tokens = torch.cat([row.tokens[:, :int(row.pred_pos[0]) + 1], row.target_ids[:, None]], 1).to(model.cfg.device)
    else:
        if text is None:  # the model's own tokens, not a re-tokenization of their text
            tokens = model.generate(prompt, max_new_tokens, image_embed=emb, do_sample=False, verbose=False,
                                    return_type="tokens")
        else:
            if not text.strip():
                raise ValueError("text is empty")
            tokens = model.to_tokens(text, image=True)
    slots = model.image_mask(tokens)[0].cpu()
    text = model.tokenizer.decode(tokens[0][~slots.to(tokens.device)].tolist(), skip_special_tokens=True)
    layers = sorted({l for l, _ in pairs})
    axis = unit_axis(model, short, saes)[0]
    names = [axis[l] for l in layers]
    _, cache = cache_units(model, tokens, emb, names, saes, **({} if saes else {"stop_at_layer": layers[-1] + 1}))
    values = torch.stack([cache[axis[l]][0, :, u].float().cpu() for l, u in pairs], dim=1)
    str_tokens = model.to_str_tokens(tokens)
    text_mask = ~slots & ~_special_mask(model, tokens.cpu())
    if not include_image:
        keep = ~slots
        str_tokens = [t for t, k in zip(str_tokens, keep.tolist()) if k]
        values, slots, text_mask = values[keep], slots[keep], text_mask[keep]
    labels = [unit_label(l, u, None if saes is None else sae_tags([s.hook_name for s in saes.values()]))
              for l, u in pairs]
    shown = label_image_slots(str_tokens, slots)
    text_tokens = [t for t, k in zip(str_tokens, text_mask.tolist()) if k]
    other = [t for t, k in zip(shown, text_mask.tolist()) if not k]
    bounds = values[text_mask].abs().amax(0) if text_mask.any() else torch.zeros(len(pairs))
    bounds = torch.where(bounds > 0, bounds, torch.ones_like(bounds))
    title = f"{'latents' if saes else hook} of {', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''} over: {text}"
    elements, fallbacks, apart = [], [], []
    for j, label in enumerate(labels):
        v, b = values[text_mask, j].tolist(), float(bounds[j])
        elements.append(("ColoredTokens", {"tokens": cv_tokens(text_tokens), "values": v, "minValue": -b, "maxValue": b}))
        fallbacks.append(tokens_html(text_tokens, v, fmt="{:+.3g}", bound=b))
        w = values[~text_mask, j].tolist()
        apart.append(tokens_html(other, w, fmt="{:+.3g}", bound=max(map(abs, w), default=1.0) or 1.0) if w else "")

    def layout(divs: list[str]) -> str:
        rows = "".join(
            f'<tr class="tlmm-unit"><td style="{_CELL} font-family: monospace; white-space: nowrap;">{html.escape(lab)}'
            f'<br><span style="font-size: 80%; color: #555;">\u00b1{float(b):.3g}</span></td><td style="{_CELL}">{div}'
            + (f'<div style="font-size: 80%; color: #555;">image slots and special tokens (own scale):</div>{a}'
               if a else "") + "</td></tr>"
            for lab, b, div, a in zip(labels, bounds.tolist(), divs, apart))
        return (f"<div style='text-align: left;'><h4 style='margin: 4px 0;'>{html.escape(title)}</h4>"
                "<div style='font-size: 80%; color: #555;'>each unit on its own symmetric scale set by the text "
                "tokens (red positive, blue negative, \u00b1 the bound); hover a token for its value; [img i] = "
                f"image position i (patch i of the encoder's grid, row by row)</div>"
                f"<table style='border-collapse: collapse; margin: 0;'>{rows}</table></div>")

    return TokenActivationsView.from_circuitsvis(elements, layout, title, fallbacks=fallbacks, values=values,
                                                 labels=labels, text=text, tokens=shown, text_mask=text_mask,
                                                 bounds=bounds)
