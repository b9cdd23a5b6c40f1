"""``sae_id``: an SAE's identity is what it computes, not where its file lies or the float dtype holding it."""

import shutil

import pytest
import torch

from tl_multimodal.sae.load import load_sae, save_sae
from tl_multimodal.sae.model import SAE, SAEConfig, sae_id


def _sae(hook: str = "blocks.1.hook_resid_post") -> SAE:
    g = torch.Generator().manual_seed(0)
    params = {"W_enc": torch.randn(8, 12, generator=g), "b_enc": torch.randn(12, generator=g),
              "W_dec": torch.randn(12, 8, generator=g), "b_dec": torch.randn(8, generator=g)}
    return SAE(SAEConfig("topk", 8, 12, hook, k=3), params)


def test_a_moved_copy_keeps_its_id_and_any_change_of_what_it_computes_changes_it(tmp_path):
    sae = _sae()
    folder = save_sae(sae, tmp_path / "a")
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "b")
    ids = {sae_id(sae), sae_id(load_sae(folder)), sae_id(load_sae(moved)), sae_id(load_sae(moved, dtype=torch.float64))}
    assert len(ids) == 1 and len(ids.pop()) == 16
    nudged = _sae()
    with torch.no_grad():
        nudged.W_dec[3, 5] = torch.nextafter(nudged.W_dec[3, 5], torch.tensor(float("inf")))  # one ulp
    assert sae_id(nudged) != sae_id(sae)
    assert sae_id(_sae("blocks.0.hook_resid_post")) != sae_id(sae)
    other_k = SAE(SAEConfig("topk", 8, 12, sae.hook_name, k=4), dict(sae.named_parameters()))
    assert sae_id(other_k) != sae_id(sae)
    with pytest.raises(TypeError, match="sae must be an SAE"):
        sae_id(folder)
