"""Projection kinds against independent oracles (nn.Linear, einops, transformers' LLaVA projector),
LiMBeR's proj.ckpt layout, and checkpoint files that refuse to load into the wrong model."""

import einops
import pytest
import torch
import transformers
from torch import nn
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from tl_multimodal.pretrained.offline import SHIPPED_PROJECTION
from tl_multimodal.models.projection import ImageProjection, ProjectionInfo, projection_id

D_IMG, D_MODEL = 24, 16


def _info(**kw):
    return ProjectionInfo(**{"encoder": "enc", "d_img": D_IMG, "grid": (2, 3), "lm": "lm", "d_model": D_MODEL, **kw})


def _limber_ckpt(path, d_out, d_in=D_IMG, seed=0):
    """Write what LiMBeR's repository ships: ``torch.save(nn.Linear(...).state_dict(), "proj.ckpt")``."""
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out)
    torch.save(linear.state_dict(), path)
    return linear


def test_limber_checkpoint_projects_like_nn_linear(tmp_path):
    linear = _limber_ckpt(tmp_path / "proj.ckpt", D_MODEL)
    proj = ImageProjection.from_limber(tmp_path / "proj.ckpt", _info()).eval()
    feats = torch.randn(2, 6, D_IMG)
    assert torch.equal(proj(feats), linear(feats))
    assert proj.n_tokens == 6 and proj.kind == "linear"


def test_pooled_limber_checkpoint_is_mean_pool_then_k_token_reshape(tmp_path):
    k = 3
    linear = _limber_ckpt(tmp_path / "proj.ckpt", k * D_MODEL)
    proj = ImageProjection.from_limber(tmp_path / "proj.ckpt", _info(kind="pooled", n_tokens=k)).eval()
    feats = torch.randn(2, 6, D_IMG)
    # LiMBeR/MAGMA: AdaptiveAvgPool2d((1, 1)) on the [b, d, rows, cols] map, Linear, b (s d) -> b s d
    fmap = einops.rearrange(feats, "b (h w) d -> b d h w", h=2, w=3)
    pooled = einops.rearrange(nn.AdaptiveAvgPool2d((1, 1))(fmap), "b d 1 1 -> b d")
    want = einops.rearrange(linear(pooled), "b (s d) -> b s d", s=k, d=D_MODEL)
    torch.testing.assert_close(proj(feats), want, rtol=1e-6, atol=1e-6)
    assert proj(feats).shape == (2, k, D_MODEL)


def test_mlp_equals_llava_projector_with_the_same_weights():
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=D_IMG, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, image_size=16, patch_size=8),
        text_config=transformers.LlamaConfig(hidden_size=D_MODEL, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, vocab_size=64),
        projector_hidden_act="gelu")
    torch.manual_seed(0)
    hf = LlavaMultiModalProjector(config).eval()
    proj = ImageProjection(_info(kind="mlp"), dropout=0.0).eval()
    proj.load_state_dict(hf.state_dict())  # same key names: linear_1, linear_2
    feats = torch.randn(2, 6, D_IMG)
    assert torch.equal(proj(feats), hf(feats))


@pytest.mark.parametrize("kind", ["linear", "pooled", "mlp"])
def test_save_load_round_trip_records_kind(tmp_path, kind):
    proj = ImageProjection(_info(kind=kind, n_tokens=4 if kind == "pooled" else None), dropout=0.0).eval()
    proj.save(tmp_path / "p.pt")
    back = ImageProjection.load(tmp_path / "p.pt").eval()
    assert back.info == proj.info and back.kind == kind
    feats = torch.randn(1, 6, D_IMG)
    assert torch.equal(back(feats), proj(feats))
    assert not list(tmp_path.glob(".*tmp"))  # atomic save leaves no temporary file


def test_layout_is_recorded_and_older_checkpoints_read_as_no_bos(tmp_path):
    proj = ImageProjection(_info(bos=True))
    proj.save(tmp_path / "p.pt")
    assert ImageProjection.load(tmp_path / "p.pt").info.bos is True
    ckpt = torch.load(tmp_path / "p.pt", weights_only=True)
    del ckpt["info"]["bos"]  # a checkpoint written before the field existed: images opened the sequence
    torch.save(ckpt, tmp_path / "old.pt")
    assert ImageProjection.load(tmp_path / "old.pt").info.bos is False
    with pytest.raises(TypeError, match="bos must be True or False"):
        _info(bos=1)


def test_limber_checkpoint_of_another_width_is_refused(tmp_path):
    _limber_ckpt(tmp_path / "proj.ckpt", 4096, d_in=1024)  # LiMBeR's BEiT-large -> GPT-J-6B
    with pytest.raises(ValueError, match=r"linear.weight has shape \(4096, 1024\), expected \(16, 24\)"):
        ImageProjection.from_limber(tmp_path / "proj.ckpt", _info())
    _limber_ckpt(tmp_path / "pool.ckpt", 2 * D_MODEL)
    with pytest.raises(ValueError, match=r"'pooled' projection .* to 3 tokens"):
        ImageProjection.from_limber(tmp_path / "pool.ckpt", _info(kind="pooled", n_tokens=3))


