"""Multimodal neurons of a HF VLM on the bridge (:class:`~tl_multimodal.models.vlm.VLMBridge`), on the
processor's batch as it is (``inputs=batch``): the target, attribution, ablation, patching and heatmaps.

The analyses of soft-prompt models (:func:`~tl_multimodal.analysis.attribution.attribute`, ...) feed a fixed
number of image tokens per image; here the HF model makes its own (tiles, crops, dynamic resolution), so
every function takes one prompt row with its images and finds the image positions by the image token id
(``model.image_mask``). Units are MLP units at ``blocks.{l}.mlp.hook_post`` (TransformerLens's name; for
gated MLPs the product ``act(gate) * up`` that the down-projection reads), so
:func:`~tl_multimodal.analysis.decoding.decode_units` decodes them (the down-projection rows through the
unembedding).

    batch = chat_inputs(model, [image])                 # the processor's chat template, "What is in the image?"
    attr = attribute_vlm(model, batch)                   # target: first noun of the greedy answer
    top = attr.top_units(10)
    ablate_vlm_units(model, attr.inputs, top.units(), attr.target_id)
    heat = vlm_unit_heatmap(model, attr.inputs, *top.units()[0].tolist(), image_sizes=[image.size])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_multimodal._validate import check_int
from tl_multimodal.analysis.ablation import AblationResult
from tl_multimodal.analysis.attribution import TopUnits
from tl_multimodal.analysis.nouns import first_noun
from tl_multimodal.analysis.patching import PatchResult
from tl_multimodal.analysis.units import as_units, mlp_act_name, unit_label

QUESTION = "What is in the image?"
_GROW = {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}  # per-token inputs and their fill


# ------------------------------------------------------------------------------ inputs and target
def check_inputs(model, inputs) -> dict:
    """The processor's batch as a dict of one prompt row holding image tokens (``ValueError`` otherwise)."""
    if not hasattr(inputs, "keys") or "input_ids" not in inputs:
        raise TypeError(f"inputs must be the processor's batch (a mapping with input_ids), got {type(inputs).__name__}")
    batch = dict(inputs)
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"inputs['input_ids'] must be one prompt row [1, pos], got "
                         f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
    if not model.image_mask(ids).any():
        raise ValueError(f"inputs['input_ids'] holds no image token (id {model.image_token_id})")
    return batch


def extend_inputs(inputs: dict, new_ids: Int[Tensor, "n"]) -> dict:
    """``inputs`` with ``new_ids`` appended to the prompt (the attention mask and token types grown too)."""
    new_ids = new_ids.reshape(1, -1).to(inputs["input_ids"].device)
    out = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new_ids], 1))
    for key, fill in _GROW.items():
        if key in inputs:
            out[key] = torch.cat([inputs[key], torch.full_like(new_ids, fill).to(inputs[key].dtype)], 1)
    return out


def chat_inputs(model, images, question: str = QUESTION, **processor_kwargs) -> dict:
    """One chat prompt asking ``question`` about ``images``, as the model's processor builds it.

    Raises:
        ValueError: The model has no processor or its processor no chat template.
    """
    processor = model.processor
    if processor is None or not getattr(processor, "chat_template", None):
        raise ValueError("chat_inputs needs the model's processor with a chat template; build the batch "
                         "yourself and pass an explicit target=")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(processor(text=[text], images=list(images), return_tensors="pt", **processor_kwargs))


@torch.no_grad()
def greedy_answer(model, inputs, max_new_tokens: int = 12) -> Int[Tensor, "n"]:
    """The model's greedy continuation of the prompt (whole forward passes; stops at the EOS token)."""
    check_int(max_new_tokens, "max_new_tokens")
    batch, out = check_inputs(model, inputs), []
    eos = getattr(model.tokenizer, "eos_token_id", None)
    for _ in range(max_new_tokens):
        nxt = model(**batch)[0, -1].argmax()
        if eos is not None and int(nxt) == eos:
            break
        out.append(nxt)
        batch = extend_inputs(batch, nxt)
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.long)


