"""Attribution of a caption token to every MLP unit at every image position (Schwettmann et al., 2023).

``g[layer, patch, unit] = Z * dy_c / dZ`` with ``Z`` the unit's pre-activation
(``blocks.{l}.mlp.hook_pre``) at an image position and ``y_c`` the logit of the target token ``c``
at the position that predicts it. All layers, patches and units come from ONE forward with
TransformerLens hooks that keep the activations and ONE ``torch.autograd.grad`` per batch (gradients
of the activations only; no parameter ``.grad`` is touched).

By default ``c`` is the first sub-token of the first noun of the model's own greedy caption, found
offline by :func:`first_noun` (a lexicon heuristic, see there); the sequence is
``[image slots][prompt][caption up to the noun]``.

    attr = attribute(model, pixels)            # Attribution, scores [batch, layer, patch, unit]
    attr.top_units(k=100).to_dataframe()        # image, layer, unit, patch, score
    tops = attribute_dataset(model, loader)     # top units of every image of a dataset
    tops.unit_counts()
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_multimodal.decoding import load_word_list

Objective = Literal["logit", "logprob", "caption_logprob"]
_HOOKS = {"pre": "hook_pre", "post": "hook_post", "pre_linear": "hook_pre_linear"}

# Closed-class words (and a few caption fillers) that the lexicon also lists as nouns.
_NOT_NOUNS = frozenset("""
a an the this that these those there here it its it's he him his she her hers they them their theirs
we us our ours you your yours i me my mine one ones some any each every other another such both
either neither all none no not much many more most few several lot lots of in on at to for from by
with without into onto over under above below near between behind through and or but nor so yet if
then than as is are was were be been being am has have had do does did can could will would shall
should may might must up down out off about what which who whom whose when where why how very
just also only something someone anything nothing everything image picture photo photograph view
two three four five six seven eight nine ten
""".split())
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def first_noun(text: str) -> tuple[str, int] | None:
    """The first noun of ``text`` and its character offset, found offline with the shipped lexicon.

    A heuristic, not a tagger (no offline tagger ships in a wheel): a word is a *candidate* if the
    lexicon says it can be a noun and it is not a closed-class word (pronouns, determiners, numbers,
    prepositions, ...; also "image"/"picture"/"photo", which captions use as fillers). The first
    candidate that cannot also be an adjective wins ("a red car" -> "car", "a young woman" ->
    "woman"); if every candidate can be an adjective, the first candidate. ``None`` if there is no
    candidate.
    """
    lex = load_word_list()
    candidates = []
    for m in _WORD.finditer(text):
        w = m.group().lower()
        if w in _NOT_NOUNS or len(w) < 2 or "NOUN" not in lex.get(w, ()):
            continue
        if "ADJ" not in lex[w]:
            return m.group(), m.start()
        candidates.append((m.group(), m.start()))
    return candidates[0] if candidates else None


# ---------------------------------------------------------------------------- results
@dataclass
class TopUnits:
    """The top-``k`` units of each image (small, long format).

    A unit's score on an image is its largest attribution over the image's patches (signed: a unit
    that raises ``y_c`` scores high); ``patch`` is where that maximum is.

    Attributes:
        image, layer, unit, patch: ``[n]`` index tensors (``image`` counts across a dataset).
        score: ``[n]`` the unit's max-over-patches attribution.
        rank: ``[n]`` rank of the unit within its image (0 = best).
        target: The target string of each row's image.
        k: Units kept per image.
        hook: The hook the scores are for.
    """

    image: Int[Tensor, "n"]
    layer: Int[Tensor, "n"]
    unit: Int[Tensor, "n"]
    patch: Int[Tensor, "n"]
    score: Float[Tensor, "n"]
    rank: Int[Tensor, "n"]
    target: list[str]
    k: int
    hook: str

    def __len__(self) -> int:
        return len(self.image)

    def __repr__(self) -> str:
        n_img = len(self.image.unique()) if len(self) else 0
        best = ", ".join(f"L{l}.{u}@{p}" for l, u, p in zip(self.layer[:3].tolist(), self.unit[:3].tolist(),
                                                          self.patch[:3].tolist()))
        return f"TopUnits({n_img} images x top {self.k}, hook={self.hook!r}; image 0: {best} ...)"

    def to_dataframe(self):
        """Columns image, rank, layer, unit, patch, score, target."""
        import pandas as pd

        return pd.DataFrame({"image": self.image.numpy(), "rank": self.rank.numpy(),
                             "layer": self.layer.numpy(), "unit": self.unit.numpy(),
                             "patch": self.patch.numpy(), "score": self.score.numpy(),
                             "target": self.target})

    def units(self) -> Int[Tensor, "n 2"]:
        """``[n, 2]`` (layer, unit) pairs, ready for :func:`~tl_multimodal.decoding.decode_units`."""
        return torch.stack([self.layer, self.unit], dim=1)

    def unit_counts(self):
        """How often each (layer, unit) is among an image's top ``k``: a DataFrame with layer, unit,
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
            out.append(p.image + offset)
            offset += int(p.image.max()) + 1 if len(p) else 0
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return TopUnits(torch.cat(out), cat("layer"), cat("unit"), cat("patch"), cat("score"), cat("rank"),
                        [t for p in parts for t in p.target], parts[0].k, parts[0].hook)


