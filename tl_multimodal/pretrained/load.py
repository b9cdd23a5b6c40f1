"""One door to every model: :func:`load` turns a spec (a name, a HF model, a factory) into a vision LM.

    model = tl_multimodal.load("offline")                                   # SmolLM2 + EfficientNet-Lite0
    model = tl_multimodal.load("limber:beit_linear", projection="limber_weights/beit_linear/proj.ckpt")
    model = tl_multimodal.load("gpt2", encoder="microsoft/beit-large-patch16-224-pt22k", projection="p.pt")
    model = tl_multimodal.load("llava-hf/llava-1.5-7b-hf", dtype=torch.float16)
    model = tl_multimodal.load("my_models.py:build")                        # a factory function

The implementations stay in :mod:`tl_multimodal.pretrained.offline`, :mod:`~tl_multimodal.pretrained.limber`
and :mod:`~tl_multimodal.pretrained.llava` and the model classes' constructors; this module only picks one.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
from pathlib import Path

from tl_multimodal._compat import HAS_HOOKED_TRANSFORMER, HookedTransformer
from tl_multimodal.pretrained.vlms import is_vlm_model, is_vlm_name

BACKENDS = ("auto", "hooked", "bridge")
SPECS = ("'offline'", "'limber:<config>'", "an LM hub name with encoder=", "a LLaVA hub name (containing 'llava')",
         "a LLaVA-NeXT/OneVision, Qwen2.5-VL, Gemma 3 or SmolVLM/Idefics3 hub name",
         "'module:function'", "'path/to/file.py:function'", "a LlavaForConditionalGeneration",
         "a HF LLaVA-NeXT/OneVision, Qwen2.5-VL, Gemma 3 or Idefics3 model with processor= or tokenizer=",
         "a HF causal LM with tokenizer= and encoder=", "a built HookedVisionPrefix or VisionBridge")


def load(spec, *, backend: str = "auto", projection=None, device=None, dtype=None, encoder=None, tokenizer=None,
         **kwargs):
    """Load a vision LM (images as soft-prompt tokens of a TransformerLens LM), ready in eval mode.

    Args:
        spec: What to load:

            * ``"offline"``: SmolLM2-135M + EfficientNet-Lite0 from pip packages (no internet) with the
              shipped trained projection.
            * ``"limber:<config>"`` (a key of ``LIMBER_CONFIGS``, e.g. ``"limber:beit_linear"``):
              GPT-J-6B + LiMBeR's encoder + LiMBeR's ``proj.ckpt`` given as ``projection=`` (hub).
            * An LM hub name with ``encoder=`` (a HF or timm vision model name), e.g. ``"gpt2"``.
            * A LLaVA hub name (containing ``"llava"``, any case), e.g. ``"llava-hf/llava-1.5-7b-hf"``.
            * A LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Gemma 3 or SmolVLM/Idefics3 hub name (e.g.
              ``"llava-hf/llava-onevision-qwen2-0.5b-ov-hf"``; :data:`~tl_multimodal.pretrained.vlms.HUB_NAME_MARKS`),
              or such a HF model in memory with ``processor=`` (or ``tokenizer=``): a
              :class:`~tl_multimodal.VLMBridge` (bridge only) taking the processor's batch as it is.
            * ``"module:function"`` or ``"path/to/file.py:function"``: a factory, called with
              ``**kwargs``, that returns a vision LM.
            * A HF ``LlavaForConditionalGeneration`` (in memory).
            * A HF causal LM (``PreTrainedModel``, in memory) with ``tokenizer=`` and ``encoder=``: a
              VisionBridge (``backend="auto"`` picks the bridge for it).
            * A built HookedVisionPrefix or VisionBridge: returned as it is (moved, if asked).
        backend: ``"hooked"`` (HookedVisionPrefix on ``HookedTransformer``, TransformerLens 3),
            ``"bridge"`` (VisionBridge on ``TransformerBridge``), or ``"auto"``: ``"hooked"`` where the
            installed TransformerLens has ``HookedTransformer``, else ``"bridge"``.
        projection: A projection checkpoint path. ``None``: the shipped projection for ``"offline"``,
            LiMBeR's must be given, LLaVA's own projector, a factory's or a built model's own, and an
            untrained one (with a warning) for an LM hub name or an in-memory causal LM. ``False``:
            an untrained projection on purpose (``"offline"``, LM hub name, in-memory causal LM). A
            path given to a model that has its projection replaces it (``load_projection``).
        device: Where to put the model at the end (``None``: where it was built; cpu for ``"offline"``).
        dtype: The model's dtype at the end (``None``: as built; LiMBeR: float16). A hub model also loads
            in it (passed to its loader as ``dtype=``).
        encoder: The vision encoder of an LM hub name or an in-memory causal LM: a HF or timm model
            name, or (in-memory causal LM) a :class:`~tl_multimodal.VisionEncoder`.
        tokenizer: The tokenizer of an in-memory HF model (LLaVA: optional on the hooked backend, for
            token ids only; the bridge needs it).
        **kwargs: Passed on: to the LM loader (``HookedTransformer.from_pretrained`` /
            ``TransformerBridge.boot_transformers``; ``lm_name=`` for LiMBeR), to
            ``LlavaForConditionalGeneration.from_pretrained`` (and ``image_processor=``), to a factory,
            ``model_name=`` for an in-memory causal LM, ``cache=`` for ``"offline"``.

    Returns:
        A :class:`~tl_multimodal.HookedVisionPrefix` or :class:`~tl_multimodal.VisionBridge` in eval mode.

    Raises:
        ValueError: An unknown spec string, backend or LiMBeR config; an argument this spec does not take.
        TypeError: A spec of another type, or a factory that does not return a vision LM.
        ImportError: ``backend="hooked"`` on TransformerLens 4.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    kind = spec_kind(spec, encoder=encoder)
    chosen = resolve_backend(backend, kind)
    if dtype is not None and (kind in ("limber", "lm", "llava") or kind == "vlm" and isinstance(spec, str)):
        kwargs.setdefault("dtype", dtype)  # a hub LM loads in it at once (not float32 first)
    if kind == "model":
        _check_backend(spec, spec, backend)  # before its projection is replaced
    model = _BUILDERS[kind](spec, chosen, projection, encoder, tokenizer, kwargs)
    _check_backend(model, spec, backend)
    return _move(model, device, dtype).eval()


