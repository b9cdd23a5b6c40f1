"""Oracles for tl_multimodal.sae and SAE latents as units: SAELens folders and Gemma Scope npz files written
here by hand give encode/decode equal to each architecture's formula (written again here, independently);
the splice with its error term leaves the logits unchanged; latent attribution against finite differences of
the residual stream moved along the latent's decoder row; ablation moves the residual by exactly the decoder
contribution; decoding against that contribution projected on W_U; the trainer against its own data."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tl_multimodal import load_sae, save_sae
from tl_multimodal.analysis.ablation import ablate_units, mean_unit_activations
from tl_multimodal.analysis.attribution import attribute
from tl_multimodal.analysis.decoding import decode_units
from tl_multimodal.sae.model import SAE, SAEConfig
from tl_multimodal.sae.splice import latent_edit_hook, model_hook_name
from tl_multimodal.sae.train import reconstruction_stats, train_sae

from conftest import build_vlm, tiny_hf

PROMPT = "A picture of"
D_IN, D_SAE = 32, 48


def _params(arch: str, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_dec": torch.randn(d_in, generator=g) * 0.3}
    if arch == "gated":
        p |= {"b_gate": torch.randn(d_sae, generator=g) * 0.3, "r_mag": torch.randn(d_sae, generator=g) * 0.2,
              "b_mag": torch.randn(d_sae, generator=g) * 0.3}
    else:
        p["b_enc"] = torch.randn(d_sae, generator=g) * 0.3
    if arch == "jumprelu":
        p["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    return p


def _oracle(arch, p, x, k=None, b_dec_in=True, norm="none"):
    """encode/decode of each architecture, from the formulas (SAELens's definitions)."""
    xin, undo = x, (lambda y: y)
    if norm == "constant_norm_rescale":
        c = (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True)
        xin, undo = x * c, (lambda y: y / c)
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        sd = (x - mu).std(-1, keepdim=True)
        xin, undo = (x - mu) / (sd + 1e-5), (lambda y: y * sd + mu)
    if b_dec_in:
        xin = xin - p["b_dec"]
    if arch == "gated":
        gate = (torch.einsum("...i,ij->...j", xin, p["W_enc"]) + p["b_gate"]) > 0
        mag = torch.einsum("...i,ij->...j", xin, p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"]
        f = gate.float() * mag.clamp_min(0)
    else:
        pre = torch.einsum("...i,ij->...j", xin, p["W_enc"]) + p["b_enc"]
        if arch == "standard":
            f = pre.clamp_min(0)
        elif arch == "jumprelu":
            f = torch.where(pre > p["threshold"], pre, torch.zeros_like(pre)).clamp_min(0)
        else:  # topk: the k largest pre-activations per row, then ReLU
            kth = pre.sort(-1, descending=True).values[..., k - 1:k]
            f = torch.where(pre >= kth, pre.clamp_min(0), torch.zeros_like(pre))
    recon = undo(torch.einsum("...j,ji->...i", f, p["W_dec"]) + p["b_dec"])
    return f, recon


def _write_saelens(folder, arch, p, version, hook="blocks.1.hook_resid_post", k=None, **cfg):
    folder.mkdir(parents=True)
    raw = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu"} | cfg
    if arch == "topk" and version == 5:  # SAELens 5: a standard SAE with a TopK activation
        raw |= {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}}
    elif arch == "topk":
        raw["k"] = k
    if version == 5:
        raw |= {"hook_name": hook, "hook_layer": 1, "hook_head_index": None, "model_name": "tiny"}
    else:
        raw["metadata"] = {"hook_name": hook, "model_name": "tiny", "sae_lens_version": "6.5.0"}
    (folder / "cfg.json").write_text(json.dumps(raw))
    save_file({n: v.contiguous() for n, v in p.items()}, str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("version", [5, 6])
@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_folder_gives_the_architectures_formulas(tmp_path, arch, norm, version):
    p = _params(arch)
    b_dec_in = arch != "jumprelu"  # both settings are read
    _write_saelens(tmp_path / "sae", arch, p, version, k=7, apply_b_dec_to_input=b_dec_in,
                   normalize_activations=norm)
    sae = load_sae(tmp_path / "sae")
    assert (sae.cfg.architecture, sae.hook_name, sae.cfg.d_sae) == (arch, "blocks.1.hook_resid_post", D_SAE)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    f_want, recon_want = _oracle(arch, p, x, k=7, b_dec_in=b_dec_in, norm=norm)
    f = sae.encode(x)
    torch.testing.assert_close(f, f_want, rtol=1e-5, atol=1e-5)
    assert (f > 0).float().mean() > 0.05  # the formulas are exercised, not all zero
    if arch == "topk":
        assert ((f != 0).sum(-1) <= 7).all() and ((f != 0).sum(-1) == 7).any()
    torch.testing.assert_close(sae.decode(f, x), recon_want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae(x), recon_want, rtol=1e-5, atol=1e-4)
    # written back in SAELens 6's format, it reads the same
    again = load_sae(save_sae(sae, tmp_path / "again"))
    torch.testing.assert_close(again.encode(x), f)


def test_gemma_scope_npz(tmp_path):
    p = {n: v.numpy() for n, v in _params("jumprelu").items()}
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    sae = load_sae(folder)
    assert sae.hook_name == "blocks.1.hook_resid_post" and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(2)) * 2
    f_want, recon_want = _oracle("jumprelu", {n: torch.from_numpy(v) for n, v in p.items()}, x, b_dec_in=False)
    torch.testing.assert_close(sae.encode(x), f_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), recon_want, rtol=1e-5, atol=1e-4)
    np.savez(tmp_path / "params.npz", **p)
    with pytest.raises(ValueError, match="hook_name"):
        load_sae(tmp_path / "params.npz")
    assert load_sae(tmp_path / "params.npz", hook_name="blocks.0.hook_mlp_out").hook_name == "blocks.0.hook_mlp_out"


