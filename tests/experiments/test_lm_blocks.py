"""Tests for tl_multimodal.experiments.lm_blocks (frozen LM blocks as visual-encoder layers)."""

from __future__ import annotations

import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn as nn

from conftest import HAS_HOOKED_TRANSFORMER

if HAS_HOOKED_TRANSFORMER:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
else:  # TransformerLens 4: the tests with an LM skip; the plain-ViT baseline and the measures run
    HookedTransformer = HookedTransformerConfig = None

from tl_multimodal.experiments.lm_blocks import (ViTWithLMBlocks, frozen_position_free_block, mask_correlation, norm_peakiness,
                                    patch_coverage, token_norm_map, token_norm_maps)

D_LM = 64
N_CLASSES = 5
IMG = 32
PATCH = 8
N_TOKENS = (IMG // PATCH) ** 2 + 1  # patches + CLS


def _lm(kind: str) -> "HookedTransformer":
    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip("ViTWithLMBlocks copies HookedTransformer blocks: TransformerLens 3 only "
                    "(TransformerLens 4 removed HookedTransformer)")
    common = dict(d_model=D_LM, n_layers=2, n_heads=4, d_head=16, d_mlp=128, n_ctx=64,
                  d_vocab=97, seed=0)
    if kind == "gpt2":
        cfg = HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN",
                                      positional_embedding_type="standard", **common)
    elif kind == "llama":
        cfg = HookedTransformerConfig(act_fn="silu", normalization_type="RMS",
                                      positional_embedding_type="rotary", rotary_dim=16,
                                      n_key_value_heads=2, gated_mlp=True, final_rms=True,
                                      **common)
    else:  # pragma: no cover
        raise ValueError(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    # Make the attention sharp enough that token mixing is clearly visible in the tests.
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(4.0)
            block.attn.W_K.mul_(4.0)
    return model.eval()


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG,
                             patch_size=PATCH, depth=2, num_classes=N_CLASSES)


@pytest.fixture(scope="session")
def gpt2_lm() -> "HookedTransformer":
    return _lm("gpt2")


@pytest.fixture(scope="session")
def llama_lm() -> "HookedTransformer":
    return _lm("llama")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def lm(request, gpt2_lm, llama_lm) -> "HookedTransformer":
    return {"gpt2": gpt2_lm, "llama": llama_lm}[request.param]


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def wrapper(lm) -> ViTWithLMBlocks:
    """An untrained wrapper (eval mode) around the last block of ``lm``; never trained."""
    return ViTWithLMBlocks(_vit(), lm).eval()


