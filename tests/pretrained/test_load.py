"""``tl_multimodal.load``, the one door: each spec gives the model its implementation function (or the
factory, or the model class) gives, on both backends; ``backend="auto"`` follows the installed
TransformerLens; every bad spec is named. The oracles are the direct calls (same weights, same logits,
same captions)."""

import copy
import sys
import textwrap

import pytest
import timm
import torch
import transformers
from torch import nn

import tl_multimodal
from tl_multimodal import HookedVisionPrefix, VisionBridge, VisionEncoder, load
from tl_multimodal._compat import HAS_HOOKED_TRANSFORMER
from tl_multimodal.models.encoders import HFVisionEncoder
from tl_multimodal.models.projection import ImageProjection, ProjectionInfo
from tl_multimodal.pretrained.limber import assemble_limber
from tl_multimodal.pretrained.llava import from_llava, llava_bridge

from conftest import ASSETS, _hooked_lm, build_vlm, tiny_hf

try:
    import transformer_lens

    TL_HAS_HOOKED = hasattr(transformer_lens, "HookedTransformer") and transformer_lens.HookedTransformer is not None
except ImportError:  # pragma: no cover
    TL_HAS_HOOKED = False
CLASS = {"hooked": HookedVisionPrefix, "bridge": VisionBridge}
AUTO = "hooked" if TL_HAS_HOOKED else "bridge"


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer")


def _vit(seed: int = 1) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                           embed_dim=64, depth=2, num_heads=2, num_classes=0), name="vit_tiny_32")


def _tiny(backend: str, tokenizer):
    """A fresh seeded tiny vision LM of ``backend`` (2-layer GPT-2-style LM, tiny ViT)."""
    return build_vlm(backend, tiny_hf("gpt2", n_layers=2, dtype=torch.float32), tokenizer, _vit())


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


FACTORY = textwrap.dedent("""
    from conftest import ASSETS
    from test_load import _tiny
    import transformers

    def build(kind="bridge"):
        return _tiny(kind, transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer"))

    def not_a_model():
        return 3
""")


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """``tmp_path/tiny_factory.py`` (importable as ``tiny_factory``): ``build(kind)`` makes the seeded tiny model."""
    (tmp_path / "tiny_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tiny_factory", raising=False)
    return tmp_path / "tiny_factory.py"


# ------------------------------------------------------------------ built models and factories
def test_a_built_model_is_returned_as_it_is(backend, tokenizer, tmp_path):
    model = _tiny(backend, tokenizer)
    assert load(model) is model and load(model, backend=backend) is model
    assert not model.training
    other = _tiny(backend, tokenizer)
    torch.manual_seed(9)
    with torch.no_grad():
        for p in other.projection.parameters():
            p.normal_()
    other.projection.save(tmp_path / "p.pt")
    assert load(model, projection=tmp_path / "p.pt") is model  # a checkpoint replaces the projection
    _same_state(model.projection, other.projection)
    assert load(model, dtype=torch.float64) is model
    assert {p.dtype for p in model.parameters()} == {torch.float64} and model.W_E.dtype == torch.float64
    wrong = "bridge" if backend == "hooked" else "hooked"
    if wrong == "bridge" or HAS_HOOKED_TRANSFORMER:
        with pytest.raises(ValueError, match=f"backend='{wrong}' but spec .* is a {type(model).__name__}"):
            load(model, backend=wrong)


def test_a_factory_spec_builds_what_the_factory_builds(backend, factory, tokenizer):
    want = _tiny(backend, tokenizer)
    for spec in (f"{factory}:build", "tiny_factory:build"):
        got = load(spec, kind=backend)  # kwargs go to the factory
        assert type(got) is CLASS[backend] and not got.training
        _same_state(got, want)
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(got("A picture of", images=pixels), want("A picture of", images=pixels))


def test_a_factory_of_the_other_backend_is_refused_when_a_backend_is_named(factory):
    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip("TransformerLens 4: the factory cannot build a HookedVisionPrefix")
    with pytest.raises(ValueError, match="backend='bridge' but spec 'tiny_factory:build' is a HookedVisionPrefix"):
        load("tiny_factory:build", backend="bridge", kind="hooked")


@pytest.mark.parametrize("spec, encoder, kind", [
    ("offline", None, "offline"), ("limber:clip_linear", None, "limber"), ("gpt2", "vit_tiny", "lm"),
    ("EleutherAI/gpt-j-6B", "microsoft/beit-large-patch16-224-pt22k", "lm"),
    ("llava-hf/llava-1.5-7b-hf", None, "llava"), ("org/LLaVA-mini", None, "llava"),
    ("models.py:build", None, "factory"), ("pkg.module:make_model", None, "factory"),
])
def test_spec_kinds(spec, encoder, kind):
    from tl_multimodal.pretrained.load import spec_kind

    assert spec_kind(spec, encoder=encoder) == kind