@dataclass
class Attribution:
    """Attribution scores of every MLP unit at every image position, for one target per image.

    Attributes:
        scores: ``[batch, layer, patch, unit]`` float32 on CPU: ``Z * dy/dZ`` (or integrated
            gradients), ``Z`` the activation at ``hook``.
        target_ids: ``[batch]`` the target token of each image (-1 for ``caption_logprob``).
        targets: The target strings (the token; or the whole caption for ``caption_logprob``).
        hook: The hook name pattern, e.g. ``"blocks.{layer}.mlp.hook_pre"``.
        objective: ``"logit"``, ``"logprob"`` or ``"caption_logprob"``.
        method: ``"grad_x_act"`` or ``"integrated_gradients"``.
        y: ``[batch]`` the value of ``y_c``.
        captions: The captions used (generated or given), or None.
        positions: ``[batch]`` the position whose prediction is ``y_c`` (-1 for ``caption_logprob``).
        grid: ``(rows, cols)`` of the patch grid, for heatmaps.
    """

    scores: Float[Tensor, "batch layer patch unit"]
    target_ids: Int[Tensor, "batch"]
    targets: list[str]
    hook: str
    objective: str
    method: str
    y: Float[Tensor, "batch"]
    captions: list[str] | None = None
    positions: Int[Tensor, "batch"] | None = None
    grid: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        b, l, p, u = self.scores.shape
        return (f"Attribution({b} images x {l} layers x {p} patches x {u} units, hook={self.hook!r}, "
                f"{self.objective}/{self.method}, targets={self.targets[:4]}{'...' if b > 4 else ''})")

    def __len__(self) -> int:
        return self.scores.shape[0]

    def unit_scores(self) -> tuple[Float[Tensor, "batch layer unit"], Int[Tensor, "batch layer unit"]]:
        """Each unit's max attribution over patches, and the patch where it is reached."""
        return self.scores.max(dim=2)

    def top_units(self, k: int = 100, image: int | None = None) -> TopUnits:
        """The ``k`` units with the highest max-over-patches score, per image (or for one ``image``).

        Units are ranked per image by ``max_patch g[layer, patch, unit]`` (signed, so units that
        raise ``y_c`` come first; the paper keeps the top 100 per image).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        imgs = range(len(self)) if image is None else [image]
        if image is not None and not -len(self) <= image < len(self):
            raise ValueError(f"image {image} out of range for {len(self)} images")
        best, where = self.unit_scores()
        n_layer, n_unit = best.shape[1:]
        k = min(k, n_layer * n_unit)
        rows = {n: [] for n in ("image", "layer", "unit", "patch", "score", "rank")}
        targets = []
        for i in imgs:
            s, idx = best[i].flatten().topk(k)
            layer, unit = idx // n_unit, idx % n_unit
            rows["image"].append(torch.full((k,), i % len(self)))
            rows["layer"].append(layer)
            rows["unit"].append(unit)
            rows["patch"].append(where[i, layer, unit])
            rows["score"].append(s)
            rows["rank"].append(torch.arange(k))
            targets += [self.targets[i]] * k
        return TopUnits(**{n: torch.cat(v) for n, v in rows.items()}, target=targets, k=k, hook=self.hook)

    def heatmap(self, image: int, layer: int, unit: int) -> Float[Tensor, "rows cols"]:
        """One unit's scores over the patch grid of one image."""
        if self.grid is None:
            raise ValueError("this Attribution has no patch grid")
        return self.scores[image, layer, :, unit].reshape(self.grid)

    def to_dataframe(self, k: int | None = 100):
        """``top_units(k).to_dataframe()``; ``k=None`` gives every score in long format (image,
        layer, patch, unit, score: large)."""
        if k is not None:
            return self.top_units(k).to_dataframe()
        import pandas as pd

        b, l, p, u = self.scores.shape
        idx = torch.cartesian_prod(torch.arange(b), torch.arange(l), torch.arange(p), torch.arange(u))
        return pd.DataFrame({"image": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(), "patch": idx[:, 2].numpy(),
                             "unit": idx[:, 3].numpy(), "score": self.scores.flatten().numpy()})


