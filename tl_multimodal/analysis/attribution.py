"""Attribution of a caption token to every MLP unit at every image position (Schwettmann et al., 2023).

``g[layer, patch, unit] = Z * dy_c / dZ`` with ``Z`` the unit's pre-activation
(``blocks.{l}.mlp.hook_pre``) at an image position and ``y_c`` the logit of the target token ``c``
at the position that predicts it. All layers, patches and units come from ONE forward with
TransformerLens hooks that keep the activations and ONE ``torch.autograd.grad`` per batch (gradients
of the activations only; no parameter ``.grad`` is touched).

By default ``c`` is the first sub-token of the first noun of the model's own greedy caption, found
by :func:`first_noun`; the sequence is ``[image slots][prompt][caption up to the noun]``. The
caption is generated with a KV cache *inside* the attribution pass (the forward that generates is
the one differentiated) and stops once every row's first noun is complete (the next token starts a
new word, or end of text). A model with ``grad_through_kv_cache = False`` (HookedVisionPrefix)
captions without gradients, then attributes the caption in one more forward. The query is
``attr.probe`` (:class:`~tl_multimodal.analysis.probe.Probe`), which ablation, patching, heatmaps take.

    attr = attribute(model, images)            # Attribution, scores [batch, layer, patch, unit]
    attr.top_units(100).to_dataframe()          # image_index, layer, unit, patch, score
    ablate_units(model, images, attr.top_units(10).units_per_image(), probe=attr.probe)
    res = attribute_dataset(model, loader)      # top units and probes of every image of a dataset
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_multimodal._validate import check_int, check_ints
from tl_multimodal.analysis.nouns import first_noun
from tl_multimodal.analysis.probe import MultiToken, Probe, image_prompt_ids, make_probe, probe_from_caption_ids
from tl_multimodal.analysis.units import mlp_hook, unit_axis
from tl_multimodal.models.protocol import VisionLM, soft_prompts
from tl_multimodal.sae.model import SAE
from tl_multimodal.sae.splice import leaf_latents, saes_by_hook

Objective = Literal["logit", "logprob", "caption_logprob"]
OverPatches = Literal["max", "sum"]
Normalize = Literal["layer"] | None

# ---------------------------------------------------------------------------- results
@dataclass
class TopUnits:
    """The top ``n_units`` units of each image (small, long format).

    A unit's score on an image is by default its largest attribution over the image's patches
    (signed: a unit that raises ``y_c`` scores high; other rankings: :meth:`Attribution.unit_scores`);
    ``patch`` is where its attribution is largest.

    Attributes:
        image_index, layer, unit, patch: ``[n]`` index tensors (``image_index`` counts across a dataset).
        score: ``[n]`` the unit's score (:meth:`Attribution.unit_scores`; by default max over patches).
        rank: ``[n]`` rank of the unit within its image (0 = best).
        target: The target string of each row's image.
        n_units: Units kept per image.
        hook: The MLP hook the scores are for (``"pre"``, ``"post"``, ``"pre_linear"``).
    """

    image_index: Int[Tensor, "n"]
    layer: Int[Tensor, "n"]
    unit: Int[Tensor, "n"]
    patch: Int[Tensor, "n"]
    score: Float[Tensor, "n"]
    rank: Int[Tensor, "n"]
    target: list[str]
    n_units: int
    hook: str

    def __len__(self) -> int:
        return len(self.image_index)

    def __repr__(self) -> str:
        n_img = len(self.image_index.unique()) if len(self) else 0
        best = ", ".join(f"L{l}.{u}@{p}" for l, u, p in zip(self.layer[:3].tolist(), self.unit[:3].tolist(),
                                                          self.patch[:3].tolist()))
        return f"TopUnits({n_img} images x top {self.n_units}, hook={self.hook!r}; image 0: {best} ...)"

    def to_dataframe(self):
        """Columns image_index, rank, layer, unit, patch, score, target."""
        import pandas as pd

        return pd.DataFrame({"image_index": self.image_index.numpy(), "rank": self.rank.numpy(),
                             "layer": self.layer.numpy(), "unit": self.unit.numpy(),
                             "patch": self.patch.numpy(), "score": self.score.numpy(),
                             "target": self.target})

    def units(self) -> Int[Tensor, "n 2"]:
        """``[n, 2]`` (layer, unit) pairs, ready for :func:`~tl_multimodal.analysis.decoding.decode_units`."""
        return torch.stack([self.layer, self.unit], dim=1)

    def units_per_image(self) -> Int[Tensor, "n_images n_units 2"]:
        """``[n_images, n_units, 2]`` each image's units, best first (per-image units for ablation)."""
        return self.units().reshape(-1, self.n_units, 2)

    def unit_counts(self):
        """How often each (layer, unit) is among an image's top units: a DataFrame with layer, unit,
        n_images, mean_score, max_score, most frequent first."""
        df = self.to_dataframe()
        out = df.groupby(["layer", "unit"]).score.agg(n_images="size", mean_score="mean", max_score="max")
        return out.reset_index().sort_values(["n_images", "mean_score"], ascending=False, ignore_index=True)

    def layer_counts(self) -> Int[Tensor, "layer"]:
        """Top units per layer over all images (where the multimodal units sit)."""
        return torch.bincount(self.layer, minlength=int(self.layer.max()) + 1 if len(self) else 0)

    @staticmethod
    def concat(parts: Sequence["TopUnits"]) -> "TopUnits":
        """Join per-batch results, renumbering images consecutively."""
        if not parts:
            raise ValueError("nothing to concatenate")
        out, offset = [], 0
        for p in parts:
            out.append(p.image_index + offset)
            offset += int(p.image_index.max()) + 1 if len(p) else 0
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return TopUnits(torch.cat(out), cat("layer"), cat("unit"), cat("patch"), cat("score"), cat("rank"),
                        [t for p in parts for t in p.target], parts[0].n_units, parts[0].hook)


