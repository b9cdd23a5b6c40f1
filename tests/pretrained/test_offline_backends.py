"""The offline model (SmolLM2-135M + EfficientNet-Lite0 + the shipped projection) on both backends:
HookedVisionPrefix (TransformerLens's weight conversion of SmolLM2) and VisionBridge (HF's SmolLM2 under
TransformerBridge) are the same model, so every number the README's pipeline gives must agree: the
logits, the caption tokens, the top attributed units (scores to a float32 tolerance that grows with depth) and the
ablation numbers.

Only TransformerLens 3 has both backends; on TransformerLens 4 these tests skip. Each backend is loaded
once for the whole session (``offline_hooked`` / ``offline_bridge`` in conftest.py)."""

import pytest
import torch

from conftest import needs_both_backends

pytestmark = needs_both_backends

PROMPT = "A picture of"
N_IMAGES = 3


@pytest.fixture(scope="module")
def pair(offline_hooked, offline_bridge):
    return offline_hooked, offline_bridge


@pytest.fixture(scope="module")
def images():
    from tl_multimodal.data.sources import sample_images

    return sample_images(N_IMAGES).images


@pytest.fixture(scope="module")
def attributions(pair, images):
    """``attribute(model, images)`` of each backend: the caption's first noun as the target."""
    from tl_multimodal import attribute

    return tuple(attribute(m, images) for m in pair)


def _close(got, want, rtol=1e-4, atol=0.0):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_the_two_backends_are_the_two_classes(pair):
    from tl_multimodal import HookedVisionPrefix, VisionBridge

    hooked, bridge = pair
    assert type(hooked) is HookedVisionPrefix and type(bridge) is VisionBridge
    assert not hooked.training and not bridge.training
    assert (hooked.cfg.n_layers, hooked.cfg.d_mlp, hooked.n_image_tokens) == \
        (bridge.cfg.n_layers, bridge.cfg.d_mlp, bridge.n_image_tokens)


@torch.no_grad()
def test_same_tokens_and_logits_on_image_prefixed_text(pair, images):
    hooked, bridge = pair
    tokens = hooked.to_tokens(PROMPT, image=True)
    assert torch.equal(tokens, bridge.to_tokens(PROMPT, image=True))
    assert hooked.image_mask(tokens).sum() == hooked.n_image_tokens
    pixels = hooked.preprocess(images)
    want = hooked(tokens.expand(len(images), -1), images=pixels)
    got = bridge(tokens.expand(len(images), -1), images=pixels)
    # the logits agree to float32 rounding: what distinguishes two images (~1) is far above it
    _close(got, want, rtol=1e-4, atol=1e-3)
    assert (want[0, -1] - want[1, -1]).abs().max() > 0.1


@torch.no_grad()
def test_same_caption_tokens(pair, images):
    hooked, bridge = pair
    kw = dict(images=images, return_type="tokens", do_sample=False, stop_at_eos=False, verbose=False)
    want = hooked.generate(PROMPT, 8, **kw)
    got = bridge.generate(PROMPT, 8, **kw)
    assert got.shape == want.shape == (N_IMAGES, hooked.to_tokens(PROMPT, image=True).shape[1] + 8)
    assert torch.equal(got, want)
    captions = hooked.caption(images, max_new_tokens=8)
    assert bridge.caption(images, max_new_tokens=8) == captions
    assert len(set(captions)) > 1  # the images are seen: not one caption for all


def test_same_targets_and_attribution_scores(attributions):
    want, got = attributions
    assert got.targets == want.targets and torch.equal(got.target_ids, want.target_ids)
    assert torch.equal(got.probe.tokens, want.probe.tokens)
    _close(got.y, want.y, rtol=1e-4, atol=1e-4)
    scale = want.scores.abs().max()
    assert scale > 1e-2
    # Two float32 implementations (TransformerLens's components, HF's modules) of a score that is an activation
    # times a gradient back through every later layer: each of the n_layers layers rounds differently, so
    # every score to n_layers * 64 * eps(float32) of the largest (2.3e-4 here; measured: 1.04e-4, while the
    # fused and the two-pass attribution of one backend agree to 1.4e-6). The top units' ranks: test_same_top_units.
    n_layers = want.scores.shape[1]
    _close(got.scores, want.scores, rtol=0, atol=n_layers * 64 * torch.finfo(torch.float32).eps * float(scale))


def test_same_top_units(attributions):
    want, got = (a.top_units(10) for a in attributions)
    assert len(want) == len(got) == 10 * N_IMAGES
    for name in ("image_index", "layer", "unit", "patch", "rank"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.target == want.target
    _close(got.score, want.score, rtol=1e-4)
    assert (want.score > 0).all()


def test_same_ablation_numbers(pair, images, attributions):
    from tl_multimodal.analysis.ablation import ablate_units, ablation_curve

    units = attributions[0].top_units(10).units_per_image()  # the same units on both backends
    want, got = (ablate_units(m, images, units, probe=attributions[0].probe) for m in pair)
    _close(got.p_before, want.p_before)
    _close(got.p_after, want.p_after)
    assert (want.p_after < want.p_before).any()  # the top units matter: the numbers compared move
    want, got = (ablation_curve(m, images, units, ks=(1, 5), n_random_seeds=1, probe=attributions[0].probe)
                 for m in pair)
    wdf, gdf = want.to_dataframe(), got.to_dataframe()
    assert list(gdf.columns) == list(wdf.columns) and len(gdf) == len(wdf) > 0
    for col in wdf.columns:
        g, w = (torch.tensor(df[col].to_numpy()) if df[col].dtype.kind == "f" else df[col].tolist() for df in (gdf, wdf))
        if col in ("p_before", "p_after"):
            _close(g, w)
        elif col == "rel_change":  # p_after / p_before - 1: the two probabilities' 1e-4 each, on their ratio
            _close(g, w, rtol=1e-4, atol=2e-4 * float(torch.tensor(wdf.p_after / wdf.p_before).abs().max()))
        else:
            assert g == w, col