# ---------------------------------------------------------------------------- inputs
def _hook_suffix(model, hook: str) -> str:
    name = _HOOKS.get(hook, hook.split(".")[-1] if hook.startswith(("mlp.", "hook_")) else None)
    if name not in _HOOKS.values():
        raise ValueError(f"unknown hook {hook!r}; use one of {sorted(_HOOKS)} (or 'mlp.hook_pre', ...)")
    if model.cfg.attn_only:
        raise ValueError("the model is attention-only: it has no MLP units")
    if f"blocks.0.mlp.{name}" not in model.hook_dict:
        raise ValueError(f"this model's MLPs have no {name} (hook_pre_linear exists only for gated MLPs)")
    return name


def _batch_inputs(model, images, image_features) -> tuple[dict, int]:
    if (images is None) == (image_features is None):
        raise ValueError("pass exactly one of images= and image_features=")
    if not hasattr(model, "embed_images"):
        raise ValueError("attribution needs a HookedVisionPrefix (images are read as soft prompts)")
    if images is not None:
        if not isinstance(images, Tensor):
            images = model.preprocess(images)
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty [batch, channel, height, width] tensor, "
                             f"got shape {tuple(images.shape)}")
        return {"images": images}, images.shape[0]
    if image_features.ndim != 3 or image_features.shape[0] == 0:
        raise ValueError(f"image_features must be a non-empty [batch, patch, d_img] tensor, "
                         f"got shape {tuple(image_features.shape)}")
    return {"image_features": image_features}, image_features.shape[0]


def _per_image(x, n: int, what: str) -> list:
    if isinstance(x, (str, int)) or (isinstance(x, Tensor) and x.ndim == 0):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"{len(x)} {what} for {n} images")
    return x


def _text_ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _generate_captions(model, prompt: str, inputs: dict, max_new_tokens: int) -> list[list[int]]:
    n_prefix = model.to_tokens(prompt, image=True).shape[1]
    out = model.generate(prompt, max_new_tokens, **inputs, do_sample=False, return_type="tokens",
                         verbose=False, stop_at_eos=True)
    eos = model.tokenizer.eos_token_id
    caps = []
    for row in out[:, n_prefix:].tolist():
        caps.append(row[:row.index(eos)] if eos in row else row)
    return caps


def _noun_token(model, caption_ids: list[int], noun_finder, i: int) -> tuple[int, str]:
    """Index in the caption of the token where the first noun starts, and the noun."""
    pieces = [model.tokenizer.decode([t]) for t in caption_ids]
    text = "".join(pieces)
    if not text.strip():
        raise ValueError(f"the caption of image {i} is empty; pass target= or captions=")
    found = noun_finder(text)
    if found is None:
        m = _WORD.search(text)
        if m is None:
            raise ValueError(f"the caption of image {i} ({text!r}) has no word to attribute; pass target=")
        warnings.warn(f"no noun in the caption of image {i} ({text!r}); using its first word {m.group()!r}")
        found = (m.group(), m.start())
    word, start = found
    end = 0
    for j, piece in enumerate(pieces):
        end += len(piece)
        if start < end:
            return j, word
    raise ValueError(f"noun {word!r} at offset {start} is outside the caption {text!r}")


