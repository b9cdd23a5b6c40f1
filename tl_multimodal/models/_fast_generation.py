"""A lean KV-cached decoding loop for generation when nothing is hooked.

``HookedTransformer.generate`` runs every decoding step through the hooked modules: einops
rearrangements, masks and rotary rotations over the whole cache, logits at every prompt position.
That Python and the recomputation are most of what separates captioning from Hugging Face
``generate``. :func:`generate_tokens` does the same computation on the model's own weights (read
where they are, never copied for the common layout) with fused ops: ``F.rms_norm``/``F.layer_norm``,
one ``F.linear`` per projection, rotary tables indexed by position (the attention's own
``rotary_cos``/``rotary_sin``), ``F.scaled_dot_product_attention`` over a preallocated K/V cache,
logits for the last position only.

It only runs what it can compute exactly as TransformerLens does: :func:`why_not_fast` names the
first reason it cannot (a hook attached anywhere on the LM, an architecture feature it does not
implement, a generation option it does not take), and callers then use the TransformerLens path,
so hooks always fire. Supported: pre-norm decoder blocks with LayerNorm or RMSNorm (with or without
weights), learned absolute or rotary positions, multi-head or grouped-query attention, plain or
gated MLP, float32/float64, one device; left padding. On a ``TransformerBridge`` (the bridge backend)
the same loop reads the Hugging Face model's own weights through the bridge's TransformerLens-format
views (``W_Q``, ``W_in``, ...), HF's norms and HF's rotary tables; there it takes the HF layer types
whose computation it reproduces (GPT-2 and Llama blocks) and leaves others to the bridge's ``generate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_offset_position_ids, sample_logits

try:  # TransformerLens 3: HookedTransformer's components (TransformerLens 4 has only the bridge)
    from transformer_lens.components import (MLP, Attention, GatedMLP, GroupedQueryAttention, LayerNorm,
                                             LayerNormPre, RMSNorm, RMSNormPre, TransformerBlock)
    _NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)
except ImportError:
    _NORMS = ()
# the HF layers of a bridged LM whose computation the loop reproduces: (block, attention, MLP, norms)
_HF_BLOCKS = {"GPT2Block": ("GPT2Attention", "GPT2MLP", "LayerNorm"),
              "LlamaDecoderLayer": ("LlamaAttention", "LlamaMLP", "LlamaRMSNorm")}
# config switches that change the computation in ways this loop does not reproduce (truthy = refuse)
_UNSUPPORTED_CFG = ("attn_only", "parallel_attn_mlp", "use_normalization_before_and_after", "use_qk_norm",
                    "clip_qkv", "use_attention_sinks", "use_logn_attn", "use_dynamic_ntk_rope", "load_in_4bit",
                    "post_embedding_ln")


def hooks_attached(model) -> bool:
    """Whether any forward or backward hook is attached to the language model (or globally).

    Hooks on the image side (the encoder, the projection, ``hook_image_features``,
    ``hook_image_embed``) do not count: those run as usual before any decoding; nor do the hooks
    the model declares its own (``model._own_hooks``: a ``VisionBridge``'s slot filling), nor the
    bridge's wiring on the HF modules (functions of ``transformer_lens.model_bridge`` that feed its hook
    points; a hook added through TransformerLens sits on a ``HookPoint`` and counts).
    """
    from torch.nn.modules import module as nn_module
    from transformer_lens.hook_points import HookPoint

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    image_side = {"vision", "projection", "hook_image_features", "hook_image_embed"}
    own = set(getattr(model, "_own_hooks", ()))

    def foreign(module, hooks) -> bool:
        for h in hooks.values():
            fn = getattr(h, "__func__", h)
            wiring = not isinstance(module, HookPoint) and getattr(fn, "__module__", "").startswith(
                "transformer_lens.model_bridge")
            if fn not in own and not wiring:
                return True
        return False

    for name, child in model.named_children():
        if name in image_side:
            continue
        for m in child.modules():
            if any(foreign(m, h) for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                           m._backward_pre_hooks)):
                return True
    return bool(model._forward_hooks or model._forward_pre_hooks)


def why_not_fast(model, use_past_kv_cache: bool = True, freq_penalty: float = 0.0,
                 generation_kwargs: dict | None = None) -> str | None:
    """The first reason the lean loop cannot stand in for TransformerLens's ``generate``, or ``None``.

    Args:
        model: The hooked model.
        use_past_kv_cache, freq_penalty, generation_kwargs: The ``generate`` options that matter here.
    """
    cfg = model.cfg
    if not use_past_kv_cache:
        return "use_past_kv_cache=False"
    if freq_penalty:
        return "freq_penalty"
    if generation_kwargs:
        return f"generation options {sorted(generation_kwargs)}"
    if cfg.n_devices != 1:
        return "several devices"
    if isinstance(model, TransformerBridge) and not getattr(model, "use_lean_generation", True):
        return "use_lean_generation=False"
    if model.W_E.dtype not in (torch.float32, torch.float64):
        return f"dtype {model.W_E.dtype}"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional_embedding_type {cfg.positional_embedding_type!r}"
    if cfg.attention_dir != "causal":
        return "bidirectional attention"
    for name in _UNSUPPORTED_CFG:
        if getattr(cfg, name, None):
            return f"cfg.{name}"
    for name in ("attn_scores_soft_cap", "output_logits_soft_cap"):  # off when <= 0
        if (getattr(cfg, name, None) or 0) > 0:
            return f"cfg.{name}"
    if str(cfg.act_fn).endswith("_ln"):  # solu_ln etc. (HookedTransformerConfig.is_layer_norm_activation)
        return f"act_fn {cfg.act_fn!r}"
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return f"post-norm architecture {cfg.original_architecture}"
    reason = _why_not_bridge(model) if isinstance(model, TransformerBridge) else _why_not_hooked(model)
    if reason is not None:
        return reason
    if hooks_attached(model):
        return "hooks are attached"
    return None


def _why_not_hooked(model) -> str | None:
    """The first HookedTransformer component the loop does not implement, or ``None``."""
    if type(model.ln_final) not in _NORMS:
        return f"final norm {type(model.ln_final).__name__}"
    for block in model.blocks:
        if type(block) is not TransformerBlock or type(block.ln1) not in _NORMS or type(block.ln2) not in _NORMS:
            return f"block {type(block).__name__} with norms {type(block.ln1).__name__}"
        if type(block.attn) not in (Attention, GroupedQueryAttention) or block.attn.attn_type != "global":
            return f"attention {type(block.attn).__name__} ({block.attn.attn_type})"
        if getattr(block.attn, "_attention_dir_override", None) not in (None, "causal"):
            return "attention direction overridden"
        if type(block.mlp) not in (MLP, GatedMLP):
            return f"MLP {type(block.mlp).__name__}"
    return None


def _hf(component):
    """The Hugging Face module a bridge component runs."""
    return getattr(component, "original_component", None)


def _why_not_bridge(model) -> str | None:
    """The first HF layer of a bridged LM the loop does not implement (exactly), or ``None``."""
    hf_config = model.original_model.config
    for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "mlp_bias", "add_cross_attention"):
        if getattr(hf_config, name, False):
            return f"HF config {name}"
    if getattr(hf_config, "rope_scaling", None) and model.cfg.positional_embedding_type != "rotary":
        return "HF config rope_scaling"
    blocks = getattr(model, "blocks", None)
    if not blocks:
        return "no blocks"
    for block in blocks:
        kind = type(_hf(block)).__name__
        if kind not in _HF_BLOCKS:
            return f"HF block {kind}"
        attn, mlp, norm = _HF_BLOCKS[kind]
        parts = (block.attn, block.mlp, block.ln1, block.ln2)
        if [type(_hf(p)).__name__ for p in parts] != [attn, mlp, norm, norm]:
            return f"HF layers {[type(_hf(p)).__name__ for p in parts]} in a {kind}"
    if type(_hf(model.ln_final)).__name__ not in {n for _, _, n in _HF_BLOCKS.values()}:
        return f"final norm {type(_hf(model.ln_final)).__name__}"
    if model.cfg.positional_embedding_type == "rotary" and _hf_rotary(model) is None:
        return "no HF rotary embedding"
    return None


def _norm(module) -> tuple:
    """``(kind, weight, bias, eps)`` of a TransformerLens norm module, or of the HF norm a bridge component runs."""
    hf = _hf(module)
    if hf is not None:
        if hasattr(hf, "variance_epsilon"):  # LlamaRMSNorm: weight * x / rms(x)
            return ("rms", hf.weight, None, hf.variance_epsilon)
        return ("ln", hf.weight, hf.bias, hf.eps)  # nn.LayerNorm
    rms = isinstance(module, (RMSNorm, RMSNormPre))
    return ("rms" if rms else "ln", getattr(module, "w", None), getattr(module, "b", None), module.eps)


def _hf_rotary(model):
    """The HF rotary embedding module of a bridged LM (``None`` if it has none)."""
    for m in model.original_model.modules():
        if type(m).__name__.endswith("RotaryEmbedding") and type(m).__module__.startswith("transformers."):
            return m
    return None


def _bridge_rotary(model, capacity: int) -> tuple:
    """``(cos, sin, rotary_dim, adjacent_pairs)`` for positions ``0..capacity-1`` from HF's own rotary
    embedding (its scaling included), in the layout of TransformerLens's tables."""
    W_E = model.W_E
    cos, sin = _hf_rotary(model)(W_E[:1][None], torch.arange(capacity, device=W_E.device)[None])
    return cos[0], sin[0], cos.shape[-1], False


