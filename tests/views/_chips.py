"""Reading back the token boxes of :func:`tl_multimodal.views.tokens.tokens_html` from a page."""

import html
import re

CHIP = re.compile(r'<span class="tlmm-tok" style="([^"]*)">(.*?)<br><span[^>]*>([^<]*)</span></span>')


def chips(fragment: str) -> list[tuple[str, str, str]]:
    """(style, token as shown, value as written) of each token box in ``fragment``, in order."""
    return [(style, html.unescape(re.sub(r"<[^>]+>", "", shown)), value) for style, shown, value in CHIP.findall(fragment)]


def as_shown(token: str) -> str:
    """How a token box shows ``token``: leading spaces as \u2423, the empty token as \u2205."""
    return token.replace(" ", "\u2423", len(token) - len(token.lstrip(" "))) or "\u2205"


def probs_written(probs) -> list[str]:
    """Probabilities as the decoded-token boxes write them (percent, two significant digits)."""
    return [f"{100 * p:.2g}%" for p in probs]
