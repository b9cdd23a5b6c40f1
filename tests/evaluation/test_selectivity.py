"""Spread, genericity and re-ranking of top units: hand-built grids and rankings with known answers, and a
model with a planted spatially selective unit (a tiny GPT-2 whose MLP unit fires on one patch only),
on both backends."""

import math

import numpy as np
import pytest
import torch

from conftest import build_vlm, tiny_hf
from tl_multimodal.evaluation.selectivity import (drop_units, generic_units, iou_ceiling, rerank, spread_of_grids,
                                                  unit_spread)


def test_spread_of_flat_peaked_and_two_patch_grids():
    flat = torch.full((4, 4), 2.0)
    peak = torch.zeros(4, 4)
    peak[1, 2] = 3.0
    two = torch.zeros(4, 4)
    two[0, 0] = two[3, 3] = 1.0
    ramp = torch.arange(16.0).reshape(4, 4) - 5.0      # a - min = 0..15
    entropy, top = spread_of_grids(torch.stack([flat, peak, two, ramp]), n_top=1)
    assert math.isnan(entropy[0]) and math.isnan(top[0])  # no mass above the minimum
    assert entropy[1] == 0 and top[1] == 1
    np.testing.assert_allclose(entropy[2], math.log(2) / math.log(16), rtol=1e-6)
    np.testing.assert_allclose(top[2], 0.5)
    p = np.arange(16) / np.arange(16).sum()
    h = -(p[1:] * np.log(p[1:])).sum() / np.log(16)
    np.testing.assert_allclose(entropy[3], h, rtol=1e-6)
    np.testing.assert_allclose(top[3], 15 / 120, rtol=1e-6)


def test_generic_units_count_other_targets_only():
    a, b, c, d = (0, 1), (0, 2), (1, 3), (1, 4)
    ranked = torch.tensor([[a, b], [a, c], [a, d], [b, c]])
    gen = generic_units(ranked, ["dog", "cat", "dog", "bus"], min_share=0.5)
    # image 0 (dog): others with another target are 1 (cat) and 3 (bus); a is in 1's list, b in 3's
    np.testing.assert_allclose(gen.frequency[0].numpy(), [0.5, 0.5])
    # image 1 (cat): others 0, 2, 3; a in 0 and 2; c in 3
    np.testing.assert_allclose(gen.frequency[1].numpy(), [2 / 3, 1 / 3])
    assert gen.generic[1].tolist() == [True, False]
    assert math.isnan(gen.overlap[0, 2]) and math.isnan(gen.overlap[0, 0])  # same target, self
    np.testing.assert_allclose(gen.overlap[0, 1], 0.5)
    assert gen.common[0] == (0, 1, 3)
    assert "overlap" in repr(gen) and len(gen.to_dataframe()) == 8
    with pytest.raises(ValueError, match="targets"):
        generic_units(ranked, ["dog"])


def test_drop_and_rerank_keep_the_order_asked_for():
    ranked = torch.tensor([[[0, 1], [0, 2], [1, 3], [1, 4]]])
    drop = torch.tensor([[False, True, False, False]])
    assert drop_units(ranked, drop, 2).tolist() == [[[0, 1], [1, 3]]]
    with pytest.raises(ValueError, match="n_units"):
        drop_units(ranked, drop, 4)
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    assert rerank(ranked, scores, 3).tolist() == [[[0, 2], [1, 3], [1, 4]]]  # ties keep the old order
    with pytest.raises(ValueError, match="scores"):
        rerank(ranked, torch.tensor([[1.0, float("nan"), 0, 0]]), 2)


def test_iou_ceiling_by_hand():
    small = np.zeros((10, 10), bool)
    small[0, :2] = True                      # 2 pixels < 5% (5 pixels): 2/5
    big = np.zeros((10, 10), bool)
    big[:5] = True                           # 50 pixels: 5/50
    np.testing.assert_allclose(iou_ceiling([small, big], share=0.05), [0.4, 0.1])


def test_unit_spread_finds_a_planted_one_patch_unit(backend, gpt2_tokenizer, vit_encoder):
    """Unit 0 of block 0 fires on image position 5 only (it reads a direction only that soft prompt has);
    unit 1 reads a direction every soft prompt has equally: flat."""
    hf = tiny_hf("gpt2", n_layers=1, d_model=16, n_heads=2, d_mlp=8, seed=2)
    with torch.no_grad():
        hf.transformer.wpe.weight.zero_()
        hf.transformer.h[0].attn.c_proj.weight.zero_()
        hf.transformer.h[0].attn.c_proj.bias.zero_()
        fc = hf.transformer.h[0].mlp.c_fc
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[0, 0] = 3.0
        fc.weight[1, 1] = 3.0
    model = build_vlm(backend, hf, gpt2_tokenizer, vit_encoder)
    n = model.n_image_tokens
    x = torch.zeros(2, n, 16, dtype=torch.float64)
    x[:, :, 1:5] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=x.dtype)   # every patch: direction 1 (unit 1)
    x[:, 5, :5] = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0], dtype=x.dtype)  # patch 5: direction 0 too (unit 0),
    # with the same mean and norm, so the MLP's LayerNorm leaves component 1 the same at every patch
    units = torch.tensor([[[0, 0], [0, 1]]] * 2)
    spread = unit_spread(model, units=units, image_embed=x)
    np.testing.assert_allclose(spread.entropy[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(spread.top_mass[:, 0], 1.0, rtol=1e-6)
    assert torch.isnan(spread.entropy[:, 1]).all()          # the same at every patch: no spread to measure
    assert spread.n_top == math.ceil(0.05 * n) and "UnitSpread" in repr(spread)