def test_an_lm_hub_name_goes_to_the_hub_constructor(backend):
    """Offline the hub load fails; first ``from_pretrained`` of ``backend`` warns that no projection
    was given (its own name in the warning); ``projection=False`` is its ``"untrained"``: no warning."""
    import warnings

    with pytest.warns(UserWarning, match=f"{CLASS[backend].__name__}.from_pretrained: no projection given"):
        with pytest.raises((ValueError, OSError)):
            load("no-such-model-xyz", backend=backend, encoder="vit_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises((ValueError, OSError)):
            load("no-such-model-xyz", backend=backend, encoder="vit_tiny", projection=False)


# ------------------------------------------------------------------ in-memory HF models
IMAGE_TOKEN = 50257


@pytest.fixture(scope="module")
def llava_parts():
    """A tiny random LLaVA (CLIP vision, Llama text, GPT-2's vocabulary + <image>) and its processor parts."""
    tok = transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer", add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64),
        text_config=transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=IMAGE_TOKEN + 1,
                                             max_position_embeddings=64, initializer_range=0.1),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, projector_hidden_act="gelu")
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    hf.set_attn_implementation("eager")
    return hf, tok, ip


def test_an_in_memory_llava_gives_the_direct_conversions_logits(backend, llava_parts):
    hf, tok, ip = llava_parts
    direct = (from_llava if backend == "hooked" else llava_bridge)(copy.deepcopy(hf), image_processor=ip,
                                                                   tokenizer=tok)
    got = load(copy.deepcopy(hf), backend=backend, tokenizer=tok, image_processor=ip)
    assert type(got) is CLASS[backend] and got.image_token_id == IMAGE_TOKEN and got.tokenizer is tok
    ids = torch.tensor([[1, 5, 9] + [IMAGE_TOKEN] * 16 + [44, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = direct(ids, images=pixels)
        torch.testing.assert_close(got(ids, images=pixels), want)
        torch.testing.assert_close(want, hf(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=1e-4)


def test_auto_backend_follows_the_installed_transformer_lens(llava_parts, tokenizer):
    """TransformerLens 3 (HookedTransformer present): hooked; 4: the bridge. An in-memory causal LM has
    only the bridge."""
    hf, tok, ip = llava_parts
    assert HAS_HOOKED_TRANSFORMER == TL_HAS_HOOKED
    assert type(load(copy.deepcopy(hf), tokenizer=tok, image_processor=ip)) is CLASS[AUTO]
    lm = tiny_hf("gpt2", n_layers=1, dtype=torch.float32)
    assert type(load(lm, tokenizer=tokenizer, encoder=_vit(), projection=False)) is VisionBridge


def test_an_in_memory_causal_lm_is_the_bridge_from_hf(tokenizer, tmp_path):
    lm, encoder = tiny_hf("gpt2", n_layers=2, dtype=torch.float32), _vit()
    torch.manual_seed(3)
    proj = ImageProjection(ProjectionInfo(encoder=encoder.model_name, d_img=encoder.d_img, grid=encoder.grid,
                                          lm="tiny", d_model=lm.config.hidden_size))
    proj.save(tmp_path / "p.pt")
    want = VisionBridge.from_hf(copy.deepcopy(lm), tokenizer, encoder, proj, model_name="tiny").eval()
    got = load(copy.deepcopy(lm), backend="bridge", tokenizer=tokenizer, encoder=encoder,
               projection=tmp_path / "p.pt", model_name="tiny")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got("A picture of", images=pixels), want("A picture of", images=pixels))
    with pytest.warns(UserWarning, match="UNTRAINED"):  # no projection=: the hub constructors' warning
        load(copy.deepcopy(lm), tokenizer=tokenizer, encoder=encoder, model_name="tiny")


# ------------------------------------------------------------------ LiMBeR on either backend
def test_limber_assembles_on_the_bridge_too(backend, tmp_path):
    """``"limber:<config>"`` on the bridge: the same LiMBeR checkpoint on a TransformerBridge gives the HF
    LM's logits with the soft prompts LiMBeR's Linear makes (GPT-J itself needs the hub)."""
    torch.manual_seed(0)
    beit = transformers.BeitModel(transformers.BeitConfig(image_size=32, patch_size=8, hidden_size=32,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=64)).eval()
    hf = tiny_hf("gpt2", n_layers=2, dtype=torch.float32)
    linear = nn.Linear(32, hf.config.hidden_size)
    torch.save(linear.state_dict(), tmp_path / "proj.ckpt")
    tok = transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer")
    if backend == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        lm = TransformerBridge.boot_transformers("tiny", hf_model=copy.deepcopy(hf), tokenizer=tok)
    else:
        lm = _hooked_lm(hf, tok)  # a HookedTransformer with hf's weights
    model = assemble_limber(lm, HFVisionEncoder(beit), tmp_path / "proj.ckpt", "beit_linear").eval()
    assert type(model) is CLASS[backend] and model.n_image_tokens == 16
    pixels = torch.randn(2, 3, 32, 32)
    ids = tok("A picture of", return_tensors="pt").input_ids
    with torch.no_grad():
        soft = linear(beit(pixel_values=pixels).last_hidden_state[:, 1:])
        want = hf(inputs_embeds=torch.cat([soft, hf.transformer.wte(ids).expand(2, -1, -1)], 1)).logits
        got = model(torch.cat([torch.full((2, 16), model.image_token_id), ids.expand(2, -1)], 1), images=pixels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the real offline model
@pytest.fixture(scope="module")
def offline_pair(backend, request):
    """``(load("offline"), the direct loader's model)`` of one backend; ``load("offline")`` is the session's
    (conftest's ``offline_hooked`` / ``offline_bridge``). The direct loader's bridge wraps a copy of
    SmolLM2 read from the GGUF file here."""
    pytest.importorskip("gguf")
    from tl_multimodal.pretrained import offline as loading

    try:
        loading.smollm2_gguf_path()
    except ImportError as e:
        pytest.skip(str(e))
    if backend == "hooked":
        return request.getfixturevalue("offline_hooked"), loading.load_offline(loading.SHIPPED_PROJECTION)
    return request.getfixturevalue("offline_bridge"), loading.load_offline_bridge()


def test_offline_captions_like_the_direct_loader(offline_pair, backend):
    from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION
    from tl_multimodal.data.sources import sample_images

    got, want = offline_pair
    assert type(got) is CLASS[backend] and not got.training
    _same_state(got.projection, ImageProjection.load(SHIPPED_PROJECTION))
    images = sample_images(2).images
    assert got.caption(images, max_new_tokens=6) == want.caption(images, max_new_tokens=6)


# ------------------------------------------------------------------ bad input is named
@pytest.mark.parametrize("spec, kwargs, error, message", [
    ("ofline", {}, ValueError, r"unknown model spec 'ofline'; expected one of: 'offline', 'limber:<config>'.*"
                               r"limber:beit_linear"),
    ("", {}, ValueError, "unknown model spec ''"),
    ("limber:beit", {}, ValueError, r"unknown LiMBeR config 'beit'.*limber:beit_ft_linear, limber:beit_linear"),
    ("limber:beit_linear", {}, ValueError, r"'limber:beit_linear' needs projection=: LiMBeR's "
                                           r"limber_weights/beit_linear/proj.ckpt"),
    ("offline", {"backend": "tl4"}, ValueError, "backend must be one of 'auto', 'hooked', 'bridge', got 'tl4'"),
    ("offline", {"encoder": "vit_tiny"}, ValueError, "spec 'offline' does not take encoder"),
    ("offline", {"revision": "main"}, ValueError, "spec 'offline' does not take revision"),
    (3, {}, TypeError, r"spec must be one of 'offline', .*; got a int"),
    ("{dir}/tiny_factory.py", {}, ValueError, "is a file; a factory names its function: '.*tiny_factory.py:function'"),
    ("{dir}/missing.py:build", {}, FileNotFoundError, "factory file .*missing.py does not exist"),
    ("{dir}/tiny_factory.py:nope", {}, AttributeError, "has no function 'nope'"),
    ("tiny_factory:not_a_model", {}, TypeError, "returned a int, not a vision LM"),
    ("no_such_module_xyz:build", {}, ModuleNotFoundError, "no_such_module_xyz"),
    ("tiny_factory:build", {"encoder": "vit_tiny"}, ValueError, "does not take encoder"),
    ("tiny_factory:build", {"projection": False}, ValueError, "projection=False .* brings its own projection"),
])
def test_bad_specs_are_named(factory, spec, kwargs, error, message):
    if isinstance(spec, str):
        spec = spec.format(dir=factory.parent)
    with pytest.raises(error, match=message):
        load(spec, **kwargs)


def test_in_memory_causal_lm_needs_its_parts(tokenizer):
    lm = tiny_hf("gpt2", n_layers=1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"needs tokenizer= and encoder="):
        load(lm, encoder=_vit())
    if HAS_HOOKED_TRANSFORMER:
        with pytest.raises(ValueError, match="runs on backend='bridge'"):
            load(lm, backend="hooked", tokenizer=tokenizer, encoder=_vit())


@pytest.mark.skipif(TL_HAS_HOOKED, reason="TransformerLens 3 has HookedTransformer")
def test_hooked_backend_on_transformer_lens_4_is_refused():
    with pytest.raises(ImportError, match="backend='hooked' needs HookedTransformer.*backend='bridge'"):
        load("offline", backend="hooked")


def test_load_is_the_only_top_level_loader():
    assert tl_multimodal.load is load
    for name in ("load_offline", "load_offline_bridge", "load_limber", "from_llava", "llava_bridge"):
        assert name not in tl_multimodal.__all__
        with pytest.raises(AttributeError):
            getattr(tl_multimodal, name)