@dataclass
class Attribution:
    """Attribution scores of every MLP unit at every image position, for one target per image.

    Attributes:
        scores: ``[batch, layer, patch, unit]`` float32 on CPU: ``Z * dy/dZ`` (or integrated
            gradients), ``Z`` the activation at ``hook`` at the image slots (in slot order).
        probe: The query (tokens, image slots, target, position): pass it to ablation, patching, views.
        hook: The MLP hook, ``"pre"``, ``"post"`` or ``"pre_linear"``.
        objective: ``"logit"``, ``"logprob"`` or ``"caption_logprob"``.
        method: ``"grad_x_act"`` or ``"integrated_gradients"``.
        y: ``[batch]`` the value of ``y_c``.
        grid: ``(rows, cols)`` of the patch grid, for heatmaps.
        saes: With ``attribute(..., sae=...)``: the SAEs whose latents are the units (``hook == "sae"``; the
            ``layer`` axis indexes this list, the ``unit`` axis the latents).
    """

    scores: Float[Tensor, "batch layer patch unit"]
    probe: Probe
    hook: str
    objective: str
    method: str
    y: Float[Tensor, "batch"]
    grid: tuple[int, int] | None = None
    saes: list[SAE] | None = None

    @property
    def target_ids(self) -> Int[Tensor, "batch"]:
        """``[batch]`` the target token of each image (-1 for ``caption_logprob``)."""
        return self.probe.target_ids

    @property
    def targets(self) -> list[str]:
        """The target strings (the token; the whole caption for ``caption_logprob``)."""
        return self.probe.targets

    @property
    def captions(self) -> list[str] | None:
        """The captions used (generated, up to where the target was settled, or given), or None."""
        return self.probe.captions

    @property
    def positions(self) -> Int[Tensor, "batch"]:
        """``[batch]`` the position whose prediction is ``y_c`` (-1 for ``caption_logprob``)."""
        return self.probe.pred_pos

    def __repr__(self) -> str:
        b, l, p, u = self.scores.shape
        return (f"Attribution({b} images x {l} layers x {p} patches x {u} units, hook={self.hook!r}, "
                f"{self.objective}/{self.method}, targets={self.targets[:4]}{'...' if b > 4 else ''})")

    def __len__(self) -> int:
        return self.scores.shape[0]

    def _check_image_index(self, image_index: int) -> int:
        check_int(image_index, "image_index", minimum=None)
        if not -len(self) <= image_index < len(self):
            raise ValueError(f"image_index {image_index} out of range for {len(self)} images")
        return image_index % len(self)

    def unit_scores(self, over_patches: OverPatches = "max", normalize: Normalize = None,
                    ) -> tuple[Float[Tensor, "batch layer unit"], Int[Tensor, "batch layer unit"]]:
        """Each unit's score on each image, and the patch where its attribution is largest.

        Args:
            over_patches: ``"max"``: the largest (signed) attribution over the image's patches (the
                paper); ``"sum"``: the sum over patches (the unit's total first-order effect).
            normalize: ``None``, or ``"layer"``: divide each image's scores in a layer by their
                root mean square over the layer's units (so layers with small gradients, late ones,
                compete with early ones; an all-zero layer stays zero).
        """
        if over_patches not in ("max", "sum"):
            raise ValueError(f"over_patches must be 'max' or 'sum', got {over_patches!r}")
        if normalize not in (None, "layer"):
            raise ValueError(f"normalize must be None or 'layer', got {normalize!r}")
        best, where = self.scores.max(dim=2)
        score = best if over_patches == "max" else self.scores.sum(dim=2)
        if normalize == "layer":
            rms = score.pow(2).mean(-1, keepdim=True).sqrt()
            score = score / torch.where(rms > 0, rms, torch.ones_like(rms))
        return score, where

    def top_units(self, n_units: int = 100, image_index: int | None = None, over_patches: OverPatches = "max",
                  normalize: Normalize = None) -> TopUnits:
        """The ``n_units`` best-scoring units per image (or for one image).

        Units are ranked per image by :meth:`unit_scores` (signed, so units that raise ``y_c`` come
        first; by default ``max_patch g[layer, patch, unit]``, and the paper keeps the top 100).
        """
        check_int(n_units, "n_units")
        imgs = range(len(self)) if image_index is None else [self._check_image_index(image_index)]
        best, where = self.unit_scores(over_patches, normalize)
        n_layer, n_unit = best.shape[1:]
        n_units = min(n_units, n_layer * n_unit)
        rows = {n: [] for n in ("image_index", "layer", "unit", "patch", "score", "rank")}
        targets = []
        for i in imgs:
            s, idx = best[i].flatten().topk(n_units)
            layer, unit = idx // n_unit, idx % n_unit
            rows["image_index"].append(torch.full((n_units,), i))
            rows["layer"].append(layer)
            rows["unit"].append(unit)
            rows["patch"].append(where[i, layer, unit])
            rows["score"].append(s)
            rows["rank"].append(torch.arange(n_units))
            targets += [self.targets[i]] * n_units
        return TopUnits(**{n: torch.cat(v) for n, v in rows.items()}, target=targets, n_units=n_units, hook=self.hook)

    def heatmap(self, image_index: int, layer: int, unit: int) -> Float[Tensor, "rows cols"]:
        """One unit's scores over the patch grid of one image."""
        if self.grid is None:
            raise ValueError("this Attribution has no patch grid")
        i = self._check_image_index(image_index)
        _, n_layers, _, d_mlp = self.scores.shape
        if not (isinstance(layer, int) and 0 <= layer < n_layers and isinstance(unit, int) and 0 <= unit < d_mlp):
            raise ValueError(f"unit ({layer}, {unit}) is out of range: the scores have {n_layers} layers "
                             f"of {d_mlp} units")
        return self.scores[i, layer, :, unit].reshape(self.grid)

    def to_dataframe(self, n_units: int | None = 100):
        """``top_units(n_units).to_dataframe()``; ``n_units=None`` gives every score in long format
        (image_index, layer, patch, unit, score: large)."""
        if n_units is not None:
            return self.top_units(n_units).to_dataframe()
        import pandas as pd

        b, l, p, u = self.scores.shape
        idx = torch.cartesian_prod(torch.arange(b), torch.arange(l), torch.arange(p), torch.arange(u))
        return pd.DataFrame({"image_index": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(),
                             "patch": idx[:, 2].numpy(), "unit": idx[:, 3].numpy(),
                             "score": self.scores.flatten().numpy()})