def spec_kind(spec, encoder=None) -> str:
    """Which kind of spec :func:`load` was given: ``"model"``, ``"offline"``, ``"limber"``, ``"factory"``,
    ``"llava"``, ``"lm"`` (a hub name; only with ``encoder``), ``"hf_llava"`` or ``"hf_lm"``.

    Raises:
        ValueError: A string of none of these forms (it names them).
        TypeError: Not a string, a HF model or a vision LM.
    """
    if _is_vision_lm(spec):
        return "model"
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        if spec == "offline":
            return "offline"
        if spec.startswith("limber:"):
            if spec not in _limber_configs():
                raise ValueError(f"unknown LiMBeR config {spec.partition(':')[2]!r} in spec {spec!r}; choose one of "
                                 f"{', '.join(_limber_configs())}")
            return "limber"
        module, sep, function = spec.rpartition(":")
        if sep and module and function.isidentifier():
            return "factory"
        if is_vlm_name(spec):
            return "vlm"
        if "llava" in spec.lower():
            return "llava"
        if encoder is not None and spec:
            return "lm"
        if spec.endswith(".py") or spec and Path(spec).is_file():
            raise ValueError(f"spec {spec!r} is a file; a factory names its function: '{spec}:function'")
        raise ValueError(f"unknown model spec {spec!r}; expected one of: {', '.join(SPECS[:6])} "
                         f"(LiMBeR configs: {', '.join(_limber_configs())})")
    import transformers  # (transformer-lens needs it)

    if isinstance(spec, transformers.LlavaForConditionalGeneration):
        return "hf_llava"
    if is_vlm_model(spec):
        return "vlm"
    if isinstance(spec, transformers.PreTrainedModel):
        return "hf_lm"
    raise TypeError(f"spec must be one of {', '.join(SPECS)}; got a {type(spec).__name__}")