def _check_tokens(model, ids: Sequence[int], what: str) -> None:
    if any(not 0 <= t < model.cfg.d_vocab for t in ids):
        raise ValueError(f"{what} holds token ids outside the vocabulary [0, {model.cfg.d_vocab})")


def _build_rows(model, prompt, n, target, captions, objective, noun_finder, inputs, max_new_tokens):
    """Token rows (image slots + prompt + ...), the target id and position per row, strings."""
    prefix = model.to_tokens(prompt, image=True, move_to_device=False)[0].tolist()
    sep = "" if not prompt or prompt[-1].isspace() else " "
    if objective == "caption_logprob" and target is not None:
        raise ValueError("objective='caption_logprob' attributes the caption; leave target=None")
    if target is None and captions is None:
        caps = _generate_captions(model, prompt, inputs, max_new_tokens)
        cap_text = [model.tokenizer.decode(c) for c in caps]
    elif target is None:
        cap_text = _per_image(captions, n, "captions")
        if any(not isinstance(c, str) for c in cap_text):
            raise ValueError("captions must be strings")
        caps = [_text_ids(model, sep + c.lstrip() if c.strip() else c) for c in cap_text]
    else:
        caps, cap_text = None, None
    rows, tids, pos, strs, masks = [], [], [], [], []
    for i in range(n):
        if caps is not None:
            if not caps[i]:
                raise ValueError(f"the caption of image {i} is empty; pass target= or another caption")
            _check_tokens(model, caps[i], f"caption {i}")
            if objective == "caption_logprob":
                rows.append(prefix + caps[i])
                tids.append(-1)
                pos.append(-1)
                strs.append(cap_text[i])
                masks.append((len(prefix), len(caps[i])))
                continue
            j, word = _noun_token(model, caps[i], noun_finder, i)
            rows.append(prefix + caps[i][:j])
            tid = caps[i][j]
        else:
            t = _per_image(target, n, "targets")[i]
            if isinstance(t, str):
                if not t.strip():
                    raise ValueError(f"target of image {i} is an empty string")
                ids = _text_ids(model, sep + t if not t[0].isspace() else t)
                if not ids:
                    raise ValueError(f"target {t!r} has no tokens")
                tid = ids[0]
            else:
                tid = int(t)
                _check_tokens(model, [tid], f"target of image {i}")
            rows.append(list(prefix))
        if len(rows[-1]) == 0:
            raise ValueError("nothing precedes the target")
        tids.append(tid)
        pos.append(len(rows[-1]) - 1)
        strs.append(model.tokenizer.decode([tid]))
    width = max(len(r) for r in rows)
    if width > model.cfg.n_ctx:
        raise ValueError(f"sequence of {width} positions is longer than n_ctx={model.cfg.n_ctx}")
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.cfg.device)  # right-padded
    return tokens, torch.tensor(tids), torch.tensor(pos), strs, cap_text, masks


def _final_norm(model, x: Tensor) -> Tensor:
    return model.ln_final(x) if hasattr(model, "ln_final") else x


def _objective(model, resid, tokens, tids, pos, masks, objective) -> Float[Tensor, "batch"]:
    """``y_c`` per row from the final residual stream (the unembedding runs only where needed)."""
    b = torch.arange(len(tokens), device=resid.device)
    if objective == "caption_logprob":
        ys = []
        for i, (start, length) in enumerate(masks):
            logits = model.unembed(_final_norm(model, resid[i:i + 1, start - 1:start + length - 1]))[0]
            lp = logits.float().log_softmax(-1)
            ys.append(lp.gather(-1, tokens[i, start:start + length, None]).sum())
        return torch.stack(ys)
    logits = model.unembed(_final_norm(model, resid[b, pos.to(resid.device)][:, None]))[:, 0].float()
    if objective == "logprob":
        logits = logits.log_softmax(-1)
    return logits[b, tids.to(resid.device)]


