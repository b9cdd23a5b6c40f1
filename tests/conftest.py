"""Shared, session-scoped fixtures: GPT-2 small (real config and tokenizer, random weights), small
timm encoders, and the HookedVisionPrefix built from them. Everything runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
try:  # TransformerLens 3; TransformerLens 4 has no HookedTransformer (only the bridge tests run there)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
except ImportError:
    HookedTransformer = None

from tl_multimodal import HookedVisionPrefix, VisionEncoder  # noqa: E402

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return transformers.GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2_tokenizer")


def tiny_gpt2_vlm(tokenizer, encoder, seed: int) -> "HookedVisionPrefix":
    """A 2-layer GPT-2-style LM (d_model 64, random seeded weights) behind ``encoder``: for tests that train."""
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
        pytest.skip("HookedTransformer needs TransformerLens 3")
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257,
        act_fn="gelu_new", normalization_type="LN", model_name="gpt2", eps=1e-5,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=True, init_weights=False,
    )
    lm = HookedTransformer(cfg, tokenizer=gpt2_tokenizer)
    lm.load_state_dict(convert_gpt2_weights(hf_gpt2, cfg), strict=False)
    return lm.eval()


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
    torch.manual_seed(3)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=50257, n_ctx=64,
                                  act_fn="gelu", normalization_type="LN", model_name="tiny")
    return HookedVisionPrefix(HookedTransformer(cfg, tokenizer=gpt2_tokenizer), vit_encoder).eval()


def assert_decoding_matches_decomposition(model, cache, units, apply_ln: bool, positions=None) -> None:
    """Oracle for unit decoding: a unit's component of the residual stream (TransformerLens's
    ``get_full_resid_decomposition(expand_neurons=True)``) at the position (among ``positions``, default
    all) where it is strongest, projected on ``W_U``, is its activation (/ the final norm's cached scale
    with ``apply_ln``) times the decoded direction's logits, with the same top 10 tokens."""
    from tl_multimodal.decoding import decode_units, unit_directions

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