# ---------------------------------------------------------------------------- passes
def _final_norm(model: VisionLM, x: Tensor) -> Tensor:
    return model.ln_final(x) if hasattr(model, "ln_final") else x


def _keep_hooks(names: list[str], final_name: str, acts: dict, edit=None, saes: dict | None = None) -> list:
    """Forward hooks keeping the MLP activations ``names`` (with grad) and the final residual stream.

    Each activation is kept under the name asked for: a backend may run the hook under another name
    (a ``TransformerBridge`` runs ``blocks.0.mlp.hook_pre`` as its alias ``blocks.0.mlp.gate.hook_out``).
    With ``saes`` (``{name: SAE}``) the kept activation is the SAE's latents, spliced in with the error term.
    """
    def keep(act, hook, name):
        if saes is not None:
            acts[name], act = leaf_latents(saes[name], act)
            return act
        if edit is not None:
            act = edit(act, name)
        elif not act.requires_grad:  # frozen weights: make the activation itself a leaf
            act = act.detach().requires_grad_(True)
        acts[name] = act
        return act

    def keep_final(resid, hook):
        acts[final_name] = resid

    return [(n, partial(keep, name=n)) for n in names] + [(final_name, keep_final)]


def _objective(model: VisionLM, resid: Tensor, probe: Probe, objective: str) -> Float[Tensor, "batch"]:
    """``y_c`` per row from the final residual stream (the unembedding runs only where needed)."""
    tokens = probe.tokens.to(resid.device)
    if objective == "caption_logprob":
        ys = []
        for i, (start, length) in enumerate(probe.caption_spans):
            logits = model.unembed(_final_norm(model, resid[i:i + 1, start - 1:start + length - 1]))[0]
            lp = logits.float().log_softmax(-1)
            ys.append(lp.gather(-1, tokens[i, start:start + length, None]).sum())
        return torch.stack(ys)
    b = torch.arange(len(tokens), device=resid.device)
    logits = model.unembed(_final_norm(model, resid[b, probe.pred_pos.to(resid.device)][:, None]))[:, 0].float()
    if objective == "logprob":
        logits = logits.log_softmax(-1)
    return logits[b, probe.target_ids.to(resid.device)]