def test_bad_checkpoints_are_named(tmp_path):
    linear = _limber_ckpt(tmp_path / "proj.ckpt", D_MODEL)
    with pytest.raises(ValueError, match="from_limber"):
        ImageProjection.load(tmp_path / "proj.ckpt")
    torch.save({"proj.weight": linear.weight}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"not a LiMBeR proj.ckpt.*proj.weight"):
        ImageProjection.from_limber(tmp_path / "other.ckpt", _info())
    with pytest.raises(ValueError, match="'linear' or 'pooled'"):
        ImageProjection.from_limber(tmp_path / "proj.ckpt", _info(kind="mlp"))
    # a tl_multimodal checkpoint whose weights disagree with its recorded kind
    proj = ImageProjection(_info())
    ckpt = {"state_dict": proj.state_dict(), "info": {**vars(_info(kind="mlp")), "grid": [2, 3]}, "dropout": 0.1}
    torch.save(ckpt, tmp_path / "wrong_kind.pt")
    with pytest.raises(ValueError, match=r"holds \['linear.bias', 'linear.weight'\] but a 'mlp' projection"):
        ImageProjection.load(tmp_path / "wrong_kind.pt")


def test_non_finite_weights_are_refused(tmp_path):
    linear = _limber_ckpt(tmp_path / "proj.ckpt", D_MODEL)
    with torch.no_grad():
        linear.bias[3] = float("nan")
    torch.save(linear.state_dict(), tmp_path / "proj.ckpt")
    with pytest.raises(ValueError, match="NaN or infinite values in linear.bias"):
        ImageProjection.from_limber(tmp_path / "proj.ckpt", _info())
    proj = ImageProjection(_info(kind="mlp"))
    with torch.no_grad():
        proj.linear_2.weight[0, 0] = float("inf")
    proj.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="linear_2.weight"):
        ImageProjection.load(tmp_path / "p.pt")


def test_info_is_checked():
    with pytest.raises(ValueError, match="kind"):
        _info(kind="conv")
    with pytest.raises(ValueError, match="needs n_tokens"):
        _info(kind="pooled")
    with pytest.raises(ValueError, match="n_tokens must be 6"):
        _info(n_tokens=5)
    with pytest.raises(ValueError, match="unknown fields"):
        ProjectionInfo.from_dict({**vars(_info()), "colour": 1})


def test_shipped_projection_still_loads():
    proj = ImageProjection.load(SHIPPED_PROJECTION)
    info = proj.info
    assert (proj.kind, proj.n_tokens, info.encoder, info.d_img) == ("linear", 49, "tf_efficientnet_lite0", 1280)
    assert proj.linear.weight.shape == (576, 1280) and torch.isfinite(proj.linear.weight).all()


def test_projection_id_is_one_identity_for_the_file_and_the_module(tmp_path):
    shipped = ImageProjection.load(SHIPPED_PROJECTION)
    assert projection_id(shipped) == projection_id(SHIPPED_PROJECTION)
    assert len(projection_id(shipped)) == 16 and int(projection_id(shipped), 16) >= 0
    shipped.save(tmp_path / "again.pt")  # other file bytes are possible; the id is of the content
    assert projection_id(tmp_path / "again.pt") == projection_id(shipped)
    assert projection_id(ImageProjection.load(tmp_path / "again.pt").double()) == projection_id(shipped)

    proj = ImageProjection(_info(), dropout=0.0)
    before = projection_id(proj)
    proj.info.training = {"steps": 3}  # the record is history, not identity
    assert projection_id(proj) == before
    weight = proj.linear.weight[0, 0].item()
    with torch.no_grad():
        proj.linear.weight[0, 0] = weight + 1e-3
    assert projection_id(proj) != before
    with torch.no_grad():
        proj.linear.weight[0, 0] = weight
    assert projection_id(proj) == before
    proj.info.bos = True  # another layout computes something else
    assert projection_id(proj) != before


def test_pooled_projection_in_the_model_gives_k_image_tokens(backend, request, vit_encoder, pixels):
    """A pooled projector makes n_image_tokens = k, whatever the grid; logits follow the embeddings."""
    from conftest import gpt2_small_vlm

    info = ProjectionInfo(encoder=vit_encoder.model_name, d_img=vit_encoder.d_img, grid=vit_encoder.grid,
                          lm="gpt2", d_model=768, kind="pooled", n_tokens=2)
    model = gpt2_small_vlm(backend, request, vit_encoder, ImageProjection(info))
    assert model.n_image_tokens == 2
    tokens = model.to_tokens("A picture of", image=True)
    assert model.image_mask(tokens).sum() == 2
    with torch.no_grad():
        embed = model.embed_images(pixels)
        assert embed.shape == (3, 2, 768)
        want = model.projection(vit_encoder(pixels))
        torch.testing.assert_close(embed, want)
        logits = model("A picture of", images=pixels)
        assert logits.shape == (3, tokens.shape[1], 50257)
        torch.testing.assert_close(logits, model("A picture of", image_embed=want))