def target_inputs(model, inputs, target=None, max_new_tokens: int = 12) -> tuple[dict, int, str | None]:
    """``(probe inputs, target id, answer)``: the prompt the target is predicted after, and the target.

    ``target=None``: the first noun of the model's greedy answer; the probe is the prompt plus the answer
    up to the noun's first token, the target that token. A string or id: that token after the prompt.

    Raises:
        ValueError: A target that is not one token, or an answer without a noun.
    """
    batch = check_inputs(model, inputs)
    if target is not None:
        if isinstance(target, str):
            ids = model.tokenizer.encode(target, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"target {target!r} is {len(ids)} tokens; give one token (or its id)")
            target = ids[0]
        return batch, check_int(target, "target", minimum=0, maximum=model.cfg.d_vocab - 1), None
    answer = greedy_answer(model, batch, max_new_tokens)
    text = model.tokenizer.decode(answer)
    noun = first_noun(text)
    if noun is None:
        raise ValueError(f"the model's answer {text!r} has no noun; pass target=")
    for i in range(len(answer)):  # the first answer token that reaches into the noun
        if len(model.tokenizer.decode(answer[:i + 1])) > noun[1]:
            return extend_inputs(batch, answer[:i]), int(answer[i]), text
    raise AssertionError("unreachable: the noun lies inside the answer")


# ------------------------------------------------------------------------------ attribution
@dataclass(repr=False)
class VLMAttribution:
    """Gradient x activation of every MLP unit at every image token of one prompt, for one target.

    Attributes:
        scores: ``[layer, image_token, unit]`` float32 on CPU: ``Z * d log p(target) / dZ``, ``Z`` the
            activation at ``blocks.{l}.mlp.hook_post``, image tokens in prompt order.
        inputs: The probe batch (prompt, plus the answer up to the target): pass it to ablation, patching.
        target_id, target: The token attributed (predicted at the last position).
        answer: The model's greedy answer the target came from (None for an explicit target).
        is_patch: ``[image_token]`` False at separators (``image_newline``), left out of unit statistics.
    """

    scores: Float[Tensor, "layer image_token unit"]
    inputs: dict
    target_id: int
    target: str
    answer: str | None
    is_patch: Bool[Tensor, "image_token"]

    def unit_scores(self, over_patches: str = "max") -> Float[Tensor, "layer unit"]:
        """Each unit's score over the image's patch tokens (separators left out): its largest attribution
        (``"max"``, the paper's) or their sum (``"sum"``: to first order, what zeroing it at every image
        token takes from the log-probability)."""
        if over_patches not in ("max", "sum"):
            raise ValueError(f"over_patches must be 'max' or 'sum', got {over_patches!r}")
        patches = self.scores[:, self.is_patch]
        return patches.amax(1) if over_patches == "max" else patches.sum(1)

    def top_units(self, n_units: int = 100, over_patches: str = "max") -> TopUnits:
        """The ``n_units`` best units by :meth:`unit_scores`, with the patch token where each one's
        attribution is largest."""
        n_layers, _, d_mlp = self.scores.shape
        check_int(n_units, "n_units", maximum=n_layers * d_mlp)
        score, flat = self.unit_scores(over_patches).flatten().topk(n_units)
        layer, unit = flat // d_mlp, flat % d_mlp
        where = self.scores.masked_fill(~self.is_patch[None, :, None], float("-inf")).argmax(1)
        return TopUnits(torch.zeros_like(layer), layer, unit, where[layer, unit], score, torch.arange(n_units),
                        [self.target] * n_units, n_units, "post")

    def to_dataframe(self, n_units: int = 100) -> pd.DataFrame:
        """The top units as rows (:meth:`TopUnits.to_dataframe`)."""
        return self.top_units(n_units).to_dataframe()

    def __repr__(self) -> str:
        n_layers, n_tok, d_mlp = self.scores.shape
        top = self.top_units(3)
        best = ", ".join(unit_label(l, u) for l, u in top.units().tolist())
        return (f"VLMAttribution(target {self.target!r}, {n_layers} layers x {n_tok} image tokens x {d_mlp} units; "
                f"top {best})")