def _at_slots(act: Tensor, mask: Tensor) -> Tensor:
    """``[batch, n_image_tokens, d]`` the activation at each row's image slots."""
    return act[mask.to(act.device)].reshape(act.shape[0], -1, act.shape[-1])


def _attribute_probe(model: VisionLM, emb: Tensor, probe: Probe, names: list[str], objective: str, method: str,
                     n_steps: int, baseline: float, saes: dict | None = None) -> tuple[Tensor, Tensor]:
    """Scores ``[batch, layer, patch, unit]`` and ``y`` for a given probe, on bound soft prompts."""
    final_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    tokens, mask = probe.tokens.to(model.cfg.device), probe.image_mask

    def run(hooks_names, edit=None):
        acts = {}
        model.run_with_hooks(tokens, image_embed=emb, return_type=None,
                             fwd_hooks=_keep_hooks(hooks_names, final_name, acts, edit, saes))
        return acts, _objective(model, acts[final_name], probe, objective)

    with torch.enable_grad():
        if method == "grad_x_act":
            acts, y = run(names)
            grads = torch.autograd.grad(y.sum(), [acts[n] for n in names])
            scores = torch.stack([(_at_slots(acts[n], mask) * _at_slots(g, mask)).detach().float().cpu()
                                  for n, g in zip(names, grads)], dim=1)
            return scores, y.detach().float().cpu()
        # integrated gradients, one layer at a time: Z -> b + a (Z - b) at the image slots
        scores = []
        alphas = (torch.arange(n_steps) + 0.5) / n_steps  # midpoint Riemann sum
        for layer_name in names:
            total, diff = 0.0, None
            for a in alphas.tolist():
                def scale(act, name, a=a):
                    nonlocal diff
                    if name != layer_name:
                        return act
                    z = act.detach().clone()
                    m = mask.to(z.device)
                    diff = z[m] - baseline
                    z[m] = baseline + a * diff
                    return z.requires_grad_(True)
                acts, y = run([layer_name], edit=scale)
                (g,) = torch.autograd.grad(y.sum(), [acts[layer_name]])
                total = total + g[mask.to(g.device)].detach()
            scores.append((diff * total / n_steps).float().cpu().reshape(len(probe), -1, diff.shape[-1]))
        with torch.no_grad():
            _, y_clean = run([])
        return torch.stack(scores, dim=1), y_clean.detach().float().cpu()