def _run(model, tokens, inputs, names, final_name, edit=None):
    """One forward keeping the hooked activations (with grad) and the final residual stream."""
    acts = {}

    def keep(act, hook):
        if edit is not None:
            act = edit(act, hook)
        elif not act.requires_grad:  # frozen weights: make the activation itself a leaf
            act = act.detach().requires_grad_(True)
        acts[hook.name] = act
        return act

    def keep_final(resid, hook):
        acts[final_name] = resid

    wanted = set(names)
    model.run_with_hooks(tokens, **inputs, return_type=None,
                         fwd_hooks=[(lambda n: n in wanted, keep), (final_name, keep_final)])
    return acts


def _attribute_batch(model, tokens, tids, pos, masks, inputs, suffix, objective, method, n_steps, baseline):
    L = model.cfg.n_layers
    img = model.image_positions
    names = [f"blocks.{l}.mlp.{suffix}" for l in range(L)]
    final_name = f"blocks.{L - 1}.hook_resid_post"
    with torch.enable_grad():
        if method == "grad_x_act":
            acts = _run(model, tokens, inputs, names, final_name)
            y = _objective(model, acts[final_name], tokens, tids, pos, masks, objective)
            grads = torch.autograd.grad(y.sum(), [acts[n] for n in names])
            scores = torch.stack([(acts[n][:, img] * g[:, img]).detach().float().cpu()
                                  for n, g in zip(names, grads)], dim=1)
            return scores, y.detach().float().cpu()
        # integrated gradients, one layer at a time: Z -> b + a (Z - b) at the image positions
        scores, y_clean = [], None
        alphas = (torch.arange(n_steps) + 0.5) / n_steps  # midpoint Riemann sum
        for layer_name in names:
            total, diff = 0.0, None
            for a in alphas.tolist():
                def scale(act, hook, a=a):
                    nonlocal diff
                    if hook.name != layer_name:
                        return act
                    z = act.detach().clone()
                    diff = z[:, img] - baseline
                    z[:, img] = baseline + a * diff
                    return z.requires_grad_(True)
                acts = _run(model, tokens, inputs, [layer_name], final_name, edit=scale)
                y = _objective(model, acts[final_name], tokens, tids, pos, masks, objective)
                (g,) = torch.autograd.grad(y.sum(), [acts[layer_name]])
                total = total + g[:, img].detach()
            scores.append((diff * total / n_steps).float().cpu())
        if y_clean is None:
            acts = _run(model, tokens, inputs, [], final_name)
            y_clean = _objective(model, acts[final_name], tokens, tids, pos, masks, objective)
        return torch.stack(scores, dim=1), y_clean.detach().float().cpu()


