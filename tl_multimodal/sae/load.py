"""Reading and writing SAEs without SAELens: SAELens's saved folders and Gemma Scope's ``params.npz``.

SAELens's folder (what ``sae.save_model(path)`` writes): ``cfg.json`` and ``sae_weights.safetensors``.
What is read from ``cfg.json``: ``architecture`` (default ``"standard"``; SAELens 5 wrote TopK SAEs as
``"standard"`` with ``activation_fn_str: "topk"`` and ``activation_fn_kwargs: {"k": ...}``, SAELens 6 as
``"topk"`` with a top-level ``k``), ``d_in``, ``d_sae``, ``apply_b_dec_to_input``, ``normalize_activations``,
and ``hook_name``: at the top level (SAELens 5) or in ``metadata`` (SAELens 6). Refused, naming the field,
rather than half-read: ``hook_z`` reshaping, a head index, ``finetuning_scaling_factor``, TopK's
``rescale_acts_by_decoder_norm``, activation functions other than ReLU/TopK.

Gemma Scope (``google/gemma-scope-*``): a ``params.npz`` with ``W_enc`` ``[d_in, d_sae]``, ``W_dec``,
``b_enc``, ``b_dec`` and ``threshold``; a JumpReLU SAE that does not subtract ``b_dec`` from its input. Its
hook is not in the file: pass ``hook_name``, or it is read from the path Gemma Scope uses
(``.../gemma-scope-2b-pt-res/layer_12/...``: ``-res`` is ``blocks.12.hook_resid_post``, ``-mlp``
``blocks.12.hook_mlp_out``; attention SAEs (``-att``, on ``hook_z``) are refused).

From the hub: ``"owner/repo/folder/inside"`` (with ``huggingface_hub``; the folder holding ``cfg.json`` or
``params.npz``), e.g. ``load_sae("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tl_multimodal.sae.model import SAE, SAEConfig

CFG_FILE, WEIGHTS_FILE, NPZ_FILE = "cfg.json", "sae_weights.safetensors", "params.npz"
#: The SAE shipped for the offline model (``load_sae("offline")``), made by ``scripts/train_offline_sae.py``.
OFFLINE_SAE = Path(__file__).parents[1] / "assets" / "sae_smollm2_L15"


def load_sae(path: str | Path, hook_name: str | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from a SAELens folder or a Gemma Scope ``params.npz`` (a file, its folder, or a hub path).

    Args:
        path: A folder with ``cfg.json`` + ``sae_weights.safetensors``, a ``params.npz`` (or its folder),
            ``"owner/repo/sub/folder"`` on the Hugging Face hub, or ``"offline"``: the SAE shipped for
            ``tl_multimodal.load("offline")`` (:data:`OFFLINE_SAE`).
        hook_name: The model hook, overriding the file's (needed for a ``params.npz`` whose path does not say).
        dtype: The parameters' dtype.
        device: Where the parameters go.

    Returns:
        An :class:`~tl_multimodal.sae.model.SAE` in eval mode.

    Raises:
        FileNotFoundError: Nothing SAE-like at ``path``.
        ValueError: A config this package cannot read faithfully (the field is named).
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a folder, a file or a hub path, got {type(path).__name__}")
    if hook_name is not None and not isinstance(hook_name, str):
        raise TypeError(f"hook_name must be a string, got {type(hook_name).__name__}")
    local = OFFLINE_SAE if path == "offline" else Path(path)
    if not local.exists():
        if isinstance(path, str) and re.fullmatch(r"[\w.-]+/[\w.-]+/.+", path):
            local = _from_hub(path)
        else:
            raise FileNotFoundError(f"no SAE at {path!s} (a folder with {CFG_FILE} and {WEIGHTS_FILE}, "
                                    f"a {NPZ_FILE}, or owner/repo/folder on the hub)")
    if local.is_dir() and (local / NPZ_FILE).exists() and not (local / CFG_FILE).exists():
        local = local / NPZ_FILE
    if local.suffix == ".npz":
        cfg, params = _read_npz(local, hook_name, str(path))
    else:
        cfg, params = _read_saelens(local, hook_name, str(path))
    return SAE(cfg, params, dtype=dtype).to(device).eval()


def _from_hub(path: str) -> Path:
    """Download the folder ``sub/folder`` of hub repo ``owner/repo`` (``huggingface_hub``) and return it."""
    from huggingface_hub import snapshot_download

    owner, repo, sub = path.split("/", 2)
    root = snapshot_download(f"{owner}/{repo}", allow_patterns=[f"{sub}/*"])
    return Path(root) / sub


def _read_saelens(folder: Path, hook_name: str | None, source: str) -> tuple[SAEConfig, dict]:
    from safetensors.torch import load_file

    if not (folder / CFG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a SAELens folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    raw = json.loads((folder / CFG_FILE).read_text())
    meta = raw.get("metadata") or {}
    arch = raw.get("architecture", "standard")
    act = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
    k = raw.get("k")
    if act == "topk":  # SAELens 5: a "standard" SAE with a TopK activation
        arch, k = "topk", (raw.get("activation_fn_kwargs") or {}).get("k", k)
    elif act not in ("relu", None):
        raise ValueError(f"{folder / CFG_FILE}: activation_fn {act!r} is not supported (relu or topk)")
    for bad, why in (("finetuning_scaling_factor", "a finetuning scaling factor"),
                     ("rescale_acts_by_decoder_norm", "latents rescaled by decoder norms")):
        if raw.get(bad):
            raise ValueError(f"{folder / CFG_FILE}: {bad}=true ({why}) is not supported")
    if raw.get("reshape_activations", "none") != "none" or (raw.get("hook_head_index", meta.get("hook_head_index"))
                                                           is not None):
        raise ValueError(f"{folder / CFG_FILE}: SAEs on attention heads (hook_z reshaping, hook_head_index) "
                         "are not supported")
    name = hook_name or raw.get("hook_name") or meta.get("hook_name")
    if not name:
        raise ValueError(f"{folder / CFG_FILE} names no hook_name (top level or metadata): pass hook_name=")
    known = {"architecture", "d_in", "d_sae", "hook_name", "k", "apply_b_dec_to_input", "normalize_activations",
             "model_name", "metadata"}
    cfg = SAEConfig(architecture=arch, d_in=raw.get("d_in"), d_sae=raw.get("d_sae"), hook_name=name, k=k,
                    apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                    normalize_activations=raw.get("normalize_activations") or "none",
                    model_name=raw.get("model_name", meta.get("model_name")), source=source,
                    extra={key: v for key, v in raw.items() if key not in known})
    params = load_file(str(folder / WEIGHTS_FILE))
    if arch == "jumprelu" and "log_threshold" in params and "threshold" not in params:
        params["threshold"] = params.pop("log_threshold").exp()
    return cfg, params


def _read_npz(file: Path, hook_name: str | None, source: str) -> tuple[SAEConfig, dict]:
    import numpy as np

    with np.load(file) as z:
        params = {k: torch.from_numpy(z[k]) for k in z.files}
    name = hook_name or _gemma_scope_hook(str(file))
    if name is None:
        raise ValueError(f"{file}: a params.npz does not name its hook, and its path does not say it "
                         "(.../gemma-scope-*-res/layer_N/...): pass hook_name=")
    if "W_enc" not in params:
        raise ValueError(f"{file} has no W_enc: not a Gemma Scope SAE (arrays {sorted(params)})")
    d_in, d_sae = params["W_enc"].shape
    cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), hook_name=name,
                    apply_b_dec_to_input=False, source=source)
    return cfg, params


def _gemma_scope_hook(path: str) -> str | None:
    """The hook a Gemma Scope path names (``gemma-scope-2b-pt-res/layer_12/...`` -> blocks.12.hook_resid_post)."""
    m = re.search(r"gemma-scope-[\w.-]*?-(res|mlp|att)(?:-[\w.]+)?/layer_(\d+)/", path)
    if m is None:
        return None
    if m.group(1) == "att":
        raise ValueError(f"{path}: attention SAEs (on hook_z) are not supported")
    return f"blocks.{m.group(2)}.{'hook_resid_post' if m.group(1) == 'res' else 'hook_mlp_out'}"


def save_sae(sae: SAE, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``sae`` as a SAELens 6 folder (``cfg.json``, ``sae_weights.safetensors``) that :func:`load_sae`
    and SAELens read.

    Args:
        sae: The SAE.
        folder: Created if missing.
        dtype: Store the weights in this dtype (e.g. ``torch.float16`` to halve the size); default: as they are.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg.to_dict() | {"dtype": str(dtype or sae.W_enc.dtype).removeprefix("torch.")}
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
    save_file({n: p.detach().to(dtype or p.dtype).contiguous().cpu() for n, p in sae.named_parameters()},
              str(folder / WEIGHTS_FILE))
    return folder