def _caption_and_attribute(model: VisionLM, emb: Tensor, prompt: str, names: list[str], objective: str,
                           noun_finder, max_new_tokens: int, with_grad: bool, until: str = "noun",
                           saes: dict | None = None) -> tuple[Probe, Tensor | None, Tensor | None]:
    """Greedy captioning with a KV cache, stopping once every row's target is settled; with
    ``with_grad`` the same passes give the attribution (gradients flow back through the cache).
    A model without a KV cache (``model.kv_cache`` is None) runs each step over the whole sequence
    and gives no scores (the caller attributes the probe in one more pass).

    A row's target settles when its first noun is complete (the text goes on past the noun) or at
    end of text; with ``until="caption"`` or for ``caption_logprob``, at end of text (or after
    ``max_new_tokens``). Returns the probe, and the scores and ``y`` (or None without grad).
    """
    whole = objective == "caption_logprob"
    early = not whole and until == "noun"
    prefix = image_prompt_ids(model, prompt)
    b, device = emb.shape[0], model.cfg.device
    tokens = torch.tensor(prefix, device=device).repeat(b, 1)
    final_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    eos = model.tokenizer.eos_token_id
    cache = model.kv_cache(b)  # None: a backend without one runs each step over the whole sequence
    with_grad = with_grad and cache is not None
    acts: dict = {}
    ids: list[list[int]] = [[] for _ in range(b)]
    texts = [""] * b
    done = [False] * b
    with torch.set_grad_enabled(with_grad):
        if cache is None:
            step_logits = [model(tokens, image_embed=emb)[:, -1].float()]
        else:
            model.run_with_hooks(tokens, image_embed=emb, past_kv_cache=cache, attention_mask=torch.ones_like(tokens),
                                 return_type=None, fwd_hooks=_keep_hooks(names, final_name, acts, saes=saes))
            step_logits = [model.unembed(_final_norm(model, acts[final_name][:, -1:]))[:, 0].float()]
        for step in range(max_new_tokens):
            nxt = step_logits[-1].detach().argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t == eos:
                    done[i] = True
                    continue
                ids[i].append(t)
                texts[i] += model.tokenizer.decode([t])
                if early:
                    found = noun_finder(texts[i])
                    done[i] = found is not None and found[1] + len(found[0]) < len(texts[i])
            if all(done) or step == max_new_tokens - 1:
                break
            if cache is None:
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                logits = model(tokens, image_embed=emb)
            else:
                logits = model(nxt[:, None], past_kv_cache=cache, attention_mask=torch.ones_like(nxt[:, None]))
            step_logits.append(logits[:, -1].float())
        probe = probe_from_caption_ids(model, prompt, ids, noun_finder, whole_caption=whole)
        if not with_grad:
            return probe, None, None
        n_prefix = len(prefix)
        ys = []
        for i in range(b):
            if whole:
                lp = torch.stack([step_logits[s][i] for s in range(len(ids[i]))]).log_softmax(-1)
                ys.append(lp.gather(-1, torch.tensor(ids[i], device=lp.device)[:, None]).sum())
                continue
            row = step_logits[int(probe.pred_pos[i]) + 1 - n_prefix][i]
            ys.append((row.log_softmax(-1) if objective == "logprob" else row)[int(probe.target_ids[i])])
        y = torch.stack(ys)
    # a late layer's activations at the image slots may not reach any target (allow_unused): zero scores
    grads = torch.autograd.grad(y.sum(), [acts[n] for n in names], allow_unused=True, materialize_grads=True)
    mask = probe.image_mask[:, :n_prefix]
    scores = torch.stack([(_at_slots(acts[n], mask) * _at_slots(g, mask)).detach().float().cpu()
                          for n, g in zip(names, grads)], dim=1)
    return probe, scores, y.detach().float().cpu()