def _tokens(seed: int, n: int = 9) -> torch.Tensor:
    return torch.randn(2, n, D_LM, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- (a) frozen LM block
def test_lm_block_weights_are_copied_bit_identically(lm, wrapper):
    copied = wrapper.lm_blocks[0].state_dict()
    original = lm.blocks[-1].state_dict()
    for name, value in copied.items():
        assert torch.equal(value, original[name]), name
    assert wrapper.lm_block_indices == [lm.cfg.n_layers - 1]


def test_optimizer_step_leaves_lm_block_frozen(lm, images):
    model = ViTWithLMBlocks(_vit(seed=3), lm).train()
    assert all(not b.training for b in model.lm_blocks), "LM blocks must stay in eval mode"
    assert model.vit.training
    assert all(not p.requires_grad for p in model.lm_blocks.parameters())

    block_before = {k: v.clone() for k, v in model.lm_blocks.state_dict().items()}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    assert any(n.startswith("proj_in") for n in trainable_before)
    assert any(n.startswith("proj_out") for n in trainable_before)
    assert any(n.startswith("vit.") for n in trainable_before)
    assert not any(n.startswith("lm_blocks") for n in trainable_before)

    # Hand *all* parameters to the optimizer (weight decay too): frozen ones must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    labels = torch.arange(images.shape[0]) % N_CLASSES
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for name, value in model.lm_blocks.state_dict().items():
        assert torch.equal(value, block_before[name]), f"frozen LM weight {name} changed"
    changed = {n: not torch.equal(p.detach(), trainable_before[n])
               for n, p in model.named_parameters() if p.requires_grad}
    assert changed["proj_in.weight"] and changed["proj_out.weight"]
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    # The user's LM is untouched: same weights, still trainable.
    for name, value in lm.state_dict().items():
        assert torch.equal(value, lm_before[name]), name
    assert all(p.requires_grad for p in lm.parameters())


def test_user_lm_is_not_mutated(lm, wrapper):
    assert lm.cfg.attention_dir == "causal"
    assert lm.cfg.positional_embedding_type in ("standard", "rotary")
    assert lm.blocks[-1].attn.hook_pattern.name == f"blocks.{lm.cfg.n_layers - 1}.attn.hook_pattern"
    assert wrapper.lm_blocks[0].cfg is not lm.cfg
    assert wrapper.lm_blocks[0].attn.hook_pattern is not lm.blocks[-1].attn.hook_pattern
    # The LM itself is still causal: its last-position logits depend on earlier tokens only.
    toks = torch.tensor([[1, 2, 3, 4, 5]])
    toks2 = toks.clone()
    toks2[0, -1] = 9
    with torch.no_grad():
        a, b = lm(toks), lm(toks2)
    torch.testing.assert_close(a[0, 0], b[0, 0])


# ---------------------------------------------------------------- (b) non-causal
def test_inserted_block_is_non_causal_and_raw_block_is_causal(lm, wrapper):
    x = _tokens(0)
    x_changed = x.clone()
    x_changed[:, -1] += 3.0 * torch.randn(D_LM, generator=torch.Generator().manual_seed(5))
    inserted = wrapper.lm_blocks[0]
    raw = lm.blocks[-1]
    with torch.no_grad():
        delta_inserted = (inserted(x)[:, 0] - inserted(x_changed)[:, 0]).abs().max()
        delta_raw = (raw(x)[:, 0] - raw(x_changed)[:, 0]).abs().max()
    assert delta_inserted > 1e-3, "the inserted block must let the first token see the last"
    assert delta_raw == 0, "oracle: with the causal mask the first token cannot see the last"


def test_attention_pattern_is_not_lower_triangular(lm, wrapper, images):
    _, cache = wrapper.run_with_cache(images)
    pattern = cache["lm_blocks.0.attn.hook_pattern"]
    above_diagonal = torch.triu(pattern, diagonal=1)
    assert above_diagonal.sum(-1).mean() > 0.1, "tokens must attend to later tokens too"
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))

    # Oracle: the LM's own (causal) pattern is lower-triangular.
    _, lm_cache = lm.run_with_cache(torch.tensor([[1, 5, 7, 2, 8, 3]]))
    lm_pattern = lm_cache[f"blocks.{lm.cfg.n_layers - 1}.attn.hook_pattern"]
    assert torch.triu(lm_pattern, diagonal=1).abs().max() == 0


