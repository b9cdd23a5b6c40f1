"""The checks that every layer repeats, written once: each raises a ``TypeError``/``ValueError`` that names the
argument. Imports nothing from the package."""

from __future__ import annotations

import math
import numbers


def check_int(value, name: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (bools refused), at least ``minimum`` and at most ``maximum`` (``None``: no bound).

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` is below ``minimum`` or above ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
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
    """``value`` as a finite real number (ints and numpy floats too, bools refused), at least ``minimum``
    (``None``: no bound).

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if minimum is not None and not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def exactly_one(**values) -> str:
    """The name of the one argument that is not ``None``; a ``ValueError`` naming them all otherwise."""
    given = [name for name, value in values.items() if value is not None]
    if len(given) != 1:
        names = [f"{n}=" for n in values]
        raise ValueError(f"pass exactly one of {', '.join(names[:-1])} and {names[-1]}")
    return given[0]