def attribute(model: VisionLM, images=None, image_features: Float[Tensor, "batch patch d_img"] | None = None, *,
              image_embed: Float[Tensor, "batch patch d_model"] | None = None, probe: Probe | None = None,
              prompt: str = "A picture of", target: str | int | Sequence[str | int] | None = None,
              captions: str | Sequence[str] | None = None, objective: Objective = "logit", hook: str = "pre",
              method: Literal["grad_x_act", "integrated_gradients"] = "grad_x_act", n_steps: int = 20,
              baseline: float = 0.0, max_new_tokens: int = 20,
              noun_finder: Callable[[str], tuple[str, int] | None] = first_noun,
              until: Literal["noun", "caption"] = "noun", multi_token: MultiToken = "error",
              batch_size: int = 8, sae: SAE | Sequence[SAE] | None = None) -> Attribution:
    """Attribute ``y_c`` to every MLP unit at every image position.

    ``grad_x_act``: ``g = Z * dy_c/dZ`` from one forward and one ``torch.autograd.grad`` per batch
    of ``batch_size`` images (gradients of the hooked activations only). Without ``target``,
    ``captions`` or ``probe``, that forward is the greedy captioning itself (KV-cached, stopped as
    soon as every row's first noun is complete); a model without a KV cache (``model.kv_cache(n)``
    is None) or with ``grad_through_kv_cache = False`` (HookedVisionPrefix) captions first and attributes
    the caption in one more forward.
    ``integrated_gradients``: for each layer separately, the unit activations at the image slots
    go from ``baseline`` to ``Z`` (``Z_a = b + a (Z - b)``), and ``g = (Z - b) * mean_a dy_c/dZ_a``
    over ``n_steps`` midpoints ``a = (i + 1/2) / n`` (``n_layers * n_steps`` backward passes); the
    scores of one layer sum to about ``y(Z) - y(b at that layer)``.

    The images are preprocessed and encoded once; every pass reuses their soft prompts.

    Args:
        model: A vision LM (:class:`~tl_multimodal.models.protocol.VisionLM`).
        images, image_features, image_embed: The images, their encoder features, or their soft
            prompts (``model.embed_images``): exactly one.
        probe: A :class:`~tl_multimodal.analysis.probe.Probe` (e.g. another attribution's ``attr.probe``):
            its tokens and targets are used (``prompt`` is then ignored).
        prompt: Text after the image tokens (the paper: "A picture of").
        target: ``None``: the first noun of each caption (first sub-token). Otherwise a string or
            token id per image or for all, predicted right after ``prompt`` (see
            :func:`~tl_multimodal.analysis.probe.target_id`).
        captions: Captions to use instead of generating greedy ones.
        objective: ``"logit"`` (default, as the paper) or ``"logprob"`` of the target; or
            ``"caption_logprob"``: the total log-prob of the caption given image and prompt.
        hook: ``"pre"`` (``mlp.hook_pre``: pre-activation; the *gate* pre-activation of a gated
            MLP), ``"post"`` or ``"pre_linear"`` (gated MLPs' linear branch); see
            :func:`~tl_multimodal.analysis.units.mlp_hook`.
        method: ``"grad_x_act"`` or ``"integrated_gradients"``.
        n_steps: Riemann steps for integrated gradients.
        baseline: Activation value integrated from (integrated gradients).
        max_new_tokens: Most caption tokens generated per image.
        noun_finder: ``text -> (word, char offset) | None``; default :func:`first_noun`.
        until: When generating: stop once each row's first noun is complete (``"noun"``, fast), or
            generate the whole caption (``"caption"``: end of text or ``max_new_tokens``) and take the
            first noun of it (a noun finder may change its mind on later words).
        multi_token: A string target of several tokens: ``"error"`` or ``"first"`` (first sub-token).
        batch_size: Images per forward/backward pass.
        sae: An SAE (:func:`~tl_multimodal.sae.load.load_sae`) or a list of them (one per hook, all of one
            ``d_sae``): their latents are the units instead of the MLP's (``hook`` is then not used).
            Each SAE is spliced in at its hook with its error term (the output is unchanged) and a
            latent's score is ``f * dy_c/df`` (``grad_x_act`` only).

    Returns:
        An :class:`Attribution`; ``scores`` is ``[batch, n_layers, n_image_tokens, d_mlp]``
        (with ``sae``: ``[batch, n_saes, n_image_tokens, d_sae]``); ``attr.probe`` is the query.
    """
    saes = None if sae is None else saes_by_hook(model, sae)
    if saes is not None and method != "grad_x_act":
        raise ValueError("sae= attributes latents with method='grad_x_act' only")
    short = "sae" if saes is not None else mlp_hook(model, hook)
    if objective not in ("logit", "logprob", "caption_logprob"):
        raise ValueError(f"objective must be 'logit', 'logprob' or 'caption_logprob', got {objective!r}")
    if method not in ("grad_x_act", "integrated_gradients"):
        raise ValueError(f"method must be 'grad_x_act' or 'integrated_gradients', got {method!r}")
    check_ints(n_steps=n_steps, batch_size=batch_size, max_new_tokens=max_new_tokens)
    if until not in ("noun", "caption"):
        raise ValueError(f"until must be 'noun' or 'caption', got {until!r}")
    if sum(x is not None for x in (probe, target, captions)) > 1:
        raise ValueError("pass at most one of probe=, target= and captions=")
    if objective == "caption_logprob" and target is not None:
        raise ValueError("objective='caption_logprob' attributes the caption; leave target=None")
    emb = soft_prompts(model, images, image_features, image_embed)
    n = emb.shape[0]
    if model.training:
        warnings.warn("the model is in train mode (projection dropout is active); call model.eval()")
    if probe is not None:
        probe.check_batch(n)
        probe.check_model(model)
        if objective == "caption_logprob" and probe.caption_spans is None:
            raise ValueError("objective='caption_logprob' needs a probe made with whole_caption=True")
    elif target is not None:
        probe = make_probe(model, n, target, prompt, multi_token=multi_token)
    elif captions is not None:
        probe = make_probe(model, n, prompt=prompt, captions=captions, noun_finder=noun_finder,
                           whole_caption=objective == "caption_logprob")
    names, _ = unit_axis(model, short, saes)
    parts = []
    for start in range(0, n, batch_size):
        chunk = emb[start:start + batch_size]
        scores = None
        if probe is None:
            fused = method == "grad_x_act" and model.grad_through_kv_cache
            with torch.set_grad_enabled(fused):
                part, scores, y = _caption_and_attribute(model, chunk, prompt, names if fused else [], objective,
                                                         noun_finder, max_new_tokens, with_grad=fused, until=until,
                                                         saes=saes)
        else:
            part = probe[start:start + batch_size]
        if scores is None:
            scores, y = _attribute_probe(model, chunk, part, names, objective, method, n_steps, baseline, saes)
        if not torch.isfinite(scores).all():
            raise ValueError("attribution scores contain NaN or infinite values (check the model's "
                             "weights and the inputs)")
        parts.append((scores, y, part))
    return Attribution(scores=torch.cat([p[0] for p in parts]), probe=probe if probe is not None else
                       Probe.concat([p[2] for p in parts]), hook=short, objective=objective, method=method,
                       y=torch.cat([p[1] for p in parts]), grid=tuple(model.vision.grid),
                       saes=None if saes is None else list(saes.values()))