# ---------------------------------------------------------------- (c) no positional encoding
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_inserted_block_is_permutation_equivariant(kind, gpt2_lm, llama_lm):
    lm = {"gpt2": gpt2_lm, "llama": llama_lm}[kind]
    model = ViTWithLMBlocks(_vit(), lm, block_indices=[0, 1]).eval()
    x = _tokens(1, n=12)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for block in model.lm_blocks:
            torch.testing.assert_close(block(x[:, perm]), block(x)[:, perm], atol=1e-5, rtol=1e-5)
        # The whole inserted stage (proj_in -> blocks -> proj_out) is equivariant too.
        v = torch.randn(2, 12, model.d_vit, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(model.apply_lm_blocks(v[:, perm]), model.apply_lm_blocks(v)[:, perm],
                                   atol=1e-5, rtol=1e-5)


def test_rotary_is_what_the_copy_removes(llama_lm):
    """Oracle for the rotary LM: bidirectional but *with* rotary is not permutation equivariant."""
    with_rotary = copy.deepcopy(llama_lm.blocks[-1])
    with_rotary.cfg.attention_dir = "bidirectional"  # private deep copy of the cfg
    assert llama_lm.cfg.attention_dir == "causal"
    assert with_rotary.cfg.positional_embedding_type == "rotary"
    position_free = frozen_position_free_block(llama_lm.blocks[-1], llama_lm.cfg.n_layers - 1)
    assert llama_lm.cfg.positional_embedding_type == "rotary"
    x = _tokens(4, n=12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        gap_rotary = (with_rotary(x[:, perm]) - with_rotary(x)[:, perm]).abs().max()
        gap_free = (position_free(x[:, perm]) - position_free(x)[:, perm]).abs().max()
    assert gap_rotary > 1e-3
    assert gap_free < 1e-5
    assert not hasattr(position_free.attn, "hook_rot_q")


# ---------------------------------------------------------------- (d) hooks
def test_run_with_cache_exposes_inserted_block_hooks(lm, wrapper, images):
    logits, cache = wrapper.run_with_cache(images)
    b, t = images.shape[0], N_TOKENS
    assert logits.shape == (b, N_CLASSES)
    assert cache["lm_blocks.0.attn.hook_pattern"].shape == (b, lm.cfg.n_heads, t, t)
    assert cache["lm_blocks.0.attn.hook_attn_scores"].shape == (b, lm.cfg.n_heads, t, t)
    for name in ("lm_blocks.0.hook_resid_pre", "lm_blocks.0.hook_resid_mid",
                 "lm_blocks.0.hook_resid_post", "lm_blocks.0.hook_attn_out",
                 "lm_blocks.0.hook_mlp_out", "hook_lm_in", "hook_lm_out"):
        assert cache[name].shape == (b, t, D_LM), name
    for name in ("hook_vit_out", "hook_features"):
        assert cache[name].shape == (b, t, wrapper.d_vit), name
    assert not any("hook_rot" in name for name in cache.keys())
    torch.testing.assert_close(cache["hook_lm_out"], cache["lm_blocks.0.hook_resid_post"])
    with torch.no_grad():
        torch.testing.assert_close(logits, wrapper(images))

    norms = token_norm_map(cache["lm_blocks.0.hook_resid_post"], wrapper.num_prefix_tokens,
                           wrapper.grid_size)
    assert norms.shape == (b, IMG // PATCH, IMG // PATCH)


def test_hooks_can_intervene(wrapper, images):
    def ablate(value, hook):
        return torch.zeros_like(value)

    with torch.no_grad():
        clean = wrapper(images)
        ablated = wrapper.run_with_hooks(images, fwd_hooks=[("lm_blocks.0.hook_attn_out", ablate)])
        again = wrapper(images)
    assert not torch.allclose(clean, ablated)
    torch.testing.assert_close(clean, again)  # hooks removed afterwards


def test_multiple_blocks_and_negative_indices(gpt2_lm, images):
    model = ViTWithLMBlocks(_vit(), gpt2_lm, block_indices=[0, -1]).eval()
    assert model.lm_block_indices == [0, 1]
    _, cache = model.run_with_cache(images)
    assert "lm_blocks.0.attn.hook_pattern" in cache and "lm_blocks.1.attn.hook_pattern" in cache
    torch.testing.assert_close(cache["lm_blocks.1.hook_resid_pre"], cache["lm_blocks.0.hook_resid_post"])


def test_baseline_is_the_plain_vit(images):
    vit = _vit().eval()
    model = ViTWithLMBlocks(vit, baseline=True).eval()
    assert len(model.lm_blocks) == 0 and model.proj_in is None
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit(images))
    _, cache = model.run_with_cache(images)
    assert not any(name.startswith("lm_blocks") for name in cache.keys())
    torch.testing.assert_close(cache["hook_vit_out"], cache["hook_features"])


# ---------------------------------------------------------------- (e) errors
def test_mismatched_widths_raise(gpt2_lm):
    vit = _vit()
    with pytest.raises(ValueError, match=r"proj_in maps 100 -> 64.*192 -> 64"):
        ViTWithLMBlocks(vit, gpt2_lm, proj_in=nn.Linear(100, D_LM))
    with pytest.raises(ValueError, match=r"proj_out maps 64 -> 100.*64 -> 192"):
        ViTWithLMBlocks(vit, gpt2_lm, proj_out=nn.Linear(D_LM, 100))
    with pytest.raises(ValueError, match=r"proj_in maps 192 -> 32"):
        ViTWithLMBlocks(vit, gpt2_lm, proj_in=nn.Linear(192, 32))
    bad_norm = _vit()
    bad_norm.norm = nn.LayerNorm(100)
    with pytest.raises(ValueError, match="final norm"):
        ViTWithLMBlocks(bad_norm, gpt2_lm)
    model = ViTWithLMBlocks(vit, gpt2_lm)
    with pytest.raises(ValueError, match="d_vit=192"):
        model.apply_lm_blocks(torch.randn(1, 3, D_LM))


@pytest.mark.parametrize(
    "indices, error, message",
    [
        (2, IndexError, r"out of range for an LM with 2 blocks"),
        ([0, -3], IndexError, r"-3 is out of range"),
        ([], ValueError, r"empty"),
        ([1.5], TypeError, r"block_indices\[0\] must be an int, got float"),
        (True, TypeError, r"int or a sequence"),
    ],
)
def test_bad_block_indices_raise(gpt2_lm, indices, error, message):
    with pytest.raises(error, match=message):
        ViTWithLMBlocks(_vit(), gpt2_lm, block_indices=indices)


def test_bad_models_raise(gpt2_lm):
    with pytest.raises(ValueError, match="required unless baseline"):
        ViTWithLMBlocks(_vit())
    with pytest.raises(TypeError, match="HookedTransformer"):
        ViTWithLMBlocks(_vit(), nn.Linear(3, 3))
    with pytest.raises(TypeError, match="VisionTransformer-like"):
        ViTWithLMBlocks(nn.Linear(3, 3), gpt2_lm)
    with pytest.raises(TypeError, match="TransformerBlock"):
        frozen_position_free_block(nn.Linear(3, 3), 0)



# ---------------------------------------------------------------- information-filtering measures
def test_token_norm_maps_read_the_cache(gpt2_lm, images):
    model = ViTWithLMBlocks(_vit(), gpt2_lm)  # train mode: the measure switches to eval
    maps = token_norm_maps(model, images, batch_size=2)
    assert not model.training and set(maps) == {"vit_out", "lm_in", "lm_out", "lm_update", "features"}
    _, cache = model.run_with_cache(images)
    post, pre = cache["lm_blocks.0.hook_resid_post"], cache["lm_blocks.0.hook_resid_pre"]
    for key, act in [("lm_out", post), ("lm_update", post - pre), ("vit_out", cache["hook_vit_out"])]:
        ref = torch.sqrt((act[:, 1:] ** 2).sum(-1)).reshape(3, IMG // PATCH, IMG // PATCH)  # drop CLS
        torch.testing.assert_close(maps[key], ref, rtol=1e-4, atol=1e-5)
    base = token_norm_maps(ViTWithLMBlocks(_vit(), baseline=True), images)
    assert set(base) == {"vit_out", "features"}
    with pytest.raises(TypeError, match="ViTWithLMBlocks"):
        token_norm_maps(_vit(), images)


def test_patch_coverage_by_hand():
    mask = torch.zeros(4, 6)
    mask[0:3, 1:4] = 1.0
    cov = patch_coverage(mask, 2)
    torch.testing.assert_close(cov, torch.tensor([[0.5, 1.0, 0.0], [0.25, 0.5, 0.0]]))
    assert patch_coverage(torch.stack([mask, 1 - mask]), 2).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="4x6 pixels does not tile into patches of 4"):
        patch_coverage(mask, 4)


def test_mask_correlation_and_peakiness_by_hand():
    import numpy as np

    maps = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[4.0, 1.0], [1.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])
    cover = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.5, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    r = [np.corrcoef(m.flatten(), c.flatten())[0, 1] for m, c in zip(maps[:2].numpy(), cover[:2].numpy())]
    assert mask_correlation(maps, cover) == pytest.approx(np.mean(r))  # the constant map is skipped
    assert norm_peakiness(maps) == pytest.approx((6 / 3 + 4 / 2 + 1) / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        mask_correlation(maps, cover[:2])