# ------------------------------------------------------------------------------------- helpers
def _is_vision_lm(obj) -> bool:
    from tl_multimodal.models._frontend import ImageFrontEnd
    from tl_multimodal.models.vlm import VLMBridge

    return isinstance(obj, (ImageFrontEnd, VLMBridge))


def _backend_of(model) -> str | None:
    from tl_multimodal.models.bridge import VisionBridge
    from tl_multimodal.models.vlm import VLMBridge

    if isinstance(model, (VisionBridge, VLMBridge)):
        return "bridge"
    return "hooked" if HAS_HOOKED_TRANSFORMER and isinstance(model, HookedTransformer) else None


def _check_backend(model, spec, backend: str) -> None:
    """TypeError unless ``model`` is a vision LM; ValueError if it is not of the ``backend`` asked for."""
    if not _is_vision_lm(model):
        raise TypeError(f"spec {_short(spec)} gave a {type(model).__name__}, not a vision LM "
                        "(HookedVisionPrefix or VisionBridge)")
    built = _backend_of(model)
    if backend != "auto" and built is not None and built != backend:
        raise ValueError(f"backend={backend!r} but spec {_short(spec)} is a {type(model).__name__} "
                         f"(backend {built!r}); pass backend={built!r} or 'auto'")


def resolve_backend(backend: str, kind: str) -> str:
    """The backend ``load`` builds for ``backend`` (``"auto"`` resolved) and a spec of ``kind`` (:func:`spec_kind`).

    Raises:
        ValueError: an unknown backend.
        ImportError: ``"hooked"`` where TransformerLens has no ``HookedTransformer`` (4.x).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "hooked" and not HAS_HOOKED_TRANSFORMER:
        raise ImportError("backend='hooked' needs HookedTransformer, which TransformerLens 4 removed: use "
                          "backend='bridge' (or 'auto'), or install transformer-lens<4")
    if backend == "auto":  # an in-memory causal LM has no HookedTransformer conversion here
        return "hooked" if HAS_HOOKED_TRANSFORMER and kind not in ("hf_lm", "vlm") else "bridge"
    return backend


def _short(spec) -> str:
    return repr(spec) if isinstance(spec, str) else f"(a {type(spec).__name__})"


def _limber_configs() -> list[str]:
    from tl_multimodal.pretrained.limber import LIMBER_CONFIGS

    return [f"limber:{key}" for key in sorted(LIMBER_CONFIGS)]


def _refuse(spec, **given) -> None:
    """ValueError naming the arguments (given, not None) that ``spec`` does not take."""
    extra = [name for name, value in given.items() if value is not None]
    if extra:
        raise ValueError(f"spec {_short(spec)} does not take {', '.join(extra)}")


def _replace_projection(model, projection):
    """A model that brings its projection: a checkpoint path replaces it; ``False`` is refused."""
    if projection is False:
        raise ValueError("projection=False (an untrained projection) applies to 'offline', an LM hub name and "
                         "an in-memory causal LM; this model brings its own projection")
    if projection is not None:
        model.load_projection(projection)
    return model


def _hub_projection(projection):
    """``projection`` as the hub constructors take it: ``False`` is their ``"untrained"``."""
    from tl_multimodal.models._hub import UNTRAINED

    return UNTRAINED if projection is False else projection


def _move(model, device, dtype):
    for target in (device, dtype):
        if target is None:
            continue
        if _backend_of(model) == "hooked":
            model.to(target, print_details=False)  # HookedTransformer.to: also its cfg
        else:  # TransformerBridge.to prints "Moving model to device: ..." (VisionBridge.to takes no print_details)
            with contextlib.redirect_stdout(io.StringIO()):
                model.to(target)
    return model


# ------------------------------------------------------------------------------------- builders
def _built(spec, backend, projection, encoder, tokenizer, kwargs):
    _refuse(spec, encoder=encoder, tokenizer=tokenizer, **kwargs)
    return _replace_projection(spec, projection)


def _offline(spec, backend, projection, encoder, tokenizer, kwargs):
    from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION, load_offline, load_offline_bridge

    _refuse(spec, encoder=encoder, tokenizer=tokenizer)
    path = None if projection is False else (SHIPPED_PROJECTION if projection is None else projection)
    if backend == "hooked":
        _refuse(spec, **{name: value for name, value in kwargs.items() if name != "cache"})
        return load_offline(path, **kwargs)  # on cpu; load moves it
    _refuse(spec, **{name: value for name, value in kwargs.items() if name != "cache"})
    return load_offline_bridge(False if path is None else path, **kwargs)


def _limber(spec, backend, projection, encoder, tokenizer, kwargs):
    from tl_multimodal.pretrained.limber import load_limber

    config = spec.partition(":")[2]  # a key of LIMBER_CONFIGS (spec_kind checked it)
    _refuse(spec, encoder=encoder, tokenizer=tokenizer)
    if projection is None or projection is False:
        raise ValueError(f"spec {spec!r} needs projection=: LiMBeR's limber_weights/{config}/proj.ckpt "
                         "(from its GitHub repository)")
    return load_limber(config, projection, backend=backend, **kwargs)


def _lm(spec, backend, projection, encoder, tokenizer, kwargs):
    _refuse(spec, tokenizer=tokenizer)
    if backend == "hooked":
        from tl_multimodal.models.prefix import HookedVisionPrefix as cls
    else:
        from tl_multimodal.models.bridge import VisionBridge as cls
    return cls.from_pretrained(spec, encoder=encoder, projection=_hub_projection(projection), **kwargs)


def _llava(spec, backend, projection, encoder, tokenizer, kwargs):
    from tl_multimodal.pretrained.llava import from_llava, llava_bridge

    _refuse(spec, encoder=encoder)
    model = (from_llava if backend == "hooked" else llava_bridge)(spec, tokenizer=tokenizer, **kwargs)
    return _replace_projection(model, projection)


def _hf_lm(spec, backend, projection, encoder, tokenizer, kwargs):
    from tl_multimodal.models._hub import hub_encoder, hub_projection
    from tl_multimodal.models.bridge import VisionBridge

    if backend == "hooked":
        raise ValueError("an in-memory causal LM runs on backend='bridge' (VisionBridge.from_hf); for the hooked "
                         "backend convert it to a HookedTransformer and pass HookedVisionPrefix(lm, encoder)")
    if tokenizer is None or encoder is None:
        raise ValueError(f"an in-memory causal LM ({type(spec).__name__}) needs tokenizer= and encoder=")
    _refuse(spec, **{name: value for name, value in kwargs.items() if name != "model_name"})
    if isinstance(encoder, str):
        encoder = hub_encoder(encoder)
    proj = hub_projection(_hub_projection(projection), "load")
    return VisionBridge.from_hf(spec, tokenizer, encoder, proj, model_name=kwargs.get("model_name"))


def _vlm(spec, backend, projection, encoder, tokenizer, kwargs):
    from tl_multimodal.pretrained.vlms import vlm_bridge

    if backend == "hooked":
        raise ValueError(f"spec {_short(spec)} runs on backend='bridge' (TransformerLens's own adapter for it)")
    _refuse(spec, encoder=encoder, projection=projection)
    return vlm_bridge(spec, tokenizer=tokenizer, **kwargs)


def _factory(spec, backend, projection, encoder, tokenizer, kwargs):
    _refuse(spec, encoder=encoder, tokenizer=tokenizer)
    module, _, function = spec.rpartition(":")
    if module.endswith(".py"):
        if not Path(module).is_file():
            raise FileNotFoundError(f"factory file {module} does not exist (spec {spec!r})")
        found = importlib.util.spec_from_file_location(Path(module).stem, module)
        mod = importlib.util.module_from_spec(found)
        found.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    factory = getattr(mod, function, None)
    if not callable(factory):
        raise AttributeError(f"{module} has no function {function!r} (spec {spec!r})")
    model = factory(**kwargs)
    if not _is_vision_lm(model):
        raise TypeError(f"factory {spec!r} returned a {type(model).__name__}, not a vision LM "
                        "(HookedVisionPrefix or VisionBridge)")
    return _replace_projection(model, projection)


_BUILDERS = {"model": _built, "offline": _offline, "limber": _limber, "lm": _lm, "llava": _llava,
             "hf_llava": _llava, "hf_lm": _hf_lm, "vlm": _vlm, "factory": _factory}