def attribute_vlm(model, inputs, target=None, *, image_sizes=None, is_patch: Bool[Tensor, "image_token"] | None = None,
                  max_new_tokens: int = 12, **processor_kwargs) -> VLMAttribution:
    """Attribution of every MLP unit at every image token to the target's log-probability: one backward pass.

    Args:
        model: A :class:`~tl_multimodal.models.vlm.VLMBridge`.
        inputs: The processor's batch for one prompt with its images (``chat_inputs`` for a chat prompt).
        target: ``None`` (the first noun of the model's greedy answer), a one-token string or a token id.
        image_sizes: The batch's original image sizes ``(width, height)``: separators (``image_newline``) are
            then left out of the units' patch statistics (``model.image_geometry(image_sizes).is_patch``).
        is_patch: Or which image tokens are patches, given; default (neither): all.
        max_new_tokens: Length of the greedy answer the default target is read from.
        **processor_kwargs: With ``image_sizes``: the options the batch was made with.

    Returns:
        A :class:`VLMAttribution`.
    """
    batch, target_id, answer = target_inputs(model, inputs, target, max_new_tokens)
    mask = model.image_mask(batch["input_ids"])[0]
    n_tok = int(mask.sum())
    if image_sizes is not None:
        if is_patch is not None:
            raise ValueError("give image_sizes or is_patch, not both")
        is_patch = model.image_geometry(image_sizes, **processor_kwargs).is_patch
    if is_patch is None:
        is_patch = torch.ones(n_tok, dtype=torch.bool)
    elif not isinstance(is_patch, Tensor) or is_patch.shape != (n_tok,) or is_patch.dtype != torch.bool:
        raise ValueError(f"is_patch must be a bool [{n_tok}] tensor (one per image token)")
    names = [mlp_act_name("post", layer) for layer in range(model.cfg.n_layers)]
    deltas, acts = {}, {}

    def keep(act, hook, name):  # (a bridge may run the hook under an alias: keyed by the name asked for)
        acts[name] = act.detach()
        deltas[name] = torch.zeros_like(act, requires_grad=True)
        return act + deltas[name]  # d objective / d delta = d objective / d act, the graph unbroken

    with torch.enable_grad():
        logits = model.run_with_hooks(**batch, fwd_hooks=[(n, partial(keep, name=n)) for n in names])
        objective = logits[0, -1].float().log_softmax(-1)[target_id]
        grads = torch.autograd.grad(objective, [deltas[n] for n in names])
    scores = torch.stack([(acts[n][0, mask] * g[0, mask]).float().cpu() for n, g in zip(names, grads)])
    return VLMAttribution(scores, batch, target_id, model.tokenizer.decode([target_id]), answer, is_patch.cpu())


# ------------------------------------------------------------------------------ interventions
def _unit_hooks(model, inputs: dict, units: Tensor, value) -> list:
    """Hooks setting ``units`` at the image positions to ``value(layer, index, current)`` (``[token, unit]``)."""
    mask = model.image_mask(inputs["input_ids"])
    hooks = []
    for layer in units[:, 0].unique().tolist():
        index = units[units[:, 0] == layer, 1].to(mask.device)

        def edit(act, hook, layer=layer, index=index):
            act = act.clone()
            rows = act[mask]
            rows[:, index] = value(layer, index, rows[:, index]).to(rows.dtype)
            act[mask] = rows
            return act

        hooks.append((mlp_act_name("post", layer), edit))
    return hooks


@torch.no_grad()
def _p(model, inputs: dict, target_id: int, hooks=()) -> Float[Tensor, "1"]:
    logits = model.run_with_hooks(**inputs, fwd_hooks=list(hooks))
    return logits[:, -1].float().softmax(-1)[:, target_id].cpu()