def _flat(b: Tensor | None) -> Tensor | None:
    return None if b is None else b.reshape(-1)


def _apply_norm(x: Tensor, norm: tuple) -> Tensor:
    kind, w, b, eps = norm
    if kind == "rms":
        return F.rms_norm(x, x.shape[-1:], w, eps)
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


class _Layer:
    """One block's weights as ``[out, in]`` matrices for ``F.linear`` (views in the usual layout)."""

    def __init__(self, block, cfg=None, rotary: tuple | None = None):
        """``block``: a HookedTransformer ``TransformerBlock``, or a bridge's block (with the bridge's
        ``cfg`` and the ``rotary`` tables of :func:`_bridge_rotary`; the bridge's ``W_K``/``W_V`` hold
        the key/value heads only, its missing biases are ``None``)."""
        attn, mlp = block.attn, block.mlp
        bridge = cfg is not None
        cfg = cfg if bridge else block.cfg
        grouped = not bridge and isinstance(attn, GroupedQueryAttention)
        W_K, b_K = (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
        W_V, b_V = (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)
        self.n_heads, self.n_kv, self.d_head = attn.W_Q.shape[0], W_K.shape[0], cfg.d_head
        as_out_in = lambda W: W.permute(0, 2, 1).reshape(-1, W.shape[1])  # [head, in, d_head] -> [head*d_head, in]
        self.W_Q, self.b_Q = as_out_in(attn.W_Q), _flat(attn.b_Q)
        self.W_K, self.b_K = as_out_in(W_K), _flat(b_K)
        self.W_V, self.b_V = as_out_in(W_V), _flat(b_V)
        self.W_O, self.b_O = attn.W_O.reshape(-1, attn.W_O.shape[-1]).T, attn.b_O
        if bridge:  # HF's own scale: Llama's ``scaling``, GPT-2's 1/sqrt(d_head) (or none)
            hf = _hf(attn)
            self.scale = getattr(hf, "scaling", None) or (
                self.d_head ** -0.5 if getattr(hf, "scale_attn_weights", True) else 1.0)
        else:
            self.scale = 1.0 / attn.attn_scale
        self.rotary = rotary
        if not bridge and cfg.positional_embedding_type == "rotary":
            self.rotary = (attn.rotary_cos, attn.rotary_sin, cfg.rotary_dim, cfg.rotary_adjacent_pairs)
        self.ln1, self.ln2 = _norm(block.ln1), _norm(block.ln2)
        self.gated = bool(cfg.gated_mlp) if bridge else isinstance(mlp, GatedMLP)
        self.W_in, self.b_in, self.W_out, self.b_out = mlp.W_in.T, mlp.b_in, mlp.W_out.T, mlp.b_out
        self.W_gate = mlp.W_gate.T if self.gated else None
        if bridge:  # the HF MLP's own activation (Llama: act_fn, GPT-2: act)
            hf = _hf(mlp)
            self.act_fn = getattr(hf, "act_fn", None) or hf.act
        else:
            self.act_fn = mlp.act_fn

    def rotate(self, x: Float[Tensor, "batch pos head d_head"], pos: Int[Tensor, "batch pos"]) -> Tensor:
        """TransformerLens's rotary embedding, with its own tables, at the given positions."""
        cos_table, sin_table, dim, adjacent = self.rotary
        cos, sin = cos_table[pos][:, :, None], sin_table[pos][:, :, None]
        x_rot, x_pass = x[..., :dim], x[..., dim:]
        if adjacent:
            flip = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
        else:
            half = dim // 2
            flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        rotated = x_rot * cos + flip * sin
        return rotated if x_pass.shape[-1] == 0 else torch.cat([rotated, x_pass], dim=-1)

    def mlp(self, x: Tensor) -> Tensor:
        if self.gated:
            post = self.act_fn(F.linear(x, self.W_gate)) * F.linear(x, self.W_in)
            post = post if self.b_in is None else post + self.b_in
        else:
            post = self.act_fn(F.linear(x, self.W_in, self.b_in))
        return F.linear(post, self.W_out, self.b_out)


class _Unsupported(Exception):
    """This call cannot take the lean loop (found only once the sequence length is known)."""


class _Decoder:
    """The model's weights and a preallocated K/V cache for one batch of ``capacity`` positions."""

    def __init__(self, model, batch: int, capacity: int):
        if isinstance(model, TransformerBridge):
            rotary = _bridge_rotary(model, capacity) if model.cfg.positional_embedding_type == "rotary" else None
            self.layers = [_Layer(b, model.cfg, rotary) for b in model.blocks]
        else:
            self.layers = [_Layer(b) for b in model.blocks]
        self.ln_final = _norm(model.ln_final)
        self.W_U, self.b_U = model.W_U.T, model.b_U
        first = self.layers[0]
        for layer in self.layers:
            if layer.rotary is not None and layer.rotary[0].shape[0] < capacity:
                raise _Unsupported("rotary table shorter than the sequence")
        dtype, device = model.W_E.dtype, model.W_E.device
        shape = (batch, first.n_kv, capacity, first.d_head)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.length = 0

    def forward(self, x: Float[Tensor, "batch pos d_model"], pos: Int[Tensor, "batch pos"],
                key_mask: Tensor | None) -> Float[Tensor, "batch d_vocab"]:
        """Run new positions through all blocks (appending their K/V); the last position's logits.

        ``key_mask``: ``None`` (every cached position visible, causal among the new ones), else a
        boolean mask broadcastable to ``[batch, 1, n_new, n_cached + n_new]``.
        """
        batch, n_new, _ = x.shape
        start, end = self.length, self.length + n_new
        one_query = n_new == 1
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            h = _apply_norm(x, layer.ln1)
            q = F.linear(h, layer.W_Q, layer.b_Q).view(batch, n_new, layer.n_heads, layer.d_head)
            k = F.linear(h, layer.W_K, layer.b_K).view(batch, n_new, layer.n_kv, layer.d_head)
            v = F.linear(h, layer.W_V, layer.b_V).view(batch, n_new, layer.n_kv, layer.d_head)
            if layer.rotary is not None:
                q, k = layer.rotate(q, pos), layer.rotate(k, pos)
            keys[:, :, start:end] = k.transpose(1, 2)
            values[:, :, start:end] = v.transpose(1, 2)
            K, V = keys[:, :, :end], values[:, :, :end]
            if one_query:  # the group's query heads as query rows of their shared K/V head: no copy of K/V
                q = q.view(batch, layer.n_kv, layer.n_heads // layer.n_kv, layer.d_head)
                z = F.scaled_dot_product_attention(q, K, V, attn_mask=key_mask, scale=layer.scale)
            else:
                z = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=key_mask,
                                                   is_causal=key_mask is None, scale=layer.scale,
                                                   enable_gqa=layer.n_kv != layer.n_heads).transpose(1, 2)
            x = x + F.linear(z.reshape(batch, n_new, -1), layer.W_O, layer.b_O)
            x = x + layer.mlp(_apply_norm(x, layer.ln2))
        self.length = end
        return F.linear(_apply_norm(x[:, -1], self.ln_final), self.W_U, self.b_U)


@torch.no_grad()
def generate_tokens(model, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
                    max_new_tokens: int, stop_at_eos: bool = True, eos_token_id=None, do_sample: bool = True,
                    top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                    return_logits: bool = False):
    """TransformerLens's ``generate`` on tokens, KV-cached, without its per-token overhead.

    The embedding of ``tokens`` is the model's own ``embed`` (for a ``HookedVisionPrefix``, with
    images bound). Positions, padding, sampling (``transformer_lens.utils.sample_logits``, the same
    random draws) and end-of-text handling are TransformerLens's; check :func:`why_not_fast` first.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` for which :func:`why_not_fast` returns ``None``.
        tokens: The prompt tokens, left-padded where rows differ in length.
        attention_mask: 1 for real tokens, 0 for padding (``utils.get_attention_mask``).
        max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p, temperature: As for
            ``HookedTransformer.generate``.
        return_logits: Also return each step's logits (what ``generate(..., output_logits=True)``
            returns), ``[batch, n_new, d_vocab]``.

    Returns:
        ``tokens`` followed by the generated tokens ``[batch, pos_plus_new]``, as TransformerLens
        returns them (with ``return_logits``, a tuple ``(tokens, logits)``); ``None`` when this
        prompt cannot take the lean loop (right padding, a rotary table too short): use
        TransformerLens's ``generate``.
    """
    mask = attention_mask.to(tokens.device).bool()
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()) or not bool(mask[:, -1].all()):
        return None  # only leading (left) padding has the same meaning here as in TransformerLens
    batch, n_prompt = tokens.shape
    try:
        decoder = _Decoder(model, batch, n_prompt + max_new_tokens)
    except _Unsupported:
        return None
    padded = not bool(mask.all())
    pos = get_offset_position_ids(0, mask.long())
    x = model.embed(tokens)
    bridge = isinstance(model, TransformerBridge)
    W_pos = None
    if model.cfg.positional_embedding_type == "standard":
        W_pos = _hf(model.pos_embed).weight if bridge else model.W_pos  # the bridge: HF's own table
    if W_pos is not None and bridge:
        x = x + W_pos[pos]  # HF reads the positions from the mask, as here
    elif W_pos is not None:
        x = x + model.pos_embed(tokens, 0, mask.long() if padded else None)
    prefill_mask = None
    if padded:  # causal and not padding; a padding query sees itself only (its output is never read)
        causal = torch.ones(n_prompt, n_prompt, dtype=torch.bool, device=tokens.device).tril()
        prefill_mask = (causal & mask[:, None, :]) | torch.eye(n_prompt, dtype=torch.bool, device=tokens.device)
        prefill_mask = prefill_mask[:, None]
    logits = decoder.forward(x, pos, prefill_mask)

    stop_tokens, pad_token = _stop_tokens(model, stop_at_eos, eos_token_id)
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    next_pos = pos[:, -1:] + 1
    key_mask = torch.cat([mask, torch.ones(batch, max_new_tokens, dtype=torch.bool, device=tokens.device)], 1)
    new, step_logits = [], []
    for step in range(max_new_tokens):
        if return_logits:
            step_logits.append(logits)
        if do_sample:
            token = sample_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature)
        else:
            token = logits.argmax(-1)
        if stop_at_eos:
            token[finished] = pad_token
            finished |= torch.isin(token, stop_tokens)
        new.append(token[:, None])
        if step == max_new_tokens - 1 or (stop_at_eos and bool(finished.all())):
            break
        x = model.embed(token[:, None])
        if W_pos is not None:
            x = x + W_pos[next_pos]
        visible = key_mask[:, None, None, :decoder.length + 1] if padded else None
        logits = decoder.forward(x, next_pos, visible)
        next_pos = next_pos + 1
    out = torch.cat([tokens, *new], dim=1)
    return (out, torch.stack(step_logits, dim=1)) if return_logits else out


def _stop_tokens(model, stop_at_eos: bool, eos_token_id) -> tuple[Tensor, int]:
    """TransformerLens's end-of-text tokens and the token finished rows are padded with."""
    device = model.W_E.device
    if not stop_at_eos:
        return torch.empty(0, dtype=torch.long, device=device), 0
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        if tokenizer_eos is None:
            raise ValueError("stop_at_eos=True needs eos_token_id= or a tokenizer with an end-of-text token")
        eos_token_id = tokenizer_eos
    if isinstance(eos_token_id, int):
        return torch.tensor([eos_token_id], device=device), eos_token_id
    stops = list(eos_token_id)
    return torch.tensor(stops, device=device), tokenizer_eos if tokenizer_eos is not None else stops[0]
