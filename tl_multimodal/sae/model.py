"""The sparse autoencoder itself: one small ``nn.Module`` for the four architectures SAELens saves.

With ``x`` the hooked activation (``[..., d_in]``) and ``x' = x - b_dec`` when ``apply_b_dec_to_input``
(else ``x' = x``), after the input normalisation below:

- ``standard``: ``f = relu(x' W_enc + b_enc)``
- ``topk``: ``pre = x' W_enc + b_enc``; the ``k`` largest entries of ``pre`` per position, through a
  ReLU, the others 0
- ``jumprelu``: ``pre = x' W_enc + b_enc``; ``f = relu(pre) * (pre > threshold)``
- ``gated``: ``f = (x' W_enc + b_gate > 0) * relu(x' (W_enc * exp(r_mag)) + b_mag)``

and ``decode(f) = f W_dec + b_dec`` (then the normalisation undone). ``normalize_activations``:
``"none"`` and ``"expected_average_only_in"`` (whose factor SAELens folds into the weights when it saves,
so at run time it does nothing, as in SAELens) leave ``x`` alone; ``"constant_norm_rescale"`` scales each
position to norm ``sqrt(d_in)`` and decoding scales back; ``"layer_norm"`` centres and divides by the
standard deviation (+1e-5), decoding multiplies and adds back. The last two need the input to decode:
``decode(f, x)``.

Hook points (TransformerLens ``HookPoint``; ``sae.hook_dict``): ``hook_sae_input`` (x),
``hook_sae_acts_pre`` (the pre-activation), ``hook_sae_acts_post`` (the latents ``f``: the units),
``hook_sae_recons`` (``decode(f)``) and ``hook_sae_error`` (``x - decode(f)``), the names SAELens uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn

try:  # TransformerLens 4 moved HookedRootModule to the top level
    from transformer_lens import HookedRootModule
except ImportError:  # TransformerLens 3
    from transformer_lens.hook_points import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tl_multimodal.models.projection import content_id

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass
class SAEConfig:
    """What an SAE is (the fields of SAELens's ``cfg.json`` this package reads).

    Attributes:
        architecture: ``"standard"``, ``"topk"``, ``"jumprelu"`` or ``"gated"``.
        d_in: Width of the hooked activation.
        d_sae: Number of latents.
        hook_name: The TransformerLens hook it reads and writes (``blocks.6.hook_resid_post``).
        k: Latents kept per position (``topk`` only).
        apply_b_dec_to_input: Subtract ``b_dec`` from the input before encoding.
        normalize_activations: One of ``none``, ``expected_average_only_in``, ``constant_norm_rescale``,
            ``layer_norm`` (see the module docstring).
        model_name: The model it was trained on, if known.
        source: Where it was read from.
        extra: Any other fields of the file, kept for reference.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    model_name: str | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {list(NORMALIZATIONS)}, "
                             f"got {self.normalize_activations!r}")
        for name in ("d_in", "d_sae"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 1 <= self.k <= self.d_sae):
            raise ValueError(f"a topk SAE needs k in [1, d_sae={self.d_sae}], got {self.k!r}")
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise ValueError(f"hook_name must be a non-empty string, got {self.hook_name!r}")

    def to_dict(self) -> dict:
        """The config as SAELens 6 writes ``cfg.json`` (``hook_name`` inside ``metadata``)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("hook_name", "model_name", "source", "extra",
                                                                    "k")}
        if self.k is not None:
            out["k"] = self.k
        out["metadata"] = {"hook_name": self.hook_name, "model_name": self.model_name}
        return out


_PARAMS = {"standard": ("W_enc", "b_enc", "W_dec", "b_dec"), "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
           "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
           "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")}


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The parameters of ``cfg``'s architecture and their shapes (as SAELens stores them)."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    return {name: shapes.get(name, (d_sae,)) for name in _PARAMS[cfg.architecture]}


class SAE(HookedRootModule):
    """A sparse autoencoder on one hook of a model (see the module docstring for the formulas).

    Attributes:
        cfg: Its :class:`SAEConfig`.
        W_enc: ``[d_in, d_sae]``; b_enc: ``[d_sae]`` (gated: ``b_gate``, also returned by ``b_enc``);
        W_dec: ``[d_sae, d_in]`` (row ``i``: latent ``i``'s direction); b_dec: ``[d_in]``;
        threshold: ``[d_sae]`` (jumprelu); r_mag, b_mag: ``[d_sae]`` (gated).
    """

    def __init__(self, cfg: SAEConfig, params: dict[str, Tensor] | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        shapes = param_shapes(cfg)
        params = params or {n: torch.zeros(s) for n, s in shapes.items()}
        missing, extra = set(shapes) - set(params), set(params) - set(shapes)
        if missing or extra:
            raise ValueError(f"a {cfg.architecture} SAE has parameters {sorted(shapes)}; missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        for name, shape in shapes.items():
            value = torch.as_tensor(params[name])
            if tuple(value.shape) != shape:
                raise ValueError(f"SAE parameter {name} must have shape {shape} (d_in={cfg.d_in}, "
                                 f"d_sae={cfg.d_sae}), got {tuple(value.shape)}")
            setattr(self, name, nn.Parameter(value.to(dtype).clone()))
        for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                     "hook_sae_error"):
            setattr(self, name, HookPoint())
        self.setup()

    @property
    def hook_name(self) -> str:
        """The model hook the SAE reads (as written in its config)."""
        return self.cfg.hook_name

    def __getattr__(self, name: str):
        if name == "b_enc" and "b_gate" in self._parameters:  # a gated SAE's encoder bias is its gate's
            return self._parameters["b_gate"]
        return super().__getattr__(name)

    def __repr__(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return (f"SAE({self.cfg.architecture}{k}, {self.cfg.d_in} -> {self.cfg.d_sae} latents, "
                f"hook={self.hook_name!r})")

    def _normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The encoder's input and the (scale, shift) that decoding undoes (None: nothing to undo)."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True) / self.cfg.d_in ** 0.5
            return x / scale, (scale, torch.zeros_like(scale))
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), (std, mu)
        return x, None

    def encode_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The pre-activation (gated: the gate's), before the nonlinearity."""
        x, _ = self._normalize(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The latents ``f`` of activations ``x`` (runs ``hook_sae_input``, ``hook_sae_acts_pre``,
        ``hook_sae_acts_post``)."""
        x = self.hook_sae_input(x)
        pre = self.hook_sae_acts_pre(self.encode_pre(x))
        arch = self.cfg.architecture
        if arch == "standard":
            f = torch.relu(pre)
        elif arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        elif arch == "jumprelu":
            f = torch.relu(pre) * (pre > self.threshold)
        else:  # gated
            x_in, _ = self._normalize(x)
            if self.cfg.apply_b_dec_to_input:
                x_in = x_in - self.b_dec
            f = (pre > 0) * torch.relu(x_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return self.hook_sae_acts_post(f)

    def decode(self, f: Float[Tensor, "... d_sae"], x: Float[Tensor, "... d_in"] | None = None,
               ) -> Float[Tensor, "... d_in"]:
        """``f W_dec + b_dec``, the input normalisation undone (which needs the input ``x``)."""
        out = f @ self.W_dec + self.b_dec
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if x is None:
                raise ValueError(f"decode needs the input x: this SAE normalises its input "
                                 f"({self.cfg.normalize_activations!r}) and decoding undoes that")
            _, (scale, shift) = self._normalize(x)
            out = out * scale + shift
        return self.hook_sae_recons(out)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """The reconstruction ``decode(encode(x))`` (no error term; runs ``hook_sae_error`` too)."""
        out = self.decode(self.encode(x), x)
        self.hook_sae_error(x - out)
        return out


def sae_id(sae: SAE) -> str:
    """The identity of an SAE: 16 hex digits of a SHA-256 of what it computes, made as
    :func:`~tl_multimodal.models.projection.projection_id` makes a projection's.

    The hash covers the JSON of its config as :meth:`SAEConfig.to_dict` writes it (architecture, widths, ``k``,
    normalisation, hook name, model name; not the path it was loaded from), then each parameter in sorted
    name order, its shape and its values as float32. So a copy moved elsewhere keeps its id; changing a
    weight or its hook changes it. The runner's ``_run.json`` and the atlas and report pages name SAEs by it.

    Args:
        sae: An :class:`SAE`.

    Returns:
        The first 16 hex digits of the SHA-256.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be an SAE (tl_multimodal.load_sae), got {type(sae).__name__}")
    return content_id(sae.cfg.to_dict(), sae.state_dict())