@dataclass(repr=False)
class DatasetAttribution:
    """The attribution of a whole dataset, kept small: each image's top units and the query.

    Attributes:
        top_units: Each image's top ``n_units`` units (images numbered across the dataset).
        probe: The queries of all images (captions, targets, positions), for ablation and patching.
    """

    top_units: TopUnits
    probe: Probe

    @property
    def captions(self) -> list[str] | None:
        """The captions (generated or given), or None."""
        return self.probe.captions

    @property
    def targets(self) -> list[str]:
        """The target token of each image."""
        return self.probe.targets

    def __len__(self) -> int:
        return len(self.probe)

    def __repr__(self) -> str:
        return f"DatasetAttribution({len(self)} images x top {self.top_units.n_units}, targets={self.targets[:4]}...)"


def attribute_dataset(model: VisionLM, batches: Iterable, n_units: int = 100, features: bool = False,
                      on_batch: Callable[[int, int], None] | None = None, over_patches: OverPatches = "max",
                      normalize: Normalize = None, **kwargs) -> DatasetAttribution:
    """Attribute every image of a dataset, keeping each image's top ``n_units`` units and its probe.

    Args:
        model: A vision LM.
        batches: An iterable of image batches (pixel tensors or lists of PIL images), or of
            ``image_features`` tensors when ``features=True``. A tensor is split by ``batch_size``.
        n_units: Units kept per image.
        features: The batches are precomputed encoder features.
        on_batch: Called with (first image index, images in the batch) after each batch (progress).
        over_patches, normalize: How units are ranked (:meth:`Attribution.unit_scores`).
        **kwargs: Passed to :func:`attribute` (``target`` and ``captions`` are per batch, so pass
            them only if they apply to every image).

    Returns:
        A :class:`DatasetAttribution` (top units and probes of all images).
    """
    key = "image_features" if features else "images"
    if isinstance(batches, Tensor):
        batches = batches.split(kwargs.get("batch_size", 8))
    tops, probes, start = [], [], 0
    for b in batches:
        attr = attribute(model, **{key: b}, **kwargs)
        tops.append(attr.top_units(n_units, over_patches=over_patches, normalize=normalize))
        probes.append(attr.probe)
        if on_batch is not None:
            on_batch(start, len(attr))
        start += len(attr)
    if not tops:
        raise ValueError("the dataset is empty")
    return DatasetAttribution(TopUnits.concat(tops), Probe.concat(probes))