def ablate_vlm_units(model, inputs, units, target_id: int) -> AblationResult:
    """p(target) with ``units`` zeroed at every image token, against the unablated model.

    Args:
        model: A :class:`~tl_multimodal.models.vlm.VLMBridge`.
        inputs: The probe batch (``VLMAttribution.inputs``): the target is predicted at its last position.
        units: ``(layer, unit)`` pairs (``TopUnits.units()``).
        target_id: The target token id.
    """
    batch = check_inputs(model, inputs)
    u = as_units(model, units, batched=False)
    target_id = check_int(target_id, "target_id", minimum=0, maximum=model.cfg.d_vocab - 1)
    after = _p(model, batch, target_id, _unit_hooks(model, batch, u, lambda layer, index, a: torch.zeros_like(a)))
    return AblationResult(p_before=_p(model, batch, target_id), p_after=after, target=torch.tensor([target_id]),
                          n_units=len(u), mode="zero")


def patch_vlm_units(model, inputs, source_inputs, units, target_id: int) -> PatchResult:
    """p(target) on ``inputs`` with ``units`` at its image tokens patched from ``source_inputs``.

    The two batches must hold the same number of image tokens (images of the same size); the patch is
    token for token. Built on the same hooks TransformerLens's patching uses (``run_with_cache`` of the
    source, ``run_with_hooks`` of the base).

    Raises:
        ValueError: The two batches hold different numbers of image tokens.
    """
    base, source = check_inputs(model, inputs), check_inputs(model, source_inputs)
    u = as_units(model, units, batched=False)
    target_id = check_int(target_id, "target_id", minimum=0, maximum=model.cfg.d_vocab - 1)
    n_base, n_source = (int(model.image_mask(b["input_ids"]).sum()) for b in (base, source))
    if n_base != n_source:
        raise ValueError(f"inputs hold {n_base} image tokens but source_inputs {n_source}: patching is token for "
                         "token (use images of one size)")
    names = [mlp_act_name("post", layer) for layer in u[:, 0].unique().tolist()]
    with torch.no_grad():
        _, cache = model.run_with_cache(**source, names_filter=names)
    src_mask = model.image_mask(source["input_ids"])
    lookup = {layer: cache[mlp_act_name("post", layer)][src_mask] for layer in u[:, 0].unique().tolist()}
    hooks = _unit_hooks(model, base, u, lambda layer, index, current: lookup[layer][:, index])
    return PatchResult(p_base=_p(model, base, target_id), p_source=_p(model, source, target_id),
                       p_patched=_p(model, base, target_id, hooks), target=torch.tensor([target_id]),
                       what=f"{len(u)} units at the image tokens")


# ------------------------------------------------------------------------------ heatmaps
@torch.no_grad()
def vlm_unit_activations(model, inputs, layer: int, unit: int) -> Float[Tensor, "image_token"]:
    """Unit ``(layer, unit)``'s activation (``hook_post``) at each image token of the batch, in order."""
    batch = check_inputs(model, inputs)
    (layer, unit), = as_units(model, [(layer, unit)], batched=False).tolist()
    name = mlp_act_name("post", layer)
    _, cache = model.run_with_cache(**batch, names_filter=name)
    return cache[name][model.image_mask(batch["input_ids"])][:, unit].float().cpu()


def vlm_unit_heatmap(model, inputs, layer: int, unit: int, image_sizes, image_index: int = 0,
                     **processor_kwargs) -> Float[Tensor, "height width"]:
    """Where unit ``(layer, unit)`` fires on an original image: each image token's activation painted on
    its box (:meth:`~tl_multimodal.models.vlm_geometry.ImageTokenGeometry.paint`; all views together,
    separators left out).

    Args:
        model, inputs, layer, unit: As for :func:`vlm_unit_activations`.
        image_sizes: The batch's original image sizes ``(width, height)`` (``[image.size for image in images]``).
        image_index: The image to paint.
        **processor_kwargs: The options the batch was made with (``do_pan_and_scan=True``, ...).

    Raises:
        ValueError: The geometry does not have one record per image token of the batch.
    """
    values = vlm_unit_activations(model, inputs, layer, unit)
    geometry = model.image_geometry(image_sizes, **processor_kwargs)
    if len(geometry) != len(values):
        raise ValueError(f"the batch holds {len(values)} image tokens but images of image_sizes={image_sizes!r} "
                         f"make {len(geometry)}: give the batch's images' sizes (and processor options)")
    return geometry.paint(values, image_index)
