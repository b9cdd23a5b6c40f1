"""What differs between TransformerLens 3 and 4, in one place, so ``import tl_multimodal`` works on both.

TransformerLens 4 removed ``HookedTransformer`` with its component tree (``transformer_lens.components``)
and ``transformer_lens.utils``; ``TransformerBridge`` is its model class. There the names below are
stand-ins: making any model built on ``HookedTransformer`` (such as ``HookedVisionPrefix``) raises an
``ImportError`` that points to :class:`tl_multimodal.VisionBridge`, the same model on the bridge.
"""

from __future__ import annotations

from torch import nn



def _removed(name: str) -> ImportError:
    what = "HookedTransformer" if name == "HookedTransformer" else f"{name} (built on HookedTransformer)"
    return ImportError(
        f"{what} needs TransformerLens 3: TransformerLens 4 removed HookedTransformer. Use "
        "tl_multimodal.VisionBridge instead: the same model (hooks, image slots, projection "
        "checkpoints) on TransformerBridge, e.g. tl_multimodal.load('offline', backend='bridge') or "
        "VisionBridge.from_hf(hf_model, tokenizer, encoder, projection). Or install "
        "transformer-lens<4 to keep HookedVisionPrefix.")


try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.components import Embed, TransformerBlock

    HAS_HOOKED_TRANSFORMER = True
except ImportError:  # TransformerLens >= 4
    HAS_HOOKED_TRANSFORMER = False
    HookedTransformerConfig = None

    class HookedTransformer(nn.Module):  # type: ignore[no-redef]
        """Stand-in: instantiating it (or a subclass) raises an ImportError naming VisionBridge."""

        def __new__(cls, *args, **kwargs):
            raise _removed(cls.__name__)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise _removed(cls.__name__)

    class Embed(nn.Module):  # type: ignore[no-redef]
        """Stand-in base class; never instantiated on TransformerLens 4."""

    class TransformerBlock(nn.Module):  # type: ignore[no-redef]
        """Stand-in, so ``isinstance(block, TransformerBlock)`` is False for every block."""

try:
    from transformer_lens.utils import USE_DEFAULT_VALUE, get_act_name
except ImportError:  # TransformerLens >= 4: the same names live in transformer_lens.utilities
    from transformer_lens.utilities import USE_DEFAULT_VALUE, get_act_name  # noqa: F401


def require_hooked_transformer(name: str) -> None:
    """Raise the ImportError that names :class:`~tl_multimodal.VisionBridge` on TransformerLens 4."""
    if not HAS_HOOKED_TRANSFORMER:
        raise _removed(name)
