"""The checks that every layer repeats, written once: each raises a ``TypeError``/``ValueError`` that names the
argument. Imports nothing from the package."""

from __future__ import annotations

import math
import operator
import numbers


def check_int(value, name: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as a Python ``int``: anything that *is* an integer (``int``, numpy integers, one-element
    integer tensors: what ``operator.index`` takes), at least ``minimum`` and at most ``maximum`` (``None``: no
    bound). Bools and floats (``2.0`` included: nothing is truncated) are refused.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` is below ``minimum`` or above ``maximum``.
    """
    if _is_bool(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if maximum is not None and minimum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_ints(minimum: int | None = 1, **values) -> None:
    """:func:`check_int` on each keyword argument, in order."""
    for name, value in values.items():
        check_int(value, name, minimum)


def check_number(value, name: str, minimum: float | None = None) -> float:
    """``value`` as a finite real number (ints, numpy floats and one-element real tensors too, bools refused),
    at least ``minimum`` (``None``: no bound); a Python ``float`` (an ``int`` stays an ``int``).

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or below ``minimum``.
    """
    if not _is_bool(value) and not isinstance(value, numbers.Real) and hasattr(value, "numel") \
            and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if minimum is not None and not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value if isinstance(value, int) else float(value)


def exactly_one(**values) -> str:
    """The name of the one argument that is not ``None``; a ``ValueError`` naming them all otherwise."""
    given = [name for name, value in values.items() if value is not None]
    if len(given) != 1:
        names = [f"{n}=" for n in values]
        raise ValueError(f"pass exactly one of {', '.join(names[:-1])} and {names[-1]}")
    return given[0]


# ---------------------------------------------------------------- what the parent HookedTransformer accepts
def _is_bool(value) -> bool:
    """A Python, numpy or torch boolean (a 0-d ``torch.bool`` tensor too)."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_") and type(value).__module__ == "numpy":
        return True
    return getattr(value, "dtype", None) is not None and str(value.dtype) == "torch.bool"


def check_flag(value, name: str) -> bool:
    """``value`` as a ``bool``: ``True``/``False`` (Python, numpy or a 0-d tensor) or the ints 0 and 1
    (numpy integers too), as the parent's ``if flag:`` reads them; anything else is refused.

    Raises:
        TypeError: ``value`` is not a bool or an int.
        ValueError: an int other than 0 or 1.
    """
    if _is_bool(value):
        return bool(value)
    try:
        i = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be True or False, got {value!r}") from None
    if i not in (0, 1):
        raise ValueError(f"{name} must be True or False (or 0/1), got {value!r}")
    return bool(i)


def check_generation_options(args: dict) -> dict:
    """The sampling arguments of ``generate``/``caption``, checked and as Python values: what
    ``HookedTransformer.generate`` accepts (numpy and torch integers, 0/1 flags, numpy floats, any
    finite ``freq_penalty``) is accepted; the first bad one is named. Returns a copy of ``args``.

    ``max_new_tokens`` and ``top_k`` >= 1; flags True/False (or 0/1); ``temperature`` >= 0 (0 is greedy);
    ``top_p`` in (0, 1]; ``freq_penalty`` any finite number (negative favours repeats, as in the parent).
    """
    out = dict(args)
    if "max_new_tokens" in out:
        out["max_new_tokens"] = check_int(out["max_new_tokens"], "max_new_tokens")
    for name in ("do_sample", "stop_at_eos", "use_past_kv_cache", "verbose"):
        if name in out:
            out[name] = check_flag(out[name], name)
    if out.get("top_k") is not None:
        out["top_k"] = check_int(out["top_k"], "top_k")
    if out.get("top_p") is not None:
        top_p = out["top_p"]
        out["top_p"] = check_number(top_p, "top_p")
        if not 0 < out["top_p"] <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if "temperature" in out:
        out["temperature"] = check_number(out["temperature"], "temperature", minimum=0)
    if "freq_penalty" in out:
        out["freq_penalty"] = check_number(out["freq_penalty"], "freq_penalty")
    return out


def check_token_ids(tokens, d_vocab: int, image_token_id: int | None = None, name: str = "tokens") -> None:
    """Refuse token ids outside ``[0, d_vocab)`` (``image_token_id`` excepted) in a token tensor: the
    embedding would read ``-1`` as its last row, silently.

    Raises:
        ValueError: naming the bad ids (at most 5) and the vocabulary.
    """
    if tokens.numel() == 0 or tokens.is_floating_point():
        return
    bad = (tokens < 0) | (tokens >= d_vocab)
    if image_token_id is not None:
        bad &= tokens != image_token_id
    if bad.any():
        ids = sorted(set(tokens[bad].tolist()))
        more = f" (and {len(ids) - 5} more)" if len(ids) > 5 else ""
        slot = "" if image_token_id is None or image_token_id < d_vocab else f" (nor the image-slot id {image_token_id})"
        raise ValueError(f"{name} hold token ids {ids[:5]}{more} outside the vocabulary [0, {d_vocab}){slot}; "
                         "an embedding would read a negative id as a row from the end")
