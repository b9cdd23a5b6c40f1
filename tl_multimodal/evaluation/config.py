"""The settings of :func:`~tl_multimodal.evaluation.neurons.evaluate_neurons` as a dataclass saved with its result.

    config = EvalConfig(n_units=10, ks=(10, 100), hook="pre", over_patches="max", normalize=None)
    ev = evaluate_neurons(model, images, captions, embed, config, seed=1)   # keyword overrides by field name
    ev.to_dict()["config"] == config.replace(seed=1).to_dict()
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_multimodal._config import Config
from tl_multimodal._validate import check_int, check_ints, check_number


def _set(config, name: str, value) -> None:
    object.__setattr__(config, name, value)  # normalising a field of a frozen dataclass in __post_init__


def _ks(values, name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    values = list(values)
    for v in values:
        check_int(v, f"every value of {name}")
    return tuple(sorted(values))


@dataclass(frozen=True, repr=False)
class EvalConfig(Config):
    """Every setting of :func:`~tl_multimodal.evaluation.neurons.evaluate_neurons` but the model, the data
    (images, captions, COCO annotations), the sentence encoder and the progress callback.

    ``ks`` and ``control_ks`` are kept sorted, as tuples, so :meth:`to_dict` and :meth:`from_dict`
    round-trip.

    Attributes:
        n_units: Top units per image for (a) and (c).
        ks: Numbers of units ablated in (b).
        prompt, max_new_tokens: The captioning prompt and caption length.
        reduce, n_perm: As for :func:`~tl_multimodal.evaluation.neurons.text_similarity_test`.
        ablation_seeds, iou_seeds: Random draws of layer-matched units in (b) and (c).
        seed: Seed of the random pairing and the random units.
        hook, over_patches, normalize: How units are ranked: the attributed MLP hook and the
            reduction over patches and layers. The defaults (``hook_post``, the sum over patches,
            per-layer RMS) gave the largest gap between an image's own top units and another
            image's in the controls on ``dev``; the paper's ranking is ``hook="pre",
            over_patches="max", normalize=None``.
        control_ks, control_draws, magnitude_rtol, n_boot: The controls' ablation sizes, draws per
            control, magnitude tolerance and bootstrap resamples; ``control_draws=0`` skips them.
        batch_size: Images per forward pass.

    Raises:
        TypeError, ValueError: A setting of the wrong type or out of range (named).
    """

    n_units: int = 100
    ks: tuple[int, ...] = (10, 100, 400, 1600)
    prompt: str = "A picture of"
    max_new_tokens: int = 12
    reduce: str = "mean"
    n_perm: int = 10000
    ablation_seeds: int = 1
    iou_seeds: int = 3
    seed: int = 0
    hook: str = "post"
    over_patches: str = "sum"
    normalize: str | None = "layer"
    control_ks: tuple[int, ...] = (10, 100)
    control_draws: int = 3
    magnitude_rtol: float = 0.1
    n_boot: int = 2000
    batch_size: int = 8

    def __post_init__(self):
        check_ints(n_units=self.n_units, max_new_tokens=self.max_new_tokens, n_perm=self.n_perm,
                   ablation_seeds=self.ablation_seeds, iou_seeds=self.iou_seeds, n_boot=self.n_boot,
                   batch_size=self.batch_size)
        check_int(self.control_draws, "control_draws", 0)
        check_int(self.seed, "seed", None)
        _set(self, "ks", _ks(self.ks, "ks"))
        _set(self, "control_ks", _ks(self.control_ks, "control_ks"))
        if not self.ks:
            raise ValueError("ks must hold at least one k")
        for name, allowed in (("reduce", ("mean", "max")), ("over_patches", ("max", "sum")),
                              ("normalize", ("layer", None))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.prompt, str) or not isinstance(self.hook, str):
            raise TypeError("prompt and hook must be strings")
        check_number(self.magnitude_rtol, "magnitude_rtol", minimum=0)