def test_bad_files_are_named(tmp_path):
    p = _params("standard")
    _write_saelens(tmp_path / "a", "standard", p, 6, finetuning_scaling_factor=True)
    with pytest.raises(ValueError, match="finetuning_scaling_factor"):
        load_sae(tmp_path / "a")
    _write_saelens(tmp_path / "b", "jumprelu", p, 6)  # no threshold
    with pytest.raises(ValueError, match="threshold"):
        load_sae(tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nothing")


# ------------------------------------------------------------------ spliced into a vision LM
@pytest.fixture(scope="module")
def tiny(backend, gpt2_tokenizer, vit_encoder):
    """3 layers, d_model 32, float64, on ``backend``."""
    return build_vlm(backend, tiny_hf("gpt2"), gpt2_tokenizer, vit_encoder)


@pytest.fixture(scope="module")
def feats(vit_encoder):
    torch.manual_seed(5)
    return torch.randn(2, vit_encoder.n_patches, vit_encoder.d_img)


def _sae(arch="standard", hook="blocks.1.hook_resid_post", seed=0):
    p = _params(arch, seed)
    p["b_enc"] = p.get("b_enc", torch.zeros(D_SAE)) + 0.5  # most latents fire
    return SAE(SAEConfig(arch, D_IN, D_SAE, hook, k=9 if arch == "topk" else None), p, dtype=torch.float64)


def test_hook_names_map_on_both_backends(tiny, backend):
    assert model_hook_name(tiny, "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    if backend == "bridge":  # the bridge's own name is the same hook point
        assert model_hook_name(tiny, "blocks.1.hook_out") == "blocks.1.hook_resid_post"
        assert tiny.hook_dict["blocks.1.hook_out"] is tiny.hook_dict["blocks.1.hook_resid_post"]
    else:
        assert model_hook_name(tiny, "blocks.1.hook_out") == "blocks.1.hook_resid_post"  # a bridge-trained SAE
    with pytest.raises(ValueError, match="not a hook"):
        model_hook_name(tiny, "blocks.9.hook_resid_post")


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_splice_with_error_term_leaves_logits(tiny, feats, arch):
    sae = _sae(arch)
    clean = tiny(PROMPT, image_features=feats)
    spliced = tiny.run_with_hooks(PROMPT, image_features=feats,
                                  fwd_hooks=[(sae.hook_name, latent_edit_hook(sae, lambda f, hook: f))])
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)
    without = tiny.run_with_hooks(PROMPT, image_features=feats, fwd_hooks=[(sae.hook_name, lambda x, hook: sae(x))])
    assert (without - clean).abs().max() > 1e-2  # the error term is what keeps them equal


def test_latent_attribution_matches_finite_differences(tiny, feats):
    """f * dy/df: moving the residual stream along W_dec[i] at one image slot by +-eps changes y by
    eps * dy/df_i (the error term is held, so a latent's change is its decoder row's)."""
    sae = _sae()
    tid = tiny.tokenizer(" dog")["input_ids"][0]
    attr = attribute(tiny, image_features=feats, target=tid, prompt=PROMPT, sae=sae)
    assert attr.scores.shape == (2, 1, 16, D_SAE) and attr.hook == "sae"
    clean = tiny(PROMPT, image_features=feats)[:, -1, tid]
    torch.testing.assert_close(attr.y.double(), clean.detach(), rtol=1e-6, atol=1e-6)
    _, cache = tiny.run_with_cache(PROMPT, image_features=feats)
    f = sae.encode(cache["blocks.1.hook_resid_post"])
    strongest = divmod(int(attr.scores[0, 0].abs().argmax()), D_SAE)
    eps = 1e-4
    for patch, latent in [(3, 5), (15, 0), strongest]:
        pos = tiny.image_mask(tiny.to_tokens(PROMPT, image=True))[0].nonzero()[patch].item()

        def y(d):
            def edit(x, hook):
                x = x.clone()
                x[:, pos] += d * sae.W_dec[latent].detach()
                return x
            return tiny.run_with_hooks(PROMPT, image_features=feats, fwd_hooks=[(sae.hook_name, edit)])[:, -1, tid]

        grad = (y(eps) - y(-eps)).detach() / (2 * eps)
        torch.testing.assert_close(attr.scores[:, 0, patch, latent].double(), f[:, pos, latent].detach() * grad,
                                   rtol=1e-4, atol=1e-7)
    assert attr.scores.abs().max() > 1e-2
    top = attr.top_units(3)
    assert top.hook == "sae" and top.layer.eq(0).all()


def test_ablating_a_latent_moves_the_residual_by_its_decoder_row(tiny, feats):
    """Zero-ablating latent i at the image slots changes the hooked residual stream by exactly -f_i W_dec[i]
    there and nowhere else; p(c) is then what that edit gives; decoding ranks the tokens that edit writes."""
    sae = _sae()
    tokens = tiny.to_tokens(PROMPT, image=True)
    mask = tiny.image_mask(tokens)[0]
    seen = {}
    _, cache = tiny.run_with_cache(PROMPT, image_features=feats)
    x = cache["blocks.1.hook_resid_post"]
    f = sae.encode(x).detach()
    latent = int(f[0, mask].mean(0).argmax())  # one that fires at image 0's slots

    def grab(act, hook):
        seen["x"] = act.detach().clone()

    res = ablate_units(tiny, None, [(0, latent)], target=" dog", prompt=PROMPT, image_features=feats, sae=sae)
    from tl_multimodal.analysis._interventions import swap_hook  # the edit ablate_units makes, re-run to look
    edit = latent_edit_hook(sae, lambda f_, hook: swap_hook(f_, hook, mask[None].expand(2, -1), torch.zeros(()),
                                                            torch.arange(D_SAE)[None].expand(2, -1) == latent))
    tiny.run_with_hooks(PROMPT, image_features=feats, fwd_hooks=[(sae.hook_name, edit), (sae.hook_name, grab)])
    delta = seen["x"] - x
    want = torch.zeros_like(x)
    want[:, mask] = -f[:, mask, latent, None] * sae.W_dec[latent].detach()
    torch.testing.assert_close(delta, want, rtol=0, atol=1e-10)
    # p(c) after: the residual moved along -f W_dec[latent] by hand
    def by_hand(act, hook):
        return act + want
    logits = tiny.run_with_hooks(PROMPT, image_features=feats, fwd_hooks=[(sae.hook_name, by_hand)])
    tid = tiny.tokenizer(" dog")["input_ids"][0]
    torch.testing.assert_close(res.p_after.double(), logits[:, -1].softmax(-1)[:, tid].detach(), rtol=1e-5, atol=0)
    # decoding: the latent's direction through W_U ranks tokens as the edit's own logit change does
    dec = decode_units(tiny, [(0, latent)], sae=sae)
    j = int((f[0, :, latent] * mask).argmax())
    assert f[0, j, latent] > 1e-3
    assert (-delta[0, j] @ tiny.W_U).topk(10).indices.tolist() == dec.token_ids[0].tolist()
    # mean ablation to the latents' own means at each slot changes nothing on the images the means came from
    means = mean_unit_activations(tiny, image_features=feats[:1], sae=sae)
    assert means.shape == (1, 16, D_SAE)
    torch.testing.assert_close(means[0], f[0, mask].float())


def test_patching_a_latent_moves_the_base_residual_by_the_source_difference(tiny, feats):
    """Patching latent i from a source image into a base image moves the base's residual stream at the image
    slots by (f_src_i - f_base_i) W_dec[i] (the base keeps its error term): p(c) as that edit by hand gives."""
    from tl_multimodal.analysis.patching import patch_units

    sae = _sae()
    src, base = feats[:1], feats[1:]
    mask = tiny.image_mask(tiny.to_tokens(PROMPT, image=True))[0]
    f = {}
    for key, emb in (("src", src), ("base", base)):
        _, cache = tiny.run_with_cache(PROMPT, image_features=emb)
        f[key] = sae.encode(cache["blocks.1.hook_resid_post"]).detach()
    diff = f["src"] - f["base"]
    latent = int(diff[0, mask].abs().sum(0).argmax())
    res = patch_units(tiny, None, None, [(0, latent)], target=" dog", prompt=PROMPT, sae=sae,
                      source_embed=tiny.embed_images(image_features=src), base_embed=tiny.embed_images(image_features=base))

    def by_hand(act, hook):
        act = act.clone()
        act[:, mask] += diff[:, mask, latent, None] * sae.W_dec[latent].detach()
        return act

    tid = tiny.tokenizer(" dog")["input_ids"][0]
    logits = tiny.run_with_hooks(PROMPT, image_features=base, fwd_hooks=[(sae.hook_name, by_hand)])
    torch.testing.assert_close(res.p_patched.double(), logits[:, -1].softmax(-1)[:, tid].detach(), rtol=1e-6, atol=0)
    assert ((res.p_patched - res.p_base) / res.p_base).abs().max() > 0.01  # the patch does something
    clean = tiny(PROMPT, image_features=base)[:, -1].softmax(-1)[:, tid]
    torch.testing.assert_close(res.p_base.double(), clean.detach(), rtol=1e-6, atol=0)


def test_latent_heatmap_grids_are_the_latents_at_the_image_slots(tiny, feats):
    """unit_grid_activations(sae=): each (SAE index, latent)'s grid is encode(resid) at the image slots, in
    slot order, for two SAEs on two layers at once."""
    from tl_multimodal.analysis.heatmaps import unit_grid_activations

    saes = [_sae(hook="blocks.0.hook_resid_post", seed=1), _sae()]
    units = [(1, 3), (0, 7), (1, 40)]
    grids = unit_grid_activations(tiny, image_features=feats, units=units, sae=saes)
    assert grids.shape == (2, 3, 4, 4)
    _, cache = tiny.run_with_cache("", image_features=feats)
    mask = tiny.image_mask(tiny.to_tokens("", image=True))[0]
    for j, (i, latent) in enumerate(units):
        f = saes[i].encode(cache[saes[i].hook_name])[:, mask, latent]
        torch.testing.assert_close(grids[:, j].flatten(1), f.float().detach())
    assert grids.abs().max() > 0


def test_latents_through_the_ablation_curve_and_the_controls(tiny, feats):
    """ablation_curve(sae=) and specificity_controls(sae=) ablate latents as ablate_units(sae=) does (its oracle
    is above), and draw their random and magnitude-matched controls from the SAE's latents."""
    from tl_multimodal.analysis.ablation import ablation_curve
    from tl_multimodal.evaluation.controls import specificity_controls, unit_magnitudes

    sae = _sae()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    attr = attribute(tiny, pixels, target=" dog", prompt=PROMPT, sae=sae)
    ranked = attr.top_units(6).units_per_image()
    emb = tiny.embed_images(pixels)
    curve = ablation_curve(tiny, None, ranked, ks=[1, 3], probe=attr.probe, image_embed=emb, sae=sae)
    for i, k in enumerate([1, 3]):
        want = ablate_units(tiny, None, ranked[:, :k], probe=attr.probe, image_embed=emb, sae=sae).p_after
        torch.testing.assert_close(curve.p_top[i], want)
    mags = unit_magnitudes(tiny, image_embed=emb, sae=sae)
    _, cache = tiny.run_with_cache("", images=pixels)
    mask = tiny.image_mask(tiny.to_tokens("", image=True))[0]
    torch.testing.assert_close(mags[:, 0], sae.encode(cache[sae.hook_name])[:, mask].abs().amax(1).float().detach())
    ctl = specificity_controls(tiny, pixels, ranked, attr.probe, ks=[3], n_draws=2, sae=sae)
    own = ablate_units(tiny, None, ranked[:, :3], probe=attr.probe, image_embed=emb, sae=sae)
    torch.testing.assert_close(torch.as_tensor(ctl.values[("ablation k=3", "own")]).float(), own.rel_change.float())
    for arm in ("random", "magnitude"):
        drawn = ctl.units[(arm, 6)]
        assert (drawn[..., 0] == 0).all() and (drawn[..., 1] < D_SAE).all() and drawn.shape[-2] == 6


def test_bad_sae_arguments_are_named(tiny, feats):
    sae = _sae()
    with pytest.raises(TypeError, match="sae must be an SAE"):
        attribute(tiny, image_features=feats, target=" dog", sae="blocks.1.hook_resid_post")
    narrow = SAE(SAEConfig("standard", 16, 8, "blocks.1.hook_resid_post"))
    with pytest.raises(ValueError, match="d_in=16"):
        attribute(tiny, image_features=feats, target=" dog", sae=narrow)
    with pytest.raises(ValueError, match="one hook"):
        ablate_units(tiny, None, [(0, 1)], target=" dog", image_features=feats, sae=[sae, _sae(seed=1)])
    with pytest.raises(ValueError, match="d_sae"):
        ablate_units(tiny, None, [(0, D_SAE)], target=" dog", image_features=feats, sae=sae)
    with pytest.raises(ValueError, match="grad_x_act"):
        attribute(tiny, image_features=feats, target=" dog", sae=sae, method="integrated_gradients")


def test_trainer_reconstructs_planted_features():
    """Activations that are sums of 4 of 48 fixed random directions in 64 dimensions: a TopK SAE (k=4) trained
    on 3000 of them reconstructs held-out ones almost exactly; b_dec alone (the mean) explains nothing."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(48, 64, generator=g)
    codes = torch.zeros(4000, 48)
    idx = torch.rand(4000, 48, generator=g).argsort(-1)[:, :4]
    codes.scatter_(1, idx, torch.rand(4000, 4, generator=g) + 0.5)
    acts = codes @ dirs
    sae = train_sae(acts[:3000], "blocks.0.hook_resid_post", d_sae=48, k=4, steps=1000, batch_size=256, lr=3e-3)
    stats = reconstruction_stats(sae, acts[3000:])
    assert stats.l0 == 4 and stats.explained_variance > 0.99, stats
    mean_only = reconstruction_stats(SAE(sae.cfg, {n: p.detach() * (n == "b_dec") for n, p in
                                                   sae.named_parameters()}), acts[3000:])
    assert abs(mean_only.explained_variance) < 0.05, mean_only