def attribute(model, images=None, image_features=None, *, prompt: str = "A picture of",
              target: str | int | Sequence[str | int] | None = None, captions: str | Sequence[str] | None = None,
              objective: Objective = "logit", hook: str = "pre",
              method: Literal["grad_x_act", "integrated_gradients"] = "grad_x_act", n_steps: int = 20,
              baseline: float = 0.0, max_new_tokens: int = 20,
              noun_finder: Callable[[str], tuple[str, int] | None] = first_noun,
              batch_size: int = 8) -> Attribution:
    """Attribute ``y_c`` to every MLP unit at every image position.

    ``grad_x_act``: ``g = Z * dy_c/dZ`` from one forward and one ``torch.autograd.grad`` per batch
    of ``batch_size`` images (gradients of the hooked activations only).
    ``integrated_gradients``: for each layer separately, the unit activations at the image positions
    go from ``baseline`` to ``Z`` (``Z_a = b + a (Z - b)``), and ``g = (Z - b) * mean_a dy_c/dZ_a``
    over ``n_steps`` midpoints ``a = (i + 1/2) / n`` (``n_layers * n_steps`` backward passes); the
    scores of one layer sum to about ``y(Z) - y(b at that layer)``.

    Args:
        model: A :class:`~tl_multimodal.HookedVisionPrefix`.
        images, image_features: As for the model's forward (exactly one).
        prompt: Text after the image tokens (the paper: "A picture of").
        target: ``None``: the first noun of each caption (first sub-token). Otherwise a word (or
            token id) per image or for all, predicted right after ``prompt``; a word not starting
            with a space gets one when it follows the prompt, and only its first sub-token counts.
        captions: Captions to use instead of generating greedy ones (``max_new_tokens`` of them).
        objective: ``"logit"`` (default, as the paper) or ``"logprob"`` of the target; or
            ``"caption_logprob"``: the total log-prob of the caption given image and prompt.
        hook: ``"pre"`` (``mlp.hook_pre``: pre-activation; the *gate* pre-activation of a gated
            MLP), ``"post"`` (``mlp.hook_post``) or ``"pre_linear"`` (gated MLPs' linear branch).
        method: ``"grad_x_act"`` or ``"integrated_gradients"``.
        n_steps: Riemann steps for integrated gradients.
        baseline: Activation value integrated from (integrated gradients).
        max_new_tokens: Length of the generated captions.
        noun_finder: ``text -> (word, char offset) | None``; default :func:`first_noun`.
        batch_size: Images per forward/backward pass.

    Returns:
        An :class:`Attribution`; ``scores`` is ``[batch, n_layers, n_image_tokens, d_mlp]``.
    """
    suffix = _hook_suffix(model, hook)
    if objective not in ("logit", "logprob", "caption_logprob"):
        raise ValueError(f"objective must be 'logit', 'logprob' or 'caption_logprob', got {objective!r}")
    if method not in ("grad_x_act", "integrated_gradients"):
        raise ValueError(f"method must be 'grad_x_act' or 'integrated_gradients', got {method!r}")
    if n_steps < 1 or batch_size < 1:
        raise ValueError("n_steps and batch_size must be >= 1")
    inputs, n = _batch_inputs(model, images, image_features)
    if model.training:
        warnings.warn("the model is in train mode (projection dropout is active); call model.eval()")
    targets = _per_image(target, n, "targets") if target is not None else None
    caps = _per_image(captions, n, "captions") if captions is not None else None
    parts = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        chunk = {k: v[sl] for k, v in inputs.items()}
        tokens, tids, pos, strs, cap_text, masks = _build_rows(
            model, prompt, len(next(iter(chunk.values()))), targets[sl] if targets else None,
            caps[sl] if caps else None, objective, noun_finder, chunk, max_new_tokens)
        scores, y = _attribute_batch(model, tokens, tids, pos, masks, chunk, suffix, objective, method,
                                     n_steps, baseline)
        if not torch.isfinite(scores).all():
            raise ValueError("attribution scores contain NaN or infinite values (check the model's "
                             "weights and the inputs)")
        parts.append((scores, tids, strs, y, cap_text, pos))
    return Attribution(
        scores=torch.cat([p[0] for p in parts]), target_ids=torch.cat([p[1] for p in parts]),
        targets=[s for p in parts for s in p[2]], hook=f"blocks.{{layer}}.mlp.{suffix}", objective=objective,
        method=method, y=torch.cat([p[3] for p in parts]),
        captions=None if parts[0][4] is None else [c for p in parts for c in p[4]],
        positions=torch.cat([p[5] for p in parts]), grid=tuple(model.vision.grid))


def top_units_over(attributions: Iterable[Attribution], k: int = 100) -> TopUnits:
    """Top ``k`` units of every image of several :class:`Attribution` results, images renumbered."""
    parts = [a.top_units(k) for a in attributions]
    return TopUnits.concat(parts)


def attribute_dataset(model, batches: Iterable, k: int = 100, features: bool = False, **kwargs) -> TopUnits:
    """Attribute every image of a dataset, keeping only each image's top ``k`` units.

    Args:
        model: A :class:`~tl_multimodal.HookedVisionPrefix`.
        batches: An iterable of image batches (pixel tensors or lists of PIL images), or of
            ``image_features`` tensors when ``features=True``. A tensor is split by ``batch_size``.
        k: Units kept per image.
        features: The batches are precomputed encoder features.
        **kwargs: Passed to :func:`attribute` (``target`` and ``captions`` are per batch, so pass
            them only if they apply to every image).

    Returns:
        One :class:`TopUnits` over the whole dataset.
    """
    key = "image_features" if features else "images"
    if isinstance(batches, Tensor):
        batches = batches.split(kwargs.get("batch_size", 8))
    parts = [attribute(model, **{key: b}, **kwargs).top_units(k) for b in batches]
    if not parts:
        raise ValueError("the dataset is empty")
    return TopUnits.concat(parts)
