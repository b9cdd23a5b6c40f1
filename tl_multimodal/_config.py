"""What the run configurations share: a JSON-ready dict and back, overrides by field name, a short repr.

A configuration is a frozen dataclass that checks its fields in ``__post_init__`` (once, for every
way it is made) and inherits :class:`Config`. Functions take ``config=None, **overrides``::

    config = TrainingConfig.resolve(config, overrides)   # None: the defaults; unknown names: TypeError

Imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


class Config:
    """Mixin of the configuration dataclasses (:class:`~tl_multimodal.training.config.TrainingConfig`,
    :class:`~tl_multimodal.training.config.RunConfig`, :class:`~tl_multimodal.evaluation.config.EvalConfig`)."""

    @classmethod
    def names(cls) -> list[str]:
        """The field names, in order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def resolve(cls, config=None, overrides: dict | None = None):
        """``config`` (default: all defaults) with ``overrides`` (field name -> value) applied and checked.

        Raises:
            TypeError: ``config`` is not a ``cls``, or an override is not a field name (the valid
                names are listed).
        """
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"the settings are: {', '.join(cls.names())}")
        if config is None:
            return cls(**overrides)
        return dataclasses.replace(config, **overrides) if overrides else config

    def replace(self, **overrides):
        """A copy with ``overrides`` (field names) applied and checked (see :meth:`resolve`)."""
        return self.resolve(self, overrides)

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (tuples as lists, paths as strings, functions by name)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild from :meth:`to_dict`; missing keys take their defaults.

        Raises:
            ValueError: Unknown keys (named), or a value the dataclass refuses.
        """
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting {', '.join(unknown)}")
        return cls(**d)

    def __repr__(self) -> str:
        """The class name and the settings that differ from their defaults."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if _default(f) is dataclasses.MISSING or getattr(self, f.name) != _default(f)]
        return f"{type(self).__name__}({', '.join(changed)})"


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return value
